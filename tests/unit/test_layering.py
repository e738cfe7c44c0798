"""The import rules that keep the layers visible in the tree (STYLE.md §1)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import qemu_blockdev

ROOT = Path(__file__).resolve().parents[2]


def imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def python_files(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("path", python_files("qemu_blockdev"), ids=str)
def test_qemu_blockdev_imports_nothing_of_ours_nor_libvirt(path: Path) -> None:
    bad = {m for m in imports_of(path) if m.split(".")[0] in {"plugin", "libvirt", "libvirt_qemu", "libvirtaio", "tests"}}
    assert not bad, f"{path.name} imports {bad}"
    if path.name != "qmp_socket.py":
        assert not {m for m in imports_of(path) if m.startswith("qemu.qmp")}, "only qmp_socket.py may use qemu.qmp"


def test_only_plugin_virt_imports_libvirt() -> None:
    offenders = []
    for path in python_files("plugin"):
        if "virt" in path.relative_to(ROOT / "plugin").parts[:1]:
            continue
        if {m for m in imports_of(path) if m.split(".")[0].startswith("libvirt")}:
            offenders.append(str(path))
    assert not offenders


def test_plugin_domain_imports_nothing_of_ours() -> None:
    for path in python_files("plugin/domain"):
        assert not {m for m in imports_of(path) if m.split(".")[0] in {"plugin", "qemu_blockdev"}}, path


def test_public_names_are_exported_sorted_and_real() -> None:
    names = qemu_blockdev.__all__
    assert names == sorted(names)
    for name in names:
        assert hasattr(qemu_blockdev, name), name

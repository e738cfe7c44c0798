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


# -- the agent: a composition root and its services (docs/DESIGN.md §7) --------------

AGENT = ROOT / "plugin" / "agent"
# Which module of plugin/agent/ may import which other: what docs/DESIGN.md §7 names.
AGENT_USES = {
    "group": set(),
    "quiesce": set(),
    "parts": {"group"},
    "tracking": {"parts", "group"},
    "supervisor": {"parts", "group", "tracking", "quiesce"},
    "protection": {"parts", "group", "supervisor", "tracking"},
    "journal": {"parts", "group"},
    "status": {"parts", "group", "protection"},
}
SERVICES = {"protection", "journal", "tracking", "status"}


def resolved_imports(path: Path) -> set[str]:
    """Every module ``path`` imports, relative imports resolved (``from . import x`` gives
    ``pkg.x`` too: x may be a module)."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            names.add(module)
            names.update(f"{module}.{a.name}" for a in node.names)
    return names


def test_the_agent_modules_are_the_ones_the_design_names() -> None:
    assert {p.stem for p in AGENT.glob("*.py")} - {"__init__"} == set(AGENT_USES)


@pytest.mark.parametrize("name", sorted(AGENT_USES))
def test_services_import_each_other_only_as_the_design_says(name: str) -> None:
    used = {m.split(".")[2] for m in resolved_imports(AGENT / f"{name}.py") if m.startswith("plugin.agent.")}
    assert used - {name} <= AGENT_USES[name], f"plugin/agent/{name}.py imports {used - AGENT_USES[name] - {name}}"
    assert "plugin.daemon" not in resolved_imports(AGENT / f"{name}.py"), "a service knows the composition root"


def test_only_the_composition_root_knows_the_services() -> None:
    for path in python_files("plugin"):
        if AGENT in path.parents or path == ROOT / "plugin" / "daemon.py":
            continue
        assert not {m for m in resolved_imports(path) if m.startswith("plugin.agent")}, path
    root = {m.split(".")[2] for m in resolved_imports(ROOT / "plugin" / "daemon.py") if m.startswith("plugin.agent.")}
    assert SERVICES <= root, f"plugin/daemon.py does not build {SERVICES - root}"
    for name in AGENT_USES:
        others = {m.split(".")[2] for m in resolved_imports(AGENT / f"{name}.py") if m.startswith("plugin.agent.")}
        assert not SERVICES <= others, f"plugin/agent/{name}.py knows every service"

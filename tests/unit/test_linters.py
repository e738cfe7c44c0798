"""Linters as tests (as QEMU's python/tests/linters.py): ruff over the tree,
mypy --strict over the packages (configuration in setup.cfg and pyproject.toml)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def run_tool(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *argv], cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.mark.skipif(shutil.which("ruff") is None and not (Path(sys.executable).parent / "ruff").exists(),
                    reason="ruff is not installed (make setup installs it)")
def test_ruff() -> None:
    res = run_tool("ruff", "check", "qemu_blockdev", "plugin", "tests", "scripts", "bench", "hooks/qemu")
    assert res.returncode == 0, res.stdout + res.stderr


def test_mypy_strict() -> None:
    pytest.importorskip("mypy")
    res = run_tool("mypy")
    assert res.returncode == 0, res.stdout + res.stderr

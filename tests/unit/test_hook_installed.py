"""``virtsync hook install`` from an installed layout, not the source tree: the package is
built as a wheel would hold it (setuptools ``build_py`` with setup.cfg's package data), the
source copy is deleted, and the CLI run from the built tree installs the same hook."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from plugin import hook

ROOT = Path(__file__).resolve().parents[2]


def build_installed_layout(tmp_path: Path) -> Path:
    """The pure-Python tree a wheel of this project installs, from a copy of the sources."""
    src, site = tmp_path / "src", tmp_path / "site"
    src.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("plugin", "qemu_blockdev"):
        shutil.copytree(ROOT / name, src / name, ignore=ignore)
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    subprocess.run([sys.executable, "-c", "from setuptools import setup; setup()", "-q", "build_py",
                    "--build-lib", str(site)], cwd=src, check=True, capture_output=True, timeout=120)
    shutil.rmtree(src)   # nothing may be read from a source tree any more
    return site


def test_hook_install_works_from_an_installed_layout(tmp_path: Path) -> None:
    site = build_installed_layout(tmp_path)
    installed_template = site / "plugin" / "hooks" / "qemu"
    assert installed_template.is_file() and not installed_template.is_symlink(), "the hook template is not package data"
    config = tmp_path / "virtsync.toml"
    config.write_text(f'[agent]\nstate_dir = "{tmp_path / "state"}"\n')
    run_dir, hooks_dir = tmp_path / "elsewhere", tmp_path / "qemu.d"
    run_dir.mkdir()
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(site)}
    # -P: the working directory is not on sys.path, so only the built tree provides plugin.
    where = subprocess.run([sys.executable, "-P", "-c", "import plugin; print(plugin.__file__)"], cwd=run_dir,
                           env=env, check=True, capture_output=True, text=True, timeout=60)
    assert Path(where.stdout.strip()).parent == site / "plugin"
    done = subprocess.run([sys.executable, "-P", "-m", "plugin.cli", "--config", str(config), "--socket",
                           str(tmp_path / "agent.sock"), "hook", "install", "--dir", str(hooks_dir)],
                          cwd=run_dir, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    installed = (hooks_dir / hook.HOOK_NAME).read_text()
    assert installed == hook.render((ROOT / "hooks" / "qemu").read_text(), interpreter=sys.executable,
                                    socket_path=str(tmp_path / "agent.sock"),
                                    spool=str(tmp_path / "state" / "hook-spool.jsonl"))


def test_the_template_is_found_through_the_package() -> None:
    assert hook.template_path().read_text() == (ROOT / "hooks" / "qemu").read_text()

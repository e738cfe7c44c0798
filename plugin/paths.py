"""Checks of the paths the agent is given (config, ``restore --to``), each refusing with one
line that names the path and the rule, before anything is created or removed there."""

from __future__ import annotations

import os
import stat

from .errors import ConfigError
from .requests import UsageError

__all__ = ["KERNEL_FILESYSTEMS", "check_restore_target", "ensure_dir"]

#: Not storage: writing a restored image there is never meant (and may do harm).
KERNEL_FILESYSTEMS = ("/proc", "/sys", "/dev")


def _strerror(e: OSError) -> str:
    return e.strerror or type(e).__name__


def ensure_dir(path: str, key: str, mode: int = 0o700) -> None:
    """Create directory ``path`` (and its parents) unless it exists; config key ``key`` names it.

    :raise ConfigError: ``path`` exists and is not a directory, or cannot be created
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        st = None
    except OSError as e:
        raise ConfigError(f"{key} {path}: {_strerror(e)}") from None
    if st is not None and not stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"{key} {path} is not a directory")
    try:
        os.makedirs(path, mode=mode, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"{key} {path}: cannot create the directory: {_strerror(e)}") from None


def _under(path: str, top: str) -> bool:
    return path == top or path.startswith(top + "/")


def check_restore_target(dest: str) -> None:
    """``restore --to DEST``: an absolute path of storage, a directory that is empty or missing.

    :raise UsageError: one line naming ``dest`` and the rule it breaks
    """
    shown = repr(dest) if not dest.isprintable() else dest
    if "\0" in dest:
        raise UsageError(f"--to {shown}: a path cannot hold a NUL character")
    if not os.path.isabs(dest):
        raise UsageError(f"--to must be an absolute path, not {shown}")
    real = os.path.realpath(dest)
    for top in KERNEL_FILESYSTEMS:
        if _under(os.path.normpath(dest), top) or _under(real, top):
            raise UsageError(f"--to {shown}: {top} is a kernel filesystem, not storage: restore into a "
                             "directory on a disk")
    try:
        st = os.stat(dest)
    except FileNotFoundError:
        return   # restore creates it
    except OSError as e:
        raise UsageError(f"--to {shown}: {_strerror(e)}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise UsageError(f"--to {shown} exists and is not a directory: restore writes one image per disk "
                         "into an empty or new directory")
    try:
        if os.listdir(dest):
            raise UsageError(f"--to {shown} is not empty: restore never overwrites")
    except OSError as e:
        raise UsageError(f"--to {shown}: {_strerror(e)}") from None

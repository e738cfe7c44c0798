"""Install and remove the libvirt hook (``hooks/qemu``), and replay what it spooled.

The hook forwards every libvirt qemu hook call to the agent as one IPC request::

    {"v": 1, "op": "hook", "args": {"domain": "web1", "op": "started", "sub_op": "begin",
                                   "extra": "-", "time": 1732480000.123, "host_pid": 4242}}

and when the agent does not answer ``ok`` within 1 s it appends the ``args`` object as one
line to the spool (``<state_dir>/hook-spool.jsonl``, 0600, under ``flock``). The daemon
takes the spool at start with :func:`read_spool` and, once replayed, drops it with
:func:`clear_spool`. ``host_pid`` is the hook's parent: the libvirtd that ran it.

:func:`install` writes the hook with the socket and spool paths baked in and its shebang set
to the interpreter that has virtsync, so the hook needs no config file and no environment
(libvirt passes only ``LC_ALL``, ``PATH`` and ``HOME``). Standard library only: the daemon
imports this module, the CLI imports it lazily.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import stat
import sys
from collections.abc import Iterator
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

from plugin.errors import PluginError

__all__ = [
    "DEFAULT_DIR",
    "HOOK_NAME",
    "MARKER",
    "SPOOL_NAME",
    "HookInstallError",
    "clear_spool",
    "install",
    "is_ours",
    "keep_unreplayed",
    "read_spool",
    "render",
    "spool_path",
    "template_path",
    "uninstall",
]

#: libvirt runs every executable in this directory after ``hooks/qemu`` (libvirt >= 6.5).
DEFAULT_DIR = "/etc/libvirt/hooks/qemu.d"
HOOK_NAME = "virtsync"
SPOOL_NAME = "hook-spool.jsonl"
#: The comment that makes a hook file ours: only such a file is replaced or removed.
MARKER = "# virtsync-hook:"
#: Linux reads at most this many bytes of a ``#!`` line (BINPRM_BUF_SIZE since 5.1).
MAX_SHEBANG = 255
#: Longest unix socket path (``sun_path`` is 108 bytes with its NUL).
MAX_SOCKET_PATH = 107
#: Interpreter flags: isolated (no PYTHON* env, no user site) and no ``site`` import.
PYTHON_FLAGS = "-IS"
#: The spool is taken into this sibling for replay, so lines appended meanwhile are kept.
REPLAY_SUFFIX = ".replay"

log = logging.getLogger("virtsync.hook")


class HookInstallError(PluginError):
    """The hook cannot be installed or removed (foreign file, bad interpreter, I/O error)."""


# ----------------------------------------------------------------------------- paths

def template_path() -> Traversable:
    """``hooks/qemu``, the template :func:`install` renders. The package carries it as
    data through the link ``plugin/hooks/qemu`` (setup.cfg; the build copies the file),
    found through the package, so an installed wheel has it as much as the source tree."""
    return resources.files("plugin") / "hooks" / "qemu"


def spool_path(state_dir: str) -> str:
    return os.path.join(state_dir, SPOOL_NAME)


# ----------------------------------------------------------------------------- install

def _check_path(what: str, value: str) -> str:
    if not value or "\0" in value or "\n" in value:
        raise HookInstallError(f"{what} {value!r} is not a usable path")
    return os.path.abspath(value)   # libvirt runs the hook with cwd /


def render(template: str, *, interpreter: str, socket_path: str, spool: str) -> str:
    """The hook text with its shebang and the two paths replaced.

    :raise HookInstallError: the interpreter cannot go in a ``#!`` line, or the template
        lacks the marker or one of the lines to replace
    """
    if not os.path.isabs(interpreter) or re.search(r"\s", interpreter):
        raise HookInstallError(f"interpreter {interpreter!r} must be an absolute path without whitespace "
                               "(it becomes the hook's #! line)")
    shebang = f"#!{interpreter} {PYTHON_FLAGS}"
    if len(shebang.encode()) > MAX_SHEBANG:
        raise HookInstallError(f"interpreter path is too long for a #! line ({len(shebang.encode())} bytes, "
                               f"at most {MAX_SHEBANG})")
    first, nl, rest = template.partition("\n")
    if not first.startswith("#!") or MARKER not in rest.split("\n", 3)[0]:
        raise HookInstallError("hook template has no #! line followed by the virtsync marker")
    text = shebang + nl + rest
    if len(_check_path("socket", socket_path).encode()) > MAX_SOCKET_PATH:
        raise HookInstallError(f"socket path {socket_path!r} is longer than a unix socket address allows "
                               f"({MAX_SOCKET_PATH} bytes): the hook could never connect")
    for name, value in (("SOCKET", _check_path("socket", socket_path)), ("SPOOL", _check_path("spool", spool))):
        line = f"{name} = {value!r}"   # a Python literal; escaped, as subn expands backslashes
        text, count = re.subn(rf"^{name} = .*$", line.replace("\\", "\\\\"), text, count=2, flags=re.MULTILINE)
        if count != 1:
            raise HookInstallError(f"hook template must assign {name} exactly once (found {count})")
    return text


def is_ours(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a regular file (not a symlink) whose second line is the virtsync marker.

    :raise OSError: ``path`` exists but cannot be read
    """
    try:
        if not stat.S_ISREG(os.lstat(path).st_mode):
            return False   # a symlink, directory or FIFO is never ours (and a FIFO would block)
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        head = os.read(fd, 4096)
    finally:
        os.close(fd)
    lines = head.split(b"\n", 2)
    return len(lines) > 1 and lines[1].startswith(MARKER.encode())


def _fsync_dir(directory: str | os.PathLike[str]) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _refuse_foreign(target: Path) -> None:
    try:
        foreign = os.path.lexists(target) and not is_ours(target)
    except OSError as e:
        raise HookInstallError(f"cannot read {target}: {e.strerror or e}") from None
    if foreign:
        raise HookInstallError(f"{target} exists and was not written by virtsync (no {MARKER!r} marker); "
                               "refusing to touch it")


def install(directory: str = DEFAULT_DIR, *, socket_path: str, spool: str,
            interpreter: str | None = None, template: str | None = None) -> Path:
    """Write the hook as ``DIRECTORY/virtsync`` (0755), atomically; replace only our own file.

    libvirtd reads its hooks at start and on SIGHUP only: reload it afterwards.

    :param directory: the ``qemu.d`` directory; created (0755) when missing
    :param socket_path: the agent socket, baked in
    :param spool: the spool file, baked in
    :param interpreter: the ``#!`` interpreter, by default the one running this code
    :param template: the hook text, by default :func:`template_path`
    :raise HookInstallError: a foreign file is in the way, or the hook cannot be written
    :return: the hook's path
    """
    if template is None:
        try:
            template = template_path().read_text()
        except OSError as e:
            raise HookInstallError(f"cannot read the hook template {template_path()}: {e.strerror or e}") from None
    text = render(template, interpreter=interpreter or sys.executable, socket_path=socket_path, spool=spool)
    target = Path(directory) / HOOK_NAME
    _refuse_foreign(target)
    tmp = target.with_name(f".{HOOK_NAME}.{os.getpid()}.partial")
    try:
        os.makedirs(directory, 0o755, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, text.encode())
            os.fsync(fd)
            os.fchmod(fd, 0o755)  # only now: libvirt runs whatever is executable in the directory
        finally:
            os.close(fd)
        os.replace(tmp, target)
        _fsync_dir(directory)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise HookInstallError(f"cannot install the hook into {directory}: {e.strerror or e}") from None
    log.info("installed %s (socket %s, spool %s)", target, socket_path, spool)
    return target


def uninstall(directory: str = DEFAULT_DIR) -> bool:
    """Remove ``DIRECTORY/virtsync`` if it is ours.

    :raise HookInstallError: the file there is not ours, or cannot be removed
    :return: True if removed, False if there was nothing to remove
    """
    target = Path(directory) / HOOK_NAME
    if not os.path.lexists(target):
        return False
    _refuse_foreign(target)
    try:
        os.unlink(target)
        _fsync_dir(directory)
    except OSError as e:
        raise HookInstallError(f"cannot remove {target}: {e.strerror or e}") from None
    log.info("removed %s", target)
    return True


# ----------------------------------------------------------------------------- spool

@contextlib.contextmanager
def _locked(path: str) -> Iterator[int | None]:
    """The spool's fd under ``flock(LOCK_EX)``, as the hook takes it; None if there is no spool."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        yield None
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield fd
    finally:
        os.close(fd)


def _read_all(fd: int) -> bytes:
    chunks = []
    offset = 0
    while chunk := os.pread(fd, 1 << 20, offset):
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)


def _take(path: str, replay: str) -> None:
    """Move the spool's lines to the end of ``replay`` and empty the spool, under its lock.

    The hook appends with O_APPEND under the same lock, so a hook waiting for it writes at
    offset 0 of the emptied file afterwards: nothing is lost or overwritten.
    """
    with _locked(path) as fd:
        if fd is None:
            return
        data = _read_all(fd)
        if not data:
            return
        out = os.open(replay, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            size = os.fstat(out).st_size
            if size and os.pread(out, 1, size - 1) != b"\n":
                data = b"\n" + data   # a torn line stays a line of its own
            os.write(out, data)
            os.fsync(out)
        finally:
            os.close(out)
        _fsync_dir(os.path.dirname(os.path.abspath(replay)))
        os.ftruncate(fd, 0)
        os.fsync(fd)


def _entry(line: bytes) -> dict[str, Any] | None:
    try:
        value = json.loads(line)
    except (ValueError, RecursionError):
        return None
    if not isinstance(value, dict) or not isinstance(value.get("domain"), str) or not isinstance(value.get("op"), str):
        return None
    return value


def read_spool(path: str) -> list[dict[str, Any]]:
    """The events the hook spooled, oldest first; malformed lines are skipped with a warning.

    Takes the spool for replay: its lines move to ``PATH.replay`` (appended, so a replay
    that never reached :func:`clear_spool` is read again) and the spool is emptied under
    the hook's lock, so events spooled during the replay stay for the next call. A last
    line without its newline (a hook killed mid-write) is skipped unless it is a complete
    object. Events can repeat (a replay cut short, or an agent that answered too late):
    replaying must be idempotent.

    :raise OSError: the spool or the replay file cannot be read or written
    """
    replay = path + REPLAY_SUFFIX
    _take(path, replay)
    try:
        with open(replay, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return []
    lines = data.split(b"\n")
    entries: list[dict[str, Any]] = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        entry = _entry(line)
        if entry is None:
            what = "torn last line" if number == len(lines) else "malformed line"
            log.warning("%s: skipping %s %d: %.80r", replay, what, number, line)
            continue
        entries.append(entry)
    return entries


def clear_spool(path: str) -> None:
    """Drop what :func:`read_spool` took (``PATH.replay``), atomically; new spool lines stay."""
    replay = path + REPLAY_SUFFIX
    try:
        os.unlink(replay)
    except FileNotFoundError:
        return
    _fsync_dir(os.path.dirname(os.path.abspath(replay)))


def keep_unreplayed(path: str, remaining: list[dict[str, Any]]) -> None:
    """After one entry of a replay ran: the replay file holds only ``remaining`` (the
    entries not yet replayed, in order), replaced atomically; none left: it is dropped.
    New spool lines are not touched (they wait in the spool itself)."""
    if not remaining:
        clear_spool(path)
        return
    replay = path + REPLAY_SUFFIX
    tmp = replay + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(b"".join(json.dumps(e, sort_keys=True).encode() + b"\n" for e in remaining))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, replay)
    _fsync_dir(os.path.dirname(os.path.abspath(replay)))

"""Processes the lab starts, and the guarantee that they end.

Every process is ended by its own pid (never by name), on teardown and, as a
safety net, at interpreter exit.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Sequence

_started: dict[int, subprocess.Popen[bytes]] = {}


def spawn(argv: Sequence[str], *, log_path: str | None = None, **kwargs: object) -> subprocess.Popen[bytes]:
    """Start ``argv`` in its own session, output to ``log_path`` (or nowhere)."""
    out = open(log_path, "ab") if log_path else subprocess.DEVNULL  # noqa: SIM115
    proc = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                            start_new_session=True, **kwargs)  # type: ignore[call-overload]
    _started[proc.pid] = proc
    return proc


def end(proc: subprocess.Popen[bytes], *, timeout: float = 5.0, sig: int = signal.SIGTERM) -> None:
    """End a process we started: ``sig``, then SIGKILL after ``timeout``."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout)
    _started.pop(proc.pid, None)


@atexit.register
def _end_all() -> None:
    for proc in list(_started.values()):
        end(proc, timeout=2.0)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_for_path(path: str, timeout: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode} before {path} appeared")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear within {timeout}s")
        time.sleep(0.02)


def run(argv: Sequence[str], **kwargs: object) -> str:
    """Run a short command; raise with its stderr when it fails."""
    res = subprocess.run(list(argv), capture_output=True, text=True, timeout=120, **kwargs)  # type: ignore[call-overload]
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({res.returncode}): {res.stderr.strip()[:500]}")
    return str(res.stdout)

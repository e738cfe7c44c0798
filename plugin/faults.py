"""Named fault points for tests: the agent kills itself (SIGKILL, no cleanup)
at the point named by ``VIRTSYNC_FAULT``, so tests can prove that every
durable step can be interrupted anywhere and repaired on restart; or, at a
``fault_raise`` point, raises an unexpected exception (``VIRTSYNC_FAULT_TIMES``
times, default once), so tests can prove that nothing dies silently."""

from __future__ import annotations

import os
import signal


class InjectedFaultError(RuntimeError):
    """Deliberately not a PluginError: the kind of exception nobody expected."""


_raised: dict[str, int] = {}


def fault_raise(name: str) -> None:
    if os.environ.get("VIRTSYNC_FAULT") == name:
        times = int(os.environ.get("VIRTSYNC_FAULT_TIMES", "1"))
        if _raised.get(name, 0) < times:
            _raised[name] = _raised.get(name, 0) + 1
            raise InjectedFaultError(f"injected fault at {name}")


def fault_point(name: str) -> None:
    if os.environ.get("VIRTSYNC_FAULT") == name:
        os.kill(os.getpid(), signal.SIGKILL)

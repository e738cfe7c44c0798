"""Named crash points for tests: the agent kills itself (SIGKILL, no cleanup)
at the point named by ``VIRTSYNC_FAULT``, so tests can prove that every
durable step can be interrupted anywhere and repaired on restart."""

from __future__ import annotations

import os
import signal


def fault_point(name: str) -> None:
    if os.environ.get("VIRTSYNC_FAULT") == name:
        os.kill(os.getpid(), signal.SIGKILL)

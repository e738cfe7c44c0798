"""The names of the agent's local operations (the IPC ``op``): one list that the CLI and the
agent's router both import, so ``virtsync --help`` and the router cannot disagree
(tests/unit/test_cli_ops.py checks both sides).

A new operation is a new name here, a handler registered under it on the agent side and, if
a user runs it, a command in :data:`plugin.cli.app.COMMANDS` with ``op`` set to it.
"""

from __future__ import annotations

from typing import Final

__all__ = ["ALL", "APPLY", "FROM_HOOK", "HOLD", "HOOK", "MARK", "MARKERS", "PAIRS", "PROTECT", "RELEASE",
           "RESTORE", "RESUME", "STATUS", "SUSPEND", "TRACKER", "UNPROTECT", "VERIFY"]

STATUS: Final = "status"
PROTECT: Final = "protect"
UNPROTECT: Final = "unprotect"
PAIRS: Final = "pairs"
SUSPEND: Final = "suspend"
RESUME: Final = "resume"
MARK: Final = "mark"
MARKERS: Final = "markers"
APPLY: Final = "apply"
HOLD: Final = "hold"
RELEASE: Final = "release"
RESTORE: Final = "restore"
VERIFY: Final = "verify"
TRACKER: Final = "tracker"
#: Sent by the libvirt hook (``hooks/qemu``), never by the CLI: the hook imports nothing of
#: ours, so it spells the name itself (a test checks it is this one).
HOOK: Final = "hook"

#: Operations only something other than the CLI sends.
FROM_HOOK: Final = frozenset({HOOK})

#: Every operation the agent answers on its local socket.
ALL: Final = frozenset({STATUS, PROTECT, UNPROTECT, PAIRS, SUSPEND, RESUME, MARK, MARKERS, APPLY, HOLD,
                        RELEASE, RESTORE, VERIFY, TRACKER, HOOK})

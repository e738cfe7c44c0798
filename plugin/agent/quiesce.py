"""The guest's filesystems frozen around one cut (``virtsync mark --quiesce``)."""

from __future__ import annotations

import logging
import time
from typing import Any

from ..errors import PluginError
from ..virt import domains

log = logging.getLogger("virtsync.daemon")


class Quiesce:
    """The freeze around one cut: ``before_cut``/``after_cut`` of :meth:`DomainReplicator.cycle`.

    Without an answering guest agent ``before_cut`` refuses the cut, unless
    crash-consistent is acceptable: then the cut goes on and ``quiesced`` stays False.
    """

    def __init__(self, dom: Any, name: str, crash_consistent_ok: bool) -> None:
        self.dom = dom
        self.name = name
        self.crash_consistent_ok = crash_consistent_ok
        self.quiesced = False
        self.fallback: str | None = None   # why the marker is only crash-consistent
        self.frozen_ms: float | None = None  # from the freeze request to the thaw's answer
        self.thaw_error: str | None = None  # the guest may still be frozen: said loudly
        self._thaw = False
        self._t0 = 0.0

    async def before_cut(self) -> None:
        self._t0 = time.monotonic()
        try:
            await domains.fs_freeze(self.dom)
        except domains.GuestAgentError as e:
            self._thaw = e.reached_guest   # it may have frozen before the answer was lost
            reason = f"{self.name}: no guest agent answered ({_agent_reason(e)})"
            if not self.crash_consistent_ok:
                raise domains.GuestAgentError(
                    f"{reason}: marker not taken; use --crash-consistent-ok to take a crash-consistent "
                    "marker instead", e.code, reached_guest=e.reached_guest) from e
            self.fallback = str(e)
            log.getChild(self.name).warning("%s: taking a crash-consistent marker (--crash-consistent-ok)", reason)
            return
        except PluginError as e:
            self._thaw = True
            if not self.crash_consistent_ok:
                raise PluginError(f"{self.name}: the guest agent could not freeze the filesystems "
                                  f"({_agent_reason(e)}): marker not taken; use --crash-consistent-ok to take a "
                                  "crash-consistent marker instead") from e
            self.fallback = str(e)
            log.getChild(self.name).warning("%s: freeze failed (%s): taking a crash-consistent marker", self.name, e)
            return
        self._thaw = True
        self.quiesced = True

    async def after_cut(self) -> None:
        if not self._thaw:
            return
        try:
            await domains.fs_thaw(self.dom)
            if self.quiesced:
                self.frozen_ms = round((time.monotonic() - self._t0) * 1000, 1)
        except PluginError as e:
            if self.quiesced:
                self.thaw_error = str(e)
                log.getChild(self.name).error("THAW FAILED, the guest's filesystems may stay frozen: %s", e)
            else:
                log.getChild(self.name).info("thaw after a failed freeze: %s", e)


def _agent_reason(e: PluginError) -> str:
    """libvirt's words, without our ``domain X: freeze:`` prefix."""
    text = str(e)
    for prefix in ("freeze: ", "thaw: "):
        if prefix in text:
            text = text.split(prefix, 1)[1]
    return text

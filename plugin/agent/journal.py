"""Journal and markers, the secondary's side: the replicas kept here (markers, apply,
hold, release, restore, verify) and the timers of delayed apply and scrub."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from .. import ops, paths
from ..errors import PluginError, StateConflictError
from ..requests import arg
from .group import PRIMARY
from .parts import Parts

log = logging.getLogger("virtsync.daemon")


class Journal:
    def __init__(self, parts: Parts) -> None:
        self.parts = parts
        self._tasks: list[asyncio.Task[None]] = []

    def operations(self) -> dict[str, Any]:
        return {ops.MARKERS: self.op_markers, ops.APPLY: self.op_apply, ops.HOLD: self.op_hold,
                ops.RELEASE: self.op_release, ops.RESTORE: self.op_restore, ops.VERIFY: self.op_verify}

    def start(self) -> None:
        if self.parts.cfg.apply_delay > 0:
            self._tasks.append(asyncio.create_task(self._apply_delayed_loop(), name="vs-apply-delay"))
        if self.parts.cfg.scrub_interval > 0:
            self._tasks.append(asyncio.create_task(self.parts.sec().run_scrubs(), name="vs-scrub"))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def op_markers(self, args: dict[str, Any]) -> Any:
        """Markers of a domain: read locally on the secondary, from the peer on the primary."""
        name = arg(args, "domain", str)
        try:
            uuid = self.parts.sec().find(name, arg(args, "from", str, None))
        except StateConflictError:
            if args.get("from") is not None:
                raise
            p = self.parts.find(name)
            prot = self.parts.db().protection(p.uuid, PRIMARY)
            assert prot is not None
            return await self.parts.peers[prot["peer"]].call("info", {"uuid": p.uuid})
        return await self.parts.sec().info_async(uuid)

    def _replica(self, args: dict[str, Any]) -> str:
        """The replica a local command names: ``domain`` (name or uuid), ``from`` (its peer) if ambiguous."""
        name = arg(args, "domain", str)
        try:
            return self.parts.sec().find(name, arg(args, "from", str, None))
        except StateConflictError:
            if any(p.name == name for p in self.parts.protected.values()):
                prot = self.parts.db().protection(self.parts.find(name).uuid, PRIMARY)
                raise StateConflictError(f"{name} is the primary here: run this on the secondary "
                                         f"({prot['peer'] if prot else '?'})", state="primary",
                                         required="secondary") from None
            raise

    async def op_apply(self, args: dict[str, Any]) -> Any:
        until = arg(args, "until", int, None)
        return await self.parts.sec().apply(self._replica(args), until)

    async def op_hold(self, args: dict[str, Any]) -> Any:
        return await self.parts.sec().set_held(self._replica(args), True)

    async def op_release(self, args: dict[str, Any]) -> Any:
        return await self.parts.sec().set_held(self._replica(args), False)

    async def op_restore(self, args: dict[str, Any]) -> Any:
        dest = arg(args, "to", str)
        paths.check_restore_target(dest)
        try:
            return await self.parts.sec().restore(self._replica(args), arg(args, "marker", int), dest)
        except OSError as e:
            raise PluginError(f"restore into {dest} failed: {e.strerror or e}") from e

    async def op_verify(self, args: dict[str, Any]) -> Any:
        return await self.parts.sec().verify(self._replica(args))

    async def _apply_delayed_loop(self) -> None:
        """Markers held back by ``[journal] apply_delay`` are applied when due, not
        only when the next cycle commits (after a disaster there is none)."""
        assert self.parts.secondary is not None
        while True:
            await asyncio.sleep(min(max(self.parts.cfg.apply_delay / 4, 0.5), 30.0))
            try:
                await self.parts.secondary.reflect_due()
            except PluginError as e:
                log.warning("applying delayed markers: %s", e)
            except Exception:  # noqa: BLE001 - the timer must outlive one bad round
                log.exception("applying delayed markers")

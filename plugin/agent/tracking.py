"""Tracking, hook and spool: the mapping tracker follows each protected domain's disk
list (libvirt events, hook calls, a timer) and adjusts its pairs; hook calls made
while the agent was down are replayed from the spool."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from dataclasses import replace
from typing import Any

from .. import faults, hook, ops, tracker
from ..domain import DiskSpec, PairState
from ..errors import PluginError
from ..replication.primary import resolve_nodes
from ..requests import arg
from ..tracker import ChangeKind, DiskEntry
from ..virt import domains
from ..virt.qmp_bridge import LibvirtQmpTransport
from .group import PRIMARY, Call
from .parts import Parts

log = logging.getLogger("virtsync.daemon")


class Tracking:
    def __init__(self, parts: Parts) -> None:
        self.parts = parts
        self._task: asyncio.Task[None] | None = None
        self._replaying = asyncio.Lock()

    def operations(self) -> dict[str, Any]:
        return {ops.TRACKER: self.op_tracker, ops.HOOK: self.op_hook}

    def start(self) -> None:
        self._task = asyncio.create_task(self._tracker_loop(), name="vs-tracker")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def current_disks(self, dom: Any, qmp: LibvirtQmpTransport, xml: str | None = None
                             ) -> tuple[list[DiskEntry], dict[str, DiskSpec], set[str]]:
        """All the domain's disks as the tracker sees them, the replicable
        ones as pairs need them, and the targets its metadata excludes
        (from ``xml``, the live XML when the caller has already read it)."""
        if xml is None:
            xml = await domains.live_xml(dom)
        disks = domains.parse_disks(xml)
        exclude = domains.parse_exclude(xml)
        entries = [DiskEntry(d.target, d.source, d.fmt, 0, d.device, d.disk_type, "", d.read_only, d.shareable)
                   for d in disks]
        chosen = [d for d, e in zip(disks, entries, strict=True) if tracker.exclusion(e, exclude) is None]
        found = await resolve_nodes(qmp, {d.target: d.alias for d in chosen}) if chosen else {}
        entries = [replace(e, size=found[e.target][1]) if e.target in found else e for e in entries]
        specs = {d.target: DiskSpec(d.target, d.source, d.fmt, found[d.target][1], found[d.target][0], d.alias)
                 for d in chosen}
        return entries, specs, exclude

    def request(self, uuid: str, reason: str) -> None:
        """Ask the group to look at its disks again: a call in its inbox, after what is
        there (a cycle running or asked for); one waiting look is enough."""
        p = self.parts.protected.get(uuid)
        if p is None or p.inbox.pending("track"):
            return
        done: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        done.add_done_callback(lambda f: f.cancelled() or f.exception())  # the outcome is logged
        p.inbox.put(Call("track", functools.partial(self._track_logged, uuid, reason), done))

    async def _track_logged(self, uuid: str, reason: str) -> list[dict[str, Any]]:
        try:
            return await self.track(uuid, reason)
        except PluginError as e:
            log.warning("tracker: %s: %s", uuid, e)
        except Exception:  # noqa: BLE001 - one domain's failure must not stop tracking
            log.exception("tracker: %s", uuid)
        return []

    async def track(self, uuid: str, reason: str) -> list[dict[str, Any]]:
        """Compare the domain's disk list with the last one and adjust its pairs.
        Run by the group's task only (an inbox call, or its own start)."""
        p = self.parts.protected.get(uuid)
        store = self.parts.db()
        if p is None or self.parts.conn is None:
            return []
        dom = await domains.lookup_uuid(self.parts.conn, uuid)
        if not await domains.is_running(dom):
            return []
        entries, specs, exclude = await self.current_disks(dom, p.qmp)
        stored = store.disk_list(uuid) or {"disks": [], "exclude": []}
        old = [DiskEntry.from_json(d) for d in stored["disks"]]
        changes = tracker.diff(old, entries, exclude, stored["exclude"])
        if not changes:
            return []
        prot = store.protection(uuid, PRIMARY)
        assert prot is not None
        client = self.parts.peers[prot["peer"]]
        done = []
        fresh = [specs[c.target] for c in changes if c.kind in (ChangeKind.ADDED, ChangeKind.RETARGETED)]
        if fresh:
            await client.call("prepare", {
                "uuid": uuid, "domain": p.name, "primary": self.parts.cfg.name,
                "disks": [{"target": d.target, "size": d.size} for d in fresh],
                "protection": {"segment": prot["segment"], "rpo": prot["rpo"], "mode": prot["mode"]}})
        for change in changes:
            if change.kind is ChangeKind.ADDED:
                spec = specs[change.target]
                store.upsert_pair(uuid, PRIMARY, p.name, spec.target, prot["peer"], spec.size,
                                  PairState.INITIAL_COPY)
                action = "new pair: full copy of this disk, in the group's cuts from the next marker"
            elif change.kind is ChangeKind.REMOVED:
                await client.call("retire", {"uuid": uuid, "target": change.target})
                store.set_pair_state(uuid, PRIMARY, PairState.DELETED, f"retired: {change.detail}",
                                     target=change.target)
                gone = [d for d in p.replicator.disks if d.target == change.target]
                with contextlib.suppress(Exception):
                    await p.replicator.drop_bitmaps(gone)  # the disk may still be attached (excluded)
                action = "pair retired; its journal data stays per retention"
            elif change.kind is ChangeKind.RETARGETED:
                spec = specs[change.target]
                await p.replicator.drop_bitmaps([spec])  # never trust bits from another source
                store.upsert_pair(uuid, PRIMARY, p.name, spec.target, prot["peer"], spec.size,
                                  PairState.INITIAL_COPY)
                action = "pair re-created: full copy of the new source at the next marker"
            else:
                spec = specs[change.target]
                store.upsert_pair(uuid, PRIMARY, p.name, spec.target, prot["peer"], spec.size,
                                  PairState.ACTIVE)
                action = "replica grows with the next marker"
            store.log_change(uuid, p.name, reason, change.kind.value, change.target, change.detail, action)
            log.getChild(p.name).info("tracker (%s): %s %s: %s -> %s", reason, change.kind.value,
                                      change.target, change.detail, action)
            done.append({"kind": change.kind.value, "target": change.target, "detail": change.detail,
                         "action": action})
        p.replicator.disks = [specs[t] for t in sorted(specs)]
        store.save_disk_list(uuid, {"disks": [e.to_json() for e in entries], "exclude": sorted(exclude)}, reason)
        p.wake.set()  # let the changed disk set take part in a cut soon
        return done

    async def _tracker_loop(self) -> None:
        """Events and hook calls queue (uuid, reason); a timer re-reads all
        protected domains as a safety net against missed events. Each look runs
        in its group's inbox, never beside a cycle."""
        while True:
            try:
                async with asyncio.timeout(self.parts.cfg.tracker_interval):
                    uuid, reason = await self.parts.events.get()
                batch = {uuid: reason}
                await asyncio.sleep(0.2)  # devices come and go in bursts
                while not self.parts.events.empty():
                    u, r = self.parts.events.get_nowait()
                    batch.setdefault(u, r)
            except TimeoutError:
                batch = {u: "timer" for u in self.parts.protected}
                # The hook also spools when the agent was merely slow to answer.
                with contextlib.suppress(OSError):
                    await self.replay_spool()
            for uuid, reason in batch.items():
                self.request(uuid, reason)

    async def op_hook(self, args: dict[str, Any]) -> Any:
        """A libvirt hook call (live or replayed from the spool): recorded;
        for a protected domain the tracker looks again."""
        name = arg(args, "domain", str)
        event = " ".join(str(args.get(k) or "-") for k in ("op", "sub_op"))
        self.parts.db().audit("hook", None, domain=name, call=event, extra=str(args.get("extra") or "")[:200],
                            replayed=bool(args.get("replayed", False)))
        for p in self.parts.protected.values():
            if p.name == name:
                if not args.get("replayed") and args.get("op") == "prepare":
                    # A start wins over the ship of the last writes: the images are closed
                    # before the hook answers and libvirt lets QEMU open them.
                    if await self.parts.offline.abort(p.uuid):
                        log.getChild(p.name).info("start: the ship at stop was aborted (the bits stay)")
                elif not args.get("replayed") and args.get("op") == "release":
                    self.parts.offline.starting(p.uuid, False)
                self.parts.events.put_nowait((p.uuid, f"hook {event}"))
        return None

    async def replay_spool(self) -> None:
        """Hook calls made while the agent was down, in their order, one after the other
        (a protected domain's look at its disks goes into its group's inbox). Each leaves
        the spool only after it ran: an agent killed mid-replay replays the rest at its
        next start (and perhaps the one it was on again: replaying is idempotent).

        :raise OSError: the spool cannot be read or written
        """
        async with self._replaying:   # the start and the tracker's timer: one replay at a time
            path = hook.spool_path(self.parts.cfg.state_dir)
            entries = hook.read_spool(path)
            for done, entry in enumerate(entries, 1):
                try:
                    await self.op_hook({**entry, "replayed": True})
                except PluginError as e:
                    log.warning("hook spool: skipped %s: %s", entry, e)
                faults.fault_point("hook-replay-entry")
                hook.keep_unreplayed(path, entries[done:])
            if entries:
                log.info("replayed %d hook call(s) spooled while the agent was down", len(entries))

    async def op_tracker(self, args: dict[str, Any]) -> Any:
        return {"changes": self.parts.db().tracker_log(arg(args, "domain", str, None))}

"""Protection and pairs: protect, unprotect, suspend, resume, mark and the pairs' view;
the groups' supervisors run in plugin/agent/supervisor.py."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from .. import ops, tracker
from ..domain import DiskSpec, PairEvent, PairState, Protection, label_problem, next_state
from ..errors import PluginError, StateConflictError
from ..requests import UsageError, arg
from ..virt import domains
from ..virt.qmp_bridge import LibvirtQmpTransport
from .group import PRIMARY, MarkRequest, Protected
from .parts import Parts
from .supervisor import Supervision
from .tracking import Tracking

log = logging.getLogger("virtsync.daemon")


class ProtectionService:
    def __init__(self, parts: Parts, supervision: Supervision, tracking: Tracking) -> None:
        self.parts = parts
        self.supervision = supervision
        self.tracking = tracking
        # Domains whose protect is in progress: uuid -> peer.
        self._protecting: dict[str, str] = {}

    def operations(self) -> dict[str, Any]:
        return {ops.PROTECT: self.op_protect, ops.UNPROTECT: self.op_unprotect, ops.PAIRS: self.op_pairs,
                ops.SUSPEND: self.op_suspend, ops.RESUME: self.op_resume, ops.MARK: self.op_mark}

    async def start(self) -> None:
        """Resume the supervision of every domain protected here."""
        store = self.parts.db()
        for prot in store.protections(PRIMARY):
            try:
                await self.supervision.supervise(prot["domain_uuid"])
            except PluginError as e:
                log.error("cannot resume protection of %s: %s", prot["domain"], e)
                store.transition(prot["domain_uuid"], PRIMARY, PairEvent.CYCLE_FAILED, str(e))

    async def stop(self) -> None:
        # No local keeps a Protected: their libvirt domains hold the connection open (close_connection).
        for uuid in list(self.parts.protected):
            await self.supervision.stop_supervisor(self.parts.protected[uuid])
            await self.parts.protected.pop(uuid).qmp.close()

    async def op_protect(self, args: dict[str, Any]) -> Any:
        name = arg(args, "domain", str)
        peer_name = arg(args, "to", str)
        try:
            prot = Protection(peer=peer_name, segment=arg(args, "segment", str, "default"),
                              rpo=arg(args, "rpo", int, 300), mode=arg(args, "mode", str, "async"))
        except ValueError as e:
            raise UsageError(str(e)) from None
        if prot.mode != "async":
            raise UsageError("mode sync is not available yet: use --mode async")
        client = self.parts.peers.get(peer_name)
        if client is None:
            self.parts.cfg.peer(peer_name)  # raises the ConfigError naming the known peers
        assert client is not None
        dom = await domains.lookup(self.parts.libvirt(), name)
        uuid = dom.UUIDString()
        store = self.parts.db()
        # Check and reserve with no await in between: a second protect of the same domain
        # is refused here, instead of failing half-way and then undoing the first one's
        # rows and replica in its cleanup.
        protecting = self._protecting
        existing = store.protection(uuid, PRIMARY)
        if existing is not None or uuid in protecting:
            to = existing["peer"] if existing is not None else f"{protecting[uuid]}, in progress"
            raise StateConflictError(f"domain {name!r} is already protected (to {to})",
                                     state="protected", required="unprotected")
        protecting[uuid] = peer_name
        try:
            if not await domains.is_running(dom):
                raise StateConflictError(f"domain {name!r} is not running: start it, then protect it",
                                         state="shut off", required="running")
            disks = await self._disk_specs(dom)
            await client.call("health", {}, timeout=5)
            await client.call("prepare", {
                "uuid": uuid, "domain": name, "primary": self.parts.cfg.name,
                "disks": [{"target": d.target, "size": d.size} for d in disks],
                "protection": {"segment": prot.segment, "rpo": prot.rpo, "mode": prot.mode}})
            added = tagged = False
            try:
                store.add_protection(uuid, PRIMARY, name, prot)
                added = True
                for d in disks:
                    store.upsert_pair(uuid, PRIMARY, name, d.target, peer_name, d.size, PairState.INITIAL_COPY)
                tagged = True  # set_protection may fail after libvirt changed one of the two XMLs
                await domains.set_protection(dom, prot)
                await self.supervision.supervise(uuid)
            except BaseException:
                # Undo only what this call created, everywhere it created it.
                if tagged:
                    with contextlib.suppress(Exception):
                        await domains.set_protection(dom, None)
                with contextlib.suppress(Exception):
                    await client.call("remove", {"uuid": uuid, "keep_replica": False}, timeout=5)
                if added:
                    store.remove_protection(uuid, PRIMARY)
                raise
        finally:
            del protecting[uuid]
        if arg(args, "wait", bool, False):
            return self._wait_first_marker(self.parts.protected[uuid])
        return {"domain": name, "uuid": uuid, "pairs": self.pairs_json(uuid)}

    async def _wait_first_marker(self, p: Protected) -> AsyncIterator[dict[str, Any]]:
        while not p.first_marker.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.5):
                    await p.first_marker.wait()
            for target, (done, total) in p.replicator.progress.items():
                yield {"target": target, "bytes_done": done, "bytes_total": total, "rate_bps": None}
            if p.task is None or p.task.done():
                raise PluginError(f"protection of {p.name} stopped before its first marker")
        yield {"domain": p.name, "uuid": p.uuid, "pairs": self.pairs_json(p.uuid)}

    async def _disk_specs(self, dom: Any) -> list[DiskSpec]:
        """The disks to replicate at protect time: the tracker's choice, except that
        a writable disk it cannot replicate is refused here rather than skipped, so
        nobody believes a VM protected while one of its disks is not."""
        name = dom.name()
        # Commands only: no event registration, which libvirt allows once per domain and
        # connection ("event callback already tracked") and the supervisor's transport may hold.
        entries, specs, exclude = await self.tracking.current_disks(dom, LibvirtQmpTransport(dom))
        for entry in entries:
            why = tracker.exclusion(entry, exclude)
            if why and entry.device == "disk" and not entry.read_only and entry.target not in exclude:
                raise UsageError(f"{name}: disk {entry.target} cannot be replicated: {why}")
        if not specs:
            raise UsageError(f"{name}: no writable disk to replicate")
        return [specs[t] for t in sorted(specs)]

    async def op_unprotect(self, args: dict[str, Any]) -> Any:
        p = self.parts.find(arg(args, "domain", str))
        keep = arg(args, "keep_replica", bool, False)
        store = self.parts.db()
        prot = store.protection(p.uuid, PRIMARY)
        await self.supervision.stop_supervisor(p)
        state = await self.parts.domain_state(p)
        if state is None or state[0]:
            if not p.attached:
                await self.supervision.attach(p)  # the QEMU that runs now, through the current connection
            await p.replicator.remove_all()
        else:
            # Nothing to remove in a QEMU that is gone; its persistent bitmaps stay in the
            # images, where a later protect's full copy drops them first.
            log.getChild(p.name).info("unprotect while %s: the images keep virtsync's bitmaps", state[1])
        await p.qmp.close()
        if prot is not None and prot["peer"] in self.parts.peers:
            await self.parts.peers[prot["peer"]].call("remove", {"uuid": p.uuid, "keep_replica": keep})
        with contextlib.suppress(PluginError):
            await domains.set_protection(await domains.lookup_uuid(self.parts.libvirt(), p.uuid), None)
        store.remove_protection(p.uuid, PRIMARY)
        del self.parts.protected[p.uuid]
        return {"domain": p.name, "replica_kept": keep}

    async def op_suspend(self, args: dict[str, Any]) -> Any:
        p = self.parts.find(arg(args, "domain", str))
        self.parts.db().set_protection(p.uuid, PRIMARY, suspended=1)
        # A cycle already cut finishes (its marker is consistent); none starts after.
        async with asyncio.timeout(self.parts.cfg.cycle_timeout):
            while p.replicator.in_flight is not None:
                await asyncio.sleep(0.05)
        state = self.parts.db().transition(p.uuid, PRIMARY, PairEvent.SUSPEND)
        return {"domain": p.name, "state": (state or PairState.SUSPENDED).value}

    async def op_resume(self, args: dict[str, Any]) -> Any:
        p = self.parts.find(arg(args, "domain", str))
        self.parts.db().set_protection(p.uuid, PRIMARY, suspended=0)
        state = self.parts.db().transition(p.uuid, PRIMARY, PairEvent.RESUME)
        p.wake.set()
        return {"domain": p.name, "state": (state or PairState.ACTIVE).value}

    async def op_mark(self, args: dict[str, Any]) -> Any:
        label = arg(args, "label", str, "")
        if problem := label_problem(label):   # the secondary's rule, checked before any cycle is cut
            raise UsageError(f"label {label[:40]!r}: {problem}")
        p = self.parts.find(arg(args, "domain", str))
        quiesce = arg(args, "quiesce", bool, False)
        crash_ok = arg(args, "crash_consistent_ok", bool, False)
        if crash_ok and not quiesce:
            raise UsageError("--crash-consistent-ok only goes with --quiesce")
        req = MarkRequest(label, not arg(args, "no_apply", bool, False),
                          asyncio.get_running_loop().create_future(), quiesce=quiesce, crash_consistent_ok=crash_ok)
        if p.task is None or p.task.done():
            raise StateConflictError(f"replication of {p.name} is not running", state="stopped", required="running")
        if not p.attached:
            state = await self.parts.domain_state(p)
            if state is not None and not state[0]:
                raise self.parts.not_running_error(p, state[1])
        p.inbox.put(req)
        if not arg(args, "wait", bool, True):
            # Nobody waits: its outcome shows in pairs and markers, not as a stray error.
            req.done.add_done_callback(lambda f: f.cancelled() or f.exception())
            return {"domain": p.name, "queued": True}
        async with asyncio.timeout(self.parts.cfg.cycle_timeout):
            return await req.done

    def pairs_json(self, uuid: str | None = None, down: dict[str, str] | None = None) -> list[dict[str, Any]]:
        """The pairs as they are now: the stored state, unless the domain is known
        not to run (``down``: uuid -> libvirt's reason) or the newest marker is older
        than the RPO, which the supervisor may not have recorded yet (a long cycle)."""
        out = []
        now = time.time()
        store = self.parts.db()
        for pair in store.pairs(PRIMARY, uuid):
            p = self.parts.protected.get(pair.domain_uuid)
            last = p.replicator.last if p else None
            cut = last.cut_time if last and last.cut_time else self.parts.last_cut(pair.domain_uuid)
            state, reason = pair.state, pair.reason
            if down and pair.domain_uuid in down and next_state(state, PairEvent.STOPPED) is not state:
                state = next_state(state, PairEvent.STOPPED)
                reason = f"domain not running ({down[pair.domain_uuid]}): the agent is handling the stop"
            prot = store.protection(pair.domain_uuid, PRIMARY)
            if cut and prot and now - cut > prot["rpo"] and next_state(state, PairEvent.LAG_OVER_RPO) is not state:
                state = next_state(state, PairEvent.LAG_OVER_RPO)
                reason = f"newest marker {now - cut:.0f}s old, over the RPO of {prot['rpo']}s"
            out.append({
                "domain": pair.domain, "target": pair.target, "peer": pair.peer, "state": state.value,
                "reason": reason, "lag_seconds": round(now - cut, 3) if cut else None,
                "bytes_behind": 0, "last_marker": pair.last_marker,
                "throughput_bps": last.rate if last else None,
                "bytes_done": pair.bytes_done, "bytes_total": pair.bytes_total,
            })
        return out

    async def down(self) -> dict[str, str]:
        """Protected domains whose QEMU the supervisor believes attached but that
        do not run (the stop event is not handled yet): uuid -> libvirt's reason."""
        down = {}
        for p in list(self.parts.protected.values()):
            with contextlib.suppress(PluginError):
                state = await self.parts.domain_state(p)
                if state is not None and not state[0]:
                    down[p.uuid] = state[1]
                    p.wake.set()
        return down

    async def op_pairs(self, args: dict[str, Any]) -> Any:
        name = arg(args, "domain", str, None)
        uuid = self.parts.find(name).uuid if name else None
        pairs = self.pairs_json(uuid, await self.down())
        for entry in pairs:
            p = next((x for x in self.parts.protected.values() if x.name == entry["domain"]), None)
            if p is not None and p.replicator.in_flight is None:
                with contextlib.suppress(Exception):
                    entry["bytes_behind"] = await p.replicator.dirty_bytes_of(entry["target"])
        return {"pairs": pairs}

"""Supervision of protected groups: one task per domain follows its QEMU (start, stop,
libvirtd reconnect) and runs its cycles every rpo/2, sooner on request, retrying with
backoff. Part of the protection service (plugin/agent/protection.py)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from qemu_blockdev import BlockdevError

from .. import faults, peer
from ..domain import DiskSpec, PairEvent, PairState
from ..errors import PluginError, StateConflictError
from ..replication import offline
from ..replication.primary import CutRefusedError, CycleError, DomainReplicator
from ..virt import domains
from ..virt.qmp_bridge import LibvirtQmpTransport
from .group import LIVE, MAX_BACKOFF, PRIMARY, Call, MarkRequest, Protected
from .parts import Parts
from .quiesce import Quiesce
from .tracking import Tracking

log = logging.getLogger("virtsync.daemon")


def _peer_unreachable(e: BaseException) -> bool:
    """Whether a cycle failed because the peer could not be reached (anywhere in the chain)."""
    seen: BaseException | None = e
    while seen is not None:
        if isinstance(seen, peer.PeerUnreachableError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


class Supervision:
    def __init__(self, parts: Parts, tracking: Tracking) -> None:
        self.parts = parts
        self.tracking = tracking

    async def supervise(self, uuid: str) -> None:
        """Make the domain's supervisor, in whatever state the domain is (shut off,
        paused, running): it attaches to the domain's QEMU when that runs."""
        store = self.parts.db()
        prot = store.protection(uuid, PRIMARY)
        assert prot is not None and self.parts.conn is not None
        dom = await domains.lookup_uuid(self.parts.conn, uuid)
        # The live XML of a running domain, the persistent one of a shut-off domain: the
        # disks' sources either way; node names come when QEMU runs (_domain_started).
        xml = await domains.live_xml(dom)
        sizes = {pair.target: pair.size for pair in store.pairs(PRIMARY, uuid)}
        disks = [DiskSpec(d.target, d.source, d.fmt, sizes[d.target], "", d.alias)
                 for d in domains.parse_disks(xml) if d.target in sizes]
        assert self.parts.qsd.qmp is not None, "the storage daemon starts first"
        qmp = LibvirtQmpTransport(dom)
        rep = DomainReplicator(store=store, peer=self.parts.peers[prot["peer"]], qmp=qmp, uuid=uuid, domain=prot["domain"],
                               disks=disks, scratch=self.parts.cfg.scratch, stage_owner=domains.qemu_owner(xml),
                               shipper=self.parts.qsd.qmp, cycle_timeout=self.parts.cfg.cycle_timeout,
                               stall_after=self.parts.cfg.stall_after, speed_limit=self.parts.cfg.speed_limit,
                               tls=self.parts.link_tls(prot["peer"]))
        p = Protected(uuid, prot["domain"], rep, qmp)
        if prot["committed_seq"]:
            p.first_marker.set()
        self.parts.protected[uuid] = p
        p.task = asyncio.create_task(self._supervisor(p), name=f"vs-domain-{p.name}")

    async def _domain_stopped(self, p: Protected, reason: str) -> None:
        """The domain's QEMU is gone (``reason``: libvirt's word: shutdown, destroyed,
        saved, crashed, failed, ...). Called once per stop (and once at agent start while
        the domain is off), run by the group's task (no cycle in flight); an exception is retried with
        backoff. States go through ``Store.transition``: STOPPED, or CRASHED for
        ``needs resync`` (which only COPY_STARTED, a re-copy, ends).

        The writes since the last marker are shipped from the images (a marker "at
        stop"), unless QEMU did not store its bitmaps: then the pairs need a resync.

        :raise CycleError: the ship failed (bits kept in the images); the supervisor retries
        """
        store = self.parts.db()
        stopped = f"domain not running ({reason})"
        store.transition(p.uuid, PRIMARY, PairEvent.STOPPED, stopped)
        if reason == "migrated":
            return  # it runs elsewhere now; its images are that QEMU's
        assert self.parts.qsd.qmp is not None
        result = await self.parts.offline.run(p.uuid, offline.ship_at_stop(p.replicator, self.parts.qsd.qmp))
        dlog = log.getChild(p.name)
        if result.outcome is offline.Outcome.CRASHED:
            store.transition(p.uuid, PRIMARY, PairEvent.CRASHED, f"{stopped}: {result.reason}")
        elif result.outcome in (offline.Outcome.SHIPPED, offline.Outcome.NOTHING):
            prot = store.protection(p.uuid, PRIMARY)
            store.transition(p.uuid, PRIMARY, PairEvent.STOPPED,
                             f"{stopped}; replica complete at marker {prot['committed_seq'] if prot else '?'}")
            dlog.info("at stop: %s", result.reason)
        else:
            dlog.info("at stop: nothing shipped: %s", result.reason)

    async def _domain_started(self, p: Protected) -> None:
        """The domain's QEMU runs (again, or for the first time since the agent
        started): before any cycle, run by the group's task. Attaches to this QEMU; a disk whose
        bitmap cannot be trusted (or whose pair needs a resync) loses its bitmaps, and
        its next cycle copies it in full."""
        self.parts.offline.starting(p.uuid, False)
        await self.attach(p)
        store = self.parts.db()
        resync = {pair.target for pair in store.pairs(PRIMARY, p.uuid) if pair.state is PairState.NEEDS_RESYNC}
        for target, why in (await offline.prepare_start(p.replicator, resync)).items():
            log.getChild(p.name).warning("%s: full copy: %s", target, why)
            store.transition(p.uuid, PRIMARY, PairEvent.COPY_STARTED, f"full copy: {why}", target=target)

    async def attach(self, p: Protected) -> None:
        """A new QMP transport on the current connection's domain object (the old one
        may belong to a QEMU or a libvirtd that is gone), and the disks' node names."""
        assert self.parts.conn is not None
        store = self.parts.db()
        dom = await domains.lookup_uuid(self.parts.conn, p.uuid)
        old, qmp = p.qmp, LibvirtQmpTransport(dom)
        await old.close()
        await qmp.connect()
        xml = await domains.live_xml(dom)
        entries, specs, exclude = await self.tracking.current_disks(dom, qmp, xml)
        # Cycles run with the disks that have pairs; any other disk (attached, or no
        # longer excluded, since protect read the list) is the tracker's to add: it
        # prepares the replica first.
        paired = {pair.target for pair in store.pairs(PRIMARY, p.uuid)}
        if store.disk_list(p.uuid) is None:
            store.save_disk_list(p.uuid, {"disks": [e.to_json() for e in entries if e.target in paired],
                                          "exclude": sorted(exclude)}, "protect")
        p.qmp = qmp
        p.replicator.qmp = qmp
        p.replicator.disks = [specs[t] for t in sorted(specs) if t in paired]
        p.replicator.stage_owner = domains.qemu_owner(xml)
        p.replicator.reattached()

    async def _supervisor(self, p: Protected) -> None:
        """The domain's task: runs :meth:`_run_domain` and restarts it after an
        unexpected exception, with backoff, so no group dies silently. Each failure
        is logged (with its traceback when it is a new one) and shown as ``error``."""
        store = self.parts.db()
        dlog = log.getChild(p.name)
        backoff = 1.0
        last = ""
        while True:
            began = time.monotonic()
            try:
                await self._run_domain(p)
                return  # no longer protected
            except Exception as e:  # noqa: BLE001 - the point: nothing ends this task but unprotect
                what = f"{type(e).__name__}: {e}"
                if time.monotonic() - began > 10 * MAX_BACKOFF:
                    backoff = 1.0  # it ran well for a while: a new failure, not the same loop
                reason = f"internal error: {what}; supervisor restarts in {backoff:g}s"
                if what != last:
                    dlog.error("supervisor failed: %s", reason, exc_info=e)
                else:
                    dlog.warning("supervisor failed again: %s", reason)
                last = what
                p.attached = False
                self._fail_marks(p, CycleError(f"{p.name}: {what}"))
                with contextlib.suppress(Exception):
                    store.transition(p.uuid, PRIMARY, PairEvent.CYCLE_FAILED, reason)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF)

    def _fail_marks(self, p: Protected, error: Exception) -> None:
        p.inbox.fail_marks(error)

    async def _run_call(self, p: Protected, call: Call) -> None:
        """One call of the inbox, in its turn; its caller hears how it ended."""
        try:
            result = await call.run()
        except Exception as e:  # noqa: BLE001 - the caller is told; the group goes on
            if not call.done.done():
                call.done.set_exception(e)
        else:
            if not call.done.done():
                call.done.set_result(result)

    async def _follow_lifecycle(self, p: Protected) -> bool:
        """Bring the supervisor in line with the domain's QEMU; True when cycles can run."""
        store = self.parts.db()
        state = await self.parts.domain_state(p)
        if state is None:
            store.transition(p.uuid, PRIMARY, PairEvent.CYCLE_FAILED,
                             "libvirt connection lost: reconnecting")
            p.attached = False
            return False
        running, reason = state
        if not running:
            p.attached = False
            if p.running is not False:
                p.stop_handled = False
            p.running = False
            if not p.stop_handled:
                log.getChild(p.name).info("domain not running (%s)", reason)
                self._fail_marks(p, self.parts.not_running_error(p, reason))
                await self._domain_stopped(p, reason)
                p.stop_handled = True
            elif any(pair.state in LIVE for pair in store.pairs(PRIMARY, p.uuid)):
                # Handled, but since then resumed, or failed on a lost libvirt: still stopped.
                store.transition(p.uuid, PRIMARY, PairEvent.STOPPED, f"domain not running ({reason})")
            return False
        if not p.attached:
            why = "agent start" if p.running is None else "domain started" if p.running is False else "re-attached"
            await self._domain_started(p)
            p.attached = True
            p.running = True
            log.getChild(p.name).info("domain running: attached to its QEMU (%s)", why)
            store.transition(p.uuid, PRIMARY, PairEvent.STARTED)
            # Changes made while we were not looking (agent down, domain off, missed
            # events) are found before any cycle runs.
            await self.tracking.track(p.uuid, why)
        return True

    async def _run_domain(self, p: Protected) -> None:
        """The per-domain supervisor: follows the domain's QEMU, cycles every rpo/2
        while it runs, sooner on request; failures are recorded and retried with backoff."""
        store = self.parts.db()
        backoff = 1.0
        next_due = 0.0  # monotonic time of the next scheduled cycle
        dlog = log.getChild(p.name)
        while True:
            prot = store.protection(p.uuid, PRIMARY)
            if prot is None:
                # nobody will cut them now
                p.inbox.close(StateConflictError(f"{p.name} is no longer protected",
                                                 state="unprotected", required="protected"))
                return
            item = p.inbox.head()
            if isinstance(item, Call):
                # Work for the group runs in its turn, in any state of the domain.
                p.inbox.take()
                await self._run_call(p, item)
                continue
            if prot["suspended"] and not p.marks:
                p.wake.clear()
                await p.wake.wait()
                continue
            if not p.attached:
                p.wake.clear()
                try:
                    ready = await self._follow_lifecycle(p)
                except (PluginError, BlockdevError) as e:
                    # The domain moved under us (stopped while attaching), or libvirt failed: look again.
                    reason = f"{e}; retrying in {backoff:g}s"
                    dlog.info("%s", reason)
                    store.transition(p.uuid, PRIMARY, PairEvent.CYCLE_FAILED, reason)
                    self._fail_marks(p, CycleError(str(e)))
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, MAX_BACKOFF)
                    continue
                if not ready:
                    # Lifecycle events (and a new libvirt connection) wake us; the
                    # timeout is the safety net against a missed one.
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(min(self.parts.cfg.tracker_interval, MAX_BACKOFF)):
                            await p.wake.wait()
                    continue
                next_due = 0.0  # a fresh start: catch up at once
            delay = 0.0 if p.marks else next_due - time.monotonic()
            if delay > 0:
                self._check_lag(p, prot["rpo"])
                p.wake.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(min(delay, self._until_late(p, prot["rpo"]))):
                        await p.wake.wait()
                continue
            faults.fault_raise("supervisor-before-cycle")
            mark = p.inbox.take() if isinstance(p.inbox.head(), MarkRequest) else None
            assert mark is None or isinstance(mark, MarkRequest)
            quiesce = (Quiesce(p.qmp.domain, p.name, mark.crash_consistent_ok)
                       if mark is not None and mark.quiesce else None)
            # A cycle that outlasts the RPO makes the pairs late while it runs.
            until_late = self._until_late(p, prot["rpo"])
            late = (asyncio.get_running_loop().call_later(until_late, self._check_lag, p, prot["rpo"])
                    if until_late != float("inf") else None)
            try:
                stats = await p.replicator.cycle(label=mark.label if mark else "",
                                                 apply=mark.apply if mark else True,
                                                 before_cut=quiesce.before_cut if quiesce else None,
                                                 after_cut=quiesce.after_cut if quiesce else None)
            except CutRefusedError as e:
                # Nothing was cut and replication is fine: only this marker is refused.
                cause = e.__cause__ if isinstance(e.__cause__, PluginError) else e
                dlog.warning("marker refused: %s", cause)
                store.audit("mark", p.uuid, domain=p.name, label=mark.label if mark else "", quiesce=True,
                            refused=str(cause))
                if mark is not None and not mark.done.done():
                    mark.done.set_exception(cause)
                continue
            except (CycleError, PluginError, BlockdevError) as e:
                state = None
                with contextlib.suppress(PluginError):
                    state = await self.parts.domain_state(p)
                if state is None or not state[0]:
                    # QEMU (or libvirtd) went away mid-cycle: a stop, not a failure of ours.
                    dlog.info("cycle ended by the domain's stop or libvirt: %s", e)
                    p.attached = False
                    if mark is not None and not mark.done.done():
                        mark.done.set_exception(self.parts.not_running_error(p, state[1]) if state
                                                else CycleError(f"{e}; libvirt connection lost"))
                    continue
                if _peer_unreachable(e):
                    p.unreachable_since = p.unreachable_since or time.time()
                    since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(p.unreachable_since))
                    reason = f"peer {prot['peer']} unreachable since {since}: {e}; retrying in {backoff:g}s"
                    event = PairEvent.PEER_UNREACHABLE
                else:
                    reason = f"{e}; retrying in {backoff:g}s"
                    event = PairEvent.CYCLE_FAILED
                dlog.info("%s", reason)  # the state machine warns once, on entry into the bad state
                store.transition(p.uuid, PRIMARY, event, reason)
                if mark is not None and not mark.done.done():
                    mark.done.set_exception(CycleError(str(e)))
                next_due = time.monotonic() + backoff
                backoff = min(backoff * 2, MAX_BACKOFF)
                continue
            finally:
                if late is not None:
                    late.cancel()
            backoff = 1.0
            p.unreachable_since = None
            next_due = time.monotonic() + max(self.parts.cfg.min_cycle_interval, prot["rpo"] / 2)
            p.first_marker.set()
            if mark is not None:
                quiesced = quiesce is not None and quiesce.quiesced
                detail: dict[str, Any] = {"seq": stats.seq, "label": mark.label, "apply": mark.apply,
                                          "quiesce": mark.quiesce, "quiesced": quiesced}
                if quiesce is not None and quiesce.fallback:
                    detail["crash_consistent_because"] = quiesce.fallback
                if quiesce is not None and quiesce.frozen_ms is not None:
                    detail["frozen_ms"] = quiesce.frozen_ms
                if quiesce is not None and quiesce.thaw_error:
                    detail["thaw_error"] = quiesce.thaw_error
                store.audit("mark", p.uuid, domain=p.name, **detail)
                if not mark.done.done():
                    result = {"seq": stats.seq, "cut_time": stats.cut_time, "bytes": stats.bytes,
                              "kind": stats.kind, "label": mark.label, "quiesced": quiesced}
                    if quiesce is not None and quiesce.thaw_error:
                        result["thaw_error"] = quiesce.thaw_error
                    mark.done.set_result(result)

    def _lag(self, p: Protected) -> float | None:
        cut = p.replicator.last.cut_time or self.parts.last_cut(p.uuid)
        return time.time() - cut if cut else None

    def _until_late(self, p: Protected, rpo: int) -> float:
        """Seconds until the newest marker is older than the RPO (inf: no marker yet)."""
        lag = self._lag(p)
        return max(rpo - lag, 0.5) if lag is not None and lag <= rpo else float("inf")

    def _check_lag(self, p: Protected, rpo: int) -> None:
        lag = self._lag(p)
        if lag is not None and lag > rpo:
            self.parts.db().transition(p.uuid, PRIMARY, PairEvent.LAG_OVER_RPO,
                                     f"newest marker {lag:.0f}s old, over the RPO of {rpo}s")

    async def stop_supervisor(self, p: Protected) -> None:
        if p.task is not None and not p.task.done():
            p.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await p.task

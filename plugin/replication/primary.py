"""The primary's replication cycle for one protected domain.

One idea, about 670 lines: one domain's cycle, from the cut to the committed marker,
and its rollback; the same cycle runs offline from the images after a stop
(:mod:`.offline`) and marks the chunks the secondary asks to repair dirty before a cut.

Bitmap generations: ``vs-g<N>`` records every write since marker N. Cycle N+1
is one transaction per domain (so one instant across its disks)::

    block-dirty-bitmap-add     vs-g<N+1>   (persistent, starts recording)
    block-dirty-bitmap-disable vs-g<N>     (frozen: exactly what to send)
    blockdev-backup sync=bitmap bitmap=vs-g<N> bitmap-mode=never → local stage

An incremental disk's data does not cross the link while the guest waits on
it: ``blockdev-backup`` writes to its target before a guest write may
overwrite a not-yet-copied cluster (copy-before-write), so the cut's job goes
to a local **stage** (a scratch qcow2 without backing, in ``scratch``) and
finishes at local disk speed. The stage is then closed with a persistent copy
of the frozen bitmap in it, and this host's storage daemon ships it to the NBD
segment (:mod:`.shipper`): the link's TLS and connection live outside the
guest's QEMU. (A full copy goes straight to the link from the guest's QEMU:
its stage would be the whole disk; so does an increment whose stage would not
fit in ``scratch``.)

The frozen bitmap is removed only after the secondary has committed marker
N+1. If the cycle fails, one more transaction merges ``vs-g<N+1>`` back into
``vs-g<N>``, re-enables it and removes ``vs-g<N+1>``: no write is ever
forgotten. The first cycle adds ``vs-g1`` and runs ``sync=full``.

(QEMU 7.2 cannot group completion of a transaction that holds bitmap actions;
any failed job fails the whole cycle instead.)

The NBD client nodes use TLS: before adding them, the cycle adds a
``tls-creds-psk`` client object (:class:`NbdTls`: the directory whose
``keys.psk`` QEMU reads itself, and this host's name as the PSK user); it is
removed with the nodes, so nothing of ours stays in QEMU between cycles.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import shutil
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from qemu_blockdev import (
    BlockdevError,
    JobTimeoutError,
    JobTracker,
    bitmaps,
    cancel_jobs,
    commands,
    nodes,
)
from qemu_blockdev.transport import QmpTransport

from ..domain import DiskSpec, PairEvent, PairState, Role
from ..errors import PluginError
from ..peer import PeerClient
from ..state import Store
from .integrity import MAX_REPAIR_RANGES
from .shipper import SHIP_BITMAP, NbdTls, Shipper, add_tls_client, domain_tag
from .tools import run_tool

log = logging.getLogger("virtsync.primary")
ROLE = Role.PRIMARY
BITMAP_PREFIX = "vs-g"


class CycleError(PluginError):
    """A replication cycle failed; nothing was committed, no bit was lost."""


class CutRefusedError(CycleError):
    """``before_cut`` refused the cut (e.g. no guest agent to freeze the guest).

    Not a replication failure: the cycle was rolled back before anything was cut,
    and ``__cause__`` is the hook's own error.
    """


def gen_name(seq: int) -> str:
    return f"{BITMAP_PREFIX}{seq}"


def nbd_node_name(target: str, tag: str = "") -> str:
    return commands.owned(f"vs-d{tag}-{target}" if tag else f"vs-nbd-{target}")  # tagged: 31 chars at most


def job_name(target: str, seq: int, tag: str = "") -> str:
    """The job that sends a disk's data straight to the link (from the guest's QEMU,
    or, tagged with the domain, from the storage daemon for an offline cycle)."""
    return commands.owned(f"vs-cyc{seq}-{tag}-{target}" if tag else f"vs-cyc{seq}-{target}")


SCRATCH_MARGIN = 64 << 20  # qcow2 metadata of the stages, and writes between the check and the cut

# Requests in flight of a stage job (QEMU's default is 64 of up to 1 MiB): a few
# saturate the local disk already; more only queue the guest's own writes behind them.
STAGE_WORKERS = 4


def stage_node_name(target: str) -> str:
    return commands.owned(f"vs-stage-{target}")


def stage_job_name(target: str, seq: int) -> str:
    """The cut's job of an incremental disk: dirty blocks into the local stage."""
    return commands.owned(f"vs-stg{seq}-{target}")


async def resolve_nodes(qmp: QmpTransport, aliases: dict[str, str]) -> dict[str, tuple[str, int]]:
    """Map disk targets to (format node name, virtual size) through query-block.

    libvirt names its nodes ``libvirt-N-format``; the stable link is the
    device's QOM path, which contains the disk alias.
    """
    found: dict[str, tuple[str, int]] = {}
    for entry in await qmp.execute("query-block"):
        qdev = str(entry.get("qdev", ""))
        inserted = entry.get("inserted") or {}
        for target, alias in aliases.items():
            if alias and (qdev == f"/machine/peripheral/{alias}" or qdev.startswith(f"/machine/peripheral/{alias}/")):
                found[target] = (str(inserted.get("node-name", "")), int(inserted.get("image", {}).get("virtual-size", 0)))
    missing = set(aliases) - set(found)
    if missing:
        raise CycleError(f"cannot find QEMU block nodes for disks {sorted(missing)}")
    return found


@dataclass
class CycleStats:
    seq: int = 0
    kind: str = ""
    started: float = 0.0
    cut_time: float = 0.0
    finished: float = 0.0
    bytes: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.bytes.values())

    @property
    def rate(self) -> float | None:
        span = self.finished - self.cut_time
        return self.total / span if self.finished and span > 0 else None


class DomainReplicator:
    """Runs cycles for one domain; owns nothing in QEMU but ``vs-`` names."""

    def __init__(self, *, store: Store, peer: PeerClient, qmp: QmpTransport, uuid: str, domain: str,
                 disks: list[DiskSpec], scratch: str, shipper: QmpTransport, cycle_timeout: float,
                 stall_after: float, speed_limit: int = 0, tls: NbdTls | None = None,
                 stage_owner: tuple[int, int] | None = None, offline: bool = False) -> None:
        """:param scratch: directory of the stages (the guest's QEMU writes them)
        :param stage_owner: uid and gid of the guest's QEMU, when it is not ours: its stages are its own
        :param shipper: this host's storage daemon, which ships the stages
        :param tls: TLS of the NBD link; None is plain NBD (``insecure_plain`` peers only)
        :param offline: ``qmp`` is the storage daemon itself, holding the disks of a stopped
            domain (:mod:`.offline`): nobody writes them, so nothing is staged, and the
            names carry the domain's tag (the daemon serves several domains)"""
        self.store = store
        self.peer = peer
        self.qmp = qmp
        self.uuid = uuid
        self.domain = domain
        self.disks = disks
        self.scratch = scratch
        self.stage_owner = stage_owner
        self.cycle_timeout = cycle_timeout
        self.stall_after = stall_after
        self.speed_limit = speed_limit or None
        self.offline = offline
        self.tag = domain_tag(uuid) if offline else ""
        if offline and tls is not None:
            tls = dataclasses.replace(tls, object_id=f"vs-tls-o{self.tag}")
        self.tls = tls
        self.shipper = Shipper(shipper, uuid, tls, self.speed_limit)
        self.last = CycleStats()
        self.in_flight: CycleStats | None = None
        self.progress: dict[str, tuple[int, int]] = {}
        self.log = log.getChild(domain)
        self._swept = False  # leftovers of an agent killed mid-cycle are removed before the first cycle

    @property
    def targets(self) -> list[str]:
        return [d.target for d in self.disks]

    def reattached(self) -> None:
        """``qmp`` now reaches a new QEMU or a new libvirtd connection: leftovers of a
        cycle cut off by that change are swept before the next cycle."""
        self._swept = False

    def _committed_seq(self) -> int:
        prot = self.store.protection(self.uuid, ROLE)
        return int(prot["committed_seq"]) if prot else 0

    async def reconcile(self) -> int:
        """Make QEMU's bitmaps agree with the secondary's last marker; return it.

        After a crash between the secondary's commit and our cleanup, both
        generations exist: keep the newer if the marker was committed, else
        fold the newer back into the older.
        """
        info = await self.peer.call("info", {"uuid": self.uuid})
        last = int(info["last_marker"])
        if not self._swept:
            await self._remove_cycle_leftovers()
            self._swept = True
        present = await self._bitmaps_present()
        for disk in self.disks:
            names = present.get(disk.node, set())
            if gen_name(last) in names and gen_name(last + 1) in names:
                await self._rollback_bitmaps([disk], last + 1)
                names = names - {gen_name(last + 1)}
            # Older generations were frozen for a marker that is now committed.
            for stale in sorted(names - {gen_name(last)}):
                await bitmaps.remove(self.qmp, disk.node, stale)
        self.store.set_protection(self.uuid, ROLE, committed_seq=last)
        repair = info.get("repair")
        if last and isinstance(repair, dict) and repair:
            await self._mark_for_repair(last, repair)
        return last

    async def _mark_for_repair(self, last: int, repair: dict[str, Any]) -> None:
        """The secondary found damaged chunks in its replica: mark those guest
        ranges dirty in the recording generation, so the next cut sends them
        again (only them). QMP has no command that sets bits in a bitmap: the
        ranges are written as zeroes (HMP ``qemu-io``) to a ``null-co`` node of
        the disk's size, which discards the data but records the writes in its
        own bitmap; that bitmap is merged into ``vs-g<last>`` and dropped."""
        for disk in self.disks:
            ranges = repair.get(disk.target)
            if not isinstance(ranges, list) or not ranges:
                continue
            checked = []
            for r in ranges[:MAX_REPAIR_RANGES]:
                if not (isinstance(r, list) and len(r) == 2 and all(type(v) is int for v in r)
                        and r[0] >= 0 and r[1] > 0 and r[0] + r[1] <= disk.size):
                    self.log.warning("repair of %s: ignored a bad range %.60r", disk.target, r)
                    continue
                checked.append((r[0], r[1]))
            if not checked:
                continue
            node = f"vs-repair-{disk.target}"
            try:
                granularity = (await bitmaps.info(self.qmp, disk.node, gen_name(last))).granularity
            except BlockdevError as e:  # no usable bitmap: this disk's next copy is full anyway
                self.log.warning("repair of %s: %s", disk.target, e)
                continue
            await nodes.blockdev_add(self.qmp, {"driver": "null-co", "node-name": node, "size": disk.size})
            try:
                await bitmaps.add(self.qmp, node, node, persistent=False, granularity=granularity)
                for start, length in checked:
                    reply = await self.qmp.execute("human-monitor-command", {
                        "command-line": f'qemu-io {node} "write -z {start} {length}"'})
                    if reply:  # qemu-io's own errors go to QEMU's log; a reply is HMP's error
                        raise CycleError(f"repair of {disk.target}: qemu-io: {str(reply)[:200]}")
                await self.qmp.execute("block-dirty-bitmap-merge", commands.bitmap_merge_args(
                    disk.node, gen_name(last), [{"node": node, "name": node}]))
            finally:
                await nodes.blockdev_del(self.qmp, node, missing_ok=True)
            self.log.warning("%s: the secondary asked for %d damaged range(s) again: marked dirty for the "
                             "next cut", disk.target, len(checked))
            self.store.audit("repair-requested", self.uuid, target=disk.target,
                             ranges=[list(r) for r in checked][:16])

    async def _bitmaps_present(self) -> dict[str, set[str]]:
        out: dict[str, set[str]] = {}
        for node in await nodes.query_nodes(self.qmp):
            out[node.node_name] = {b.name for b in node.bitmaps if b.name.startswith(BITMAP_PREFIX)}
        return out

    async def full_copy_disks(self, last: int) -> set[str]:
        """Disks that need a full copy: all for the first marker; otherwise
        those without a usable bitmap of the last generation (a disk added or
        re-targeted since, or QEMU killed while the bitmap was in use)."""
        if last == 0:
            return {d.target for d in self.disks}
        full = set()
        found = {n.node_name: n for n in await nodes.query_nodes(self.qmp)}  # one query for all disks
        for disk in self.disks:
            try:
                bitmaps.check_usable(found.get(disk.node), disk.node, gen_name(last))
            except BlockdevError as e:
                self.log.warning("full copy of %s: %s", disk.target, e)
                full.add(disk.target)
        return full

    async def dirty_bytes_of(self, target: str) -> int:
        """Bytes of one disk written since the last marker, not yet sent."""
        disk = next(d for d in self.disks if d.target == target)
        return (await bitmaps.info(self.qmp, disk.node, gen_name(self._committed_seq()))).count

    async def cycle(self, *, label: str = "", apply: bool = True,
                    on_progress: Callable[[dict[str, Any]], Awaitable[None]] | None = None,
                    before_cut: Callable[[], Awaitable[None]] | None = None,
                    after_cut: Callable[[], Awaitable[None]] | None = None) -> CycleStats:
        """Cut all disks at one instant and push the cut to the secondary.

        ``before_cut`` runs right before the cut's transaction (e.g. freeze the
        guest's filesystems) and ``after_cut`` right after it, whenever
        ``before_cut`` was called: also when the hook or the transaction failed.
        An error of ``after_cut`` is logged, never fatal: the cut is made.

        :raise CutRefusedError: ``before_cut`` raised a PluginError; nothing was cut
        :raise CycleError: the cycle failed and was rolled back (bits kept)
        """
        last = await self.reconcile()
        seq = last + 1
        full_disks = await self.full_copy_disks(last)
        if last and not full_disks:
            empty = await self._empty_cycle(seq, last, label, apply)
            if empty is not None:
                return empty
        kind = "full" if last == 0 else "incremental"
        stats = CycleStats(seq=seq, kind=kind, started=time.time())
        self.in_flight = stats
        cycle_id = self.store.start_cycle(self.uuid, seq, kind)
        opened = False
        cut = False
        try:
            # A disk that starts over forgets its stale bitmaps first.
            await self.drop_bitmaps([d for d in self.disks if d.target in full_disks])
            target = await self.peer.call("open_cycle", {"uuid": self.uuid, "seq": seq, "kind": kind,
                                                         "targets": self.targets,
                                                         "sizes": {d.target: d.size for d in self.disks}})
            opened = True
            staged = [d for d in self.disks if d.target not in full_disks]
            if staged and (self.offline or not await self._stages_fit(staged, last)):
                staged = []
            # Full copies (and increments whose stages would not fit) go straight to the link.
            direct = [d for d in self.disks if d not in staged]
            if direct:
                tls_creds = await add_tls_client(self.qmp, self.tls)
                for disk in direct:
                    await nodes.blockdev_add(self.qmp, commands.nbd_node(
                        nbd_node_name(disk.target, self.tag), str(target["exports"][disk.target]),
                        host=str(target["host"]), port=int(target["port"]), tls_creds=tls_creds))
            await self._add_stages(staged)
            actions = []
            for disk in self.disks:
                actions.append(commands.action("block-dirty-bitmap-add",
                                               commands.bitmap_add_args(disk.node, gen_name(seq))))
                if disk.target in full_disks:
                    backup = commands.backup_args(job_name(disk.target, seq, self.tag), disk.node,
                                                  nbd_node_name(disk.target, self.tag), speed=self.speed_limit)
                else:
                    actions.append(commands.action("block-dirty-bitmap-disable",
                                                   commands.bitmap_args(disk.node, gen_name(last))))
                    if disk in staged:
                        backup = commands.backup_args(stage_job_name(disk.target, seq), disk.node,
                                                      stage_node_name(disk.target), sync="bitmap",
                                                      bitmap=gen_name(last), bitmap_mode="never",
                                                      max_workers=STAGE_WORKERS)
                    else:
                        backup = commands.backup_args(job_name(disk.target, seq, self.tag), disk.node,
                                                      nbd_node_name(disk.target, self.tag), sync="bitmap",
                                                      bitmap=gen_name(last), bitmap_mode="never",
                                                      speed=self.speed_limit)
                actions.append(commands.action("blockdev-backup", backup))
            # Each disk's data moves in one job: in the guest's QEMU (direct) or the storage daemon (staged).
            movers: dict[str, tuple[JobTracker, str]] = {}
            with contextlib.ExitStack() as trackers:
                if direct:
                    sending = trackers.enter_context(JobTracker(self.qmp, [job_name(d.target, seq, self.tag)
                                                                           for d in direct]))
                    movers.update({d.target: (sending, job_name(d.target, seq, self.tag)) for d in direct})
                if staged:
                    staging = trackers.enter_context(JobTracker(self.qmp, [stage_job_name(d.target, seq)
                                                                           for d in staged]))
                    shipping = trackers.enter_context(JobTracker(self.shipper.qmp, [
                        self.shipper.job_name(d.target, seq) for d in staged]))
                    movers.update({d.target: (shipping, self.shipper.job_name(d.target, seq)) for d in staged})
                await self._cut(actions, before_cut, after_cut)
                cut = True
                stats.cut_time = time.time()
                frozen = await self._dirty_counts(gen_name(last)) if len(full_disks) < len(self.disks) else {}
                stats.bytes = {d.target: d.size if d.target in full_disks else frozen[d.target] for d in self.disks}
                if any(n < 0 for n in stats.bytes.values()):  # -1: the frozen bitmap is gone
                    raise CycleError(f"frozen bitmap {gen_name(last)} missing after the cut: {stats.bytes}")
                if staged:
                    await staging.wait_all_concluded(timeout=self.cycle_timeout)
                    await self._close_stages(staged, last)
                    await self.shipper.start(seq, {d.target: self._stage_path(d.target) for d in staged},
                                             {d.target: str(target["exports"][d.target]) for d in staged},
                                             str(target["host"]), int(target["port"]))
                await self._wait_jobs(movers, stats, on_progress)
            await self._remove_nbd_nodes()
            await self._remove_stages()
            marker = await self.peer.call("commit_cycle", {
                "uuid": self.uuid, "seq": seq, "cut_time": stats.cut_time, "bytes": stats.bytes,
                "label": label, "apply": apply})
            # The marker is durable on the secondary: the frozen bits are no longer needed.
            self.store.set_protection(self.uuid, ROLE, committed_seq=seq)
            for disk in self.disks:
                if disk.target not in full_disks:
                    await bitmaps.remove(self.qmp, disk.node, gen_name(last))
            stats.finished = time.time()
            self.last = stats
            self.store.finish_cycle(cycle_id, stats.total)
            self._committed(int(marker["seq"]))
            self.log.info("marker %d: %s, %d bytes in %.3fs", seq, kind, stats.total, stats.finished - stats.cut_time)
            return stats
        except BaseException as e:
            await asyncio.shield(self._rollback(seq, full_disks, opened, cut))
            self.store.finish_cycle(cycle_id, 0, error=str(e)[:500])
            if isinstance(e, CutRefusedError):
                raise
            if isinstance(e, (BlockdevError, PluginError)):
                raise CycleError(f"cycle {seq} of {self.domain} failed: {e}") from e
            raise
        finally:
            self.in_flight = None

    async def _cut(self, actions: list[dict[str, Any]], before_cut: Callable[[], Awaitable[None]] | None,
                   after_cut: Callable[[], Awaitable[None]] | None) -> None:
        """The cut's transaction, between the two hooks (after_cut always follows before_cut)."""
        if before_cut is None:
            await nodes.transaction(self.qmp, actions, grouped=False)
            return
        try:
            try:
                await before_cut()
            except PluginError as e:
                raise CutRefusedError(str(e)) from e
            await nodes.transaction(self.qmp, actions, grouped=False)
        finally:
            if after_cut is not None:
                try:
                    await asyncio.shield(after_cut())
                except Exception:  # noqa: BLE001 - the cut stands; the hook reports its own trouble
                    self.log.exception("after the cut")

    async def _dirty_counts(self, name: str) -> dict[str, int]:
        """Each disk's count of bitmap ``name``, from one query."""
        by_node = {n.node_name: n for n in await nodes.query_nodes(self.qmp)}
        out = {}
        for disk in self.disks:
            bitmap = by_node[disk.node].bitmap(name) if disk.node in by_node else None
            out[disk.target] = bitmap.count if bitmap is not None else -1
        return out

    async def _empty_cycle(self, seq: int, last: int, label: str, apply: bool) -> CycleStats | None:
        """A marker when nothing changed: rotate the bitmaps at one instant and,
        if the frozen generation is really empty, record the marker without
        moving data. None when something was written (the bits are folded back
        and a normal cycle runs)."""
        if any((await self._dirty_counts(gen_name(last))).values()):
            return None  # cheap pre-check; the cut below decides
        stats = CycleStats(seq=seq, kind="empty", started=time.time())
        actions = []
        for disk in self.disks:
            actions += [commands.action("block-dirty-bitmap-add", commands.bitmap_add_args(disk.node, gen_name(seq))),
                        commands.action("block-dirty-bitmap-disable", commands.bitmap_args(disk.node, gen_name(last)))]
        await nodes.transaction(self.qmp, actions, grouped=False)
        stats.cut_time = time.time()
        frozen = await self._dirty_counts(gen_name(last))
        if any(frozen.values()):
            await self._rollback_bitmaps(self.disks, seq)  # a write slipped in before the cut
            return None
        cycle_id = self.store.start_cycle(self.uuid, seq, "empty")
        try:
            await self.peer.call("commit_empty", {"uuid": self.uuid, "seq": seq, "cut_time": stats.cut_time,
                                                  "label": label, "apply": apply})
        except BaseException as e:
            await asyncio.shield(self._rollback_bitmaps(self.disks, seq))
            self.store.finish_cycle(cycle_id, 0, error=str(e)[:500])
            if isinstance(e, PluginError):
                raise CycleError(f"cycle {seq} of {self.domain} failed: {e}") from e
            raise
        self.store.set_protection(self.uuid, ROLE, committed_seq=seq)
        for disk in self.disks:
            await bitmaps.remove(self.qmp, disk.node, gen_name(last))
        stats.bytes = dict.fromkeys(self.targets, 0)
        stats.finished = time.time()
        self.last = stats
        self.store.finish_cycle(cycle_id, 0)
        self._committed(seq)
        return stats

    def _committed(self, seq: int) -> None:
        with self.store.transaction() as db:
            db.execute("UPDATE pairs SET last_marker = ?, bytes_done = bytes_total WHERE domain_uuid = ?"
                       " AND role = ? AND state != 'deleted'", (seq, self.uuid, ROLE))
        self.store.transition(self.uuid, ROLE, PairEvent.CYCLE_OK)

    async def _wait_jobs(self, movers: dict[str, tuple[JobTracker, str]], stats: CycleStats,
                         on_progress: Callable[[dict[str, Any]], Awaitable[None]] | None) -> None:
        """Wait for the jobs moving each disk's data, reporting progress and flagging stalls."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.cycle_timeout
        last_done, last_move = -1, loop.time()
        stalled = False
        waiting = list(dict.fromkeys(tracker for tracker, _ in movers.values()))
        while waiting:
            try:
                await waiting[0].wait_all_concluded(timeout=1.0 / len(waiting))
                waiting.pop(0)
                continue
            except JobTimeoutError:
                waiting.append(waiting.pop(0))
            for tracker in waiting:
                await tracker.poll()
            done = total = 0
            for disk in self.disks:
                tracker, job = movers[disk.target]
                cur, tot = tracker.progress(job)
                self.progress[disk.target] = (cur, tot)
                self.store.set_pair_progress(self.uuid, ROLE, disk.target, cur, tot)
                done, total = done + cur, total + tot
            if on_progress is not None:
                await on_progress({"seq": stats.seq, "bytes_done": done, "bytes_total": total})
            now = loop.time()
            if done != last_done:
                last_done, last_move = done, now
                if stalled:
                    stalled = False
                    self.store.set_pair_state(self.uuid, ROLE, self._live_state(stats))
            elif not stalled and now - last_move > self.stall_after:
                stalled = True
                self.store.transition(self.uuid, ROLE, PairEvent.CYCLE_FAILED,
                                      f"stalled: no data moved for {self.stall_after:g}s (peer link?), retrying")
            if now > deadline:
                raise CycleError(f"cycle {stats.seq} did not finish within {self.cycle_timeout:g}s")

    def _live_state(self, stats: CycleStats) -> PairState:
        return PairState.INITIAL_COPY if stats.kind == "full" else PairState.ACTIVE

    def _stage_path(self, target: str) -> str:
        return os.path.join(self.scratch, f"{self.uuid}-{target}.qcow2")

    async def _stages_fit(self, staged: list[DiskSpec], last: int) -> bool:
        """Whether ``scratch`` has room for this cycle's stages (everything dirty
        now, and what may still come before the cut).

        A stage that ran out of space would fail the guest's own writes to the
        clusters not yet staged: QEMU 7.2's backup breaks the guest write when its
        copy-before-write fails (``on-cbw-error`` is not exposed for backup jobs).
        When they do not fit, the cycle sends straight to the link, as before stages
        existed (after a long outage the dirty set can outgrow any scratch).
        """
        self._make_scratch()
        dirty = await self._dirty_counts(gen_name(last))
        need = sum(max(dirty.get(d.target, 0), 0) for d in staged) * 5 // 4 + SCRATCH_MARGIN
        free = shutil.disk_usage(self.scratch).free
        if free >= need:
            return True
        self.log.warning("scratch %s has %d MiB free, the stages need about %d MiB: this cycle sends straight "
                         "to the link (guest writes may wait on it)", self.scratch, free >> 20, need >> 20)
        return False

    def _make_scratch(self) -> None:
        os.makedirs(self.scratch, mode=0o700, exist_ok=True)
        if self.stage_owner is not None:
            os.chmod(self.scratch, 0o711)  # QEMU may reach its own stage, nobody may list them

    async def _add_stages(self, disks: list[DiskSpec]) -> None:
        """A fresh, empty stage per disk: the size of the disk, no backing, flushes ignored
        (its data is worth nothing once shipped, and is re-sent from the bitmap if lost)."""
        for disk in disks:  # in ``scratch``, made by _stages_fit
            path = self._stage_path(disk.target)
            await run_tool("qemu-img", "create", "-q", "-f", "qcow2", path, str(disk.size))
            os.chmod(path, 0o600)  # the guest's data
            if self.stage_owner is not None:
                os.chown(path, *self.stage_owner)
            file_node = commands.file_node(f"{stage_node_name(disk.target)}-f", path, no_flush=True)
            await nodes.blockdev_add(self.qmp, commands.qcow2_node(stage_node_name(disk.target), file_node,
                                                                   backing=None))

    async def _close_stages(self, staged: list[DiskSpec], last: int) -> None:
        """Store in each stage a copy of the frozen bits it holds, and close it:
        closing writes the bitmap into the file, for the storage daemon to open."""
        actions = []
        for disk in staged:
            stage = stage_node_name(disk.target)
            actions += [
                commands.action("block-dirty-bitmap-add",
                                commands.bitmap_add_args(stage, SHIP_BITMAP, persistent=True, disabled=True)),
                commands.action("block-dirty-bitmap-merge", commands.bitmap_merge_args(
                    stage, SHIP_BITMAP, [{"node": disk.node, "name": gen_name(last)}])),
            ]
        await nodes.transaction(self.qmp, actions, grouped=False)
        for disk in staged:  # its file node was added inline: it goes with it
            await nodes.blockdev_del(self.qmp, stage_node_name(disk.target))

    async def _remove_stages(self) -> None:
        """Close the stages wherever they are open, and delete them."""
        await self.shipper.close(self.targets)
        for disk in self.disks:
            await nodes.blockdev_del(self.qmp, stage_node_name(disk.target), missing_ok=True)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._stage_path(disk.target))

    async def _remove_cycle_leftovers(self) -> None:
        """Jobs, stages and NBD nodes of a cycle whose agent was killed (QEMU kept them)."""
        await cancel_jobs(self.qmp, self._is_cycle_job)
        await self._remove_nbd_nodes()
        await self._remove_stages()

    def _is_cycle_job(self, job_id: str) -> bool:
        """Our jobs in the guest's QEMU: the cut's and the full copies' (``vs-stg<N>-<target>``, ``vs-cyc…``);
        offline, this domain's ``vs-cyc<N>-<tag>-<target>`` in the storage daemon."""
        if self.tag:
            return job_id.startswith("vs-cyc") and any(job_id.endswith(f"-{self.tag}-{t}") for t in self.targets)
        return any(job_id.startswith(prefix) and job_id.rpartition("-")[2] in self.targets
                   for prefix in ("vs-stg", "vs-cyc"))

    async def _remove_nbd_nodes(self) -> None:
        """Drop the NBD nodes, then the TLS object they used."""
        for disk in self.disks:
            await nodes.blockdev_del(self.qmp, nbd_node_name(disk.target, self.tag), missing_ok=True)
        if self.tls is not None:
            await nodes.object_del(self.qmp, self.tls.object_id, missing_ok=True)

    async def _rollback(self, seq: int, full_disks: set[str], opened: bool, cut: bool) -> None:
        """Undo a failed cycle: cancel jobs, merge bits back, drop the segment."""
        with contextlib.suppress(BlockdevError):
            await cancel_jobs(self.qmp, self._is_cycle_job)
        with contextlib.suppress(BlockdevError):
            await self._remove_nbd_nodes()
        with contextlib.suppress(BlockdevError):
            await self._remove_stages()
        if cut:
            with contextlib.suppress(BlockdevError):
                for disk in self.disks:
                    if disk.target in full_disks:
                        await bitmaps.remove(self.qmp, disk.node, gen_name(seq))
                await self._rollback_bitmaps([d for d in self.disks if d.target not in full_disks], seq)
        if opened:
            with contextlib.suppress(PluginError):
                await self.peer.call("abort_cycle", {"uuid": self.uuid, "seq": seq}, timeout=5)

    async def _rollback_bitmaps(self, disks: list[DiskSpec], seq: int) -> None:
        """Fold generation ``seq`` back into ``seq-1`` atomically, re-enable it."""
        if not disks:
            return
        actions = []
        for disk in disks:
            actions += [
                commands.action("block-dirty-bitmap-merge",
                                commands.bitmap_merge_args(disk.node, gen_name(seq - 1), [gen_name(seq)])),
                commands.action("block-dirty-bitmap-enable", commands.bitmap_args(disk.node, gen_name(seq - 1))),
                commands.action("block-dirty-bitmap-remove", commands.bitmap_args(disk.node, gen_name(seq))),
            ]
        await nodes.transaction(self.qmp, actions, grouped=False)

    async def drop_bitmaps(self, disks: list[DiskSpec]) -> None:
        """Forget every generation of these disks: their next copy is full."""
        if not disks:
            return
        present = await self._bitmaps_present()
        for disk in disks:
            for name in sorted(present.get(disk.node, set())):
                await bitmaps.remove(self.qmp, disk.node, name)

    async def remove_all(self) -> None:
        """Unprotect: cancel our jobs, drop our nodes and bitmaps in QEMU."""
        with contextlib.suppress(BlockdevError):
            await cancel_jobs(self.qmp, self._is_cycle_job, timeout=10)
        await self._remove_nbd_nodes()
        await self._remove_stages()
        await self.drop_bitmaps(self.disks)

"""The last writes of a stopped domain, shipped from its images after QEMU exits.

When the domain's QEMU exits in an orderly way (guest power-off, ``virsh
shutdown``, ``destroy``, ``managedsave``), it stores the persistent bitmap
``vs-g<N>`` in each qcow2 image: exactly the clusters written since marker N.
:func:`ship_at_stop` opens the images in this host's qemu-storage-daemon and
runs the usual cycle there (:class:`~.primary.DomainReplicator` with
``offline=True``: the same transaction, straight to the link since nobody
writes), so the secondary gets a marker "at stop" with the VM's last state.
Closing the images stores the next generation, ``vs-g<N+1>``, which the
domain's QEMU loads at the next start: cycles go on incrementally.

A QEMU that did not exit cleanly (SIGKILL, host power loss) leaves its bitmaps
flagged ``in-use``: they load *inconsistent* and cannot be trusted. Nothing is
shipped then; the pair needs a resync, and at the next start
:func:`drop_inconsistent` removes every generation of such a disk, so its next
cycle copies it in full. A cycle never resumes from an inconsistent bitmap.

A start wins over a ship: libvirt's ``prepare`` hook reaches the agent before
QEMU opens the images, and :meth:`OfflineShips.abort` cancels the ship (the
cycle's rollback folds the bits back) and closes the images before it answers.
A ship never opens an image that QEMU holds: ``qemu-img info`` (no ``-U``)
fails on QEMU's lock first.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import json
import logging
import os
import stat
from collections.abc import Awaitable
from typing import Any

from qemu_blockdev import BlockdevError, bitmaps, commands, nodes
from qemu_blockdev.transport import QmpTransport

from ..domain import DiskSpec
from ..errors import PluginError
from .primary import BITMAP_PREFIX, ROLE, CycleStats, DomainReplicator, gen_name
from .shipper import domain_tag
from .tools import run_tool

log = logging.getLogger("virtsync.offline")

STOP_LABEL = "at stop"
#: How long a start waits for an aborted ship to close the images (within the
#: hook's BUDGET_PREPARE, hooks/qemu).
ABORT_TIMEOUT = 8.0


class Outcome(enum.Enum):
    SHIPPED = "shipped"      # marker "at stop" committed: the replica holds the VM's last state
    NOTHING = "nothing"      # no write since the last marker: the replica already holds it
    CRASHED = "crashed"      # a bitmap is inconsistent: the pair needs a resync
    BUSY = "busy"            # an image is in use (the domain runs again): nothing done
    ABORTED = "aborted"      # a start came first: bits folded back, they ship from the running domain


@dataclasses.dataclass(frozen=True)
class StopResult:
    outcome: Outcome
    reason: str = ""
    stats: CycleStats | None = None


class ImageBusyError(PluginError):
    """A disk image is open in another process (QEMU started again)."""


def image_node(tag: str, target: str) -> str:
    """The format node of an image opened offline (31 characters at most)."""
    return commands.owned(f"vs-o{tag}-{target}")


async def image_bitmaps(path: str) -> list[dict[str, Any]]:
    """The persistent bitmaps stored in the qcow2 ``path`` (``qemu-img info``).

    Without ``-U``: a QEMU that holds the image makes this fail instead of
    reading flags that QEMU is about to change.

    :raise ImageBusyError: the image is locked by another process
    :raise PluginError: qemu-img failed otherwise
    """
    try:
        out = await run_tool("qemu-img", "info", "--output=json", path)
    except PluginError as e:
        if "lock" in str(e):
            raise ImageBusyError(f"{path} is in use: {e}") from e
        raise
    info = json.loads(out)
    data = (info.get("format-specific") or {}).get("data") or {}
    return list(data.get("bitmaps") or [])


async def crashed_disks(disks: list[DiskSpec], generation: int) -> dict[str, str]:
    """Disks whose QEMU did not store the bitmap of ``generation`` cleanly: target → why.

    Either the bitmap is flagged ``in-use`` (loaded at start, never stored), or it is
    missing: a generation added while QEMU ran reaches the image only when QEMU
    closes it (its predecessor was removed from the image at the marker's commit).
    """
    out: dict[str, str] = {}
    for disk in disks:
        ours = {str(b.get("name")): b for b in await image_bitmaps(disk.source)
                if str(b.get("name", "")).startswith(BITMAP_PREFIX)}
        in_use = sorted(name for name, b in ours.items() if "in-use" in b.get("flags", []))
        if in_use:
            out[disk.target] = f"{', '.join(in_use)} in use"
        elif generation and gen_name(generation) not in ours:
            out[disk.target] = f"{gen_name(generation)} not stored"
    return out


async def _open_images(qsd: QmpTransport, tag: str, disks: list[DiskSpec]) -> list[DiskSpec]:
    """Open each disk's image read-write (with its backing chain) in the storage daemon."""
    opened = []
    for disk in disks:
        node = image_node(tag, disk.target)
        file_node = commands.file_node(f"{node}-f", disk.source)
        try:
            mode = os.stat(disk.source).st_mode
        except OSError as e:
            raise PluginError(f"disk {disk.target}: cannot open {disk.source}: {e.strerror}") from None
        if stat.S_ISBLK(mode):
            file_node["driver"] = "host_device"
        await nodes.blockdev_add(qsd, commands.qcow2_node(node, file_node))
        opened.append(dataclasses.replace(disk, node=node))
    return opened


async def _close_images(qsd: QmpTransport, tag: str, disks: list[DiskSpec]) -> None:
    """Close the images: QEMU stores their persistent bitmaps (the next generation) now."""
    for disk in disks:
        await nodes.blockdev_del(qsd, image_node(tag, disk.target), missing_ok=True)


async def ship_at_stop(rep: DomainReplicator, qsd: QmpTransport, *, label: str = STOP_LABEL) -> StopResult:
    """Ship what the stopped domain wrote since its last marker, from its images.

    :param rep: the domain's replicator (its disks, peer, store and link settings)
    :param qsd: this host's qemu-storage-daemon
    :raise CycleError: the cycle failed (rolled back: the bits stay in the image)
    """
    try:
        crashed = await crashed_disks(rep.disks, _committed_seq(rep))
    except ImageBusyError as e:
        return StopResult(Outcome.BUSY, str(e))
    if crashed:
        what = ", ".join(f"{t} ({why})" for t, why in sorted(crashed.items()))
        return StopResult(Outcome.CRASHED, f"QEMU did not exit cleanly, its dirty bitmaps cannot be trusted: "
                                           f"{what}; the disks are copied in full at the next start")
    tag = domain_tag(rep.uuid)
    opened: list[DiskSpec] = []
    try:
        try:
            opened = await _open_images(qsd, tag, rep.disks)
        except BlockdevError as e:
            if "lock" in str(e):
                return StopResult(Outcome.BUSY, str(e))
            raise
        off = DomainReplicator(store=rep.store, peer=rep.peer, qmp=qsd, uuid=rep.uuid, domain=rep.domain,
                               disks=opened, scratch=rep.scratch, shipper=qsd, cycle_timeout=rep.cycle_timeout,
                               stall_after=rep.stall_after, speed_limit=rep.speed_limit or 0, tls=rep.tls,
                               offline=True)
        if await _nothing_written(off):
            return StopResult(Outcome.NOTHING, "no write since the last marker")
        stats = await off.cycle(label=label)
        rep.last = stats
        return StopResult(Outcome.SHIPPED, f"marker {stats.seq} at stop, {stats.total} bytes", stats)
    finally:
        # Also when cancelled by a start: the images must be closed before QEMU opens them.
        await _to_the_end(_close_images(qsd, tag, opened))


async def _to_the_end(aw: Awaitable[None]) -> None:
    """Await ``aw`` to its end even if this task is cancelled meanwhile (then re-raised)."""
    task = asyncio.ensure_future(aw)
    cancelled = False
    while not task.done():
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            if not task.done():
                cancelled = True
    if cancelled:
        raise asyncio.CancelledError
    task.result()


async def _nothing_written(off: DomainReplicator) -> bool:
    """Each disk holds only the generation of the last marker, and it is empty
    (a ship already ran, or the agent restarts while the domain is stopped)."""
    generation = _committed_seq(off)
    if not generation:
        return False
    by_node = {n.node_name: n for n in await nodes.query_nodes(off.qmp)}
    for disk in off.disks:
        node = by_node.get(disk.node)
        ours = [b for b in node.bitmaps if b.name.startswith(BITMAP_PREFIX)] if node else []
        if [b.name for b in ours] != [gen_name(generation)] or ours[0].count or ours[0].inconsistent:
            return False
    return True


def _committed_seq(rep: DomainReplicator) -> int:
    """The last marker this host knows committed (its bitmap generation)."""
    prot = rep.store.protection(rep.uuid, ROLE)
    return int(prot["committed_seq"]) if prot else 0


async def drop_inconsistent(rep: DomainReplicator) -> list[str]:
    """At start, in the running domain: remove every ``vs-`` bitmap of a disk
    that has an inconsistent one (its next cycle copies it in full); the targets."""
    by_node = {n.node_name: n for n in await nodes.query_nodes(rep.qmp)}
    bad = []
    for disk in rep.disks:
        node = by_node.get(disk.node)
        ours = [b for b in node.bitmaps if b.name.startswith(BITMAP_PREFIX)] if node else []
        if any(b.inconsistent for b in ours):
            for b in ours:
                await bitmaps.remove(rep.qmp, disk.node, b.name)
            bad.append(disk.target)
    return bad


async def prepare_start(rep: DomainReplicator, resync: set[str]) -> dict[str, str]:
    """At a start, before any cycle: the disks whose next cycle copies them in full, and why.

    Every ``vs-`` bitmap of a disk in ``resync`` (its pair needs a resync) or with an
    inconsistent one is removed: the next cycle cannot resume from it.
    """
    for disk in rep.disks:
        if disk.target in resync:
            await rep.drop_bitmaps([disk])
    out = {t: "the pair needs a resync" for t in resync if t in rep.targets}
    for target in await drop_inconsistent(rep):
        out.setdefault(target, "its dirty bitmap loaded inconsistent (QEMU did not exit cleanly)")
    generation = _committed_seq(rep)
    if generation:
        by_node = {n.node_name: n for n in await nodes.query_nodes(rep.qmp)}
        for disk in rep.disks:
            node = by_node.get(disk.node)
            if node is not None and node.bitmap(gen_name(generation)) is None:
                out.setdefault(disk.target, f"no dirty bitmap {gen_name(generation)} (QEMU did not store it)")
    return out


class OfflineShips:
    """The ships in progress, one per domain, so that a start can abort its domain's."""

    def __init__(self) -> None:
        self._tasks: dict[str, asyncio.Task[StopResult]] = {}
        self._starting: set[str] = set()

    def starting(self, uuid: str, value: bool = True) -> None:
        """libvirt prepares a start of ``uuid`` (cleared when it runs, or the start failed)."""
        if value:
            self._starting.add(uuid)
        else:
            self._starting.discard(uuid)

    async def run(self, uuid: str, ship: Awaitable[StopResult]) -> StopResult:
        """Run ``ship`` unless a start is prepared; ABORTED when a start cancelled it."""
        if uuid in self._starting:
            if asyncio.iscoroutine(ship):
                ship.close()
            return StopResult(Outcome.BUSY, "the domain is starting")
        task = asyncio.ensure_future(ship)
        self._tasks[uuid] = task
        try:
            await asyncio.wait({task})
        except asyncio.CancelledError:
            task.cancel()   # our caller goes (unprotect, agent stop): the ship too, images closed
            await asyncio.wait({task})
            raise
        finally:
            self._tasks.pop(uuid, None)
        if task.cancelled():
            return StopResult(Outcome.ABORTED, "the domain started before its last writes were shipped")
        return task.result()

    async def abort(self, uuid: str) -> bool:
        """Mark ``uuid`` starting and cancel its ship; return once the images are closed.

        :return: whether a ship was running
        """
        self.starting(uuid)
        task = self._tasks.get(uuid)
        if task is None or task.done():
            return False
        task.cancel()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.wait({task}), ABORT_TIMEOUT)
        return True

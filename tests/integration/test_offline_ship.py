"""Shipping a stopped domain's last writes from its images (plugin.replication.offline).

Real parts: the guest's QEMU (writes through its devices with HMP ``qemu-io``), the
primary agent's own qemu-storage-daemon (:class:`plugin.replication.storage_daemon.StorageDaemon`)
and a second one serving the NBD exports of a real
:class:`~plugin.replication.secondary.Secondary` (one daemon cannot be both: its NBD
client's connect blocks the main loop its server needs); the peer API is called in-process. Every check compares bytes (``qemu-img compare``) or the
bitmaps stored in the qcow2 images (``qemu-img info``).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from plugin import peer_api
from plugin.config import Config
from plugin.domain import DiskSpec, PairState, Protection
from plugin.replication.offline import OfflineShips, Outcome, drop_inconsistent, ship_at_stop
from plugin.replication.primary import DomainReplicator
from plugin.replication.secondary import Secondary
from plugin.replication.storage_daemon import StorageDaemon
from plugin.state import Store
from qemu_blockdev import nodes
from qemu_blockdev.transport import QmpTransport
from tests.integration.conftest import NEEDS_QEMU, make_image
from tests.lab import procs
from tests.lab.qemu_vm import Disk, PlainVM, guest_write

pytestmark = [pytest.mark.qemu, NEEDS_QEMU]
MiB = 1 << 20
CLUSTER = 64 * 1024
UUID = "3b0c1f52-8d1e-4f7a-9c44-5e2a7d9b1c01"
SIZE = 16 * MiB


class LocalPeer:
    """The peer API of the in-process secondary, called as the primary ``pri``."""

    def __init__(self, sec: Secondary) -> None:
        self.handlers = peer_api.replica_handlers("sec", lambda: sec)

    async def call(self, op: str, body: Mapping[str, Any], *, timeout: float | None = None) -> Any:
        return await self.handlers[op](dict(body), "pri")


@dataclass
class Env:
    tmp: Path
    vm: PlainVM
    qsd: QmpTransport
    sec: Secondary
    store: Store
    peer: LocalPeer

    async def replicator(self, speed_limit: int = 0) -> DomainReplicator:
        """The domain's replicator over the running VM's QMP (as the supervisor builds it)."""
        qmp = await self.vm.connect()
        disks = [DiskSpec(f"vd{chr(97 + i)}", d.path, "qcow2", SIZE, self.vm.node(i))
                 for i, d in enumerate(self.vm.disks)]
        return DomainReplicator(store=self.store, peer=self.peer, qmp=qmp, uuid=UUID, domain="vm",  # type: ignore[arg-type]
                                disks=disks, scratch=str(self.tmp / "scratch"), shipper=self.qsd, cycle_timeout=60,
                                stall_after=30, speed_limit=speed_limit)

    def replica(self, target: str) -> str:
        return str(self.sec.replica_views(UUID)[target])


@asynccontextmanager
async def environment(tmp: Path) -> AsyncIterator[Env]:
    port = procs.free_port()
    sec_daemon = StorageDaemon(str(tmp / "sec-run"), "127.0.0.1", port)
    daemon = StorageDaemon(str(tmp / "run"), "127.0.0.1", procs.free_port())
    qsd = await daemon.start()
    cfg = Config(name="sec", listen_host="127.0.0.1", listen_port=procs.free_port(), state_dir=str(tmp / "sec"),
                 storage=str(tmp / "replicas"), replication_address="127.0.0.1", replication_port=port)
    (tmp / "replicas").mkdir()
    sec = Secondary(cfg, Store(cfg.db_path), await sec_daemon.start())
    (tmp / "pri").mkdir()
    store = Store(str(tmp / "pri" / "state.db"))
    vm = PlainVM(str(tmp), [Disk(make_image(str(tmp / f"vd{c}.qcow2"), "16M")) for c in "ab"], name="vm")
    vm.start()
    peer = LocalPeer(sec)
    await peer.call("prepare", {"uuid": UUID, "domain": "vm", "primary": "pri",
                                "disks": [{"target": t, "size": SIZE} for t in ("vda", "vdb")],
                                "protection": {"segment": "default", "rpo": 300, "mode": "async"}})
    store.add_protection(UUID, "primary", "vm", Protection(peer="sec"))
    for t in ("vda", "vdb"):
        store.upsert_pair(UUID, "primary", "vm", t, "sec", SIZE, PairState.INITIAL_COPY)
    try:
        yield Env(tmp, vm, qsd, sec, store, peer)
    finally:
        vm.stop()
        await daemon.stop()
        await sec_daemon.stop()


def image_bitmaps(path: str) -> list[tuple[str, list[str]]]:
    info = json.loads(procs.run(["qemu-img", "info", "-U", "--output=json", path]))
    return [(b["name"], b["flags"]) for b in info["format-specific"]["data"].get("bitmaps", [])]


def same_bytes(a: str, b: str) -> bool:
    try:
        procs.run(["qemu-img", "compare", "-U", a, b])
    except RuntimeError:
        return False
    return True


async def write(env: Env, qmp: QmpTransport, pattern: int, extents: list[tuple[int, int, int]]) -> None:
    """Guest writes, then a flush of every disk (as a guest's fsync): the qcow2 metadata
    reaches the file, so an outside reader (``qemu-img -U``) sees them while QEMU runs."""
    for disk, offset, length in extents:
        await guest_write(qmp, env.vm, disk, offset, length, pattern)  # type: ignore[arg-type]
    for i in range(len(env.vm.disks)):
        reply = await qmp.execute("human-monitor-command",
                                  {"command-line": f'qemu-io -d {env.vm.device_path(i)} "flush"'})
        assert not reply, reply


def test_stop_ships_the_last_writes_start_resumes_and_a_kill_needs_a_full_copy(tmp_path: Path) -> None:
    async def main() -> None:
        async with environment(tmp_path) as env:
            rep = await env.replicator()
            first = await rep.cycle()
            assert (first.seq, first.kind) == (1, "full")
            # Written after marker 1 and never shipped while QEMU ran: 3 + 1 clusters.
            await write(env, rep.qmp, 0x5A, [(0, 1 * MiB, 3 * CLUSTER), (1, 7 * MiB, CLUSTER)])
            await rep.qmp.close()
            env.vm.stop()   # orderly: QEMU stores vs-g1 in each image
            assert all(image_bitmaps(d.path) == [("vs-g1", ["auto"])] for d in env.vm.disks)

            result = await ship_at_stop(rep, env.qsd)
            assert result.outcome is Outcome.SHIPPED, result
            assert result.stats is not None and result.stats.seq == 2
            assert result.stats.bytes == {"vda": 3 * CLUSTER, "vdb": CLUSTER}
            markers = env.sec.info(UUID)["markers"]
            assert [(m["seq"], m["label"]) for m in markers] == [(1, ""), (2, "at stop")]
            for i, disk in enumerate(env.vm.disks):
                assert same_bytes(disk.path, env.replica(f"vd{chr(97 + i)}")), f"disk {i} differs at marker 2"
            # Closed: the next generation is stored for QEMU, nothing of ours is left open.
            assert all(image_bitmaps(d.path) == [("vs-g2", ["auto"])] for d in env.vm.disks)
            assert not [n.node_name for n in await nodes.query_nodes(env.qsd) if n.node_name.startswith("vs-o")]
            # Again (an agent restarted while the domain is stopped): no write, no marker.
            assert (await ship_at_stop(rep, env.qsd)).outcome is Outcome.NOTHING
            assert len(env.sec.info(UUID)["markers"]) == 2

            # Start: QEMU loads vs-g2, the next cycle is an increment of exactly the new writes.
            env.vm.start()
            rep = await env.replicator()
            assert await rep.full_copy_disks(2) == set()
            assert await drop_inconsistent(rep) == []
            await write(env, rep.qmp, 0x6B, [(0, 9 * MiB, 2 * CLUSTER)])
            inc = await rep.cycle()
            assert (inc.seq, inc.kind, inc.bytes) == (3, "incremental", {"vda": 2 * CLUSTER, "vdb": 0})
            for i, disk in enumerate(env.vm.disks):
                assert same_bytes(disk.path, env.replica(f"vd{chr(97 + i)}"))

            # An orderly stop with nothing written: no marker, vs-g3 stored.
            await rep.qmp.close()
            env.vm.stop()
            assert (await ship_at_stop(rep, env.qsd)).outcome is Outcome.NOTHING

            # Killed right after a start: the loaded vs-g3 stays flagged in-use in the images.
            env.vm.start()
            rep = await env.replicator()
            await write(env, rep.qmp, 0x7C, [(1, 3 * MiB, 4 * CLUSTER)])
            await rep.qmp.close()
            env.vm.kill()
            assert all(image_bitmaps(d.path) == [("vs-g3", ["in-use", "auto"])] for d in env.vm.disks)
            crashed = await ship_at_stop(rep, env.qsd)
            assert crashed.outcome is Outcome.CRASHED and "vda (vs-g3 in use)" in crashed.reason, crashed
            assert len(env.sec.info(UUID)["markers"]) == 3
            assert not same_bytes(env.vm.disks[1].path, env.replica("vdb")), "the unshipped write is missing"
            # Next start: QEMU loads them inconsistent; removed, both disks copied in full.
            env.vm.start()
            rep = await env.replicator()
            assert await drop_inconsistent(rep) == ["vda", "vdb"]
            resync = await rep.cycle()
            assert (resync.seq, resync.bytes) == (4, {"vda": SIZE, "vdb": SIZE})
            for i, disk in enumerate(env.vm.disks):
                assert same_bytes(disk.path, env.replica(f"vd{chr(97 + i)}"))

            # Killed after a marker: vs-g3 was removed from the images, vs-g4 never stored.
            await write(env, rep.qmp, 0x7D, [(0, 5 * MiB, CLUSTER)])
            await rep.qmp.close()
            env.vm.kill()
            assert all(image_bitmaps(d.path) == [] for d in env.vm.disks)
            crashed = await ship_at_stop(rep, env.qsd)
            assert crashed.outcome is Outcome.CRASHED and "vda (vs-g4 not stored)" in crashed.reason, crashed
            env.vm.start()
            rep = await env.replicator()
            assert await drop_inconsistent(rep) == []
            assert await rep.full_copy_disks(4) == {"vda", "vdb"}
            resync = await rep.cycle()
            assert (resync.seq, resync.bytes) == (5, {"vda": SIZE, "vdb": SIZE})
            for i, disk in enumerate(env.vm.disks):
                assert same_bytes(disk.path, env.replica(f"vd{chr(97 + i)}"))
            await rep.qmp.close()

    asyncio.run(main())


def test_a_start_aborts_the_ship_and_keeps_every_bit(tmp_path: Path) -> None:
    async def main() -> None:
        async with environment(tmp_path) as env:
            rep = await env.replicator(speed_limit=1 * MiB)   # the ship takes seconds
            await rep.cycle()
            await write(env, rep.qmp, 0x3D, [(0, 0, 4 * MiB), (1, 8 * MiB, 4 * MiB)])
            await rep.qmp.close()
            env.vm.stop()

            ships = OfflineShips()
            running = asyncio.create_task(ships.run(UUID, ship_at_stop(rep, env.qsd)))

            async def shipping() -> None:
                while not [j for j in await nodes.query_jobs(env.qsd) if j.job_id.startswith("vs-cyc2-")]:
                    await asyncio.sleep(0.05)

            await asyncio.wait_for(shipping(), 30)
            assert await ships.abort(UUID)   # libvirt's prepare hook: the start comes first
            result = await running
            assert result.outcome is Outcome.ABORTED
            # The images are closed: QEMU starts on them, and all the bits are there.
            env.vm.start()
            assert len(env.sec.info(UUID)["markers"]) == 1
            rep = await env.replicator()
            ships.starting(UUID, False)
            again = await rep.cycle()
            assert (again.seq, again.kind, again.bytes) == (2, "incremental", {"vda": 4 * MiB, "vdb": 4 * MiB})
            for i, disk in enumerate(env.vm.disks):
                assert same_bytes(disk.path, env.replica(f"vd{chr(97 + i)}"))
            # While a start is prepared, no ship opens the images.
            await rep.qmp.close()
            env.vm.stop()
            ships.starting(UUID)
            assert (await ships.run(UUID, ship_at_stop(rep, env.qsd))).outcome is Outcome.BUSY

    asyncio.run(main())

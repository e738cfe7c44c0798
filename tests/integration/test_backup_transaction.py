"""A consistent cut across two disks, then an increment into a journal overlay.

Proof by bytes: the target chain (base + overlay) must equal the source as it
was at the transaction instant, while the guest kept writing after the cut.
"""

from __future__ import annotations

import asyncio
import os

import pytest

from qemu_blockdev import JobTracker, bitmaps, commands, nodes
from tests.integration.conftest import NEEDS_QEMU, make_image
from tests.lab import procs
from tests.lab.qemu_vm import guest_write
from tests.lab.qsd import serve_image, unserve_image

pytestmark = [pytest.mark.qemu, NEEDS_QEMU]
MiB = 1 << 20


def snapshot_disks(vm, dest_dir: str, tag: str) -> list[str]:  # type: ignore[no-untyped-def]
    """Copy each source disk as it is now (the VM must be paused: pausing
    drains and flushes its I/O)."""
    out = []
    for i, disk in enumerate(vm.disks):
        path = os.path.join(dest_dir, f"ref-{tag}-{i}.raw")
        procs.run(["qemu-img", "convert", "-U", "-f", disk.fmt, "-O", "raw", disk.path, path])
        out.append(path)
    return out


def compare(a: str, b: str) -> None:
    res = procs.run(["qemu-img", "compare", "-f", "raw", "-F", "qcow2", a, b])
    assert "Images are identical" in res


def test_two_disk_cut_full_then_incremental(tmp_path, vm_factory, target) -> None:  # type: ignore[no-untyped-def]
    vm = vm_factory(n_disks=2, size="64M")
    bases = [make_image(str(tmp_path / f"replica{i}.qcow2"), "64M") for i in range(2)]
    overlays = [make_image(str(tmp_path / f"seg1-{i}.qcow2"), "64M", backing=bases[i]) for i in range(2)]
    port = procs.free_port()

    async def main() -> None:
        src = await vm.connect()
        dst = await target.connect()
        try:
            await nodes.nbd_server_start(dst, host="127.0.0.1", port=port)
            # Data present before protection starts.
            await guest_write(src, vm, 0, 0, 4 * MiB, 0x11)
            await guest_write(src, vm, 1, 8 * MiB, 4 * MiB, 0x22)

            # Cycle 0: one transaction adds both persistent bitmaps and starts
            # both full copies at one instant (ungrouped: QEMU cannot group
            # bitmap actions; any failed job fails the cut).
            for i in range(2):
                await serve_image(dst, f"vs-base{i}", bases[i], "qcow2", f"base{i}")
                await nodes.blockdev_add(src, commands.nbd_node(f"vs-nbd{i}", f"base{i}", host="127.0.0.1", port=port))
            actions = []
            for i in range(2):
                actions.append(commands.action("block-dirty-bitmap-add", commands.bitmap_add_args(vm.node(i), "vs-dirty")))
                actions.append(commands.action("blockdev-backup", commands.backup_args(f"vs-full{i}", vm.node(i), f"vs-nbd{i}")))
            with JobTracker(src, ["vs-full0", "vs-full1"]) as jobs:
                await nodes.transaction(src, actions, grouped=False)
                # Writes after the cut must not reach the full copy.
                await guest_write(src, vm, 0, 2 * MiB, 1 * MiB, 0x33)
                await jobs.wait_all_concluded(timeout=60)
            for i in range(2):
                await nodes.blockdev_del(src, f"vs-nbd{i}")
                await unserve_image(dst, f"vs-base{i}", f"base{i}")
            assert (await bitmaps.info(src, vm.node(0), "vs-dirty")).count == 1 * MiB

            # Writes between the cuts, on both disks.
            await guest_write(src, vm, 0, 20 * MiB, 512 * 1024, 0x44)
            await guest_write(src, vm, 1, 40 * MiB, 64 * 1024, 0x55)

            # Cycle 1: pause, record the reference, cut, resume and keep writing.
            await src.execute("stop")
            with JobTracker(src, ["vs-inc0", "vs-inc1"]) as jobs:
                for i in range(2):
                    await serve_image(dst, f"vs-seg{i}", overlays[i], "qcow2", f"seg{i}")
                    await nodes.blockdev_add(src, commands.nbd_node(f"vs-nbd{i}", f"seg{i}", host="127.0.0.1", port=port))
                refs = snapshot_disks(vm, str(tmp_path), "cut1")
                dirty = [(await bitmaps.info(src, vm.node(i), "vs-dirty")).count for i in range(2)]
                await nodes.transaction(src, [
                    commands.action("blockdev-backup", commands.backup_args(
                        f"vs-inc{i}", vm.node(i), f"vs-nbd{i}", sync="incremental", bitmap="vs-dirty"))
                    for i in range(2)
                ])
                await src.execute("cont")
                await guest_write(src, vm, 0, 20 * MiB, 512 * 1024, 0x66)  # overwrites pushed data
                await guest_write(src, vm, 1, 0, 1 * MiB, 0x77)
                await jobs.wait_all_concluded(timeout=60)
            for i in range(2):
                await nodes.blockdev_del(src, f"vs-nbd{i}")
                await unserve_image(dst, f"vs-seg{i}", f"seg{i}")
            # Dirty since cut 0: the write during the full copy plus the ones
            # between the cuts; only these are sent.
            assert dirty == [1 * MiB + 512 * 1024, 64 * 1024]
            # New writes after the cut are tracked for the next cycle.
            assert (await bitmaps.info(src, vm.node(1), "vs-dirty")).count == 1 * MiB
        finally:
            await src.close()
            await dst.close()

        for i in range(2):
            compare(refs[i], overlays[i])
            allocated = _allocated_bytes(overlays[i])
            assert allocated == dirty[i], f"overlay {i} holds {allocated} bytes, dirty was {dirty[i]}"

    asyncio.run(main())


def _allocated_bytes(path: str) -> int:
    """Bytes stored in this overlay itself (not its backing)."""
    import json

    extents = json.loads(procs.run(["qemu-img", "map", "--output=json", path]))
    return sum(e["length"] for e in extents if e["data"] and e["depth"] == 0)

"""What happens when things break: a target dying mid-job, QEMU killed with
persistent bitmaps, and bad input; each ends in a typed error, never a hang."""

from __future__ import annotations

import asyncio
import time

import pytest

from qemu_blockdev import (
    BitmapError,
    JobFailedError,
    JobTracker,
    QmpCommandError,
    bitmaps,
    commands,
    nodes,
)
from tests.integration.conftest import NEEDS_QEMU, make_image
from tests.lab import procs
from tests.lab.qemu_vm import guest_write
from tests.lab.qsd import serve_image

pytestmark = [pytest.mark.qemu, NEEDS_QEMU]
MiB = 1 << 20


def test_target_killed_mid_job_fails_typed_and_keeps_bits(tmp_path, vm_factory, target) -> None:  # type: ignore[no-untyped-def]
    vm = vm_factory(n_disks=1, size="64M")
    replica = make_image(str(tmp_path / "replica.raw"), "64M", fmt="raw")
    port = procs.free_port()

    async def main() -> None:
        src = await vm.connect()
        dst = await target.connect()
        try:
            await bitmaps.add(src, vm.node(0), "vs-dirty")
            for k in range(6):
                await guest_write(src, vm, 0, k * 10 * MiB, 4 * MiB, 0x30 + k)
            dirty_before = await bitmaps.dirty_bytes(src, vm.node(0), "vs-dirty")
            assert dirty_before == 24 * MiB
            await nodes.nbd_server_start(dst, host="127.0.0.1", port=port)
            await serve_image(dst, "vs-replica", replica, "raw", "replica")
            await nodes.blockdev_add(src, commands.nbd_node("vs-nbd0", "replica", host="127.0.0.1", port=port))
            with JobTracker(src, ["vs-inc0"]) as jobs:
                await src.execute("blockdev-backup", commands.backup_args(
                    "vs-inc0", vm.node(0), "vs-nbd0", sync="incremental", bitmap="vs-dirty", speed=2 * MiB))
                await asyncio.sleep(0.5)
                target.kill()
                started = time.monotonic()
                with pytest.raises(JobFailedError) as err:
                    await jobs.job("vs-inc0").wait_concluded(timeout=30)
                assert time.monotonic() - started < 15
            assert err.value.job_id == "vs-inc0"
            assert err.value.error  # QEMU's own message is carried
            # The failed increment merged its bits back: nothing is lost.
            assert await bitmaps.dirty_bytes(src, vm.node(0), "vs-dirty") == dirty_before
            assert await nodes.query_jobs(src) == []  # dismissed
        finally:
            await src.close()
            await dst.close()

    asyncio.run(main())


def test_persistent_bitmap_survives_clean_restart_not_sigkill(tmp_path, vm_factory) -> None:  # type: ignore[no-untyped-def]
    vm = vm_factory(n_disks=1, size="64M")

    async def setup_bitmap() -> int:
        src = await vm.connect()
        try:
            await bitmaps.add(src, vm.node(0), "vs-dirty", persistent=True)
            await guest_write(src, vm, 0, 5 * MiB, 3 * MiB, 0x42)
            return await bitmaps.dirty_bytes(src, vm.node(0), "vs-dirty")
        finally:
            await src.close()

    async def read_bitmap():  # type: ignore[no-untyped-def]
        src = await vm.connect()
        try:
            return await bitmaps.info(src, vm.node(0), "vs-dirty")
        finally:
            await src.close()

    count = asyncio.run(setup_bitmap())
    assert count == 3 * MiB
    vm.stop()  # SIGTERM: QEMU stores persistent bitmaps on a clean exit
    vm.start()
    info = asyncio.run(read_bitmap())
    assert (info.count, info.persistent, info.inconsistent) == (3 * MiB, True, False)

    vm.kill()  # SIGKILL: the bitmap was in use and never stored
    vm.start()
    info = asyncio.run(read_bitmap())
    assert info.inconsistent

    async def refuse() -> None:
        src = await vm.connect()
        try:
            with pytest.raises(BitmapError, match="inconsistent"):
                await bitmaps.require_usable(src, vm.node(0), "vs-dirty")
        finally:
            await src.close()

    asyncio.run(refuse())


def test_bad_input_gives_typed_errors(vm_factory) -> None:  # type: ignore[no-untyped-def]
    vm = vm_factory(n_disks=1, size="16M")

    async def main() -> None:
        src = await vm.connect()
        try:
            with pytest.raises(QmpCommandError) as err:
                await bitmaps.add(src, "no-such-node", "vs-dirty")
            assert err.value.command == "block-dirty-bitmap-add"
            assert "no-such-node" in err.value.desc
            with pytest.raises(QmpCommandError, match="vs-no-such-job"):
                await src.execute("job-dismiss", commands.job_id_args("vs-no-such-job"))
            with pytest.raises(BitmapError, match="no dirty bitmap"):
                await bitmaps.info(src, vm.node(0), "vs-absent")
            with pytest.raises(ValueError, match="refusing to manage"):
                await bitmaps.remove(src, vm.node(0), "foreign-bitmap")
        finally:
            await src.close()

    asyncio.run(main())

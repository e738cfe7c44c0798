"""blockdev-mirror to an NBD export on qemu-storage-daemon, with the guest
writing during the job: after cancel-at-READY the target must equal the source
byte for byte."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from qemu_blockdev import JobTracker, commands, nodes
from tests.integration.conftest import NEEDS_QEMU, make_image
from tests.lab import procs
from tests.lab.qemu_vm import guest_write
from tests.lab.qsd import serve_image, unserve_image

pytestmark = [pytest.mark.qemu, NEEDS_QEMU]
MiB = 1 << 20


async def keep_writing(src, vm, counter: list[int]) -> None:  # type: ignore[no-untyped-def]
    """Guest-like writes all over the disk until cancelled."""
    i = 0
    while True:
        offset = ((i * 2654435761) % 60) * MiB + (i % 16) * 64 * 1024
        await guest_write(src, vm, 0, offset, 64 * 1024, (i % 250) + 1)
        counter[0] += 1
        i += 1
        await asyncio.sleep(0.005)


@pytest.mark.parametrize("mode", ["background", "write-blocking"])
def test_mirror_cancel_at_ready_is_identical(tmp_path, vm_factory, target, mode: str) -> None:  # type: ignore[no-untyped-def]
    vm = vm_factory(n_disks=1, size="64M")
    replica = make_image(str(tmp_path / "replica.raw"), "64M", fmt="raw")
    port = procs.free_port()

    async def main() -> tuple[int, int]:
        src = await vm.connect()
        dst = await target.connect()
        writes = [0]
        try:
            for k in range(8):  # data to copy before the job starts
                await guest_write(src, vm, 0, k * 8 * MiB, 2 * MiB, 0xA0 + k)
            await nodes.nbd_server_start(dst, host="127.0.0.1", port=port)
            await serve_image(dst, "vs-replica", replica, "raw", "replica")
            await nodes.blockdev_add(src, commands.nbd_node("vs-nbd0", "replica", host="127.0.0.1", port=port))
            writer = asyncio.create_task(keep_writing(src, vm, writes))
            with JobTracker(src, ["vs-mirror0"]) as jobs:
                job = jobs.job("vs-mirror0")
                # Throttled at first so that the writer really runs during the copy.
                await src.execute("blockdev-mirror", commands.mirror_args(
                    "vs-mirror0", vm.node(0), "vs-nbd0", mode=mode, speed=8 * MiB, buf_size=8 * MiB))
                await asyncio.sleep(0.5)
                writes_during_copy = writes[0]
                await job.set_speed(0)
                await job.wait_ready(timeout=60)
                await asyncio.sleep(0.3)  # writes while READY are mirrored too
                writer.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await writer
                await src.execute("stop")  # drains and flushes the guest's I/O
                await job.cancel()
                await job.wait_concluded(timeout=30)
            await nodes.blockdev_del(src, "vs-nbd0")
            await unserve_image(dst, "vs-replica", "replica")
            return writes_during_copy, writes[0]
        finally:
            writer.cancel()
            await src.close()
            await dst.close()

    during, total = asyncio.run(main())
    assert during > 0, "the guest did not write while the copy ran"
    assert total > during
    out = procs.run(["qemu-img", "compare", "-U", "-f", "qcow2", "-F", "raw", vm.disks[0].path, replica])
    assert "Images are identical" in out

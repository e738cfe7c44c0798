"""The lab's writing Linux guest boots, writes, stops, and its oracle can tell.

Every later replication test trusts this pair: the guest must leave exactly the
prefix the oracle predicts, and the checker must flag a disk that differs.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.lab import guest
from tests.lab.stamps import BLOCK_SIZE, GARBLED, Mismatch, Oracle, check_images, stamp_block, target

pytestmark = [
    pytest.mark.qemu,
    pytest.mark.guest,
    pytest.mark.skipif(
        not guest.qemu_available(),
        reason="qemu-system-x86_64 and qemu-img are required (apt install qemu-system-x86 qemu-utils)",
    ),
]

DISKS = 2
BLOCKS = 4096
COUNT = 600


@dataclass(frozen=True)
class Run:
    """One finished guest run: its disk images, console log and timings."""

    images: list[str]
    log: Path
    boot_s: float
    write_s: float


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    """Boot the writer once on two 64 MiB qcow2 disks and let it write COUNT blocks."""
    images = guest.build_guest()
    work = tmp_path_factory.mktemp("guest-writer")
    paths = []
    for i in range(DISKS):
        path = work / f"disk{i}.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), "64M"], check=True)
        paths.append(str(path))
    log = work / "console.log"
    spec = guest.GuestSpec(
        kernel=str(images.kernel),
        initrd=str(images.initrd),
        disks=[guest.Disk(p, "qcow2") for p in paths],
        blocks=BLOCKS,
        count=COUNT,
        serial_log=str(log),
        qmp_socket=str(work / "qmp.sock"),
    )
    t0 = time.monotonic()
    proc = guest.launch(spec, stdout_path=str(work / "qemu.out"))
    try:
        guest.wait_for_console(log, "VS-READY", timeout=60, proc=proc)
        t_ready = time.monotonic()
        guest.wait_for_console(log, rf"VS-DONE seq={COUNT}\b", timeout=90, proc=proc)
        t_done = time.monotonic()
        # poweroff -f ends QEMU (-no-reboot); the images are consistent only then.
        proc.wait(timeout=30)
    finally:
        guest.stop(proc)
    yield Run(paths, log, t_ready - t0, t_done - t_ready)


def test_guest_writes_exact_prefix(finished_run: Run) -> None:
    oracle = Oracle(DISKS, BLOCKS)
    result = check_images(finished_run.images, oracle)
    rate = COUNT / finished_run.write_s
    print(f"boot to VS-READY {finished_run.boot_s:.1f}s, {rate:.0f} writes/s")
    assert result.cut_seq == COUNT, result.summary()
    assert result.mismatches == [], result.summary()
    assert result.blocks_verified == DISKS * (64 << 20) // BLOCK_SIZE
    assert guest.last_progress(finished_run.log) == COUNT


def test_checker_catches_stale_and_torn_block(finished_run: Run, tmp_path: Path) -> None:
    oracle = Oracle(DISKS, BLOCKS)
    expected = oracle.expected(COUNT)
    # Pick a disk-1 block written twice, whose last write is not the newest overall.
    seen: dict[int, int] = {}
    stale: tuple[int, int] | None = None
    for seq in range(1, COUNT + 1):
        disk, block = target(seq, DISKS, BLOCKS)
        if disk == 1 and block in seen and expected[1][block] != COUNT:
            stale = (block, seen[block])
        if disk == 1:
            seen.setdefault(block, seq)
    assert stale is not None, "600 writes over 2x4096 blocks always repeat a block"
    block, old_seq = stale

    copy = tmp_path / "disk1.raw"
    subprocess.run(
        ["qemu-img", "convert", "-f", "qcow2", "-O", "raw", finished_run.images[1], str(copy)],
        check=True,
    )
    with open(copy, "r+b") as f:
        f.seek(block * BLOCK_SIZE)
        f.write(stamp_block(1, block, old_seq))
    paths = [finished_run.images[0], str(copy)]

    result = check_images(paths, oracle)
    assert result.cut_seq == COUNT
    assert result.mismatches == [Mismatch(1, block, expected[1][block], old_seq, "older than expected")]

    # A torn write (first half new, rest zero) in another written block is flagged too.
    torn = next(b for b in sorted(expected[1]) if b != block)
    with open(copy, "r+b") as f:
        f.seek(torn * BLOCK_SIZE)
        f.write(stamp_block(1, torn, expected[1][torn])[:2048] + bytes(2048))
    result = check_images(paths, oracle)
    assert [(m.disk, m.block, m.found) for m in result.mismatches] == sorted(
        [(1, block, old_seq), (1, torn, GARBLED)], key=lambda t: t[1]
    ), result.summary()


def test_build_is_cached() -> None:
    # Every later test calls build_guest(); a warm cache must cost nothing.
    guest.build_guest()
    t0 = time.monotonic()
    guest.build_guest()
    assert time.monotonic() - t0 < 1.0

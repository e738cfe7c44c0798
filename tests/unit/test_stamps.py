"""Unit tests of the guest-writer oracle (tests/lab/stamps.py), no QEMU needed.

The shell side is pinned by sourcing the guest's init.sh under busybox (when it is
installed) and comparing mix() and whole blocks byte for byte.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from tests.lab import guest
from tests.lab.stamps import (
    BLOCK_SIZE,
    GARBLED,
    LINE_SIZE,
    Mismatch,
    Oracle,
    Stamp,
    StampError,
    check_images,
    check_images_at,
    mix,
    parse_block,
    stamp_block,
    target,
)

INIT_SH = Path(__file__).resolve().parents[1] / "lab" / "guest" / "init.sh"
BUSYBOX = shutil.which("busybox")
needs_busybox = pytest.mark.skipif(BUSYBOX is None, reason="busybox not installed")

# splitmix64 finalizer masked to 63 bits. mix(0) is the published first output of
# splitmix64 seeded with 0 (0xE220A8397B1DCDAF) without its top bit.
PINNED_MIX = {
    0: 0xE220A8397B1DCDAF & ((1 << 63) - 1),
    1: 1227844342346046657,
    2: 1682153688901572302,
    6: 4423843088329334784,
}


def _sh(script: str) -> str:
    """Run ``script`` in busybox ash with init.sh's functions loaded."""
    assert BUSYBOX is not None
    proc = subprocess.run(
        [BUSYBOX, "sh", "-c", f". {INIT_SH}; {script}"],
        env={"VS_SOURCE_ONLY": "1", "PATH": os.environ.get("PATH", "/usr/bin:/bin")},
        capture_output=True,
        text=True,
        check=True,
    )
    return proc.stdout


def _image(blocks: dict[int, bytes], nblocks: int) -> bytearray:
    img = bytearray(nblocks * BLOCK_SIZE)
    for b, data in blocks.items():
        img[b * BLOCK_SIZE : (b + 1) * BLOCK_SIZE] = data
    return img


def _write_images(tmp_path: Path, oracle: Oracle, upto: int, nblocks: int) -> list[str]:
    """Raw images holding exactly what the writes start..upto leave behind."""
    paths = []
    for disk, exp in enumerate(oracle.expected(upto)):
        img = _image({b: stamp_block(disk, b, s) for b, s in exp.items()}, nblocks)
        path = tmp_path / f"d{disk}.raw"
        path.write_bytes(img)
        paths.append(str(path))
    return paths


def test_mix_pinned_values() -> None:
    for seq, value in PINNED_MIX.items():
        assert mix(seq) == value
    assert all(0 <= mix(s) < 1 << 63 for s in (0, 1, 2**40, 2**63 - 1, 2**64 - 1))


@needs_busybox
def test_mix_matches_busybox_ash() -> None:
    seqs = [0, 1, 2, 3, 6, 100, 4095, 65536, 10**9, 10**12 - 1, 2**62 + 12345]
    script = "; ".join(f"vs_mix {s}; echo $VS_MIX" for s in seqs)
    assert [int(x) for x in _sh(script).split()] == [mix(s) for s in seqs]


@needs_busybox
def test_block_matches_busybox_shell(tmp_path: Path) -> None:
    cases = [(0, 0, 1), (1, 4095, 600), (3, 12345678, 999999999999), (25, 7, 2**31 + 5)]
    for i, (d, b, s) in enumerate(cases):
        out = tmp_path / f"blk{i}"
        _sh(f'vs_make_block {d} {b} {s}; printf %s "$VS_BLOCK" > {out}')
        assert out.read_bytes() == stamp_block(d, b, s), (d, b, s)


@needs_busybox
def test_guest_write_path_lands_whole_block(tmp_path: Path) -> None:
    # vs_write feeds dd through a here-document: exactly 4096 bytes at block*4096.
    disk = tmp_path / "disk.raw"
    disk.write_bytes(bytes(8 * BLOCK_SIZE))
    _sh(f"VS_DD_OPTS=conv=notrunc; vs_make_block 1 5 77; vs_write {disk} 5; vs_make_block 1 2 78; vs_write {disk} 2")
    data = disk.read_bytes()
    assert len(data) == 8 * BLOCK_SIZE
    assert parse_block(data[5 * BLOCK_SIZE : 6 * BLOCK_SIZE]) == Stamp(1, 5, 77)
    assert parse_block(data[2 * BLOCK_SIZE : 3 * BLOCK_SIZE]) == Stamp(1, 2, 78)
    assert data.count(b"\n") == 2 * BLOCK_SIZE // LINE_SIZE


def test_stamp_round_trip() -> None:
    data = stamp_block(1, 4095, 600)
    assert len(data) == BLOCK_SIZE
    assert data[:LINE_SIZE].endswith(b"\n") and data.count(b"\n") == BLOCK_SIZE // LINE_SIZE
    assert parse_block(data) == Stamp(1, 4095, 600)
    assert parse_block(memoryview(data)) == Stamp(1, 4095, 600)
    assert parse_block(bytes(BLOCK_SIZE)) is None


def test_torn_and_garbled_blocks_raise() -> None:
    new, old = stamp_block(0, 5, 700), stamp_block(0, 5, 12)
    with pytest.raises(StampError, match="torn"):
        parse_block(new[:2048] + old[2048:])
    with pytest.raises(StampError, match="torn"):
        parse_block(new[:512] + bytes(BLOCK_SIZE - 512))
    with pytest.raises(StampError, match="garbled"):
        parse_block(bytes(512) + new[512:])
    # A digit changed in every line: format intact, checksum wrong.
    forged = new.replace(b"s=000000000700", b"s=000000000701")
    assert forged != new
    with pytest.raises(StampError, match="checksum"):
        parse_block(forged)
    with pytest.raises(StampError):
        parse_block(new[:100])


def test_target_spreads_both_parities() -> None:
    # Writes alternate disks; a mixed address must still hit odd and even blocks.
    hits = [target(s, 2, 4096) for s in range(1, 2001)]
    for disk in (0, 1):
        blocks = {b for d, b in hits if d == disk}
        assert {b % 2 for b in blocks} == {0, 1}
        assert len(blocks) > 800


def test_oracle_prefix_semantics() -> None:
    oracle = Oracle(2, 16, start=5)
    exp = oracle.expected(4)
    assert exp == [{}, {}]
    full = oracle.expected(200)
    # Every write up to 200 lands where target() says; the last one wins.
    manual: list[dict[int, int]] = [{}, {}]
    for s in range(5, 201):
        d, b = target(s, 2, 16)
        manual[d][b] = s
    assert full == manual
    # Asking for an earlier prefix after a later one recomputes correctly.
    assert oracle.expected(50) == Oracle(2, 16, start=5).expected(50)
    assert oracle.expected(200) == manual


def test_check_images_finds_cut_and_passes(tmp_path: Path) -> None:
    oracle = Oracle(2, 64)
    paths = _write_images(tmp_path, oracle, 150, nblocks=80)
    result = check_images(paths, oracle)
    assert result.ok, result.summary()
    assert result.cut_seq == 150
    assert result.blocks_verified == 2 * 80
    assert check_images_at(paths, oracle, 150).ok


def test_check_images_at_other_seq_fails(tmp_path: Path) -> None:
    oracle = Oracle(2, 64)
    paths = _write_images(tmp_path, oracle, 150, nblocks=64)
    result = check_images_at(paths, oracle, 140)
    assert not result.ok
    # Each of writes 141..150 shows up as "newer than the cut" or "written after".
    assert {m.found for m in result.mismatches} <= set(range(141, 151))
    assert all(m.found is not None and m.found > 140 for m in result.mismatches)


def test_check_images_reports_each_kind_of_damage(tmp_path: Path) -> None:
    oracle = Oracle(2, 64)
    paths = _write_images(tmp_path, oracle, 300, nblocks=72)
    exp = oracle.expected(300)
    img0 = bytearray(Path(paths[0]).read_bytes())

    # A block whose last write is not the newest overall: put an older stamp there.
    older_of: dict[int, int] = {}
    for s in range(1, 300):
        d, b = target(s, 2, 64)
        if d == 0 and exp[0][b] != s and exp[0][b] != 300:
            older_of[b] = s
    stale_block, stale_seq = sorted(older_of.items())[0]
    img0[stale_block * BLOCK_SIZE : (stale_block + 1) * BLOCK_SIZE] = stamp_block(0, stale_block, stale_seq)

    # A torn block, a zeroed block, a stamp from another block, data past vs.blocks.
    others = [b for b in sorted(exp[0]) if b != stale_block]
    torn_b, zero_b, moved_b = others[:3]
    new = stamp_block(0, torn_b, exp[0][torn_b])
    img0[torn_b * BLOCK_SIZE : (torn_b + 1) * BLOCK_SIZE] = new[:1024] + bytes(3072)
    img0[zero_b * BLOCK_SIZE : (zero_b + 1) * BLOCK_SIZE] = bytes(BLOCK_SIZE)
    img0[moved_b * BLOCK_SIZE : (moved_b + 1) * BLOCK_SIZE] = stamp_block(0, zero_b, exp[0][zero_b])
    img0[70 * BLOCK_SIZE + 9] = 1
    Path(paths[0]).write_bytes(img0)

    result = check_images(paths, oracle)
    assert result.cut_seq == 300
    by_block = {(m.disk, m.block): m for m in result.mismatches}
    assert set(by_block) == {(0, stale_block), (0, torn_b), (0, zero_b), (0, moved_b), (0, 70)}, result.summary()
    assert by_block[(0, stale_block)] == Mismatch(0, stale_block, exp[0][stale_block], stale_seq, "older than expected")
    assert by_block[(0, torn_b)].found == GARBLED and "torn" in by_block[(0, torn_b)].reason
    assert by_block[(0, zero_b)].found is None and by_block[(0, zero_b)].expected == exp[0][zero_b]
    assert "misplaced" in by_block[(0, moved_b)].reason
    assert by_block[(0, 70)].expected is None and by_block[(0, 70)].found == GARBLED


def test_check_all_zero_images(tmp_path: Path) -> None:
    oracle = Oracle(1, 8, start=10)
    path = tmp_path / "z.raw"
    path.write_bytes(bytes(8 * BLOCK_SIZE))
    result = check_images([str(path)], oracle)
    assert result.ok and result.cut_seq == 9 and result.max_seq_per_disk == [None]


def test_check_is_fast_for_two_full_disks(tmp_path: Path) -> None:
    # 2 disks x 16384 blocks, every block written: the checker must stay quick.
    oracle = Oracle(2, 16384)
    paths = _write_images(tmp_path, oracle, 60000, nblocks=16384)
    t0 = time.monotonic()
    result = check_images(paths, oracle)
    elapsed = time.monotonic() - t0
    assert result.ok and result.cut_seq == 60000, result.summary()
    assert elapsed < 5.0, f"check took {elapsed:.2f}s"


def test_qemu_argv_and_domain_xml() -> None:
    spec = guest.GuestSpec(
        kernel="/k",
        initrd="/i",
        disks=[guest.Disk("/a,b.qcow2"), guest.Disk("/c.raw", "raw")],
        blocks=4096,
        count=600,
        serial_log="/tmp/log",
        qmp_socket="/tmp/q.sock",
        accel="tcg",
    )
    argv = guest.qemu_argv(spec)
    assert argv[argv.index("-accel") + 1] == "tcg"
    append = argv[argv.index("-append") + 1]
    assert "vs.disks=2" in append and "vs.blocks=4096" in append and "vs.count=600" in append
    assert "driver=file,filename=/a,,b.qcow2,node-name=file0,cache.direct=on" in argv
    assert "driver=raw,file=file1,node-name=disk1" in argv
    assert "virtio-blk-pci,drive=disk1,id=virtio-disk1" in argv
    assert "unix:/tmp/q.sock,server=on,wait=off" in argv
    drive = guest.disk_args(spec.disks, style="drive")
    assert "if=none,id=drive1,file=/c.raw,format=raw,cache=none,aio=threads" in drive

    xml = guest.domain_xml("vs-guest", "/k", "/i", append, spec.disks, serial_log="/tmp/s.log")
    dom = ET.fromstring(xml)
    assert dom.get("type") == "qemu"
    assert dom.find("features/acpi") is not None
    targets = [t.get("dev") for t in dom.findall("devices/disk/target")]
    assert targets == ["vda", "vdb"]
    assert [d.get("cache") for d in dom.findall("devices/disk/driver")] == ["none", "none"]
    assert dom.find("devices/serial/source").get("path") == "/tmp/s.log"  # type: ignore[union-attr]


def test_pick_accel_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VIRTSYNC_LAB_ACCEL", raising=False)
    assert guest.pick_accel() == "tcg"
    monkeypatch.setenv("VIRTSYNC_LAB_ACCEL", "kvm")
    assert guest.pick_accel() == "kvm"


def test_console_helpers(tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    assert guest.last_progress(log) is None
    log.write_bytes(b"[ 1.0] boot\nVS-READY disks=2\nVS-PROGRESS seq=100\nVS-PROGRESS seq=200\n")
    assert guest.last_progress(log) == 200
    m = guest.wait_for_console(log, r"VS-PROGRESS seq=(\d+)", timeout=1)
    assert m[1] == b"100"
    with pytest.raises(TimeoutError):
        guest.wait_for_console(log, "VS-DONE", timeout=0.2)


def test_guest_images_install(tmp_path: Path) -> None:
    src = tmp_path / "cache"
    src.mkdir()
    files = [src / n for n in ("vmlinux", "initramfs.img", "vmlinuz")]
    for f in files:
        f.write_bytes(f.name.encode())
    images = guest.GuestImages(*files)
    placed = images.install(tmp_path / "pub")
    assert placed.kernel == tmp_path / "pub" / "vmlinux"
    assert [p.read_bytes() for p in (placed.kernel, placed.initrd, placed.vmlinuz)] == [
        b"vmlinux",
        b"initramfs.img",
        b"vmlinuz",
    ]
    assert images.install(tmp_path / "pub") == placed  # idempotent

"""Chunk hashes of the replica base: the record format and the checks on real
qcow2 images (``qemu-img`` only: no QEMU process).

The record is corrupted at every byte (header: the whole record is refused
with one line naming the file; an entry: only that chunk loses its hash),
and the image checks are run against flipped bytes in data clusters, in L2
tables and in refcounts.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from plugin.errors import JournalCorruptError
from plugin.replication import integrity
from plugin.replication.integrity import CHUNK, ChunkState, ChunkSums, SumsCorruptError

needs_qemu_img = pytest.mark.skipif(not shutil.which("qemu-img"), reason="needs qemu-img")
MiB = 1 << 20


def sample(count: int = 5) -> ChunkSums:
    sums = ChunkSums.empty(count * CHUNK - 4096, base_seq=7)
    for i in range(count):
        sums.digests[i] = hashlib.sha256(bytes([i])).digest()
        sums.states[i] = ChunkState.GOOD
    sums.states[2] = ChunkState.DAMAGED
    return sums


def test_record_round_trip() -> None:
    sums = sample()
    back = ChunkSums.decode(sums.encode(), "vda.base.sums")
    assert (back.disk_size, back.base_seq, back.chunk_size) == (sums.disk_size, 7, CHUNK)
    assert back.digests == sums.digests and back.states == sums.states and not back.unreadable


def test_chunk_size_keeps_records_small() -> None:
    assert integrity.chunk_size_for(64 << 30) == CHUNK
    assert integrity.chunk_size_for((64 << 30) + 1) == 2 * CHUNK
    assert ChunkSums.empty(1 << 50, 0).count <= integrity.ENTRIES


@pytest.mark.parametrize("offset", range(integrity.HEADER_SIZE))
def test_a_flip_in_the_header_refuses_the_record_in_one_line(offset: int) -> None:
    data = bytearray(sample().encode())
    data[offset] ^= 0x01
    with pytest.raises(SumsCorruptError, match=r"^vda\.base\.sums: ") as info:
        ChunkSums.decode(bytes(data), "vda.base.sums")
    assert "\n" not in str(info.value)


@given(st.integers(min_value=0, max_value=5 * 37 - 1), st.integers(min_value=1, max_value=255))
@settings(max_examples=200, deadline=None)
def test_a_flip_in_an_entry_spoils_that_chunk_only(offset: int, mask: int) -> None:
    sums = sample()
    data = bytearray(sums.encode())
    data[integrity.HEADER_SIZE + offset] ^= mask
    back = ChunkSums.decode(bytes(data), "vda.base.sums")
    entry = offset // 37
    assert back.unreadable == {entry}
    assert back.states[entry] == ChunkState.DAMAGED   # never trusted as good
    others = [i for i in range(sums.count) if i != entry]
    assert [back.digests[i] for i in others] == [sums.digests[i] for i in others]


def test_entries_swapped_are_caught() -> None:
    """Each entry's CRC covers its index: moving an entry does not move its hash."""
    data = bytearray(sample().encode())
    h, e = integrity.HEADER_SIZE, 37
    data[h:h + e], data[h + e:h + 2 * e] = data[h + e:h + 2 * e], data[h:h + e]
    assert ChunkSums.decode(bytes(data), "x").unreadable == {0, 1}


@pytest.mark.parametrize("cut", [0, 10, integrity.HEADER_SIZE, integrity.HEADER_SIZE + 36, -1])
def test_truncated_or_extended_records_are_refused(cut: int) -> None:
    data = sample().encode()
    with pytest.raises(SumsCorruptError, match="truncated"):
        ChunkSums.decode(data[:cut] if cut >= 0 else data + b"\0", "vda.base.sums")


def test_missing_record(tmp_path: Path) -> None:
    with pytest.raises(SumsCorruptError, match=r"^vda\.base\.sums: chunk-hash record is missing$"):
        integrity.load_sums(str(tmp_path / "vda.base.sums"))


def test_save_is_atomic_and_loads_back(tmp_path: Path) -> None:
    path = str(tmp_path / "vda.base.sums")
    integrity.save_sums(path, sample())
    assert integrity.load_sums(path).digests == sample().digests
    assert os.listdir(tmp_path) == ["vda.base.sums"]


# -- on real images ----------------------------------------------------------------


def qemu_img(*argv: str) -> str:
    return subprocess.run(["qemu-img", *argv], check=True, capture_output=True, text=True).stdout


def qemu_io(path: str, *cmds: str) -> None:
    argv = ["qemu-io", "-f", "qcow2"]
    for c in cmds:
        argv += ["-c", c]
    subprocess.run(argv + [path], check=True, capture_output=True)


def host_offset(path: str, guest: int) -> int:
    for e in json.loads(qemu_img("map", "--output=json", path)):
        if e["start"] <= guest < e["start"] + e["length"] and e["data"]:
            return int(e["offset"]) + guest - int(e["start"])
    raise AssertionError(f"guest offset {guest} not allocated")


def flip(path: str, offset: int, mask: int = 0x40) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ mask]))


@pytest.fixture
def base(tmp_path: Path) -> str:
    path = str(tmp_path / "vda.base.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", path, "8M")
    qemu_io(path, "write -P 0x11 0 1M", "write -P 0x22 3M 64k", "write -z 5M 1M")
    integrity.seal_base(path, 1)
    return path


@needs_qemu_img
def test_guest_digests_are_of_the_guest_content(base: str, tmp_path: Path) -> None:
    """The hash of a chunk is the hash of what the guest reads there, wherever
    qcow2 keeps it: a re-laid-out copy has the same chunk hashes."""
    raw = tmp_path / "raw"
    qemu_img("convert", "-O", "raw", base, str(raw))
    content = raw.read_bytes()
    sums = integrity.load_sums(integrity.sums_path(base))
    assert sums.count == 8 and all(s == ChunkState.GOOD for s in sums.states)
    assert sums.digests == [hashlib.sha256(content[i * MiB:(i + 1) * MiB]).digest() for i in range(8)]
    copy = str(tmp_path / "copy.qcow2")
    qemu_img("convert", "-O", "qcow2", "-c", base, copy)   # another layout (not plain data: refused below)
    relaid = str(tmp_path / "relaid.qcow2")
    qemu_img("convert", "-O", "qcow2", copy, relaid)
    assert integrity.hash_base(relaid, 1).digests == sums.digests


@needs_qemu_img
def test_a_flipped_data_byte_names_its_chunk(base: str) -> None:
    sums = integrity.load_sums(integrity.sums_path(base))
    assert integrity.check_base_chunks(base, sums) == []
    flip(base, host_offset(base, 3 * MiB + 100))
    assert integrity.check_base_chunks(base, sums) == [
        (3, "vda.base.qcow2 chunk 3 (guest bytes 3145728..4194304): content does not match its recorded hash")]


@needs_qemu_img
def test_a_flipped_l2_entry_is_caught(base: str) -> None:
    """An L2 entry pointing elsewhere changes what the guest reads (and qemu-img check sees it)."""
    sums = integrity.load_sums(integrity.sums_path(base))
    l2 = l2_table_offset(base)
    flip(base, l2 + 3 * 16 * 8 + 6)    # the entry of guest cluster 48 (3 MiB): host offset moved
    found = integrity.check_metadata(base) or ""
    try:
        bad = [idx for idx, _ in integrity.check_base_chunks(base, sums)]
    except JournalCorruptError as e:
        bad = [str(e)]  # type: ignore[list-item]
    assert "qemu-img check" in found or bad, (found, bad)
    assert found or bad == [3]


def l2_table_offset(path: str) -> int:
    with open(path, "rb") as f:
        head = f.read(48)
        l1_offset = int.from_bytes(head[40:48], "big")
        f.seek(l1_offset)
        return int.from_bytes(f.read(8), "big") & 0x00FF_FFFF_FFFF_FE00


@needs_qemu_img
def test_a_flipped_refcount_is_metadata_damage(base: str) -> None:
    with open(base, "rb") as f:
        head = f.read(64)
    reftable = int.from_bytes(head[48:56], "big")
    with open(base, "rb") as f:
        f.seek(reftable)
        block = int.from_bytes(f.read(8), "big")
    flip(base, block + 1, 0x01)   # refcount of cluster 0 (the header): 1 -> 0, a later fold could reuse it
    assert "qcow2 metadata damaged" in (integrity.check_metadata(base) or "")


@needs_qemu_img
def test_a_refcount_too_high_is_only_a_leak(base: str) -> None:
    """A refcount raised by a flip only wastes a cluster (as a fold cut short
    does): qemu-img check calls it a leak, and it is not damage."""
    with open(base, "rb") as f:
        head = f.read(64)
    with open(base, "rb") as f:
        f.seek(int.from_bytes(head[48:56], "big"))
        block = int.from_bytes(f.read(8), "big")
    flip(base, block + 1, 0x40)
    assert integrity.check_metadata(base) is None


@needs_qemu_img
def test_a_fold_rehashes_only_what_the_segment_touched(base: str, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    seg = str(tmp_path / "vda.seg-00000002.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", "vda.base.qcow2", seg, "8M")
    qemu_io(seg, "write -P 0x33 1M 1M", "write -P 0x44 3M 4k")   # chunk 1 whole, chunk 3 in part
    hashed: list[list[int]] = []
    real = integrity.guest_digests
    monkeypatch.setattr(integrity, "guest_digests",
                        lambda path, chunks, *a, **k: hashed.append(sorted(chunks)) or real(path, chunks, *a, **k))
    assert integrity.prepare_fold(base, seg) == []   # checks chunk 3 (its old bytes stay)
    states = integrity.load_sums(integrity.sums_path(base)).states
    assert [i for i, s in enumerate(states) if s == ChunkState.PENDING] == [1, 3]
    qemu_img("commit", "-q", "-d", "-f", "qcow2", seg)
    integrity.finish_fold(base, 2)
    assert hashed == [[3], [1, 3]]
    sums = integrity.load_sums(integrity.sums_path(base))
    assert sums.base_seq == 2 and integrity.check_base_chunks(base, sums) == []
    assert sums.digests == integrity.hash_base(base, 2).digests


@needs_qemu_img
def test_a_fold_keeps_damage_it_does_not_overwrite_and_heals_what_it_does(base: str, tmp_path: Path) -> None:
    flip(base, host_offset(base, 100))            # chunk 0
    flip(base, host_offset(base, 3 * MiB + 10))   # chunk 3
    seg = str(tmp_path / "vda.seg-00000002.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", "vda.base.qcow2", seg, "8M")
    qemu_io(seg, "write -P 0x55 0 1M", "write -P 0x66 3M 4k")   # chunk 0 whole, chunk 3 in part
    found = integrity.prepare_fold(base, seg)
    assert [line.split(" (")[0] for line in found] == ["vda.base.qcow2 chunk 3"]
    qemu_img("commit", "-q", "-d", "-f", "qcow2", seg)
    integrity.finish_fold(base, 2)
    sums = integrity.load_sums(integrity.sums_path(base))
    assert sums.states[0] == ChunkState.GOOD and sums.states[3] == ChunkState.DAMAGED
    assert [idx for idx, _ in integrity.check_base_chunks(base, sums)] == [3]


@needs_qemu_img
def test_a_view_reads_only_the_base_chunks_no_segment_covers(base: str, tmp_path: Path) -> None:
    seg = str(tmp_path / "vda.seg-00000002.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", "vda.base.qcow2", seg, "8M")
    qemu_io(seg, "write -P 0x77 3M 1M")
    flip(base, host_offset(base, 3 * MiB + 10))
    assert integrity.base_chunks_read(seg, base, CHUNK) == {0, 1, 2, 4, 5, 6, 7}
    assert integrity.check_view(base, seg) == []          # the segment covers the damage
    bad = integrity.check_view(base, base)
    assert len(bad) == 1 and bad[0].startswith("vda.base.qcow2 chunk 3 (guest bytes 3145728..4194304)")
    # found once, recorded: a later check says so even without reading
    assert integrity.load_sums(integrity.sums_path(base)).states[3] == ChunkState.DAMAGED


def test_segment_file_chunks(tmp_path: Path) -> None:
    path = tmp_path / "seg"
    path.write_bytes(os.urandom(2 * MiB + 5))
    digests = integrity.file_chunk_digests(str(path))
    assert len(digests) == 3 and integrity.first_bad_file_chunk(str(path), digests) is None
    flip(str(path), MiB + 7)
    assert integrity.first_bad_file_chunk(str(path), digests) == 1
    with open(path, "ab") as f:
        f.write(b"x")
    assert integrity.first_bad_file_chunk(str(path), digests[:2]) == 1


@needs_qemu_img
def test_which_layer_a_view_reads(base: str, tmp_path: Path) -> None:
    """A damaged segment affects a view only where the view reads from it."""
    s2 = str(tmp_path / "vda.seg-00000002.qcow2")
    s3 = str(tmp_path / "vda.seg-00000003.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", "vda.base.qcow2", s2, "8M")
    qemu_io(s2, "write -P 0x21 2M 64k", "write -P 0x22 6M 4k")
    qemu_img("create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", "vda.seg-00000002.qcow2", s3, "8M")
    assert integrity.segment_chunks(s2, CHUNK) == [2, 6]
    assert integrity.reads_layer(s3, s2) and integrity.reads_layer(s2, s2)
    assert integrity.layer_chunks_read(s3, s2, CHUNK) == set(range(8))
    qemu_io(s3, "write -P 0x31 2M 1M", "write -P 0x32 6M 1M")   # a repair: both chunks again, whole
    assert not integrity.reads_layer(s3, s2) and not integrity.reads_layer(s3, s2, [2, 6], CHUNK)
    # a chunk its record says it held, but its (damaged) tables no longer show: the
    # view would read older bytes there, so it counts as read
    assert integrity.reads_layer(s3, s2, [3], CHUNK)
    assert integrity.layer_chunks_read(s3, s2, CHUNK) & {2, 6} == set()


def test_chunk_ranges_join_and_clip() -> None:
    assert integrity.chunk_ranges([3, 1, 2, 7], CHUNK, 8 * MiB - 512) == [[MiB, 3 * MiB], [7 * MiB, MiB - 512]]
    assert integrity.chunk_ranges([9], CHUNK, 8 * MiB) == []
    many = integrity.chunk_ranges(range(0, 2000, 2), CHUNK, 4000 * MiB)
    assert len(many) == integrity.MAX_REPAIR_RANGES


@needs_qemu_img
def test_folding_a_damaged_segment_marks_what_it_held(base: str, tmp_path: Path) -> None:
    seg = str(tmp_path / "vda.seg-00000002.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", "vda.base.qcow2", seg, "8M")
    qemu_io(seg, "write -P 0x33 1M 1M", "write -P 0x44 6M 4k")
    assert integrity.prepare_fold(base, seg, damaged=[1, 6, 7]) == []
    qemu_img("commit", "-q", "-d", "-f", "qcow2", seg)
    integrity.finish_fold(base, 2)
    sums = integrity.load_sums(integrity.sums_path(base))
    assert [i for i, st in enumerate(sums.states) if st != ChunkState.GOOD] == [1, 6, 7]
    assert [i for i, _ in integrity.check_base_chunks(base, sums)] == [1, 6, 7]


@needs_qemu_img
def test_an_unreadable_record_condemns_every_chunk_until_a_fold_rehashes_it(base: str, tmp_path: Path) -> None:
    flip(integrity.sums_path(base), 3)   # the magic: the whole record is refused
    with pytest.raises(SumsCorruptError, match="not a chunk-hash record"):
        integrity.load_sums(integrity.sums_path(base))
    seg = str(tmp_path / "vda.seg-00000002.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", "vda.base.qcow2", seg, "8M")
    qemu_io(seg, "write -P 0x33 1M 1M", "write -P 0x44 6M 4k")   # a repair of chunk 1 (and part of 6)
    assert integrity.prepare_fold(base, seg) == []
    qemu_img("commit", "-q", "-d", "-f", "qcow2", seg)
    integrity.finish_fold(base, 2)
    sums = integrity.load_sums(integrity.sums_path(base))
    assert [i for i, st in enumerate(sums.states) if st == ChunkState.GOOD] == [1]
    assert [i for i, _ in integrity.check_base_chunks(base, sums)] == [0, 2, 3, 4, 5, 6, 7]

"""Chunk hashes of the replica: what lets the secondary prove what it restores.

One idea, about 640 lines: the hash record's format (header and entries, each with its
CRC), the three checks that read it (a segment, a base chunk, the layers a view reads)
and their upkeep at a fold. Nothing here keeps state between calls.

Two kinds of file, two kinds of hash:

- A sealed **segment** never changes, so its file bytes are hashed: one
  SHA-256 per 1 MiB of the file, kept in the marker record (which carries a
  CRC). Any flipped byte, data or qcow2 metadata, names its file chunk.
- The **base** (``<disk>.base.qcow2``) is rewritten by every fold
  (``qemu-img commit`` moves clusters, L2 and refcount tables), so hashing
  its file bytes would mean re-reading the whole file at each fold. Its
  record holds one SHA-256 per 1 MiB of the *guest-visible content* instead,
  read through ``qemu-img map`` (where each guest range lives in the file)
  and the file itself. A fold re-hashes only the chunks its segment holds.
  Damage is caught wherever it changes what the replica returns: a flipped
  data byte changes its chunk; a flipped L1/L2 entry moves or drops a
  cluster, which changes a chunk or makes ``qemu-img map`` fail; a flipped
  refcount is what ``qemu-img check`` reports (it would let a later fold
  overwrite a live cluster). Bytes qcow2 never reads (header padding, free
  clusters) cannot change a restore and are not reported. Guest-content
  hashes also name damage in the units the primary can resend (guest
  offsets), which is what a repair needs.

The record file ``<disk>.base.sums`` (big-endian)::

    header  "VSSUMS01" chunk_size:u32 reserved:u32 disk_size:u64 base_seq:u64 count:u64 crc32:u32
    entry   state:u8 sha256:32s crc32:u32      (count entries; crc32 over index:u64 state sha256)

The header's CRC covers the header; each entry's CRC covers its index, so a
flip or an entry moved elsewhere spoils only that chunk's hash ("record
damaged": the chunk cannot be vouched for). ``base_seq`` is the marker whose
view the hashes describe. States: ``GOOD``; ``DAMAGED`` (found bad by a
check; the bytes there are not the marker's); ``PENDING`` (a fold is writing
it: re-hashed when the fold is finished or redone).
"""

from __future__ import annotations

import contextlib
import enum
import hashlib
import json
import os
import struct
import subprocess
import threading
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import JournalCorruptError

CHUNK = 1 << 20          # the chunk of disks up to 64 GiB; larger disks get larger chunks ...
ENTRIES = 1 << 16        # ... so that a new record has at most this many entries (2.4 MB)
MAX_ENTRIES = 1 << 22    # a record read back may have grown this far with its disk
MAGIC = b"VSSUMS01"
_HEADER = struct.Struct(">8sIIQQQ")
_HEADER_CRC = struct.Struct(">I")
_ENTRY = struct.Struct(">B32sI")
HEADER_SIZE = _HEADER.size + _HEADER_CRC.size
MAX_DISK = 1 << 50  # the replica size limit prepare enforces
_ZEROS = bytes(CHUNK)
_ZERO_DIGESTS: dict[int, bytes] = {}
# Records are read, changed and written back from worker threads (a scrub's
# findings beside a restore's): one writer at a time, no lost update.
RECORD_LOCK = threading.Lock()


class SumsCorruptError(JournalCorruptError):
    """A chunk-hash record file cannot be read as one."""


class ChunkState(enum.IntEnum):
    GOOD = 0
    DAMAGED = 1
    PENDING = 2


def chunk_range(index: int, chunk_size: int = CHUNK) -> str:
    return f"guest bytes {index * chunk_size}..{(index + 1) * chunk_size}"


def chunk_size_for(disk_size: int) -> int:
    """1 MiB, doubled until the disk has at most ``ENTRIES`` chunks."""
    size = CHUNK
    while -(-disk_size // size) > ENTRIES:
        size *= 2
    return size


def zero_digest(length: int) -> bytes:
    """SHA-256 of ``length`` zero bytes (a hole), computed once per length."""
    if length not in _ZERO_DIGESTS:
        digest = hashlib.sha256()
        _update_zeros(digest, length)
        _ZERO_DIGESTS[length] = digest.digest()
    return _ZERO_DIGESTS[length]


def _update_zeros(digest: Any, length: int) -> None:
    while length > 0:
        step = min(length, len(_ZEROS))
        digest.update(_ZEROS[:step])
        length -= step


@dataclass
class ChunkSums:
    """The chunk hashes of one base image."""

    disk_size: int
    base_seq: int
    digests: list[bytes]
    states: list[ChunkState]
    chunk_size: int = CHUNK
    unreadable: set[int] = field(default_factory=set)  # entries whose CRC failed when loaded

    @classmethod
    def empty(cls, disk_size: int, base_seq: int) -> ChunkSums:
        chunk_size = chunk_size_for(disk_size)
        count = -(-disk_size // chunk_size)
        return cls(disk_size, base_seq, [bytes(32)] * count, [ChunkState.PENDING] * count, chunk_size)

    @property
    def count(self) -> int:
        return len(self.digests)

    def resize(self, disk_size: int) -> None:
        """A grown disk: the new chunks are unknown until hashed."""
        count = -(-disk_size // self.chunk_size)
        grow = count - self.count
        if grow > 0:
            self.digests += [bytes(32)] * grow
            self.states += [ChunkState.PENDING] * grow
        self.disk_size = max(self.disk_size, disk_size)

    def encode(self) -> bytes:
        head = _HEADER.pack(MAGIC, self.chunk_size, 0, self.disk_size, self.base_seq, self.count)
        out = [head, _HEADER_CRC.pack(zlib.crc32(head))]
        for i, (digest, state) in enumerate(zip(self.digests, self.states, strict=True)):
            out.append(_ENTRY.pack(int(state), digest, _entry_crc(i, int(state), digest)))
        return b"".join(out)

    @classmethod
    def decode(cls, data: bytes, name: str) -> ChunkSums:
        """:raise SumsCorruptError: a header that is not one, or a size that does not fit it"""
        if len(data) < HEADER_SIZE:
            raise SumsCorruptError(f"{name}: chunk-hash record truncated ({len(data)} bytes)")
        head = data[:_HEADER.size]
        magic, chunk_size, _, disk_size, base_seq, count = _HEADER.unpack(head)
        (crc,) = _HEADER_CRC.unpack(data[_HEADER.size:HEADER_SIZE])
        if magic != MAGIC:
            raise SumsCorruptError(f"{name}: not a chunk-hash record (bad magic)")
        if crc != zlib.crc32(head):
            raise SumsCorruptError(f"{name}: chunk-hash record header checksum mismatch")
        if chunk_size < CHUNK or chunk_size & (chunk_size - 1) or not 0 < disk_size <= MAX_DISK \
                or count != -(-disk_size // chunk_size) or count > MAX_ENTRIES:
            raise SumsCorruptError(f"{name}: chunk-hash record header is inconsistent "
                                   f"(chunk {chunk_size}, disk {disk_size}, {count} entries)")
        if len(data) != HEADER_SIZE + count * _ENTRY.size:
            raise SumsCorruptError(f"{name}: chunk-hash record is {len(data)} bytes, its header says "
                                   f"{HEADER_SIZE + count * _ENTRY.size} (truncated or extended)")
        sums = cls(disk_size, base_seq, [], [], chunk_size)
        for i in range(count):
            state, digest, ecrc = _ENTRY.unpack_from(data, HEADER_SIZE + i * _ENTRY.size)
            if ecrc != _entry_crc(i, state, digest) or state not in ChunkState._value2member_map_:
                sums.unreadable.add(i)
                sums.digests.append(bytes(32))
                sums.states.append(ChunkState.DAMAGED)
            else:
                sums.digests.append(digest)
                sums.states.append(ChunkState(state))
        return sums


def _entry_crc(index: int, state: int, digest: bytes) -> int:
    return zlib.crc32(struct.pack(">QB", index, state) + digest)


def sums_path(base: str) -> str:
    """``vda.base.qcow2`` -> ``vda.base.sums``"""
    return base.removesuffix(".qcow2") + ".sums"


def load_sums(path: str) -> ChunkSums:
    """:raise SumsCorruptError: missing, unreadable or not a record"""
    name = os.path.basename(path)
    try:
        with open(path, "rb") as f:
            data = f.read(HEADER_SIZE + MAX_ENTRIES * _ENTRY.size + 1)
    except FileNotFoundError:
        raise SumsCorruptError(f"{name}: chunk-hash record is missing") from None
    except OSError as e:
        raise SumsCorruptError(f"{name}: chunk-hash record unreadable ({e.strerror})") from None
    return ChunkSums.decode(data, name)


def condemn_sums(base: str) -> ChunkSums:
    """The record of ``base`` as it stands, or, when it cannot be read (missing, bad
    header), a new one in which every chunk is damaged: nothing in the base is
    vouched for until a fold of a segment that holds a chunk entirely (a repair)
    hashes it again. The unreadable record has been reported by the caller."""
    path = sums_path(base)
    try:
        return load_sums(path)
    except SumsCorruptError:
        sums = ChunkSums.empty(virtual_size(base), 0)
        sums.states = [ChunkState.DAMAGED] * sums.count
        save_sums(path, sums)
        return sums


def save_sums(path: str, sums: ChunkSums) -> None:
    """Atomically: tmp + fsync + rename + fsync of the directory."""
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(sums.encode())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- guest content ------------------------------------------------------------


@dataclass(frozen=True)
class Extent:
    start: int
    length: int
    depth: int
    present: bool
    data: bool
    offset: int | None


def extents(path: str) -> list[Extent]:
    """``qemu-img map`` of an image (with its backing chain).

    :raise JournalCorruptError: the image's metadata cannot be read
    """
    proc = subprocess.run(["qemu-img", "map", "-U", "--output=json", "-f", "qcow2", path],
                          capture_output=True, text=True, check=False)
    name = os.path.basename(path)
    if proc.returncode != 0:
        raise JournalCorruptError(f"{name}: qcow2 metadata unreadable: {proc.stderr.strip()[:200]}")
    try:
        return [Extent(int(e["start"]), int(e["length"]), int(e["depth"]), bool(e.get("present", True)),
                       bool(e["data"]), int(e["offset"]) if "offset" in e else None)
                for e in json.loads(proc.stdout)]
    except (ValueError, KeyError, TypeError):
        raise JournalCorruptError(f"{name}: qemu-img map output unreadable") from None


def chunks_of(exts: Iterable[Extent], *, min_depth: int = 0, max_depth: int | None = None,
              present_only: bool = False, chunk_size: int = CHUNK) -> set[int]:
    """Chunks overlapped by extents at depths ``min_depth..max_depth``."""
    out: set[int] = set()
    for e in exts:
        if e.depth < min_depth or (max_depth is not None and e.depth > max_depth) or e.length <= 0:
            continue
        if present_only and not e.present:
            continue
        out.update(range(e.start // chunk_size, (e.start + e.length - 1) // chunk_size + 1))
    return out


def covered_chunks(exts: Iterable[Extent], depth: int, chunk_size: int = CHUNK) -> set[int]:
    """Chunks that extents at exactly ``depth`` (present there) cover entirely."""
    got: dict[int, int] = {}
    for e in exts:
        if e.depth != depth or not e.present:
            continue
        pos, end = e.start, e.start + e.length
        while pos < end:
            idx = pos // chunk_size
            step = min(end, (idx + 1) * chunk_size) - pos
            got[idx] = got.get(idx, 0) + step
            pos += step
    return {i for i, n in got.items() if n >= chunk_size}


def guest_digests(path: str, chunks: Iterable[int], disk_size: int, exts: Sequence[Extent] | None = None,
                  chunk_size: int = CHUNK) -> dict[int, bytes]:
    """SHA-256 of each chunk's guest-visible content of a standalone image
    (the base has no backing: every extent is at depth 0).

    :raise JournalCorruptError: an extent that is not plain data in the file
    """
    exts = list(exts) if exts is not None else extents(path)
    name = os.path.basename(path)
    wanted = sorted(set(chunks))
    out: dict[int, bytes] = {}
    ei = 0
    with open(path, "rb") as f:
        for idx in wanted:
            lo, hi = idx * chunk_size, min((idx + 1) * chunk_size, disk_size)
            while ei < len(exts) and exts[ei].start + exts[ei].length <= lo:
                ei += 1
            pieces: list[tuple[int | None, int]] = []  # (file offset or None for zeros, length)
            pos, j = lo, ei
            while pos < hi:
                if j >= len(exts) or exts[j].start > pos:
                    raise JournalCorruptError(f"{name}: qemu-img map leaves {chunk_range(idx, chunk_size)} out")
                e = exts[j]
                end = min(hi, e.start + e.length)
                if e.data and e.offset is None:
                    raise JournalCorruptError(f"{name}: {chunk_range(idx, chunk_size)} is not plain data")
                pieces.append((e.offset + pos - e.start if e.data and e.offset is not None else None, end - pos))
                pos = end
                if pos >= e.start + e.length:
                    j += 1
            if all(off is None for off, _ in pieces):
                out[idx] = zero_digest(hi - lo)  # a hole: no need to hash its zeros again
                continue
            digest = hashlib.sha256()
            for off, length in pieces:
                if off is None:
                    _update_zeros(digest, length)
                    continue
                f.seek(off)
                while length > 0:
                    block = f.read(min(length, 4 * CHUNK))
                    if not block:
                        raise JournalCorruptError(f"{name}: chunk {idx} ({chunk_range(idx, chunk_size)}) "
                                                  "lies past the end of the file (truncated)")
                    digest.update(block)
                    length -= len(block)
            out[idx] = digest.digest()
    return out


def check_metadata(path: str) -> str | None:
    """What ``qemu-img check`` finds wrong with an image's metadata (None: nothing).
    Leaked clusters are only wasted space (a fold cut short leaves them): not damage."""
    proc = subprocess.run(["qemu-img", "check", "-U", "--output=json", "-f", "qcow2", path],
                          capture_output=True, text=True, check=False)
    name = os.path.basename(path)
    try:
        report = json.loads(proc.stdout)
        bad = int(report.get("corruptions", 0)) + int(report.get("check-errors", 0))
    except (ValueError, TypeError, AttributeError):
        return f"{name}: qcow2 metadata unreadable: {proc.stderr.strip()[:200]}"
    if bad:
        return f"{name}: qcow2 metadata damaged ({bad} errors found by qemu-img check)"
    return None


def virtual_size(path: str) -> int:
    proc = subprocess.run(["qemu-img", "info", "-U", "--output=json", "-f", "qcow2", path],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise JournalCorruptError(f"{os.path.basename(path)}: qcow2 header unreadable: {proc.stderr.strip()[:200]}")
    return int(json.loads(proc.stdout)["virtual-size"])


# -- checks ------------------------------------------------------------------------


def hash_base(base: str, base_seq: int) -> ChunkSums:
    """Hash every chunk of a base image (after the full copy)."""
    size = virtual_size(base)
    sums = ChunkSums.empty(size, base_seq)
    for idx, digest in guest_digests(base, range(sums.count), size, chunk_size=sums.chunk_size).items():
        sums.digests[idx] = digest
        sums.states[idx] = ChunkState.GOOD
    return sums


def check_base_chunks(base: str, sums: ChunkSums, chunks: Iterable[int] | None = None) -> list[tuple[int, str]]:
    """(chunk, why) for each chunk of the base (all, or ``chunks``) that does not hold
    what its record says. A ``PENDING`` chunk is not checked (a fold is writing it)."""
    name = os.path.basename(base)
    wanted = set(range(sums.count)) if chunks is None else {c for c in chunks if c < sums.count}
    bad: list[tuple[int, str]] = []
    todo = []
    for idx in sorted(wanted):
        if idx in sums.unreadable:
            bad.append((idx, f"{name} chunk {idx} ({chunk_range(idx, sums.chunk_size)}): its hash record entry is damaged"))
        elif sums.states[idx] == ChunkState.DAMAGED:
            bad.append((idx, f"{name} chunk {idx} ({chunk_range(idx, sums.chunk_size)}): damaged (found by an earlier check)"))
        elif sums.states[idx] == ChunkState.GOOD:
            todo.append(idx)
    for idx, digest in guest_digests(base, todo, sums.disk_size, chunk_size=sums.chunk_size).items():
        if digest != sums.digests[idx]:
            bad.append((idx, f"{name} chunk {idx} ({chunk_range(idx, sums.chunk_size)}): content does not match its recorded hash"))
    return sorted(bad)


def file_chunk_digests(path: str, chunk_size: int = CHUNK) -> list[str]:
    """SHA-256 of each ``chunk_size`` piece of a file's bytes (a sealed segment)."""
    out = []
    with open(path, "rb") as f:
        while block := f.read(chunk_size):
            out.append(hashlib.sha256(block).hexdigest())
    return out


def first_bad_file_chunk(path: str, recorded: Sequence[str]) -> int | None:
    """Index of the first file chunk whose hash differs from ``recorded`` (None: all match)."""
    got = file_chunk_digests(path)
    for idx in range(max(len(got), len(recorded))):
        if idx >= len(got) or idx >= len(recorded) or got[idx] != recorded[idx]:
            return idx
    return None


def chain_depth(view: str, base: str) -> int:
    """How many images sit above ``base`` in ``view``'s backing chain."""
    from .journal import backing_name  # the header reader lives with the journal's files

    depth, path, seen = 0, view, set()
    root = os.path.dirname(view)
    while os.path.realpath(path) != os.path.realpath(base):
        if path in seen or depth > 100_000:
            raise JournalCorruptError(f"{os.path.basename(view)}: backing chain loops")
        seen.add(path)
        name = backing_name(path)
        if name is None:
            raise JournalCorruptError(f"{os.path.basename(path)}: backing chain does not reach "
                                      f"{os.path.basename(base)}")
        path = os.path.join(root, name)
        depth += 1
    return depth


def base_chunks_read(view: str, base: str, chunk_size: int) -> set[int]:
    """The base chunks a view's chain reads (where no newer segment holds the data)."""
    depth = chain_depth(view, base)
    return chunks_of(extents(view), min_depth=depth, chunk_size=chunk_size)


def mark_damaged(path: str, chunks: Iterable[int]) -> None:
    """Record chunks found bad (so no later check or fold blesses them)."""
    with RECORD_LOCK, contextlib.suppress(SumsCorruptError):
        sums = load_sums(path)
        changed = False
        for idx in chunks:
            if idx < sums.count and idx not in sums.unreadable and sums.states[idx] == ChunkState.GOOD:
                sums.states[idx] = ChunkState.DAMAGED
                changed = True
        if changed:
            save_sums(path, sums)


def seal_base(base: str, base_seq: int) -> None:
    """Record the chunk hashes of a base just written in full (or just created)."""
    save_sums(sums_path(base), hash_base(base, base_seq))


def prepare_fold(base: str, seg: str, damaged: Iterable[int] | None = None) -> list[str]:
    with RECORD_LOCK:
        return _prepare_fold(base, seg, damaged)


def _prepare_fold(base: str, seg: str, damaged: Iterable[int] | None) -> list[str]:
    """Before ``seg`` is committed into ``base``: check the base chunks the
    segment touches but does not cover entirely (their old bytes stay), and
    mark every touched chunk ``PENDING``; a chunk found bad stays ``DAMAGED``
    (a fold never blesses damage it does not overwrite). Idempotent: when
    chunks are already pending, a fold was cut short and its commit is being
    redone, so the base is no longer the old view and is not checked.

    ``damaged``: the segment itself is damaged (these are the chunks its record
    says it holds): every chunk it touches stays or becomes ``DAMAGED``, to be
    healed by the fold of a later marker that holds them entirely (a repair).

    :return: a line per damaged chunk found
    :raise JournalCorruptError: the record or the segment's metadata is unreadable
    """
    path = sums_path(base)
    sums = condemn_sums(base)
    exts = extents(seg)
    seg_size = max((e.start + e.length for e in exts), default=0)
    touched = chunks_of(exts, max_depth=0, present_only=True, chunk_size=sums.chunk_size)
    covered = covered_chunks(exts, 0, sums.chunk_size)
    if seg_size > sums.disk_size:
        sums.resize(seg_size)
    found: list[str] = []
    if ChunkState.PENDING not in sums.states:
        good = {c for c in touched - covered if c < sums.count and sums.states[c] == ChunkState.GOOD
                and c not in sums.unreadable}   # the others are damaged already, and stay so
        bad = check_base_chunks(base, sums, good)
        for idx, why in bad:
            sums.states[idx] = ChunkState.DAMAGED
            found.append(why)
    if damaged is not None:
        for idx in touched | set(damaged):
            if idx < sums.count:
                sums.states[idx] = ChunkState.DAMAGED
        save_sums(path, sums)
        return found
    for idx in touched:
        if idx >= sums.count:
            continue
        if idx in covered:
            sums.states[idx] = ChunkState.PENDING   # all its bytes come from the (verified) segment
            sums.unreadable.discard(idx)
        elif sums.states[idx] == ChunkState.GOOD:
            sums.states[idx] = ChunkState.PENDING
    save_sums(path, sums)
    return found


def finish_fold(base: str, base_seq: int) -> None:
    with RECORD_LOCK:
        _finish_fold(base, base_seq)


def _finish_fold(base: str, base_seq: int) -> None:
    """After a commit into ``base``: hash the pending chunks; the record now
    describes marker ``base_seq``."""
    path = sums_path(base)
    sums = load_sums(path)
    pending = [i for i, st in enumerate(sums.states) if st == ChunkState.PENDING and i not in sums.unreadable]
    if pending:
        size = virtual_size(base)
        sums.resize(size)
        for idx, digest in guest_digests(base, pending, sums.disk_size, chunk_size=sums.chunk_size).items():
            sums.digests[idx] = digest
            sums.states[idx] = ChunkState.GOOD
    sums.base_seq = base_seq
    save_sums(path, sums)


def check_view(base: str, view: str) -> list[str]:
    """What is wrong with the base as a marker's view reads it: its metadata,
    its record, and every chunk the view reads from it (chunks that newer
    segments of the view hold entirely are not read, so damage there does
    not affect this marker). Damaged chunks found are recorded as such."""
    meta = check_metadata(base)
    if meta:
        return [meta]
    try:
        sums = load_sums(sums_path(base))
        bad = check_base_chunks(base, sums, base_chunks_read(view, base, sums.chunk_size))
    except JournalCorruptError as e:
        return [str(e)]
    mark_damaged(sums_path(base), [idx for idx, _ in bad])
    return [why for _, why in bad]


# -- the integrity report --------------------------------------------------------

REPORT = "integrity.json"


def load_report(root: str) -> dict[str, Any] | None:
    """The last check's findings: ``{checked_at, seconds, bytes, findings: [line],
    markers: {seq: line}}`` (None: never checked, nothing found)."""
    try:
        with open(os.path.join(root, REPORT), encoding="utf-8") as f:
            report = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(report, dict) or not isinstance(report.get("findings"), list) \
            or not isinstance(report.get("markers"), dict):
        return None
    return report


def save_report(root: str, report: dict[str, Any]) -> None:
    os.makedirs(root, mode=0o700, exist_ok=True)
    path = os.path.join(root, REPORT)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(report, f, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


MAX_REPAIR_RANGES = 256  # per disk and request: the rest follows at the next cycle


def repair_ranges(base: str, newest_view: str, disk_size: int) -> list[list[int]]:
    """Guest ranges ``[start, length]`` the primary must send again so that the
    newest marker's view no longer reads damaged base bytes: the damaged (or
    unvouched) chunks that view still reads from the base, whole chunks,
    adjacent ones joined. An unreadable record makes the whole disk suspect."""
    try:
        sums = load_sums(sums_path(base))
    except SumsCorruptError:
        return [[0, disk_size]]
    bad = {i for i, st in enumerate(sums.states) if st == ChunkState.DAMAGED} | sums.unreadable
    if not bad:
        return []
    bad &= base_chunks_read(newest_view, base, sums.chunk_size)
    return chunk_ranges(bad, sums.chunk_size, disk_size)


# -- damaged segments --------------------------------------------------------------


def segment_chunks(seg: str, chunk_size: int) -> list[int]:
    """The chunks a segment holds data for (recorded when it is sealed, so that a
    later flip in its metadata cannot hide what it held)."""
    return sorted(chunks_of(extents(seg), max_depth=0, present_only=True, chunk_size=chunk_size))


def reads_layer(view: str, layer: str, holds: Iterable[int] = (), chunk_size: int = CHUNK) -> bool:
    """Whether a view's chain reads any guest byte from ``layer`` (one of its
    images), or reads from ``layer`` or below any of the chunks ``holds`` (those
    the layer's record says it holds: damaged metadata may hide some of them,
    and then the view would read older bytes there)."""
    depth = chain_depth(view, layer)
    exts = extents(view)
    if any(e.depth == depth and e.present for e in exts):
        return True
    return bool(set(holds) & chunks_of(exts, min_depth=depth, chunk_size=chunk_size))


def layer_chunks_read(view: str, layer: str, chunk_size: int) -> set[int]:
    """Chunks a view reads from ``layer`` or anything below it."""
    return chunks_of(extents(view), min_depth=chain_depth(view, layer), chunk_size=chunk_size)


def chunk_ranges(chunks: Iterable[int], chunk_size: int, disk_size: int) -> list[list[int]]:
    """Whole-chunk guest ranges ``[start, length]``, adjacent ones joined, at most
    ``MAX_REPAIR_RANGES``."""
    out: list[list[int]] = []
    for idx in sorted(set(chunks)):
        start = idx * chunk_size
        length = min(chunk_size, disk_size - start)
        if length <= 0:
            continue
        if out and out[-1][0] + out[-1][1] == start:
            out[-1][1] += length
        elif len(out) < MAX_REPAIR_RANGES:
            out.append([start, length])
    return out

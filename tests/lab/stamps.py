"""Oracle for the lab's writing guest (tests/lab/guest/init.sh).

The guest writes sequence numbers start, start+1, ... one 4 KiB block each: write
``seq`` goes to disk ``seq % disks``, block ``mix(seq) % blocks``, and the block is one
64-byte stamp line repeated 64 times. Because every write is self-describing, the
state of the disks after any prefix of the write sequence is known exactly; a
replica that is a consistent cut must equal one such prefix, byte for byte.

Everything here must match the shell implementation bit for bit; the unit tests
source init.sh and compare.
"""

from __future__ import annotations

import mmap
import os
import re
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

BLOCK_SIZE = 4096
LINE_SIZE = 64
LINES_PER_BLOCK = BLOCK_SIZE // LINE_SIZE
MAGIC = b"VSBLK1"
ZERO_BLOCK = bytes(BLOCK_SIZE)
GARBLED = -1
"""``Mismatch.found`` for a block that is neither zero nor a whole stamp."""

_M64 = (1 << 64) - 1
_M63 = (1 << 63) - 1
_LINE_RE = re.compile(rb"VSBLK1 d=(\d{2}) b=(\d{8}) s=(\d{12}) c=(\d{10}) {13}\n\Z")
_QCOW2_MAGIC = b"QFI\xfb"
_ZERO_CHUNK = bytes(1 << 20)


class StampError(ValueError):
    """A block that is neither all zero nor one intact stamp (torn or garbled)."""


def mix(seq: int) -> int:
    """splitmix64 finalizer of ``seq``, masked to 63 bits (the guest's ``vs_mix``).

    A mixed address (not ``seq * c % n``) spreads writes over both parities of every
    disk when writes alternate between disks. The 63-bit mask keeps the value
    non-negative in ash's signed arithmetic, so ``%`` agrees with Python.
    """
    z = (seq + 0x9E3779B97F4A7C15) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return (z ^ (z >> 31)) & _M63


def target(seq: int, disks: int, blocks: int) -> tuple[int, int]:
    """(disk index, block number) that write ``seq`` goes to."""
    return seq % disks, mix(seq) % blocks


def checksum(disk: int, block: int, seq: int) -> int:
    """32-bit check field of a stamp line; catches digits garbled in transit."""
    return mix((seq ^ (block << 20) ^ (disk << 52)) & _M64) & 0xFFFFFFFF


def stamp_line(disk: int, block: int, seq: int) -> bytes:
    """The 64-byte stamp line (the guest's ``vs_make_block``): fixed-width decimals."""
    if min(disk, block, seq) < 0:
        raise ValueError(f"stamp fields must be non-negative: {disk=} {block=} {seq=}")
    line = (
        f"VSBLK1 d={disk:02d} b={block:08d} s={seq:012d} c={checksum(disk, block, seq):010d}" + " " * 13 + "\n"
    ).encode("ascii")
    if len(line) != LINE_SIZE:
        raise ValueError(f"stamp fields out of range: {disk=} {block=} {seq=}")
    return line


def stamp_block(disk: int, block: int, seq: int) -> bytes:
    """Exactly the 4096 bytes the guest writes for ``seq`` at (disk, block)."""
    return stamp_line(disk, block, seq) * LINES_PER_BLOCK


@dataclass(frozen=True)
class Stamp:
    """The decoded content of one written block."""

    disk: int
    block: int
    seq: int


def parse_block(data: bytes | memoryview) -> Stamp | None:
    """Decode one block: None if all zero, a Stamp if intact, else StampError."""
    # bytes, not memoryview: memoryview == bytes compares item by item (~30x slower).
    data = bytes(data)
    if len(data) != BLOCK_SIZE:
        raise StampError(f"block has {len(data)} bytes, expected {BLOCK_SIZE}")
    if data == ZERO_BLOCK:
        return None
    head = data[:LINE_SIZE]
    m = _LINE_RE.match(head)
    if m is None:
        raise StampError(f"garbled stamp line: {head[:LINE_SIZE]!r}")
    disk, block, seq = int(m[1]), int(m[2]), int(m[3])
    if int(m[4]) != checksum(disk, block, seq):
        raise StampError(f"bad checksum in stamp line: {head!r}")
    if data != head * LINES_PER_BLOCK:
        torn_at = next(i for i in range(LINES_PER_BLOCK) if data[i * LINE_SIZE : (i + 1) * LINE_SIZE] != head)
        raise StampError(f"torn block: stamp seq={seq} in line 0 but line {torn_at} differs")
    return Stamp(disk, block, seq)


class Oracle:
    """What the disks hold after the write-sequence prefix ``start..seq``."""

    def __init__(self, disks: int, blocks: int, start: int = 1) -> None:
        if disks < 1 or blocks < 1 or start < 0:
            raise ValueError(f"bad oracle parameters {disks=} {blocks=} {start=}")
        self.disks = disks
        self.blocks = blocks
        self.start = start
        # Incremental state: the expected maps after writes start..self._upto.
        self._upto = start - 1
        self._state: list[dict[int, int]] = [{} for _ in range(disks)]

    def target(self, seq: int) -> tuple[int, int]:
        """(disk, block) of write ``seq``."""
        return target(seq, self.disks, self.blocks)

    def expected(self, upto_seq: int) -> list[dict[int, int]]:
        """Per disk, {block: seq of the last write to it} after writes start..upto_seq.

        Blocks absent from a map must be zero. The result is a fresh copy.
        """
        if upto_seq < self._upto:
            self._upto = self.start - 1
            self._state = [{} for _ in range(self.disks)]
        for seq in range(self._upto + 1, upto_seq + 1):
            disk, block = self.target(seq)
            self._state[disk][block] = seq
        self._upto = max(self._upto, upto_seq)
        return [dict(d) for d in self._state]


@dataclass(frozen=True)
class Mismatch:
    """One block that differs from the oracle.

    ``expected``/``found`` are sequence numbers; None means an all-zero block and
    ``found == GARBLED`` (-1) a torn or garbled one (see ``reason``).
    """

    disk: int
    block: int
    expected: int | None
    found: int | None
    reason: str = ""


@dataclass
class CheckResult:
    """Outcome of comparing disk images with the oracle at one cut."""

    cut_seq: int
    blocks_verified: int
    mismatches: list[Mismatch] = field(default_factory=list)
    max_seq_per_disk: list[int | None] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when every block matched."""
        return not self.mismatches

    def summary(self, limit: int = 10) -> str:
        """Human-readable one-paragraph description, for assertion messages."""
        head = f"cut_seq={self.cut_seq} blocks_verified={self.blocks_verified} mismatches={len(self.mismatches)}"
        lines = [head] + [f"  {m}" for m in self.mismatches[:limit]]
        if len(self.mismatches) > limit:
            lines.append(f"  ... {len(self.mismatches) - limit} more")
        return "\n".join(lines)


def _is_qcow2(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == _QCOW2_MAGIC


@contextmanager
def _raw_view(path: str, fmt: str | None, tmpdir: str, force_share: bool) -> Iterator[memoryview]:
    """A read-only memoryview of the image's guest-visible bytes.

    Raw files are mapped directly; anything else (qcow2, chains with backing files)
    is flattened by ``qemu-img convert -O raw`` into a sparse temporary file first.
    """
    if fmt is None:
        fmt = "qcow2" if _is_qcow2(path) else "raw"
    raw = path
    if fmt != "raw":
        raw = os.path.join(tmpdir, "flat.raw")
        cmd = ["qemu-img", "convert"]
        if force_share:
            cmd.append("-U")
        cmd += ["-f", fmt, "-O", "raw", path, raw]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed: {proc.stderr.strip()}")
    try:
        if os.path.getsize(raw) == 0:
            yield memoryview(b"")
            return
        with open(raw, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            view = memoryview(m)
            try:
                yield view
            finally:
                view.release()
    finally:
        if raw != path:
            os.unlink(raw)


def _found_seqs(view: memoryview, disk: int, limit: int, mismatches: list[Mismatch]) -> dict[int, int]:
    """{block: seq} of the non-zero blocks below ``limit``; bad blocks go to mismatches.

    A garbled or misplaced block is recorded (expected filled in later) and left
    out of the map, so the cut is computed from intact stamps only.
    """
    found: dict[int, int] = {}
    for block in range(limit):
        data = bytes(view[block * BLOCK_SIZE : (block + 1) * BLOCK_SIZE])
        if data == ZERO_BLOCK:
            continue
        try:
            stamp = parse_block(data)
        except StampError as e:
            mismatches.append(Mismatch(disk, block, None, GARBLED, str(e)))
            continue
        assert stamp is not None
        if (stamp.disk, stamp.block) != (disk, block):
            mismatches.append(
                Mismatch(
                    disk,
                    block,
                    None,
                    stamp.seq,
                    f"misplaced stamp for disk {stamp.disk} block {stamp.block}",
                )
            )
            continue
        found[block] = stamp.seq
    return found


def _nonzero_tail(view: memoryview, first_block: int) -> list[int]:
    """Block numbers at or after ``first_block`` that are not all zero."""
    bad: list[int] = []
    start = first_block * BLOCK_SIZE
    step = len(_ZERO_CHUNK)
    for off in range(start, len(view), step):
        chunk = bytes(view[off : off + step])
        if chunk == _ZERO_CHUNK[: len(chunk)]:
            continue
        for b_off in range(0, len(chunk), BLOCK_SIZE):
            part = chunk[b_off : b_off + BLOCK_SIZE]
            if part != ZERO_BLOCK[: len(part)]:
                bad.append((off + b_off) // BLOCK_SIZE)
    return bad


def _check(
    paths: Sequence[str],
    oracle: Oracle,
    seq: int | None,
    formats: Sequence[str | None] | None,
    force_share: bool,
) -> CheckResult:
    if len(paths) != oracle.disks:
        raise ValueError(f"{len(paths)} images for an oracle of {oracle.disks} disks")
    fmts: Sequence[str | None] = formats or [None] * len(paths)
    if len(fmts) != len(paths):
        raise ValueError(f"{len(fmts)} formats for {len(paths)} images")
    mismatches: list[Mismatch] = []
    found: list[dict[int, int]] = []
    tails: list[list[int]] = []
    verified = 0
    with tempfile.TemporaryDirectory(prefix="vs-check-") as tmpdir:
        for disk, (path, fmt) in enumerate(zip(paths, fmts, strict=True)):
            # One image at a time: its mapping and flattened copy go before the next.
            with _raw_view(path, fmt, tmpdir, force_share) as view:
                if len(view) % BLOCK_SIZE:
                    raise ValueError(f"{path}: size {len(view)} not a multiple of 4 KiB")
                nblocks = len(view) // BLOCK_SIZE
                if nblocks < oracle.blocks:
                    raise ValueError(f"{path}: {nblocks} blocks, the guest uses {oracle.blocks}")
                found.append(_found_seqs(view, disk, oracle.blocks, mismatches))
                tails.append(_nonzero_tail(view, oracle.blocks))
                verified += nblocks

    per_disk_max = [max(f.values()) if f else None for f in found]
    present = [s for s in per_disk_max if s is not None]
    cut = seq if seq is not None else (max(present) if present else oracle.start - 1)
    expected = oracle.expected(cut)

    # Garbled/misplaced blocks: fill in what should have been there.
    mismatches = [Mismatch(m.disk, m.block, expected[m.disk].get(m.block), m.found, m.reason) for m in mismatches]
    bad = {(m.disk, m.block) for m in mismatches}
    for disk in range(oracle.disks):
        exp, got = expected[disk], found[disk]
        for block in sorted(exp.keys() | got.keys()):
            if (disk, block) in bad:
                continue
            e, g = exp.get(block), got.get(block)
            if e != g:
                if g is None:
                    reason = "block is zero"
                elif e is None:
                    reason = "written after the cut" if g > cut else "never written"
                elif g > cut:
                    reason = "newer than the cut"
                else:
                    reason = "older than expected"
                mismatches.append(Mismatch(disk, block, e, g, reason))
        for block in tails[disk]:
            mismatches.append(Mismatch(disk, block, None, GARBLED, "data beyond vs.blocks"))
    mismatches.sort(key=lambda m: (m.disk, m.block))
    return CheckResult(cut, verified, mismatches, per_disk_max)


def check_images(
    paths: Sequence[str],
    oracle: Oracle,
    formats: Sequence[str | None] | None = None,
    force_share: bool = False,
) -> CheckResult:
    """Find the cut (highest seq on any disk) and verify every block against it.

    ``formats`` per image (None = detect raw/qcow2); ``force_share`` passes ``-U``
    to qemu-img for images still open in a QEMU (only meaningful when paused).
    """
    return _check(paths, oracle, None, formats, force_share)


def check_images_at(
    paths: Sequence[str],
    oracle: Oracle,
    seq: int,
    formats: Sequence[str | None] | None = None,
    force_share: bool = False,
) -> CheckResult:
    """Verify every block against the state after writes ``start..seq``."""
    return _check(paths, oracle, seq, formats, force_share)

"""A domain's journal on the secondary: files, records and their checks.

::

    <storage>/<domain uuid>/
        vda.base.qcow2                  the journal's base: the view at marker ``base_seq``
        vda.seg-00000007.qcow2          sealed segment of marker 7; backing = marker 6's (or the base)
        vda.seg-00000008.qcow2.partial  being written by a cycle; discarded unless sealed
    vda.seg-00000006.qcow2 -> vda.base.qcow2
                                    a folded segment: a link to the base, kept while a
                                    newer segment's backing names it

A marker record (sqlite) names each disk's sealed segment with its size and
a SHA-256 per MiB of the file (older records: one SHA-256 of the whole file)
and carries a CRC over the whole record. The base's chunk hashes live beside
it in ``vda.base.sums`` (see ``integrity``). The view of a disk at marker M
is M's segment (or the base when M is ``base_seq``) with its backing chain.
Sealed segments never change: folding one into the base leaves a link in its
place, so the next segment's backing still resolves and its hash still holds.
Nothing is trusted that has not been checked: a record whose CRC or sequence
is wrong stops everything after it; a segment whose file, size or hash is wrong
makes every marker that reads from it unrestorable (the secondary's reflecting
unit passes them over, and asks the primary for those chunks again).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import struct
import zlib
from collections.abc import Mapping
from typing import Any

from ..errors import JournalCorruptError
from .integrity import CHUNK, first_bad_file_chunk

SEGMENT_RE = re.compile(r"^(?P<target>[A-Za-z0-9]{1,16})\.seg-(?P<seq>\d{8})\.qcow2(?P<partial>\.partial)?$")


def record_crc(seq: int, cut_time: float, disks: list[str], nbytes: Mapping[str, int], label: str, apply: bool,
               segments: Mapping[str, Any]) -> str:
    """CRC-32 over the canonical JSON of a marker record."""
    canon = json.dumps({"seq": seq, "cut_time": cut_time, "disks": disks, "bytes": dict(nbytes), "label": label,
                        "apply": apply, "segments": dict(segments)}, sort_keys=True, separators=(",", ":"))
    return f"{zlib.crc32(canon.encode()):08x}"


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def backing_name(path: str) -> str | None:
    """The backing file name in a qcow2 image's header; None if it has none or
    the header cannot be read as qcow2."""
    try:
        with open(path, "rb") as f:
            head = f.read(20)
            if len(head) < 20 or head[:4] != b"QFI\xfb":
                return None
            offset, size = struct.unpack(">QI", head[8:20])
            if not offset or not 0 < size <= 1023:
                return None
            f.seek(offset)
            name = f.read(size)
    except OSError:
        return None
    return os.fsdecode(name) if len(name) == size else None


def fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class JournalDir:
    """File names and lookups for one domain's journal directory."""

    def __init__(self, root: str) -> None:
        self.root = root

    def base(self, target: str) -> str:
        return os.path.join(self.root, f"{target}.base.qcow2")

    def segment(self, target: str, seq: int, *, partial: bool = False) -> str:
        return os.path.join(self.root, f"{target}.seg-{seq:08d}.qcow2" + (".partial" if partial else ""))

    def entries(self) -> list[tuple[str, int, bool, str]]:
        """(target, seq, partial, path) of every segment file present (not the links of folded ones)."""
        out = []
        if os.path.isdir(self.root):
            for name in sorted(os.listdir(self.root)):
                m = SEGMENT_RE.match(name)
                path = os.path.join(self.root, name)
                if m and not os.path.islink(path):
                    out.append((m["target"], int(m["seq"]), bool(m["partial"]), path))
        return out

    def links(self, target: str) -> list[str]:
        """Paths of the links that stand for ``target``'s folded segments."""
        if not os.path.isdir(self.root):
            return []
        return [os.path.join(self.root, name) for name in sorted(os.listdir(self.root))
                if (m := SEGMENT_RE.match(name)) and m["target"] == target
                and os.path.islink(os.path.join(self.root, name))]

    def link_to_base(self, target: str, seq: int) -> None:
        """Replace folded segment ``seq`` (already committed into the base) by a link to the base."""
        seg = self.segment(target, seq)
        tmp = seg + ".link"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        os.symlink(os.path.basename(self.base(target)), tmp)
        os.replace(tmp, seg)

    def drop_unused_links(self, target: str) -> None:
        """Remove the links no segment's backing names any more. When a header
        cannot be read, every link stays: a broken chain would lose markers."""
        needed = set()
        for t, _, _, path in self.entries():
            if t == target:
                name = backing_name(path)
                if name is None:
                    return
                needed.add(name)
        for link in self.links(target):
            if os.path.basename(link) not in needed:
                os.unlink(link)

    def view(self, target: str, seq: int) -> str:
        """The file whose chain is the disk as of marker ``seq``: its newest
        sealed segment up to ``seq`` (segments of folded markers are gone, and
        a disk added later has none before its first marker), else the base."""
        newest = [s for t, s, partial, _ in self.entries() if t == target and not partial and s <= seq]
        return self.segment(target, max(newest)) if newest else self.base(target)

    def segment_bytes(self) -> int:
        """Space the journal's segments take (what the journal limit bounds)."""
        total = 0
        for _, _, _, path in self.entries():
            try:
                total += os.stat(path).st_blocks * 512
            except FileNotFoundError:
                pass
        return total


def verify_record(row: Any, expected_seq: int) -> dict[str, Any]:
    """Check a marker row's framing (a sqlite Row or a mapping); return its segments map.

    :raise JournalCorruptError: wrong sequence or CRC, unreadable fields
    """
    try:
        seq = int(row["seq"])
    except (KeyError, TypeError, ValueError, ArithmeticError):
        raise JournalCorruptError(f"marker {expected_seq}: unreadable sequence number") from None
    if seq != expected_seq:
        raise JournalCorruptError(f"marker {expected_seq} is missing (found {seq} next): journal out of order")
    try:
        disks = json.loads(row["disks"])
        nbytes = json.loads(row["bytes"])
        segments = json.loads(row["segments"])
        crc = record_crc(seq, float(row["cut_time"]), disks, nbytes, str(row["label"]), bool(row["apply"]),
                         segments)
        stored = row["crc"]
    except (KeyError, TypeError, ValueError, ArithmeticError) as e:
        raise JournalCorruptError(f"marker {seq}: unreadable record ({type(e).__name__})") from None
    if crc != stored:
        raise JournalCorruptError(f"marker {seq}: record checksum mismatch (stored {stored!r:.20}, computed {crc})")
    if not isinstance(segments, dict) or not isinstance(disks, list):
        raise JournalCorruptError(f"marker {seq}: segments or disks malformed")
    return segments


def verify_segment(journal: JournalDir, seq: int, target: str, entry: Mapping[str, Any], *,
                   full_hash: bool) -> None:
    """Check one sealed segment file against its record.

    :raise JournalCorruptError: missing, truncated, altered, or linked to the wrong backing
    """
    path = journal.segment(target, seq)
    try:
        size = os.stat(path).st_size
    except FileNotFoundError:
        raise JournalCorruptError(f"marker {seq}: segment {os.path.basename(path)} is missing") from None
    if size != entry.get("size"):
        raise JournalCorruptError(f"marker {seq}: segment {os.path.basename(path)} is {size} bytes, "
                                  f"recorded {entry.get('size')} (truncated or altered)")
    if not full_hash:
        return
    chunks = entry.get("chunks")
    if isinstance(chunks, list):  # one hash per MiB of the file: names where it was altered
        bad = first_bad_file_chunk(path, [str(c) for c in chunks])
        if bad is not None:
            raise JournalCorruptError(f"marker {seq}: segment {os.path.basename(path)} content does not match its "
                                      f"hash in file chunk {bad} (file bytes {bad * CHUNK}..{(bad + 1) * CHUNK})")
    elif file_sha256(path) != entry.get("sha256"):
        raise JournalCorruptError(f"marker {seq}: segment {os.path.basename(path)} content does not match its hash")

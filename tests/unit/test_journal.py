"""Journal records and segment files: every kind of damage is named, nothing
damaged passes (no QEMU needed: segments are opaque files here)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from plugin.errors import JournalCorruptError
from plugin.replication.journal import JournalDir, backing_name, file_sha256, record_crc, verify_record, verify_segment


def row(seq: int, **over: Any) -> dict[str, Any]:
    """A sealed record, then altered by ``over``."""
    segments = {"vda": {"size": 10, "sha256": "x"}}
    base = {"seq": seq, "cut_time": 1700000000.5, "disks": json.dumps(["vda"]), "bytes": json.dumps({"vda": 65536}),
            "label": "", "apply": 1, "segments": json.dumps(segments)}
    base["crc"] = record_crc(seq, base["cut_time"], ["vda"], {"vda": 65536}, "", True, segments)
    base.update(over)
    return base


def test_good_record_passes() -> None:
    assert verify_record(row(3), 3) == {"vda": {"size": 10, "sha256": "x"}}


@pytest.mark.parametrize("damage, message", [
    ({"label": "changed"}, "record checksum mismatch"),
    ({"cut_time": 1.0}, "record checksum mismatch"),
    ({"apply": 0}, "record checksum mismatch"),
    ({"segments": "{not json"}, "unreadable record"),
    ({"segments": json.dumps("a string")}, "unreadable record"),
    ({"disks": None}, "unreadable record"),
])
def test_altered_records_are_caught(damage: dict[str, Any], message: str) -> None:
    with pytest.raises(JournalCorruptError, match=message):
        verify_record(row(3, **damage), 3)


def test_missing_or_out_of_order_marker_is_caught() -> None:
    with pytest.raises(JournalCorruptError, match="marker 4 is missing"):
        verify_record(row(5), 4)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(["seq", "cut_time", "disks", "bytes", "label", "apply", "segments", "crc"]),
                       st.one_of(st.none(), st.integers(), st.text(max_size=20), st.floats(allow_nan=False)),
                       min_size=8))
def test_arbitrary_records_never_crash(fields: dict[str, Any]) -> None:
    try:
        verify_record(fields, 1)
    except JournalCorruptError:
        pass
    except (TypeError, ValueError, KeyError):
        pytest.fail("a malformed record must be reported as JournalCorruptError")


def test_segment_checks(tmp_path: Path) -> None:
    journal = JournalDir(str(tmp_path))
    seg = Path(journal.segment("vda", 7))
    seg.write_bytes(b"qcow2 data" * 100)
    entry = {"size": seg.stat().st_size, "sha256": file_sha256(str(seg))}
    verify_segment(journal, 7, "vda", entry, full_hash=True)
    with open(seg, "r+b") as f:
        f.write(b"Q")
    with pytest.raises(JournalCorruptError, match="does not match its hash"):
        verify_segment(journal, 7, "vda", entry, full_hash=True)
    with open(seg, "r+b") as f:
        f.truncate(50)
    with pytest.raises(JournalCorruptError, match="truncated or altered"):
        verify_segment(journal, 7, "vda", entry, full_hash=False)
    seg.unlink()
    with pytest.raises(JournalCorruptError, match="is missing"):
        verify_segment(journal, 7, "vda", entry, full_hash=False)


def test_views_follow_the_newest_segment_up_to_a_marker(tmp_path: Path) -> None:
    journal = JournalDir(str(tmp_path))
    for seq in (3, 5):
        Path(journal.segment("vda", seq)).write_bytes(b"x")
    Path(journal.segment("vda", 6, partial=True)).write_bytes(b"x")
    assert journal.view("vda", 2) == journal.base("vda")
    assert journal.view("vda", 4) == journal.segment("vda", 3)
    assert journal.view("vda", 6) == journal.segment("vda", 5)   # a partial segment is never a view
    assert journal.view("vdb", 6) == journal.base("vdb")          # a disk with no segment yet


def qcow2(path: Path, backing: str | None = None) -> None:
    argv = ["qemu-img", "create", "-q", "-f", "qcow2"]
    if backing:
        argv += ["-F", "qcow2", "-b", backing]
    subprocess.run(argv + [str(path), "1M"], check=True)


def chain(path: Path) -> list[str]:
    """The files qemu-img opens for ``path``, links resolved."""
    out = subprocess.run(["qemu-img", "info", "--backing-chain", "--output=json", str(path)],
                         check=True, capture_output=True, text=True).stdout
    return [(path.parent / i["filename"]).resolve().name for i in json.loads(out)]


@pytest.mark.skipif(not shutil.which("qemu-img"), reason="needs qemu-img")
def test_folded_segments_become_links_kept_while_named(tmp_path: Path) -> None:
    """Marker 3 is empty (no file): segment 4's backing names segment 2's.
    Folding turns segments into links to the base and removes a link only
    when no segment's backing names it; sealed segments are never rewritten."""
    j = JournalDir(str(tmp_path))
    qcow2(Path(j.base("vda")))
    qcow2(Path(j.segment("vda", 2)), "vda.base.qcow2")
    qcow2(Path(j.segment("vda", 4)), "vda.seg-00000002.qcow2")
    qcow2(Path(j.segment("vda", 5)), "vda.seg-00000004.qcow2")
    sealed = {s: file_sha256(j.segment("vda", s)) for s in (4, 5)}
    assert backing_name(j.segment("vda", 5)) == "vda.seg-00000004.qcow2"

    j.link_to_base("vda", 2)
    j.drop_unused_links("vda")      # marker 3 folded: nothing of its own
    assert [e[1] for e in j.entries()] == [4, 5], "a link is not a segment"
    assert j.links("vda") == [j.segment("vda", 2)], "segment 4 still names segment 2"
    assert chain(Path(j.segment("vda", 5))) == ["vda.seg-00000005.qcow2", "vda.seg-00000004.qcow2",
                                                "vda.base.qcow2"]
    assert j.view("vda", 3) == j.base("vda")

    j.link_to_base("vda", 4)
    j.drop_unused_links("vda")
    assert j.links("vda") == [j.segment("vda", 4)], "nothing names segment 2 any more"
    assert chain(Path(j.segment("vda", 5)))[-1] == "vda.base.qcow2"
    assert file_sha256(j.segment("vda", 5)) == sealed[5]

    j.link_to_base("vda", 5)
    j.drop_unused_links("vda")
    assert j.links("vda") == [] and j.entries() == []


def test_an_unreadable_header_keeps_every_link(tmp_path: Path) -> None:
    j = JournalDir(str(tmp_path))
    Path(j.base("vda")).write_bytes(b"")
    Path(j.segment("vda", 3)).write_bytes(b"QFI\xfb" + bytes(12))  # cut short
    j.link_to_base("vda", 2)
    j.drop_unused_links("vda")
    assert j.links("vda") == [j.segment("vda", 2)]
    assert backing_name(j.segment("vda", 3)) is None

"""Journal records and segment files: every kind of damage is named, nothing
damaged passes (no QEMU needed: segments are opaque files here)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from plugin.errors import JournalCorruptError
from plugin.replication.journal import JournalDir, file_sha256, record_crc, verify_record, verify_segment


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

"""The tracker's pure diff: what changed among the replicated disks."""

from __future__ import annotations

import pytest

from plugin.tracker import ChangeKind, DiskEntry, diff, exclusion, replicable


def disk(target: str, source: str = "", size: int = 1 << 30, **kw: object) -> DiskEntry:
    return DiskEntry(target, source or f"/var/lib/libvirt/images/{target}.qcow2", kw.pop("fmt", "qcow2"),  # type: ignore[arg-type]
                     size, **kw)  # type: ignore[arg-type]


def kinds(changes: list) -> list[tuple[str, str]]:  # type: ignore[type-arg]
    return [(c.kind.value, c.target) for c in changes]


def test_no_change_no_diff() -> None:
    disks = [disk("vda"), disk("vdb")]
    assert diff(disks, list(disks)) == []


def test_added_removed_retargeted_resized() -> None:
    old = [disk("vda"), disk("vdb"), disk("vdc")]
    new = [disk("vda", size=2 << 30), disk("vdb", source="/other/vdb.qcow2"), disk("vdd")]
    assert kinds(diff(old, new)) == [("resized", "vda"), ("retargeted", "vdb"), ("removed", "vdc"),
                                     ("added", "vdd")]


def test_retarget_wins_over_resize_and_format_change_counts() -> None:
    old = [disk("vda")]
    assert kinds(diff(old, [disk("vda", source="/x.qcow2", size=5)])) == [("retargeted", "vda")]


@pytest.mark.parametrize("entry, reason", [
    (disk("hdc", device="cdrom"), "a cdrom"),
    (disk("vdb", read_only=True), "read-only"),
    (disk("vdb", shareable=True), "shareable"),
    (disk("vdb", disk_type="network"), "network disk"),
    (disk("vdb", fmt="raw"), "format raw"),
])
def test_unsupported_disks_are_excluded_not_errors(entry: DiskEntry, reason: str) -> None:
    assert reason in (exclusion(entry) or "")
    assert replicable([disk("vda"), entry]) == [disk("vda")]
    # appearing or disappearing, an excluded disk is never a pair change
    assert diff([disk("vda")], [disk("vda"), entry]) == []


def test_metadata_exclusion_retires_a_pair() -> None:
    disks = [disk("vda"), disk("vdb")]
    changes = diff(disks, disks, excluded_targets={"vdb"}, excluded_before=set())
    assert kinds(changes) == [("removed", "vdb")]
    assert "excluded by the domain's protection metadata" in changes[0].detail


def test_a_disk_turned_read_only_retires_with_the_reason() -> None:
    changes = diff([disk("vdb")], [disk("vdb", read_only=True)])
    assert changes[0].kind is ChangeKind.REMOVED and "read-only" in changes[0].detail


def test_json_round_trip() -> None:
    entry = disk("vda", serial="abc", size=123)
    assert DiskEntry.from_json(entry.to_json()) == entry


def test_excluded_before_and_still_excluded_is_quiet() -> None:
    disks = [disk("vda"), disk("vdb")]
    assert diff(disks, disks, excluded_targets={"vdb"}, excluded_before={"vdb"}) == []
    assert kinds(diff(disks, disks, excluded_targets=set(), excluded_before={"vdb"})) == [("added", "vdb")]

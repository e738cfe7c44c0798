"""The mapping tracker's pure core: which disks a domain has, what changed
since the last look, and what replication must do about it.

The daemon feeds it disk lists read from libvirt (on events, hook calls, a
timer and at start) and stores each list; nothing here does I/O.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any


class ChangeKind(enum.Enum):
    ADDED = "added"            # a new disk: a new pair, full copy of that disk only
    REMOVED = "removed"        # the pair retires; its journal data stays per retention
    RETARGETED = "retargeted"  # same target, other source: re-created, full copy
    RESIZED = "resized"        # the replica grows with it
    EXCLUDED = "excluded"      # present but not replicated (cdrom, read-only, network, raw, ...)


@dataclass(frozen=True, slots=True)
class DiskEntry:
    """One disk as the tracker compares it."""

    target: str
    source: str
    fmt: str
    size: int
    device: str = "disk"
    disk_type: str = "file"
    serial: str = ""
    read_only: bool = False
    shareable: bool = False

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> DiskEntry:
        return cls(**{k: obj[k] for k in cls.__slots__ if k in obj})


@dataclass(frozen=True, slots=True)
class DiskChange:
    kind: ChangeKind
    target: str
    detail: str


def exclusion(disk: DiskEntry, excluded_targets: Iterable[str] = ()) -> str | None:
    """Why this disk is not replicated, or None when it is."""
    if disk.target in set(excluded_targets):
        return "excluded by the domain's protection metadata"
    if disk.device != "disk":
        return f"a {disk.device}, not a disk"
    if disk.read_only:
        return "read-only"
    if disk.shareable:
        return "shareable (shared between domains)"
    if disk.disk_type not in ("file", "block", "volume"):
        return f"a {disk.disk_type} disk (only local disks are supported)"
    if disk.fmt != "qcow2":
        return f"format {disk.fmt} (asynchronous mode needs qcow2 persistent dirty bitmaps)"
    return None


def replicable(disks: Sequence[DiskEntry], excluded_targets: Iterable[str] = ()) -> list[DiskEntry]:
    excluded = set(excluded_targets)
    return [d for d in disks if exclusion(d, excluded) is None]


def diff(old: Sequence[DiskEntry], new: Sequence[DiskEntry], excluded_targets: Iterable[str] = (),
         excluded_before: Iterable[str] | None = None) -> list[DiskChange]:
    """What changed among the replicated disks between two lists, in target order.

    ``excluded_targets`` are the metadata's exclusions now, ``excluded_before``
    those of the old list (the same when not given). A disk whose source
    changed under the same target is *retargeted*, never silently kept: its
    pair must start over with a full copy.
    """
    excluded = set(excluded_targets)
    was_excluded = excluded if excluded_before is None else set(excluded_before)
    before = {d.target: d for d in replicable(old, was_excluded)}
    after = {d.target: d for d in replicable(new, excluded)}
    changes: list[DiskChange] = []
    for target in sorted(set(before) | set(after)):
        a, b = before.get(target), after.get(target)
        if a is None and b is not None:
            changes.append(DiskChange(ChangeKind.ADDED, target, f"{b.source} ({b.fmt}, {b.size} bytes)"))
        elif b is None and a is not None:
            now = next((d for d in new if d.target == target), None)
            why = exclusion(now, excluded) if now is not None else None
            changes.append(DiskChange(ChangeKind.REMOVED, target, f"{a.source}" + (f": now {why}" if why else "")))
        elif a is not None and b is not None:
            if a.source != b.source or a.fmt != b.fmt:
                changes.append(DiskChange(ChangeKind.RETARGETED, target, f"{a.source} -> {b.source}"))
            elif a.size != b.size:
                changes.append(DiskChange(ChangeKind.RESIZED, target, f"{a.size} -> {b.size} bytes"))
    return changes

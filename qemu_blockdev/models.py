"""Frozen views of QEMU's query replies, checked as they are parsed.

A reply that lacks a field we rely on is a :class:`TransportError`: QEMU did not
say what we asked, and guessing would hide it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .errors import TransportError


def _field(obj: Any, key: str, kind: type, what: str) -> Any:
    if not isinstance(obj, Mapping):
        raise TransportError(f"malformed {what}: expected an object, got {obj!r:.120}")
    value = obj.get(key)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise TransportError(f"malformed {what}: field {key!r} is {value!r:.80}")
    return value


def _list(obj: Any, what: str) -> list[Any]:
    if not isinstance(obj, list):
        raise TransportError(f"malformed {what}: expected a list, got {obj!r:.120}")
    return obj


@dataclass(frozen=True, slots=True)
class BitmapInfo:
    """A dirty bitmap as query-named-block-nodes reports it."""

    name: str
    count: int
    granularity: int
    persistent: bool
    recording: bool
    busy: bool
    inconsistent: bool

    @classmethod
    def from_qmp(cls, obj: Any) -> BitmapInfo:
        what = "dirty bitmap info"
        return cls(
            name=_field(obj, "name", str, what),
            count=_field(obj, "count", int, what),
            granularity=_field(obj, "granularity", int, what),
            persistent=bool(obj.get("persistent", False)),
            recording=bool(obj.get("recording", False)),
            busy=bool(obj.get("busy", False)),
            inconsistent=bool(obj.get("inconsistent", False)),
        )


@dataclass(frozen=True, slots=True)
class BlockNode:
    """One node of query-named-block-nodes ``{"flat": true}``."""

    node_name: str
    driver: str
    filename: str
    read_only: bool
    virtual_size: int
    backing_file: str | None
    bitmaps: tuple[BitmapInfo, ...]

    @classmethod
    def from_qmp(cls, obj: Any) -> BlockNode:
        what = "block node"
        image = obj.get("image") if isinstance(obj, Mapping) else None
        size = image.get("virtual-size", 0) if isinstance(image, Mapping) else 0
        return cls(
            node_name=_field(obj, "node-name", str, what),
            driver=_field(obj, "drv", str, what),
            filename=str(obj.get("file", "")),
            read_only=bool(obj.get("ro", False)),
            virtual_size=int(size),
            backing_file=obj.get("backing_file"),
            # Anonymous bitmaps (QEMU's own, e.g. a running backup's) have no name.
            bitmaps=tuple(BitmapInfo.from_qmp(b) for b in _list(obj.get("dirty-bitmaps", []), what)
                          if not (isinstance(b, Mapping) and "name" not in b)),
        )

    def bitmap(self, name: str) -> BitmapInfo | None:
        return next((b for b in self.bitmaps if b.name == name), None)


@dataclass(frozen=True, slots=True)
class JobInfo:
    """One entry of query-jobs."""

    job_id: str
    job_type: str
    status: str
    current_progress: int
    total_progress: int
    error: str | None

    @classmethod
    def from_qmp(cls, obj: Any) -> JobInfo:
        what = "job info"
        error = obj.get("error") if isinstance(obj, Mapping) else None
        return cls(
            job_id=_field(obj, "id", str, what),
            job_type=_field(obj, "type", str, what),
            status=_field(obj, "status", str, what),
            current_progress=_field(obj, "current-progress", int, what),
            total_progress=_field(obj, "total-progress", int, what),
            error=str(error) if error is not None else None,
        )


def parse_nodes(reply: Any) -> list[BlockNode]:
    return [BlockNode.from_qmp(n) for n in _list(reply, "query-named-block-nodes reply")]


def parse_jobs(reply: Any) -> list[JobInfo]:
    return [JobInfo.from_qmp(j) for j in _list(reply, "query-jobs reply")]

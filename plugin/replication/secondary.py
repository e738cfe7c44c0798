"""The secondary: replicas, journal segments and markers for a peer's domains.

Layout under ``storage/<domain uuid>/``::

    vda.qcow2                     the replica (the journal's base)
    vda.seg-00000042.qcow2.partial  a cycle's segment while it is being written
    vda.seg-00000042.qcow2        sealed: complete, flushed, renamed (borg-style commit)

A cycle opens one writable NBD export per disk (the base for the first, full
copy; a new qcow2 overlay of the base afterwards). Commit closes the exports
(flushing), fsyncs and seals the segments, and only then records the marker.
Applying commits sealed segments into the base, oldest first; it is
idempotent, so a crash mid-apply is repaired by applying again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import time
import uuid as uuidlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from qemu_blockdev import BlockdevError, commands, nodes
from qemu_blockdev.transport import QmpTransport

from ..config import Config
from ..domain import Marker, PairState, Protection
from ..errors import PluginError, StateConflictError
from ..state import Store

log = logging.getLogger("virtsync.secondary")
ROLE = "secondary"


class PeerRequestError(PluginError):
    """A peer asked for something this host will not do (bad or stale request)."""

    exit_code = 2


@dataclass
class OpenCycle:
    seq: int
    kind: str
    # target -> (pair id, image path being written)
    disks: dict[str, tuple[int, str]] = field(default_factory=dict)


def check_uuid(value: object) -> str:
    try:
        return str(uuidlib.UUID(str(value)))
    except ValueError:
        raise PeerRequestError(f"not a domain uuid: {value!r:.60}") from None


def check_target(value: object) -> str:
    if not isinstance(value, str) or not value.isalnum() or not 1 <= len(value) <= 16:
        raise PeerRequestError(f"not a disk target: {value!r:.40}")
    return value


async def _run(*argv: str) -> None:
    proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    if proc.returncode != 0:
        raise PluginError(f"{argv[0]} {argv[1]} failed: {err.decode(errors='replace').strip()[:300]}")


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Secondary:
    """Serves the peer API's replica operations; one lock per domain."""

    def __init__(self, cfg: Config, store: Store, qmp: QmpTransport) -> None:
        self.cfg = cfg
        self.store = store
        self.qmp = qmp
        self._open: dict[str, OpenCycle] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    def _lock(self, uuid: str) -> asyncio.Lock:
        return self._locks.setdefault(uuid, asyncio.Lock())

    def domain_dir(self, uuid: str) -> str:
        return os.path.join(self.cfg.storage, check_uuid(uuid))

    def base_path(self, uuid: str, target: str) -> str:
        return os.path.join(self.domain_dir(uuid), f"{target}.qcow2")

    def segment_path(self, uuid: str, target: str, seq: int, *, partial: bool = False) -> str:
        name = f"{target}.seg-{seq:08d}.qcow2" + (".partial" if partial else "")
        return os.path.join(self.domain_dir(uuid), name)

    # -- recovery -------------------------------------------------------------

    async def recover(self) -> None:
        """Discard uncommitted segments; finish applying committed ones."""
        for prot in self.store.protections(ROLE):
            uuid = prot["domain_uuid"]
            ddir = self.domain_dir(uuid)
            if not os.path.isdir(ddir):
                continue
            committed = {m.seq: m for m in self.store.markers(uuid)}
            for name in sorted(os.listdir(ddir)):
                path = os.path.join(ddir, name)
                if name.endswith(".partial"):
                    os.unlink(path)
                    self.store.audit("segment-discarded", uuid, file=name, why="no committed marker")
                    log.warning("%s: discarded uncommitted segment %s", uuid, name)
                elif ".seg-" in name:
                    seq = int(name.split(".seg-")[1].split(".")[0])
                    if seq not in committed:
                        os.unlink(path)
                        self.store.audit("segment-discarded", uuid, file=name, why="marker missing")
            await self._apply_pending(uuid)

    # -- peer operations --------------------------------------------------------

    async def prepare(self, uuid: str, domain: str, primary: str, disks: Sequence[Mapping[str, Any]],
                      protection: Mapping[str, Any]) -> dict[str, Any]:
        """Create (or check) the replica images for a domain's disks."""
        uuid = check_uuid(uuid)
        async with self._lock(uuid):
            ddir = self.domain_dir(uuid)
            os.makedirs(ddir, mode=0o700, exist_ok=True)
            for disk in disks:
                target = check_target(disk.get("target"))
                size = disk.get("size")
                if not isinstance(size, int) or not 0 < size <= 1 << 50:
                    raise PeerRequestError(f"disk {target}: bad size {size!r:.30}")
                base = self.base_path(uuid, target)
                if not os.path.exists(base):
                    await _run("qemu-img", "create", "-q", "-f", "qcow2", base, str(size))
                self.store.upsert_pair(uuid, ROLE, domain, target, primary, size, PairState.INITIAL_COPY)
            if self.store.protection(uuid, ROLE) is None:
                prot = Protection(peer=primary, segment=str(protection.get("segment", "default")),
                                  rpo=int(protection.get("rpo", 300)), mode=str(protection.get("mode", "async")))
                self.store.add_protection(uuid, ROLE, domain, prot)
            last = self.store.last_marker(uuid)
            return {"last_marker": last.seq if last else 0}

    async def open_cycle(self, uuid: str, seq: int, kind: str, targets: Sequence[str]) -> dict[str, Any]:
        """Export one writable image per disk for cycle ``seq``."""
        uuid = check_uuid(uuid)
        async with self._lock(uuid):
            prot = self._require(uuid)
            if kind not in ("full", "incremental"):
                raise PeerRequestError(f"unknown cycle kind {kind!r:.20}")
            last = self.store.last_marker(uuid)
            expected = (last.seq if last else 0) + 1
            if seq != expected:
                raise PeerRequestError(f"cycle {seq} out of order: the next marker of {prot['domain']} is {expected}")
            known = {p.target: p for p in self.store.pairs(ROLE, uuid)}
            wanted = [check_target(t) for t in targets]
            if not wanted or set(wanted) - set(known):
                raise PeerRequestError(f"cycle names unknown disks {sorted(set(wanted) - set(known))}")
            if kind == "incremental" and last is None:
                raise PeerRequestError("an incremental cycle needs a previous marker")
            await self._close_open(uuid, discard=True)
            cycle = OpenCycle(seq, kind)
            self._open[uuid] = cycle
            exports = {}
            for target in wanted:
                pair_id = self._pair_id(uuid, target)
                if last is None:
                    path = self.base_path(uuid, target)
                else:
                    path = self.segment_path(uuid, target, seq, partial=True)
                    await _run("qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b",
                               os.path.basename(self.base_path(uuid, target)), path, str(known[target].size))
                cycle.disks[target] = (pair_id, path)
                await nodes.blockdev_add(self.qmp, commands.file_node(f"vs-p{pair_id}-f", path))
                await nodes.blockdev_add(self.qmp, commands.qcow2_node(f"vs-p{pair_id}", f"vs-p{pair_id}-f"))
                exports[target] = await nodes.export_add(self.qmp, f"vs-e{pair_id}", f"vs-p{pair_id}",
                                                         name=f"{uuid}-{target}", writable=True)
            return {"host": self.cfg.replication_address, "port": self.cfg.replication_port, "exports": exports}

    async def commit_cycle(self, uuid: str, seq: int, cut_time: float, nbytes: Mapping[str, int],
                           label: str = "", apply: bool = True) -> dict[str, Any]:
        """Seal the cycle's segments and record its marker; then apply it."""
        uuid = check_uuid(uuid)
        async with self._lock(uuid):
            cycle = self._open.get(uuid)
            if cycle is None or cycle.seq != seq:
                raise PeerRequestError(f"no open cycle {seq} for {uuid}")
            await self._close_open(uuid, discard=False)
            ddir = self.domain_dir(uuid)
            for target, (_, path) in cycle.disks.items():
                _fsync(path)
                if path.endswith(".partial"):
                    os.replace(path, self.segment_path(uuid, target, seq))
            _fsync(ddir)
            marker = Marker(seq, uuid, float(cut_time), tuple(sorted(cycle.disks)),
                            {k: int(v) for k, v in nbytes.items()}, label, apply)
            self.store.commit_marker(marker)
            self.store.set_pair_state(uuid, ROLE, PairState.ACTIVE)
            await self._apply_pending(uuid)
            return {"seq": seq, "cut_time": marker.cut_time, "bytes": marker.bytes}

    async def abort_cycle(self, uuid: str, seq: int) -> None:
        uuid = check_uuid(uuid)
        async with self._lock(uuid):
            cycle = self._open.get(uuid)
            if cycle is not None and cycle.seq == seq:
                await self._close_open(uuid, discard=True)

    async def remove(self, uuid: str, keep_replica: bool) -> None:
        uuid = check_uuid(uuid)
        async with self._lock(uuid):
            await self._close_open(uuid, discard=True)
            if not keep_replica:
                shutil.rmtree(self.domain_dir(uuid), ignore_errors=True)
                self.store.drop_markers(uuid)
            if self.store.protection(uuid, ROLE) is not None:
                self.store.remove_protection(uuid, ROLE)

    def info(self, uuid: str) -> dict[str, Any]:
        uuid = check_uuid(uuid)
        markers = self.store.markers(uuid)
        return {
            "protected": self.store.protection(uuid, ROLE) is not None,
            "last_marker": markers[-1].seq if markers else 0,
            "markers": [{"seq": m.seq, "cut_time": m.cut_time, "bytes": m.bytes, "label": m.label,
                         "apply": m.apply, "applied": m.applied} for m in markers],
        }

    # -- internals ------------------------------------------------------------

    def _require(self, uuid: str) -> Any:
        prot = self.store.protection(uuid, ROLE)
        if prot is None:
            raise StateConflictError(f"domain {uuid} is not replicated to this host", state="absent",
                                     required="protected")
        return prot

    def _pair_id(self, uuid: str, target: str) -> int:
        return self.store.pair_id(uuid, ROLE, target)

    async def _close_open(self, uuid: str, *, discard: bool) -> None:
        """Remove a cycle's exports and nodes (closing flushes the images)."""
        cycle = self._open.pop(uuid, None)
        if cycle is None:
            return
        for _, (pair_id, path) in cycle.disks.items():
            with contextlib.suppress(BlockdevError):
                await nodes.export_del(self.qmp, f"vs-e{pair_id}", force=discard)
            for node in (f"vs-p{pair_id}", f"vs-p{pair_id}-f"):
                await nodes.blockdev_del(self.qmp, node, missing_ok=True)
            if discard and path.endswith(".partial"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
        if discard:
            self.store.audit("cycle-discarded", uuid, seq=cycle.seq)

    async def _apply_pending(self, uuid: str) -> None:
        """Commit sealed segments of applicable markers into the replica, in order."""
        for marker in self.store.markers(uuid):
            if marker.applied:
                continue
            if not marker.apply:
                break  # never pass a marker that forbids it
            for target in marker.disks:
                seg = self.segment_path(uuid, target, marker.seq)
                if os.path.exists(seg):
                    started = time.monotonic()
                    await _run("qemu-img", "commit", "-q", "-d", "-f", "qcow2", seg)
                    _fsync(self.base_path(uuid, target))
                    os.unlink(seg)
                    log.debug("%s: applied %s in %.3fs", uuid, os.path.basename(seg), time.monotonic() - started)
            _fsync(self.domain_dir(uuid))
            self.store.set_marker_applied(uuid, marker.seq)

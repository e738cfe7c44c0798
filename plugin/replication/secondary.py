"""The secondary: replicas, journal and reflecting unit for a peer's domains.

A cycle opens one writable NBD export per disk: the base for the very first,
full copy; afterwards a new qcow2 segment whose backing is the disk's newest
sealed segment. Commit closes the exports (flushing), fsyncs and seals the
segments (``.partial`` renamed away, borg-style), hashes them, and only then
records the marker. A segment without a committed marker is discarded.

The reflecting unit moves the replica (``applied``) forward over markers that
allow it, oldest first, after checking each marker's record and segments.
Since sealed segments never change, the replica is always exactly some
marker. Retention folds the oldest applied segments into the base (commit,
then a link to the base in the segment's place); every fold step is
idempotent and its intent is recorded first, so a crash at any point is
repaired by doing it again.

Integrity (:mod:`.integrity`): the base's chunk hashes follow every fold; a
restore checks each byte it returns; ``verify`` scrubs a replica. Damage is
reported (``integrity.json`` in the journal directory, ``markers``, ``status``)
and repaired from the primary: ``info`` names the damaged chunks the newest
marker still reads, the primary's next cut sends them again.

Size (~1,000 lines): this module holds three ideas that share the per-replica lock and
open-cycle table: receiving cycles (prepare, open, commit, abort), the reflecting unit
(apply, fold, retain, space), and the damage bookkeeping around :mod:`.integrity` (notes,
scrub, repair ranges, ~300 lines). The last is the next to move out, into a module of
its own behind the same lock, before the switchover adds promotion here.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import secrets
import shutil
import time
import uuid as uuidlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from qemu_blockdev import BlockdevError, commands, nodes
from qemu_blockdev.transport import QmpTransport

from ..config import Config
from ..domain import Marker, PairState, Protection, Role, label_problem
from ..errors import JournalCorruptError, JournalError, PluginError, StateConflictError
from ..faults import fault_point
from ..state import Store
from . import integrity
from .journal import JournalDir, fsync_path, record_crc, verify_record, verify_segment
from .limits import PeerRequestError as PeerRequestError  # its home was here: callers import it from here
from .limits import (
    check_disk_count,
    check_disk_size,
    check_domain_name,
    check_name_free,
    check_room,
    free_bytes,
    pick_replica,
)
from .nbd_servers import NbdServers, OneServer
from .tools import run_tool

log = logging.getLogger("virtsync.secondary")
ROLE = Role.SECONDARY


class PeerForbiddenError(PeerRequestError):
    """An authenticated peer asked about a replica that belongs to another peer."""


class JournalFullError(JournalError):
    """The journal reached its space limit and the policy refuses new cycles."""


@dataclass
class OpenCycle:
    seq: int
    kind: str
    qmp: QmpTransport  # the owner's NBD server daemon, where the exports are
    # target -> (pair id, image path being written)
    disks: dict[str, tuple[int, str]] = field(default_factory=dict)


def _check_marker_fields(label: str, cut_time: float) -> None:
    problem = label_problem(label)
    if problem:
        raise PeerRequestError(problem)
    if isinstance(cut_time, bool) or not isinstance(cut_time, (int, float)) or not math.isfinite(cut_time) \
            or cut_time < 0:
        raise PeerRequestError(f"bad cut time {cut_time!r:.30}")


def check_uuid(value: object) -> str:
    try:
        return str(uuidlib.UUID(str(value)))
    except ValueError:
        raise PeerRequestError(f"not a domain uuid: {value!r:.60}") from None


def check_target(value: object) -> str:
    if not isinstance(value, str) or not value.isascii() or not value.isalnum() or not 1 <= len(value) <= 16:
        raise PeerRequestError(f"not a disk target: {value!r:.40}")
    return value


class Secondary:
    """Serves the peer API's replica operations and the local journal commands."""

    def __init__(self, cfg: Config, store: Store, servers: NbdServers | QmpTransport) -> None:
        """:param servers: the NBD server of each peer (:mod:`.nbd_servers`); one daemon's QMP
            serves every peer on ``replication.port`` (tests)"""
        self.cfg = cfg
        self.store = store
        self.servers = servers if isinstance(servers, NbdServers) else OneServer(servers, cfg.replication_port)
        self._open: dict[str, OpenCycle] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._names = asyncio.Lock()  # a name is checked free and taken in one step
        self._pins: dict[str, int] = {}  # restores in progress: no folding meanwhile
        self._expiry: dict[str, asyncio.Task[None]] = {}  # closes a cycle its primary abandoned
        self.damage: dict[str, str] = {}  # uuid -> why the journal stops there
        self._halted: set[str] = set()  # a marker record is damaged: no cycle adds to that journal

    def _lock(self, uuid: str) -> asyncio.Lock:
        return self._locks.setdefault(uuid, asyncio.Lock())

    def journal(self, uuid: str) -> JournalDir:
        return JournalDir(os.path.join(self.cfg.storage, check_uuid(uuid)))

    def _prot(self, uuid: str) -> Any:
        prot = self.store.protection(uuid, ROLE)
        if prot is None:
            raise StateConflictError(f"domain {uuid} is not replicated to this host", state="absent",
                                     required="protected")
        return prot

    def authorize(self, uuid: str, caller: str) -> None:
        """Only the peer that owns a replica (its primary) may act on it or read it.

        :raise PeerForbiddenError: the replica of ``uuid`` belongs to another peer
        """
        prot = self.store.protection(check_uuid(uuid), ROLE)
        if prot is not None and prot["peer"] != caller:
            log.warning("peer %s refused: the replica of %s belongs to %s", caller, prot["domain"], prot["peer"])
            raise PeerForbiddenError(f"peer {caller} may not act on the replica of {prot['domain']}: "
                                     f"it belongs to {prot['peer']}")

    def find(self, name: str, peer: str | None = None) -> str:
        """The uuid of the replica of domain ``name`` (or uuid) kept here, from ``peer`` if given.

        :raise AmbiguousNameError: several replicas have that name
        """
        prot = pick_replica(name, self.store.protections(ROLE), peer)
        if prot is None:
            source = f" from peer {peer}" if peer is not None else ""
            raise StateConflictError(f"no replica of domain {name!r:.80}{source} on this host", state="absent",
                                     required="replica")
        return str(prot["domain_uuid"])

    # -- recovery -------------------------------------------------------------

    async def recover(self) -> None:
        """After a restart: finish an interrupted fold, discard segments that no
        committed marker names, then let the reflecting unit catch up."""
        for prot in self.store.protections(ROLE):
            uuid = prot["domain_uuid"]
            async with self._lock(uuid):
                if prot["folding"]:
                    try:
                        await self._fold_one(uuid, int(prot["folding"]), resume=True)
                    except JournalCorruptError as e:
                        self.note_damage(uuid, f"marker {prot['folding']} not folded: {e}")
                committed = {int(r["seq"]) for r in self.store.marker_rows(uuid)}
                for _target, seq, partial, path in self.journal(uuid).entries():
                    if partial or seq not in committed:
                        os.unlink(path)
                        why = "uncommitted" if partial else "no marker record"
                        self.store.audit("segment-discarded", uuid, file=os.path.basename(path), why=why)
                        log.warning("%s: discarded %s segment %s", uuid, why, os.path.basename(path))
                if os.path.isdir(self.journal(uuid).root):
                    fsync_path(self.journal(uuid).root)
                await self._reflect(uuid)

    # -- peer operations --------------------------------------------------------

    async def prepare(self, uuid: str, domain: str, primary: str, disks: Sequence[Mapping[str, Any]],
                      protection: Mapping[str, Any]) -> dict[str, Any]:
        """Create (or check) the replica images for a domain's disks."""
        uuid = check_uuid(uuid)
        domain = check_domain_name(domain)
        check_disk_count(disks)
        checked = []
        for disk in disks:
            target = check_target(disk.get("target"))
            checked.append((target, check_disk_size(target, disk.get("size"))))
        if not checked or len({t for t, _ in checked}) != len(checked):
            raise PeerRequestError("prepare needs distinct disk targets")
        try:  # checked before anything is created: a refused prepare leaves nothing behind
            prot = Protection(peer=primary, segment=str(protection.get("segment", "default")),
                              rpo=int(protection.get("rpo", 300)), mode=str(protection.get("mode", "async")))
        except (TypeError, ValueError) as e:
            raise PeerRequestError(f"bad protection: {e}") from None
        async with self._names, self._lock(uuid):
            self.authorize(uuid, primary)  # again under the lock: another peer may have won the race
            check_name_free(domain, uuid, primary, self.store.protections(ROLE))
            journal = self.journal(uuid)
            new = {t: s for t, s in checked if not os.path.exists(journal.base(t))}
            if new:
                os.makedirs(self.cfg.storage, mode=0o700, exist_ok=True)
                check_room(new, free_bytes(self.cfg.storage))
            os.makedirs(journal.root, mode=0o700, exist_ok=True)
            for target, size in checked:
                if not os.path.exists(journal.base(target)):
                    await run_tool("qemu-img", "create", "-q", "-f", "qcow2", journal.base(target), str(size))
                    await asyncio.to_thread(integrity.seal_base, journal.base(target), 0)
                self.store.upsert_pair(uuid, ROLE, domain, target, primary, size, PairState.INITIAL_COPY)
            if self.store.protection(uuid, ROLE) is None:
                self.store.add_protection(uuid, ROLE, domain, prot)
            last = self.store.last_marker(uuid)
            return {"last_marker": last.seq if last else 0}

    async def open_cycle(self, uuid: str, seq: int, kind: str, targets: Sequence[str],
                         sizes: Mapping[str, int] | None = None) -> dict[str, Any]:
        """Export one writable image per disk for cycle ``seq``; ``sizes`` are
        the disks' current sizes (a grown disk gets a segment of its new size)."""
        uuid = check_uuid(uuid)
        async with self._lock(uuid):
            prot = self._prot(uuid)
            if kind not in ("full", "incremental"):
                raise PeerRequestError(f"unknown cycle kind {kind!r:.20}")
            last = self.store.last_marker(uuid)
            expected = (last.seq if last else 0) + 1
            if seq != expected:
                raise PeerRequestError(f"cycle {seq} out of order: the next marker of {prot['domain']} is {expected}")
            known = {p.target: p for p in self.store.pairs(ROLE, uuid)}
            wanted = [check_target(t) for t in targets]
            # A marker is a cut across all the domain's disks: a cycle covers every one, once.
            if set(wanted) != set(known) or len(set(wanted)) != len(wanted):
                raise PeerRequestError(f"cycle names disks {sorted(wanted)}, the domain has {sorted(known)}")
            if kind == "incremental" and last is None:
                raise PeerRequestError("an incremental cycle needs a previous marker")
            if uuid in self._halted:
                raise JournalCorruptError(f"journal of {prot['domain']} is damaged: {self.damage.get(uuid)}")
            await self._close_open(uuid, discard=True)
            await self._enforce_space(uuid)
            journal = self.journal(uuid)
            # Only the owner's daemon: its server knows no other peer's key.
            qmp, port = self.servers.server(prot["peer"])
            cycle = OpenCycle(seq, kind, qmp)
            self._open[uuid] = cycle
            exports = {}
            for target in wanted:
                pair_id = self.store.pair_id(uuid, ROLE, target)
                size = check_disk_size(target, (sizes or {}).get(target, known[target].size))
                if size < known[target].size:
                    raise PeerRequestError(f"disk {target}: bad size {size!r:.30} (replica is {known[target].size})")
                if size > known[target].size:
                    check_room({target: size - known[target].size}, free_bytes(self.cfg.storage))
                if size != known[target].size:
                    self.store.upsert_pair(uuid, ROLE, prot["domain"], target, prot["peer"], size, PairState.ACTIVE)
                    self.store.audit("replica-resized", uuid, target=target, size=size)
                if last is None:
                    path = journal.base(target)
                else:
                    backing = journal.view(target, last.seq)
                    path = journal.segment(target, seq, partial=True)
                    await run_tool("qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b",
                                   os.path.basename(backing), path, str(size))
                cycle.disks[target] = (pair_id, path)
                await nodes.blockdev_add(qmp, commands.file_node(f"vs-p{pair_id}-f", path))
                await nodes.blockdev_add(qmp, commands.qcow2_node(f"vs-p{pair_id}", f"vs-p{pair_id}-f"))
                # Not guessable, and new every cycle: a name seen once opens nothing later.
                exports[target] = await nodes.export_add(qmp, f"vs-e{pair_id}", f"vs-p{pair_id}",
                                                         name=f"{uuid}-{target}-{secrets.token_hex(16)}",
                                                         writable=True)
            self._expire_later(uuid, cycle)
            return {"host": self.cfg.replication_address, "port": port, "exports": exports}

    async def commit_cycle(self, uuid: str, seq: int, cut_time: float, nbytes: Mapping[str, int],
                           label: str = "", apply: bool = True) -> dict[str, Any]:
        """Seal the cycle's segments and record its marker; then reflect."""
        uuid = check_uuid(uuid)
        _check_marker_fields(label, cut_time)
        for value in nbytes.values():
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise PeerRequestError(f"bad byte count {value!r:.30}: bytes map disks to counts >= 0")
        async with self._lock(uuid):
            cycle = self._open.get(uuid)
            if cycle is None or cycle.seq != seq:
                raise PeerRequestError(f"no open cycle {seq} for {uuid}")
            if set(nbytes) != set(cycle.disks):
                raise PeerRequestError(f"commit of cycle {seq} names disks {sorted(nbytes)}, "
                                       f"the cycle has {sorted(cycle.disks)}")
            await self._close_open(uuid, discard=False)
            journal = self.journal(uuid)
            segments: dict[str, Any] = {}
            for target, (_, path) in cycle.disks.items():
                fsync_path(path)
                if path.endswith(".partial"):
                    sealed = journal.segment(target, seq)
                    os.replace(path, sealed)
                    # Hashing takes ~0.1 s per 100 MiB: off the event loop, so other
                    # domains' cycles and peer calls are not held up meanwhile.
                    chunks = await asyncio.to_thread(integrity.file_chunk_digests, sealed)
                    chunk_size = self._chunk_size(journal, target)
                    holds = await asyncio.to_thread(integrity.segment_chunks, sealed, chunk_size)
                    segments[target] = {"size": os.stat(sealed).st_size, "chunks": chunks, "holds": holds,
                                        "holds_chunk": chunk_size}
                else:  # the full copy went into the base itself: its chunk hashes start here
                    await asyncio.to_thread(integrity.seal_base, path, seq)
            fsync_path(journal.root)
            fault_point("seal-before-marker")
            return await self._record(uuid, seq, cut_time, sorted(cycle.disks), nbytes, label, apply, segments)

    async def commit_empty(self, uuid: str, seq: int, cut_time: float, label: str = "",
                           apply: bool = True) -> dict[str, Any]:
        """Record a marker at which no disk changed since the previous one: no
        export, no segment; every disk's view is its previous one."""
        uuid = check_uuid(uuid)
        _check_marker_fields(label, cut_time)
        async with self._lock(uuid):
            prot = self._prot(uuid)
            last = self.store.last_marker(uuid)
            if last is None or seq != last.seq + 1:
                raise PeerRequestError(f"empty marker {seq} out of order: the next marker of {prot['domain']} is "
                                       f"{(last.seq if last else 0) + 1} and needs a previous one")
            await self._close_open(uuid, discard=True)
            disks = sorted(p.target for p in self.store.pairs(ROLE, uuid))
            return await self._record(uuid, seq, cut_time, disks, dict.fromkeys(disks, 0), label, apply, {})

    async def _record(self, uuid: str, seq: int, cut_time: float, disks: list[str], nbytes: Mapping[str, int],
                      label: str, apply: bool, segments: dict[str, Any]) -> dict[str, Any]:
        """Commit a marker record (its segments already sealed), then reflect. Lock held."""
        marker = Marker(seq, uuid, float(cut_time), tuple(disks), {k: int(v) for k, v in nbytes.items()},
                        label, apply)
        crc = record_crc(seq, marker.cut_time, disks, marker.bytes, label, apply, segments)
        self.store.commit_marker(marker, segments, crc)
        if seq == 1:
            # The first marker is the full copy into the base itself.
            self.store.set_protection(uuid, ROLE, base_seq=1, applied=1)
        self.store.set_pair_state(uuid, ROLE, PairState.ACTIVE)
        fault_point("marker-before-reflect")
        await self._reflect(uuid, just_sealed=seq)
        return {"seq": seq, "cut_time": marker.cut_time, "bytes": marker.bytes}

    async def retire(self, uuid: str, target: str) -> None:
        """A disk left the domain: later cycles leave it out; the journal keeps
        its segments for the markers that hold it."""
        uuid = check_uuid(uuid)
        target = check_target(target)
        async with self._lock(uuid):
            self._prot(uuid)
            if target not in {p.target for p in self.store.pairs(ROLE, uuid)}:
                raise PeerRequestError(f"no disk {target} to retire")
            self.store.set_pair_state(uuid, ROLE, PairState.DELETED, "retired: disk removed from the domain",
                                      target=target)

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
                shutil.rmtree(self.journal(uuid).root, ignore_errors=True)
                self.store.drop_markers(uuid)
            if self.store.protection(uuid, ROLE) is not None:
                self.store.remove_protection(uuid, ROLE)

    def info(self, uuid: str) -> dict[str, Any]:
        uuid = check_uuid(uuid)
        prot = self.store.protection(uuid, ROLE)
        markers = self.store.markers(uuid)
        applied = int(prot["applied"]) if prot else 0
        base_seq = int(prot["base_seq"]) if prot else 0
        journal = self.journal(uuid)
        report = integrity.load_report(journal.root)
        damaged = report["markers"] if report else {}
        return {
            "protected": prot is not None,
            "last_marker": markers[-1].seq if markers else 0,
            "applied": applied,
            "base_seq": base_seq,
            "held": bool(prot["held"]) if prot else False,
            "damage": self.damage.get(uuid),
            "integrity": report,
            "repair": {},  # filled by info_async when the report holds findings
            "journal_bytes": journal.segment_bytes(),
            "journal_limit": self.cfg.journal_max_bytes,
            "replica": self.replica_views(uuid) if prot else {},
            "markers": [{"seq": m.seq, "cut_time": m.cut_time, "bytes": m.bytes, "label": m.label,
                         "apply": m.apply, "applied": m.seq <= applied, "damage": damaged.get(str(m.seq))}
                        for m in markers],
        }

    async def info_async(self, uuid: str) -> dict[str, Any]:
        """:meth:`info` with ``repair``: the damaged ranges to send again (see
        :meth:`repair_ranges`), worked out off the event loop."""
        out = self.info(uuid)
        report = out["integrity"]
        if out["protected"] and report and report["findings"]:
            out["repair"] = await self.repair_ranges_async(check_uuid(uuid))
        return out

    # -- local journal commands -------------------------------------------------

    async def set_held(self, uuid: str, held: bool) -> dict[str, Any]:
        async with self._lock(uuid):
            self._prot(uuid)
            self.store.set_protection(uuid, ROLE, held=int(held))
            self.store.audit("hold" if held else "release", uuid)
            if not held:
                await self._reflect(uuid)
            return self.info(uuid)

    async def apply(self, uuid: str, until: int | None) -> dict[str, Any]:
        """Apply up to ``until`` (past no-apply markers and holds: it is asked
        for explicitly), or as far as the policy allows."""
        async with self._lock(uuid):
            prot = self._prot(uuid)
            if until is not None:
                last = self.store.last_marker(uuid)
                if until < int(prot["applied"]):
                    raise StateConflictError(f"the replica is already at marker {prot['applied']}, past {until}: "
                                             "use restore for an older marker", state=prot["applied"], required=until)
                if last is None or until > last.seq:
                    raise StateConflictError(f"no marker {until} (newest is {last.seq if last else 0})",
                                             state=last.seq if last else 0, required=until)
            await self._reflect(uuid, until=until)
            reached = int(self._prot(uuid)["applied"])
            if until is not None and reached < until:
                # Asked for explicitly: say why it stopped short.
                raise JournalCorruptError(f"stopped at marker {reached}: {self.damage.get(uuid, 'unknown reason')}")
            return self.info(uuid)

    def replica_views(self, uuid: str) -> dict[str, str]:
        """The files whose chains are the replica's disks now (those of the applied marker)."""
        prot = self._prot(uuid)
        applied = int(prot["applied"])
        row = next((r for r in self.store.marker_rows(uuid) if int(r["seq"]) == applied), None)
        if row is None:
            return {}
        journal = self.journal(uuid)
        return {t: journal.view(t, applied) for t in json.loads(row["disks"])}

    async def restore(self, uuid: str, seq: int, dest: str) -> dict[str, Any]:
        """Write one qcow2 per disk as of marker ``seq`` into ``dest``.

        Replication goes on meanwhile: only folding (which rewrites the base)
        waits until the copy is done.
        """
        async with self._lock(uuid):
            prot = self._prot(uuid)
            base_seq = int(prot["base_seq"])
            rows = {int(r["seq"]): r for r in self.store.marker_rows(uuid)}
            if seq not in rows or seq < base_seq:
                retained = f"{base_seq}..{max(rows)}" if rows else "none"
                raise StateConflictError(f"marker {seq} is not retained (retained: {retained})", state=retained,
                                         required=seq)
            journal = self.journal(uuid)
            for s in range(base_seq, seq + 1):
                segments = verify_record(rows[s], s)
                if s > base_seq:
                    for target, entry in segments.items():
                        try:
                            await asyncio.to_thread(verify_segment, journal, s, target, entry, full_hash=True)
                        except JournalCorruptError as e:
                            self.note_segment_damage(uuid, target, s, str(e))
            blocked = None
            if self._damaged_segments(uuid):
                blocked = await asyncio.to_thread(self._damage_read_by, uuid, seq, self._segment_holds(uuid))
            if blocked:
                self.note_damage(uuid, blocked, markers={seq: blocked})
                raise JournalCorruptError(blocked)
            views = {t: journal.view(t, seq) for t in json.loads(rows[seq]["disks"])}
            for target, view in sorted(views.items()):
                bad = await asyncio.to_thread(integrity.check_view, journal.base(target), view)
                if bad:
                    line = f"marker {seq}: {bad[0]}" + (f" (and {len(bad) - 1} more)" if len(bad) > 1 else "")
                    self.note_damage(uuid, bad[0], markers={seq: line})
                    raise JournalCorruptError(line)
            self._pins[uuid] = self._pins.get(uuid, 0) + 1
        try:
            os.makedirs(dest, mode=0o700, exist_ok=True)
            written = {}
            for target, view in sorted(views.items()):
                out = os.path.join(dest, f"{target}.qcow2")
                await run_tool("qemu-img", "convert", "-U", "-f", "qcow2", "-O", "qcow2", view, out + ".partial")
                fsync_path(out + ".partial")
                os.replace(out + ".partial", out)
                written[target] = out
            fsync_path(dest)
            self.store.audit("restore", uuid, seq=seq, dest=dest)
            return {"marker": seq, "disks": written}
        finally:
            self._pins[uuid] -= 1

    # -- integrity: scrub and damage reports ------------------------------------

    def note_damage(self, uuid: str, why: str, markers: Mapping[int, str] | None = None) -> None:
        """Record damage found outside a scrub (a restore, a fold) in the integrity
        report, so ``markers`` and ``status`` show it until a check finds it gone."""
        root = self.journal(uuid).root
        report = integrity.load_report(root) or {"checked_at": None, "findings": [], "markers": {}}
        if why not in report["findings"]:
            report["findings"].append(why)
            log.error("%s: replica damaged: %s", uuid, why)
            self.store.audit("replica-damaged", uuid, why=why)
        for seq, line in (markers or {}).items():
            report["markers"].setdefault(str(seq), line)
        integrity.save_report(root, report)

    def note_segment_damage(self, uuid: str, target: str, seq: int, why: str) -> None:
        """Record a damaged sealed segment (until it is folded: then its chunks are
        marked damaged in the base's record instead)."""
        root = self.journal(uuid).root
        report = integrity.load_report(root) or {"checked_at": None, "findings": [], "markers": {}}
        if not isinstance(report.get("segments"), dict):
            report["segments"] = {}
        segs = report["segments"].get(target)
        if not isinstance(segs, dict):
            segs = report["segments"][target] = {}
        if segs.get(str(seq)) == why and why in report["findings"]:
            return
        segs[str(seq)] = why
        if why not in report["findings"]:
            report["findings"].append(why)
        log.error("%s: replica damaged: %s", uuid, why)
        self.store.audit("replica-damaged", uuid, why=why)
        integrity.save_report(root, report)

    def _forget_segment_damage(self, uuid: str, target: str, seq: int) -> None:
        root = self.journal(uuid).root
        report = integrity.load_report(root)
        segs = report.get("segments") if report else None
        entries = segs.get(target) if isinstance(segs, dict) else None
        if report and isinstance(entries, dict) and entries.pop(str(seq), None) is not None:
            integrity.save_report(root, report)

    def _damaged_segments(self, uuid: str) -> dict[tuple[str, int], str]:
        """(target, seq) -> why, for the damaged segments still in the journal."""
        journal = self.journal(uuid)
        report = integrity.load_report(journal.root) or {}
        out = {}
        segs = report.get("segments")
        for target, entries in (segs.items() if isinstance(segs, dict) else []):
            for seq, why in (entries.items() if isinstance(entries, dict) else []):
                if not str(seq).isdigit():
                    continue
                try:
                    path = journal.segment(check_target(target), int(seq))
                except PeerRequestError:
                    continue
                if os.path.isfile(path) and not os.path.islink(path):
                    out[(str(target), int(seq))] = str(why)
        return out

    def _segment_holds(self, uuid: str) -> dict[tuple[str, int], tuple[list[int], int]]:
        """(target, seq) -> (chunks, chunk size) each retained segment holds, from its record."""
        out = {}
        for row in self.store.marker_rows(uuid):
            with contextlib.suppress(ValueError, TypeError, AttributeError):
                for target, entry in json.loads(row["segments"]).items():
                    if isinstance(entry.get("holds"), list) and isinstance(entry.get("holds_chunk"), int):
                        out[(str(target), int(row["seq"]))] = (entry["holds"], entry["holds_chunk"])
        return out

    def _damage_read_by(self, uuid: str, seq: int,
                        holds: Mapping[tuple[str, int], tuple[list[int], int]]) -> str | None:
        """Why marker ``seq`` cannot be trusted because of a damaged segment its
        views read (None: it reads none; segments newer than the damage may
        hold all those chunks again)."""
        journal = self.journal(uuid)
        for (target, s), why in sorted(self._damaged_segments(uuid).items(), key=lambda kv: kv[0][1]):
            if s > seq:
                continue
            try:
                held, chunk_size = holds.get((target, s), ([], integrity.CHUNK))
                reads = integrity.reads_layer(journal.view(target, seq), journal.segment(target, s), held, chunk_size)
            except JournalCorruptError as e:
                return f"marker {seq}: {e}"
            if reads:
                return why if s == seq else f"marker {seq} reads damaged {why}"
        return None

    def _chunk_size(self, journal: JournalDir, target: str) -> int:
        try:
            return integrity.load_sums(integrity.sums_path(journal.base(target))).chunk_size
        except JournalCorruptError:
            return integrity.CHUNK

    async def verify(self, uuid: str) -> dict[str, Any]:
        """Scrub a replica: every marker record, every retained segment (each MiB
        of the file), the base's record and every chunk of the base, and its
        qcow2 metadata. Cycles go on meanwhile (sealed files never change);
        folds wait. Findings replace the last report and name each file and
        chunk, and each marker they make unrestorable."""
        uuid = check_uuid(uuid)
        async with self._lock(uuid):
            prot = self._prot(uuid)
            cycle = self._open.get(uuid)
            if cycle is not None and cycle.kind == "full" or int(prot["base_seq"]) == 0:
                raise StateConflictError(f"the first full copy of {prot['domain']} is not complete yet",
                                         state="initial-copy", required="active")
            base_seq = int(prot["base_seq"])
            rows = [dict(r) for r in self.store.marker_rows(uuid)]
            self._pins[uuid] = self._pins.get(uuid, 0) + 1
        try:
            started = time.monotonic()
            report = await asyncio.to_thread(self._scrub, uuid, base_seq, rows)
            report["seconds"] = round(time.monotonic() - started, 3)
        finally:
            self._pins[uuid] -= 1
        async with self._lock(uuid):
            integrity.save_report(self.journal(uuid).root, report)
            self.store.audit("verify", uuid, findings=len(report["findings"]), seconds=report["seconds"])
            for why in report["findings"]:
                log.error("%s: verify: %s", prot["domain"], why)
            await self._retain(uuid)  # folds skipped meanwhile
        return {"domain": prot["domain"], **report}

    def _scrub(self, uuid: str, base_seq: int, rows: list[dict[str, Any]]) -> dict[str, Any]:
        journal = self.journal(uuid)
        seqs = sorted(int(r["seq"]) for r in rows)
        findings: list[str] = []
        markers: dict[str, str] = {}
        checked = 0

        def found(why: str, affected: Sequence[int]) -> None:
            findings.append(why)
            for seq in affected:
                markers.setdefault(str(seq), why)

        targets: set[str] = set()
        bad_segments: dict[tuple[str, int], str] = {}
        seg_entries: dict[tuple[str, int], dict[str, Any]] = {}
        expected = seqs[0] if seqs else 0
        for row in sorted(rows, key=lambda r: int(r["seq"])):
            seq = int(row["seq"])
            try:
                segments = verify_record(row, expected)
                targets.update(json.loads(row["disks"]))
            except JournalCorruptError as e:
                found(str(e), [s for s in seqs if s >= seq])
                expected = seq + 1
                continue
            expected = seq + 1
            if seq <= base_seq:
                continue
            for target, entry in sorted(segments.items()):
                seg_entries[(target, seq)] = entry if isinstance(entry, dict) else {}
                try:
                    verify_segment(journal, seq, target, entry, full_hash=True)
                    checked += int(entry.get("size", 0))
                except JournalCorruptError as e:
                    bad_segments[(target, seq)] = str(e)
                    findings.append(str(e))
        for (target, bad_seq), why in sorted(bad_segments.items()):
            for seq in seqs:    # the markers whose views read it (a later segment may hold it all again)
                if seq < bad_seq:
                    continue
                try:
                    entry = seg_entries.get((target, bad_seq), {})
                    held = entry.get("holds", []) if isinstance(entry.get("holds"), list) else []
                    chunk_size = entry.get("holds_chunk", integrity.CHUNK)
                    if integrity.reads_layer(journal.view(target, seq), journal.segment(target, bad_seq), held,
                                             chunk_size if isinstance(chunk_size, int) else integrity.CHUNK):
                        markers.setdefault(str(seq), why if seq == bad_seq else f"marker {seq} reads damaged {why}")
                except JournalCorruptError as e:
                    markers.setdefault(str(seq), f"marker {seq}: {e}")
        for target in sorted(targets):
            base = journal.base(target)
            meta = integrity.check_metadata(base)
            if meta:
                found(meta, seqs)
                continue
            try:
                sums = integrity.load_sums(integrity.sums_path(base))
            except integrity.SumsCorruptError as e:
                found(str(e), seqs)
                with integrity.RECORD_LOCK:
                    integrity.condemn_sums(base)  # every chunk damaged: a repair sends them all again
                continue
            try:
                bad = integrity.check_base_chunks(base, sums)
            except JournalCorruptError as e:
                found(str(e), seqs)
                continue
            checked += sums.disk_size
            integrity.mark_damaged(integrity.sums_path(base), [idx for idx, _ in bad])
            for _, why in bad:
                findings.append(why)
            if not bad:
                continue
            damaged = {idx: why for idx, why in bad}
            for seq in seqs:
                try:
                    read = integrity.base_chunks_read(journal.view(target, seq), base, sums.chunk_size)
                except JournalCorruptError as e:
                    markers.setdefault(str(seq), str(e))
                    continue
                hit = sorted(read & set(damaged))
                if hit:
                    markers.setdefault(str(seq), f"marker {seq}: {damaged[hit[0]]}")
        damaged_segments: dict[str, dict[str, str]] = {}
        for (target, bad_seq), why in bad_segments.items():
            damaged_segments.setdefault(target, {})[str(bad_seq)] = why
        return {"checked_at": time.time(), "bytes": checked, "findings": findings, "markers": markers,
                "segments": damaged_segments}

    async def run_scrubs(self) -> None:
        """The scheduled scrub (``[journal] scrub_interval``): a replica is verified
        when its last check (or, never checked, the first time this agent saw it)
        is that old. Runs until cancelled."""
        interval = self.cfg.scrub_interval
        while True:
            await asyncio.sleep(min(max(interval / 4, 0.5), 60.0))
            for prot in self.store.protections(ROLE):
                uuid = prot["domain_uuid"]
                if not int(prot["base_seq"]):
                    continue
                root = self.journal(uuid).root
                report = integrity.load_report(root)
                if report is None:
                    report = {"checked_at": None, "findings": [], "markers": {}}
                if not report.get("checked_at") and not report.get("since"):
                    report["since"] = time.time()
                    integrity.save_report(root, report)
                last = report.get("checked_at") or report.get("since") or 0.0
                if time.time() - float(last) < interval:
                    continue
                try:
                    await self.verify(uuid)
                except PluginError as e:
                    log.warning("scheduled verify of %s: %s", prot["domain"], e)

    def repair_ranges(self, uuid: str) -> dict[str, list[list[int]]]:
        """Per disk, the guest ranges whose damaged chunks (of the base, or of a
        damaged segment) the newest marker still reads: what the primary sends
        again at its next cycle (it marks them dirty). Once a marker holds them,
        they are no longer asked for; its fold re-hashes those chunks in the base."""
        return self._repair_compute(uuid, *self._repair_inputs(uuid))

    async def repair_ranges_async(self, uuid: str) -> dict[str, list[list[int]]]:
        """:meth:`repair_ranges` with its file reads and ``qemu-img`` runs off the event loop."""
        return await asyncio.to_thread(self._repair_compute, uuid, *self._repair_inputs(uuid))

    def _repair_inputs(self, uuid: str) -> tuple[int, dict[str, int], dict[tuple[str, int], tuple[list[int], int]]]:
        """What the store knows (read on the event loop): the newest marker, the disks' sizes, what segments hold."""
        last = self.store.last_marker(uuid)
        sizes = {p.target: p.size for p in self.store.pairs(ROLE, uuid) if p.state != PairState.DELETED}
        return (last.seq if last else 0), sizes, self._segment_holds(uuid)

    def _repair_compute(self, uuid: str, last: int, sizes: Mapping[str, int],
                        holds: Mapping[tuple[str, int], tuple[list[int], int]]) -> dict[str, list[list[int]]]:
        if not last:
            return {}
        journal = self.journal(uuid)
        damaged = self._damaged_segments(uuid)
        out = {}
        for target, size in sorted(sizes.items()):
            view = journal.view(target, last)
            try:
                ranges = integrity.repair_ranges(journal.base(target), view, size)
                chunk_size = self._chunk_size(journal, target)
                chunks = {r[0] // chunk_size + i for r in ranges for i in range(-(-r[1] // chunk_size))}
                for (t, seq), _ in damaged.items():
                    if t != target or seq > last:
                        continue
                    seg = journal.segment(target, seq)
                    recorded, recorded_chunk = holds.get((target, seq), ([], 0))
                    held = set(recorded) if recorded_chunk == chunk_size \
                        else set(integrity.segment_chunks(seg, chunk_size))
                    chunks |= held & integrity.layer_chunks_read(view, seg, chunk_size)
            except JournalCorruptError as e:
                log.warning("%s: cannot tell what to repair on %s: %s", uuid, target, e)
                continue
            if chunks:
                out[target] = integrity.chunk_ranges(chunks, chunk_size, size)
        return out

    def replica_status(self) -> list[dict[str, Any]]:
        """The replicas kept here, with their damage (for ``status``)."""
        out = []
        for prot in self.store.protections(ROLE):
            uuid = prot["domain_uuid"]
            last = self.store.last_marker(uuid)
            report = integrity.load_report(self.journal(uuid).root) or {}
            out.append({"domain": prot["domain"], "peer": prot["peer"], "applied": int(prot["applied"]),
                        "last_marker": last.seq if last else 0, "journal_damage": self.damage.get(uuid),
                        "checked_at": report.get("checked_at"), "findings": report.get("findings", []),
                        "damaged_markers": sorted(int(s) for s in report.get("markers", {}))})
        return out

    # -- the reflecting unit ------------------------------------------------------

    async def reflect_due(self) -> None:
        """Apply markers whose ``apply_delay`` has passed, without waiting for the
        next cycle (which may never come: the primary may be gone)."""
        for prot in self.store.protections(ROLE):
            uuid = prot["domain_uuid"]
            last = self.store.last_marker(uuid)
            if last is not None and int(prot["applied"]) < last.seq and not prot["held"]:
                async with self._lock(uuid):
                    await self._reflect(uuid)

    async def _reflect(self, uuid: str, until: int | None = None, just_sealed: int = 0) -> None:
        """Move the replica forward over verified markers, then apply retention.
        Called with the domain's lock held. ``just_sealed`` is a marker whose
        segments this very request hashed: its sizes are checked, not re-hashed."""
        prot = self._prot(uuid)
        applied = int(prot["applied"])
        rows = [r for r in self.store.marker_rows(uuid) if int(r["seq"]) > applied]
        now = time.time()
        journal = self.journal(uuid)
        expected = applied + 1
        for row in rows:
            seq = int(row["seq"])
            if until is not None:
                if seq > until:
                    break
            else:
                if prot["held"] or not row["apply"] or row["cut_time"] > now - self.cfg.apply_delay:
                    break
            try:
                segments = verify_record(row, expected)
            except JournalCorruptError as e:
                self._halted.add(uuid)  # nothing after a damaged record can be trusted
                self._report_damage(uuid, str(e))
                break
            expected = seq + 1
            for target, entry in segments.items():
                try:
                    await asyncio.to_thread(verify_segment, journal, seq, target, entry,
                                            full_hash=seq != just_sealed)
                except JournalCorruptError as e:
                    self.note_segment_damage(uuid, target, seq, str(e))
            # A marker that reads a damaged segment is passed over; a later one
            # that holds those chunks again (a repair) applies.
            blocked = None
            if self._damaged_segments(uuid):
                blocked = await asyncio.to_thread(self._damage_read_by, uuid, seq, self._segment_holds(uuid))
            if blocked:
                self._report_damage(uuid, blocked)
                continue
            self.store.set_protection(uuid, ROLE, applied=seq)
            applied = seq
            if uuid in self.damage and uuid not in self._halted:
                log.warning("%s: marker %d applied past the damage (repaired)", uuid, seq)
                del self.damage[uuid]
            fault_point("apply-after-pointer")
        await self._retain(uuid)

    def _report_damage(self, uuid: str, why: str) -> None:
        if self.damage.get(uuid) != why:
            log.error("%s: journal damaged, nothing past it is applied: %s", uuid, why)
            self.store.audit("journal-damaged", uuid, why=why)
            self.store.set_pair_state(uuid, ROLE, PairState.ERROR, f"journal damaged: {why}")
        self.damage[uuid] = why

    async def _retain(self, uuid: str, *, squeeze: bool = False) -> None:
        """Fold applied markers beyond the retention into the base (oldest first).
        ``squeeze`` ignores retention (journal full, policy "apply")."""
        if self._pins.get(uuid) or uuid in self._open:
            return
        while True:
            prot = self._prot(uuid)
            base_seq, applied = int(prot["base_seq"]), int(prot["applied"])
            if base_seq == 0 or base_seq >= applied:
                return
            rows = {int(r["seq"]): r for r in self.store.marker_rows(uuid)}
            newer_applied = applied - base_seq
            old_enough = rows[base_seq]["cut_time"] < time.time() - self.cfg.retain_seconds
            if not squeeze and (newer_applied < self.cfg.retain_markers or not old_enough):
                return
            try:
                await self._fold_one(uuid, base_seq + 1)
            except JournalCorruptError as e:
                self.note_damage(uuid, f"marker {base_seq + 1} not folded: {e}")
                return
            if squeeze and self.journal(uuid).segment_bytes() <= self.cfg.journal_max_bytes:
                return

    async def _fold_one(self, uuid: str, seq: int, *, resume: bool = False) -> None:
        """Fold marker ``seq``'s segments into the base; the base becomes marker ``seq``.

        The folded segment's file then becomes a link to the base: the next
        segment's backing still resolves, and no sealed segment is rewritten
        (re-pointing it would change it, and its hash would have to be redone).
        The base's chunk hashes follow: the segment is checked once more, the
        base chunks it touches are checked, marked pending, and re-hashed after
        the commit (only those: ``qemu-img map`` of the segment names them).

        :raise JournalCorruptError: the segment or the base's record is damaged (nothing folded)
        """
        journal = self.journal(uuid)
        row = next(r for r in self.store.marker_rows(uuid) if int(r["seq"]) == seq)
        segments = json.loads(row["segments"])
        disks = json.loads(row["disks"])
        todo = [t for t in disks if os.path.isfile(journal.segment(t, seq))
                and not os.path.islink(journal.segment(t, seq))]
        damaged = self._damaged_segments(uuid)
        for target in todo:
            if not resume and target in segments and (target, seq) not in damaged:
                try:
                    await asyncio.to_thread(verify_segment, journal, seq, target, segments[target], full_hash=True)
                except JournalCorruptError as e:
                    self.note_segment_damage(uuid, target, seq, str(e))
                    damaged[(target, seq)] = str(e)
            holds = None
            if (target, seq) in damaged:
                # Folded all the same (a later marker already replaced what the replica
                # reads): the chunks it holds become damaged chunks of the base.
                entry = segments.get(target, {})
                holds = entry.get("holds", []) if entry.get("holds_chunk") == self._chunk_size(journal, target) \
                    else []
            for why in await asyncio.to_thread(integrity.prepare_fold, journal.base(target),
                                               journal.segment(target, seq), holds):
                self.note_damage(uuid, why)
        self.store.set_protection(uuid, ROLE, folding=seq)
        fault_point("fold-after-intent")
        for target in disks:
            seg = journal.segment(target, seq)
            if os.path.isfile(seg) and not os.path.islink(seg):
                await run_tool("qemu-img", "commit", "-q", "-d", "-f", "qcow2", seg)
                fsync_path(journal.base(target))
                fault_point("fold-after-commit")
                journal.link_to_base(target, seq)
                fault_point("fold-after-link")
            if target in todo or resume:
                try:
                    await asyncio.to_thread(integrity.finish_fold, journal.base(target), seq)
                except JournalCorruptError as e:  # the data is folded; its record is what is damaged
                    self.note_damage(uuid, str(e))
            if (target, seq) in damaged:
                self._forget_segment_damage(uuid, target, seq)
            journal.drop_unused_links(target)
        fsync_path(journal.root)
        with self.store.transaction() as db:
            db.execute("UPDATE protections SET base_seq = ?, folding = 0 WHERE domain_uuid = ? AND role = ?",
                       (seq, uuid, ROLE))
            db.execute("DELETE FROM markers WHERE domain_uuid = ? AND seq < ?", (uuid, seq))
            self.store.audit("fold", uuid, base_seq=seq, resumed=resume)

    async def _enforce_space(self, uuid: str) -> None:
        limit = self.cfg.journal_max_bytes
        if not limit:
            return
        used = self.journal(uuid).segment_bytes()
        if used <= limit:
            return
        self.store.audit("journal-full", uuid, used=used, limit=limit, policy=self.cfg.journal_on_full)
        log.warning("%s: journal uses %d bytes, over its limit of %d (policy %s)", uuid, used, limit,
                    self.cfg.journal_on_full)
        if self.cfg.journal_on_full == "apply":
            await self._reflect(uuid, until=self.store.last_marker(uuid).seq)  # type: ignore[union-attr]
            await self._retain(uuid, squeeze=True)
            used = self.journal(uuid).segment_bytes()
        if used > limit:
            raise JournalFullError(f"journal full: {used} bytes used, limit {limit}; "
                                   "apply or release markers on the secondary, or raise journal.max_bytes")

    # -- internals ------------------------------------------------------------

    def _expire_later(self, uuid: str, cycle: OpenCycle) -> None:
        """Exports live only while their cycle runs: one its primary abandoned (a crash, a cut
        link) is discarded after twice the cycle timeout, by when any primary gave it up."""
        async def expire() -> None:
            await asyncio.sleep(2 * self.cfg.cycle_timeout)
            async with self._lock(uuid):
                if self._open.get(uuid) is cycle:
                    log.warning("%s: cycle %d abandoned by its primary: exports closed, segment discarded",
                                uuid, cycle.seq)
                    await self._close_open(uuid, discard=True)

        self._expiry[uuid] = asyncio.create_task(expire(), name=f"vs-expire-{uuid}")

    async def _close_open(self, uuid: str, *, discard: bool) -> None:
        """Remove a cycle's exports and nodes (closing flushes the images)."""
        cycle = self._open.pop(uuid, None)
        expiry = self._expiry.pop(uuid, None)
        if expiry is not None and expiry is not asyncio.current_task():
            expiry.cancel()
        if cycle is None:
            return
        for _, (pair_id, path) in cycle.disks.items():
            with contextlib.suppress(BlockdevError):
                await nodes.export_del(cycle.qmp, f"vs-e{pair_id}", force=discard)
            for node in (f"vs-p{pair_id}", f"vs-p{pair_id}-f"):
                await nodes.blockdev_del(cycle.qmp, node, missing_ok=True)
            if discard and path.endswith(".partial"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
        if discard:
            self.store.audit("cycle-discarded", uuid, seq=cycle.seq)

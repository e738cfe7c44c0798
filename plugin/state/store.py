"""One sqlite database per host: protections, pairs, markers, cycles, audit.

WAL with ``synchronous=FULL``: a state change is on disk before it is
acknowledged, so a crash never forgets a marker the primary was told about.
The same host can be primary for some domains and secondary for others; rows
carry their ``role``.

The schema carries its version in ``PRAGMA user_version``: version 0 is the
first released schema (``SCHEMA_V0``), and each entry of ``MIGRATIONS`` moves a
database one version up, in order, in one transaction with its version bump. A
new database is built the same way (v0, then every step), so the path an old
host takes is the path every test takes. A database newer than the code is
refused: an older agent must not write rows it does not understand.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from ..domain import BAD_STATES, Marker, Pair, PairEvent, PairState, Protection, Role, next_state
from ..errors import ConfigError

log = logging.getLogger("virtsync.state")

SCHEMA_V0 = """
CREATE TABLE IF NOT EXISTS protections (
    domain_uuid TEXT NOT NULL,
    role TEXT NOT NULL CHECK (role IN ('primary', 'secondary')),
    domain TEXT NOT NULL,
    peer TEXT NOT NULL,
    segment TEXT NOT NULL DEFAULT 'default',
    rpo INTEGER NOT NULL DEFAULT 300,
    mode TEXT NOT NULL DEFAULT 'async',
    suspended INTEGER NOT NULL DEFAULT 0,
    generation INTEGER NOT NULL DEFAULT 0,
    held INTEGER NOT NULL DEFAULT 0,
    applied INTEGER NOT NULL DEFAULT 0,
    base_seq INTEGER NOT NULL DEFAULT 0,
    folding INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL,
    PRIMARY KEY (domain_uuid, role)
);
CREATE TABLE IF NOT EXISTS pairs (
    id INTEGER PRIMARY KEY,
    domain_uuid TEXT NOT NULL,
    role TEXT NOT NULL,
    domain TEXT NOT NULL,
    target TEXT NOT NULL,
    peer TEXT NOT NULL,
    state TEXT NOT NULL,
    reason TEXT NOT NULL DEFAULT '',
    size INTEGER NOT NULL DEFAULT 0,
    bytes_done INTEGER NOT NULL DEFAULT 0,
    bytes_total INTEGER NOT NULL DEFAULT 0,
    last_marker INTEGER NOT NULL DEFAULT 0,
    updated REAL NOT NULL,
    UNIQUE (domain_uuid, role, target)
);
CREATE TABLE IF NOT EXISTS markers (
    domain_uuid TEXT NOT NULL,
    seq INTEGER NOT NULL,
    cut_time REAL NOT NULL,
    disks TEXT NOT NULL,
    bytes TEXT NOT NULL,
    label TEXT NOT NULL DEFAULT '',
    apply INTEGER NOT NULL DEFAULT 1,
    applied INTEGER NOT NULL DEFAULT 0,
    segments TEXT NOT NULL DEFAULT '{}',
    crc TEXT NOT NULL DEFAULT '',
    committed REAL NOT NULL,
    PRIMARY KEY (domain_uuid, seq)
);
CREATE TABLE IF NOT EXISTS cycles (
    id INTEGER PRIMARY KEY,
    domain_uuid TEXT NOT NULL,
    seq INTEGER NOT NULL,
    kind TEXT NOT NULL,
    started REAL NOT NULL,
    finished REAL,
    bytes INTEGER NOT NULL DEFAULT 0,
    error TEXT
);
CREATE TABLE IF NOT EXISTS disk_lists (
    domain_uuid TEXT PRIMARY KEY,
    taken REAL NOT NULL,
    reason TEXT NOT NULL,
    disks TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS tracker_log (
    id INTEGER PRIMARY KEY,
    time REAL NOT NULL,
    domain_uuid TEXT NOT NULL,
    domain TEXT NOT NULL,
    reason TEXT NOT NULL,
    kind TEXT NOT NULL,
    target TEXT NOT NULL,
    detail TEXT NOT NULL,
    action TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY,
    time REAL NOT NULL,
    domain_uuid TEXT,
    event TEXT NOT NULL,
    detail TEXT NOT NULL DEFAULT '{}'
);
"""

# Step N (index N-1) takes a database from version N-1 to N. Append, never edit.
MIGRATIONS: tuple[str, ...] = (
    # 1: "generation" meant the last committed marker; the word is kept free
    # for the switchover's split-brain history.
    "ALTER TABLE protections RENAME COLUMN generation TO committed_seq",
)
SCHEMA_VERSION = len(MIGRATIONS)


def schema_version(db: sqlite3.Connection) -> int:
    return int(db.execute("PRAGMA user_version").fetchone()[0])


def refuse_newer(db: sqlite3.Connection, path: str) -> int:
    """The database's schema version; one this code does not know is an error."""
    version = schema_version(db)
    if version > SCHEMA_VERSION:
        raise ConfigError(f"state database {path} has schema version {version}, newer than this virtsync"
                          f" knows ({SCHEMA_VERSION}): upgrade virtsync or point state_dir elsewhere")
    return version


def migrate(db: sqlite3.Connection, path: str) -> None:
    """Bring the database at ``path`` to ``SCHEMA_VERSION``, one committed step at a time."""
    version = refuse_newer(db, path)
    if version == 0:
        db.executescript(SCHEMA_V0)  # IF NOT EXISTS: a no-op on a v0 database with its tables
    while True:
        db.execute("BEGIN IMMEDIATE")
        try:
            version = schema_version(db)  # again, under the write lock: another opener may have migrated
            if version < SCHEMA_VERSION:
                db.execute(MIGRATIONS[version])
                db.execute(f"PRAGMA user_version = {version + 1}")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
        if version >= SCHEMA_VERSION:
            return
        log.info("state database %s migrated to schema version %d", path, version + 1)


class Store:
    """Typed access to the state database; every write commits durably."""

    def __init__(self, path: str) -> None:
        os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
        self.path = path
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.row_factory = sqlite3.Row
        try:
            refuse_newer(self._db, path)  # before any PRAGMA: a refused file is left as it was
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA foreign_keys=ON")
            migrate(self._db, path)
        except BaseException:
            self._db.close()
            raise
        os.chmod(path, 0o600)

    def close(self) -> None:
        self._db.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    # -- audit --------------------------------------------------------------

    def audit(self, event: str, domain_uuid: str | None = None, **detail: Any) -> None:
        self._db.execute("INSERT INTO audit (time, domain_uuid, event, detail) VALUES (?, ?, ?, ?)",
                         (time.time(), domain_uuid, event, json.dumps(detail, sort_keys=True, default=str)))

    def audit_log(self, domain_uuid: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        rows = self._db.execute(
            "SELECT * FROM audit WHERE (? IS NULL OR domain_uuid = ?) ORDER BY id DESC LIMIT ?",
            (domain_uuid, domain_uuid, limit)).fetchall()
        return [dict(r) | {"detail": json.loads(r["detail"])} for r in rows]

    # -- protections --------------------------------------------------------

    def add_protection(self, uuid: str, role: Role, domain: str, prot: Protection) -> None:
        with self.transaction() as db:
            db.execute(
                "INSERT INTO protections (domain_uuid, role, domain, peer, segment, rpo, mode, created)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (uuid, role, domain, prot.peer, prot.segment, prot.rpo, prot.mode, time.time()))
            self.audit("protect", uuid, role=role, domain=domain, peer=prot.peer, rpo=prot.rpo)

    def protection(self, uuid: str, role: Role) -> sqlite3.Row | None:
        row: sqlite3.Row | None = self._db.execute(
            "SELECT * FROM protections WHERE domain_uuid = ? AND role = ?", (uuid, role)).fetchone()
        return row

    def protections(self, role: Role) -> list[sqlite3.Row]:
        return self._db.execute("SELECT * FROM protections WHERE role = ? ORDER BY domain", (role,)).fetchall()

    def set_protection(self, uuid: str, role: Role, **values: Any) -> None:
        allowed = {"suspended", "committed_seq", "domain", "rpo", "segment", "held", "applied", "base_seq", "folding"}
        if not values or set(values) - allowed:
            raise ValueError(f"cannot set {sorted(values)}")
        cols = ", ".join(f"{k} = ?" for k in values)
        self._db.execute(f"UPDATE protections SET {cols} WHERE domain_uuid = ? AND role = ?",  # noqa: S608
                         (*values.values(), uuid, role))

    def remove_protection(self, uuid: str, role: Role) -> None:
        with self.transaction() as db:
            live = db.execute("SELECT target, state FROM pairs WHERE domain_uuid = ? AND role = ? AND state != ?"
                              " ORDER BY target", (uuid, role, PairState.DELETED.value)).fetchall()
            db.execute("DELETE FROM protections WHERE domain_uuid = ? AND role = ?", (uuid, role))
            db.execute("UPDATE pairs SET state = ?, updated = ? WHERE domain_uuid = ? AND role = ?",
                       (PairState.DELETED.value, time.time(), uuid, role))
            for row in live:
                self.audit("pair-state", uuid, target=row["target"], old=row["state"], new=PairState.DELETED.value,
                           reason="")
            self.audit("unprotect", uuid, role=role)

    # -- pairs --------------------------------------------------------------

    def upsert_pair(self, uuid: str, role: Role, domain: str, target: str, peer: str, size: int,
                    state: PairState) -> int:
        """Create or re-create a pair in ``state``; a state change is audited like any other."""
        with self.transaction() as db:
            old = db.execute("SELECT state FROM pairs WHERE domain_uuid = ? AND role = ? AND target = ?",
                             (uuid, role, target)).fetchone()
            if old is None or old["state"] != state.value:
                self.audit("pair-state", uuid, target=target, old=old["state"] if old else None, new=state.value,
                           reason="")
            db.execute(
                "INSERT INTO pairs (domain_uuid, role, domain, target, peer, state, size, updated)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (domain_uuid, role, target) DO UPDATE SET"
                " domain = excluded.domain, peer = excluded.peer, state = excluded.state,"
                " size = excluded.size, reason = '', updated = excluded.updated",
                (uuid, role, domain, target, peer, state.value, size, time.time()))
            row = db.execute("SELECT id FROM pairs WHERE domain_uuid = ? AND role = ? AND target = ?",
                             (uuid, role, target)).fetchone()
        return int(row["id"])

    def pair_id(self, uuid: str, role: Role, target: str) -> int:
        row = self._db.execute("SELECT id FROM pairs WHERE domain_uuid = ? AND role = ? AND target = ?",
                               (uuid, role, target)).fetchone()
        if row is None:
            raise KeyError(f"{uuid}/{target}")
        return int(row["id"])

    def set_pair_state(self, uuid: str, role: Role, state: PairState, reason: str = "",
                       target: str | None = None) -> None:
        """Move the domain's pairs (or one) to ``state``; logged when it changes."""
        rows = self._db.execute(
            "SELECT target, state, reason FROM pairs WHERE domain_uuid = ? AND role = ? AND state != ?"
            " AND (? IS NULL OR target = ?)",
            (uuid, role, PairState.DELETED.value, target, target)).fetchall()
        with self.transaction() as db:
            for row in rows:
                if row["state"] != state.value or row["reason"] != reason:
                    db.execute("UPDATE pairs SET state = ?, reason = ?, updated = ? WHERE domain_uuid = ?"
                               " AND role = ? AND target = ?",
                               (state.value, reason, time.time(), uuid, role, row["target"]))
                    self.audit("pair-state", uuid, target=row["target"], old=row["state"], new=state.value,
                               reason=reason)

    def transition(self, uuid: str, role: Role, event: PairEvent, reason: str = "",
                   target: str | None = None) -> PairState | None:
        """Apply ``event`` to the domain's pairs (or one) through the state machine.

        One WARNING per call when a pair enters a bad state; returns the state of the
        first pair after the event (None: no pair).
        """
        entered: list[str] = []
        result: PairState | None = None
        for pair in self.pairs(role, uuid):
            if target is not None and pair.target != target:
                continue
            new = next_state(pair.state, event)
            result = result or new
            # The reason is the event's when it leads to this state (a repeated failure
            # refreshes its reason); an event that changes nothing keeps the old one.
            if new is not pair.state or next_state(PairState.ACTIVE, event) is new:
                self.set_pair_state(uuid, role, new, reason, target=pair.target)
            if new is not pair.state and new in BAD_STATES:
                entered.append(f"{pair.domain} {pair.target}: {pair.state.value} -> {new.value}")
        if entered:
            log.warning("%s%s", "; ".join(entered), f" ({reason})" if reason else "")
        return result

    def set_pair_progress(self, uuid: str, role: Role, target: str, done: int, total: int) -> None:
        self._db.execute("UPDATE pairs SET bytes_done = ?, bytes_total = ? WHERE domain_uuid = ? AND role = ?"
                         " AND target = ?", (done, total, uuid, role, target))

    def pairs(self, role: Role, uuid: str | None = None, *, include_deleted: bool = False) -> list[Pair]:
        rows = self._db.execute(
            "SELECT * FROM pairs WHERE role = ? AND (? IS NULL OR domain_uuid = ?) ORDER BY domain, target",
            (role, uuid, uuid)).fetchall()
        out = []
        for r in rows:
            if r["state"] == PairState.DELETED.value and not include_deleted:
                continue
            out.append(Pair(r["domain_uuid"], r["domain"], r["target"], r["peer"], PairState(r["state"]),
                            r["reason"], r["size"], r["bytes_done"], r["bytes_total"], r["last_marker"]))
        return out

    # -- markers ------------------------------------------------------------

    def commit_marker(self, marker: Marker, segments: dict[str, Any] | None = None, crc: str = "") -> None:
        """Record a marker: after this returns, the cut is durable."""
        with self.transaction() as db:
            db.execute(
                "INSERT INTO markers (domain_uuid, seq, cut_time, disks, bytes, label, apply, applied, segments,"
                " crc, committed) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (marker.domain_uuid, marker.seq, marker.cut_time, json.dumps(list(marker.disks)),
                 json.dumps(marker.bytes, sort_keys=True), marker.label, int(marker.apply), int(marker.applied),
                 json.dumps(segments or {}, sort_keys=True), crc, time.time()))
            db.execute("UPDATE pairs SET last_marker = ? WHERE domain_uuid = ? AND role = ?",
                       (marker.seq, marker.domain_uuid, Role.SECONDARY))
            self.audit("marker", marker.domain_uuid, seq=marker.seq, bytes=marker.bytes, label=marker.label)

    def set_marker_applied(self, uuid: str, seq: int) -> None:
        self._db.execute("UPDATE markers SET applied = 1 WHERE domain_uuid = ? AND seq = ?", (uuid, seq))

    def markers(self, uuid: str) -> list[Marker]:
        rows = self._db.execute("SELECT * FROM markers WHERE domain_uuid = ? ORDER BY seq", (uuid,)).fetchall()
        return [Marker(r["seq"], r["domain_uuid"], r["cut_time"], tuple(json.loads(r["disks"])),
                       json.loads(r["bytes"]), r["label"], bool(r["apply"]), bool(r["applied"])) for r in rows]

    def last_marker(self, uuid: str) -> Marker | None:
        markers = self.markers(uuid)
        return markers[-1] if markers else None

    def drop_markers(self, uuid: str, below: int | None = None) -> None:
        """Forget a domain's markers (all, or those with seq < ``below``)."""
        if below is None:
            self._db.execute("DELETE FROM markers WHERE domain_uuid = ?", (uuid,))
        else:
            self._db.execute("DELETE FROM markers WHERE domain_uuid = ? AND seq < ?", (uuid, below))

    def marker_rows(self, uuid: str) -> list[sqlite3.Row]:
        """Raw marker rows, for the journal's own verification."""
        return self._db.execute("SELECT * FROM markers WHERE domain_uuid = ? ORDER BY seq", (uuid,)).fetchall()

    # -- disk lists (the mapping tracker) --------------------------------------

    def disk_list(self, uuid: str) -> dict[str, Any] | None:
        """The last disk list the tracker stored: ``{"disks": [...], "exclude": [...]}``."""
        row = self._db.execute("SELECT disks FROM disk_lists WHERE domain_uuid = ?", (uuid,)).fetchone()
        return None if row is None else dict(json.loads(row["disks"]))

    def save_disk_list(self, uuid: str, disks: dict[str, Any], reason: str) -> None:
        self._db.execute("INSERT INTO disk_lists (domain_uuid, taken, reason, disks) VALUES (?, ?, ?, ?)"
                         " ON CONFLICT (domain_uuid) DO UPDATE SET taken = excluded.taken,"
                         " reason = excluded.reason, disks = excluded.disks",
                         (uuid, time.time(), reason, json.dumps(disks, sort_keys=True)))

    def drop_disk_list(self, uuid: str) -> None:
        self._db.execute("DELETE FROM disk_lists WHERE domain_uuid = ?", (uuid,))

    def log_change(self, uuid: str, domain: str, reason: str, kind: str, target: str, detail: str,
                   action: str) -> None:
        self._db.execute("INSERT INTO tracker_log (time, domain_uuid, domain, reason, kind, target, detail, action)"
                         " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                         (time.time(), uuid, domain, reason, kind, target, detail, action))

    def tracker_log(self, domain: str | None = None, limit: int = 200) -> list[dict[str, Any]]:
        rows = self._db.execute("SELECT * FROM tracker_log WHERE (? IS NULL OR domain = ?) ORDER BY id DESC LIMIT ?",
                                (domain, domain, limit)).fetchall()
        return [dict(r) for r in reversed(rows)]

    # -- cycles (primary side history, for lag and throughput) ---------------

    def start_cycle(self, uuid: str, seq: int, kind: str) -> int:
        cur = self._db.execute("INSERT INTO cycles (domain_uuid, seq, kind, started) VALUES (?, ?, ?, ?)",
                               (uuid, seq, kind, time.time()))
        return int(cur.lastrowid or 0)

    def finish_cycle(self, cycle_id: int, nbytes: int, error: str | None = None) -> None:
        self._db.execute("UPDATE cycles SET finished = ?, bytes = ?, error = ? WHERE id = ?",
                         (time.time(), nbytes, error, cycle_id))

    def cycles(self, uuid: str, limit: int = 20) -> list[sqlite3.Row]:
        return self._db.execute("SELECT * FROM cycles WHERE domain_uuid = ? ORDER BY id DESC LIMIT ?",
                                (uuid, limit)).fetchall()

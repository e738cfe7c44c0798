"""The state database's schema version and its ordered migrations, from each earlier version."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from plugin.errors import ConfigError
from plugin.state import store as store_mod
from plugin.state.store import MIGRATIONS, SCHEMA_VERSION, Store

UUID = "0f6b2d1e-6a4c-4d55-9a53-2b8f7a1c9e01"

# Version 0, copied from the store as released before versioning: never edit this
# copy when the store changes, it is the database an old host has on disk.
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


@pytest.fixture
def db_path(tmp_path: Path) -> Iterator[str]:
    yield str(tmp_path / "state" / "state.db")


def old_database(path: str, version: int) -> None:
    """A database as a host at ``version`` left it, holding rows of every kind."""
    Path(path).parent.mkdir(mode=0o700, exist_ok=True)
    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.executescript(SCHEMA_V0)
        db.execute("INSERT INTO protections (domain_uuid, role, domain, peer, segment, rpo, suspended, generation,"
                   " held, base_seq, created) VALUES (:uuid, 'primary', 'web01', 'dr1', 'gold', 60, 1, 7, 0, 0, 1.0)",
                   {"uuid": UUID})
        db.execute("INSERT INTO protections (domain_uuid, role, domain, peer, generation, held, base_seq, created)"
                   " VALUES (:uuid, 'secondary', 'web01', 'pri', 5, 4, 3, 2.0)", {"uuid": UUID})
        db.execute("INSERT INTO pairs (domain_uuid, role, domain, target, peer, state, size, last_marker, updated)"
                   " VALUES (:uuid, 'primary', 'web01', 'vda', 'dr1', 'active', 1048576, 7, 1.0)", {"uuid": UUID})
        db.execute("INSERT INTO markers (domain_uuid, seq, cut_time, disks, bytes, committed)"
                   " VALUES (:uuid, 7, 1.5, '[\"vda\"]', '{\"vda\": 65536}', 1.6)", {"uuid": UUID})
        db.execute("INSERT INTO audit (time, domain_uuid, event) VALUES (1.0, :uuid, 'protect')", {"uuid": UUID})
        for step in MIGRATIONS[:version]:
            db.execute(step)
        db.execute(f"PRAGMA user_version = {version}")
    finally:
        db.close()


def columns(db: sqlite3.Connection) -> dict[str, list[tuple[str, str, int, object, int]]]:
    tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]
    return {t: [tuple(c[1:]) for c in db.execute(f"PRAGMA table_info({t})")] for t in tables}


@pytest.mark.parametrize("version", range(SCHEMA_VERSION))
def test_old_database_migrates_with_its_rows(db_path: str, version: int) -> None:
    old_database(db_path, version)
    s = Store(db_path)
    try:
        assert s._db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        pri, sec = s.protection(UUID, "primary"), s.protection(UUID, "secondary")
        assert pri is not None and sec is not None
        # "generation" was the last committed marker: the value moved, the old name is gone.
        assert (pri["domain"], pri["peer"], pri["segment"], pri["rpo"], pri["suspended"], pri["committed_seq"]) \
            == ("web01", "dr1", "gold", 60, 1, 7)
        assert (sec["peer"], sec["committed_seq"], sec["held"], sec["base_seq"]) == ("pri", 5, 4, 3)
        assert "generation" not in pri.keys()
        [pair] = s.pairs("primary", UUID)
        assert (pair.target, pair.size, pair.last_marker) == ("vda", 1048576, 7)
        [marker] = s.markers(UUID)
        assert (marker.seq, marker.disks, marker.bytes) == (7, ("vda",), {"vda": 65536})
        assert [r["event"] for r in s.audit_log(UUID)] == ["protect"]
        s.set_protection(UUID, "primary", committed_seq=8)  # and it is writable under the new name
    finally:
        s.close()
    s = Store(db_path)  # a second open finds nothing to do
    try:
        pri = s.protection(UUID, "primary")
        assert pri is not None and pri["committed_seq"] == 8
    finally:
        s.close()


def test_new_database_is_the_migrated_old_one(tmp_path: Path) -> None:
    """One schema, whichever way a host got there: fresh equals v0 plus every step."""
    fresh, old = str(tmp_path / "fresh" / "state.db"), str(tmp_path / "old" / "state.db")
    old_database(old, 0)
    for path in (fresh, old):
        Store(path).close()
    a, b = sqlite3.connect(fresh), sqlite3.connect(old)
    try:
        assert a.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert b.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert columns(a) == columns(b)
        assert "committed_seq" in [c[0] for c in columns(a)["protections"]]
    finally:
        a.close()
        b.close()


def test_newer_database_is_refused_and_left_alone(db_path: str) -> None:
    old_database(db_path, SCHEMA_VERSION)
    db = sqlite3.connect(db_path)
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.close()
    before = Path(db_path).read_bytes()
    with pytest.raises(ConfigError) as err:
        Store(db_path)
    msg = str(err.value)
    assert "\n" not in msg
    assert db_path in msg and f"schema version {SCHEMA_VERSION + 1}" in msg and f"({SCHEMA_VERSION})" in msg
    assert Path(db_path).read_bytes() == before


def test_failed_step_keeps_the_last_good_version(db_path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each step commits with its version bump: a failing step rolls back alone."""
    old_database(db_path, 0)
    monkeypatch.setattr(store_mod, "MIGRATIONS", (*MIGRATIONS, "ALTER TABLE nosuch ADD COLUMN x INTEGER"))
    monkeypatch.setattr(store_mod, "SCHEMA_VERSION", SCHEMA_VERSION + 1)
    with pytest.raises(sqlite3.OperationalError, match="nosuch"):
        Store(db_path)
    db = sqlite3.connect(db_path)
    try:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert db.execute("SELECT committed_seq FROM protections WHERE role = 'primary'").fetchone() == (7,)
    finally:
        db.close()

"""The pair state machine (plugin.domain.lifecycle): one case per transition, and
the store applying it with one WARNING on entry into a bad state."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from plugin.domain import BAD_STATES, PairEvent, PairState, Protection, next_state, severity
from plugin.replication.secondary import Secondary
from plugin.state import Store
from tests.fakes.fake_qmp import FakeQmp

S = PairState
E = PairEvent
UUID = "0f6b2d1e-6a4c-4d55-9a53-2b8f7a1c9e01"

# Every (state, event) whose outcome is not "unchanged", written out by hand.
CHANGES = {
    # a copy in progress
    (S.INITIAL_COPY, E.CYCLE_OK): S.ACTIVE,
    (S.INITIAL_COPY, E.PEER_UNREACHABLE): S.DISCONNECTED,
    (S.INITIAL_COPY, E.CYCLE_FAILED): S.ERROR,
    (S.INITIAL_COPY, E.STOPPED): S.STOPPED,
    (S.INITIAL_COPY, E.CRASHED): S.NEEDS_RESYNC,
    (S.INITIAL_COPY, E.SUSPEND): S.SUSPENDED,
    (S.INITIAL_COPY, E.RETIRE): S.DELETED,
    # cycles succeed
    (S.ACTIVE, E.COPY_STARTED): S.INITIAL_COPY,
    (S.ACTIVE, E.LAG_OVER_RPO): S.BEHIND,
    (S.ACTIVE, E.PEER_UNREACHABLE): S.DISCONNECTED,
    (S.ACTIVE, E.CYCLE_FAILED): S.ERROR,
    (S.ACTIVE, E.STOPPED): S.STOPPED,
    (S.ACTIVE, E.CRASHED): S.NEEDS_RESYNC,
    (S.ACTIVE, E.SUSPEND): S.SUSPENDED,
    (S.ACTIVE, E.RETIRE): S.DELETED,
    # late
    (S.BEHIND, E.COPY_STARTED): S.INITIAL_COPY,
    (S.BEHIND, E.CYCLE_OK): S.ACTIVE,
    (S.BEHIND, E.PEER_UNREACHABLE): S.DISCONNECTED,
    (S.BEHIND, E.CYCLE_FAILED): S.ERROR,
    (S.BEHIND, E.STOPPED): S.STOPPED,
    (S.BEHIND, E.CRASHED): S.NEEDS_RESYNC,
    (S.BEHIND, E.SUSPEND): S.SUSPENDED,
    (S.BEHIND, E.RETIRE): S.DELETED,
    # peer unreachable
    (S.DISCONNECTED, E.COPY_STARTED): S.INITIAL_COPY,
    (S.DISCONNECTED, E.CYCLE_OK): S.ACTIVE,
    (S.DISCONNECTED, E.CYCLE_FAILED): S.ERROR,
    (S.DISCONNECTED, E.STOPPED): S.STOPPED,
    (S.DISCONNECTED, E.CRASHED): S.NEEDS_RESYNC,
    (S.DISCONNECTED, E.SUSPEND): S.SUSPENDED,
    (S.DISCONNECTED, E.RETIRE): S.DELETED,
    # any other failure
    (S.ERROR, E.COPY_STARTED): S.INITIAL_COPY,
    (S.ERROR, E.CYCLE_OK): S.ACTIVE,
    (S.ERROR, E.PEER_UNREACHABLE): S.DISCONNECTED,
    (S.ERROR, E.STOPPED): S.STOPPED,
    (S.ERROR, E.CRASHED): S.NEEDS_RESYNC,
    (S.ERROR, E.SUSPEND): S.SUSPENDED,
    (S.ERROR, E.RETIRE): S.DELETED,
    # the domain's QEMU is gone
    (S.STOPPED, E.STARTED): S.ACTIVE,
    (S.STOPPED, E.COPY_STARTED): S.INITIAL_COPY,
    (S.STOPPED, E.PEER_UNREACHABLE): S.DISCONNECTED,
    (S.STOPPED, E.CYCLE_FAILED): S.ERROR,
    (S.STOPPED, E.CRASHED): S.NEEDS_RESYNC,
    (S.STOPPED, E.SUSPEND): S.SUSPENDED,
    (S.STOPPED, E.RETIRE): S.DELETED,
    # the user's pause
    (S.SUSPENDED, E.RESUME): S.ACTIVE,
    (S.SUSPENDED, E.CRASHED): S.NEEDS_RESYNC,
    (S.SUSPENDED, E.RETIRE): S.DELETED,
    # the bitmap is lost: only a re-copy (or the end) leaves it
    (S.NEEDS_RESYNC, E.COPY_STARTED): S.INITIAL_COPY,
    (S.NEEDS_RESYNC, E.RETIRE): S.DELETED,
}


@pytest.mark.parametrize(("state", "event"), [(s, e) for s in S for e in E],
                         ids=lambda v: v.value.replace(" ", "-"))
def test_transition(state: PairState, event: PairEvent) -> None:
    assert next_state(state, event) is CHANGES.get((state, event), state)


def test_each_change_in_the_table_is_a_change() -> None:
    """The table above holds no "unchanged" rows by mistake."""
    assert all(state is not new for (state, _), new in CHANGES.items())


def test_needs_resync_is_never_left_by_a_cycle_or_a_start() -> None:
    for event in (E.CYCLE_OK, E.STARTED, E.RESUME, E.SUSPEND, E.STOPPED, E.LAG_OVER_RPO):
        assert next_state(S.NEEDS_RESYNC, event) is S.NEEDS_RESYNC


def test_severity_puts_trouble_first() -> None:
    ordered = sorted(S, key=severity)
    assert set(ordered[:len(BAD_STATES)]) == BAD_STATES
    assert ordered[0] is S.ERROR and S.ACTIVE not in BAD_STATES and S.STOPPED not in BAD_STATES


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    root = tempfile.mkdtemp(prefix="vs-unit-", dir="/dev/shm") if os.access("/dev/shm", os.W_OK) \
        else str(tmp_path)
    s = Store(os.path.join(root, "state.db"))
    try:
        yield s
    finally:
        s.close()
        shutil.rmtree(root, ignore_errors=True)


def test_store_transition_warns_once_on_entry(store: Store, caplog: pytest.LogCaptureFixture) -> None:
    store.upsert_pair(UUID, "primary", "web01", "vda", "dr1", 1, S.ACTIVE)
    store.upsert_pair(UUID, "primary", "web01", "vdb", "dr1", 1, S.ACTIVE)
    with caplog.at_level(logging.INFO, logger="virtsync.state"):
        assert store.transition(UUID, "primary", E.PEER_UNREACHABLE, "dr1 unreachable since 12:00") is S.DISCONNECTED
        assert store.transition(UUID, "primary", E.PEER_UNREACHABLE, "dr1 unreachable since 12:00, 3 tries") \
            is S.DISCONNECTED
        assert store.transition(UUID, "primary", E.LAG_OVER_RPO, "lag 40 s") is S.DISCONNECTED
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert "web01 vda: active -> disconnected" in warnings[0].getMessage()
    assert "web01 vdb: active -> disconnected" in warnings[0].getMessage()
    # A repeated failure refreshes its reason; an event that changes nothing keeps it.
    assert {(p.state, p.reason) for p in store.pairs("primary")} == \
        {(S.DISCONNECTED, "dr1 unreachable since 12:00, 3 tries")}
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="virtsync.state"):
        assert store.transition(UUID, "primary", E.CYCLE_OK) is S.ACTIVE
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert {(p.state, p.reason) for p in store.pairs("primary")} == {(S.ACTIVE, "")}


def test_store_transition_of_one_target(store: Store) -> None:
    store.upsert_pair(UUID, "primary", "web01", "vda", "dr1", 1, S.ACTIVE)
    store.upsert_pair(UUID, "primary", "web01", "vdb", "dr1", 1, S.ACTIVE)
    store.transition(UUID, "primary", E.CRASHED, "bitmap inconsistent", target="vdb")
    assert {p.target: p.state for p in store.pairs("primary")} == {"vda": S.ACTIVE, "vdb": S.NEEDS_RESYNC}


def agent_with(tmp_path: Path, store: Store) -> Any:
    from plugin.config import Config
    from plugin.daemon import Agent
    agent = Agent(Config(name="pri", listen_host="127.0.0.1", listen_port=8441, state_dir=str(tmp_path / "state"),
                         keys_dir=str(tmp_path / "keys"), peers={}))
    agent.store = store
    agent.secondary = Secondary(agent.cfg, store, FakeQmp())   # status also lists the replicas kept here: none
    return agent


def protect(store: Store, uuid: str, name: str, state: PairState, reason: str = "", rpo: int = 300) -> None:
    store.add_protection(uuid, "primary", name, Protection(peer="dr1", rpo=rpo))
    store.upsert_pair(uuid, "primary", name, "vda", "dr1", 1 << 20, S.INITIAL_COPY)
    store.set_pair_state(uuid, "primary", state, reason)


def test_status_lists_the_worst_first_with_its_reason(tmp_path: Path, store: Store) -> None:
    protect(store, "00000000-0000-0000-0000-00000000000a", "app", S.ACTIVE)
    protect(store, "00000000-0000-0000-0000-00000000000b", "web", S.STOPPED, "domain not running (shutdown)")
    protect(store, "00000000-0000-0000-0000-00000000000c", "db", S.ERROR, "internal error: boom")
    protect(store, "00000000-0000-0000-0000-00000000000d", "mail", S.DISCONNECTED, "dr1 unreachable since 12:00")
    status = asyncio.run(agent_with(tmp_path, store).status.op_status({}))
    assert [(d["domain"], d["state"], d["reason"]) for d in status["domains"]] == [
        ("db", "error", "internal error: boom"),
        ("mail", "disconnected", "dr1 unreachable since 12:00"),
        ("web", "stopped", "domain not running (shutdown)"),
        ("app", "active", ""),
    ]


def test_pairs_say_behind_once_the_newest_marker_is_older_than_the_rpo(tmp_path: Path, store: Store,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    protect(store, UUID, "web", S.ACTIVE, rpo=60)
    store.finish_cycle(store.start_cycle(UUID, 1, "full"), 1 << 20)
    agent = agent_with(tmp_path, store)
    assert [p["state"] for p in agent._pairs_json()] == ["active"]
    later = time.time() + 61
    monkeypatch.setattr("plugin.agent.protection.time.time", lambda: later)
    (pair,) = agent._pairs_json()
    assert pair["state"] == "behind" and "over the RPO of 60s" in pair["reason"], pair
    # A stopped domain is not late: it writes nothing.
    store.set_pair_state(UUID, "primary", S.STOPPED, "domain not running (destroyed)")
    assert [p["state"] for p in agent._pairs_json()] == ["stopped"]

"""Names and limits of replicas on the secondary (issue 21, item 6).

The pure rules (:mod:`plugin.replication.limits`) over a space of inputs with
hypothesis; then the real :class:`Secondary` (fake QEMU, real store, the
stand-in qemu-img of ``test_secondary_requests``): a refused ``prepare`` leaves
no trace, and local commands on an ambiguous name say so in one line and take
``--from PEER``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import string
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from plugin import cli
from plugin.daemon import Agent
from plugin.domain import Protection
from plugin.errors import StateConflictError
from plugin.replication import limits
from plugin.replication import secondary as secondary_mod
from plugin.replication.limits import AmbiguousNameError, PeerRequestError
from plugin.requests import UsageError
from tests.unit.test_secondary_requests import DISKS, OTHER, PROTECTION, UUID, Env

MiB = 1 << 20
PiB = 1 << 50
THIRD = "3c9e2f4a-5b6d-4e7f-8a9b-0c1d2e3f4a5b"

names = st.text(st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp", "Co", "Cn"), blacklist_characters="/"),
                min_size=1, max_size=limits.MAX_DOMAIN_NAME).filter(str.isprintable)


def one_line(message: str) -> None:
    assert message and "\n" not in message and len(message) < 400, message


# -- the rules ---------------------------------------------------------------------------

@given(names)
def test_printable_names_without_slash_are_taken(name: str) -> None:
    assert limits.check_domain_name(name) == name


@given(st.one_of(
    st.text(min_size=limits.MAX_DOMAIN_NAME + 1, max_size=limits.MAX_DOMAIN_NAME + 300),
    st.builds(lambda a, b, c: a + c + b, names, names, st.sampled_from(["/", "\n", "\x00", "\t", "\x7f", "\u2028"])),
    st.just(""), st.none(), st.integers(), st.lists(st.text(max_size=3)),
))
def test_other_names_are_refused_in_one_line(value: Any) -> None:
    with pytest.raises(PeerRequestError) as info:
        limits.check_domain_name(value)
    one_line(str(info.value))
    assert "domain name" in str(info.value)


def test_a_100kb_name_is_refused_without_echoing_it() -> None:
    with pytest.raises(PeerRequestError, match="102400 characters long, at most 255") as info:
        limits.check_domain_name("x" * 102400)
    assert len(str(info.value)) < 200


@given(st.integers(min_value=1, max_value=limits.MAX_DISK_SIZE))
def test_sizes_up_to_the_maximum_are_taken(size: int) -> None:
    assert limits.check_disk_size("vda", size) == size


@given(st.one_of(st.integers(max_value=0), st.integers(min_value=limits.MAX_DISK_SIZE + 1),
                 st.booleans(), st.floats(), st.text(max_size=5), st.none()))
def test_other_sizes_are_refused(size: Any) -> None:
    with pytest.raises(PeerRequestError, match="disk vda: bad size") as info:
        limits.check_disk_size("vda", size)
    one_line(str(info.value))


def test_one_pib_is_refused_with_the_rule() -> None:
    with pytest.raises(PeerRequestError, match=r"1\.0 PiB, more than the largest replica this host takes \(64\.0 TiB"):
        limits.check_disk_size("vda", PiB)


@given(st.dictionaries(st.sampled_from(["vda", "vdb", "sda"]), st.integers(1, 1 << 44), min_size=1),
       st.integers(0, 1 << 46))
def test_room_is_the_sum_against_free_space(sizes: dict[str, int], free: int) -> None:
    if sum(sizes.values()) <= free:
        limits.check_room(sizes, free)
    else:
        with pytest.raises(PeerRequestError, match="more than the replica storage has free") as info:
            limits.check_room(sizes, free)
        one_line(str(info.value))


@given(st.integers(0, 300))
def test_disk_count(n: int) -> None:
    disks = [{}] * n
    if 1 <= n <= limits.MAX_DISKS:
        limits.check_disk_count(disks)
    else:
        with pytest.raises(PeerRequestError, match=f"names {n} disks: a domain has 1 to 64"):
            limits.check_disk_count(disks)


def row(uuid: str, domain: str, peer: str) -> dict[str, str]:
    return {"domain_uuid": uuid, "domain": domain, "peer": peer}


rows = st.lists(st.builds(row, st.sampled_from([UUID, OTHER, THIRD]), st.sampled_from(["vsq", "web"]),
                          st.sampled_from(["pri", "evil"])), max_size=5, unique_by=lambda r: r["domain_uuid"])


@given(rows, st.sampled_from(["vsq", "web", UUID, OTHER, "none"]), st.sampled_from([None, "pri", "evil"]))
def test_pick_replica_is_unique_or_says_why(replicas: list[dict[str, str]], name: str, peer: str | None) -> None:
    candidates = [r for r in replicas if peer is None or r["peer"] == peer]
    by_uuid = [r for r in candidates if r["domain_uuid"] == name]
    by_name = [r for r in candidates if r["domain"] == name]
    if by_uuid:
        assert limits.pick_replica(name, replicas, peer) == by_uuid[0]
    elif len(by_name) > 1:
        with pytest.raises(AmbiguousNameError) as info:
            limits.pick_replica(name, replicas, peer)
        message = str(info.value)
        one_line(message)
        assert all(r["domain_uuid"] in message for r in by_name)
        several_peers = len({r["peer"] for r in by_name}) > 1
        assert ("--from PEER" in message) == several_peers
    else:
        assert limits.pick_replica(name, replicas, peer) == (by_name[0] if by_name else None)


@given(rows, st.sampled_from(["vsq", "web", "new"]), st.sampled_from([UUID, OTHER, THIRD]),
       st.sampled_from(["pri", "evil"]))
def test_a_name_is_free_unless_another_peer_uses_it(replicas: list[dict[str, str]], name: str, uuid: str,
                                                     owner: str) -> None:
    taken = any(r["domain"] == name and r["peer"] != owner and r["domain_uuid"] != uuid for r in replicas)
    if taken:
        with pytest.raises(PeerRequestError, match="already used here by another peer's replica") as info:
            limits.check_name_free(name, uuid, owner, replicas)
        assert "evil" not in str(info.value) and "pri" not in str(info.value).replace("printable", "")
    else:
        limits.check_name_free(name, uuid, owner, replicas)


# -- the secondary ------------------------------------------------------------------------

@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Env:
    e = Env(tmp_path)
    monkeypatch.setattr(secondary_mod, "run_tool", e.fake_qemu_img)
    return e


def test_another_peer_cannot_take_a_used_name(env: Env) -> None:
    env.run(env.sec.prepare(UUID, "vsq", "pri", DISKS, PROTECTION))
    message = env.refuses(env.sec.prepare(OTHER, "vsq", "evil", DISKS, PROTECTION), match="already used")
    assert "rename the domain" in message
    # The owner may prepare another domain of that name (a re-created domain: a new uuid).
    env.run(env.sec.prepare(OTHER, "vsq", "pri", DISKS, PROTECTION))
    assert env.store.protection(OTHER, "secondary")["peer"] == "pri"


@pytest.mark.parametrize("domain, match", [
    ("x" * 100_000, "100000 characters long"), ("a/b", "without '/'"), ("", "non-empty"), ("a\nb", "printable"),
])
def test_prepare_refuses_bad_domain_names(env: Env, domain: str, match: str) -> None:
    env.refuses(env.sec.prepare(UUID, domain, "pri", DISKS, PROTECTION), match=match)


def test_prepare_refuses_a_pib_disk_and_too_many_disks(env: Env) -> None:
    env.refuses(env.sec.prepare(UUID, "web", "pri", [{"target": "vda", "size": PiB}], PROTECTION),
                match="1.0 PiB, more than the largest replica")
    many = [{"target": f"vd{i}", "size": MiB} for i in range(65)]
    env.refuses(env.sec.prepare(UUID, "web", "pri", many, PROTECTION), match="names 65 disks")


def test_prepare_refuses_more_than_the_free_space(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(secondary_mod, "free_bytes", lambda path: 20 * MiB)
    env.refuses(env.sec.prepare(UUID, "web", "pri", DISKS, PROTECTION),   # 16 + 8 MiB
                match=r"disks vda, vdb: 24\.0 MiB is more than the replica storage has free \(20\.0 MiB\)")
    # Disks that already have their replica do not count again.
    monkeypatch.setattr(secondary_mod, "free_bytes", lambda path: 100 * MiB)
    env.run(env.sec.prepare(UUID, "web", "pri", DISKS, PROTECTION))
    monkeypatch.setattr(secondary_mod, "free_bytes", lambda path: 0)
    env.run(env.sec.prepare(UUID, "web", "pri", DISKS, PROTECTION))


def test_a_grown_disk_must_fit_too(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    env.run(env.sec.prepare(UUID, "web", "pri", DISKS, PROTECTION))
    monkeypatch.setattr(secondary_mod, "free_bytes", lambda path: MiB)
    with pytest.raises(PeerRequestError, match=r"disks vda: 2\.0 MiB is more than"):
        env.run(env.sec.open_cycle(UUID, 1, "full", ["vda", "vdb"], {"vda": 18 * MiB}))


# -- local commands on an ambiguous name -------------------------------------------------

@pytest.fixture
def agent(env: Env) -> Agent:
    """Replicas named ``vsq`` from two peers: state left from before names were checked."""
    env.run(env.sec.prepare(UUID, "vsq", "pri", DISKS, PROTECTION))
    env.store.add_protection(OTHER, "secondary", "vsq", Protection(peer="evil"))
    a = Agent(env.cfg)
    a.secondary = env.sec
    a.store = env.store
    return a


def test_an_ambiguous_name_is_refused_and_from_picks(agent: Agent) -> None:
    for op in ("markers", "apply", "hold", "release"):
        with pytest.raises(AmbiguousNameError, match="--from PEER") as info:
            asyncio.run(agent.handle(op, {"domain": "vsq"}))
        one_line(str(info.value))
        assert UUID in str(info.value) and OTHER in str(info.value)
    assert agent._replica({"domain": "vsq", "from": "pri"}) == UUID
    assert agent._replica({"domain": "vsq", "from": "evil"}) == OTHER
    assert agent._replica({"domain": OTHER}) == OTHER   # the uuid always names one
    info = asyncio.run(agent.handle("markers", {"domain": "vsq", "from": "pri"}))
    assert info["protected"] is True
    with pytest.raises(StateConflictError, match="no replica of domain 'vsq' from peer dr9 on this host"):
        asyncio.run(agent.handle("hold", {"domain": "vsq", "from": "dr9"}))


@pytest.mark.parametrize("argv", [["markers", "vsq"], ["apply", "vsq", "--until", "3"], ["hold", "vsq"],
                                  ["release", "vsq"], ["restore", "vsq", "--marker", "1", "--to", "/tmp/x"]])
def test_cli_sends_from(argv: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    sent: list[tuple[str, dict[str, Any]]] = []

    def request(socket: str, op: str, args: dict[str, Any], **kw: Any) -> dict[str, Any]:
        sent.append((op, args))
        raise cli.ipc.RemoteError("AmbiguousNameError", "domain name 'vsq' names 2 replicas here (...): "
                                  "give --from PEER", 2)

    monkeypatch.setattr(cli.ipc, "request", request)
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        assert cli.main([*argv, "--socket", "/nonexistent"]) == 2
    assert err.getvalue().count("\n") == 1 and "give --from PEER" in err.getvalue()
    with redirect_stdout(out), redirect_stderr(err):
        cli.main([*argv, "--from", "pri", "--socket", "/nonexistent"])
    assert sent[0][1].get("from") is None and sent[1][1]["from"] == "pri"
    assert {k: v for k, v in sent[1][1].items() if k != "from"} == sent[0][1]


def test_cli_checks_the_peer_name() -> None:
    err = io.StringIO()
    with redirect_stderr(err):
        assert cli.main(["markers", "vsq", "--from", "a/b", "--socket", "/nonexistent"]) == 2
    assert "peer name 'a/b' must not contain '/'" in err.getvalue()


@settings(max_examples=30)
@given(st.text(string.ascii_letters + string.digits + "-_", min_size=1, max_size=20))
def test_cli_from_takes_peer_names(peer: str) -> None:
    args = cli.build_parser().parse_args(["markers", "vsq", f"--from={peer}"])
    assert args.from_peer == peer


# -- an abandoned cycle does not keep its exports ------------------------------------------

def test_a_cycle_its_primary_abandoned_closes_by_itself(env: Env) -> None:
    env.sec.cfg = dataclasses.replace(env.cfg, cycle_timeout=0.05)
    env.run(env.sec.prepare(UUID, "web", "pri", DISKS, PROTECTION))

    async def scenario() -> tuple[list[str], list[str]]:
        await env.sec.open_cycle(UUID, 1, "full", ["vda", "vdb"])
        await env.sec.commit_cycle(UUID, 1, 1001.0, {"vda": 0, "vdb": 0})
        committed = env.qmp.commands()
        await asyncio.sleep(0.3)   # the committed cycle's timer was cancelled: nothing more is sent
        assert env.qmp.commands() == committed
        await env.sec.open_cycle(UUID, 2, "incremental", ["vda", "vdb"])   # ... and its primary goes away
        await asyncio.wait_for(env.sec._expiry[UUID], 30)
        return committed, env.qmp.commands()[len(committed):]

    committed, after = env.run(scenario())
    assert UUID not in env.sec._open
    assert after.count("block-export-add") == 2 and after.count("block-export-del") == 2
    assert not [f for f in env.files() if f.endswith(".partial")]
    assert env.rows()["markers"] == [(UUID, 1)]


# -- a mark's label is checked before a cycle is cut ---------------------------------------

@given(st.text(max_size=200))
def test_label_rule_is_the_secondarys(label: str) -> None:
    problem = limits.label_problem(label)
    try:
        secondary_mod._check_marker_fields(label, 1.0)
        refused_there = False
    except PeerRequestError:
        refused_there = True
    assert (problem is not None) == refused_there
    if problem is not None:
        one_line(problem)


@pytest.mark.parametrize("label", ["x" * 129, "a\nb", "\x00", "tab\there"])
def test_a_raw_mark_with_a_bad_label_is_refused_before_any_cycle(env: Env, label: str) -> None:
    agent = Agent(env.cfg)
    with pytest.raises(UsageError, match="a label is at most 128 printable characters") as info:
        asyncio.run(agent.handle("mark", {"domain": "vsq", "label": label}))
    one_line(str(info.value))

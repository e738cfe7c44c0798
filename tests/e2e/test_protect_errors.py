"""Bad input at protect time: one clear line, the right exit code, nothing half-created.

Two lab hosts run their agents; ``pri`` has BIOS-only domains (no guest OS is
needed to protect): ``vs-ok`` with two qcow2 disks, ``vs-raw`` with a raw disk
and ``vs-off``, defined but shut off. Every refusal goes through the real CLI
(``plugin.cli.main`` in-process against the agent's socket) and is followed by
a look at everything protect could have created: protection and pair rows on
either agent, the replica directory on the secondary, ``vs-`` nodes, bitmaps and
jobs inside the domain's QEMU, and the protection metadata in its XML. After
the refusals, protecting the good domain still works, and a second protect of it
(sequential or concurrent) is refused without harming the first.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from plugin import cli
from plugin.errors import PluginError
from tests.lab.fixtures import LabPair
from tests.lab.site import Site, agent_rows, define_domain, domain_leftovers, make_image, open_site

pytestmark = pytest.mark.libvirt

MiB = 1 << 20
GOOD, RAW, OFF = "vs-ok", "vs-raw", "vs-off"
NOTHING: dict[str, list[str]] = {"nodes": [], "bitmaps": [], "jobs": [], "metadata": []}


@pytest.fixture
def site(lab_pair: LabPair) -> Iterator[Site]:
    pri = lab_pair.pri
    disks = Path(pri.root) / "disks"
    disks.mkdir()
    define_domain(pri, GOOD, disks=[(make_image(disks / f"{GOOD}-{t}.qcow2", "16M"), "qcow2") for t in ("a", "b")])
    define_domain(pri, RAW, disks=[(make_image(disks / f"{RAW}-a.raw", "16M", "raw"), "raw")])
    define_domain(pri, OFF, disks=[(make_image(disks / f"{OFF}-a.qcow2", "16M"), "qcow2")], start=False)
    with open_site(lab_pair) as s:
        s.domains += [GOOD, RAW]
        yield s


def virtsync(capsys: pytest.CaptureFixture[str], site: Site, *argv: str) -> tuple[int, str, str]:
    """``virtsync ARGV --socket <pri agent>``: (exit code, stdout, stderr)."""
    capsys.readouterr()
    code = cli.main([*argv, "--socket", site.pri.socket])
    out, err = capsys.readouterr()
    return code, out, err


def refused(capsys: pytest.CaptureFixture[str], site: Site, code: int, error: str, *argv: str) -> str:
    """Run a protect that must fail: exit ``code``, one stderr line starting with ``error``."""
    started = time.monotonic()
    got, out, err = virtsync(capsys, site, "protect", *argv)
    assert (got, out) == (code, ""), f"exit {got}, stdout {out!r}, stderr {err!r}"
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{error}: "), err
    assert time.monotonic() - started < 10, "a refusal should be quick"
    return lines[0]


def assert_nothing_created(capsys: pytest.CaptureFixture[str], site: Site) -> None:
    code, out, err = virtsync(capsys, site, "pairs", "--json")
    assert (code, json.loads(out), err) == (0, {"pairs": []}, "")
    for agent in (site.pri, site.sec):
        assert agent_rows(agent) == {"protections": [], "pairs": [], "markers": []}, agent.host.name
    assert sorted(p.name for p in site.sec.storage.iterdir()) == [], "a replica directory was left on sec"
    for domain in (GOOD, RAW):
        assert domain_leftovers(site.hosts.pri, domain) == NOTHING, domain
    assert "urn:x-virtsync" not in site.hosts.pri.virsh("dumpxml", "--inactive", OFF)


def test_bad_protects_leave_nothing_then_protect_works(site: Site, capsys: pytest.CaptureFixture[str]) -> None:
    assert_nothing_created(capsys, site)

    line = refused(capsys, site, 1, "DomainNotFoundError", "no-such-vm", "--to", "sec")
    assert "no-such-vm" in line and "not found" in line
    assert_nothing_created(capsys, site)

    line = refused(capsys, site, 2, "ConfigError", GOOD, "--to", "nope")
    assert "unknown peer 'nope'" in line and "configured peers: sec" in line
    assert_nothing_created(capsys, site)

    line = refused(capsys, site, 2, "UsageError", RAW, "--to", "sec")
    assert "disk vda cannot be replicated: format raw" in line and "asynchronous mode needs qcow2" in line
    assert_nothing_created(capsys, site)

    line = refused(capsys, site, 1, "StateConflictError", OFF, "--to", "sec")
    assert f"domain '{OFF}' is not running" in line
    assert_nothing_created(capsys, site)

    line = refused(capsys, site, 2, "UsageError", GOOD, "--to", "sec", "--mode", "sync")
    assert "mode sync is not available" in line
    assert_nothing_created(capsys, site)

    # The peer's agent is down: the primary must not record a protection it cannot start.
    site.sec.stop()
    line = refused(capsys, site, 1, "PeerUnreachableError", GOOD, "--to", "sec")
    assert "peer sec" in line and "unreachable" in line
    site.sec.start()
    assert_nothing_created(capsys, site)

    # After all that, a good protect works and completes its initial copy.
    code, out, err = virtsync(capsys, site, "protect", GOOD, "--to", "sec", "--rpo", "3600", "--wait")
    assert code == 0, err
    assert out.splitlines()[0] == f"{GOOD}: protected to sec"
    code, out, _ = virtsync(capsys, site, "pairs", "--json")
    pairs = json.loads(out)["pairs"]
    assert [(p["target"], p["state"], p["last_marker"]) for p in pairs] == [("vda", "active", 1), ("vdb", "active", 1)]
    left = domain_leftovers(site.hosts.pri, GOOD)
    assert left["nodes"] == [] and left["jobs"] == [] and len(left["metadata"]) == 2   # live and persistent XML
    assert [b.split(":")[1] for b in left["bitmaps"]] == ["vs-g1", "vs-g1"]
    sec_rows = agent_rows(site.sec)
    assert sec_rows["protections"] == [("secondary", GOOD, "pri")]

    # Protecting it again is refused and changes nothing on either side.
    before = (pairs, agent_rows(site.pri), sec_rows, left)
    line = refused(capsys, site, 1, "StateConflictError", GOOD, "--to", "sec")
    assert f"domain '{GOOD}' is already protected (to sec)" in line
    _, out, _ = virtsync(capsys, site, "pairs", "--json")
    after = (json.loads(out)["pairs"], agent_rows(site.pri), agent_rows(site.sec), domain_leftovers(site.hosts.pri, GOOD))
    for entry in after[0]:
        entry["lag_seconds"] = None
    for entry in before[0]:
        entry["lag_seconds"] = None
    assert after == before

    # And unprotect takes everything away again.
    code, out, err = virtsync(capsys, site, "unprotect", GOOD)
    assert code == 0, err
    assert_nothing_created(capsys, site)


def test_concurrent_protects_of_one_domain(site: Site) -> None:
    """Two protects of the same domain at once: exactly one wins, the loser's
    cleanup must not undo the winner's protection (its rows, its replica, its
    supervisor)."""
    results: list[Any] = [None, None]
    barrier = threading.Barrier(2)

    def protect(i: int) -> None:
        barrier.wait()
        try:
            results[i] = site.pri.call("protect", domain=GOOD, to="sec", rpo=3600, timeout=60)
        except PluginError as e:
            results[i] = e

    threads = [threading.Thread(target=protect, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    errors = [r for r in results if isinstance(r, Exception)]
    assert len(errors) == 1, results
    assert type(errors[0]).__name__ == "StateConflictError" and "already protected" in str(errors[0]), errors[0]

    # The winner is whole: a marker can be cut and lands on the secondary.
    marker = site.pri.call("mark", domain=GOOD, timeout=60)
    assert marker["seq"] >= 1
    pairs = site.pri.call("pairs", domain=GOOD)["pairs"]
    assert {(p["state"], p["last_marker"]) for p in pairs} == {("active", marker["seq"])}, pairs
    assert agent_rows(site.pri)["protections"] == [("primary", GOOD, "sec")]
    assert agent_rows(site.sec)["protections"] == [("secondary", GOOD, "pri")]
    assert [m["seq"] for m in site.pri.call("markers", domain=GOOD)["markers"]][-1] == marker["seq"]
    left = domain_leftovers(site.hosts.pri, GOOD)
    assert left["nodes"] == [] and len(left["metadata"]) == 2

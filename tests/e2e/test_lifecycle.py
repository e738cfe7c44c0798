"""The primary's supervisor follows the VM and libvirtd through their lives (issue 12,
issue 21 item 4), on one pair of lab hosts shared by the scenarios, in order:

1. an unexpected exception in a domain's supervisor (injected: plugin/faults.py) is
   logged once with its traceback, shown as ``error`` with the reason in ``pairs``
   and ``status``, and the supervisor restarts: markers come;
2. libvirtd killed and restarted twice while the guest writes: markers continue and
   every retained marker restores to a consistent cut of the guest's writes;
3. the VM paused (markers still come), then destroyed: ``mark`` fails with one line
   and ``pairs`` never says ``active`` then; the agent restarts while the VM is shut
   off; the VM starts again (its writes continue the sequence): the next marker is an
   increment of what the guest dirtied, checked against the oracle; the agent also
   starts with the VM paused; a shut-off VM can be unprotected.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from plugin import cli
from tests.lab import stamps
from tests.lab.fixtures import LabPair
from tests.lab.site import (
    Site,
    WritingGuest,
    check_replica,
    cycles,
    dirtied_bytes,
    open_site,
    set_next_boot,
    start_writing_guest,
    wait_for,
)

pytestmark = [pytest.mark.libvirt, pytest.mark.guest]

GUEST = "life01"
DISKS, BLOCKS, SIZE = 2, 2048, "16M"   # the guest writes blocks 0..2047 (8 MiB) of 16 MiB disks
RPO = 6                              # a cycle every 3 s
FAULT = "supervisor-before-cycle"


@pytest.fixture(scope="module")
def site(module_lab_pair: LabPair) -> Iterator[tuple[Site, WritingGuest]]:
    guest = start_writing_guest(module_lab_pair.pri, GUEST, DISKS, BLOCKS, size=SIZE)
    with open_site(module_lab_pair, start=False) as s:
        s.domains.append(GUEST)
        yield s, guest


def newest_marker(s: Site) -> int:
    markers = s.sec.call("markers", domain=GUEST)["markers"]
    return max((int(m["seq"]) for m in markers), default=0)


def cli_run(s: Site, capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """The real CLI against the primary's agent: (exit code, stdout, stderr)."""
    capsys.readouterr()
    code = cli.main([*argv, "--socket", s.pri.socket])
    out, err = capsys.readouterr()
    return code, out, err


def states(s: Site) -> tuple[set[str], dict[str, Any]]:
    """The pairs' states and the domain's line of ``status``."""
    pairs = s.pri.call("pairs", domain=GUEST)["pairs"]
    (dom,) = [d for d in s.pri.call("status")["domains"] if d["domain"] == GUEST]
    return {p["state"] for p in pairs}, dom


def assert_replicating(s: Site) -> None:
    """Cycles run: each pair is active, or behind exactly when its newest marker is older
    than the RPO (a cycle under this shared machine's load can take seconds); status agrees."""
    pairs = s.pri.call("pairs", domain=GUEST)["pairs"]
    for p in pairs:
        assert p["state"] == ("behind" if p["lag_seconds"] > RPO else "active"), p
    (dom,) = [d for d in s.pri.call("status")["domains"] if d["domain"] == GUEST]
    assert dom["state"] in ("active", "behind"), dom


def test_unexpected_exception_is_logged_shown_and_restarted(site: tuple[Site, WritingGuest],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    s, _ = site
    monkeypatch.setenv("VIRTSYNC_FAULT_TIMES", "3")   # the first three cycles raise: 1 + 2 + 4 s of backoff
    s.sec.start()
    s.pri.start(fault=FAULT)
    s.pri.call("protect", domain=GUEST, to="sec", rpo=RPO, wait=False)

    def shown() -> bool:
        pair_states, dom = states(s)
        pairs = s.pri.call("pairs", domain=GUEST)["pairs"]
        return (pair_states == {"error"} and all("InjectedFaultError" in p["reason"] for p in pairs)
                and dom["state"] == "error" and "InjectedFaultError" in dom["reason"])

    wait_for("pairs and status to show the injected error", shown, timeout=60, poll=0.2)
    # Restarted: the first marker (a full copy), then more.
    wait_for("the first marker after the faults", lambda: newest_marker(s) >= 1, timeout=120, poll=0.5)
    first = newest_marker(s)
    mark = s.pri.call("mark", domain=GUEST, timeout=120)
    assert mark["seq"] > first
    assert_replicating(s)

    log = s.pri.log.read_text(errors="replace")
    reason = "supervisor failed: internal error: InjectedFaultError: injected fault at " + FAULT
    assert log.count(reason) == 1, s.pri.tail(80)
    # Once with its traceback, then one line per repeat; asyncio never saw the task die.
    assert log.count("plugin.faults.InjectedFaultError: injected fault at " + FAULT) == 1, s.pri.tail(80)
    assert log.count("supervisor failed again: internal error: InjectedFaultError") == 2, s.pri.tail(80)
    assert "Task exception was never retrieved" not in log


def test_libvirtd_restarts_are_survived(site: tuple[Site, WritingGuest], tmp_path: Path) -> None:
    s, guest = site
    host = s.hosts.pri
    resumed = []
    for n in (1, 2):
        before = newest_marker(s)
        writes = guest.last_seq()
        host.kill_libvirtd()
        wait_for("the agent to notice the lost connection",
                 lambda n=n: s.pri.log.read_text(errors="replace").count("libvirt connection lost") >= n,
                 timeout=60, poll=0.2)
        host.restart_libvirtd()
        t0 = time.monotonic()
        # Two new markers: the second was cut entirely after the agent reconnected.
        wait_for(f"markers to continue after libvirtd restart {n}",
                 lambda before=before: newest_marker(s) >= before + 2, timeout=120, poll=0.2)
        resumed.append(time.monotonic() - t0)
        assert guest.last_seq() > writes, "the guest kept writing"
    print(f"markers resumed {', '.join(f'{t:.1f}' for t in resumed)} s after libvirtd restarts (RPO {RPO} s)")
    assert_replicating(s)
    # Every retained marker restores to a consistent cut, and the cuts never go back
    # (replication held meanwhile, or retention would drop markers under the loop).
    s.pri.call("suspend", domain=GUEST)
    oracle = stamps.Oracle(DISKS, BLOCKS)
    cuts = []
    for m in s.sec.call("markers", domain=GUEST)["markers"]:
        disks = s.sec.call("restore", domain=GUEST, marker=m["seq"], to=str(tmp_path / f"m{m['seq']}"))["disks"]
        result = stamps.check_images([disks[t] for t in sorted(disks)], oracle)
        assert result.ok, (m["seq"], result.summary())
        cuts.append(result.cut_seq)
    assert len(cuts) >= 4 and cuts == sorted(cuts), cuts
    s.pri.call("resume", domain=GUEST)


def test_stop_start_and_agent_start_while_shut_off(site: tuple[Site, WritingGuest], tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    s, guest = site
    host = s.hosts.pri
    oracle = stamps.Oracle(DISKS, BLOCKS)
    # Paused: QEMU runs, so cycles do; the cut holds every write made.
    host.virsh("suspend", GUEST)
    s.pri.call("mark", domain=GUEST, timeout=120)
    last_write = stamps.check_images(guest.disks, oracle, force_share=True).cut_seq
    assert check_replica(s, GUEST, oracle) == last_write

    host.virsh("destroy", GUEST)
    # Whether or not the agent has seen the stop yet: mark fails in one line, and then
    # pairs and status never say active.
    for _ in range(5):
        code, _, err = cli_run(s, capsys, "mark", GUEST)
        assert code != 0 and len(err.strip().splitlines()) == 1, err
        assert f"{GUEST} is not running (destroyed)" in err, err
        pair_states, dom = states(s)
        assert "active" not in pair_states and dom["state"] != "active", (pair_states, dom)
    wait_for("pairs to say stopped", lambda: states(s)[0] == {"stopped"}, timeout=60, poll=0.2)

    # The agent starts while the protected VM is shut off.
    s.pri.stop()
    s.pri.start()
    assert states(s)[0] == {"stopped"}
    code, _, err = cli_run(s, capsys, "mark", GUEST)
    assert code != 0 and len(err.strip().splitlines()) == 1 and "is not running" in err, err
    stopped_at = newest_marker(s)
    cycles_before = len(cycles(s.pri, limit=1000))

    # Started again, the guest's writes continue the sequence; replication is held
    # meanwhile so that one increment carries all of it.
    s.pri.call("suspend", domain=GUEST)
    set_next_boot(host, GUEST, last_write + 1)
    host.virsh("start", GUEST)
    wait_for("the guest to write 300 blocks more", lambda: guest.last_seq() >= last_write + 300,
             timeout=180, poll=0.5)
    host.virsh("suspend", GUEST)
    now_write = stamps.check_images(guest.disks, oracle, force_share=True).cut_seq
    s.pri.call("resume", domain=GUEST)
    mark = s.pri.call("mark", domain=GUEST, timeout=120)
    assert check_replica(s, GUEST, oracle) == now_write
    assert_replicating(s)

    # No full copy: what crossed after the start is what the guest dirtied.
    new = [m for m in s.sec.call("markers", domain=GUEST)["markers"] if m["seq"] > stopped_at]
    assert new and new[-1]["seq"] == mark["seq"], new
    sent = {t: sum(m["bytes"].get(t, 0) for m in new) for t in ("vda", "vdb")}
    dirtied = dirtied_bytes(oracle, last_write, now_write)
    print(f"after the start: sent {sent}, dirtied {dirtied}")
    for disk, n in dirtied.items():
        assert n <= sent[disk] <= 1.1 * n, (disk, sent[disk], n)
    kinds = [c["kind"] for c in cycles(s.pri, limit=1000)[cycles_before:] if c["error"] is None]
    assert kinds and "full" not in kinds, kinds
    restored = s.sec.call("restore", domain=GUEST, marker=mark["seq"], to=str(tmp_path / "after"))["disks"]
    result = stamps.check_images([restored[t] for t in sorted(restored)], oracle)
    assert result.ok and result.cut_seq == now_write, result.summary()

    # The agent also starts with the VM paused: markers come as before.
    s.pri.stop()
    s.pri.start()
    assert s.pri.call("mark", domain=GUEST, timeout=120)["seq"] > mark["seq"]
    assert_replicating(s)

    # And a shut-off VM can be unprotected.
    host.virsh("destroy", GUEST)
    wait_for("pairs to say stopped", lambda: states(s)[0] == {"stopped"}, timeout=60, poll=0.2)
    assert s.pri.call("unprotect", domain=GUEST)["domain"] == GUEST
    assert s.pri.call("pairs")["pairs"] == [] and "vs:protection" not in host.virsh("dumpxml", "--inactive", GUEST)

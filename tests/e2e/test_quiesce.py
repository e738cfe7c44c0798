"""``virtsync mark --quiesce``: a freeze through the QEMU guest agent around the cut.

The writing guest runs a minimal guest agent (``vs.qga=1``, tests/lab/guest/init.sh):
freezing stops its writer and prints ``VS-FROZEN seq=S`` (the last write done), so a
quiesced marker must hold exactly writes 1..S. Without an agent the mark is refused
with one clear line, unless ``--crash-consistent-ok`` takes a crash-consistent marker.
"""

from __future__ import annotations

import json
import re
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from plugin import cli
from plugin.virt import domains
from tests.lab import stamps
from tests.lab.agent import LabAgent
from tests.lab.fixtures import LabPair
from tests.lab.guest import read_log
from tests.lab.site import Site, WritingGuest, open_site, start_writing_guest, wait_for

pytestmark = [pytest.mark.libvirt, pytest.mark.guest]

DISKS, BLOCKS = 2, 1024
GUEST = "qa01"
FROZEN_RE = re.compile(rb"VS-FROZEN seq=(\d+)")


@pytest.fixture
def site(lab_pair: LabPair, request: pytest.FixtureRequest) -> Iterator[tuple[Site, WritingGuest]]:
    """The lab pair with agents and the writing guest, protected. ``request.param``
    (indirect): "agent" (guest agent and channel), "no-channel" (no agent configured),
    "silent" (a channel, but nothing in the guest opens it), "hung" (an agent that
    freezes the guest but never answers the freeze)."""
    kind = getattr(request, "param", "agent")
    guest = start_writing_guest(lab_pair.pri, GUEST, DISKS, BLOCKS, size="8M", qga=kind == "agent",
                                channel=kind != "no-channel", qga_hang=kind == "hung")
    if kind in ("agent", "hung"):
        # the agent opens its port right after VS-READY; libvirt connects then
        deadline = time.monotonic() + 30
        while b"VS-QGA port=" not in read_log(guest.serial):
            assert time.monotonic() < deadline, read_log(guest.serial)[-2000:]
            time.sleep(0.1)
    with open_site(lab_pair, journal={"retain_markers": 10}) as s:
        s.domains.append(GUEST)
        s.pri.call("protect", domain=GUEST, to="sec", rpo=3600, wait=True)
        yield s, guest


def cli_mark(agent: LabAgent, capsys: pytest.CaptureFixture[str], *flags: str) -> tuple[int, Any, str]:
    """``virtsync mark GUEST FLAGS --json`` through the real CLI: (exit code, result, stderr)."""
    capsys.readouterr()
    code = cli.main(["mark", GUEST, *flags, "--json", "--socket", agent.socket])
    out, err = capsys.readouterr()
    return code, json.loads(out) if code == 0 else None, err


def restore_cut(sec: LabAgent, seq: int, tmp: Path) -> int:
    """Restore marker ``seq`` and check it against the oracle: the guest sequence number it holds."""
    dest = tmp / f"restore-{seq}"
    disks = sec.call("restore", domain=GUEST, marker=seq, to=str(dest))["disks"]
    result = stamps.check_images([disks[t] for t in sorted(disks)], stamps.Oracle(DISKS, BLOCKS))
    assert result.ok, result.summary()
    return result.cut_seq


def marker_seqs(sec: LabAgent) -> list[int]:
    return [m["seq"] for m in sec.call("markers", domain=GUEST)["markers"]]


def audit_marks(agent: LabAgent) -> list[dict[str, Any]]:
    db = sqlite3.connect(f"file:{agent.dir / 'state' / 'state.db'}?mode=ro", uri=True, timeout=10)
    try:
        rows = db.execute("SELECT detail FROM audit WHERE event = 'mark' ORDER BY id").fetchall()
    finally:
        db.close()
    return [json.loads(r[0]) for r in rows]


def wait_writes_past(guest: WritingGuest, seq: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while guest.last_seq() <= seq:
        assert time.monotonic() < deadline, f"the guest did not write past {seq} after the thaw"
        time.sleep(0.2)


def test_quiesced_marker_is_the_frozen_point(site: tuple[Site, WritingGuest], tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    s, guest = site
    for round_ in range(2):
        time.sleep(0.5)
        before = len(FROZEN_RE.findall(read_log(guest.serial)))
        if round_ == 0:
            code, result, err = cli_mark(s.pri, capsys, "--quiesce", "--label", "quiet")
            assert (code, err) == (0, "")
        else:
            result = s.pri.call("mark", domain=GUEST, quiesce=True)
        assert result["quiesced"] is True, result
        log = read_log(guest.serial)
        frozen = list(FROZEN_RE.finditer(log))
        assert len(frozen) == before + 1, log[-2000:]
        frozen_seq = int(frozen[-1][1])
        assert b"VS-THAWED" in log[frozen[-1].end():], "no thaw after the freeze"
        # the freeze made the cut land exactly where the writer stopped
        assert restore_cut(s.sec, result["seq"], tmp_path) == frozen_seq
        wait_writes_past(guest, frozen_seq + 100)
    audit = audit_marks(s.pri)
    assert [(a["quiesce"], a["quiesced"]) for a in audit] == [(True, True), (True, True)], audit
    assert audit[0]["label"] == "quiet"
    print("guest frozen for (ms):", [a["frozen_ms"] for a in audit])
    # a plain mark still works and says it was not quiesced
    plain = s.pri.call("mark", domain=GUEST)
    assert plain["quiesced"] is False
    restore_cut(s.sec, plain["seq"], tmp_path)
    # what libvirt 9.0 sent to the agent (shown with -s on failure or -rA)
    rx = [line for line in read_log(guest.serial).decode(errors="replace").splitlines() if "VS-QGA-RX" in line]
    print("\n".join(rx))
    assert any("guest-fsfreeze-freeze" in line for line in rx)
    assert any("guest-fsfreeze-thaw" in line for line in rx)


@pytest.mark.parametrize("site", ["no-channel", "silent"], indirect=True)
def test_without_agent_refused_unless_crash_consistent_ok(site: tuple[Site, WritingGuest], tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    s, guest = site
    markers = marker_seqs(s.sec)
    t0 = time.monotonic()
    code, _, err = cli_mark(s.pri, capsys, "--quiesce")
    refused_in = time.monotonic() - t0
    assert code == 1, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    with capsys.disabled():
        print("\n" + lines[0])
    assert f"{GUEST}: no guest agent answered (" in lines[0]
    assert lines[0].endswith("marker not taken; use --crash-consistent-ok to take a crash-consistent marker "
                             "instead"), lines[0]
    assert marker_seqs(s.sec) == markers, "a refused mark added a marker"
    assert all(p["state"] == "active" for p in s.pri.call("pairs", domain=GUEST)["pairs"]), \
        "a refused quiesce is not a replication error"
    assert b"VS-FROZEN" not in read_log(guest.serial)
    assert refused_in < 15, refused_in

    code, result, err = cli_mark(s.pri, capsys, "--quiesce", "--crash-consistent-ok")
    assert (code, err) == (0, ""), err
    assert result["quiesced"] is False
    assert marker_seqs(s.sec) == [*markers, result["seq"]]
    cut = restore_cut(s.sec, result["seq"], tmp_path)
    assert cut > 0
    audit = audit_marks(s.pri)
    assert "no guest agent answered" in audit[0]["refused"]
    assert audit[-1]["quiesced"] is False and audit[-1]["crash_consistent_because"]
    # --crash-consistent-ok alone is a usage error
    code, _, err = cli_mark(s.pri, capsys, "--crash-consistent-ok")
    assert code == 2 and "only goes with --quiesce" in err, err


@pytest.mark.parametrize("site", ["hung"], indirect=True)
def test_hung_agent_refused_in_bounded_time_and_the_guest_thawed(site: tuple[Site, WritingGuest],
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """An agent that freezes the guest and never answers: the mark is refused within
    the freeze timeout, no marker is added, the guest is thawed and writes on, and the
    next quiesced attempt is not stuck behind the first."""
    s, guest = site
    before = [m["seq"] for m in s.sec.call("markers", domain=GUEST)["markers"]]
    t0 = time.monotonic()
    code, _, err = cli_mark(s.pri, capsys, "--quiesce")
    took = time.monotonic() - t0
    assert code == 1 and "no answer from the guest agent" in err and "--crash-consistent-ok" in err, err
    assert took < domains.FREEZE_TIMEOUT + 10, f"refused only after {took:.1f}s"
    assert [m["seq"] for m in s.sec.call("markers", domain=GUEST)["markers"]] == before
    assert b"VS-FROZEN" in read_log(guest.serial), "the freeze did reach the guest"
    wait_for("the guest to be thawed", lambda: b"VS-THAWED" in read_log(guest.serial), timeout=15)
    seq = guest.last_seq()
    wait_for("the guest to write on after the thaw", lambda: guest.last_seq() >= seq + 100, timeout=15)
    # Not wedged: a crash-consistent fallback is taken in bounded time, and says why.
    t0 = time.monotonic()
    code, result, err = cli_mark(s.pri, capsys, "--quiesce", "--crash-consistent-ok")
    assert code == 0 and result["quiesced"] is False, err
    assert time.monotonic() - t0 < domains.FREEZE_TIMEOUT + 10

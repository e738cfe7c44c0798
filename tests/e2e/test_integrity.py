"""Replica integrity end to end (issue 21): bytes flipped in the replica base,
in its chunk-hash record and in a sealed segment on the secondary are named by
``verify`` down to the file and chunk, shown in ``markers`` and ``status``,
never restored as good; a repair sends only the damaged chunks again from the
primary and the replica comes back (checked against the writing guest's oracle
at each marker); an unaffected marker still restores.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from plugin import cli
from plugin.errors import PluginError
from plugin.replication import integrity
from tests.lab import stamps
from tests.lab.agent import LabAgent
from tests.lab.fixtures import LabPair
from tests.lab.site import open_site, start_writing_guest

pytestmark = [pytest.mark.libvirt, pytest.mark.guest]

DISKS, BLOCKS = 2, 1024
GUEST = "db01"
MiB = 1 << 20


@pytest.fixture
def site(lab_pair: LabPair) -> Iterator[dict[str, Any]]:
    start_writing_guest(lab_pair.pri, GUEST, DISKS, BLOCKS, size="8M")
    # Two applied markers stay restorable: older ones fold into the base as the test goes.
    with open_site(lab_pair, journal={"retain_markers": 2}) as s:
        s.domains.append(GUEST)
        yield {"pri": s.pri, "sec": s.sec}


def restore_cut(sec: LabAgent, seq: int, tmp: Path) -> int:
    """Restore marker ``seq`` and check it against the oracle: a consistent cut, no torn block."""
    dest = tmp / f"restore-{seq}-{time.monotonic_ns()}"
    result = sec.call("restore", domain=GUEST, marker=seq, to=str(dest))
    check = stamps.check_images([result["disks"][t] for t in sorted(result["disks"])],
                                stamps.Oracle(DISKS, BLOCKS), force_share=True)
    assert check.ok, check.summary()
    return check.cut_seq


def mark(pri: LabAgent) -> int:
    time.sleep(0.3)   # let the guest write something between markers
    return int(pri.call("mark", domain=GUEST)["seq"])


def flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x5A]))


def audit_events(agent: LabAgent) -> set[str]:
    db = sqlite3.connect(f"file:{agent.dir / 'state' / 'state.db'}?mode=ro", uri=True)
    try:
        return {r[0] for r in db.execute("SELECT event FROM audit")}
    finally:
        db.close()


def read_from(view: Path, depth: int) -> tuple[int, int]:
    """(guest offset, offset in that layer's file) of a byte that ``view`` reads
    from the layer ``depth`` images down its chain (0: the view itself). The guest
    writes scattered 4 KiB blocks, but a busy cycle may still rewrite a whole MiB:
    the damage goes where the newest marker surely reads it."""
    out = subprocess.run(["qemu-img", "map", "-U", "--output=json", str(view)], check=True,
                         capture_output=True, text=True).stdout
    ext = next(e for e in json.loads(out) if e["data"] and e["depth"] == depth)
    return int(ext["start"]) + 100, int(ext["offset"]) + 100


def test_damage_is_named_refused_and_repaired_from_the_primary(site: dict[str, Any], tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    pri, sec = site["pri"], site["sec"]
    uuid = pri.call("protect", domain=GUEST, to="sec", rpo=3600, wait=True)["uuid"]
    root = sec.storage / uuid
    m2, m3 = mark(pri), mark(pri)
    clean = sec.call("verify", domain=GUEST)
    assert clean["findings"] == [] and clean["markers"] == {}, clean
    assert clean["bytes"] >= 2 * 8 * MiB
    info = sec.call("markers", domain=GUEST)
    assert info["base_seq"] == m2 and [m["seq"] for m in info["markers"]] == [m2, m3]

    # one byte in a data cluster of vda's base, one in the hash of a chunk of vdb's base
    # (both where marker m3, whose segments sit right on the base, reads from the base)
    guest_off, file_off = read_from(root / f"vda.seg-{m3:08d}.qcow2", depth=1)
    flip(root / "vda.base.qcow2", file_off)
    bad_chunk = guest_off // MiB
    rec_chunk = read_from(root / f"vdb.seg-{m3:08d}.qcow2", depth=1)[0] // MiB
    flip(root / "vdb.base.sums", integrity.HEADER_SIZE + rec_chunk * 37 + 9)

    found = sec.call("verify", domain=GUEST)
    lines = found["findings"]
    assert any(f.startswith(f"vda.base.qcow2 chunk {bad_chunk} (guest bytes {bad_chunk * MiB}..")
               and "content does not match its recorded hash" in f for f in lines), lines
    assert any(f.startswith(f"vdb.base.qcow2 chunk {rec_chunk} (") and "hash record entry is damaged" in f
               for f in lines), lines
    assert len(lines) == 2, lines
    # every retained marker reads those base chunks (m2 is the base itself; m3 reads them)
    assert sorted(found["markers"]) == [str(m2), str(m3)], found["markers"]
    info = sec.call("markers", domain=GUEST)
    assert all(m["damage"] for m in info["markers"]), info["markers"]
    assert info["integrity"]["findings"] == lines
    status = sec.call("status")
    replica = next(r for r in status["replicas"] if r["domain"] == GUEST)
    assert replica["findings"] == lines and replica["damaged_markers"] == [m2, m3]

    # the real CLI: verify exits 1; restore is refused with one line naming file and chunk, nothing written
    assert cli.main(["--socket", sec.socket, "verify", GUEST]) == 1
    out = capsys.readouterr().out
    assert f"damaged: vda.base.qcow2 chunk {bad_chunk} " in out and f"damaged: vdb.base.qcow2 chunk {rec_chunk} " in out
    assert cli.main(["--socket", sec.socket, "restore", GUEST, "--marker", str(m3), "--to",
                     str(tmp_path / "cli-refused")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"marker {m3}: vd" in err and ".base.qcow2 chunk " in err, err
    assert not (tmp_path / "cli-refused").exists()

    for seq in (m2, m3):   # refused, in one line naming the file and the chunk
        with pytest.raises(PluginError, match=rf"^marker {seq}: vd[ab]\.base\.qcow2 chunk \d+ \(guest bytes") as e:
            sec.call("restore", domain=GUEST, marker=seq, to=str(tmp_path / f"refused-{seq}"))
        assert "\n" not in str(e.value)
        assert not (tmp_path / f"refused-{seq}").exists()

    # repair: the secondary asks, the primary's next cut sends those chunks again (and only those)
    asked = sec.call("markers", domain=GUEST)["repair"]
    assert asked == {"vda": [[bad_chunk * MiB, MiB]], "vdb": [[rec_chunk * MiB, MiB]]}, asked
    m4 = mark(pri)
    assert "repair-requested" in audit_events(pri)
    sent = pri.call("markers", domain=GUEST)["markers"][-1]
    assert sent["seq"] == m4 and sent["bytes"]["vda"] >= MiB and sent["bytes"]["vdb"] >= MiB, sent
    assert sec.call("markers", domain=GUEST)["repair"] == {}, "still asking after the repair marker"
    cut4 = restore_cut(sec, m4, tmp_path)          # the repaired marker restores, exactly a cut
    with pytest.raises(PluginError, match=rf"^marker {m3}: vd[ab]\.base\.qcow2 chunk"):
        sec.call("restore", domain=GUEST, marker=m3, to=str(tmp_path / "still-refused"))

    # folding the repair marker into the base re-hashes those chunks: the replica is whole again
    m5 = mark(pri)
    m6 = mark(pri)
    info = sec.call("markers", domain=GUEST)
    assert info["base_seq"] == m5 and info["applied"] == m6
    healed = sec.call("verify", domain=GUEST)
    assert healed["findings"] == [] and healed["markers"] == {}, healed
    assert restore_cut(sec, m5, tmp_path) >= cut4
    restore_cut(sec, m6, tmp_path)

    # a flipped segment: named by file chunk; later markers refused, the one before still restores
    sec.call("hold", domain=GUEST)
    m7, m8 = mark(pri), mark(pri)
    seg = root / f"vdb.seg-{m7:08d}.qcow2"
    _, seg_off = read_from(root / f"vdb.seg-{m8:08d}.qcow2", depth=1)   # a byte of m7 that m8 reads
    flip(seg, seg_off)
    bad = seg_off // MiB
    found = sec.call("verify", domain=GUEST)
    assert found["findings"] == [f"marker {m7}: segment {seg.name} content does not match its hash in file chunk "
                                 f"{bad} (file bytes {bad * MiB}..{(bad + 1) * MiB})"], found
    assert sorted(found["markers"]) == [str(m7), str(m8)]
    with pytest.raises(PluginError, match=f"marker {m8} reads damaged marker {m7}: segment {seg.name}"):
        sec.call("restore", domain=GUEST, marker=m8, to=str(tmp_path / "r8"))
    restore_cut(sec, m6, tmp_path)

    # repair of the segment: the chunks it held (and no later marker holds) are sent again
    sec.call("release", domain=GUEST)
    info = sec.call("markers", domain=GUEST)
    assert info["applied"] == m6, "a marker that reads the damaged segment was applied"
    assert list(info["repair"]) == ["vdb"], info["repair"]
    m9 = mark(pri)
    info = sec.call("markers", domain=GUEST)
    assert info["applied"] == m9 and info["repair"] == {}, info
    restore_cut(sec, m9, tmp_path)
    for seq in (m7, m8):
        if any(m["seq"] == seq for m in info["markers"]):   # retained: still refused
            with pytest.raises(PluginError, match=f"marker {seq}"):
                sec.call("restore", domain=GUEST, marker=seq, to=str(tmp_path / f"x{seq}"))
    m10 = mark(pri)
    healed = sec.call("verify", domain=GUEST)
    assert healed["findings"] == [] and healed["markers"] == {}, healed
    restore_cut(sec, m10, tmp_path)

    # the record's header: the whole record is refused, every chunk of that disk is sent again
    flip(root / "vdb.base.sums", 12)
    found = sec.call("verify", domain=GUEST)
    assert found["findings"] == ["vdb.base.sums: chunk-hash record header checksum mismatch"], found
    assert sorted(found["markers"]) == sorted(str(m["seq"]) for m in sec.call("markers", domain=GUEST)["markers"])
    with pytest.raises(PluginError, match=f"marker {m10}: vdb.base.qcow2 chunk"):
        sec.call("restore", domain=GUEST, marker=m10, to=str(tmp_path / "r10"))
    asked = sec.call("markers", domain=GUEST)["repair"]
    # every chunk of vdb the newest marker reads from the base, whole (those its segment
    # holds entirely are not read there, and not asked for)
    out = subprocess.run(["qemu-img", "map", "-U", "--output=json", str(root / f"vdb.seg-{m10:08d}.qcow2")],
                         check=True, capture_output=True, text=True).stdout
    from_base = sorted({c for e in json.loads(out) if e["depth"] >= 1
                        for c in range(e["start"] // MiB, (e["start"] + e["length"] - 1) // MiB + 1)})
    assert list(asked) == ["vdb"], asked
    assert sorted(c for a, n in asked["vdb"] for c in range(a // MiB, (a + n) // MiB)) == from_base, asked
    assert all(a % MiB == 0 and n % MiB == 0 for a, n in asked["vdb"]), asked
    m11 = mark(pri)
    restore_cut(sec, m11, tmp_path)
    mark(pri)
    healed = sec.call("verify", domain=GUEST)
    assert healed["findings"] == [] and healed["markers"] == {}, healed

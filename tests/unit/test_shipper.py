"""The shipper at the QMP boundary: what it asks of the storage daemon."""

from __future__ import annotations

import asyncio
import os
import stat
import uuid as uuidlib
from pathlib import Path

import pytest

from plugin.replication.shipper import SHIP_BITMAP, NbdTls, Shipper
from tests.fakes.fake_qmp import FakeQmp

LONGEST_TARGET = "x" * 16  # the longest disk target the peer API accepts
NODE_NAME_MAX = 31          # QEMU refuses longer node names


def scripted() -> FakeQmp:
    qmp = FakeQmp()
    for command in ("object-del", "object-add", "blockdev-add", "transaction", "blockdev-del"):
        qmp.on(command)
    qmp.on("query-jobs", {"return": []})
    return qmp


def test_start_opens_stage_and_export_then_one_transaction() -> None:
    qmp = scripted()
    shipper = Shipper(qmp, str(uuidlib.uuid4()), NbdTls("/keys/sec", "pri", "NORMAL"), speed_limit=1 << 20)
    asyncio.run(shipper.start(7, {"vda": "/scratch/a.qcow2"}, {"vda": "web01-vda-7"}, "10.0.0.2", 10809))

    assert qmp.commands() == ["object-del", "object-add", "blockdev-add", "blockdev-add", "transaction"]
    tls_id = qmp.sent[1][1]["id"]
    assert tls_id != "vs-tls-nbd", "the daemon ships for many domains: its TLS object is the domain's own"
    stage, nbd = qmp.sent[2][1], qmp.sent[3][1]
    # Never flushed to disk: the stage is scratch (and a flush would write it all out).
    assert stage["file"]["cache"] == {"direct": False, "no-flush": True}
    assert stage["backing"] is None and stage["file"]["filename"] == "/scratch/a.qcow2"
    assert nbd["tls-creds"] == tls_id and nbd["export"] == "web01-vda-7"
    (action,) = qmp.sent[4][1]["actions"]
    backup = action["data"]
    assert (action["type"], backup["sync"], backup["bitmap"], backup["bitmap-mode"]) == \
        ("blockdev-backup", "bitmap", SHIP_BITMAP, "never")
    assert (backup["device"], backup["target"], backup["speed"]) == (stage["node-name"], nbd["node-name"], 1 << 20)


def test_names_fit_qemu_and_differ_between_domains() -> None:
    names = []
    for _ in range(2):
        qmp = scripted()
        asyncio.run(Shipper(qmp, str(uuidlib.uuid4()), None, None).start(
            1, {LONGEST_TARGET: "/s"}, {LONGEST_TARGET: "e"}, "10.0.0.2", 10809))
        added = [args for command, args in qmp.sent if command == "blockdev-add"]
        assert "tls-creds" not in added[1], "plain link: no TLS object"
        for node in added:
            assert len(node["node-name"]) <= NODE_NAME_MAX, node["node-name"]
            if "file" in node:
                assert len(node["file"]["node-name"]) <= NODE_NAME_MAX, node["file"]["node-name"]
        names.append({n["node-name"] for n in added})
    assert not names[0] & names[1]


def test_close_removes_nodes_and_tls_object() -> None:
    qmp = scripted()
    shipper = Shipper(qmp, "u", NbdTls("/keys/sec", "pri"), None)
    asyncio.run(shipper.close(["vda"]))
    deleted = [args["node-name"] for command, args in qmp.sent if command == "blockdev-del"]
    assert deleted == [f"vs-n{shipper.tag}-vda", f"vs-s{shipper.tag}-vda"]
    assert qmp.sent[-1] == ("object-del", {"id": f"vs-tls-{shipper.tag}"})


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")
def test_stages_belong_to_the_guests_qemu(tmp_path: Path) -> None:
    """QEMU running as another user (libvirt's DAC label) can write its stages, nobody else can read them."""
    from plugin.domain import DiskSpec
    from plugin.replication.primary import DomainReplicator
    from plugin.state import Store

    qmp = FakeQmp()
    qmp.on("blockdev-add")
    scratch = tmp_path / "scratch"
    nobody = (65534, 65534)
    rep = DomainReplicator(store=Store(str(tmp_path / "s.db")), peer=None, qmp=qmp,  # type: ignore[arg-type]
                           uuid="u", domain="d", disks=[], scratch=str(scratch), shipper=qmp,
                           cycle_timeout=1, stall_after=1, stage_owner=nobody)
    rep._make_scratch()  # as the cycle does, when it checks the room
    asyncio.run(rep._add_stages([DiskSpec("vda", "/x", "qcow2", 1 << 20, "n0")]))
    (stage,) = scratch.iterdir()
    st = stage.stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (*nobody, 0o600)
    assert stat.S_IMODE(scratch.stat().st_mode) == 0o711, "reachable by QEMU, listable by nobody"
    assert qmp.sent[0][1]["file"]["filename"] == str(stage)

"""A marker when nothing changed moves no data and still is a marker: it is
listed, restorable, and the next write is sent as usual."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.lab.fixtures import LabPair
from tests.lab.procs import run
from tests.lab.site import define_domain, make_image, open_site

pytestmark = pytest.mark.libvirt
GUEST = "idle01"


def guest_write(host, pattern: int, offset: str) -> None:  # type: ignore[no-untyped-def]
    """A write through the guest's disk device, as the guest would (HMP qemu-io)."""
    cmd = f'qemu-io -d /machine/peripheral/virtio-disk0/virtio-backend "write -P {pattern:#x} {offset} 64k"'
    reply = json.loads(host.virsh("qemu-monitor-command", GUEST, json.dumps(
        {"execute": "human-monitor-command", "arguments": {"command-line": cmd}})))
    assert reply.get("return") == "", reply


def expected(tmp_path: Path, name: str, writes: list[tuple[int, str]]) -> str:
    """What the disk must hold after ``writes`` (the source qcow2 cannot be read
    reliably while QEMU holds its metadata)."""
    path = str(tmp_path / f"{name}.raw")
    run(["qemu-img", "create", "-q", "-f", "raw", path, "32M"])
    for pattern, offset in writes:
        run(["qemu-io", "-f", "raw", "-c", f"write -P {pattern:#x} {offset} 64k", path])
    return path


def test_idle_marker_moves_nothing_and_restores(lab_pair: LabPair, tmp_path: Path) -> None:
    pri_host = lab_pair.pri
    disk = make_image(Path(pri_host.root) / "idle.qcow2", "32M")
    with open_site(lab_pair) as site:
        define_domain(pri_host, GUEST, disks=[(disk, "qcow2")])
        site.domains.append(GUEST)
        guest_write(pri_host, 0x11, "1M")
        site.pri.call("protect", domain=GUEST, to="sec", rpo=3600, wait=True)
        idle = site.pri.call("mark", domain=GUEST, label="idle")
        assert idle["kind"] == "empty" and idle["bytes"] == {"vda": 0}
        guest_write(pri_host, 0x22, "5M")
        busy = site.pri.call("mark", domain=GUEST)
        assert busy["kind"] == "incremental" and busy["bytes"] == {"vda": 64 * 1024}
        markers = site.sec.call("markers", domain=GUEST)["markers"]
        assert [(m["seq"], m["label"]) for m in markers][-2:] == [(idle["seq"], "idle"), (busy["seq"], "")]
        restored = site.sec.call("restore", domain=GUEST, marker=idle["seq"], to=str(tmp_path / "r"))
        assert "Images are identical" in run(["qemu-img", "compare", "-F", "raw", restored["disks"]["vda"],
                                              expected(tmp_path, "idle", [(0x11, "1M")])])
        views = site.sec.call("markers", domain=GUEST)["replica"]
        assert "Images are identical" in run(["qemu-img", "compare", "-F", "raw", views["vda"],
                                              expected(tmp_path, "busy", [(0x11, "1M"), (0x22, "5M")])])

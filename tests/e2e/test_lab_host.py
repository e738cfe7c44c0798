"""The lab itself: separate libvirtd hosts on a cuttable link, and QMP through libvirt.

Everything later e2e tests rely on is proven here once: distinct host
identities, a private network per host, domains that stay on their host, the
monitor passthrough (replies, errors, events, a bitmap on the disk's node) and a
teardown that leaves no netns, mount or process behind.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path

import libvirt
import pytest

from plugin.errors import VirtError
from plugin.virt.connection import open_connection
from plugin.virt.qmp_bridge import LibvirtQmpTransport
from qemu_blockdev.errors import QmpCommandError, TransportError
from tests.lab.fixtures import LabPair, require_lab
from tests.lab.host import LabError, LabHost
from tests.lab.netfault import NetFaultUnsupportedError, clear_netem, link_down, link_up, netem
from tests.lab.site import bios_domain_xml

pytestmark = pytest.mark.libvirt

GUEST = "vs-lab-guest"
WILDCARDS = ("0.0.0.0", "*", "[::]")


def guest_xml(disk: Path) -> str:
    """A tiny TCG guest that stays in the BIOS (no OS needed) with one qcow2 disk."""
    return bios_domain_xml(GUEST, [(str(disk), "qcow2")], "qemu")


def make_disk(tmp_path: Path) -> Path:
    path = tmp_path / "guest.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), "16M"], check=True)
    return path


def capabilities_uuid(conn: libvirt.virConnect) -> str:
    uuid = ET.fromstring(conn.getCapabilities()).findtext("host/uuid")
    assert uuid
    return uuid


def wildcard_listeners(host: LabHost) -> list[str]:
    """Listening TCP sockets bound to every address, seen inside the host's netns."""
    lines = host.run(["ss", "-ltnH"]).stdout.splitlines()
    return [line for line in lines if line.split()[3].rsplit(":", 1)[0] in WILDCARDS]


def wait_ping(host: LabHost, address: str, timeout: float = 5.0) -> bool:
    """Ping until it answers: a veth brought back up needs a moment for carrier."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if host.ping(address):
            return True
    return False


def test_hosts_are_distinct_and_linked(lab_pair: LabPair, lab_connect: Callable[[LabHost], libvirt.virConnect]) -> None:
    pri, sec = lab_pair
    uuids = [capabilities_uuid(lab_connect(host)) for host in lab_pair]
    assert uuids == [pri.host_uuid, sec.host_uuid]
    assert uuids[0] != uuids[1]
    # libvirt keeps its first event loop for good: another loop is refused, not silently deaf.
    with pytest.raises(VirtError, match="another asyncio loop"):
        asyncio.run(open_connection(pri.uri))

    assert pri.ping(sec.address) and sec.ping(pri.address)
    link_down(pri)
    assert not pri.ping(sec.address)
    assert not sec.ping(pri.address)
    link_up(pri)
    assert wait_ping(pri, sec.address) and wait_ping(sec, pri.address)

    netem(pri, loss_pct=100)  # netem qdisc, or the nftables egress fallback on this kernel
    assert not pri.ping(sec.address)
    clear_netem(pri)
    assert pri.ping(sec.address)
    try:
        netem(pri, delay_ms=20)
    except NetFaultUnsupportedError:
        pass  # no sch_netem in this kernel: tests that need delay must skip
    finally:
        clear_netem(pri)

    for host in lab_pair:
        assert wildcard_listeners(host) == []


def test_domain_stays_on_its_host_and_speaks_qmp(
    lab_pair: LabPair,
    lab_connect: Callable[[LabHost], libvirt.virConnect],
    lab_runner: asyncio.Runner,
    tmp_path: Path,
) -> None:
    pri, sec = lab_pair
    conn_pri, conn_sec = lab_connect(pri), lab_connect(sec)
    dom = conn_pri.defineXML(guest_xml(make_disk(tmp_path)))
    dom.create()

    assert pri.virsh("list", "--name").split() == [GUEST]
    assert sec.virsh("list", "--all", "--name").split() == []
    assert conn_sec.listAllDomains() == []
    with pytest.raises(libvirt.libvirtError):
        conn_sec.lookupByName(GUEST)

    lab_runner.run(exercise_bridge(dom))
    assert wildcard_listeners(pri) == []

    dom.destroy()
    lab_runner.run(bridge_after_destroy(dom))


async def exercise_bridge(dom: libvirt.virDomain) -> None:
    async with LibvirtQmpTransport(dom) as qmp:
        blocks = await qmp.execute("query-block")
        inserted = [b["inserted"] for b in blocks if b.get("inserted")]
        assert len(inserted) == 1
        node = inserted[0]["node-name"]  # libvirt 9.0 uses -blockdev: the format node
        assert any(n["node-name"] == node for n in await qmp.execute("query-named-block-nodes", {"flat": True}))

        with pytest.raises(QmpCommandError) as err:
            await qmp.execute("vs-no-such-command")
        assert err.value.error_class == "CommandNotFound"
        assert "vs-no-such-command" in err.value.desc  # QEMU's own message, verbatim

        # Subscribe before executing: STOP may arrive before the reply.
        with qmp.listen({"STOP", "RESUME"}) as events:
            await qmp.execute("stop")
            await qmp.execute("cont")
            async with asyncio.timeout(10):
                got = [await events.get(), await events.get()]
        assert [e.name for e in got] == ["STOP", "RESUME"]
        assert got[0].timestamp > 0

        await qmp.execute("block-dirty-bitmap-add", {"node": node, "name": "vs-test"})
        nodes = await qmp.execute("query-named-block-nodes", {"flat": True})
        bitmaps = [bm["name"] for n in nodes if n["node-name"] == node for bm in n.get("dirty-bitmaps", [])]
        assert bitmaps == ["vs-test"]


async def bridge_after_destroy(dom: libvirt.virDomain) -> None:
    qmp = LibvirtQmpTransport(dom)
    with pytest.raises(TransportError) as err:
        await qmp.execute("query-status")
    assert isinstance(err.value.__cause__, libvirt.libvirtError)


def test_restart_and_teardown_leave_nothing(tmp_path: Path) -> None:
    require_lab()
    disk = make_disk(tmp_path)
    (tmp_path / "guest.xml").write_text(guest_xml(disk))
    host = LabHost("solo")
    try:
        host.start()
        host.virsh("define", str(tmp_path / "guest.xml"))
        host.virsh("start", GUEST)
        qemu_pid = int((host.root / f"run/libvirt/qemu/{GUEST}.pid").read_text())
        first_libvirtd = host.libvirtd_pid
        # A killed libvirtd leaves its guest running and finds it again on restart.
        host.kill_libvirtd()
        assert process_alive(qemu_pid)
        host.restart_libvirtd()
        assert host.virsh("list", "--name").split() == [GUEST]
        pids = [host.init_pid, first_libvirtd, host.libvirtd_pid, host.virtlogd_pid, qemu_pid]
        root, netns = host.root, host.netns
    finally:
        host.stop()

    assert netns not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    for pid in pids:
        assert pid is not None and not process_alive(pid), f"pid {pid} survived"
    assert not root.exists()
    assert str(root) not in Path("/proc/self/mountinfo").read_text()


def process_alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"  # a zombie waits only for init to reap it


def test_link_faults_need_a_link(lab_host: LabHost) -> None:
    """A single host has only its private loopback: netfault refuses to guess."""
    assert lab_host.address == "127.0.0.1"
    assert lab_host.ping("127.0.0.1")
    with pytest.raises(LabError):
        link_down(lab_host)
    assert os.path.exists(lab_host.socket_path)

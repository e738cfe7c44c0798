"""The libvirt hook installed into lab libvirtds: start, stop and migration reach a fake agent
in order, or land in the spool when no agent listens.

The domain's XML carries a 256 KiB description, so libvirt's write of the XML to the hook's
stdin overflows the pipe (64 KiB) while the hook never reads it: libvirt must take the EPIPE
and go on (vircommand.c ignores it), which these tests prove on libvirt 9.0.
"""

from __future__ import annotations

import signal
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from plugin import hook
from tests.lab.host import LabHost
from tests.unit.test_hook import FakeAgent

pytestmark = pytest.mark.libvirt

GUEST = "vs-hook-guest"
DESCRIPTION = "d" * (256 << 10)
START = [("prepare", "begin"), ("start", "begin"), ("started", "begin")]
STOP = [("stopped", "end"), ("release", "end")]


def guest_xml() -> str:
    """A TCG guest without disks or OS that idles in the BIOS, with a large description."""
    return f"""
<domain type='qemu'>
  <name>{GUEST}</name>
  <description>{DESCRIPTION}</description>
  <memory unit='MiB'>64</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64'>hvm</type></os>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <memballoon model='none'/>
  </devices>
</domain>
"""


class HookedHost:
    """A lab host with the hook installed, pointing at ``base/a.sock`` and ``base/state``."""

    def __init__(self, host: LabHost, base: Path) -> None:
        self.host = host
        self.socket = str(base / "a.sock")   # short: sun_path holds 107 bytes
        self.spool = str(base / "state" / hook.SPOOL_NAME)
        self.xml = base / "guest.xml"
        self.xml.write_text(guest_xml())
        hook.install(str(host.root / "etc/libvirt/hooks/qemu.d"), socket_path=self.socket, spool=self.spool)
        # libvirtd looks for hooks at start and on SIGHUP only.
        host.kill_libvirtd(signal.SIGTERM)
        host.restart_libvirtd()

    def start_and_stop(self) -> None:
        self.host.virsh("create", str(self.xml))
        assert self.host.virsh("list", "--name").split() == [GUEST]
        self.host.virsh("destroy", GUEST)


@pytest.fixture
def base() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="vs-hk-", dir="/tmp") as d:
        yield Path(d)


def calls(events: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(e["op"], e["sub_op"]) for e in events]


def check_events(events: list[dict[str, Any]], host: LabHost, since: float) -> None:
    assert {e["domain"] for e in events} == {GUEST}
    assert {e["extra"] for e in events} == {"-"}
    assert {e["host_pid"] for e in events} == {host.libvirtd_pid}
    times = [e["time"] for e in events]
    assert since <= times[0] and times == sorted(times) and times[-1] <= time.time()


def test_start_and_stop_reach_the_agent_then_the_spool(lab_host: LabHost, base: Path) -> None:
    hooked = HookedHost(lab_host, base)

    since = time.time()
    with FakeAgent(hooked.socket) as agent:
        hooked.start_and_stop()
    requests = agent.requests()
    assert {(r["v"], r["op"]) for r in requests} == {(1, "hook")}
    events = [r["args"] for r in requests]
    assert calls(events) == START + STOP
    check_events(events, lab_host, since)
    assert hook.read_spool(hooked.spool) == []

    # No agent: the same events, in the same order, wait in the spool.
    since = time.time()
    hooked.start_and_stop()
    spooled = hook.read_spool(hooked.spool)
    assert calls(spooled) == START + STOP
    check_events(spooled, lab_host, since)
    hook.clear_spool(hooked.spool)
    assert hook.read_spool(hooked.spool) == []


def test_migration_fires_on_both_sides_and_keeps_the_xml(
        lab_factory: Callable[..., list[LabHost]], base: Path) -> None:
    pri, sec = lab_factory("pri", "sec", listen_tcp=True)
    (base / "pri").mkdir()
    (base / "sec").mkdir()
    hooked_pri, hooked_sec = HookedHost(pri, base / "pri"), HookedHost(sec, base / "sec")
    pri.virsh("create", str(hooked_pri.xml))   # no agent yet: spooled
    assert calls(hook.read_spool(hooked_pri.spool)) == START
    hook.clear_spool(hooked_pri.spool)

    since = time.time()
    with FakeAgent(hooked_pri.socket) as agent_pri, FakeAgent(hooked_sec.socket) as agent_sec:
        pri.virsh("migrate", "--live", "--p2p", GUEST, f"qemu+tcp://{sec.address}/system", timeout=120)
        assert sec.virsh("list", "--name").split() == [GUEST]
        assert pri.virsh("list", "--all", "--name").split() == []
        # "migrate begin" got no output from our hook: the destination keeps the XML it was sent.
        live = ET.fromstring(sec.virsh("dumpxml", GUEST))
        assert live.findtext("description") == DESCRIPTION
        sec.virsh("destroy", GUEST)

    source = [r["args"] for r in agent_pri.requests()]
    destination = [r["args"] for r in agent_sec.requests()]
    assert calls(source) == STOP
    assert calls(destination) == [("migrate", "begin"), *START, *STOP]
    check_events(source, pri, since)
    check_events(destination, sec, since)
    assert hook.read_spool(hooked_pri.spool) == hook.read_spool(hooked_sec.spool) == []

"""Two lab sites with virtsync agents, and the domains and checks e2e tests share.

A *site* is the lab pair of :mod:`tests.lab.fixtures` (hosts ``pri`` and ``sec``
joined by a veth) with a :class:`~tests.lab.agent.LabAgent` on each host. The
helpers here define domains on a lab host through its own ``virsh`` (no libvirt
connection, so no event loop is involved), look inside a running domain's QEMU
for anything virtsync left behind, read an agent's state database, and check a
replica against the writing guest's oracle.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import sqlite3
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.lab import stamps
from tests.lab.agent import LabAgent
from tests.lab.fixtures import LabPair
from tests.lab.guest import build_guest, domain_xml, guest_cmdline, last_progress, wait_for_console
from tests.lab.host import LabError, LabHost
from tests.lab.procs import run
from tests.lab.qemu_vm import kvm_usable

__all__ = [
    "CLUSTER",
    "Increment",
    "Site",
    "WritingGuest",
    "agent_rows",
    "bios_domain_xml",
    "check_marker",
    "check_replica",
    "cycles",
    "define_domain",
    "dirtied_bytes",
    "domain_leftovers",
    "increments",
    "make_image",
    "open_site",
    "replica_paths",
    "set_next_boot",
    "start_writing_guest",
]

CLUSTER = 64 * 1024   # dirty bitmap granularity of a qcow2 with 64 KiB clusters
OWNER = "vs-"         # everything virtsync creates in QEMU carries this prefix
METADATA_NS = "urn:x-virtsync"


@dataclass
class Site:
    """The lab pair and the agent on each side."""

    hosts: LabPair
    pri: LabAgent
    sec: LabAgent
    domains: list[str] = field(default_factory=list)   # destroyed at the end


@contextlib.contextmanager
def open_site(pair: LabPair, *, start: bool = True, **replication: Any) -> Iterator[Site]:
    """Agents on both hosts (``replication`` keys go to both configs); stopped at the end.

    Set ``VS_SHOW_AGENT_LOGS=1`` to print both agents' logs after the test.
    """
    site = Site(pair, LabAgent(pair.pri, {"sec": pair.sec}, **replication),
                LabAgent(pair.sec, {"pri": pair.pri}, **replication))
    try:
        if start:
            site.pri.start()
            site.sec.start()
        yield site
    finally:
        for agent in (site.pri, site.sec):
            agent.stop()
        if os.environ.get("VS_SHOW_AGENT_LOGS"):
            for name, agent in (("pri", site.pri), ("sec", site.sec)):
                print(f"--- agent {name}\n{agent.tail(300)}")
        for name in site.domains:
            pair.pri.virsh("destroy", name, check=False)


# -- domains -------------------------------------------------------------------------

def make_image(path: str | os.PathLike[str], size: str, fmt: str = "qcow2") -> str:
    run(["qemu-img", "create", "-q", "-f", fmt, str(path), size])
    return str(path)


def bios_domain_xml(name: str, disks: Sequence[tuple[str, str]], domain_type: str) -> str:
    """A guest that stays in the BIOS (no OS needed) with one virtio disk per (path, format)."""
    disk_xml = "".join(f"""
    <disk type='file' device='disk'>
      <driver name='qemu' type='{fmt}'/>
      <source file='{path}'/>
      <target dev='vd{chr(97 + i)}' bus='virtio'/>
    </disk>""" for i, (path, fmt) in enumerate(disks))
    return f"""<domain type='{domain_type}'>
  <name>{name}</name>
  <memory unit='MiB'>64</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64'>hvm</type></os>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>{disk_xml}
    <memballoon model='none'/>
  </devices>
</domain>
"""


def define_domain(host: LabHost, name: str, xml: str | None = None, *, disks: Sequence[tuple[str, str]] = (),
                  start: bool = True) -> None:
    """Define (and start) a domain with the host's own virsh.

    Without ``xml`` it is a BIOS-only guest with ``disks``, under KVM when KVM
    starts it here, else TCG (LAB.md: kvm_pvm runs a BIOS guest).
    """
    xml_path = Path(host.root) / f"{name}.xml"
    types = ("kvm", "qemu") if kvm_usable() else ("qemu",)
    for i, domain_type in enumerate([None] if xml is not None else types):
        xml_path.write_text(xml if xml is not None else bios_domain_xml(name, disks, str(domain_type)))
        host.virsh("define", str(xml_path))
        if not start:
            return
        try:
            host.virsh("start", name)
            return
        except LabError:
            host.virsh("undefine", name, check=False)
            if xml is not None or i == len(types) - 1:
                raise


@dataclass(frozen=True)
class WritingGuest:
    """The stamped-block writer as a running domain: its images and console log."""

    name: str
    disks: list[str]
    serial: str

    def last_seq(self) -> int:
        """The newest write the guest has reported on its console (every 100 writes)."""
        return last_progress(self.serial) or 0


def start_writing_guest(host: LabHost, name: str, n_disks: int, blocks: int, size: str = "16M",
                        timeout: float = 90.0, qga: bool = False, channel: bool | None = None,
                        qga_hang: bool = False) -> WritingGuest:
    """The stamped-block writer (tests/lab/guest) as a domain on ``host``.

    ``qga=True``: the guest runs its minimal guest agent and the domain has the agent's
    channel; ``channel`` (default: ``qga``) adds the channel alone; ``qga_hang``: the
    agent freezes but never answers the freeze.

    Returns once the guest said VS-READY; it writes from then on, ~150-300 writes/s under
    TCG on an idle machine, much fewer on a busy one.
    """
    images = build_guest().install(Path(host.root) / "guest")
    disk_dir = Path(host.root) / "disks"
    disk_dir.mkdir(exist_ok=True)
    disks = [(make_image(disk_dir / f"{name}-vd{chr(97 + i)}.qcow2", size), "qcow2") for i in range(n_disks)]
    serial = str(disk_dir / f"{name}-console.log")
    cmdline = guest_cmdline(n_disks, blocks, qga="hang" if qga_hang else qga)
    xml = domain_xml(name, str(images.kernel), str(images.initrd), cmdline, disks,
                     serial_log=serial, qga=(qga or qga_hang) if channel is None else channel)
    define_domain(host, name, xml)
    wait_for_console(serial, "VS-READY", timeout=timeout)
    return WritingGuest(name, [d[0] for d in disks], serial)


def set_next_boot(host: LabHost, name: str, start: int, count: int = 0) -> None:
    """The writing guest's next boot writes from sequence number ``start`` on (``count``
    writes, then it powers itself off; 0: forever): its persistent kernel command line."""
    xml = host.virsh("dumpxml", "--inactive", name)
    xml = re.sub(r"vs\.start=\d+", f"vs.start={start}", xml)
    xml = re.sub(r"vs\.count=\d+", f"vs.count={count}", xml)
    path = Path(host.root) / f"{name}-next-boot.xml"
    path.write_text(xml)
    host.virsh("define", str(path))


def wait_for(what: str, check: Callable[[], Any], timeout: float, poll: float = 0.1) -> Any:
    """Poll ``check`` until it returns something true (returned); fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(poll)


# -- what is left behind --------------------------------------------------------------

def domain_leftovers(host: LabHost, name: str) -> dict[str, list[str]]:
    """virtsync's traces in a running domain: ``vs-`` nodes, bitmaps and jobs, and metadata."""
    def qmp(command: str, arguments: dict[str, Any] | None = None) -> Any:
        cmd = {"execute": command} | ({"arguments": arguments} if arguments else {})
        reply = json.loads(host.virsh("qemu-monitor-command", name, json.dumps(cmd)))
        if "return" not in reply:  # virsh exits 0 even when QMP returns an error (LAB.md)
            raise LabError(f"{command} on {name}: {reply}")
        return reply["return"]

    named = qmp("query-named-block-nodes", {"flat": True})
    return {
        "nodes": sorted(n["node-name"] for n in named if n.get("node-name", "").startswith(OWNER)),
        "bitmaps": sorted(f"{n['node-name']}:{b['name']}" for n in named for b in n.get("dirty-bitmaps", [])
                          if b.get("name", "").startswith(OWNER)),
        "jobs": sorted(j["id"] for j in qmp("query-jobs") if str(j.get("id", "")).startswith(OWNER)),
        "metadata": [line.strip() for xml in (host.virsh("dumpxml", name), host.virsh("dumpxml", "--inactive", name))
                     for line in xml.splitlines() if METADATA_NS in line],
    }


def agent_rows(agent: LabAgent) -> dict[str, list[tuple[Any, ...]]]:
    """Live rows of an agent's state database (read beside the running agent: WAL allows it)."""
    path = agent.dir / "state" / "state.db"
    if not path.exists():
        return {"protections": [], "pairs": [], "markers": []}
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
    try:
        return {
            "protections": db.execute("SELECT role, domain, peer FROM protections ORDER BY role, domain").fetchall(),
            "pairs": db.execute("SELECT role, domain, target, state FROM pairs WHERE state != 'deleted'"
                                " ORDER BY role, domain, target").fetchall(),
            "markers": db.execute("SELECT domain_uuid, seq FROM markers ORDER BY domain_uuid, seq").fetchall(),
        }
    finally:
        db.close()


def cycles(agent: LabAgent, limit: int = 50) -> list[dict[str, Any]]:
    """The primary's cycle history, oldest first: seq, kind, bytes, error, started, finished."""
    db = sqlite3.connect(f"file:{agent.dir / 'state' / 'state.db'}?mode=ro", uri=True, timeout=10)
    db.row_factory = sqlite3.Row
    try:
        rows = db.execute("SELECT seq, kind, bytes, error, started, finished FROM cycles ORDER BY id DESC LIMIT ?",
                          (limit,)).fetchall()
    finally:
        db.close()
    return [dict(r) for r in reversed(rows)]


# -- replicas and the oracle --------------------------------------------------------------

def replica_paths(site: Site, domain: str) -> list[str]:
    """The replica's disks as the secondary reports them (chain tops at the applied marker), by target."""
    views = site.sec.call("markers", domain=domain)["replica"]
    return [views[t] for t in sorted(views)]


def check_replica(site: Site, domain: str, oracle: stamps.Oracle) -> int:
    """The replica holds a consistent cut of the guest's writes: return its sequence number."""
    result = stamps.check_images(replica_paths(site, domain), oracle)
    assert result.ok, result.summary()
    return result.cut_seq


def dirtied_bytes(oracle: stamps.Oracle, after: int, upto: int) -> dict[str, int]:
    """Bytes of the 64 KiB clusters written by sequence numbers after..upto, per disk target."""
    clusters: dict[int, set[int]] = {d: set() for d in range(oracle.disks)}
    for seq in range(after + 1, upto + 1):
        disk, block = oracle.target(seq)
        clusters[disk].add(block * stamps.BLOCK_SIZE // CLUSTER)
    return {f"vd{chr(97 + d)}": len(c) * CLUSTER for d, c in clusters.items()}


def check_marker(site: Site, domain: str, seq: int, oracle: stamps.Oracle, at: int | None = None) -> stamps.CheckResult:
    """Marker ``seq`` restored on the secondary and checked against the oracle: at write
    ``at`` exactly, else at the cut the images hold. The restored copy is removed."""
    dest = tempfile.mkdtemp(prefix=f"restore-{seq}-", dir=site.sec.dir)
    try:
        disks = site.sec.call("restore", domain=domain, marker=seq, to=f"{dest}/disks")["disks"]
        paths = [disks[t] for t in sorted(disks)]
        return stamps.check_images(paths, oracle) if at is None else stamps.check_images_at(paths, oracle, at)
    finally:
        shutil.rmtree(dest, ignore_errors=True)


@dataclass(frozen=True)
class Increment:
    """What one marker sent, against what the guest dirtied between its cut and the one before."""

    seq: int
    cut: int                  # the guest's last write the marker holds
    sent: dict[str, int]      # bytes, by disk target
    dirtied: dict[str, int]   # bytes of the clusters written since the previous cut, by target

    @property
    def close(self) -> bool:
        """Sent what was dirtied, within 10 % (a cluster written on both sides of a cut goes twice)."""
        return all(d <= self.sent.get(t, 0) <= 1.1 * d for t, d in self.dirtied.items())


def increments(markers: Sequence[dict[str, Any]], oracle: stamps.Oracle, after: int,
               cut_of: Callable[[int], int]) -> list[Increment]:
    """Each marker's increment, oldest first: ``after`` is the write the marker before them
    holds, ``cut_of(seq)`` the write a marker holds (e.g. :func:`check_marker`'s cut)."""
    found = []
    for m in markers:
        cut = cut_of(m["seq"])
        found.append(Increment(m["seq"], cut, dict(m["bytes"]), dirtied_bytes(oracle, after, cut)))
        after = cut
    return found

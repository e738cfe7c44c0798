"""The benchmark's lab: two lab hosts, their agents, idle guests with 1 GiB disks.

Built from the test lab (:mod:`tests.lab`): ``pri`` and ``sec`` are network +
mount namespaces with their own libvirtd, joined by a veth pair; each runs a
real ``virtsyncd`` (:class:`tests.lab.agent.LabAgent`). On ``pri`` run two
idle domains whose only disk is a 1 GiB qcow2 full of random data:

- ``vsb-vs``: protected by virtsync (to ``sec``),
- ``vsb-vnb``: backed up by virtnbdbackup (libvirt's backup API, pull mode).

The guests boot no OS (their boot sector halts the vCPU), so no
guest CPU competes with the data path on this 2-core machine. They run under
TCG by default: a halted vCPU under this machine's KVM (kvm_pvm) still burns
~30 % of a core, under TCG none (the accelerator does not touch the block
layer). A guest's writes are issued with HMP ``qemu-io`` on the guest's
virtio device (the LAB.md recipe), sent on a second QMP monitor of the guest's
own (``<qemu:commandline>``), which goes through the same block graph as the
guest's own I/O (dirty bitmaps, the backup's copy-before-write filter).
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import sqlite3
import subprocess
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import libvirt
import libvirt_qemu

from tests.lab.agent import LabAgent
from tests.lab.host import LabHost, lab_prerequisites, link_hosts, reap_stale
from tests.lab.qemu_vm import kvm_usable

MiB = 1 << 20
GiB = 1 << 30
CLUSTER = 64 * 1024
VS_DOMAIN = "vsb-vs"
VNB_DOMAIN = "vsb-vnb"
DEVICE = "/machine/peripheral/virtio-disk0/virtio-backend"


QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
ET.register_namespace("qemu", QEMU_NS)


def domain_xml(name: str, disk: str, virt_type: str, qmp_path: str | None = None) -> str:
    """An idle guest: no kernel, one virtio qcow2 disk (cache=none, like production).

    ``qmp_path``: a second QMP monitor of QEMU's own (``-qmp unix:...``), for
    the bench's guest-like writer, outside libvirt's per-domain job lock.
    """
    dom = ET.Element("domain", type=virt_type)
    ET.SubElement(dom, "name").text = name
    ET.SubElement(dom, "memory", unit="MiB").text = "64"
    ET.SubElement(dom, "vcpu").text = "1"
    os_el = ET.SubElement(dom, "os")
    ET.SubElement(os_el, "type", arch="x86_64", machine="pc").text = "hvm"
    ET.SubElement(os_el, "boot", dev="hd")
    ET.SubElement(ET.SubElement(dom, "features"), "acpi")
    devices = ET.SubElement(dom, "devices")
    d = ET.SubElement(devices, "disk", type="file", device="disk")
    ET.SubElement(d, "driver", name="qemu", type="qcow2", cache="none")
    ET.SubElement(d, "source", file=disk)
    ET.SubElement(d, "target", dev="vda", bus="virtio")
    ET.SubElement(devices, "memballoon", model="none")
    if qmp_path:
        cmdline = ET.SubElement(dom, f"{{{QEMU_NS}}}commandline")
        for arg in ("-qmp", f"unix:{qmp_path},server=on,wait=off"):
            ET.SubElement(cmdline, f"{{{QEMU_NS}}}arg", value=arg)
    return ET.tostring(dom, encoding="unicode") + "\n"


class DirectQmp:
    """A minimal synchronous QMP client on a unix socket (the guest's second monitor)."""

    def __init__(self, path: str, timeout: float = 60.0) -> None:
        import socket

        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.rfile = self.sock.makefile("rb")
        self._line()  # greeting
        self.execute("qmp_capabilities")

    def _line(self) -> dict[str, Any]:
        import json

        line = self.rfile.readline()
        if not line:
            raise RuntimeError("QMP connection closed")
        return dict(json.loads(line))

    def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        import json

        msg: dict[str, Any] = {"execute": command}
        if arguments is not None:
            msg["arguments"] = arguments
        self.sock.sendall(json.dumps(msg).encode() + b"\n")
        while True:
            reply = self._line()
            if "return" in reply:
                return reply["return"]
            if "error" in reply:
                raise RuntimeError(f"{command}: {reply['error']}")
            # an event: skip

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.rfile.close()
            self.sock.close()


# A boot sector that halts the vCPU for good: cli; hlt; jmp $-1 (the guest
# then costs no CPU, unlike SeaBIOS waiting for a boot disk).
BOOT_SECTOR = (bytes([0xFA, 0xF4, 0xEB, 0xFD]) + b"\x5a" * 506 + b"\x55\xaa")


def make_random_raw(path: Path, size: int) -> None:
    """``size`` bytes of random data; the first 64 KiB a halting boot sector
    and a non-zero pattern."""
    chunk = 8 * MiB
    with open(path, "wb") as f:
        f.write(BOOT_SECTOR + b"\x5a" * (CLUSTER - len(BOOT_SECTOR)))
        left = size - CLUSTER
        while left > 0:
            n = min(chunk, left)
            f.write(os.urandom(n))
            left -= n


def run(argv: list[str], timeout: float = 600.0) -> str:
    res = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({res.returncode}): {res.stderr.strip()[-800:]}")
    return res.stdout


@dataclass
class Extent:
    offset: int
    length: int


def dirty_plan(size: int, fraction: float, seed: int) -> list[Extent]:
    """Extents (64 KiB .. 1 MiB, 64 KiB aligned, scattered) covering ``fraction``
    of the disk's 64 KiB clusters; the same plan is written to every domain."""
    rng = random.Random(seed)
    clusters = size // CLUSTER
    want = int(clusters * fraction)
    covered: set[int] = set()
    out = []
    while len(covered) < want:
        n = rng.choice((1, 2, 4, 8, 16))
        first = rng.randrange(0, clusters - n)
        new = set(range(first, first + n)) - covered
        if not new:
            continue
        covered |= new
        out.append(Extent(first * CLUSTER, n * CLUSTER))
    return out


def covered_bytes(extents: list[Extent]) -> int:
    """Bytes of the 64 KiB clusters the extents touch (what a dirty bitmap counts)."""
    covered: set[int] = set()
    for e in extents:
        covered.update(range(e.offset // CLUSTER, (e.offset + e.length + CLUSTER - 1) // CLUSTER))
    return len(covered) * CLUSTER


def drop_cache(path: Path) -> None:
    """Write a file back and drop it from the page cache (this file only).

    The guests open their disks with O_DIRECT: a direct write over pages still
    cached (dirty) from creating the image first waits for their writeback,
    which would make the first benchmark window several times slower.
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """CPU time of a process: its own (all threads) and its waited-for children's."""
    try:
        f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return sum(int(x) for x in f[11:15]) / TICK


def children_cpu() -> float:
    """CPU time of this process's waited-for children (qemu-img, virtnbdbackup)."""
    import resource

    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def child_pids(parent: int, comm: str) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, IndexError):
                stat = Path(f"/proc/{entry}/stat").read_text()
                # comm is cut at 15 characters ("qemu-storage-da"): match a prefix
                if stat.split("(", 1)[1].rsplit(")", 1)[0].startswith(comm) and \
                        int(stat.rsplit(")", 1)[1].split()[1]) == parent:
                    out.append(int(entry))
    return out


class Guest:
    """A running bench domain on the primary, with its own libvirt connection."""

    def __init__(self, lab: BenchLab, name: str, disk: Path, qmp_path: str | None = None) -> None:
        self.lab = lab
        self.name = name
        self.disk = disk
        self.qmp_path = qmp_path
        self._conn: Any = None
        self._dom: Any = None
        self._qmp: DirectQmp | None = None

    def connect(self) -> Any:
        if self._conn is None:
            self._conn = libvirt.open(self.lab.pri.uri)
            self._dom = self._conn.lookupByName(self.name)
        return self._dom

    def close(self) -> None:
        if self._qmp is not None:
            self._qmp.close()
            self._qmp = None
        if self._conn is not None:
            with contextlib.suppress(libvirt.libvirtError):
                self._conn.close()
            self._conn = self._dom = None

    def hmp(self, command: str) -> str:
        """An HMP command: on the guest's own second monitor when it has one (no
        libvirt RPC, no libvirt job lock), else through libvirt's passthrough."""
        if self.qmp_path:
            if self._qmp is None:
                self._qmp = DirectQmp(self.qmp_path)
            return str(self._qmp.execute("human-monitor-command", {"command-line": command}))
        return str(libvirt_qemu.qemuMonitorCommand(self.connect(), command,
                                                   libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP))

    def qemu_io(self, command: str) -> None:
        """One request through the guest's device, as the guest would issue it.

        The reply is "" on success; qemu-io's own output goes to QEMU's log.
        """
        reply = self.hmp(f'qemu-io -d {DEVICE} "{command}"')
        if reply.strip():
            raise RuntimeError(f"qemu-io {command!r} on {self.name}: {reply.strip()[:300]}")

    def write_extents(self, extents: list[Extent], pattern: int) -> int:
        for e in extents:
            self.qemu_io(f"write -P {pattern:#04x} {e.offset} {e.length}")
        return sum(e.length for e in extents)

    def wr_bytes(self) -> int:
        return int(self.connect().blockStats("vda")[3])


class BenchLab:
    """Everything the benchmarks run against; :meth:`close` removes it all."""

    def __init__(self, size: int, *, agent_options: dict[str, Any] | None = None,
                 log: Any = print, with_agents: bool = True, virt_type: str = "qemu",
                 sec_in_ram: bool = False) -> None:
        """:param sec_in_ram: the secondary's replicas (and the convert targets) on a tmpfs:
            the second site's disk is then not the guest's disk, as between two hosts"""
        self.size = size
        self.sec_in_ram = sec_in_ram
        self._ram_dir: Path | None = None
        self.with_agents = with_agents
        self.log = log
        self.agent_options = agent_options or {}
        self.hosts: list[LabHost] = []
        self.agents: dict[str, LabAgent] = {}
        self.guests: dict[str, Guest] = {}
        # TCG by default: the guests only halt, and a halted vCPU under this
        # machine's KVM (kvm_pvm) still burns ~30 % of a core; under TCG nothing.
        self.virt_type = virt_type if virt_type != "kvm" or kvm_usable() else "qemu"
        self.work: Path | None = None

    # -- lifecycle -----------------------------------------------------------

    def start(self) -> None:
        why = lab_prerequisites()
        if why:
            raise RuntimeError(f"the bench needs the e2e lab: {why}")
        reap_stale()
        pri, sec = LabHost("pri"), LabHost("sec")
        self.hosts = [pri, sec]
        link_hosts(pri, sec)
        for h in self.hosts:
            h.launch()
        self.work = pri.root / "bench"
        self.work.mkdir()
        if self.sec_in_ram:
            self._ram_dir = Path(tempfile.mkdtemp(prefix="vs-bench-sec-", dir="/dev/shm"))
        t0 = time.monotonic()
        raw = self.work / "random.raw"
        make_random_raw(raw, self.size)
        for name in ("vs", "vnb", "src"):
            run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(self.work / f"{name}.qcow2")])
        raw.unlink()
        for name in ("vs", "vnb", "src"):
            drop_cache(self.work / f"{name}.qcow2")
        self.log(f"lab: 3 x {self.size // MiB} MiB qcow2 disks of random data in {time.monotonic() - t0:.1f}s")
        for h in self.hosts:
            h.wait_ready()
        if self.with_agents:
            self.agents = {"pri": LabAgent(pri, {"sec": sec}, **self.agent_options),
                           "sec": LabAgent(sec, {"pri": pri}, storage=self.sec_storage / "replicas",
                                           **self.agent_options)}
            for a in self.agents.values():
                a.start()
        for name, disk in ((VS_DOMAIN, "vs"), (VNB_DOMAIN, "vnb")):
            self._start_domain(name, self.work / f"{disk}.qcow2")
        self.log(f"lab: hosts pri={pri.address} sec={sec.address}, agents up, guests {self.virt_type}")

    def _start_domain(self, name: str, disk: Path) -> None:
        assert self.work is not None
        xml_path = self.work / f"{name}.xml"
        qmp_path = str(self.work / f"{name}.qmp")
        for virt_type in dict.fromkeys((self.virt_type, "qemu")):
            xml_path.write_text(domain_xml(name, str(disk), virt_type, qmp_path))
            self.pri.virsh("define", str(xml_path))
            res = self.pri.run(["virsh", "-c", "qemu:///system", "start", name], check=False)
            if res.returncode == 0:
                self.virt_type = virt_type
                self.guests[name] = Guest(self, name, disk, qmp_path)
                return
            self.log(f"lab: {name} does not start as {virt_type}: {res.stderr.strip()[:200]}")
            self.pri.virsh("undefine", name, check=False)
        raise RuntimeError(f"cannot start {name}")

    @property
    def sec_storage(self) -> Path:
        """The second site's disk: replicas and convert targets."""
        return self._ram_dir if self._ram_dir is not None else self.hosts[1].root

    def close(self) -> None:
        for g in self.guests.values():
            g.close()
        for a in self.agents.values():
            with contextlib.suppress(Exception):
                a.stop()
        for h in reversed(self.hosts):
            with contextlib.suppress(Exception):
                h.stop()
        if self._ram_dir is not None:
            shutil.rmtree(self._ram_dir, ignore_errors=True)

    def __enter__(self) -> BenchLab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- accessors -------------------------------------------------------------

    @property
    def pri(self) -> LabHost:
        return self.hosts[0]

    @property
    def sec(self) -> LabHost:
        return self.hosts[1]

    def cycles(self, limit: int = 1) -> list[sqlite3.Row]:
        """The primary agent's latest cycle records (the ``cycles`` table), newest first."""
        path = self.agents["pri"].dir / "state" / "state.db"
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
        db.row_factory = sqlite3.Row
        try:
            return db.execute("SELECT * FROM cycles ORDER BY id DESC LIMIT ?", (limit,)).fetchall()
        finally:
            db.close()

    def qemu_pid(self, domain: str) -> int:
        return int((self.pri.root / f"run/libvirt/qemu/{domain}.pid").read_text().strip())

    def virtsync_pids(self) -> list[int]:
        """Every process on virtsync's data path: the protected guest's QEMU, both
        agents (their spawned qemu-img counted once they exit) and the secondary's
        qemu-storage-daemon."""
        pids = [self.qemu_pid(VS_DOMAIN)]
        for agent in self.agents.values():
            if agent.proc is not None:
                pids.append(agent.proc.pid)
                pids += child_pids(agent.proc.pid, "qemu-storage-d")
        return pids

    def agent_tail(self) -> str:
        return "\n".join(f"--- {n}\n{a.tail(60)}" for n, a in self.agents.items())

"""The two-disk cut of test_backup_transaction, as production runs it: through libvirt.

The primary is a libvirt domain in lab host ``pri`` (no guest OS; qemu-io on
the devices writes as the guest would); every QMP command goes through the
monitor passthrough (:class:`LibvirtQmpTransport`). The secondary is a
qemu-storage-daemon in lab host ``sec``'s network namespace, serving the replica
images over NBD on sec's lab address, so the data crosses the lab link.

Proof by bytes: the full copy holds the disks as they were at the first cut
(not the write issued right after it), and base + increment equal the disks as
they were at the second cut (recorded while the domain was paused), while the
increment holds exactly the bytes the bitmap had marked dirty.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import libvirt
import pytest

from plugin.virt.qmp_bridge import LibvirtQmpTransport
from qemu_blockdev import JobTracker, bitmaps, commands, nodes
from qemu_blockdev.transport import QmpTransport
from tests.lab.fixtures import LabPair
from tests.lab.host import LabHost
from tests.lab.qemu_vm import kvm_usable
from tests.lab.qsd import StorageDaemon, serve_image, unserve_image
from tests.lab.site import bios_domain_xml

pytestmark = pytest.mark.libvirt

MiB = 1 << 20
SIZE = 64 * MiB
GUEST = "pt-backup-guest"
ALIASES = ("virtio-disk0", "virtio-disk1")  # libvirt's device aliases of vda, vdb
NBD_PORT = 10809  # sec's netns is private: nothing else listens there
BITMAP = "vs-dirty"
JOB_TIMEOUT = 30.0


# -- the primary: a libvirt domain ---------------------------------------------

def start_guest(conn: libvirt.virConnect, disks: Sequence[Path]) -> libvirt.virDomain:
    """Define and start the guest under KVM when it works here, else TCG."""
    last: libvirt.libvirtError | None = None
    for domain_type in (("kvm", "qemu") if kvm_usable() else ("qemu",)):
        dom = conn.defineXML(bios_domain_xml(GUEST, [(str(d), "qcow2") for d in disks], domain_type))
        try:
            dom.create()
            return dom
        except libvirt.libvirtError as e:
            last = e
            dom.undefine()
    assert last is not None
    raise last


async def disk_format_nodes(qmp: QmpTransport, aliases: Sequence[str]) -> list[str]:
    """The format node name of each disk, by its device alias (``virtio-disk0``).

    libvirt 9.0 opens disks with -blockdev and its own node names
    (``libvirt-2-format`` for vda of a two-disk guest: numbered in reverse), so
    they are resolved from query-block, whose ``qdev`` is the device's QOM path
    (``/machine/peripheral/virtio-disk0/virtio-backend``), or its id.
    """
    found: dict[str, str] = {}
    blocks = await qmp.execute("query-block")
    for block in blocks:
        inserted = block.get("inserted")
        qdev = str(block.get("qdev", ""))
        for alias in aliases:
            if inserted and (qdev == alias or alias in qdev.split("/")):
                found[alias] = str(inserted["node-name"])
    missing = [a for a in aliases if a not in found]
    if missing:
        raise LookupError(f"no block device for {missing} in query-block: {json.dumps(blocks)[:2000]}")
    drivers = {n.node_name: n.driver for n in await nodes.query_nodes(qmp)}
    for alias in aliases:
        if drivers.get(found[alias]) != "qcow2":
            raise LookupError(f"{alias}: node {found[alias]!r} is not the qcow2 format node ({drivers})")
    return [found[a] for a in aliases]


async def guest_write(qmp: QmpTransport, disk: int, offset: int, length: int, pattern: int) -> None:
    """Write through the disk's virtio device, as the guest would (HMP qemu-io)."""
    cmd = f'qemu-io -d /machine/peripheral/{ALIASES[disk]}/virtio-backend "write -P {pattern:#x} {offset} {length}"'
    reply = await qmp.execute("human-monitor-command", {"command-line": cmd})
    # qemu-io's own output and errors go to QEMU's log, not to the reply.
    if reply:
        raise RuntimeError(f"qemu-io: {reply}")


# -- images and bytes ----------------------------------------------------------

def run(argv: Sequence[str]) -> str:
    res = subprocess.run(list(argv), capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({res.returncode}): {(res.stderr or res.stdout).strip()[:800]}")
    return res.stdout


def make_qcow2(path: Path, backing: Path | None = None) -> Path:
    argv = ["qemu-img", "create", "-q", "-f", "qcow2"]
    if backing is not None:
        argv += ["-u", "-b", str(backing), "-F", "qcow2"]
    run([*argv, str(path), str(SIZE)])
    return path


def make_raw(path: Path, extents: Sequence[tuple[int, int, int]]) -> Path:
    """A sparse raw image of SIZE holding ``(offset, length, pattern)`` extents."""
    with open(path, "wb") as f:
        f.truncate(SIZE)
        for offset, length, pattern in extents:
            f.seek(offset)
            f.write(bytes([pattern]) * length)
    return path


def compare(reference: Path, image: Path) -> None:
    """The qcow2 ``image`` (with its backing chain) reads exactly as the raw ``reference``."""
    res = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "qcow2", str(reference), str(image)],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and "Images are identical" in res.stdout, \
        f"{image} differs from {reference}: {res.stdout.strip()} {res.stderr.strip()}"


def allocated_bytes(path: Path) -> int:
    """Bytes stored in this qcow2 itself, not in its backing chain."""
    extents = json.loads(run(["qemu-img", "map", "--output=json", str(path)]))
    return sum(e["length"] for e in extents if e["data"] and e["depth"] == 0)


# -- diagnostics ----------------------------------------------------------------

def tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()[-lines:]
    except OSError as e:
        return f"--- {path}: {e}"
    return f"--- {path}\n" + "\n".join(text)


@contextlib.contextmanager
def diagnostics_on_error(lab: LabPair, qsd: StorageDaemon) -> Iterator[None]:
    """Attach the sec daemon's log, the guest's QEMU log and libvirtd's to any failure."""
    try:
        yield
    except BaseException as e:
        e.add_note("\n".join([
            tail(Path(qsd.log_path)),
            tail(lab.pri.root / "var/log/libvirt/qemu" / f"{GUEST}.log"),
            lab.pri.diagnostics(),
        ]))
        raise


# -- the scenario ----------------------------------------------------------------

def test_two_disk_cut_through_libvirt_passthrough(
    lab_pair: LabPair, lab_connect: Callable[[LabHost], libvirt.virConnect], lab_runner: asyncio.Runner, tmp_path: Path,
) -> None:
    started = time.monotonic()
    pri, sec = lab_pair
    disks = [make_qcow2(tmp_path / f"vd{c}.qcow2") for c in "ab"]
    bases = [make_qcow2(tmp_path / f"replica{i}.qcow2") for i in range(2)]
    overlays = [make_qcow2(tmp_path / f"seg1-{i}.qcow2", backing=bases[i]) for i in range(2)]
    dom = start_guest(lab_connect(pri), disks)
    qsd = StorageDaemon(str(tmp_path), name="sec-qsd", netns=sec.netns)
    qsd.start()
    try:
        with diagnostics_on_error(lab_pair, qsd):
            result = lab_runner.run(scenario(dom, qsd, sec.address, disks, bases, overlays, tmp_path))
            # The secondary's NBD server listens on sec's lab address only.
            listeners = [line.split()[3] for line in sec.netns_run(["ss", "-ltnH"]).stdout.splitlines()]
            assert listeners == [f"{sec.address}:{NBD_PORT}"], listeners
            check_replicas(result, bases, overlays, tmp_path)
    finally:
        qsd.stop()
    assert time.monotonic() - started < 30


async def scenario(
    dom: libvirt.virDomain, qsd: StorageDaemon, sec_address: str,
    disks: Sequence[Path], bases: Sequence[Path], overlays: Sequence[Path], tmp_path: Path,
) -> dict[str, Any]:
    """Cut 0 (full), writes, cut 1 (incremental); return what the bytes must show."""
    dst = await qsd.connect()
    try:
        async with LibvirtQmpTransport(dom) as src:
            fmt = await disk_format_nodes(src, ALIASES)
            await nodes.nbd_server_start(dst, host=sec_address, port=NBD_PORT)

            # Data present before protection starts.
            await guest_write(src, 0, 0, 4 * MiB, 0x11)
            await guest_write(src, 1, 8 * MiB, 4 * MiB, 0x22)

            # Cut 0: both persistent bitmaps and both full copies at one instant
            # (ungrouped: QEMU 7.2 cannot group bitmap actions).
            for i in range(2):
                await serve_image(dst, f"vs-base{i}", str(bases[i]), "qcow2", f"base{i}")
                await nodes.blockdev_add(src, commands.nbd_node(f"vs-nbd{i}", f"base{i}", host=sec_address, port=NBD_PORT))
            actions = []
            for i in range(2):
                actions.append(commands.action("block-dirty-bitmap-add", commands.bitmap_add_args(fmt[i], BITMAP)))
                actions.append(commands.action("blockdev-backup", commands.backup_args(f"vs-full{i}", fmt[i], f"vs-nbd{i}")))
            with JobTracker(src, ["vs-full0", "vs-full1"]) as jobs:
                await nodes.transaction(src, actions, grouped=False)
                # After the cut: must not reach the full copies.
                await guest_write(src, 0, 2 * MiB, 1 * MiB, 0x33)
                await guest_write(src, 1, 9 * MiB, 64 * 1024, 0x34)
                await jobs.wait_all_concluded(timeout=JOB_TIMEOUT)
            for i in range(2):
                await nodes.blockdev_del(src, f"vs-nbd{i}")
                await unserve_image(dst, f"vs-base{i}", f"base{i}")
            assert [await bitmaps.dirty_bytes(src, fmt[i], BITMAP) for i in range(2)] == [1 * MiB, 64 * 1024]

            # Writes between the cuts, on both disks.
            await guest_write(src, 0, 20 * MiB, 512 * 1024, 0x44)
            await guest_write(src, 1, 40 * MiB, 64 * 1024, 0x55)

            # Cut 1: pause as `virsh suspend` does, record the reference, cut, resume.
            await asyncio.to_thread(dom.suspend)
            assert dom.state()[0] == libvirt.VIR_DOMAIN_PAUSED
            refs = [tmp_path / f"ref-cut1-{i}.raw" for i in range(2)]
            for disk, ref in zip(disks, refs, strict=True):
                await asyncio.to_thread(run, ["qemu-img", "convert", "-U", "-f", "qcow2", "-O", "raw", str(disk), str(ref)])
            dirty = [await bitmaps.dirty_bytes(src, fmt[i], BITMAP) for i in range(2)]
            for i in range(2):
                await serve_image(dst, f"vs-seg{i}", str(overlays[i]), "qcow2", f"seg{i}")
                await nodes.blockdev_add(src, commands.nbd_node(f"vs-nbd{i}", f"seg{i}", host=sec_address, port=NBD_PORT))
            with JobTracker(src, ["vs-inc0", "vs-inc1"]) as jobs:
                await nodes.transaction(src, [
                    commands.action("blockdev-backup", commands.backup_args(
                        f"vs-inc{i}", fmt[i], f"vs-nbd{i}", sync="incremental", bitmap=BITMAP))
                    for i in range(2)
                ])
                await asyncio.to_thread(dom.resume)
                await guest_write(src, 0, 20 * MiB, 512 * 1024, 0x66)  # overwrites data being pushed
                await guest_write(src, 1, 0, 1 * MiB, 0x77)
                await jobs.wait_all_concluded(timeout=JOB_TIMEOUT)
            assert dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING
            for i in range(2):
                await nodes.blockdev_del(src, f"vs-nbd{i}")
                await unserve_image(dst, f"vs-seg{i}", f"seg{i}")
            assert [n.node_name for n in await nodes.query_nodes(dst)] == []  # the secondary let go of every image
            # Writes after cut 1 are tracked for the next cycle.
            assert [await bitmaps.dirty_bytes(src, fmt[i], BITMAP) for i in range(2)] == [512 * 1024, 1 * MiB]

            await check_nothing_left(src, fmt)
    finally:
        await dst.close()
    return {"refs": refs, "dirty": dirty}


async def check_nothing_left(src: QmpTransport, fmt: Sequence[str]) -> None:
    """No node or job of ours remains; the bitmaps do (the next cycle needs them) until removed."""
    named = await nodes.query_nodes(src)
    assert [n.node_name for n in named if n.node_name.startswith(commands.OWNER_PREFIX)] == []
    assert await src.execute("query-jobs") == []
    for node in named:
        ours = [b.name for b in node.bitmaps if b.name.startswith(commands.OWNER_PREFIX)]
        assert ours == ([BITMAP] if node.node_name in fmt else []), f"{node.node_name}: {ours}"
        if ours:
            info = node.bitmap(BITMAP)
            assert info is not None and info.persistent and info.recording and not info.inconsistent
    for node_name in fmt:
        await bitmaps.remove(src, node_name, BITMAP)
    named = await nodes.query_nodes(src)
    assert [(n.node_name, b.name) for n in named for b in n.bitmaps if b.name.startswith(commands.OWNER_PREFIX)] == []


def check_replicas(result: dict[str, Any], bases: Sequence[Path], overlays: Sequence[Path], tmp_path: Path) -> None:
    # The full copies are cut 0: the writes right after the transaction are absent.
    expected0 = [
        make_raw(tmp_path / "expect-cut0-0.raw", [(0, 4 * MiB, 0x11)]),
        make_raw(tmp_path / "expect-cut0-1.raw", [(8 * MiB, 4 * MiB, 0x22)]),
    ]
    for i in range(2):
        compare(expected0[i], bases[i])
    # Base + increment are cut 1, and the increment holds only the dirty bytes:
    # the write during the full copy plus the ones between the cuts.
    assert result["dirty"] == [1 * MiB + 512 * 1024, 64 * 1024 + 64 * 1024]
    for i in range(2):
        compare(result["refs"][i], overlays[i])
        allocated = allocated_bytes(overlays[i])
        assert allocated == result["dirty"][i], f"overlay {i} holds {allocated} bytes, dirty was {result['dirty'][i]}"

"""Domains as replication sees them: lookup, disk list, protection metadata."""

from __future__ import annotations

import asyncio
import json
import math
import xml.etree.ElementTree as ET
from dataclasses import dataclass

import libvirt
import libvirt_qemu

from ..domain import Protection
from ..errors import DomainNotFoundError, VirtError
from .connection import virt_error

METADATA_NS = "urn:x-virtsync:protection:1"
METADATA_KEY = "vs"


@dataclass(frozen=True, slots=True)
class DomainDisk:
    """A ``<disk>`` of the domain XML, with what replication needs to decide."""

    target: str
    device: str          # disk, cdrom, floppy, lun
    disk_type: str       # file, block, network, volume
    source: str
    fmt: str
    alias: str
    read_only: bool
    shareable: bool


class DomainXmlError(VirtError):
    """The domain XML cannot be understood."""


def parse_disks(xml: str) -> list[DomainDisk]:
    """The disks of a domain XML, in document order.

    :raise DomainXmlError: not XML, or a disk without a target, or a duplicate target
    """
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as e:
        raise DomainXmlError(f"malformed domain XML: {e}") from None
    disks: list[DomainDisk] = []
    for el in root.findall("./devices/disk"):
        target_el = el.find("target")
        target = target_el.get("dev", "") if target_el is not None else ""
        if not target:
            raise DomainXmlError("domain XML has a <disk> without <target dev=...>")
        if any(d.target == target for d in disks):
            raise DomainXmlError(f"domain XML has two disks with target {target!r}")
        source_el = el.find("source")
        source = ""
        if source_el is not None:
            source = source_el.get("file") or source_el.get("dev") or source_el.get("name") or \
                source_el.get("volume") or ""
        driver = el.find("driver")
        alias = el.find("alias")
        disks.append(DomainDisk(
            target=target,
            device=el.get("device", "disk"),
            disk_type=el.get("type", "file"),
            source=source,
            fmt=driver.get("type", "raw") if driver is not None else "raw",
            alias=alias.get("name", "") if alias is not None else "",
            read_only=el.find("readonly") is not None,
            shareable=el.find("shareable") is not None,
        ))
    return disks


def parse_exclude(xml: str) -> set[str]:
    """Targets excluded by ``<vs:protection exclude="vdb,vdc"/>`` in the domain's metadata."""
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return set()
    el = root.find(f"./metadata/{{{METADATA_NS}}}protection")
    if el is None:
        return set()
    return {t.strip() for t in el.get("exclude", "").split(",") if t.strip()}


def qemu_owner(xml: str) -> tuple[int, int] | None:
    """The uid and gid the domain's QEMU runs as, from the live XML's DAC label
    (``<seclabel model='dac'><label>+64055:+64055</label>``); None when libvirt
    reports none (QEMU runs as the daemon's own user) or it is not numeric."""
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return None
    for seclabel in root.findall("./seclabel"):
        label = seclabel.find("label")
        if seclabel.get("model") != "dac" or label is None or not label.text:
            continue
        user, _, group = label.text.strip().partition(":")
        if user.startswith("+") and group.startswith("+") and user[1:].isdigit() and group[1:].isdigit():
            return int(user[1:]), int(group[1:])
    return None


def protection_xml(prot: Protection, exclude: set[str] | frozenset[str] = frozenset()) -> str:
    excluded = f' exclude="{_attr(",".join(sorted(exclude)))}"' if exclude else ""
    return (f'<protection segment="{_attr(prot.segment)}" rpo="{prot.rpo}" peer="{_attr(prot.peer)}" '
            f'mode="{prot.mode}"{excluded}/>')


def _attr(value: str) -> str:
    return value.replace("&", "&amp;").replace('"', "&quot;").replace("<", "&lt;")


async def lookup(conn: libvirt.virConnect, name: str) -> libvirt.virDomain:
    """:raise DomainNotFoundError: no such domain"""
    try:
        return await asyncio.to_thread(conn.lookupByName, name)
    except libvirt.libvirtError as e:
        err = virt_error(e, f"domain {name!r}")
        if isinstance(err, DomainNotFoundError):
            raise DomainNotFoundError(f"domain {name!r} not found", err.code) from e
        raise err from e


async def lookup_uuid(conn: libvirt.virConnect, uuid: str) -> libvirt.virDomain:
    try:
        return await asyncio.to_thread(conn.lookupByUUIDString, uuid)
    except libvirt.libvirtError as e:
        raise virt_error(e, f"domain {uuid}") from e


async def live_xml(dom: libvirt.virDomain) -> str:
    try:
        return str(await asyncio.to_thread(dom.XMLDesc, 0))
    except libvirt.libvirtError as e:
        raise virt_error(e, f"domain {dom.name()}") from e


async def is_running(dom: libvirt.virDomain) -> bool:
    try:
        return bool(await asyncio.to_thread(dom.isActive))
    except libvirt.libvirtError as e:
        raise virt_error(e) from e


_SHUTOFF_REASONS = {
    libvirt.VIR_DOMAIN_SHUTOFF_SHUTDOWN: "shutdown", libvirt.VIR_DOMAIN_SHUTOFF_DESTROYED: "destroyed",
    libvirt.VIR_DOMAIN_SHUTOFF_CRASHED: "crashed", libvirt.VIR_DOMAIN_SHUTOFF_MIGRATED: "migrated",
    libvirt.VIR_DOMAIN_SHUTOFF_SAVED: "saved", libvirt.VIR_DOMAIN_SHUTOFF_FAILED: "failed",
    libvirt.VIR_DOMAIN_SHUTOFF_FROM_SNAPSHOT: "from snapshot", libvirt.VIR_DOMAIN_SHUTOFF_DAEMON: "daemon",
}


async def qemu_state(dom: libvirt.virDomain) -> tuple[bool, str]:
    """Whether the domain's QEMU process runs (a paused or crashed-and-kept guest
    counts: its monitor answers), and a word for it; for a shut-off domain libvirt's
    reason: shutdown, destroyed, crashed, saved, failed, ...

    :raise VirtError: libvirt failed (domain undefined, connection lost)
    """
    try:
        state, reason = await asyncio.to_thread(dom.state)
    except libvirt.libvirtError as e:
        raise virt_error(e, f"domain {dom.name()}") from e
    if state == libvirt.VIR_DOMAIN_SHUTOFF:
        return False, _SHUTOFF_REASONS.get(reason, "shut off")
    return True, "paused" if state == libvirt.VIR_DOMAIN_PAUSED else "running"


async def set_protection(dom: libvirt.virDomain, prot: Protection | None) -> None:
    """Write (or with None remove) ``<vs:protection>`` in the live and persistent XML.

    The administrator's ``exclude`` list is the administrator's: it is kept.
    """
    # A shut-off domain has no live XML to change (libvirt refuses AFFECT_LIVE then).
    flags = libvirt.VIR_DOMAIN_AFFECT_LIVE if await asyncio.to_thread(dom.isActive) else 0
    if await asyncio.to_thread(dom.isPersistent):
        flags |= libvirt.VIR_DOMAIN_AFFECT_CONFIG
    xml = protection_xml(prot, parse_exclude(await live_xml(dom))) if prot is not None else None
    key = METADATA_KEY if prot is not None else None
    try:
        await asyncio.to_thread(dom.setMetadata, libvirt.VIR_DOMAIN_METADATA_ELEMENT, xml, key, METADATA_NS,
                                flags)
    except libvirt.libvirtError as e:
        raise virt_error(e, f"domain {dom.name()}: metadata") from e


# -- guest filesystem freeze (QEMU guest agent) ---------------------------------

FREEZE_TIMEOUT = 10.0

# Errors that mean no guest agent took part: none configured, its channel not
# opened by the guest, or it did not answer libvirt's guest-sync.
_NO_AGENT_CODES = frozenset({libvirt.VIR_ERR_AGENT_UNRESPONSIVE, libvirt.VIR_ERR_OPERATION_UNSUPPORTED,
                             libvirt.VIR_ERR_ARGUMENT_UNSUPPORTED})


class GuestAgentError(VirtError):
    """No QEMU guest agent answered (absent, not connected, unresponsive, timed out).

    ``reached_guest`` is False when libvirt sent nothing to the guest (no agent
    configured or its channel closed): nothing can be frozen, no thaw is needed.
    """

    def __init__(self, message: str, code: int | None = None, *, reached_guest: bool = True) -> None:
        super().__init__(message, code)
        self.reached_guest = reached_guest


def _agent_error(e: libvirt.libvirtError, what: str) -> VirtError:
    code = e.get_error_code()
    message = e.get_error_message() or str(e)
    lowered = message.lower()
    not_there = "not configured" in lowered or "not connected" in lowered
    if code in _NO_AGENT_CODES or not_there:
        return GuestAgentError(f"{what}: {message}", code, reached_guest=not not_there)
    return virt_error(e, what)


async def _agent_call(dom: libvirt.virDomain, command: str, what: str, timeout: float) -> int:
    """One guest agent command with libvirt's own per-call timeout.

    Not ``virDomainFSFreeze``: libvirt waits for its answer without a bound by
    default, holding the domain's agent job, so a hung agent would also block the
    thaw that must follow. A timed-out command here ends and frees the job.
    (libvirt notes the domain as tainted by a custom agent command.)
    """
    seconds = max(1, math.ceil(timeout))
    try:
        async with asyncio.timeout(seconds + 5):  # libvirt's bound first; this one if libvirt hangs
            raw = await asyncio.to_thread(libvirt_qemu.qemuAgentCommand, dom, json.dumps({"execute": command}),
                                          seconds, 0)
    except TimeoutError:
        raise GuestAgentError(f"{what}: no answer from the guest agent within {seconds}s") from None
    except libvirt.libvirtError as e:
        if e.get_error_code() == libvirt.VIR_ERR_AGENT_UNRESPONSIVE and "not available" in str(e):
            raise GuestAgentError(f"{what}: no answer from the guest agent within {seconds}s",
                                  e.get_error_code()) from e
        raise _agent_error(e, what) from e
    try:
        return int(json.loads(raw)["return"])
    except (TypeError, ValueError, KeyError) as e:
        raise VirtError(f"{what}: the guest agent answered {raw!r:.100}") from e


async def fs_freeze(dom: libvirt.virDomain, timeout: float = FREEZE_TIMEOUT) -> int:
    """Freeze the guest's filesystems through its agent; the number frozen.

    :raise GuestAgentError: no agent answered (``reached_guest`` says whether a thaw may be needed)
    :raise VirtError: the agent answered with an error
    """
    return await _agent_call(dom, "guest-fsfreeze-freeze", f"domain {dom.name()}: freeze", timeout)


async def fs_thaw(dom: libvirt.virDomain, timeout: float = FREEZE_TIMEOUT) -> int:
    """Thaw the guest's filesystems; the number thawed.

    :raise GuestAgentError: no agent answered
    :raise VirtError: the agent answered with an error
    """
    return await _agent_call(dom, "guest-fsfreeze-thaw", f"domain {dom.name()}: thaw", timeout)

"""libvirt domain events for the mapping tracker.

The callbacks run on the daemon's loop (libvirtaio); each only builds a
``(uuid, reason)`` and puts it on a queue: no libvirt call, no await.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import libvirt

TRACKED_EVENTS = {
    libvirt.VIR_DOMAIN_EVENT_ID_DEVICE_ADDED: "device added",
    libvirt.VIR_DOMAIN_EVENT_ID_DEVICE_REMOVED: "device removed",
    libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE: "lifecycle",
    libvirt.VIR_DOMAIN_EVENT_ID_BLOCK_JOB_2: "block job",
}


LIFECYCLE = {
    libvirt.VIR_DOMAIN_EVENT_STARTED: "started", libvirt.VIR_DOMAIN_EVENT_STOPPED: "stopped",
    libvirt.VIR_DOMAIN_EVENT_SUSPENDED: "paused", libvirt.VIR_DOMAIN_EVENT_RESUMED: "resumed",
    libvirt.VIR_DOMAIN_EVENT_SHUTDOWN: "shutdown", libvirt.VIR_DOMAIN_EVENT_CRASHED: "crashed",
}


def register(conn: libvirt.virConnect, queue: asyncio.Queue[tuple[str, str]],
             on_lifecycle: Callable[[str, str], None] | None = None) -> list[int]:
    """Subscribe to the events that can change a domain's disk list; lifecycle
    events also call ``on_lifecycle(uuid, what)`` (what: started, stopped, paused, ...)."""
    ids = []
    for event_id, reason in TRACKED_EVENTS.items():
        def callback(_conn: Any, dom: libvirt.virDomain, *args: Any, _reason: str = reason,
                     _lifecycle: bool = event_id == libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE) -> None:
            uuid = dom.UUIDString()
            queue.put_nowait((uuid, _reason))
            if _lifecycle and on_lifecycle is not None and args:
                on_lifecycle(uuid, LIFECYCLE.get(args[0], "other"))

        ids.append(conn.domainEventRegisterAny(None, event_id, callback, None))
    return ids


def deregister(conn: libvirt.virConnect, ids: list[int]) -> None:
    for callback_id in ids:
        try:
            conn.domainEventDeregisterAny(callback_id)
        except libvirt.libvirtError:
            pass

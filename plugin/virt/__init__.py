"""The only package that imports libvirt: connections and the QMP bridge."""

from __future__ import annotations

from .connection import ensure_event_impl, open_connection, virt_error
from .qmp_bridge import LibvirtQmpTransport

__all__ = ["LibvirtQmpTransport", "ensure_event_impl", "open_connection", "virt_error"]

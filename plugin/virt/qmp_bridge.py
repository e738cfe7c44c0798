"""QMP through libvirt's monitor passthrough, as a ``QmpTransport``.

libvirt owns QEMU's monitor socket, so production QMP goes through
``virDomainQemuMonitorCommand`` and ``virConnectDomainQemuMonitorEventRegister``.
Two quirks shape this module:

- the passthrough returns QEMU's raw reply even when it carries ``error``
  (``virsh qemu-monitor-command`` exits 0 then), so every reply is parsed;
- event callbacks run wherever libvirt's event implementation runs (the loop
  with libvirtaio, a thread with the default impl), so the callback only builds
  a :class:`QmpEvent` and hands it to the loop with ``call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Iterable, Mapping
from contextlib import AbstractContextManager
from types import TracebackType
from typing import Any

import libvirt
import libvirt_qemu

from qemu_blockdev.errors import TransportError
from qemu_blockdev.transport import EventFilter, EventHub, EventListener, QmpEvent, parse_reply

__all__ = ["LibvirtQmpTransport"]

_log = logging.getLogger(__name__)


class LibvirtQmpTransport:
    """A ``QmpTransport`` for one libvirt domain.

    Commands work as soon as the object exists; events flow after
    :meth:`connect` (or ``async with``) and stop at :meth:`close`.

    :param domain: the domain whose QEMU monitor to use
    :param loop: the loop that receives events; default: the running loop at
        :meth:`connect`
    """

    def __init__(self, domain: libvirt.virDomain, *, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self._domain = domain
        self._loop = loop
        self._hub = EventHub()
        self._callback_id: int | None = None
        self._closed = False

    @property
    def domain(self) -> libvirt.virDomain:
        return self._domain

    async def connect(self) -> None:
        """Register for all of this domain's QMP events (idempotent).

        :raise TransportError: libvirt refused the registration
        """
        if self._closed:
            raise TransportError("transport is closed")
        if self._callback_id is not None:
            return
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        conn = self._domain.connect()
        try:
            # event=None: every event of this domain; flags=0: exact names.
            self._callback_id = await asyncio.to_thread(
                libvirt_qemu.qemuMonitorEventRegister, conn, self._domain, None, self._on_event, None, 0
            )
        except libvirt.libvirtError as e:
            raise TransportError(f"cannot subscribe to QMP events: {e.get_error_message() or e}") from e

    async def close(self) -> None:
        """Deregister events and end every open listener with ``TransportError``."""
        if self._closed:
            return
        self._closed = True
        callback_id, self._callback_id = self._callback_id, None
        try:
            if callback_id is not None:
                conn = self._domain.connect()
                await asyncio.to_thread(libvirt_qemu.qemuMonitorEventDeregister, conn, callback_id)
        except libvirt.libvirtError as e:
            # The connection may already be gone; nothing is left to deregister then.
            _log.debug("deregistering QMP events failed: %s", e)
        finally:
            self._hub.fail_all(TransportError("transport closed"))

    async def __aenter__(self) -> LibvirtQmpTransport:
        await self.connect()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def execute(self, command: str, arguments: Mapping[str, Any] | None = None) -> Any:
        """Run one QMP command through libvirt and return its ``return`` value.

        :raise QmpCommandError: QEMU answered with an error
        :raise TransportError: libvirt failed (domain not running, connection
            lost) or the reply is not QMP
        """
        if self._closed:
            raise TransportError(f"{command}: transport is closed")
        message: dict[str, Any] = {"execute": command}
        if arguments is not None:
            message["arguments"] = dict(arguments)
        wire = json.dumps(message)
        started = time.monotonic()
        try:
            # Looked up at call time so tests can monkeypatch the module.
            raw = await asyncio.to_thread(libvirt_qemu.qemuMonitorCommand, self._domain, wire, 0)
        except libvirt.libvirtError as e:
            raise TransportError(f"{command}: {e.get_error_message() or e}") from e
        finally:
            _log.debug("%s: %.1f ms", command, (time.monotonic() - started) * 1000)
        try:
            reply = json.loads(raw)
        except (TypeError, ValueError) as e:
            raise TransportError(f"{command}: reply is not JSON: {raw!r:.200}") from e
        return parse_reply(command, reply)

    def listen(
        self, names: Iterable[str] = (), event_filter: EventFilter | None = None
    ) -> AbstractContextManager[EventListener]:
        """Subscribe to events by name (all when empty); subscribe before executing."""
        return self._hub.listen(names, event_filter)

    def _on_event(
        self,
        conn: libvirt.virConnect,
        dom: libvirt.virDomain,
        event: str,
        seconds: int,
        micros: int,
        details: str | None,
        opaque: object,
    ) -> None:
        """libvirt's callback: build the event, hand it to the loop, nothing else."""
        data: Mapping[str, Any]
        try:
            parsed = json.loads(details) if details else {}
        except ValueError:
            parsed = {"raw": details}
        data = parsed if isinstance(parsed, dict) else {"value": parsed}
        qmp_event = QmpEvent(event, data, seconds + micros / 1e6)
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        loop.call_soon_threadsafe(self._hub.dispatch, qmp_event)

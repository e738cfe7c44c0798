"""The transport interface every block operation runs over.

Two implementations exist: :mod:`qemu_blockdev.qmp_socket` (a QMP socket through
qemu.qmp, for qemu-storage-daemon and plain QEMU) and the libvirt monitor
passthrough in ``plugin.virt.qmp_bridge``. Both deliver events through an
:class:`EventHub`, so a caller can subscribe *before* it executes a command:
QEMU 7.2 may emit ``JOB_STATUS_CHANGE`` created/running before the reply.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

from .errors import QmpCommandError, TransportError, command_subject


@dataclass(frozen=True, slots=True)
class QmpEvent:
    """One QMP event: its name, its data and QEMU's timestamp (seconds)."""

    name: str
    data: Mapping[str, Any] = field(default_factory=dict)
    timestamp: float = 0.0


EventFilter = Callable[[QmpEvent], bool]


class EventListener:
    """A subscription: an async iterator of the events that pass its filter."""

    def __init__(self, names: frozenset[str], event_filter: EventFilter | None) -> None:
        self._names = names
        self._filter = event_filter
        self._queue: asyncio.Queue[QmpEvent | BaseException] = asyncio.Queue()

    def offer(self, event: QmpEvent) -> None:
        if self._names and event.name not in self._names:
            return
        if self._filter is not None and not self._filter(event):
            return
        self._queue.put_nowait(event)

    def fail(self, error: BaseException) -> None:
        """End the subscription with an error (the transport went away)."""
        self._queue.put_nowait(error)

    async def get(self) -> QmpEvent:
        item = await self._queue.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def __aiter__(self) -> AsyncIterator[QmpEvent]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[QmpEvent]:
        while True:
            yield await self.get()


class EventHub:
    """Fans events out to listeners; transports call :meth:`dispatch`."""

    def __init__(self) -> None:
        self._listeners: list[EventListener] = []

    @contextmanager
    def listen(
        self, names: Iterable[str] = (), event_filter: EventFilter | None = None
    ) -> Iterator[EventListener]:
        listener = EventListener(frozenset(names), event_filter)
        self._listeners.append(listener)
        try:
            yield listener
        finally:
            self._listeners.remove(listener)

    def dispatch(self, event: QmpEvent) -> None:
        for listener in list(self._listeners):
            listener.offer(event)

    def fail_all(self, error: BaseException) -> None:
        for listener in list(self._listeners):
            listener.fail(error)


class QmpTransport(Protocol):
    """What qemu_blockdev needs from a QEMU monitor."""

    async def execute(self, command: str, arguments: Mapping[str, Any] | None = None) -> Any:
        """Run one QMP command and return its ``return`` value.

        :raise QmpCommandError: QEMU answered with an error
        :raise TransportError: the monitor is unreachable or the reply is malformed
        """
        ...

    def listen(
        self, names: Iterable[str] = (), event_filter: EventFilter | None = None
    ) -> AbstractContextManager[EventListener]:
        """Subscribe to events by name (all when empty), optionally filtered."""
        ...


def parse_reply(command: str, reply: Any, arguments: Mapping[str, Any] | None = None) -> Any:
    """Check a raw QMP reply dict and return its ``return`` value.

    Used by transports that see the wire JSON themselves (libvirt passthrough,
    fakes); qemu.qmp does this for the socket transport.

    :raise QmpCommandError: the reply carries ``error``
    :raise TransportError: the reply is neither a return nor an error
    """
    if not isinstance(reply, Mapping):
        raise TransportError(f"{command}: malformed QMP reply (not an object): {reply!r:.200}")
    if "error" in reply:
        err = reply["error"]
        if not isinstance(err, Mapping):
            raise TransportError(f"{command}: malformed QMP error: {err!r:.200}")
        error_class = str(err.get("class", "GenericError"))
        raise QmpCommandError(command, error_class, str(err.get("desc", "")), command_subject(arguments))
    if "return" not in reply:
        raise TransportError(f"{command}: malformed QMP reply (no return): {reply!r:.200}")
    return reply["return"]


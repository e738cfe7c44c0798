"""QmpTransport over a QMP unix socket, through qemu.qmp.

For qemu-storage-daemon and plain QEMU. This is the only module that imports
qemu.qmp, whose API is still alpha and pinned in setup.cfg.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from qemu.qmp import ConnectError, ExecInterruptedError, ExecuteError, QMPClient, QMPError, Runstate
from qemu.qmp import EventListener as QmpEventListener

from .errors import QmpCommandError, TransportError, command_subject
from .transport import EventFilter, EventHub, EventListener, QmpEvent


class _RetriedConnect(logging.Filter):
    """Drops qemu.qmp's ERROR (and debug traceback) for a connect attempt that will be retried:
    the daemon's socket appears a moment after its start, so those failures are expected."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Failed to establish connection")


class QmpSocketTransport:
    """One connected QMP client; events flow into an :class:`EventHub`.

    :param path: the monitor's unix socket
    :param name: a label for qemu.qmp's logs
    """

    def __init__(self, path: str, name: str = "vs-qmp") -> None:
        self.path = path
        self._client = QMPClient(name)
        self._hub = EventHub()
        self._pump: asyncio.Task[None] | None = None
        self._watch: asyncio.Task[None] | None = None
        self._closed = False

    async def connect(self, timeout: float = 10.0) -> None:
        """Connect, retrying until the socket appears or ``timeout`` passes.

        :raise TransportError: no monitor answered in time
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        quiet = _RetriedConnect()
        self._client.logger.addFilter(quiet)
        try:
            while True:
                last = loop.time() >= deadline
                if last:
                    self._client.logger.removeFilter(quiet)   # the last attempt: its failure is logged
                try:
                    await self._client.connect(self.path)
                    break
                except ConnectError as e:
                    if last:
                        raise TransportError(f"cannot connect to QMP at {self.path}: {e}") from e
                    await asyncio.sleep(0.05)
        finally:
            self._client.logger.removeFilter(quiet)
        listener = QmpEventListener()
        self._client.register_listener(listener)
        self._pump = asyncio.create_task(self._pump_events(listener))
        self._watch = asyncio.create_task(self._watch_state())

    async def _pump_events(self, listener: QmpEventListener) -> None:
        async for msg in listener:
            ts: Any = msg.get("timestamp") or {}
            data: Any = msg.get("data") or {}
            stamp = float(ts.get("seconds", 0)) + float(ts.get("microseconds", 0)) / 1e6
            self._hub.dispatch(QmpEvent(str(msg["event"]), dict(data), stamp))

    async def _watch_state(self) -> None:
        # A monitor that goes away must end every waiting listener, or a job
        # waiter would sleep until its timeout instead of failing at once.
        while True:
            state = await self._client.runstate_changed()
            if state in (Runstate.DISCONNECTING, Runstate.IDLE):
                self._hub.fail_all(TransportError(f"QMP connection to {self.path} closed"))
                return

    async def execute(self, command: str, arguments: Mapping[str, Any] | None = None) -> Any:
        if self._client.runstate != Runstate.RUNNING:
            raise TransportError(f"{command}: QMP connection to {self.path} is not open")
        try:
            return await self._client.execute(command, arguments)
        except ExecuteError as e:
            raise QmpCommandError(command, e.error_class, str(e), command_subject(arguments)) from e
        except ExecInterruptedError as e:
            raise TransportError(f"{command}: QMP connection to {self.path} lost") from e
        except QMPError as e:
            raise TransportError(f"{command}: {e}") from e

    @contextlib.contextmanager
    def listen(
        self, names: Iterable[str] = (), event_filter: EventFilter | None = None
    ) -> Iterator[EventListener]:
        with self._hub.listen(names, event_filter) as listener:
            yield listener

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for task in (self._pump, self._watch):
            if task is not None:
                task.cancel()
        with contextlib.suppress(QMPError, OSError, EOFError):
            await self._client.disconnect()
        for task in (self._pump, self._watch):
            if task is not None:
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    async def __aenter__(self) -> QmpSocketTransport:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

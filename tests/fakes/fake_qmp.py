"""A scripted QmpTransport for unit tests at the QMP JSON boundary.

Replies are scripted per command; :meth:`FakeQmp.on` can also emit events
*before* the reply, as QEMU 7.2 does for JOB_STATUS_CHANGE.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from qemu_blockdev.transport import EventFilter, EventHub, EventListener, QmpEvent, parse_reply

Reply = Mapping[str, Any] | Callable[[Mapping[str, Any]], Mapping[str, Any]]


class FakeQmp:
    def __init__(self) -> None:
        self.hub = EventHub()
        self.sent: list[tuple[str, dict[str, Any]]] = []
        self._replies: dict[str, list[tuple[Reply, list[QmpEvent]]]] = {}

    def on(self, command: str, reply: Reply | None = None, *, events_before: Iterable[QmpEvent] = ()) -> None:
        """Script the next reply to ``command`` (default ``{"return": {}}``)."""
        self._replies.setdefault(command, []).append((reply or {"return": {}}, list(events_before)))

    def emit(self, name: str, **data: Any) -> None:
        self.hub.dispatch(QmpEvent(name, data))

    def emit_later(self, delay: float, name: str, **data: Any) -> None:
        asyncio.get_running_loop().call_later(delay, functools.partial(self.emit, name, **data))

    async def execute(self, command: str, arguments: Mapping[str, Any] | None = None) -> Any:
        args = dict(arguments or {})
        self.sent.append((command, args))
        queue = self._replies.get(command)
        if not queue:
            raise AssertionError(f"unscripted command {command} {args}")
        reply, events = queue.pop(0) if len(queue) > 1 else queue[0]
        for event in events:
            self.hub.dispatch(event)
        await asyncio.sleep(0)
        raw = reply(args) if callable(reply) else reply
        return parse_reply(command, raw, args)

    @contextmanager
    def listen(self, names: Iterable[str] = (), event_filter: EventFilter | None = None) -> Iterator[EventListener]:
        with self.hub.listen(names, event_filter) as listener:
            yield listener

    def commands(self) -> list[str]:
        return [c for c, _ in self.sent]


def job_event(job_id: str, status: str) -> QmpEvent:
    return QmpEvent("JOB_STATUS_CHANGE", {"id": job_id, "status": status})


def jobs_reply(*jobs: tuple[str, str, str | None]) -> dict[str, Any]:
    """A query-jobs reply from (id, status, error) triples."""
    out = []
    for job_id, status, error in jobs:
        entry: dict[str, Any] = {"id": job_id, "type": "backup", "status": status,
                                 "current-progress": 10, "total-progress": 10}
        if error is not None:
            entry["error"] = error
        out.append(entry)
    return {"return": out}

"""A protected group (one domain and its pairs) as the supervisor keeps it, with its inbox."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from ..domain import PairState, Role
from ..replication.primary import DomainReplicator
from ..virt.qmp_bridge import LibvirtQmpTransport

# States of pairs whose cycles run (or are retried).
LIVE = frozenset({PairState.INITIAL_COPY, PairState.ACTIVE, PairState.BEHIND, PairState.DISCONNECTED,
                  PairState.ERROR})
PRIMARY = Role.PRIMARY
MAX_BACKOFF = 30.0


@dataclass
class MarkRequest:
    """A marker asked for (``virtsync mark``): answered by the cycle that cuts it."""

    label: str
    apply: bool
    done: asyncio.Future[dict[str, Any]]
    quiesce: bool = False               # freeze the guest's filesystems for the cut
    crash_consistent_ok: bool = False   # no agent answered: cut without freeze instead of refusing


@dataclass
class Call:
    """Work for the group run by its task in its turn, never beside a cycle: a tracker
    action (the disk set changes), a replayed or live hook event's look at the disks."""

    what: str
    run: Callable[[], Awaitable[Any]]
    done: asyncio.Future[Any]


Item = MarkRequest | Call


class Inbox:
    """The group's requests in arrival order, run one at a time by the group's task
    (docs/DESIGN.md, "The group inbox"). ``wake`` is set by every arrival, and by
    anything else the task must look at (a lifecycle event, a resume)."""

    def __init__(self) -> None:
        self._items: deque[Item] = deque()
        self.wake = asyncio.Event()

    def put(self, item: Item) -> None:
        self._items.append(item)
        self.wake.set()

    def head(self) -> Item | None:
        return self._items[0] if self._items else None

    def take(self) -> Item:
        return self._items.popleft()

    def marks(self) -> list[MarkRequest]:
        return [item for item in self._items if isinstance(item, MarkRequest)]

    def pending(self, what: str) -> bool:
        """A call of that kind waits and has not started."""
        return any(isinstance(item, Call) and item.what == what for item in self._items)

    def fail_marks(self, error: Exception) -> None:
        """Answer every waiting mark with ``error`` (no cycle will cut it); calls stay."""
        for item in self.marks():
            self._items.remove(item)
            if not item.done.done():
                item.done.set_exception(error)

    def close(self, error: Exception) -> None:
        """The group is gone: every waiting item is answered with ``error``."""
        while self._items:
            item = self._items.popleft()
            if not item.done.done():
                item.done.set_exception(error)


@dataclass
class Protected:
    """A domain this host replicates as primary, its inbox and its supervisor."""

    uuid: str
    name: str
    replicator: DomainReplicator
    qmp: LibvirtQmpTransport
    inbox: Inbox = field(default_factory=Inbox)
    task: asyncio.Task[None] | None = None
    first_marker: asyncio.Event = field(default_factory=asyncio.Event)
    # The domain's QEMU as the supervisor last saw it: None before the first look.
    running: bool | None = None
    # qmp and the replicator's node names belong to the QEMU that runs now.
    attached: bool = False
    # _domain_stopped has run for the current stop (it is retried until it has).
    stop_handled: bool = False
    unreachable_since: float | None = None  # first failed cycle of the current peer outage

    @property
    def wake(self) -> asyncio.Event:
        return self.inbox.wake

    @property
    def marks(self) -> list[MarkRequest]:
        return self.inbox.marks()

"""A protected group (one domain and its pairs) as the supervisor keeps it."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from ..domain import PairState
from ..replication.primary import DomainReplicator
from ..virt.qmp_bridge import LibvirtQmpTransport

# States of pairs whose cycles run (or are retried).
LIVE = frozenset({PairState.INITIAL_COPY, PairState.ACTIVE, PairState.BEHIND, PairState.DISCONNECTED,
                  PairState.ERROR})
PRIMARY = "primary"
MAX_BACKOFF = 30.0


@dataclass
class MarkRequest:
    label: str
    apply: bool
    done: asyncio.Future[dict[str, Any]]
    quiesce: bool = False               # freeze the guest's filesystems for the cut
    crash_consistent_ok: bool = False   # no agent answered: cut without freeze instead of refusing


@dataclass
class Protected:
    """A domain this host replicates as primary, and its supervisor."""

    uuid: str
    name: str
    replicator: DomainReplicator
    qmp: LibvirtQmpTransport
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    marks: list[MarkRequest] = field(default_factory=list)
    task: asyncio.Task[None] | None = None
    first_marker: asyncio.Event = field(default_factory=asyncio.Event)
    # Held by a cycle, and by the tracker while it changes the disk set.
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    # The domain's QEMU as the supervisor last saw it: None before the first look.
    running: bool | None = None
    # qmp and the replicator's node names belong to the QEMU that runs now.
    attached: bool = False
    # _domain_stopped has run for the current stop (it is retried until it has).
    stop_handled: bool = False
    unreachable_since: float | None = None  # first failed cycle of the current peer outage

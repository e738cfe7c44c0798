"""The nouns of replication: protection, pairs, markers."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class Role(enum.StrEnum):
    """Which side of a protection this host holds; one host can be both, per domain."""

    PRIMARY = "primary"
    SECONDARY = "secondary"


class PairState(enum.Enum):
    """Lifecycle of a copy pair (one per protected disk); the transitions are
    :func:`plugin.domain.lifecycle.next_state`.

    initial-copy → active ⇄ behind / disconnected / error (with a reason,
    retried with backoff); stopped while the domain's QEMU is gone; needs
    resync when the dirty bitmap cannot be trusted; suspended by the user;
    deleted at the end.
    """

    INITIAL_COPY = "initial-copy"
    ACTIVE = "active"
    SUSPENDED = "suspended"
    STOPPED = "stopped"
    DISCONNECTED = "disconnected"
    BEHIND = "behind"
    NEEDS_RESYNC = "needs resync"
    ERROR = "error"
    DELETED = "deleted"


@dataclass(frozen=True, slots=True)
class Protection:
    """What the domain's ``<vs:protection>`` metadata asks for."""

    peer: str
    segment: str = "default"
    rpo: int = 300
    mode: str = "async"

    def __post_init__(self) -> None:
        if self.mode not in ("async", "sync"):
            raise ValueError(f"mode must be async or sync, not {self.mode!r}")
        if not 1 <= self.rpo <= 86400 * 7:
            raise ValueError(f"rpo must be 1..604800 seconds, not {self.rpo}")


@dataclass(frozen=True, slots=True)
class DiskSpec:
    """A domain disk as replication sees it."""

    target: str          # guest device name: vda
    source: str          # host path or volume
    fmt: str             # qcow2, raw
    size: int            # virtual size in bytes
    node: str = ""       # QEMU block node (format layer) on the primary
    device: str = ""     # QOM path of the device, for guest-side tools


@dataclass(frozen=True, slots=True)
class Pair:
    """A primary disk and its replica on the peer."""

    domain_uuid: str
    domain: str
    target: str
    peer: str
    state: PairState
    reason: str = ""
    size: int = 0
    bytes_done: int = 0
    bytes_total: int = 0
    last_marker: int = 0


@dataclass(frozen=True, slots=True)
class Marker:
    """A consistent cut across all the domain's disks, committed on the secondary."""

    seq: int
    domain_uuid: str
    cut_time: float
    disks: tuple[str, ...]
    bytes: dict[str, int] = field(default_factory=dict)
    label: str = ""
    apply: bool = True
    applied: bool = False


@dataclass(frozen=True, slots=True)
class PeerSpec:
    """A peer agent from the config."""

    name: str
    address: str
    port: int
    replication_address: str = ""
    #: Plain HTTP and NBD with this peer (an isolated replication network), never the default.
    insecure_plain: bool = False


#: Longest marker label; a label is printable text (it shows in `markers` and logs).
MAX_LABEL = 128


def label_problem(label: str) -> str | None:
    """Why ``label`` cannot name a marker, or None: the secondary's rule, which the primary
    also checks before it cuts anything."""
    if len(label) > MAX_LABEL or not label.isprintable():
        return f"a label is at most {MAX_LABEL} printable characters"
    return None

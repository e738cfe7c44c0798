"""The pair state machine: what a pair's state becomes when something happens.

Pure: no I/O. The store applies it (``Store.transition``) and logs a WARNING
when a pair moves into one of :data:`BAD_STATES`.
"""

from __future__ import annotations

import enum

from .models import PairState

__all__ = ["BAD_STATES", "PairEvent", "next_state", "severity"]


class PairEvent(enum.Enum):
    COPY_STARTED = "copy started"          # a full copy of the disk begins (new pair, re-copy)
    CYCLE_OK = "cycle ok"                  # a marker was committed
    LAG_OVER_RPO = "lag over rpo"          # the newest marker is older than the RPO
    PEER_UNREACHABLE = "peer unreachable"  # a cycle failed because the peer cannot be reached
    CYCLE_FAILED = "cycle failed"          # a cycle (or the supervisor) failed for any other reason
    STOPPED = "stopped"                    # the domain's QEMU is gone, in an orderly way
    CRASHED = "crashed"                    # the dirty bitmap cannot be trusted any more
    STARTED = "started"                    # the domain's QEMU runs again
    SUSPEND = "suspend"                    # the user suspended replication
    RESUME = "resume"                      # ... and resumed it
    RETIRE = "retire"                      # the disk left the domain, or protection ended


S = PairState
E = PairEvent

#: States that need someone's attention: a WARNING on entry, listed first by ``status``.
BAD_STATES = frozenset({S.ERROR, S.NEEDS_RESYNC, S.DISCONNECTED, S.BEHIND})

# States in which cycles run (or are retried).
_LIVE = frozenset({S.INITIAL_COPY, S.ACTIVE, S.BEHIND, S.DISCONNECTED, S.ERROR})

# Order of ``status``: the worst first.
_SEVERITY = [S.ERROR, S.NEEDS_RESYNC, S.DISCONNECTED, S.BEHIND, S.STOPPED, S.INITIAL_COPY, S.SUSPENDED,
             S.ACTIVE, S.DELETED]


def severity(state: PairState) -> int:
    """0 for the worst state; sort by it to put trouble first."""
    return _SEVERITY.index(state)


def next_state(current: PairState, event: PairEvent) -> PairState:
    """The state a pair in ``current`` takes on ``event`` (itself when the event changes nothing)."""
    if current is S.DELETED or event is E.RETIRE:
        return S.DELETED
    if event is E.CRASHED:
        # Whatever else holds, the bitmap is gone: never hide that.
        return S.NEEDS_RESYNC
    if current is S.NEEDS_RESYNC:
        # Only a re-copy ends it: resuming from an untrusted bitmap would lose writes.
        return S.INITIAL_COPY if event is E.COPY_STARTED else current
    if event is E.SUSPEND:
        return S.SUSPENDED
    if current is S.SUSPENDED:
        return S.ACTIVE if event is E.RESUME else current
    if current is S.STOPPED:
        # No writes while stopped, so no lag; a marker cut at stop keeps it stopped.
        return {E.STARTED: S.ACTIVE, E.COPY_STARTED: S.INITIAL_COPY, E.PEER_UNREACHABLE: S.DISCONNECTED,
                E.CYCLE_FAILED: S.ERROR}.get(event, current)
    assert current in _LIVE, current
    if event is E.STOPPED:
        return S.STOPPED
    if event is E.CYCLE_OK:
        return S.ACTIVE
    if event is E.COPY_STARTED:
        return S.INITIAL_COPY
    if event is E.PEER_UNREACHABLE:
        return S.DISCONNECTED
    if event is E.CYCLE_FAILED:
        return S.ERROR
    if event is E.LAG_OVER_RPO:
        # A copy in progress is late by nature; a failure already says more than the lag.
        return S.BEHIND if current is S.ACTIVE else current
    return current  # STARTED, RESUME: nothing to change until a cycle says so

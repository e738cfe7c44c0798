"""Pure value types of virtsync: frozen dataclasses and Enums, no I/O, no imports
from the rest of the project."""

from __future__ import annotations

from .lifecycle import BAD_STATES, PairEvent, next_state, severity
from .models import (
    DiskSpec,
    Marker,
    Pair,
    PairState,
    PeerSpec,
    Protection,
)

__all__ = ["BAD_STATES", "DiskSpec", "Marker", "Pair", "PairEvent", "PairState", "PeerSpec", "Protection",
           "next_state", "severity"]

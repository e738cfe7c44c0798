"""Pure value types of virtsync: frozen dataclasses and Enums, no I/O, no imports
from the rest of the project."""

from __future__ import annotations

from .lifecycle import BAD_STATES, PairEvent, next_state, severity
from .models import (
    MAX_LABEL,
    DiskSpec,
    Marker,
    Pair,
    PairState,
    PeerSpec,
    Protection,
    Role,
    label_problem,
)

__all__ = ["BAD_STATES", "MAX_LABEL", "DiskSpec", "Marker", "Pair", "PairEvent", "PairState", "PeerSpec",
           "Protection", "Role", "label_problem", "next_state", "severity"]

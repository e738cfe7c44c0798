"""Pure value types of virtsync: frozen dataclasses and Enums, no I/O, no imports
from the rest of the project."""

from __future__ import annotations

from .models import (
    MAX_LABEL,
    DiskSpec,
    Marker,
    Pair,
    PairState,
    PeerSpec,
    Protection,
    label_problem,
)

__all__ = ["MAX_LABEL", "DiskSpec", "Marker", "Pair", "PairState", "PeerSpec", "Protection", "label_problem"]

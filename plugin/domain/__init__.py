"""Pure value types of virtsync: frozen dataclasses and Enums, no I/O, no imports
from the rest of the project."""

from __future__ import annotations

from .models import (
    DiskSpec,
    Marker,
    Pair,
    PairState,
    PeerSpec,
    Protection,
)

__all__ = ["DiskSpec", "Marker", "Pair", "PairState", "PeerSpec", "Protection"]

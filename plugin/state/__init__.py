"""Durable agent state (sqlite, WAL)."""

from __future__ import annotations

from .store import Store

__all__ = ["Store"]

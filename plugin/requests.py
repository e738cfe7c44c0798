"""Typed arguments of requests from outside: the local IPC and the peer API."""

from __future__ import annotations

from typing import Any

from .errors import PluginError


class UsageError(PluginError):
    exit_code = 2


def arg(args: dict[str, Any], key: str, kind: type, default: Any = ..., *, where: str = "") -> Any:
    """One typed argument of an IPC or peer request."""
    if key not in args or args[key] is None:
        if default is ...:
            raise UsageError(f"{where or 'request'}: missing {key!r}")
        return default
    value = args[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise UsageError(f"{where or 'request'}: {key!r} must be {kind.__name__}")
    return value

"""One codec for errors crossing a link: the local socket (:mod:`plugin.ipc`) and the peer
API (:mod:`plugin.peer`).

An error travels as one JSON object::

    {"type": "StateConflictError", "message": "...", "exit_code": 1,
     "details": {"state": "paused", "required": ["running"]}}

``details`` holds the exception's public attributes (its structured data). The receiving
side rebuilds the same class when it knows the type name (every :class:`PluginError`
subclass of ``plugin`` imported on that side, by class name: the names are unique, a test
holds them so), so a caller can tell one refusal from another by type; otherwise it is a
:class:`RemoteError` that keeps the sender's type name and exit code.
"""

from __future__ import annotations

import enum
import math
from typing import Any

from plugin.errors import PluginError

__all__ = ["INTERNAL", "RemoteError", "decode", "encode", "encode_internal", "known_types"]

#: The type name of an unexpected failure (a bug) on the sending side.
INTERNAL = "InternalError"
#: The longest message kept from a received error.
MAX_MESSAGE = 2000


class RemoteError(PluginError):
    """An error reply whose type this side does not know (an ``InternalError``, or a newer daemon).

    The remote type name and exit code are kept so the CLI prints and exits as the sender meant.

    :param type_name: the ``type`` of the error reply
    :param message: the human message
    :param exit_code: the exit code the sender chose
    """

    def __init__(self, type_name: str, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.type_name = type_name
        # exit_code is a class attribute elsewhere; here it is per instance, by design.
        vars(self)["exit_code"] = exit_code


def known_types() -> dict[str, type[PluginError]]:
    """Every PluginError subclass of ``plugin`` this process has imported, by class name."""
    found: dict[str, type[PluginError]] = {}
    todo: list[type[PluginError]] = [PluginError]
    while todo:
        cls = todo.pop()
        if cls.__module__.startswith("plugin.") and cls is not RemoteError:
            found.setdefault(cls.__name__, cls)
        todo += cls.__subclasses__()
    return found


def _json_safe(value: object) -> object:
    """Shallow conversion of an exception attribute for ``details``."""
    if isinstance(value, enum.Enum):
        value = value.value
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_json_safe(v) for v in value]
    return str(value)


def encode(exc: PluginError, type_name: str | None = None) -> dict[str, Any]:
    """The error object of ``exc``; a :class:`RemoteError` passes on the type it was sent as."""
    details = {k: _json_safe(v) for k, v in vars(exc).items()
               if not k.startswith("_") and k not in ("exit_code", "type_name")}
    error: dict[str, Any] = {
        "type": type_name or getattr(exc, "type_name", None) or type(exc).__name__,
        "message": str(exc),
        "exit_code": exc.exit_code,
    }
    if details:
        error["details"] = details
    return error


def encode_internal(exc: BaseException) -> dict[str, Any]:
    """The error object of an unexpected exception (a bug): its repr, no details."""
    return {"type": INTERNAL, "message": f"internal error: {exc!r}"[:MAX_MESSAGE], "exit_code": 1}


def _settable(cls: type[PluginError], key: object) -> bool:
    """A detail may become an attribute: a public name that shadows no method or property."""
    return (isinstance(key, str) and key.isidentifier() and not key.startswith("_")
            and key not in ("args", "exit_code", "type_name") and not hasattr(getattr(cls, key, None), "__get__"))


def decode(error: dict[str, Any], prefix: str = "",
           allowed: tuple[type[PluginError], ...] | None = None) -> PluginError:
    """The exception an error object stands for; ``prefix`` goes before its message
    (the peer link says which peer refused what). With ``allowed``, a known type outside
    it arrives as a :class:`RemoteError` (a peer may refuse, but not raise our local
    control-flow errors, such as a refused cut or an unreachable peer).

    A known type is rebuilt as itself, its details as attributes, without calling its
    ``__init__`` (subclasses take extra arguments, which come in the details); an unknown
    one, or an object without a usable type, is a :class:`RemoteError`.
    """
    type_name = error.get("type")
    if not isinstance(type_name, str) or not type_name:
        type_name = "RemoteError"
    message = prefix + str(error.get("message", ""))[:MAX_MESSAGE]
    exit_code = error.get("exit_code")
    cls = known_types().get(type_name)
    if cls is not None and allowed is not None and not issubclass(cls, allowed):
        cls = None
    if type(exit_code) is not int or not 0 <= exit_code <= 255:
        exit_code = cls.exit_code if cls is not None else 1
    if cls is None:
        return RemoteError(type_name[:100], message, exit_code)
    exc = cls.__new__(cls)
    Exception.__init__(exc, message)
    details = error.get("details")
    if isinstance(details, dict):
        for key, value in details.items():
            if _settable(cls, key):
                setattr(exc, key, value)
    if exit_code != cls.exit_code:
        vars(exc)["exit_code"] = exit_code  # the sender's word wins (version skew)
    return exc

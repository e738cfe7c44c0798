"""JSON from outside (the local IPC, the peer API), parsed within limits.

``json.loads`` recurses once per nesting level: 100,000 ``[`` in a 1 MiB body raise
``RecursionError`` (the peer API answered that with a 500). Our messages nest a few
levels, so anything deeper than :data:`MAX_DEPTH` is refused before it is parsed.
"""

from __future__ import annotations

import json
import re
from typing import Any

__all__ = ["MAX_DEPTH", "JsonInputError", "loads"]

#: Deepest nesting of arrays and objects a request may have.
MAX_DEPTH = 32

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.S)
_BRACKET = re.compile(r"[\[\]{}]")


class JsonInputError(ValueError):
    """Not JSON, or nested too deeply; the message is one line."""


def depth(text: str, limit: int = MAX_DEPTH) -> int:
    """Nesting depth of ``text`` outside strings, counted up to ``limit + 1`` (it stops there)."""
    deepest = level = 0
    for m in _BRACKET.finditer(_STRING.sub("", text)):
        level += 1 if m.group() in "[{" else -1
        if level > deepest:
            deepest = level
            if deepest > limit:
                break
    return deepest


def loads(text: str | bytes, *, max_depth: int = MAX_DEPTH) -> Any:
    """``json.loads`` with a nesting limit.

    :raise JsonInputError: not UTF-8, not JSON, or nested deeper than ``max_depth``
    """
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError:
            raise JsonInputError("not UTF-8") from None
    if depth(text, max_depth) > max_depth:
        raise JsonInputError(f"nested deeper than {max_depth} levels")
    try:
        return json.loads(text)
    except RecursionError:   # not reached within MAX_DEPTH; kept so no input can raise it
        raise JsonInputError("nested too deeply") from None
    except ValueError as e:
        raise JsonInputError(f"not JSON ({str(e)[:100]})") from None

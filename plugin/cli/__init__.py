"""``virtsync``: the command-line front end. It talks to the daemon over :mod:`plugin.ipc`
(``hook`` and ``keys`` work on local files instead, without the daemon).

Every subcommand validates its arguments before anything is sent (bad usage: one line on
stderr, exit 2), sends one request named like the subcommand, and prints the result as a
table or, with ``--json``, as stable JSON. Errors print ``TypeName: message`` and exit with
the error's ``exit_code`` (DESIGN.md §3): 0 ok, 1 failed, 2 bad usage or config, 130 on ^C.

One module per command group (:mod:`.pairs`, :mod:`.journal`, :mod:`.keys`, :mod:`.hook`,
:mod:`.tracker`, :mod:`.status`); :mod:`.base` holds what they share, :mod:`.output` all
writing to the user, :mod:`.app` the command table and :func:`main`.
"""

from __future__ import annotations

from plugin import ipc
from plugin.cli.app import COMMANDS, build_parser, main
from plugin.cli.base import DEFAULT_CONFIG, DEFAULT_SOCKET, Command, resolve_socket
from plugin.cli.output import MAX_ERROR_LINE, ProgressRenderer, human_bytes, human_duration

__all__ = ["COMMANDS", "DEFAULT_CONFIG", "DEFAULT_SOCKET", "MAX_ERROR_LINE", "Command", "ProgressRenderer",
           "build_parser", "human_bytes", "human_duration", "ipc", "main", "resolve_socket"]

"""What every command shares: defaults, argument types, the parser that raises instead of
exiting, the global options, the daemon socket's resolution, and the :class:`Command` base."""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
from collections.abc import Callable
from typing import Any, ClassVar, NoReturn

from plugin import config as config_mod
from plugin import ipc
from plugin.cli.output import ProgressRenderer, _field, _shown, one_line, print_result

DEFAULT_CONFIG = config_mod.DEFAULT_PATH
DEFAULT_SOCKET = config_mod.DEFAULT_SOCKET
#: Per-line timeout of a request (ipc.call bounds each wait for a reply line, progress included).
REQUEST_TIMEOUT = 30.0
#: The same with --wait: the daemon bounds its own waits (cycle timeout), so this is only a backstop
#: against a hung daemon; ^C ends the wait earlier.
WAIT_TIMEOUT = 3600.0
MAX_RPO = 7 * 86400          # Protection.rpo's upper bound
MAX_NAME = 255               # libvirt domain names: keep them file-name sized
MAX_LABEL = 128

log = logging.getLogger("virtsync.cli")


# ----------------------------------------------------------------------------- argument types

def _name(what: str) -> Callable[[str], str]:
    """Validator for domain, peer and segment names."""
    def check(value: str) -> str:
        if not value:
            raise argparse.ArgumentTypeError(f"{what} name must not be empty")
        if len(value) > MAX_NAME:
            raise argparse.ArgumentTypeError(f"{what} name is too long ({len(value)} characters, at most {MAX_NAME})")
        if not value.isprintable():
            raise argparse.ArgumentTypeError(f"{what} name {_shown(value)} contains control or undecodable characters")
        if "/" in value:
            raise argparse.ArgumentTypeError(f"{what} name {_shown(value)} must not contain '/'")
        return value
    check.__name__ = f"{what} name"
    return check


def _rpo(value: str) -> int:
    if not re.fullmatch(r"[0-9]{1,7}", value) or not 1 <= int(value) <= MAX_RPO:
        raise argparse.ArgumentTypeError(f"must be a whole number of seconds from 1 to {MAX_RPO}, not {_shown(value)}")
    return int(value)


def _label(value: str) -> str:
    if len(value) > MAX_LABEL:
        raise argparse.ArgumentTypeError(f"label is too long ({len(value)} characters, at most {MAX_LABEL})")
    if not value.isprintable():
        raise argparse.ArgumentTypeError(f"label {_shown(value)} contains control or undecodable characters")
    return value


def _path(value: str) -> str:
    if not value or "\0" in value:
        raise argparse.ArgumentTypeError("must be a non-empty path")
    return value


# ----------------------------------------------------------------------------- parser

class _UsageError(Exception):
    def __init__(self, prog: str, message: str) -> None:
        super().__init__(message)
        self.prog = prog


class _ParserExitError(Exception):
    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of calling sys.exit, so main() returns the code."""

    def error(self, message: str) -> NoReturn:
        raise _UsageError(self.prog, message)

    def exit(self, status: int = 0, message: str | None = None) -> NoReturn:
        if message:
            self._print_message(message, sys.stderr)
        raise _ParserExitError(status)


def _add_global_options(parser: argparse.ArgumentParser, *, in_subcommand: bool) -> None:
    """The global options, accepted before or after the subcommand.

    In a subcommand they default to SUPPRESS so an absent option does not overwrite the
    value given before the subcommand.
    """
    def default(value: object) -> object:
        return argparse.SUPPRESS if in_subcommand else value

    parser.add_argument("--config", metavar="FILE", type=_path, default=default(None),
                        help=f"configuration file (env VIRTSYNC_CONFIG; default {DEFAULT_CONFIG})")
    parser.add_argument("--socket", metavar="PATH", type=_path, default=default(None),
                        help=f"daemon socket (env VIRTSYNC_SOCKET, else [agent] socket, else {DEFAULT_SOCKET})")
    parser.add_argument("--json", action="store_true", default=default(False), help="print the result as JSON")
    parser.add_argument("--debug", action="store_true", default=default(False),
                        help="debug logging and tracebacks on errors")


def resolve_socket(args: argparse.Namespace) -> str:
    """--socket, then $VIRTSYNC_SOCKET, then ``[agent] socket`` in the config, then the default."""
    if args.socket:
        return str(args.socket)
    env = os.environ.get("VIRTSYNC_SOCKET")
    if env:
        return env
    path, explicit = config_path(args.config)
    # An unreadable or broken file is ignored (the daemon reports it): a user in the virtsync
    # group usually cannot read /etc/virtsync, and the default socket is then right.
    return config_mod.agent_path(path, "socket", explicit=explicit, tolerant=True) or DEFAULT_SOCKET


def config_path(given: str | None) -> tuple[str, bool]:
    """``--config``, else $VIRTSYNC_CONFIG, else the default; and whether it was named.
    (:data:`DEFAULT_CONFIG` is read here, at call time, so a test can point it elsewhere.)"""
    path, explicit = config_mod.config_path(given)
    return (path, True) if explicit else (DEFAULT_CONFIG, False)


# ----------------------------------------------------------------------------- commands

class Command:
    """One subcommand: its arguments, the request it sends, and how it prints the result."""

    name: ClassVar[str]
    help: ClassVar[str]
    #: The IPC operation sent (a name in :mod:`plugin.ops`); None: the command runs locally.
    op: ClassVar[str | None] = None

    def register(self, subparsers: argparse._SubParsersAction[_Parser]) -> argparse.ArgumentParser:
        parser = subparsers.add_parser(self.name, help=self.help, description=self.help)
        _add_global_options(parser, in_subcommand=True)
        self.add_arguments(parser)
        parser.set_defaults(command=self)
        return parser

    def sent_op(self) -> str:
        if self.op is None:
            raise TypeError(f"{type(self).__name__} sends nothing to the daemon: it must override run()")
        return self.op

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        """Subcommand arguments; none by default."""

    def request_args(self, args: argparse.Namespace) -> dict[str, Any]:
        """The ``args`` of the request; keys match the long options in snake_case."""
        return {}

    def run(self, args: argparse.Namespace) -> int:
        wait = bool(getattr(args, "wait", False))
        progress = ProgressRenderer(sys.stderr) if wait else None
        try:
            result = ipc.request(args.socket, self.sent_op(), self.request_args(args),
                                 timeout=WAIT_TIMEOUT if wait else REQUEST_TIMEOUT, on_progress=progress)
        finally:
            if progress is not None:
                progress.close()
        print_result(result, [] if args.json else self.render(result, args), args.json)
        return 0

    def render(self, result: object, args: argparse.Namespace) -> list[str]:
        """Readable text; unknown shapes fall back to JSON rather than failing."""
        message = _field(result, "message")
        if isinstance(message, str):
            return [one_line(message)]
        return [json.dumps(result, sort_keys=True, indent=2)]


class _DomainCommand(Command):
    """A command on one domain: ``virtsync NAME DOMAIN``."""

    done: ClassVar[str] = ""

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("domain", metavar="DOMAIN", type=_name("domain"), help="libvirt domain name")

    def request_args(self, args: argparse.Namespace) -> dict[str, Any]:
        return {"domain": args.domain}

    def render(self, result: object, args: argparse.Namespace) -> list[str]:
        if isinstance(_field(result, "message"), str) or not self.done:
            return super().render(result, args)
        return [f"{one_line(args.domain)}: {self.done}"]


class _ReplicaCommand(_DomainCommand):
    """A command on a domain's replica kept here: ``--from PEER`` picks one where peers share a name."""

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        super().add_arguments(parser)
        parser.add_argument("--from", dest="from_peer", metavar="PEER", type=_name("peer"),
                            help="the peer whose replica is meant, where replicas of several peers share the name")

    def request_args(self, args: argparse.Namespace) -> dict[str, Any]:
        request = super().request_args(args)
        if args.from_peer is not None:
            request["from"] = args.from_peer
        return request

"""The command table, the parser built from it, and :func:`main`."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence

from plugin.cli.base import Command, _add_global_options, _Parser, _ParserExitError, _UsageError, resolve_socket
from plugin.cli.hook import HookCommand
from plugin.cli.journal import (
    ApplyCommand,
    HoldCommand,
    MarkCommand,
    MarkersCommand,
    ReleaseCommand,
    RestoreCommand,
    VerifyCommand,
)
from plugin.cli.keys import KeysCommand
from plugin.cli.output import one_line, report_bug, report_error
from plugin.cli.pairs import PairsCommand, ProtectCommand, ResumeCommand, SuspendCommand, UnprotectCommand
from plugin.cli.status import StatusCommand
from plugin.cli.tracker import TrackerCommand
from plugin.errors import PluginError

COMMANDS: tuple[type[Command], ...] = (StatusCommand, ProtectCommand, UnprotectCommand, PairsCommand,
                                       SuspendCommand, ResumeCommand, MarkCommand, MarkersCommand,
                                       ApplyCommand, HoldCommand, ReleaseCommand, RestoreCommand, VerifyCommand,
                                       TrackerCommand, HookCommand, KeysCommand)


def build_parser() -> _Parser:
    parser = _Parser(prog="virtsync", description="Asynchronous replication of libvirt/QEMU domains.")
    _add_global_options(parser, in_subcommand=False)
    subparsers = parser.add_subparsers(metavar="COMMAND", dest="command_name", required=True)
    for command in COMMANDS:
        command().register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; return the exit code (0 ok, 1 failed, 2 bad usage or config, 130 ^C)."""
    parser = build_parser()
    debug = False
    try:
        try:
            args = parser.parse_args(argv)
        except _UsageError as e:
            print(f"virtsync: error: {one_line(str(e))} (see '{one_line(e.prog)} --help')", file=sys.stderr)
            return 2
        except _ParserExitError as e:
            return e.status
        debug = bool(args.debug)
        if debug:
            logging.basicConfig(level=logging.DEBUG, stream=sys.stderr, format="%(name)s: %(message)s")
        args.socket = resolve_socket(args)
        command: Command = args.command
        return command.run(args)
    except KeyboardInterrupt:
        return 130
    except PluginError as e:
        return report_error(e, e.exit_code, debug)
    except BrokenPipeError:
        # stdout went away (`virtsync pairs | head`): stop quietly, as the Python docs advise.
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return 1
    except Exception as e:
        return report_bug(e, debug)

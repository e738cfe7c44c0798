"""``virtsync hook install|uninstall``: local, without the daemon."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from plugin.cli import base
from plugin.cli.base import Command, _path
from plugin.cli.output import MAX_ERROR_LINE, print_result


class HookCommand(Command):
    """``virtsync hook install|uninstall [--dir DIR]``: runs locally, without the daemon.

    The hook gets the socket this CLI would use (--socket, $VIRTSYNC_SOCKET, ``[agent] socket``)
    and the spool ``<[agent] state_dir>/hook-spool.jsonl`` baked in, and this interpreter in
    its ``#!`` line. :mod:`plugin.hook` is imported here only, so other commands stay lean.
    """

    name = "hook"
    help = "install or remove the libvirt qemu hook (local; no daemon needed)"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("action", choices=("install", "uninstall"), help="what to do")
        parser.add_argument("--dir", metavar="DIR", type=_path, default="/etc/libvirt/hooks/qemu.d",
                            help="libvirt's qemu hook directory (default /etc/libvirt/hooks/qemu.d)")

    def run(self, args: argparse.Namespace) -> int:
        from plugin import hook

        if args.action == "uninstall":
            removed = hook.uninstall(args.dir)
            path = os.path.join(args.dir, hook.HOOK_NAME)
            result: dict[str, Any] = {"action": "uninstall", "path": path, "removed": removed}
            text = [f"removed {path}" if removed else f"no hook at {path}"]
        else:
            from plugin import config as config_mod

            path, explicit = base.config_path(args.config)
            # Not tolerant: a broken config must not bake a wrong spool path into the hook.
            state_dir = config_mod.agent_path(path, "state_dir", explicit=explicit, tolerant=False)
            spool = hook.spool_path(state_dir or config_mod.DEFAULT_STATE_DIR)
            socket_path = os.path.abspath(args.socket)
            target = hook.install(args.dir, socket_path=socket_path, spool=spool)
            result = {"action": "install", "path": str(target), "socket": socket_path, "spool": spool,
                      "interpreter": sys.executable}
            text = [f"installed {target}", f"  socket: {socket_path}", f"  spool:  {spool}",
                    "libvirtd reads hooks only at start or on SIGHUP: reload it (systemctl reload libvirtd)"]
        print_result(result, text, args.json, limit=MAX_ERROR_LINE)
        return 0

"""``virtsync keys init|import|show``: local, without the daemon."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from plugin.cli import base
from plugin.cli.base import Command, _add_global_options, _name, _path
from plugin.cli.output import one_line, print_result, table
from plugin.errors import ConfigError


class KeysCommand(Command):
    """``virtsync keys init|import|show``: TLS material in ``[agent] keys_dir``; runs locally,
    without the daemon (:mod:`plugin.keys` describes the files and how a pair is set up).

    No secret is ever printed: only paths and certificate fingerprints.
    """

    name = "keys"
    help = "TLS keys for the data and control links (local; no daemon needed)"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        actions = parser.add_subparsers(metavar="ACTION", dest="keys_action", required=True)
        init = actions.add_parser("init", help="this host's identity (if missing) and a new NBD key for PEER",
                                  description="Create this agent's key and certificate if missing, and the "
                                  "NBD pre-shared key shared with PEER if missing; print what to copy to PEER.")
        init.add_argument("peer", metavar="PEER", type=_name("peer"), help="peer agent name")
        init.add_argument("--renew", action="store_true",
                          help="replace this host's key and certificate (every peer must import the new one)")
        imp = actions.add_parser("import", help="pin PEER's certificate and/or take the NBD key PEER made",
                                 description="Pin PEER's certificate (its keys_dir/agent.crt) and/or store the "
                                 "NBD key that 'keys init' made on PEER (its keys_dir/<this host>/keys.psk).")
        imp.add_argument("peer", metavar="PEER", type=_name("peer"), help="peer agent name")
        imp.add_argument("--cert", metavar="FILE", type=_path, help="PEER's certificate (agent.crt)")
        imp.add_argument("--psk", metavar="FILE", type=_path, help="the pair's NBD key file (keys.psk)")
        actions.add_parser("show", help="this host's fingerprint and each peer's keys (no secret shown)")
        for sub in actions.choices.values():
            _add_global_options(sub, in_subcommand=True)

    def run(self, args: argparse.Namespace) -> int:
        from plugin import config as config_mod
        from plugin import keys

        path, _ = base.config_path(args.config)
        cfg = config_mod.load(path)
        kd = keys.KeysDir(cfg.keys_dir, cfg.name)
        result: dict[str, Any] = {"keys_dir": cfg.keys_dir, "name": cfg.name}
        text: list[str] = []
        if args.keys_action == "show":
            result["fingerprint"] = kd.fingerprint()
            peers = []
            names = set(cfg.peers)
            if os.path.isdir(cfg.keys_dir):
                names |= {n for n in os.listdir(cfg.keys_dir) if os.path.isdir(os.path.join(cfg.keys_dir, n))
                          and not n.startswith(".") and n != cfg.name}
            for peer_name in sorted(names):
                entry: dict[str, Any] = {"peer": peer_name, "configured": peer_name in cfg.peers,
                                         "insecure_plain": peer_name in cfg.peers and cfg.peers[peer_name].insecure_plain}
                try:
                    with open(kd.peer_cert_path(peer_name)) as f:
                        entry["cert_fingerprint"] = keys.fingerprint(f.read())
                except (OSError, ValueError, keys.KeyFileError):
                    entry["cert_fingerprint"] = None
                try:
                    kd.peer_psk(peer_name)
                    entry["nbd_key"] = "ok"
                except keys.KeyFileError as e:
                    entry["nbd_key"] = "missing" if "no NBD key" in str(e) else f"unusable: {e}"
                peers.append(entry)
            result["peers"] = peers
            text.append(f"{cfg.name}: {result['fingerprint'] or 'no identity yet (virtsync keys init PEER)'}")
            text += table(("PEER", "CERTIFICATE", "NBD KEY", "NOTE"), [
                [p["peer"], p["cert_fingerprint"] or "not pinned", p["nbd_key"],
                 "insecure_plain" if p["insecure_plain"] else ("" if p["configured"] else "not in config")]
                for p in peers]) if peers else ["no peers"]
        else:
            peer_name = args.peer
            kd.peer_dir(peer_name)  # refuses this host's own name
            if peer_name not in cfg.peers:
                print(f"virtsync: note: {one_line(peer_name)} is not a peer in {one_line(path)} yet", file=sys.stderr)
            if args.keys_action == "import" and not (args.cert or args.psk):
                raise ConfigError("keys import needs --cert FILE, --psk FILE or both")
            created = kd.ensure_identity(renew=bool(getattr(args, "renew", False)))
            result.update(fingerprint=kd.fingerprint(), identity_created=created, cert=kd.cert_path)
            text.append(f"identity: {kd.cert_path} ({'created' if created else 'exists'}) {result['fingerprint']}")
            if args.keys_action == "init":
                made = kd.ensure_psk(peer_name)
                result.update(psk=kd.psk_path(peer_name), psk_created=made)
                text += [f"NBD key for {peer_name}: {kd.psk_path(peer_name)} "
                         f"({'created' if made else 'exists'}; secret, not shown)",
                         f"next: copy {kd.cert_path} and {kd.psk_path(peer_name)} to {peer_name} over a "
                         f"secure channel (scp) and run there:",
                         f"  virtsync keys import {cfg.name} --cert FILE --psk FILE"]
                if not os.path.exists(kd.peer_cert_path(peer_name)):
                    text.append(f"then pin {peer_name}'s certificate here: "
                                f"virtsync keys import {peer_name} --cert FILE")
            else:
                if args.cert:
                    fp, changed = kd.import_cert(peer_name, args.cert)
                    result.update(peer_cert=kd.peer_cert_path(peer_name), peer_fingerprint=fp, cert_changed=changed)
                    text.append(f"{peer_name}: certificate {fp} pinned in {kd.peer_cert_path(peer_name)}"
                                + ("" if changed else " (unchanged)"))
                if args.psk:
                    changed = kd.import_psk(peer_name, args.psk)
                    result.update(psk=kd.psk_path(peer_name), psk_changed=changed)
                    text.append(f"{peer_name}: NBD key stored in {kd.psk_path(peer_name)}"
                                + ("" if changed else " (unchanged)") + "; secret, not shown")
            text.append("restart the agent to use new keys; compare fingerprints with 'virtsync keys show' on both hosts")
        print_result(result, text, args.json, limit=1000)
        return 0

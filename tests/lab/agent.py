"""virtsyncd agents on lab hosts: each runs inside its host's network
namespace, so it binds the host's lab address and reaches its peer over the
veth (which tests can cut).

Links are TLS by default, as in production: each LabAgent runs the real
``virtsync keys`` commands for its host and, once its peer's agent exists too,
pins the two certificates and hands the NBD key across (what an admin does with
scp, :mod:`plugin.keys`). ``tls=False`` writes ``insecure_plain = true`` instead."""

from __future__ import annotations

import contextlib
import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from plugin import cli, hook, ipc

from . import procs
from .host import LabHost

PEER_PORT = 8441
NBD_PORT = 10809


class LabAgent:
    """One agent; its state and replicas live under the host's root dir."""

    def __init__(self, host: LabHost, peers: dict[str, LabHost], journal: dict[str, Any] | None = None,
                 agent: dict[str, Any] | None = None, tls: bool = True, storage: str | Path | None = None,
                 **replication: Any) -> None:
        """:param storage: where replicas live (default: under the host's root)"""
        self.host = host
        self.dir = Path(host.root) / "virtsync"
        self._storage = Path(storage) if storage is not None else self.dir / "replicas"
        self.dir.mkdir(mode=0o700, exist_ok=True)
        self.socket = str(self.dir / "agent.sock")
        self.config = self.dir / "virtsync.toml"
        self.log = self.dir / "agent.log"
        self.proc: subprocess.Popen[bytes] | None = None
        lines = [
            "[agent]",
            f'name = "{host.name}"',
            f'listen = "{host.address}:{PEER_PORT}"',
            f'socket = "{self.socket}"',
            f'state_dir = "{self.dir / "state"}"',
            f'libvirt_uri = "{host.uri}"',
            f'keys_dir = "{self.keys_dir}"',
            *(f"{k} = {v!r}" for k, v in (agent or {}).items()),
            "[replication]",
            f'address = "{host.address}"',
            f"port = {NBD_PORT}",
            f'storage = "{self.storage}"',
            *(f"{k} = {v!r}" for k, v in replication.items()),
            "[journal]",
            *(f"{k} = {v!r}" for k, v in (journal or {}).items()),
        ]
        for name, peer in peers.items():
            lines += [f"[peers.{name}]", f'address = "{peer.address}:{PEER_PORT}"']
            if not tls:
                lines.append("insecure_plain = true")
        self.config.write_text("\n".join(lines) + "\n")
        if tls:
            for name, peer in peers.items():
                self._pair_keys(name, peer)

    @property
    def keys_dir(self) -> Path:
        return self.dir / "keys"

    def keys(self, *argv: str, config: Path | None = None) -> str:
        """``virtsync keys ARGV`` for this agent's config (or another's), in-process; its stdout."""
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = cli.main(["keys", *argv, "--config", str(config or self.config)])
        if code:
            raise RuntimeError(f"virtsync keys {' '.join(argv)} failed ({code}): {err.getvalue().strip()}")
        return out.getvalue()

    def _pair_keys(self, name: str, peer: LabHost) -> None:
        """Keys with peer ``name``: ours now; the exchange once both agents exist (either order)."""
        peer_config = Path(peer.root) / "virtsync" / "virtsync.toml"
        peer_keys = Path(peer.root) / "virtsync" / "keys"
        if not (peer_config.exists() and (peer_keys / "agent.crt").exists()):
            self.keys("init", name)  # our identity and the pair's NBD key; the peer takes them later
            return
        theirs = peer_keys / self.host.name / "keys.psk"
        if theirs.exists():
            self.keys("import", name, "--cert", str(peer_keys / "agent.crt"), "--psk", str(theirs))
        else:
            self.keys("import", name, "--cert", str(peer_keys / "agent.crt"))
            self.keys("init", name)
            self.keys("import", self.host.name, "--psk", str(self.keys_dir / name / "keys.psk"), config=peer_config)
        self.keys("import", self.host.name, "--cert", str(self.keys_dir / "agent.crt"), config=peer_config)

    @property
    def storage(self) -> Path:
        return self._storage

    def install_hook(self) -> None:
        """libvirt's hook for this agent in its host (as ``virtsync hook install``); before
        :meth:`start`. libvirtd reads its hooks at start: it is restarted (guests keep running)."""
        hook.install(str(self.host.root / "etc/libvirt/hooks/qemu.d"), socket_path=self.socket,
                     spool=hook.spool_path(str(self.dir / "state")))
        self.host.kill_libvirtd(signal.SIGTERM)
        self.host.restart_libvirtd()

    def start(self, timeout: float = 20.0, fault: str | None = None) -> None:
        """Start the agent; ``fault`` names a crash point (plugin/faults.py)."""
        argv = ["ip", "netns", "exec", self.host.netns, sys.executable, "-m", "plugin.daemon",
                "--config", str(self.config), "--debug"]
        root = str(Path(__file__).resolve().parents[2])
        env = dict(os.environ, PYTHONPATH=root)
        env.pop("VIRTSYNC_FAULT", None)
        if fault:
            env["VIRTSYNC_FAULT"] = fault
        self.proc = procs.spawn(argv, log_path=str(self.log), env=env, cwd=root)
        deadline = time.monotonic() + timeout
        while True:
            try:
                ipc.request(self.socket, "status", {}, timeout=5)
                return
            except Exception:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"agent on {self.host.name} did not start:\n{self.tail()}") from None
                time.sleep(0.1)

    def call(self, op: str, timeout: float = 120.0, **args: Any) -> Any:
        return ipc.request(self.socket, op, args, timeout=timeout)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None:
            procs.end(self.proc, sig=sig, timeout=15)

    def wait_dead(self, timeout: float = 30.0) -> int:
        """Wait for an agent that is meant to die (a fault point); its exit code."""
        assert self.proc is not None
        code = self.proc.wait(timeout)
        procs.end(self.proc)
        return code

    def tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no agent log)"

"""virtsyncd: the agent. Composition root: the only module that knows every service.

It builds the parts from ``Config`` (plugin/agent/parts.py), starts them in order and
stops them in reverse: the lock on the state dir, store, storage daemon, NBD servers,
secondary, peer API, libvirt connection and its events, the services (tracking,
protection with its supervisors, journal, status), the IPC server, the spool replay.
Each service registers its IPC operations in one :class:`ipc.Router`; this module holds
no operation logic. A new capability is a new module plus one line in :meth:`Agent.__init__`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import ssl
import sys
from collections.abc import Sequence
from typing import Any

from . import config as config_mod
from . import ipc, paths, peer, peer_api
from .agent.group import Protected
from .agent.journal import Journal
from .agent.parts import Parts
from .agent.protection import ProtectionService
from .agent.status import Status
from .agent.supervisor import Supervision
from .agent.tracking import Tracking
from .config import Config
from .errors import PluginError
from .replication.secondary import Secondary
from .state import Store
from .virt import events
from .virt.connection import close_connection, open_connection, shutdown_events

log = logging.getLogger("virtsync.daemon")
__all__ = ["Agent", "Protected", "main", "run_agent"]


class Agent:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.parts = Parts(cfg)
        self.tracking = Tracking(self.parts)
        self.supervision = Supervision(self.parts, self.tracking)
        self.protection = ProtectionService(self.parts, self.supervision, self.tracking)
        self.journal = Journal(self.parts)
        self.status = Status(self.parts, self.protection)
        self.router = ipc.Router()
        for service in (self.protection, self.journal, self.tracking, self.status):
            self.router.register(service.operations())
        self._runners: list[Any] = []

    # The parts as tests and the lab see them.
    @property
    def store(self) -> Store | None:
        return self.parts.store

    @store.setter
    def store(self, store: Store | None) -> None:
        self.parts.store = store

    @property
    def secondary(self) -> Secondary | None:
        return self.parts.secondary

    @secondary.setter
    def secondary(self, secondary: Secondary | None) -> None:
        self.parts.secondary = secondary

    @property
    def nbd(self) -> Any:
        return self.parts.nbd

    @property
    def protected(self) -> dict[str, Protected]:
        return self.parts.protected

    # -- lifecycle ---------------------------------------------------------------

    async def start(self) -> None:
        parts, cfg = self.parts, self.cfg
        parts.take_lock()  # first: a second agent on this state dir changes nothing
        os.chmod(cfg.state_dir, 0o700)  # replicas, journal and the database: nobody else's business
        ipc.check_socket_path(cfg.socket)
        server_ssl, identify = self._setup_links()
        parts.store = Store(cfg.db_path)
        paths.ensure_dir(cfg.storage, "replication.storage")
        await parts.qsd.start()
        parts.configure_nbd()
        await parts.nbd.start()
        parts.secondary = Secondary(cfg, parts.store, parts.nbd)
        await parts.secondary.recover()
        app = peer.make_app(self._peer_handlers(), identify)
        self._runners.append(await peer.start_server(app, cfg.listen_host, cfg.listen_port, server_ssl))
        parts.conn = await open_connection(cfg.libvirt_uri)
        parts.watch_libvirt(parts.conn)
        self.tracking.start()
        self.journal.start()
        await self.protection.start()
        os.makedirs(os.path.dirname(cfg.socket) or ".", mode=0o755, exist_ok=True)
        self._runners.append(await ipc.serve(cfg.socket, self.handle, mode=0o660, group=self._socket_group()))
        await self.tracking.replay_spool()
        log.info("virtsyncd %s ready: peers API on %s:%s, NBD for %s", cfg.name, cfg.listen_host,
                 cfg.listen_port, parts.nbd.describe())

    async def stop(self) -> None:
        parts = self.parts
        await self.tracking.stop()
        await self.journal.stop()
        await parts.stop_reconnect()
        if parts.conn is not None:
            events.deregister(parts.conn, parts.event_ids)
        await self.protection.stop()
        for runner in reversed(self._runners):
            if isinstance(runner, asyncio.AbstractServer):
                runner.close()
                with contextlib.suppress(Exception):
                    await runner.wait_closed()
            else:
                await runner.cleanup()
        for client in parts.peers.values():
            await client.close()
        await parts.nbd.stop()
        await parts.qsd.stop()
        if parts.conn is not None:
            await close_connection(parts.conn)
            await shutdown_events()
        if parts.store is not None:
            parts.store.close()
        ipc.remove_own_socket(self.cfg.socket)  # only the one this agent made: never another agent's

    def _take_lock(self) -> None:
        self.parts.take_lock()

    def _setup_links(self) -> tuple[ssl.SSLContext | None, peer.Identify]:
        return self.parts.setup_links()

    def _socket_group(self) -> str | None:
        return self.parts.socket_group()

    # -- peer API (secondary role) and local API (CLI, hook) ----------------------

    def _peer_handlers(self) -> dict[str, Any]:
        return peer_api.replica_handlers(self.cfg.name, self.parts.sec)

    async def handle(self, op: str, args: dict[str, Any]) -> Any:
        return await self.router(op, args)

    # Reached by unit tests that drive one operation or helper directly.
    def _replica(self, args: dict[str, Any]) -> str:
        return self.journal._replica(args)

    def _pairs_json(self, uuid: str | None = None, down: dict[str, str] | None = None) -> list[dict[str, Any]]:
        return self.protection.pairs_json(uuid, down)

    async def op_mark(self, args: dict[str, Any]) -> Any:
        return await self.protection.op_mark(args)


async def run_agent(cfg: Config) -> None:
    agent = Agent(cfg)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await agent.start()
        await stop.wait()
    finally:
        await agent.stop()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="virtsyncd", description="the virtsync agent (runs in the foreground)")
    parser.add_argument("--config", default=os.environ.get("VIRTSYNC_CONFIG", config_mod.DEFAULT_PATH))
    parser.add_argument("--debug", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        cfg = config_mod.load(args.config)
        asyncio.run(run_agent(cfg))
    except PluginError as e:
        print(f"{type(e).__name__}: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

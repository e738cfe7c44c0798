"""The parts every service shares, built by the composition root from ``Config``.

The store, the storage daemon, the NBD servers, the secondary, the peer clients with
their keys, the libvirt connection (watched, and made again when libvirtd restarts),
the table of protected groups, and the tracker's event queue. Services read them
here; none owns another's.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import grp
import logging
import os
import ssl
from typing import Any

from .. import keys as keys_mod
from .. import paths, peer
from ..config import Config
from ..errors import ConfigError, PluginError, StateConflictError, VirtError
from ..replication import offline
from ..replication.nbd_servers import PeerServers
from ..replication.secondary import Secondary
from ..replication.shipper import NbdTls
from ..replication.storage_daemon import StorageDaemon
from ..state import Store
from ..virt import domains, events
from ..virt.connection import close_connection, is_alive, open_connection, watch_close
from .group import MAX_BACKOFF, Protected

log = logging.getLogger("virtsync.daemon")


class Parts:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.store: Store | None = None
        run_dir = os.path.join(cfg.state_dir, "run")
        self.qsd = StorageDaemon(run_dir)  # ships this host's cycles: an NBD client only
        # NBD servers of the secondary role: one per peer, each knowing that peer's key only.
        self.nbd = PeerServers(os.path.join(run_dir, "nbd"), cfg.replication_address, cfg.replication_port,
                               list(cfg.peers), tls_priority=cfg.tls_priority)
        self._server_psks: dict[str, str] | None = None
        self._unserved: dict[str, str] = {}
        self.secondary: Secondary | None = None
        # Clients with their TLS contexts are made at start(), from the keys (setup_links).
        self.peers: dict[str, peer.PeerClient] = {}
        self._nbd_tls: dict[str, NbdTls] = {}
        self.conn: Any = None  # libvirt.virConnect, owned through plugin.virt
        self.protected: dict[str, Protected] = {}
        self._lock_fd: int | None = None
        self.events: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
        self._event_ids: list[int] = []
        self._reconnect_task: asyncio.Task[None] | None = None
        self.offline = offline.OfflineShips()  # ships of stopped domains' last writes

    def setup_links(self) -> tuple[ssl.SSLContext | None, peer.Identify]:
        """Peer clients, the peer API's server context and caller identification, and the
        qemu-storage-daemon's PSK file, from ``keys_dir``. A peer whose keys are missing
        stays unusable (each call says what to run); a missing identity stops the agent.

        :raise KeyFileError: no identity of this agent, or one certificate pinned for two peers
        """
        if not self.cfg.tls:
            log.warning("TLS is off: every peer is insecure_plain; peer API and NBD run in plain text")
            self.peers = {name: peer.PeerClient(spec, None) for name, spec in self.cfg.peers.items()}
            return None, peer.address_identity(self.cfg.peers.values())
        kd = keys_mod.KeysDir(self.cfg.keys_dir, self.cfg.name)
        kd.check_identity()
        pins: dict[str, str] = {}
        pinned: list[str] = []
        psks: dict[str, str] = {}
        for name, spec in self.cfg.peers.items():
            try:
                keys = kd.peer(name)
            except keys_mod.KeyFileError as e:
                log.error("peer %s cannot be used: %s", name, e)
                self._unserved[name] = str(e)
                self.peers[name] = peer.PeerClient(spec, None, unusable=str(e))
                continue
            if keys.cert_fingerprint in pins:
                raise keys_mod.KeyFileError(f"the same certificate is pinned for peers {pins[keys.cert_fingerprint]} "
                                            f"and {name}: each peer has its own")
            pins[keys.cert_fingerprint] = name
            pinned.append(keys.cert_pem)
            psks[name] = keys.psk
            self.peers[name] = peer.PeerClient(spec, peer.client_context(kd.cert_path, kd.key_path, keys.cert_pem))
            self._nbd_tls[name] = NbdTls(keys.psk_dir, self.cfg.name, self.cfg.tls_priority)
            log.info("peer %s: certificate %s pinned", name, keys.cert_fingerprint)
        self._server_psks = psks
        return peer.server_context(kd.cert_path, kd.key_path, pinned), peer.tls_identity(pins)

    def link_tls(self, peer_name: str) -> NbdTls | None:
        """The NBD TLS of links to ``peer_name``; None only when links are plain by config."""
        if not self.cfg.tls:
            return None
        tls = self._nbd_tls.get(peer_name)
        if tls is None:
            client = self.peers.get(peer_name)
            raise keys_mod.KeyFileError(client.unusable if client is not None and client.unusable
                                        else f"no NBD key for peer {peer_name}")
        return tls

    def socket_group(self) -> str | None:
        """``[agent] socket_group``, else ``libvirt`` where that group exists (virsh users)."""
        if self.cfg.socket_group is not None:
            return self.cfg.socket_group
        try:
            grp.getgrnam("libvirt")
        except KeyError:
            return None
        return "libvirt"

    def take_lock(self) -> None:
        paths.ensure_dir(self.cfg.state_dir, "agent.state_dir")
        lock = os.path.join(self.cfg.state_dir, "agent.lock")
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise ConfigError(f"cannot open the lock file {lock}: {e.strerror or e}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ConfigError(f"another virtsyncd already uses {self.cfg.state_dir}") from None
        self._lock_fd = fd

    def watch_libvirt(self, conn: Any) -> None:
        self._event_ids = events.register(conn, self.events, self._on_lifecycle)
        watch_close(conn, self.libvirt_lost)

    def _on_lifecycle(self, uuid: str, what: str) -> None:
        """A domain's QEMU started or stopped: its supervisor looks again (a pause
        changes nothing: cycles run on a paused domain)."""
        p = self.protected.get(uuid)
        if p is not None and what in ("started", "stopped"):
            p.attached = False
            p.wake.set()

    def libvirt_lost(self, reason: str) -> None:
        if self._reconnect_task is None or self._reconnect_task.done():
            self._reconnect_task = asyncio.get_running_loop().create_task(self._reconnect(reason),
                                                                          name="vs-libvirt-reconnect")

    async def _reconnect(self, reason: str) -> None:
        """Open a new connection with backoff, register the events again, and let
        every supervisor re-attach (QMP through the old connection is dead)."""
        old, self.conn = self.conn, None
        log.warning("libvirt connection lost (%s): reconnecting to %s", reason, self.cfg.libvirt_uri)
        for p in self.protected.values():
            p.attached = False
        if old is not None:
            events.deregister(old, self._event_ids)
            self._event_ids = []
            await close_connection(old)
        backoff = 0.5
        while True:
            try:
                conn = await open_connection(self.cfg.libvirt_uri)
                self.watch_libvirt(conn)
                break
            except PluginError as e:
                log.info("libvirt reconnect: %s; retrying in %gs", e, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF / 3)
        self.conn = conn
        log.info("libvirt connection back: %s", self.cfg.libvirt_uri)
        for p in self.protected.values():
            p.attached = False
            p.wake.set()
            self.events.put_nowait((p.uuid, "libvirt reconnected"))

    def sec(self) -> Secondary:
        assert self.secondary is not None
        return self.secondary

    def libvirt(self) -> Any:
        """The libvirt connection; refused in one line while it is being made again."""
        if self.conn is None:
            raise VirtError(f"libvirt connection to {self.cfg.libvirt_uri} lost: reconnecting, try again shortly")
        return self.conn

    def db(self) -> Store:
        assert self.store is not None
        return self.store

    def find(self, name: str) -> Protected:
        for p in self.protected.values():
            if p.name == name:
                return p
        raise StateConflictError(f"domain {name!r} is not protected on this host", state="unprotected",
                                 required="protected")

    async def domain_state(self, p: Protected) -> tuple[bool, str] | None:
        """Whether the domain's QEMU runs (paused counts), with libvirt's reason;
        None while libvirt cannot be asked (the connection is being re-made)."""
        conn = self.conn
        if conn is None:
            return None
        try:
            dom = await domains.lookup_uuid(conn, p.uuid)
            return await domains.qemu_state(dom)
        except VirtError:
            if not await asyncio.to_thread(is_alive, conn):
                self.libvirt_lost("the connection is dead")
                return None
            raise

    def last_cut(self, uuid: str) -> float | None:
        for row in self.db().cycles(uuid, limit=50):
            if row["finished"] and not row["error"]:
                return float(row["started"])
        return None

    def not_running_error(self, p: Protected, why: str) -> StateConflictError:
        return StateConflictError(f"{p.name} is not running ({why}): start it to cut a marker",
                                  state="stopped", required="running")

    def configure_nbd(self) -> None:
        self.nbd.configure(self._server_psks, self._unserved)

    @property
    def event_ids(self) -> list[int]:
        return self._event_ids

    async def stop_reconnect(self) -> None:
        task = self._reconnect_task
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

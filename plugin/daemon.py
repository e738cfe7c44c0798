"""virtsyncd: the agent. Composition root: the only module that imports everything.

One asyncio loop runs: the peer API (for the secondary role), the local IPC
socket (CLI and hook), the libvirt connection and one supervisor task per
protected domain (primary role) that runs its cycles and retries with backoff.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import grp
import logging
import os
import signal
import ssl
import sys
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from qemu_blockdev import BlockdevError

from . import config as config_mod
from . import faults, hook, ipc, paths, peer, peer_api, tracker
from . import keys as keys_mod
from .config import Config
from .domain import DiskSpec, PairEvent, PairState, Protection, label_problem, next_state, severity
from .errors import ConfigError, PluginError, StateConflictError, VirtError
from .replication import offline
from .replication.nbd_servers import PeerServers
from .replication.primary import CutRefusedError, CycleError, DomainReplicator, resolve_nodes
from .replication.secondary import Secondary
from .replication.shipper import NbdTls
from .replication.storage_daemon import StorageDaemon
from .requests import UsageError, arg
from .state import Store
from .tracker import ChangeKind, DiskEntry
from .virt import domains, events
from .virt.connection import close_connection, is_alive, open_connection, shutdown_events, watch_close
from .virt.qmp_bridge import LibvirtQmpTransport

log = logging.getLogger("virtsync.daemon")
# States of pairs whose cycles run (or are retried).
_LIVE = frozenset({PairState.INITIAL_COPY, PairState.ACTIVE, PairState.BEHIND, PairState.DISCONNECTED,
                   PairState.ERROR})
PRIMARY = "primary"
MAX_BACKOFF = 30.0


@dataclass
class MarkRequest:
    label: str
    apply: bool
    done: asyncio.Future[dict[str, Any]]
    quiesce: bool = False               # freeze the guest's filesystems for the cut
    crash_consistent_ok: bool = False   # no agent answered: cut without freeze instead of refusing


class Quiesce:
    """The freeze around one cut: ``before_cut``/``after_cut`` of :meth:`DomainReplicator.cycle`.

    Without an answering guest agent ``before_cut`` refuses the cut, unless
    crash-consistent is acceptable: then the cut goes on and ``quiesced`` stays False.
    """

    def __init__(self, dom: Any, name: str, crash_consistent_ok: bool) -> None:
        self.dom = dom
        self.name = name
        self.crash_consistent_ok = crash_consistent_ok
        self.quiesced = False
        self.fallback: str | None = None   # why the marker is only crash-consistent
        self.frozen_ms: float | None = None  # from the freeze request to the thaw's answer
        self.thaw_error: str | None = None  # the guest may still be frozen: said loudly
        self._thaw = False
        self._t0 = 0.0

    async def before_cut(self) -> None:
        self._t0 = time.monotonic()
        try:
            await domains.fs_freeze(self.dom)
        except domains.GuestAgentError as e:
            self._thaw = e.reached_guest   # it may have frozen before the answer was lost
            reason = f"{self.name}: no guest agent answered ({_agent_reason(e)})"
            if not self.crash_consistent_ok:
                raise domains.GuestAgentError(
                    f"{reason}: marker not taken; use --crash-consistent-ok to take a crash-consistent "
                    "marker instead", e.code, reached_guest=e.reached_guest) from e
            self.fallback = str(e)
            log.getChild(self.name).warning("%s: taking a crash-consistent marker (--crash-consistent-ok)", reason)
            return
        except PluginError as e:
            self._thaw = True
            if not self.crash_consistent_ok:
                raise PluginError(f"{self.name}: the guest agent could not freeze the filesystems "
                                  f"({_agent_reason(e)}): marker not taken; use --crash-consistent-ok to take a "
                                  "crash-consistent marker instead") from e
            self.fallback = str(e)
            log.getChild(self.name).warning("%s: freeze failed (%s): taking a crash-consistent marker", self.name, e)
            return
        self._thaw = True
        self.quiesced = True

    async def after_cut(self) -> None:
        if not self._thaw:
            return
        try:
            await domains.fs_thaw(self.dom)
            if self.quiesced:
                self.frozen_ms = round((time.monotonic() - self._t0) * 1000, 1)
        except PluginError as e:
            if self.quiesced:
                self.thaw_error = str(e)
                log.getChild(self.name).error("THAW FAILED, the guest's filesystems may stay frozen: %s", e)
            else:
                log.getChild(self.name).info("thaw after a failed freeze: %s", e)


def _peer_unreachable(e: BaseException) -> bool:
    """Whether a cycle failed because the peer could not be reached (anywhere in the chain)."""
    seen: BaseException | None = e
    while seen is not None:
        if isinstance(seen, peer.PeerUnreachableError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _agent_reason(e: PluginError) -> str:
    """libvirt's words, without our ``domain X: freeze:`` prefix."""
    text = str(e)
    for prefix in ("freeze: ", "thaw: "):
        if prefix in text:
            text = text.split(prefix, 1)[1]
    return text


@dataclass
class Protected:
    """A domain this host replicates as primary, and its supervisor."""

    uuid: str
    name: str
    replicator: DomainReplicator
    qmp: LibvirtQmpTransport
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    marks: list[MarkRequest] = field(default_factory=list)
    task: asyncio.Task[None] | None = None
    first_marker: asyncio.Event = field(default_factory=asyncio.Event)
    # Held by a cycle, and by the tracker while it changes the disk set.
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    # The domain's QEMU as the supervisor last saw it: None before the first look.
    running: bool | None = None
    # qmp and the replicator's node names belong to the QEMU that runs now.
    attached: bool = False
    # _domain_stopped has run for the current stop (it is retried until it has).
    stop_handled: bool = False
    unreachable_since: float | None = None  # first failed cycle of the current peer outage


class Agent:
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
        # Clients with their TLS contexts are made at start(), from the keys (_setup_links).
        self.peers: dict[str, peer.PeerClient] = {}
        self._nbd_tls: dict[str, NbdTls] = {}
        self.conn: Any = None  # libvirt.virConnect, owned through plugin.virt
        self.protected: dict[str, Protected] = {}
        self._runners: list[Any] = []
        self._lock_fd: int | None = None
        self._events: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
        self._event_ids: list[int] = []
        self._tracker_task: asyncio.Task[None] | None = None
        self._reconnect_task: asyncio.Task[None] | None = None
        self._delay_task: asyncio.Task[None] | None = None
        self._offline = offline.OfflineShips()  # ships of stopped domains' last writes
        self._scrub_task: asyncio.Task[None] | None = None

    # -- lifecycle ---------------------------------------------------------------

    async def start(self) -> None:
        self._take_lock()  # first: a second agent on this state dir changes nothing
        os.chmod(self.cfg.state_dir, 0o700)  # replicas, journal and the database: nobody else's business
        ipc.check_socket_path(self.cfg.socket)
        server_ssl, identify = self._setup_links()
        self.store = Store(self.cfg.db_path)
        paths.ensure_dir(self.cfg.storage, "replication.storage")
        await self.qsd.start()
        self.nbd.configure(self._server_psks, self._unserved)
        await self.nbd.start()
        self.secondary = Secondary(self.cfg, self.store, self.nbd)
        await self.secondary.recover()
        app = peer.make_app(self._peer_handlers(), identify)
        self._runners.append(await peer.start_server(app, self.cfg.listen_host, self.cfg.listen_port, server_ssl))
        self.conn = await open_connection(self.cfg.libvirt_uri)
        self._watch_libvirt(self.conn)
        self._tracker_task = asyncio.create_task(self._tracker_loop(), name="vs-tracker")
        if self.cfg.apply_delay > 0:
            self._delay_task = asyncio.create_task(self._apply_delayed_loop(), name="vs-apply-delay")
        if self.cfg.scrub_interval > 0:
            self._scrub_task = asyncio.create_task(self.secondary.run_scrubs(), name="vs-scrub")
        for prot in self.store.protections(PRIMARY):
            try:
                await self._supervise(prot["domain_uuid"])
            except PluginError as e:
                log.error("cannot resume protection of %s: %s", prot["domain"], e)
                self.store.transition(prot["domain_uuid"], PRIMARY, PairEvent.CYCLE_FAILED, str(e))
        os.makedirs(os.path.dirname(self.cfg.socket) or ".", mode=0o755, exist_ok=True)
        self._runners.append(await ipc.serve(self.cfg.socket, self.handle, mode=0o660,
                                             group=self._socket_group()))
        self._replay_spool()
        log.info("virtsyncd %s ready: peers API on %s:%s, NBD for %s", self.cfg.name, self.cfg.listen_host,
                 self.cfg.listen_port, self.nbd.describe())

    def _setup_links(self) -> tuple[ssl.SSLContext | None, peer.Identify]:
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

    def _link_tls(self, peer_name: str) -> NbdTls | None:
        """The NBD TLS of links to ``peer_name``; None only when links are plain by config."""
        if not self.cfg.tls:
            return None
        tls = self._nbd_tls.get(peer_name)
        if tls is None:
            client = self.peers.get(peer_name)
            raise keys_mod.KeyFileError(client.unusable if client is not None and client.unusable
                                        else f"no NBD key for peer {peer_name}")
        return tls

    def _socket_group(self) -> str | None:
        """``[agent] socket_group``, else ``libvirt`` where that group exists (virsh users)."""
        if self.cfg.socket_group is not None:
            return self.cfg.socket_group
        try:
            grp.getgrnam("libvirt")
        except KeyError:
            return None
        return "libvirt"

    def _take_lock(self) -> None:
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

    # -- the libvirt connection: watched, and made again when libvirtd restarts ----

    def _watch_libvirt(self, conn: Any) -> None:
        self._event_ids = events.register(conn, self._events, self._on_lifecycle)
        watch_close(conn, self._libvirt_lost)

    def _on_lifecycle(self, uuid: str, what: str) -> None:
        """A domain's QEMU started or stopped: its supervisor looks again (a pause
        changes nothing: cycles run on a paused domain)."""
        p = self.protected.get(uuid)
        if p is not None and what in ("started", "stopped"):
            p.attached = False
            p.wake.set()

    def _libvirt_lost(self, reason: str) -> None:
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
                self._watch_libvirt(conn)
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
            self._events.put_nowait((p.uuid, "libvirt reconnected"))

    async def stop(self) -> None:
        for task in (self._tracker_task, self._delay_task, self._reconnect_task, self._scrub_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self.conn is not None:
            events.deregister(self.conn, self._event_ids)
        # No local keeps a Protected: their libvirt domains hold the connection open (close_connection).
        for uuid in list(self.protected):
            await self._stop_supervisor(self.protected[uuid])
            await self.protected.pop(uuid).qmp.close()
        for runner in reversed(self._runners):
            if isinstance(runner, asyncio.AbstractServer):
                runner.close()
                with contextlib.suppress(Exception):
                    await runner.wait_closed()
            else:
                await runner.cleanup()
        for client in self.peers.values():
            await client.close()
        await self.nbd.stop()
        await self.qsd.stop()
        if self.conn is not None:
            await close_connection(self.conn)
            await shutdown_events()
        if self.store is not None:
            self.store.close()
        ipc.remove_own_socket(self.cfg.socket)  # only the one this agent made: never another agent's

    # -- peer API (secondary role) ----------------------------------------------

    def _peer_handlers(self) -> dict[str, Any]:
        return peer_api.replica_handlers(self.cfg.name, self._sec)

    def _sec(self) -> Secondary:
        assert self.secondary is not None
        return self.secondary

    def _libvirt(self) -> Any:
        """The libvirt connection; refused in one line while it is being made again."""
        if self.conn is None:
            raise VirtError(f"libvirt connection to {self.cfg.libvirt_uri} lost: reconnecting, try again shortly")
        return self.conn

    def _store(self) -> Store:
        assert self.store is not None
        return self.store

    # -- local API (CLI) --------------------------------------------------------

    async def handle(self, op: str, args: dict[str, Any]) -> Any:
        handlers = {
            "status": self.op_status, "protect": self.op_protect, "unprotect": self.op_unprotect,
            "pairs": self.op_pairs, "suspend": self.op_suspend, "resume": self.op_resume,
            "mark": self.op_mark, "markers": self.op_markers, "apply": self.op_apply, "hold": self.op_hold,
            "release": self.op_release, "restore": self.op_restore, "tracker": self.op_tracker,
            "hook": self.op_hook, "verify": self.op_verify,
        }
        if op not in handlers:
            raise ipc.UnknownOperationError(f"unknown operation {op!r}")
        return await handlers[op](args)

    def _find(self, name: str) -> Protected:
        for p in self.protected.values():
            if p.name == name:
                return p
        raise StateConflictError(f"domain {name!r} is not protected on this host", state="unprotected",
                                 required="protected")

    async def op_protect(self, args: dict[str, Any]) -> Any:
        name = arg(args, "domain", str)
        peer_name = arg(args, "to", str)
        try:
            prot = Protection(peer=peer_name, segment=arg(args, "segment", str, "default"),
                              rpo=arg(args, "rpo", int, 300), mode=arg(args, "mode", str, "async"))
        except ValueError as e:
            raise UsageError(str(e)) from None
        if prot.mode != "async":
            raise UsageError("mode sync is not available yet: use --mode async")
        client = self.peers.get(peer_name)
        if client is None:
            self.cfg.peer(peer_name)  # raises the ConfigError naming the known peers
        assert client is not None
        dom = await domains.lookup(self._libvirt(), name)
        uuid = dom.UUIDString()
        store = self._store()
        # Check and reserve with no await in between: a second protect of the same domain
        # is refused here, instead of failing half-way and then undoing the first one's
        # rows and replica in its cleanup. (The reservation map belongs in __init__.)
        protecting: dict[str, str] = self.__dict__.setdefault("_protecting", {})
        existing = store.protection(uuid, PRIMARY)
        if existing is not None or uuid in protecting:
            to = existing["peer"] if existing is not None else f"{protecting[uuid]}, in progress"
            raise StateConflictError(f"domain {name!r} is already protected (to {to})",
                                     state="protected", required="unprotected")
        protecting[uuid] = peer_name
        try:
            if not await domains.is_running(dom):
                raise StateConflictError(f"domain {name!r} is not running: start it, then protect it",
                                         state="shut off", required="running")
            disks = await self._disk_specs(dom)
            await client.call("health", {}, timeout=5)
            await client.call("prepare", {
                "uuid": uuid, "domain": name, "primary": self.cfg.name,
                "disks": [{"target": d.target, "size": d.size} for d in disks],
                "protection": {"segment": prot.segment, "rpo": prot.rpo, "mode": prot.mode}})
            added = tagged = False
            try:
                store.add_protection(uuid, PRIMARY, name, prot)
                added = True
                for d in disks:
                    store.upsert_pair(uuid, PRIMARY, name, d.target, peer_name, d.size, PairState.INITIAL_COPY)
                tagged = True  # set_protection may fail after libvirt changed one of the two XMLs
                await domains.set_protection(dom, prot)
                await self._supervise(uuid)
            except BaseException:
                # Undo only what this call created, everywhere it created it.
                if tagged:
                    with contextlib.suppress(Exception):
                        await domains.set_protection(dom, None)
                with contextlib.suppress(Exception):
                    await client.call("remove", {"uuid": uuid, "keep_replica": False}, timeout=5)
                if added:
                    store.remove_protection(uuid, PRIMARY)
                raise
        finally:
            del protecting[uuid]
        if arg(args, "wait", bool, False):
            return self._wait_first_marker(self.protected[uuid])
        return {"domain": name, "uuid": uuid, "pairs": self._pairs_json(uuid)}

    async def _wait_first_marker(self, p: Protected) -> AsyncIterator[dict[str, Any]]:
        while not p.first_marker.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.5):
                    await p.first_marker.wait()
            for target, (done, total) in p.replicator.progress.items():
                yield {"target": target, "bytes_done": done, "bytes_total": total, "rate_bps": None}
            if p.task is None or p.task.done():
                raise PluginError(f"protection of {p.name} stopped before its first marker")
        yield {"domain": p.name, "uuid": p.uuid, "pairs": self._pairs_json(p.uuid)}

    async def _disk_specs(self, dom: Any) -> list[DiskSpec]:
        """The disks to replicate at protect time: the tracker's choice, except that
        a writable disk it cannot replicate is refused here rather than skipped, so
        nobody believes a VM protected while one of its disks is not."""
        name = dom.name()
        # Commands only: no event registration, which libvirt allows once per domain and
        # connection ("event callback already tracked") and the supervisor's transport may hold.
        entries, specs, exclude = await self._current_disks(dom, LibvirtQmpTransport(dom))
        for entry in entries:
            why = tracker.exclusion(entry, exclude)
            if why and entry.device == "disk" and not entry.read_only and entry.target not in exclude:
                raise UsageError(f"{name}: disk {entry.target} cannot be replicated: {why}")
        if not specs:
            raise UsageError(f"{name}: no writable disk to replicate")
        return [specs[t] for t in sorted(specs)]

    async def _supervise(self, uuid: str) -> None:
        """Make the domain's supervisor, in whatever state the domain is (shut off,
        paused, running): it attaches to the domain's QEMU when that runs."""
        store = self._store()
        prot = store.protection(uuid, PRIMARY)
        assert prot is not None and self.conn is not None
        dom = await domains.lookup_uuid(self.conn, uuid)
        # The live XML of a running domain, the persistent one of a shut-off domain: the
        # disks' sources either way; node names come when QEMU runs (_domain_started).
        xml = await domains.live_xml(dom)
        sizes = {pair.target: pair.size for pair in store.pairs(PRIMARY, uuid)}
        disks = [DiskSpec(d.target, d.source, d.fmt, sizes[d.target], "", d.alias)
                 for d in domains.parse_disks(xml) if d.target in sizes]
        assert self.qsd.qmp is not None, "the storage daemon starts first"
        qmp = LibvirtQmpTransport(dom)
        rep = DomainReplicator(store=store, peer=self.peers[prot["peer"]], qmp=qmp, uuid=uuid, domain=prot["domain"],
                               disks=disks, scratch=self.cfg.scratch, stage_owner=domains.qemu_owner(xml),
                               shipper=self.qsd.qmp, cycle_timeout=self.cfg.cycle_timeout,
                               stall_after=self.cfg.stall_after, speed_limit=self.cfg.speed_limit,
                               tls=self._link_tls(prot["peer"]))
        p = Protected(uuid, prot["domain"], rep, qmp)
        if prot["generation"]:
            p.first_marker.set()
        self.protected[uuid] = p
        p.task = asyncio.create_task(self._supervisor(p), name=f"vs-domain-{p.name}")

    # -- the domain's life (hooks of the supervisor) ------------------------------

    async def _domain_stopped(self, p: Protected, reason: str) -> None:
        """The domain's QEMU is gone (``reason``: libvirt's word: shutdown, destroyed,
        saved, crashed, failed, ...). Called once per stop (and once at agent start while
        the domain is off), no cycle in flight, p.lock held; an exception is retried with
        backoff. States go through ``Store.transition``: STOPPED, or CRASHED for
        ``needs resync`` (which only COPY_STARTED, a re-copy, ends).

        The writes since the last marker are shipped from the images (a marker "at
        stop"), unless QEMU did not store its bitmaps: then the pairs need a resync.

        :raise CycleError: the ship failed (bits kept in the images); the supervisor retries
        """
        store = self._store()
        stopped = f"domain not running ({reason})"
        store.transition(p.uuid, PRIMARY, PairEvent.STOPPED, stopped)
        if reason == "migrated":
            return  # it runs elsewhere now; its images are that QEMU's
        assert self.qsd.qmp is not None
        result = await self._offline.run(p.uuid, offline.ship_at_stop(p.replicator, self.qsd.qmp))
        dlog = log.getChild(p.name)
        if result.outcome is offline.Outcome.CRASHED:
            store.transition(p.uuid, PRIMARY, PairEvent.CRASHED, f"{stopped}: {result.reason}")
        elif result.outcome in (offline.Outcome.SHIPPED, offline.Outcome.NOTHING):
            prot = store.protection(p.uuid, PRIMARY)
            store.transition(p.uuid, PRIMARY, PairEvent.STOPPED,
                             f"{stopped}; replica complete at marker {prot['generation'] if prot else '?'}")
            dlog.info("at stop: %s", result.reason)
        else:
            dlog.info("at stop: nothing shipped: %s", result.reason)

    async def _domain_started(self, p: Protected) -> None:
        """The domain's QEMU runs (again, or for the first time since the agent
        started): before any cycle, p.lock held. Attaches to this QEMU; a disk whose
        bitmap cannot be trusted (or whose pair needs a resync) loses its bitmaps, and
        its next cycle copies it in full."""
        self._offline.starting(p.uuid, False)
        await self._attach(p)
        store = self._store()
        resync = {pair.target for pair in store.pairs(PRIMARY, p.uuid) if pair.state is PairState.NEEDS_RESYNC}
        for target, why in (await offline.prepare_start(p.replicator, resync)).items():
            log.getChild(p.name).warning("%s: full copy: %s", target, why)
            store.transition(p.uuid, PRIMARY, PairEvent.COPY_STARTED, f"full copy: {why}", target=target)

    async def _attach(self, p: Protected) -> None:
        """A new QMP transport on the current connection's domain object (the old one
        may belong to a QEMU or a libvirtd that is gone), and the disks' node names."""
        assert self.conn is not None
        store = self._store()
        dom = await domains.lookup_uuid(self.conn, p.uuid)
        old, qmp = p.qmp, LibvirtQmpTransport(dom)
        await old.close()
        await qmp.connect()
        xml = await domains.live_xml(dom)
        entries, specs, exclude = await self._current_disks(dom, qmp, xml)
        # Cycles run with the disks that have pairs; any other disk (attached, or no
        # longer excluded, since protect read the list) is the tracker's to add: it
        # prepares the replica first.
        paired = {pair.target for pair in store.pairs(PRIMARY, p.uuid)}
        if store.disk_list(p.uuid) is None:
            store.save_disk_list(p.uuid, {"disks": [e.to_json() for e in entries if e.target in paired],
                                          "exclude": sorted(exclude)}, "protect")
        p.qmp = qmp
        p.replicator.qmp = qmp
        p.replicator.disks = [specs[t] for t in sorted(specs) if t in paired]
        p.replicator.stage_owner = domains.qemu_owner(xml)
        p.replicator.reattached()

    # -- the mapping tracker ----------------------------------------------------

    async def _current_disks(self, dom: Any, qmp: LibvirtQmpTransport, xml: str | None = None
                             ) -> tuple[list[DiskEntry], dict[str, DiskSpec], set[str]]:
        """All the domain's disks as the tracker sees them, the replicable
        ones as pairs need them, and the targets its metadata excludes
        (from ``xml``, the live XML when the caller has already read it)."""
        if xml is None:
            xml = await domains.live_xml(dom)
        disks = domains.parse_disks(xml)
        exclude = domains.parse_exclude(xml)
        entries = [DiskEntry(d.target, d.source, d.fmt, 0, d.device, d.disk_type, "", d.read_only, d.shareable)
                   for d in disks]
        chosen = [d for d, e in zip(disks, entries, strict=True) if tracker.exclusion(e, exclude) is None]
        found = await resolve_nodes(qmp, {d.target: d.alias for d in chosen}) if chosen else {}
        entries = [replace(e, size=found[e.target][1]) if e.target in found else e for e in entries]
        specs = {d.target: DiskSpec(d.target, d.source, d.fmt, found[d.target][1], found[d.target][0], d.alias)
                 for d in chosen}
        return entries, specs, exclude

    async def _track(self, uuid: str, reason: str) -> list[dict[str, Any]]:
        """Compare the domain's disk list with the last one and adjust its pairs."""
        p = self.protected.get(uuid)
        store = self._store()
        if p is None or self.conn is None:
            return []
        dom = await domains.lookup_uuid(self.conn, uuid)
        if not await domains.is_running(dom):
            return []
        entries, specs, exclude = await self._current_disks(dom, p.qmp)
        stored = store.disk_list(uuid) or {"disks": [], "exclude": []}
        old = [DiskEntry.from_json(d) for d in stored["disks"]]
        changes = tracker.diff(old, entries, exclude, stored["exclude"])
        if not changes:
            return []
        prot = store.protection(uuid, PRIMARY)
        assert prot is not None
        client = self.peers[prot["peer"]]
        done = []
        async with p.lock:
            fresh = [specs[c.target] for c in changes if c.kind in (ChangeKind.ADDED, ChangeKind.RETARGETED)]
            if fresh:
                await client.call("prepare", {
                    "uuid": uuid, "domain": p.name, "primary": self.cfg.name,
                    "disks": [{"target": d.target, "size": d.size} for d in fresh],
                    "protection": {"segment": prot["segment"], "rpo": prot["rpo"], "mode": prot["mode"]}})
            for change in changes:
                if change.kind is ChangeKind.ADDED:
                    spec = specs[change.target]
                    store.upsert_pair(uuid, PRIMARY, p.name, spec.target, prot["peer"], spec.size,
                                      PairState.INITIAL_COPY)
                    action = "new pair: full copy of this disk, in the group's cuts from the next marker"
                elif change.kind is ChangeKind.REMOVED:
                    await client.call("retire", {"uuid": uuid, "target": change.target})
                    store.set_pair_state(uuid, PRIMARY, PairState.DELETED, f"retired: {change.detail}",
                                         target=change.target)
                    gone = [d for d in p.replicator.disks if d.target == change.target]
                    with contextlib.suppress(Exception):
                        await p.replicator.drop_bitmaps(gone)  # the disk may still be attached (excluded)
                    action = "pair retired; its journal data stays per retention"
                elif change.kind is ChangeKind.RETARGETED:
                    spec = specs[change.target]
                    await p.replicator.drop_bitmaps([spec])  # never trust bits from another source
                    store.upsert_pair(uuid, PRIMARY, p.name, spec.target, prot["peer"], spec.size,
                                      PairState.INITIAL_COPY)
                    action = "pair re-created: full copy of the new source at the next marker"
                else:
                    spec = specs[change.target]
                    store.upsert_pair(uuid, PRIMARY, p.name, spec.target, prot["peer"], spec.size,
                                      PairState.ACTIVE)
                    action = "replica grows with the next marker"
                store.log_change(uuid, p.name, reason, change.kind.value, change.target, change.detail, action)
                log.getChild(p.name).info("tracker (%s): %s %s: %s -> %s", reason, change.kind.value,
                                          change.target, change.detail, action)
                done.append({"kind": change.kind.value, "target": change.target, "detail": change.detail,
                             "action": action})
            p.replicator.disks = [specs[t] for t in sorted(specs)]
            store.save_disk_list(uuid, {"disks": [e.to_json() for e in entries], "exclude": sorted(exclude)}, reason)
        p.wake.set()  # let the changed disk set take part in a cut soon
        return done

    async def _apply_delayed_loop(self) -> None:
        """Markers held back by ``[journal] apply_delay`` are applied when due, not
        only when the next cycle commits (after a disaster there is none)."""
        assert self.secondary is not None
        while True:
            await asyncio.sleep(min(max(self.cfg.apply_delay / 4, 0.5), 30.0))
            try:
                await self.secondary.reflect_due()
            except PluginError as e:
                log.warning("applying delayed markers: %s", e)
            except Exception:  # noqa: BLE001 - the timer must outlive one bad round
                log.exception("applying delayed markers")

    async def _tracker_loop(self) -> None:
        """Events and hook calls queue (uuid, reason); a timer re-reads all
        protected domains as a safety net against missed events."""
        while True:
            try:
                async with asyncio.timeout(self.cfg.tracker_interval):
                    uuid, reason = await self._events.get()
                batch = {uuid: reason}
                await asyncio.sleep(0.2)  # devices come and go in bursts
                while not self._events.empty():
                    u, r = self._events.get_nowait()
                    batch.setdefault(u, r)
            except TimeoutError:
                batch = {u: "timer" for u in self.protected}
                # The hook also spools when the agent was merely slow to answer.
                with contextlib.suppress(OSError):
                    self._replay_spool()
            for uuid, reason in batch.items():
                try:
                    await self._track(uuid, reason)
                except PluginError as e:
                    log.warning("tracker: %s: %s", uuid, e)
                except Exception:  # noqa: BLE001 - one domain's failure must not stop tracking
                    log.exception("tracker: %s", uuid)

    async def op_hook(self, args: dict[str, Any]) -> Any:
        """A libvirt hook call (live or replayed from the spool): recorded;
        for a protected domain the tracker looks again."""
        name = arg(args, "domain", str)
        event = " ".join(str(args.get(k) or "-") for k in ("op", "sub_op"))
        self._store().audit("hook", None, domain=name, call=event, extra=str(args.get("extra") or "")[:200],
                            replayed=bool(args.get("replayed", False)))
        for p in self.protected.values():
            if p.name == name:
                if not args.get("replayed") and args.get("op") == "prepare":
                    # A start wins over the ship of the last writes: the images are closed
                    # before the hook answers and libvirt lets QEMU open them.
                    if await self._offline.abort(p.uuid):
                        log.getChild(p.name).info("start: the ship at stop was aborted (the bits stay)")
                elif not args.get("replayed") and args.get("op") == "release":
                    self._offline.starting(p.uuid, False)
                self._events.put_nowait((p.uuid, f"hook {event}"))
        return None

    def _replay_spool(self) -> None:
        """Hook calls made while the agent was down, in their order."""
        path = hook.spool_path(self.cfg.state_dir)
        entries = hook.read_spool(path)
        for entry in entries:
            try:
                asyncio.get_running_loop().create_task(self.op_hook({**entry, "replayed": True}))
            except PluginError as e:
                log.warning("hook spool: skipped %s: %s", entry, e)
        if entries:
            log.info("replayed %d hook call(s) spooled while the agent was down", len(entries))
        hook.clear_spool(path)

    async def op_tracker(self, args: dict[str, Any]) -> Any:
        return {"changes": self._store().tracker_log(arg(args, "domain", str, None))}

    async def _supervisor(self, p: Protected) -> None:
        """The domain's task: runs :meth:`_run_domain` and restarts it after an
        unexpected exception, with backoff, so no group dies silently. Each failure
        is logged (with its traceback when it is a new one) and shown as ``error``."""
        store = self._store()
        dlog = log.getChild(p.name)
        backoff = 1.0
        last = ""
        while True:
            began = time.monotonic()
            try:
                await self._run_domain(p)
                return  # no longer protected
            except Exception as e:  # noqa: BLE001 - the point: nothing ends this task but unprotect
                what = f"{type(e).__name__}: {e}"
                if time.monotonic() - began > 10 * MAX_BACKOFF:
                    backoff = 1.0  # it ran well for a while: a new failure, not the same loop
                reason = f"internal error: {what}; supervisor restarts in {backoff:g}s"
                if what != last:
                    dlog.error("supervisor failed: %s", reason, exc_info=e)
                else:
                    dlog.warning("supervisor failed again: %s", reason)
                last = what
                p.attached = False
                self._fail_marks(p, CycleError(f"{p.name}: {what}"))
                with contextlib.suppress(Exception):
                    store.transition(p.uuid, PRIMARY, PairEvent.CYCLE_FAILED, reason)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF)

    def _fail_marks(self, p: Protected, error: Exception) -> None:
        while p.marks:
            pending = p.marks.pop(0)
            if not pending.done.done():
                pending.done.set_exception(error)

    def _not_running_error(self, p: Protected, why: str) -> StateConflictError:
        return StateConflictError(f"{p.name} is not running ({why}): start it to cut a marker",
                                  state="stopped", required="running")

    async def _domain_state(self, p: Protected) -> tuple[bool, str] | None:
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
                self._libvirt_lost("the connection is dead")
                return None
            raise

    async def _follow_lifecycle(self, p: Protected) -> bool:
        """Bring the supervisor in line with the domain's QEMU; True when cycles can run."""
        store = self._store()
        state = await self._domain_state(p)
        if state is None:
            store.transition(p.uuid, PRIMARY, PairEvent.CYCLE_FAILED,
                             "libvirt connection lost: reconnecting")
            p.attached = False
            return False
        running, reason = state
        if not running:
            p.attached = False
            if p.running is not False:
                p.stop_handled = False
            p.running = False
            if not p.stop_handled:
                log.getChild(p.name).info("domain not running (%s)", reason)
                self._fail_marks(p, self._not_running_error(p, reason))
                async with p.lock:
                    await self._domain_stopped(p, reason)
                p.stop_handled = True
            elif any(pair.state in _LIVE for pair in store.pairs(PRIMARY, p.uuid)):
                # Handled, but since then resumed, or failed on a lost libvirt: still stopped.
                store.transition(p.uuid, PRIMARY, PairEvent.STOPPED, f"domain not running ({reason})")
            return False
        if not p.attached:
            why = "agent start" if p.running is None else "domain started" if p.running is False else "re-attached"
            async with p.lock:
                await self._domain_started(p)
            p.attached = True
            p.running = True
            log.getChild(p.name).info("domain running: attached to its QEMU (%s)", why)
            store.transition(p.uuid, PRIMARY, PairEvent.STARTED)
            # Changes made while we were not looking (agent down, domain off, missed
            # events) are found before any cycle runs.
            await self._track(p.uuid, why)
        return True

    async def _run_domain(self, p: Protected) -> None:
        """The per-domain supervisor: follows the domain's QEMU, cycles every rpo/2
        while it runs, sooner on request; failures are recorded and retried with backoff."""
        store = self._store()
        backoff = 1.0
        next_due = 0.0  # monotonic time of the next scheduled cycle
        dlog = log.getChild(p.name)
        while True:
            prot = store.protection(p.uuid, PRIMARY)
            if prot is None:
                # nobody will cut them now
                self._fail_marks(p, StateConflictError(f"{p.name} is no longer protected",
                                                       state="unprotected", required="protected"))
                return
            if prot["suspended"] and not p.marks:
                p.wake.clear()
                await p.wake.wait()
                continue
            if not p.attached:
                p.wake.clear()
                try:
                    ready = await self._follow_lifecycle(p)
                except (PluginError, BlockdevError) as e:
                    # The domain moved under us (stopped while attaching), or libvirt failed: look again.
                    reason = f"{e}; retrying in {backoff:g}s"
                    dlog.info("%s", reason)
                    store.transition(p.uuid, PRIMARY, PairEvent.CYCLE_FAILED, reason)
                    self._fail_marks(p, CycleError(str(e)))
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, MAX_BACKOFF)
                    continue
                if not ready:
                    # Lifecycle events (and a new libvirt connection) wake us; the
                    # timeout is the safety net against a missed one.
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(min(self.cfg.tracker_interval, MAX_BACKOFF)):
                            await p.wake.wait()
                    continue
                next_due = 0.0  # a fresh start: catch up at once
            delay = 0.0 if p.marks else next_due - time.monotonic()
            if delay > 0:
                self._check_lag(p, prot["rpo"])
                p.wake.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(min(delay, self._until_late(p, prot["rpo"]))):
                        await p.wake.wait()
                continue
            faults.fault_raise("supervisor-before-cycle")
            mark = p.marks.pop(0) if p.marks else None
            quiesce = (Quiesce(p.qmp.domain, p.name, mark.crash_consistent_ok)
                       if mark is not None and mark.quiesce else None)
            # A cycle that outlasts the RPO makes the pairs late while it runs.
            until_late = self._until_late(p, prot["rpo"])
            late = (asyncio.get_running_loop().call_later(until_late, self._check_lag, p, prot["rpo"])
                    if until_late != float("inf") else None)
            try:
                async with p.lock:
                    stats = await p.replicator.cycle(label=mark.label if mark else "",
                                                     apply=mark.apply if mark else True,
                                                     before_cut=quiesce.before_cut if quiesce else None,
                                                     after_cut=quiesce.after_cut if quiesce else None)
            except CutRefusedError as e:
                # Nothing was cut and replication is fine: only this marker is refused.
                cause = e.__cause__ if isinstance(e.__cause__, PluginError) else e
                dlog.warning("marker refused: %s", cause)
                store.audit("mark", p.uuid, domain=p.name, label=mark.label if mark else "", quiesce=True,
                            refused=str(cause))
                if mark is not None and not mark.done.done():
                    mark.done.set_exception(cause)
                continue
            except (CycleError, PluginError, BlockdevError) as e:
                state = None
                with contextlib.suppress(PluginError):
                    state = await self._domain_state(p)
                if state is None or not state[0]:
                    # QEMU (or libvirtd) went away mid-cycle: a stop, not a failure of ours.
                    dlog.info("cycle ended by the domain's stop or libvirt: %s", e)
                    p.attached = False
                    if mark is not None and not mark.done.done():
                        mark.done.set_exception(self._not_running_error(p, state[1]) if state
                                                else CycleError(f"{e}; libvirt connection lost"))
                    continue
                if _peer_unreachable(e):
                    p.unreachable_since = p.unreachable_since or time.time()
                    since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(p.unreachable_since))
                    reason = f"peer {prot['peer']} unreachable since {since}: {e}; retrying in {backoff:g}s"
                    event = PairEvent.PEER_UNREACHABLE
                else:
                    reason = f"{e}; retrying in {backoff:g}s"
                    event = PairEvent.CYCLE_FAILED
                dlog.info("%s", reason)  # the state machine warns once, on entry into the bad state
                store.transition(p.uuid, PRIMARY, event, reason)
                if mark is not None and not mark.done.done():
                    mark.done.set_exception(CycleError(str(e)))
                next_due = time.monotonic() + backoff
                backoff = min(backoff * 2, MAX_BACKOFF)
                continue
            finally:
                if late is not None:
                    late.cancel()
            backoff = 1.0
            p.unreachable_since = None
            next_due = time.monotonic() + max(self.cfg.min_cycle_interval, prot["rpo"] / 2)
            p.first_marker.set()
            if mark is not None:
                quiesced = quiesce is not None and quiesce.quiesced
                detail: dict[str, Any] = {"seq": stats.seq, "label": mark.label, "apply": mark.apply,
                                          "quiesce": mark.quiesce, "quiesced": quiesced}
                if quiesce is not None and quiesce.fallback:
                    detail["crash_consistent_because"] = quiesce.fallback
                if quiesce is not None and quiesce.frozen_ms is not None:
                    detail["frozen_ms"] = quiesce.frozen_ms
                if quiesce is not None and quiesce.thaw_error:
                    detail["thaw_error"] = quiesce.thaw_error
                store.audit("mark", p.uuid, domain=p.name, **detail)
                if not mark.done.done():
                    result = {"seq": stats.seq, "cut_time": stats.cut_time, "bytes": stats.bytes,
                              "kind": stats.kind, "label": mark.label, "quiesced": quiesced}
                    if quiesce is not None and quiesce.thaw_error:
                        result["thaw_error"] = quiesce.thaw_error
                    mark.done.set_result(result)

    def _lag(self, p: Protected) -> float | None:
        cut = p.replicator.last.cut_time or self._last_cut(p.uuid)
        return time.time() - cut if cut else None

    def _until_late(self, p: Protected, rpo: int) -> float:
        """Seconds until the newest marker is older than the RPO (inf: no marker yet)."""
        lag = self._lag(p)
        return max(rpo - lag, 0.5) if lag is not None and lag <= rpo else float("inf")

    def _check_lag(self, p: Protected, rpo: int) -> None:
        lag = self._lag(p)
        if lag is not None and lag > rpo:
            self._store().transition(p.uuid, PRIMARY, PairEvent.LAG_OVER_RPO,
                                     f"newest marker {lag:.0f}s old, over the RPO of {rpo}s")

    async def _stop_supervisor(self, p: Protected) -> None:
        if p.task is not None and not p.task.done():
            p.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await p.task

    async def op_unprotect(self, args: dict[str, Any]) -> Any:
        p = self._find(arg(args, "domain", str))
        keep = arg(args, "keep_replica", bool, False)
        store = self._store()
        prot = store.protection(p.uuid, PRIMARY)
        await self._stop_supervisor(p)
        state = await self._domain_state(p)
        if state is None or state[0]:
            if not p.attached:
                await self._attach(p)  # the QEMU that runs now, through the current connection
            await p.replicator.remove_all()
        else:
            # Nothing to remove in a QEMU that is gone; its persistent bitmaps stay in the
            # images, where a later protect's full copy drops them first.
            log.getChild(p.name).info("unprotect while %s: the images keep virtsync's bitmaps", state[1])
        await p.qmp.close()
        if prot is not None and prot["peer"] in self.peers:
            await self.peers[prot["peer"]].call("remove", {"uuid": p.uuid, "keep_replica": keep})
        with contextlib.suppress(PluginError):
            await domains.set_protection(await domains.lookup_uuid(self._libvirt(), p.uuid), None)
        store.remove_protection(p.uuid, PRIMARY)
        del self.protected[p.uuid]
        return {"domain": p.name, "replica_kept": keep}

    async def op_suspend(self, args: dict[str, Any]) -> Any:
        p = self._find(arg(args, "domain", str))
        self._store().set_protection(p.uuid, PRIMARY, suspended=1)
        # A cycle already cut finishes (its marker is consistent); none starts after.
        async with asyncio.timeout(self.cfg.cycle_timeout):
            while p.replicator.in_flight is not None:
                await asyncio.sleep(0.05)
        state = self._store().transition(p.uuid, PRIMARY, PairEvent.SUSPEND)
        return {"domain": p.name, "state": (state or PairState.SUSPENDED).value}

    async def op_resume(self, args: dict[str, Any]) -> Any:
        p = self._find(arg(args, "domain", str))
        self._store().set_protection(p.uuid, PRIMARY, suspended=0)
        state = self._store().transition(p.uuid, PRIMARY, PairEvent.RESUME)
        p.wake.set()
        return {"domain": p.name, "state": (state or PairState.ACTIVE).value}

    async def op_mark(self, args: dict[str, Any]) -> Any:
        label = arg(args, "label", str, "")
        if problem := label_problem(label):   # the secondary's rule, checked before any cycle is cut
            raise UsageError(f"label {label[:40]!r}: {problem}")
        p = self._find(arg(args, "domain", str))
        quiesce = arg(args, "quiesce", bool, False)
        crash_ok = arg(args, "crash_consistent_ok", bool, False)
        if crash_ok and not quiesce:
            raise UsageError("--crash-consistent-ok only goes with --quiesce")
        req = MarkRequest(label, not arg(args, "no_apply", bool, False),
                          asyncio.get_running_loop().create_future(), quiesce=quiesce, crash_consistent_ok=crash_ok)
        if p.task is None or p.task.done():
            raise StateConflictError(f"replication of {p.name} is not running", state="stopped", required="running")
        if not p.attached:
            state = await self._domain_state(p)
            if state is not None and not state[0]:
                raise self._not_running_error(p, state[1])
        p.marks.append(req)
        p.wake.set()
        if not arg(args, "wait", bool, True):
            # Nobody waits: its outcome shows in pairs and markers, not as a stray error.
            req.done.add_done_callback(lambda f: f.cancelled() or f.exception())
            return {"domain": p.name, "queued": True}
        async with asyncio.timeout(self.cfg.cycle_timeout):
            return await req.done

    async def op_markers(self, args: dict[str, Any]) -> Any:
        """Markers of a domain: read locally on the secondary, from the peer on the primary."""
        name = arg(args, "domain", str)
        try:
            uuid = self._sec().find(name, arg(args, "from", str, None))
        except StateConflictError:
            if args.get("from") is not None:
                raise
            p = self._find(name)
            prot = self._store().protection(p.uuid, PRIMARY)
            assert prot is not None
            return await self.peers[prot["peer"]].call("info", {"uuid": p.uuid})
        return await self._sec().info_async(uuid)

    def _replica(self, args: dict[str, Any]) -> str:
        """The replica a local command names: ``domain`` (name or uuid), ``from`` (its peer) if ambiguous."""
        name = arg(args, "domain", str)
        try:
            return self._sec().find(name, arg(args, "from", str, None))
        except StateConflictError:
            if any(p.name == name for p in self.protected.values()):
                prot = self._store().protection(self._find(name).uuid, PRIMARY)
                raise StateConflictError(f"{name} is the primary here: run this on the secondary "
                                         f"({prot['peer'] if prot else '?'})", state="primary",
                                         required="secondary") from None
            raise

    async def op_apply(self, args: dict[str, Any]) -> Any:
        until = arg(args, "until", int, None)
        return await self._sec().apply(self._replica(args), until)

    async def op_hold(self, args: dict[str, Any]) -> Any:
        return await self._sec().set_held(self._replica(args), True)

    async def op_release(self, args: dict[str, Any]) -> Any:
        return await self._sec().set_held(self._replica(args), False)

    async def op_restore(self, args: dict[str, Any]) -> Any:
        dest = arg(args, "to", str)
        paths.check_restore_target(dest)
        try:
            return await self._sec().restore(self._replica(args), arg(args, "marker", int), dest)
        except OSError as e:
            raise PluginError(f"restore into {dest} failed: {e.strerror or e}") from e

    async def op_verify(self, args: dict[str, Any]) -> Any:
        return await self._sec().verify(self._replica(args))

    def _pairs_json(self, uuid: str | None = None, down: dict[str, str] | None = None) -> list[dict[str, Any]]:
        """The pairs as they are now: the stored state, unless the domain is known
        not to run (``down``: uuid -> libvirt's reason) or the newest marker is older
        than the RPO, which the supervisor may not have recorded yet (a long cycle)."""
        out = []
        now = time.time()
        store = self._store()
        for pair in store.pairs(PRIMARY, uuid):
            p = self.protected.get(pair.domain_uuid)
            last = p.replicator.last if p else None
            cut = last.cut_time if last and last.cut_time else self._last_cut(pair.domain_uuid)
            state, reason = pair.state, pair.reason
            if down and pair.domain_uuid in down and next_state(state, PairEvent.STOPPED) is not state:
                state = next_state(state, PairEvent.STOPPED)
                reason = f"domain not running ({down[pair.domain_uuid]}): the agent is handling the stop"
            prot = store.protection(pair.domain_uuid, PRIMARY)
            if cut and prot and now - cut > prot["rpo"] and next_state(state, PairEvent.LAG_OVER_RPO) is not state:
                state = next_state(state, PairEvent.LAG_OVER_RPO)
                reason = f"newest marker {now - cut:.0f}s old, over the RPO of {prot['rpo']}s"
            out.append({
                "domain": pair.domain, "target": pair.target, "peer": pair.peer, "state": state.value,
                "reason": reason, "lag_seconds": round(now - cut, 3) if cut else None,
                "bytes_behind": 0, "last_marker": pair.last_marker,
                "throughput_bps": last.rate if last else None,
                "bytes_done": pair.bytes_done, "bytes_total": pair.bytes_total,
            })
        return out

    def _last_cut(self, uuid: str) -> float | None:
        for row in self._store().cycles(uuid, limit=50):
            if row["finished"] and not row["error"]:
                return float(row["started"])
        return None

    async def _down(self) -> dict[str, str]:
        """Protected domains whose QEMU the supervisor believes attached but that
        do not run (the stop event is not handled yet): uuid -> libvirt's reason."""
        down = {}
        for p in list(self.protected.values()):
            with contextlib.suppress(PluginError):
                state = await self._domain_state(p)
                if state is not None and not state[0]:
                    down[p.uuid] = state[1]
                    p.wake.set()
        return down

    async def op_pairs(self, args: dict[str, Any]) -> Any:
        name = arg(args, "domain", str, None)
        uuid = self._find(name).uuid if name else None
        pairs = self._pairs_json(uuid, await self._down())
        for entry in pairs:
            p = next((x for x in self.protected.values() if x.name == entry["domain"]), None)
            if p is not None and p.replicator.in_flight is None:
                with contextlib.suppress(Exception):
                    entry["bytes_behind"] = await p.replicator.dirty_bytes_of(entry["target"])
        return {"pairs": pairs}

    async def op_status(self, args: dict[str, Any]) -> Any:
        peers = []
        for name, client in self.peers.items():
            try:
                await client.call("health", {}, timeout=2)
                ok = True
            except PluginError:
                ok = False
            served = name in self.nbd.daemons   # the NBD server for that peer's replicas kept here
            peers.append({"name": name, "address": f"{client.spec.address}:{client.spec.port}", "reachable": ok,
                          "nbd_server": f"{self.nbd.address}:{self.nbd.ports[name]}" if served else None})
        doms = []
        down = await self._down()
        for prot in self._store().protections(PRIMARY):
            pairs = self._pairs_json(prot["domain_uuid"], down)
            # The domain shows its worst pair, with that pair's reason.
            worst = min(pairs, key=lambda pp: severity(PairState(pp["state"])), default=None)
            doms.append({"domain": prot["domain"], "peer": prot["peer"], "rpo": prot["rpo"],
                         "state": worst["state"] if worst else "-", "reason": worst["reason"] if worst else "",
                         "lag_seconds": max((pp["lag_seconds"] or 0 for pp in pairs), default=None),
                         "last_marker": prot["generation"]})
        # Trouble first.
        doms.sort(key=lambda d: severity(PairState(d["state"])) if d["state"] != "-" else len(PairState))
        return {"host": self.cfg.name, "peers": peers, "domains": doms, "replicas": self._sec().replica_status()}


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

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

from . import config as config_mod
from . import hook, ipc, peer, peer_api, tracker
from . import keys as keys_mod
from .config import Config
from .domain import DiskSpec, PairState, Protection
from .errors import ConfigError, PluginError, StateConflictError
from .replication.primary import CutRefusedError, CycleError, DomainReplicator, resolve_nodes
from .replication.secondary import Secondary
from .replication.shipper import NbdTls
from .replication.storage_daemon import StorageDaemon
from .requests import UsageError, arg
from .state import Store
from .tracker import ChangeKind, DiskEntry
from .virt import domains, events
from .virt.connection import close_connection, open_connection
from .virt.qmp_bridge import LibvirtQmpTransport

log = logging.getLogger("virtsync.daemon")
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


class Agent:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.store: Store | None = None
        run_dir = os.path.join(cfg.state_dir, "run")
        self.qsd = StorageDaemon(run_dir, cfg.replication_address, cfg.replication_port,
                                 tls_dir=os.path.join(run_dir, "nbd-psk") if cfg.tls else None,
                                 tls_priority=cfg.tls_priority)
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
        self._delay_task: asyncio.Task[None] | None = None
        self._scrub_task: asyncio.Task[None] | None = None

    # -- lifecycle ---------------------------------------------------------------

    async def start(self) -> None:
        os.makedirs(self.cfg.state_dir, mode=0o700, exist_ok=True)
        os.chmod(self.cfg.state_dir, 0o700)  # replicas, journal and the database: nobody else's business
        self._take_lock()
        server_ssl, identify = self._setup_links()
        self.store = Store(self.cfg.db_path)
        os.makedirs(self.cfg.storage, mode=0o700, exist_ok=True)
        qmp = await self.qsd.start()
        self.secondary = Secondary(self.cfg, self.store, qmp)
        await self.secondary.recover()
        app = peer.make_app(self._peer_handlers(), identify)
        self._runners.append(await peer.start_server(app, self.cfg.listen_host, self.cfg.listen_port, server_ssl))
        self.conn = await open_connection(self.cfg.libvirt_uri)
        self._event_ids = events.register(self.conn, self._events)
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
                self.store.set_pair_state(prot["domain_uuid"], PRIMARY, PairState.ERROR, str(e))
        os.makedirs(os.path.dirname(self.cfg.socket) or ".", mode=0o755, exist_ok=True)
        self._runners.append(await ipc.serve(self.cfg.socket, self.handle, mode=0o660,
                                             group=self._socket_group()))
        self._replay_spool()
        log.info("virtsyncd %s ready: peers API on %s:%s, NBD on %s:%s", self.cfg.name, self.cfg.listen_host,
                 self.cfg.listen_port, self.cfg.replication_address, self.cfg.replication_port)

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
        assert self.qsd.tls_dir is not None
        keys_mod.write_server_psk(self.qsd.tls_dir, psks)
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
        fd = os.open(os.path.join(self.cfg.state_dir, "agent.lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ConfigError(f"another virtsyncd already uses {self.cfg.state_dir}") from None
        self._lock_fd = fd

    async def stop(self) -> None:
        for task in (self._tracker_task, self._delay_task, self._scrub_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self.conn is not None:
            events.deregister(self.conn, self._event_ids)
        for p in list(self.protected.values()):
            await self._stop_supervisor(p)
            await p.qmp.close()
        for runner in reversed(self._runners):
            if isinstance(runner, asyncio.AbstractServer):
                runner.close()
                with contextlib.suppress(Exception):
                    await runner.wait_closed()
            else:
                await runner.cleanup()
        for client in self.peers.values():
            await client.close()
        await self.qsd.stop()
        if self.conn is not None:
            await close_connection(self.conn)
        if self.store is not None:
            self.store.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.cfg.socket)

    # -- peer API (secondary role) ----------------------------------------------

    def _peer_handlers(self) -> dict[str, Any]:
        return peer_api.replica_handlers(self.cfg.name, self._sec)

    def _sec(self) -> Secondary:
        assert self.secondary is not None
        return self.secondary

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
        assert self.conn is not None
        dom = await domains.lookup(self.conn, name)
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
        store = self._store()
        prot = store.protection(uuid, PRIMARY)
        assert prot is not None and self.conn is not None
        dom = await domains.lookup_uuid(self.conn, uuid)
        qmp = LibvirtQmpTransport(dom)
        await qmp.connect()
        xml = await domains.live_xml(dom)
        entries, specs, exclude = await self._current_disks(dom, qmp, xml)
        # Cycles start with the disks that have pairs; any other disk (attached, or
        # no longer excluded, since protect read the list) is the tracker's to add,
        # below: it prepares the replica first.
        paired = {pair.target for pair in store.pairs(PRIMARY, uuid)}
        disks = [specs[t] for t in sorted(specs) if t in paired]
        if store.disk_list(uuid) is None:
            store.save_disk_list(uuid, {"disks": [e.to_json() for e in entries if e.target in paired],
                                        "exclude": sorted(exclude)}, "protect")
        assert self.qsd.qmp is not None, "the storage daemon starts first"
        owner = domains.qemu_owner(xml)
        rep = DomainReplicator(store=store, peer=self.peers[prot["peer"]], qmp=qmp, uuid=uuid, domain=prot["domain"],
                               disks=disks, scratch=self.cfg.scratch, stage_owner=owner, shipper=self.qsd.qmp,
                               cycle_timeout=self.cfg.cycle_timeout, stall_after=self.cfg.stall_after,
                               speed_limit=self.cfg.speed_limit, tls=self._link_tls(prot["peer"]))
        p = Protected(uuid, prot["domain"], rep, qmp)
        if prot["generation"]:
            p.first_marker.set()
        self.protected[uuid] = p
        # Changes made while we were not looking (agent down, missed events)
        # are found before any cycle runs.
        await self._track(uuid, "agent start")
        p.task = asyncio.create_task(self._run_domain(p), name=f"vs-domain-{p.name}")

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

    async def _run_domain(self, p: Protected) -> None:
        """The per-domain supervisor: cycles every rpo/2, sooner on request;
        failures are recorded and retried with backoff."""
        store = self._store()
        backoff = 1.0
        next_due = 0.0  # monotonic time of the next scheduled cycle
        dlog = log.getChild(p.name)
        while True:
            prot = store.protection(p.uuid, PRIMARY)
            if prot is None:
                for pending in p.marks:  # nobody will cut them now
                    if not pending.done.done():
                        pending.done.set_exception(StateConflictError(f"{p.name} is no longer protected",
                                                                   state="unprotected", required="protected"))
                return
            if prot["suspended"] and not p.marks:
                p.wake.clear()
                await p.wake.wait()
                continue
            delay = 0.0 if p.marks else next_due - time.monotonic()
            if delay > 0:
                p.wake.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await p.wake.wait()
                continue
            mark = p.marks.pop(0) if p.marks else None
            quiesce = (Quiesce(p.qmp.domain, p.name, mark.crash_consistent_ok)
                       if mark is not None and mark.quiesce else None)
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
            except (CycleError, PluginError) as e:
                reason = f"{e}; retrying in {backoff:g}s"
                dlog.warning("%s", reason)
                store.set_pair_state(p.uuid, PRIMARY, PairState.ERROR, reason)
                if mark is not None and not mark.done.done():
                    mark.done.set_exception(CycleError(str(e)))
                next_due = time.monotonic() + backoff
                backoff = min(backoff * 2, MAX_BACKOFF)
                continue
            backoff = 1.0
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
        await p.replicator.remove_all()
        await p.qmp.close()
        if prot is not None and prot["peer"] in self.peers:
            await self.peers[prot["peer"]].call("remove", {"uuid": p.uuid, "keep_replica": keep})
        assert self.conn is not None
        with contextlib.suppress(PluginError):
            await domains.set_protection(await domains.lookup_uuid(self.conn, p.uuid), None)
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
        self._store().set_pair_state(p.uuid, PRIMARY, PairState.SUSPENDED)
        return {"domain": p.name, "state": PairState.SUSPENDED.value}

    async def op_resume(self, args: dict[str, Any]) -> Any:
        p = self._find(arg(args, "domain", str))
        self._store().set_protection(p.uuid, PRIMARY, suspended=0)
        self._store().set_pair_state(p.uuid, PRIMARY, PairState.ACTIVE)
        p.wake.set()
        return {"domain": p.name, "state": PairState.ACTIVE.value}

    async def op_mark(self, args: dict[str, Any]) -> Any:
        p = self._find(arg(args, "domain", str))
        quiesce = arg(args, "quiesce", bool, False)
        crash_ok = arg(args, "crash_consistent_ok", bool, False)
        if crash_ok and not quiesce:
            raise UsageError("--crash-consistent-ok only goes with --quiesce")
        req = MarkRequest(arg(args, "label", str, ""), not arg(args, "no_apply", bool, False),
                          asyncio.get_running_loop().create_future(), quiesce=quiesce, crash_consistent_ok=crash_ok)
        if p.task is None or p.task.done():
            raise StateConflictError(f"replication of {p.name} is not running", state="stopped", required="running")
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
            uuid = self._sec().find(name)
        except StateConflictError:
            p = self._find(name)
            prot = self._store().protection(p.uuid, PRIMARY)
            assert prot is not None
            return await self.peers[prot["peer"]].call("info", {"uuid": p.uuid})
        return await self._sec().info_async(uuid)

    def _replica(self, args: dict[str, Any]) -> str:
        name = arg(args, "domain", str)
        try:
            return self._sec().find(name)
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
        if not os.path.isabs(dest):
            raise UsageError(f"--to must be an absolute path, not {dest!r}")
        if os.path.exists(dest) and os.listdir(dest):
            raise UsageError(f"{dest} is not empty: restore never overwrites")
        return await self._sec().restore(self._replica(args), arg(args, "marker", int), dest)

    async def op_verify(self, args: dict[str, Any]) -> Any:
        return await self._sec().verify(self._replica(args))

    def _pairs_json(self, uuid: str | None = None) -> list[dict[str, Any]]:
        out = []
        now = time.time()
        for pair in self._store().pairs(PRIMARY, uuid):
            p = self.protected.get(pair.domain_uuid)
            last = p.replicator.last if p else None
            cut = last.cut_time if last and last.cut_time else self._last_cut(pair.domain_uuid)
            out.append({
                "domain": pair.domain, "target": pair.target, "peer": pair.peer, "state": pair.state.value,
                "reason": pair.reason, "lag_seconds": round(now - cut, 3) if cut else None,
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

    async def op_pairs(self, args: dict[str, Any]) -> Any:
        name = arg(args, "domain", str, None)
        uuid = self._find(name).uuid if name else None
        pairs = self._pairs_json(uuid)
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
            peers.append({"name": name, "address": f"{client.spec.address}:{client.spec.port}", "reachable": ok})
        doms = []
        for prot in self._store().protections(PRIMARY):
            pairs = self._pairs_json(prot["domain_uuid"])
            states = {pair["state"] for pair in pairs}
            doms.append({"domain": prot["domain"], "peer": prot["peer"], "rpo": prot["rpo"],
                         "state": "error" if "error" in states else (states.pop() if len(states) == 1 else "mixed"),
                         "lag_seconds": max((pp["lag_seconds"] or 0 for pp in pairs), default=None),
                         "last_marker": prot["generation"]})
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

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
import logging
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from . import config as config_mod
from . import ipc, peer
from .config import Config
from .domain import DiskSpec, PairState, Protection
from .errors import ConfigError, PluginError, StateConflictError
from .replication.primary import CycleError, DomainReplicator, resolve_nodes
from .replication.secondary import PeerRequestError, Secondary
from .replication.storage_daemon import StorageDaemon
from .state import Store
from .virt import domains
from .virt.connection import close_connection, open_connection
from .virt.qmp_bridge import LibvirtQmpTransport

log = logging.getLogger("virtsync.daemon")
PRIMARY = "primary"
MAX_BACKOFF = 30.0


class UsageError(PluginError):
    exit_code = 2


def _arg(args: dict[str, Any], key: str, kind: type, default: Any = ..., *, where: str = "") -> Any:
    """One typed argument of an IPC or peer request."""
    if key not in args or args[key] is None:
        if default is ...:
            raise UsageError(f"{where or 'request'}: missing {key!r}")
        return default
    value = args[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise UsageError(f"{where or 'request'}: {key!r} must be {kind.__name__}")
    return value


@dataclass
class MarkRequest:
    label: str
    apply: bool
    done: asyncio.Future[dict[str, Any]]


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


class Agent:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.store: Store | None = None
        self.qsd = StorageDaemon(os.path.join(cfg.state_dir, "run"), cfg.replication_address, cfg.replication_port)
        self.secondary: Secondary | None = None
        self.peers = {name: peer.PeerClient(spec) for name, spec in cfg.peers.items()}
        self.conn: Any = None  # libvirt.virConnect, owned through plugin.virt
        self.protected: dict[str, Protected] = {}
        self._runners: list[Any] = []
        self._lock_fd: int | None = None

    # -- lifecycle ---------------------------------------------------------------

    async def start(self) -> None:
        os.makedirs(self.cfg.state_dir, mode=0o700, exist_ok=True)
        self._take_lock()
        self.store = Store(self.cfg.db_path)
        os.makedirs(self.cfg.storage, mode=0o700, exist_ok=True)
        qmp = await self.qsd.start()
        self.secondary = Secondary(self.cfg, self.store, qmp)
        await self.secondary.recover()
        app = peer.make_app(self._peer_handlers())
        self._runners.append(await peer.start_server(app, self.cfg.listen_host, self.cfg.listen_port))
        self.conn = await open_connection(self.cfg.libvirt_uri)
        for prot in self.store.protections(PRIMARY):
            try:
                await self._supervise(prot["domain_uuid"])
            except PluginError as e:
                log.error("cannot resume protection of %s: %s", prot["domain"], e)
                self.store.set_pair_state(prot["domain_uuid"], PRIMARY, PairState.ERROR, str(e))
        os.makedirs(os.path.dirname(self.cfg.socket) or ".", mode=0o755, exist_ok=True)
        self._runners.append(await ipc.serve(self.cfg.socket, self.handle))
        log.info("virtsyncd %s ready: peers API on %s:%s, NBD on %s:%s", self.cfg.name, self.cfg.listen_host,
                 self.cfg.listen_port, self.cfg.replication_address, self.cfg.replication_port)

    def _take_lock(self) -> None:
        fd = os.open(os.path.join(self.cfg.state_dir, "agent.lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ConfigError(f"another virtsyncd already uses {self.cfg.state_dir}") from None
        self._lock_fd = fd

    async def stop(self) -> None:
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
        sec = self._sec

        async def health(body: dict[str, Any]) -> dict[str, Any]:
            return {"name": self.cfg.name, "time": time.time()}

        async def info(body: dict[str, Any]) -> dict[str, Any]:
            return sec().info(_arg(body, "uuid", str))

        async def prepare(body: dict[str, Any]) -> dict[str, Any]:
            disks = _arg(body, "disks", list)
            if not all(isinstance(d, dict) for d in disks):
                raise PeerRequestError("disks must be objects")
            return await sec().prepare(_arg(body, "uuid", str), _arg(body, "domain", str),
                                       _arg(body, "primary", str), disks, _arg(body, "protection", dict, {}))

        async def open_cycle(body: dict[str, Any]) -> dict[str, Any]:
            targets = _arg(body, "targets", list)
            return await sec().open_cycle(_arg(body, "uuid", str), _arg(body, "seq", int), _arg(body, "kind", str),
                                          [str(t) for t in targets])

        async def commit_cycle(body: dict[str, Any]) -> dict[str, Any]:
            nbytes = _arg(body, "bytes", dict)
            if not all(isinstance(v, int) for v in nbytes.values()):
                raise PeerRequestError("bytes must map disks to integers")
            return await sec().commit_cycle(_arg(body, "uuid", str), _arg(body, "seq", int),
                                            _arg(body, "cut_time", float), nbytes, _arg(body, "label", str, ""),
                                            _arg(body, "apply", bool, True))

        async def abort_cycle(body: dict[str, Any]) -> None:
            await sec().abort_cycle(_arg(body, "uuid", str), _arg(body, "seq", int))

        async def remove(body: dict[str, Any]) -> None:
            await sec().remove(_arg(body, "uuid", str), _arg(body, "keep_replica", bool, False))

        return {"health": health, "info": info, "prepare": prepare, "open_cycle": open_cycle,
                "commit_cycle": commit_cycle, "abort_cycle": abort_cycle, "remove": remove}

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
            "release": self.op_release, "restore": self.op_restore,
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
        name = _arg(args, "domain", str)
        peer_name = _arg(args, "to", str)
        try:
            prot = Protection(peer=peer_name, segment=_arg(args, "segment", str, "default"),
                              rpo=_arg(args, "rpo", int, 300), mode=_arg(args, "mode", str, "async"))
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
        if store.protection(uuid, PRIMARY) is not None:
            raise StateConflictError(f"domain {name!r} is already protected (to {store.protection(uuid, PRIMARY)['peer']})",
                                     state="protected", required="unprotected")
        if not await domains.is_running(dom):
            raise StateConflictError(f"domain {name!r} is not running: start it, then protect it",
                                     state="shut off", required="running")
        disks = await self._disk_specs(dom)
        await client.call("health", {}, timeout=5)
        await client.call("prepare", {
            "uuid": uuid, "domain": name, "primary": self.cfg.name,
            "disks": [{"target": d.target, "size": d.size} for d in disks],
            "protection": {"segment": prot.segment, "rpo": prot.rpo, "mode": prot.mode}})
        try:
            store.add_protection(uuid, PRIMARY, name, prot)
            for d in disks:
                store.upsert_pair(uuid, PRIMARY, name, d.target, peer_name, d.size, PairState.INITIAL_COPY)
            await domains.set_protection(dom, prot)
            await self._supervise(uuid)
        except BaseException:
            with contextlib.suppress(Exception):
                await client.call("remove", {"uuid": uuid, "keep_replica": False}, timeout=5)
            if store.protection(uuid, PRIMARY) is not None:
                store.remove_protection(uuid, PRIMARY)
            raise
        if _arg(args, "wait", bool, False):
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
        """The disks to replicate; refuses what this mode cannot handle."""
        name = dom.name()
        specs = []
        aliases = {}
        chosen = []
        for disk in domains.parse_disks(await domains.live_xml(dom)):
            if disk.device != "disk" or disk.read_only:
                continue  # cdroms, floppies and read-only disks do not change
            if disk.shareable:
                raise UsageError(f"{name}: disk {disk.target} is shareable; a shared disk cannot be replicated per VM")
            if disk.disk_type not in ("file", "block", "volume"):
                raise UsageError(f"{name}: disk {disk.target} is a {disk.disk_type} disk; only local disks are supported")
            if disk.fmt != "qcow2":
                raise UsageError(f"{name}: disk {disk.target} is {disk.fmt}: asynchronous mode needs qcow2, whose "
                                 "persistent dirty bitmaps survive a restart")
            chosen.append(disk)
            aliases[disk.target] = disk.alias
        if not chosen:
            raise UsageError(f"{name}: no writable disk to replicate")
        async with LibvirtQmpTransport(dom) as qmp:
            found = await resolve_nodes(qmp, aliases)
        for disk in chosen:
            node, size = found[disk.target]
            specs.append(DiskSpec(disk.target, disk.source, disk.fmt, size, node, disk.alias))
        return specs

    async def _supervise(self, uuid: str) -> None:
        store = self._store()
        prot = store.protection(uuid, PRIMARY)
        assert prot is not None and self.conn is not None
        dom = await domains.lookup_uuid(self.conn, uuid)
        disks = await self._disk_specs(dom)
        qmp = LibvirtQmpTransport(dom)
        await qmp.connect()
        rep = DomainReplicator(store=store, peer=self.peers[prot["peer"]], qmp=qmp, uuid=uuid, domain=prot["domain"],
                               disks=disks, cycle_timeout=self.cfg.cycle_timeout, stall_after=self.cfg.stall_after,
                               speed_limit=self.cfg.speed_limit)
        p = Protected(uuid, prot["domain"], rep, qmp)
        if prot["generation"]:
            p.first_marker.set()
        self.protected[uuid] = p
        p.task = asyncio.create_task(self._run_domain(p), name=f"vs-domain-{p.name}")

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
            try:
                stats = await p.replicator.cycle(label=mark.label if mark else "",
                                                 apply=mark.apply if mark else True)
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
            if mark is not None and not mark.done.done():
                mark.done.set_result({"seq": stats.seq, "cut_time": stats.cut_time, "bytes": stats.bytes,
                                      "kind": stats.kind, "label": mark.label})

    async def _stop_supervisor(self, p: Protected) -> None:
        if p.task is not None and not p.task.done():
            p.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await p.task

    async def op_unprotect(self, args: dict[str, Any]) -> Any:
        p = self._find(_arg(args, "domain", str))
        keep = _arg(args, "keep_replica", bool, False)
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
        p = self._find(_arg(args, "domain", str))
        self._store().set_protection(p.uuid, PRIMARY, suspended=1)
        # A cycle already cut finishes (its marker is consistent); none starts after.
        async with asyncio.timeout(self.cfg.cycle_timeout):
            while p.replicator.in_flight is not None:
                await asyncio.sleep(0.05)
        self._store().set_pair_state(p.uuid, PRIMARY, PairState.SUSPENDED)
        return {"domain": p.name, "state": PairState.SUSPENDED.value}

    async def op_resume(self, args: dict[str, Any]) -> Any:
        p = self._find(_arg(args, "domain", str))
        self._store().set_protection(p.uuid, PRIMARY, suspended=0)
        self._store().set_pair_state(p.uuid, PRIMARY, PairState.ACTIVE)
        p.wake.set()
        return {"domain": p.name, "state": PairState.ACTIVE.value}

    async def op_mark(self, args: dict[str, Any]) -> Any:
        p = self._find(_arg(args, "domain", str))
        if _arg(args, "quiesce", bool, False):
            raise UsageError("--quiesce is not available yet (guest-agent freeze comes with the journal work)")
        req = MarkRequest(_arg(args, "label", str, ""), not _arg(args, "no_apply", bool, False),
                          asyncio.get_running_loop().create_future())
        p.marks.append(req)
        p.wake.set()
        if not _arg(args, "wait", bool, True):
            return {"domain": p.name, "queued": True}
        async with asyncio.timeout(self.cfg.cycle_timeout):
            return await req.done

    async def op_markers(self, args: dict[str, Any]) -> Any:
        """Markers of a domain: read locally on the secondary, from the peer on the primary."""
        name = _arg(args, "domain", str)
        try:
            uuid = self._sec().find(name)
        except StateConflictError:
            p = self._find(name)
            prot = self._store().protection(p.uuid, PRIMARY)
            assert prot is not None
            return await self.peers[prot["peer"]].call("info", {"uuid": p.uuid})
        return self._sec().info(uuid)

    def _replica(self, args: dict[str, Any]) -> str:
        name = _arg(args, "domain", str)
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
        until = _arg(args, "until", int, None)
        return await self._sec().apply(self._replica(args), until)

    async def op_hold(self, args: dict[str, Any]) -> Any:
        return await self._sec().set_held(self._replica(args), True)

    async def op_release(self, args: dict[str, Any]) -> Any:
        return await self._sec().set_held(self._replica(args), False)

    async def op_restore(self, args: dict[str, Any]) -> Any:
        dest = _arg(args, "to", str)
        if not os.path.isabs(dest):
            raise UsageError(f"--to must be an absolute path, not {dest!r}")
        if os.path.exists(dest) and os.listdir(dest):
            raise UsageError(f"{dest} is not empty: restore never overwrites")
        return await self._sec().restore(self._replica(args), _arg(args, "marker", int), dest)

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
        name = _arg(args, "domain", str, None)
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
        return {"host": self.cfg.name, "peers": peers, "domains": doms}


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

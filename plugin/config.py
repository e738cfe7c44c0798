"""The agent's configuration: ``/etc/virtsync/virtsync.toml``.

::

    [agent]
    name = "pri"                      # this host's name, as its peers call it
    listen = "10.250.0.1:8441"        # peer API; never a wildcard address
    socket = "/run/virtsync/agent.sock"
    socket_group = "libvirt"          # group of the socket (mode 0660); default libvirt if it exists
    state_dir = "/var/lib/virtsync"
    keys_dir = "/etc/virtsync/keys"   # TLS identity, pinned peer certificates, NBD keys (virtsync keys)
    libvirt_uri = "qemu:///system"

    [replication]                     # replicas this host keeps for its peers
    address = "10.250.0.1"            # NBD server (data path)
    port = 10809                      # one NBD server per peer: peers in name order take port, port + 1, ...
    storage = "/var/lib/virtsync/replicas"
    scratch = "/var/lib/virtsync/scratch"  # each cycle's dirty blocks wait here before crossing the link:
                                      # local disk, QEMU must be able to create files there

    [journal]                         # the secondary's journal of markers
    apply_delay = 0                   # seconds a marker waits before it is applied
    retain_markers = 4                # applied markers kept restorable (the replica's own included) ...
    retain_seconds = 0                # ... and for at least this long
    max_bytes = 0                     # space for segments; 0 = unbounded
    on_full = "refuse"                # or "apply": fold old markers to make room
    scrub_interval = 604800           # seconds between scheduled `verify` runs of each replica; 0 = off

    [peers.dr1]
    address = "10.250.0.2:8441"
    # insecure_plain = true           # plain HTTP and NBD with this peer: isolated networks only

Links with peers use TLS unless a peer says ``insecure_plain = true``; this
host runs one peer API port and one NBD key setting, so either every peer is
plain or none is.

Every error is a :class:`ConfigError` naming the file and the key.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import os
import stat
import tomllib
from dataclasses import dataclass, field
from typing import Any

from .domain import PeerSpec
from .errors import ConfigError

# Default paths, in one place: the Config below, the CLI and the hook install use these.
DEFAULT_PATH = "/etc/virtsync/virtsync.toml"
DEFAULT_SOCKET = "/run/virtsync/agent.sock"
DEFAULT_STATE_DIR = "/var/lib/virtsync"
DEFAULT_KEYS_DIR = "/etc/virtsync/keys"
WILDCARDS = {"0.0.0.0", "::", "[::]", "", "*"}
MAX_SIZE = 1 << 20  # a config file larger than this is refused, never read in part
MAX_MESSAGE = 400

log = logging.getLogger("virtsync.config")


@dataclass(frozen=True, slots=True)
class Config:
    name: str
    listen_host: str
    listen_port: int
    socket: str = DEFAULT_SOCKET
    socket_group: str | None = None  # None: "libvirt" when that group exists
    state_dir: str = DEFAULT_STATE_DIR
    keys_dir: str = DEFAULT_KEYS_DIR
    libvirt_uri: str = "qemu:///system"
    replication_address: str = "127.0.0.1"
    replication_port: int = 10809
    storage: str = "/var/lib/virtsync/replicas"
    scratch: str = "/var/lib/virtsync/scratch"  # the primary's staging files (QEMU writes them)
    peers: dict[str, PeerSpec] = field(default_factory=dict)
    cycle_timeout: float = 600.0
    stall_after: float = 10.0
    min_cycle_interval: float = 1.0
    speed_limit: int = 0  # bytes/s per disk job; 0 = unlimited
    tls_priority: str | None = None  # GnuTLS priority of the NBD link; None = GnuTLS's default
    tracker_interval: float = 30.0
    apply_delay: float = 0.0
    retain_markers: int = 4
    retain_seconds: float = 0.0
    journal_max_bytes: int = 0
    journal_on_full: str = "refuse"
    scrub_interval: float = 604800.0  # a week; 0 = no scheduled verify
    path: str = ""

    @property
    def db_path(self) -> str:
        return os.path.join(self.state_dir, "state.db")

    @property
    def tls(self) -> bool:
        """TLS on the peer API and NBD: unless every peer is explicitly plain (never by default)."""
        return not self.peers or not all(p.insecure_plain for p in self.peers.values())

    def peer(self, name: str) -> PeerSpec:
        try:
            return self.peers[name]
        except KeyError:
            known = ", ".join(sorted(self.peers)) or "none"
            raise ConfigError(f"unknown peer {name!r} (configured peers: {known})") from None


def _split_hostport(value: object, where: str, default_port: int | None = None) -> tuple[str, int]:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where}: expected \"HOST:PORT\", got {value!r:.80}")
    host, sep, port_text = value.rpartition(":")
    if not sep:
        if default_port is None:
            raise ConfigError(f"{where}: missing port in {value!r:.80}")
        host, port_text = value, str(default_port)
    host = host.strip("[]")
    # int() also takes " 80", "+80", "8_0" and non-ASCII digits: a port is plain digits.
    if not (port_text.isascii() and port_text.isdigit() and len(port_text) <= 5):
        raise ConfigError(f"{where}: bad port {port_text!r:.20}")
    port = int(port_text)
    if not 0 < port < 65536:
        raise ConfigError(f"{where}: port {port} out of range")
    _check_address(host, where)
    return host, port


def _check_address(host: str, where: str) -> None:
    if host in WILDCARDS:
        raise ConfigError(f"{where}: refusing wildcard address {host!r}: name the address to bind")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        if host != "localhost":
            raise ConfigError(f"{where}: {host!r:.80} is not an IP address") from None
        return
    # "::0", "0:0::0" and "::ffff:0.0.0.0" are the same wildcard spelled otherwise.
    mapped = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) else None
    if ip.is_unspecified or (mapped is not None and mapped.is_unspecified):
        raise ConfigError(f"{where}: refusing wildcard address {host!r:.60}: name the address to bind")


def _valid_name(name: str) -> bool:
    """An agent or peer name: 1-64 ASCII letters, digits, - or _ (not only punctuation)."""
    return bool(name) and name.isascii() and name.replace("-", "").replace("_", "").isalnum() and len(name) <= 64


class _Table(dict):  # type: ignore[type-arg]
    """A TOML table that remembers which keys were read, to refuse the others (typos)."""

    def __init__(self, name: str, items: dict[str, Any]) -> None:
        super().__init__(items)
        self.name = name
        self.seen: set[str] = set()

    def get(self, key: str, default: Any = None) -> Any:
        self.seen.add(key)
        return super().get(key, default)


def _tables(doc: dict[str, Any]) -> list[_Table]:
    """Wrap the sections whose keys are all known (and each peer) in place; return them.

    ``[resources]`` is free-form and ``[peers]`` is keyed by peer name: neither is wrapped.
    """
    out = []
    for section in ("agent", "replication", "journal"):
        if isinstance(doc.get(section), dict):
            doc[section] = _Table(section, doc[section])
            out.append(doc[section])
    peers = doc.get("peers")
    if isinstance(peers, dict):
        for peer_name, table in peers.items():
            if isinstance(table, dict):
                peers[peer_name] = _Table(f"peers.{peer_name}", table)
                out.append(peers[peer_name])
    return out


def _check_values(cfg: Config) -> None:
    """Ranges the types alone do not give."""
    for key, value, minimum in (("cycle_timeout", cfg.cycle_timeout, 0.0), ("stall_after", cfg.stall_after, 0.0),
                                ("min_cycle_interval", cfg.min_cycle_interval, None)):
        if not math.isfinite(value) or (value <= minimum if minimum is not None else value < 0):
            need = "> 0" if minimum is not None else ">= 0"
            raise ConfigError(f"replication.{key} must be a finite number of seconds {need}, not {value!r}")
    for key, value in (("journal.apply_delay", cfg.apply_delay), ("journal.retain_seconds", cfg.retain_seconds)):
        if not math.isfinite(value) or value < 0:
            raise ConfigError(f"{key} must be a finite number of seconds >= 0, not {value!r}")
    for name, path in (("agent.socket", cfg.socket), ("agent.state_dir", cfg.state_dir),
                       ("agent.keys_dir", cfg.keys_dir), ("replication.storage", cfg.storage),
                       ("replication.scratch", cfg.scratch)):
        if not path or "\0" in path:
            raise ConfigError(f"{name} must be a non-empty path without NUL characters")


def _one_line(text: str) -> str:
    text = "".join(c if c.isprintable() else c.encode("unicode_escape", "backslashreplace").decode("ascii")
                   for c in text)
    return text if len(text) <= MAX_MESSAGE else text[:MAX_MESSAGE - 3] + "..."


def _get(table: dict[str, Any], key: str, kind: type, where: str, default: Any) -> Any:
    value = table.get(key, default)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f"{where}.{key}: expected {kind.__name__}, got {value!r:.80}")
    return value


def parse(text: str, path: str = "<config>") -> Config:
    """Parse and check a config text.

    :raise ConfigError: malformed TOML, a wrong type, a wildcard address, an unknown key;
        always one line that names ``path`` and the key
    """
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(_one_line(f"{path}: not valid TOML: {e}")) from None
    except RecursionError:  # tomllib parses nested arrays and tables recursively
        raise ConfigError(_one_line(f"{path}: not a config: arrays or tables nested too deeply")) from None
    tables = _tables(doc)
    try:
        cfg = _parse_doc(doc, path)
        _check_values(cfg)
        # After every key was read: whatever was never asked for is a typo.
        for table in tables:
            unknown = sorted(set(table) - table.seen)
            if unknown:
                raise ConfigError(f"unknown key {table.name}.{unknown[0]}" + (
                    f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""))
    except ConfigError as e:
        message = str(e) if str(e).startswith(f"{path}:") else f"{path}: {e}"
        raise ConfigError(_one_line(message)) from None
    return cfg


def _parse_doc(doc: dict[str, Any], path: str) -> Config:
    unknown = set(doc) - {"agent", "replication", "journal", "peers", "resources"}
    if unknown:
        raise ConfigError(f"{path}: unknown section(s): {', '.join(sorted(unknown))}")
    agent = doc.get("agent", {})
    repl = doc.get("replication", {})
    journal = doc.get("journal", {})
    peers_doc = doc.get("peers", {})
    for name, table in (("agent", agent), ("replication", repl), ("journal", journal), ("peers", peers_doc)):
        if not isinstance(table, dict):
            raise ConfigError(f"{path}: [{name}] must be a table")
    name = _get(agent, "name", str, "agent", "")
    if not _valid_name(name):
        raise ConfigError(f"{path}: agent.name must be 1-64 letters, digits, - or _ (got {name!r:.80})")
    host, port = _split_hostport(agent.get("listen"), f"{path}: agent.listen")
    rep_addr = _get(repl, "address", str, "replication", host)
    _check_address(rep_addr, f"{path}: replication.address")
    rep_port = _get(repl, "port", int, "replication", 10809)
    if _get(repl, "speed_limit", int, "replication", 0) < 0:
        raise ConfigError(f"{path}: replication.speed_limit must be >= 0 (bytes/s, 0 = unlimited)")
    if not 0 < rep_port < 65536:
        raise ConfigError(f"{path}: replication.port {rep_port} out of range")
    peers: dict[str, PeerSpec] = {}
    for peer_name, table in peers_doc.items():
        if not isinstance(table, dict):
            raise ConfigError(f"{path}: [peers.{peer_name}] must be a table")
        if not _valid_name(peer_name):
            raise ConfigError(f"{path}: peer name {peer_name!r:.80} must be 1-64 letters, digits, - or _")
        if peer_name == name:
            raise ConfigError(f"{path}: peers.{peer_name} has this host's own name")
        p_host, p_port = _split_hostport(table.get("address"), f"{path}: peers.{peer_name}.address")
        plain = _get(table, "insecure_plain", bool, f"peers.{peer_name}", False)
        peers[peer_name] = PeerSpec(peer_name, p_host, p_port, insecure_plain=plain)
    if len({p.insecure_plain for p in peers.values()}) > 1:
        plain_peers = ", ".join(sorted(n for n, p in peers.items() if p.insecure_plain))
        raise ConfigError(f"{path}: insecure_plain is set for {plain_peers} but not for every peer: this host "
                          "serves one peer API port and one NBD server, either all with TLS or all plain")
    socket_group = _get(agent, "socket_group", str, "agent", "") or None if "socket_group" in agent else None
    if "socket_group" in agent and not (socket_group and socket_group.isprintable() and len(socket_group) <= 64):
        raise ConfigError(f"{path}: agent.socket_group must be a group name, not {agent.get('socket_group')!r:.80}")
    state_dir = _get(agent, "state_dir", str, "agent", DEFAULT_STATE_DIR)
    on_full = _get(journal, "on_full", str, "journal", "refuse")
    if on_full not in ("refuse", "apply"):
        raise ConfigError(f"{path}: journal.on_full must be \"refuse\" or \"apply\", not {on_full!r:.40}")
    tracker_interval = _get(agent, "tracker_interval", float, "agent", 30.0)
    if not math.isfinite(tracker_interval):   # max(1.0, nan) would hide it
        raise ConfigError(f"{path}: agent.tracker_interval must be a finite number of seconds, not {tracker_interval!r}")
    retain = _get(journal, "retain_markers", int, "journal", 4)
    max_bytes = _get(journal, "max_bytes", int, "journal", 0)
    if retain < 0 or max_bytes < 0:
        raise ConfigError(f"{path}: journal.retain_markers and journal.max_bytes must be >= 0")
    scrub = _get(journal, "scrub_interval", float, "journal", 604800.0)
    if not math.isfinite(scrub) or scrub < 0:
        raise ConfigError(f"{path}: journal.scrub_interval must be a finite number of seconds >= 0 (0 = off), "
                          f"not {scrub!r}")
    return Config(
        name=name,
        listen_host=host,
        listen_port=port,
        socket=_get(agent, "socket", str, "agent", DEFAULT_SOCKET),
        socket_group=socket_group,
        state_dir=state_dir,
        keys_dir=_get(agent, "keys_dir", str, "agent", DEFAULT_KEYS_DIR),
        libvirt_uri=_get(agent, "libvirt_uri", str, "agent", "qemu:///system"),
        replication_address=rep_addr,
        replication_port=rep_port,
        storage=_get(repl, "storage", str, "replication", os.path.join(state_dir, "replicas")),
        scratch=_get(repl, "scratch", str, "replication", os.path.join(state_dir, "scratch")),
        peers=peers,
        cycle_timeout=_get(repl, "cycle_timeout", float, "replication", 600.0),
        stall_after=_get(repl, "stall_after", float, "replication", 10.0),
        min_cycle_interval=_get(repl, "min_cycle_interval", float, "replication", 1.0),
        speed_limit=_get(repl, "speed_limit", int, "replication", 0),
        tls_priority=_tls_priority(_get(repl, "tls_priority", str, "replication", "auto"), path),
        tracker_interval=max(1.0, tracker_interval),
        apply_delay=_get(journal, "apply_delay", float, "journal", 0.0),
        retain_markers=retain,
        retain_seconds=_get(journal, "retain_seconds", float, "journal", 0.0),
        journal_max_bytes=max_bytes,
        journal_on_full=on_full,
        scrub_interval=scrub,
        path=path,
    )


# With a PSK, GnuTLS's NORMAL order lands on ChaCha20-Poly1305 (TLS 1.3 ties an
# external PSK to SHA-256, ruling out AES-256-GCM-SHA384). On a CPU with AES-NI,
# AES-128-GCM moves NBD 2.7x faster at less than half the CPU (docs/bench/tls.md).
AES_PRIORITY = "NORMAL:-CIPHER-ALL:+AES-128-GCM"


def cpu_has_aes() -> bool:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            return any(line.startswith("flags") and " aes" in line for line in f)
    except OSError:
        return False


def _tls_priority(value: str, path: str) -> str | None:
    """``auto``: AES-128-GCM where the CPU has AES-NI, else GnuTLS's default;
    ``default``: GnuTLS's default; anything else: a GnuTLS priority string."""
    if value == "auto":
        return AES_PRIORITY if cpu_has_aes() else None
    if value == "default":
        return None
    if not value.isprintable() or "NULL" in value.upper() or len(value) > 512:
        raise ConfigError(f"{path}: replication.tls_priority {value!r:.60} is not a sound GnuTLS priority string")
    return value


def config_path(given: str | None) -> tuple[str, bool]:
    """The config file a command reads: ``--config``, else ``$VIRTSYNC_CONFIG``, else
    :data:`DEFAULT_PATH`; and whether it was named (explicit) rather than the default."""
    named = given or os.environ.get("VIRTSYNC_CONFIG")
    return (named, True) if named else (DEFAULT_PATH, False)


def _read_text(path: str, missing_ok: bool = False) -> str | None:
    """The file's text, read with the checks :func:`load` promises; None if it is missing
    and ``missing_ok``.

    :raise ConfigError: missing (unless ``missing_ok``), unreadable, not a regular file,
        too large or not UTF-8
    """
    try:
        # O_NONBLOCK: opening a FIFO for reading would wait for a writer; it is refused below.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except FileNotFoundError:
        if missing_ok:
            return None
        raise ConfigError(_one_line(f"cannot read config {path!r}: No such file or directory")) from None
    except (OSError, ValueError) as e:
        raise ConfigError(_one_line(f"cannot read config {path!r}: {getattr(e, 'strerror', None) or e}")) from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ConfigError(_one_line(f"cannot read config {path}: not a regular file"))
    with os.fdopen(fd, "rb") as f:
        try:
            data = f.read(MAX_SIZE + 1)
        except OSError as e:
            raise ConfigError(_one_line(f"cannot read config {path}: {e.strerror or e}")) from None
    if len(data) > MAX_SIZE:
        raise ConfigError(_one_line(f"{path}: too large (more than {MAX_SIZE} bytes): not a config file"))
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(_one_line(f"{path}: not UTF-8 text (byte {e.start})")) from None


def agent_path(path: str, key: str, *, explicit: bool, tolerant: bool) -> str | None:
    """The path ``[agent] KEY`` of the config file, None where the file does not give it.

    The one loader of the commands that run without the agent (the CLI finding the socket,
    ``hook install`` finding the state directory): only the TOML and this key are checked,
    not the whole config, whose other keys are the daemon's business.

    A missing file is None unless ``explicit`` (named by ``--config`` or
    ``$VIRTSYNC_CONFIG``). ``tolerant``: an unreadable or broken file is None too (the CLI:
    a user in the virtsync group usually cannot read /etc/virtsync, and the default socket
    is then right); otherwise it is an error (``hook install`` must not bake a wrong spool
    path into the hook).

    :raise ConfigError: one line naming the file, and the key when its value is no path
    """
    try:
        text = _read_text(path, missing_ok=True)
        doc = tomllib.loads(text) if text is not None else None
    except ConfigError as e:
        if not tolerant:
            raise
        log.debug("ignoring config %s: %s", path, e)
        return None
    except (tomllib.TOMLDecodeError, RecursionError) as e:   # RecursionError: nested too deeply
        if not tolerant:
            raise ConfigError(_one_line(f"{path}: not valid TOML: {e}")) from None
        log.debug("ignoring config %s: %s", path, e)
        return None
    if doc is None:   # missing
        if explicit:
            raise ConfigError(_one_line(f"config file {path} not found"))
        return None
    agent = doc.get("agent")
    value = agent.get(key) if isinstance(agent, dict) else None
    if value is None:
        return None
    if not isinstance(value, str) or not value or "\0" in value:
        raise ConfigError(_one_line(f"[agent] {key} in {path} must be a non-empty path"))
    return value


def load(path: str = DEFAULT_PATH) -> Config:
    """Read and parse the config file.

    :raise ConfigError: the file is missing or unreadable, or :func:`parse` refuses it
    """
    text = _read_text(path)
    assert text is not None  # missing_ok is off
    return parse(text, path)

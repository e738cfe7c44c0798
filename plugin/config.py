"""The agent's configuration: ``/etc/virtsync/virtsync.toml``.

::

    [agent]
    name = "pri"                      # this host's name, as its peers call it
    listen = "10.250.0.1:8441"        # peer API; never a wildcard address
    socket = "/run/virtsync/agent.sock"
    state_dir = "/var/lib/virtsync"
    libvirt_uri = "qemu:///system"

    [replication]                     # replicas this host keeps for its peers
    address = "10.250.0.1"            # NBD server (data path)
    port = 10809
    storage = "/var/lib/virtsync/replicas"

    [peers.dr1]
    address = "10.250.0.2:8441"

Every error is a :class:`ConfigError` naming the file and the key.
"""

from __future__ import annotations

import ipaddress
import os
import tomllib
from dataclasses import dataclass, field
from typing import Any

from .domain import PeerSpec
from .errors import ConfigError

DEFAULT_PATH = "/etc/virtsync/virtsync.toml"
WILDCARDS = {"0.0.0.0", "::", "[::]", "", "*"}


@dataclass(frozen=True, slots=True)
class Config:
    name: str
    listen_host: str
    listen_port: int
    socket: str = "/run/virtsync/agent.sock"
    state_dir: str = "/var/lib/virtsync"
    libvirt_uri: str = "qemu:///system"
    replication_address: str = "127.0.0.1"
    replication_port: int = 10809
    storage: str = "/var/lib/virtsync/replicas"
    peers: dict[str, PeerSpec] = field(default_factory=dict)
    cycle_timeout: float = 600.0
    stall_after: float = 10.0
    min_cycle_interval: float = 1.0
    speed_limit: int = 0  # bytes/s per disk job; 0 = unlimited
    path: str = ""

    @property
    def db_path(self) -> str:
        return os.path.join(self.state_dir, "state.db")

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
    try:
        port = int(port_text)
    except ValueError:
        raise ConfigError(f"{where}: bad port {port_text!r:.20}") from None
    if not 0 < port < 65536:
        raise ConfigError(f"{where}: port {port} out of range")
    _check_address(host, where)
    return host, port


def _check_address(host: str, where: str) -> None:
    if host in WILDCARDS:
        raise ConfigError(f"{where}: refusing wildcard address {host!r}: name the address to bind")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if host != "localhost":
            raise ConfigError(f"{where}: {host!r:.80} is not an IP address") from None


def _get(table: dict[str, Any], key: str, kind: type, where: str, default: Any) -> Any:
    value = table.get(key, default)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f"{where}.{key}: expected {kind.__name__}, got {value!r:.80}")
    return value


def parse(text: str, path: str = "<config>") -> Config:
    """Parse and check a config text.

    :raise ConfigError: malformed TOML, a wrong type, a wildcard address, an unknown key
    """
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    unknown = set(doc) - {"agent", "replication", "peers", "resources"}
    if unknown:
        raise ConfigError(f"{path}: unknown section(s): {', '.join(sorted(unknown))}")
    agent = doc.get("agent", {})
    repl = doc.get("replication", {})
    peers_doc = doc.get("peers", {})
    for name, table in (("agent", agent), ("replication", repl), ("peers", peers_doc)):
        if not isinstance(table, dict):
            raise ConfigError(f"{path}: [{name}] must be a table")
    name = _get(agent, "name", str, "agent", "")
    if not name or not name.replace("-", "").replace("_", "").isalnum() or len(name) > 64:
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
        if peer_name == name:
            raise ConfigError(f"{path}: peer {peer_name!r} has this host's own name")
        p_host, p_port = _split_hostport(table.get("address"), f"{path}: peers.{peer_name}.address")
        peers[peer_name] = PeerSpec(peer_name, p_host, p_port)
    state_dir = _get(agent, "state_dir", str, "agent", "/var/lib/virtsync")
    return Config(
        name=name,
        listen_host=host,
        listen_port=port,
        socket=_get(agent, "socket", str, "agent", "/run/virtsync/agent.sock"),
        state_dir=state_dir,
        libvirt_uri=_get(agent, "libvirt_uri", str, "agent", "qemu:///system"),
        replication_address=rep_addr,
        replication_port=rep_port,
        storage=_get(repl, "storage", str, "replication", os.path.join(state_dir, "replicas")),
        peers=peers,
        cycle_timeout=_get(repl, "cycle_timeout", float, "replication", 600.0),
        stall_after=_get(repl, "stall_after", float, "replication", 10.0),
        min_cycle_interval=_get(repl, "min_cycle_interval", float, "replication", 1.0),
        speed_limit=_get(repl, "speed_limit", int, "replication", 0),
        path=path,
    )


def load(path: str = DEFAULT_PATH) -> Config:
    """Read and parse the config file.

    :raise ConfigError: the file is missing or unreadable, or :func:`parse` refuses it
    """
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read(1 << 20)
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    return parse(text, path)

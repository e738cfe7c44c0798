"""Pure builders of QMP arguments: the only place (with models.py) that spells
QMP wire names. Nothing here does I/O, so every builder is unit-tested against
golden JSON.

Everything virtsync creates in QEMU is named with :data:`OWNER_PREFIX`; a name
without it is foreign and is never created, changed or removed by us.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

OWNER_PREFIX = "vs-"

Args = dict[str, Any]
MirrorSync = Literal["full", "top"]
MirrorMode = Literal["background", "write-blocking"]
BackupSync = Literal["full", "top", "incremental", "bitmap"]


def owned(name: str) -> str:
    """Return ``name`` if it is ours; refuse to touch a foreign one.

    :raise ValueError: the name does not start with ``vs-``
    """
    if not isinstance(name, str) or not name.startswith(OWNER_PREFIX) or len(name) > 127:
        raise ValueError(f"refusing to manage {name!r}: virtsync names start with {OWNER_PREFIX!r}")
    return name


def _drop_none(args: Args) -> Args:
    return {k: v for k, v in args.items() if v is not None}


# -- block nodes --------------------------------------------------------------

def file_node(
    node_name: str, filename: str, *, direct: bool = False, read_only: bool = False, no_flush: bool = False
) -> Args:
    """A ``file`` protocol node; ``direct`` bypasses the host page cache;
    ``no_flush`` ignores flushes (scratch data that never needs to be durable)."""
    args: Args = {"driver": "file", "node-name": owned(node_name), "filename": filename}
    if direct or no_flush:
        args["cache"] = {"direct": direct, "no-flush": no_flush}
    if direct:
        args["aio"] = "native"
    if read_only:
        args["read-only"] = True
    return args


def qcow2_node(
    node_name: str,
    file: str | Mapping[str, Any],
    *,
    backing: str | None | Literal[False] = False,
    read_only: bool = False,
) -> Args:
    """A qcow2 format node over ``file`` (a node name or an inline node).

    :param backing: False to open the image's own backing chain, None to open
        it without backing (``"backing": null``, the journal-rotation recipe),
        or the node name to use as backing
    """
    args: Args = {"driver": "qcow2", "node-name": owned(node_name), "file": file}
    if backing is not False:
        args["backing"] = backing
    if read_only:
        args["read-only"] = True
    return args


def raw_node(node_name: str, file: str | Mapping[str, Any], *, read_only: bool = False) -> Args:
    args: Args = {"driver": "raw", "node-name": owned(node_name), "file": file}
    if read_only:
        args["read-only"] = True
    return args


def nbd_node(
    node_name: str,
    export: str,
    *,
    host: str | None = None,
    port: int | None = None,
    unix_path: str | None = None,
    tls_creds: str | None = None,
    tls_hostname: str | None = None,
    reconnect_delay: int | None = None,
    open_timeout: int | None = None,
) -> Args:
    """An NBD client node for a TCP or unix-socket export.

    ``server.port`` is a string on the wire (QAPI InetSocketAddress).
    """
    if (host is None) == (unix_path is None):
        raise ValueError("nbd_node needs exactly one of host/port or unix_path")
    if host is not None:
        if port is None or not 0 < port < 65536:
            raise ValueError(f"nbd_node: bad port {port!r}")
        server: Args = {"type": "inet", "host": host, "port": str(port)}
    else:
        server = {"type": "unix", "path": unix_path}
    return _drop_none({
        "driver": "nbd",
        "node-name": owned(node_name),
        "server": server,
        "export": export,
        "tls-creds": tls_creds,
        "tls-hostname": tls_hostname,
        "reconnect-delay": reconnect_delay,
        "open-timeout": open_timeout,
    })


def blockdev_del_args(node_name: str) -> Args:
    return {"node-name": owned(node_name)}


# -- jobs ---------------------------------------------------------------------

def mirror_args(
    job_id: str,
    device: str,
    target: str,
    *,
    sync: MirrorSync = "full",
    mode: MirrorMode = "background",
    buf_size: int | None = None,
    speed: int | None = None,
    granularity: int | None = None,
) -> Args:
    """``blockdev-mirror`` kept until we complete or cancel it ourselves."""
    return _drop_none({
        "job-id": owned(job_id),
        "device": device,
        "target": target,
        "sync": sync,
        "copy-mode": mode,
        "buf-size": buf_size,
        "speed": speed,
        "granularity": granularity,
        "auto-finalize": True,
        "auto-dismiss": False,
    })


def backup_args(
    job_id: str,
    device: str,
    target: str,
    *,
    sync: BackupSync = "full",
    bitmap: str | None = None,
    bitmap_mode: Literal["on-success", "never", "always"] | None = None,
    speed: int | None = None,
    max_workers: int | None = None,
    max_chunk: int | None = None,
) -> Args:
    """``blockdev-backup``; with ``sync=incremental`` the bitmap is cleared on
    success and its bits are merged back on failure (QEMU's bitmap sync policy)."""
    if sync in ("incremental", "bitmap") and bitmap is None:
        raise ValueError(f"backup sync={sync} needs a bitmap")
    perf = _drop_none({"max-workers": max_workers, "max-chunk": max_chunk}) or None
    return _drop_none({
        "job-id": owned(job_id),
        "device": device,
        "target": target,
        "sync": sync,
        "bitmap": bitmap,
        "bitmap-mode": bitmap_mode,
        "speed": speed,
        "x-perf": perf,
        "auto-finalize": True,
        "auto-dismiss": False,
    })


def job_id_args(job_id: str) -> Args:
    return {"id": owned(job_id)}


def set_speed_args(job_id: str, speed: int) -> Args:
    if speed < 0:
        raise ValueError("job speed must be >= 0 (0 = unlimited)")
    return {"device": owned(job_id), "speed": speed}


# -- dirty bitmaps ------------------------------------------------------------

def bitmap_add_args(
    node: str,
    name: str,
    *,
    persistent: bool = True,
    disabled: bool = False,
    granularity: int | None = None,
) -> Args:
    return _drop_none({
        "node": node,
        "name": owned(name),
        "persistent": persistent,
        "disabled": disabled or None,
        "granularity": granularity,
    })


def bitmap_args(node: str, name: str) -> Args:
    """Arguments of remove, clear, enable and disable."""
    return {"node": node, "name": owned(name)}


def bitmap_merge_args(node: str, target: str, sources: Sequence[str | Mapping[str, str]]) -> Args:
    """Merge ``sources`` (names on ``node``, or ``{node, name}``) into ``target``."""
    return {"node": node, "target": owned(target), "bitmaps": list(sources)}


# -- transactions -------------------------------------------------------------

def action(kind: str, data: Args) -> Args:
    """One transaction action, e.g. ``action("blockdev-backup", backup_args(...))``."""
    return {"type": kind, "data": data}


# QEMU 7.2 refuses completion-mode=grouped when any other action is present
# ("Action 'block-dirty-bitmap-add' does not support Transaction property").
GROUPABLE_ACTIONS = frozenset({"blockdev-backup", "drive-backup"})


def transaction_args(actions: Sequence[Args], *, grouped: bool = True) -> Args:
    """All actions at one instant; ``grouped`` makes the jobs succeed or fail
    together, so a cut is never half-taken.

    :raise ValueError: no action, or ``grouped`` with actions QEMU cannot group
        (bitmap changes): take such cuts ungrouped and treat any job failure
        as the failure of the whole cut
    """
    if not actions:
        raise ValueError("a transaction needs at least one action")
    if grouped:
        kinds = {str(a.get("type")) for a in actions}
        if not kinds <= GROUPABLE_ACTIONS:
            raise ValueError(
                f"completion-mode grouped supports only {sorted(GROUPABLE_ACTIONS)}, not {sorted(kinds - GROUPABLE_ACTIONS)}"
            )
    args: Args = {"actions": list(actions)}
    if grouped:
        args["properties"] = {"completion-mode": "grouped"}
    return args


# -- NBD exports --------------------------------------------------------------

def nbd_server_start_args(
    *,
    host: str | None = None,
    port: int | None = None,
    unix_path: str | None = None,
    tls_creds: str | None = None,
    max_connections: int | None = None,
) -> Args:
    """Start the NBD server on one address; a wildcard host is refused."""
    if (host is None) == (unix_path is None):
        raise ValueError("nbd server needs exactly one of host/port or unix_path")
    if host is not None:
        if host in ("", "0.0.0.0", "::", "[::]"):
            raise ValueError(f"refusing to listen on the wildcard address {host!r}")
        if port is None or not 0 <= port < 65536:
            raise ValueError(f"nbd server: bad port {port!r}")
        addr: Args = {"type": "inet", "data": {"host": host, "port": str(port)}}
    else:
        addr = {"type": "unix", "data": {"path": unix_path}}
    return _drop_none({"addr": addr, "tls-creds": tls_creds, "max-connections": max_connections})


def tls_creds_psk_args(
    object_id: str, *, endpoint: Literal["client", "server"], dir: str, username: str | None = None,
    priority: str | None = None,
) -> Args:
    """``object-add`` of a ``tls-creds-psk`` object (QEMU's TLS with a pre-shared key).

    The key never travels in QMP: QEMU reads ``dir/keys.psk`` (lines ``username:hexkey``).
    A client presents ``username`` and uses its line; a server accepts any line's user.
    ``priority`` is a GnuTLS priority string (QEMU appends its PSK key exchanges).
    """
    if endpoint not in ("client", "server"):
        raise ValueError(f"tls-creds-psk endpoint must be client or server, not {endpoint!r}")
    if not dir:
        raise ValueError("tls-creds-psk needs the directory holding keys.psk")
    if username is not None and endpoint != "client":
        raise ValueError("only a tls-creds-psk client has a username")
    if priority is not None and (not priority or not priority.isprintable() or "NULL" in priority.upper()):
        raise ValueError(f"refusing TLS priority {priority!r:.60}: empty, unprintable or allowing a NULL cipher")
    return _drop_none({"qom-type": "tls-creds-psk", "id": owned(object_id), "endpoint": endpoint, "dir": dir,
                       "username": username, "priority": priority})


def object_del_args(object_id: str) -> Args:
    return {"id": owned(object_id)}


def block_export_add_args(
    export_id: str, node: str, *, name: str | None = None, writable: bool = False,
    bitmaps: Sequence[str] | None = None,
) -> Args:
    return _drop_none({
        "type": "nbd",
        "id": owned(export_id),
        "node-name": node,
        "name": name or export_id,
        "writable": writable,
        "bitmaps": list(bitmaps) if bitmaps else None,
    })


def block_export_del_args(export_id: str, *, force: bool = False) -> Args:
    args: Args = {"id": owned(export_id)}
    if force:
        args["mode"] = "hard"
    return args

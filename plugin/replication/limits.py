"""What a peer may ask the secondary to hold, and how local commands name a replica.

A peer is trusted with its own replicas only: a ``prepare`` names a domain no
other peer's replica here uses (a name is what an administrator types on this
host), at most :data:`MAX_DISKS` disks, and sizes the storage can hold. Every
refusal is one line naming the thing and the rule; pure functions, so the unit
tier checks the rules over a space of inputs.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from ..domain import MAX_LABEL, label_problem
from ..errors import PluginError

__all__ = [
    "MAX_DISKS",
    "MAX_DISK_SIZE",
    "MAX_DOMAIN_NAME",
    "MAX_LABEL",
    "AmbiguousNameError",
    "PeerRequestError",
    "check_disk_count",
    "check_disk_size",
    "check_domain_name",
    "check_name_free",
    "check_room",
    "free_bytes",
    "human_size",
    "label_problem",
    "pick_replica",
]

#: libvirt's domain names kept file-name sized; the CLI takes the same (``cli.MAX_NAME``).
MAX_DOMAIN_NAME = 255
#: More disks than any domain here would have; each is an export, a node pair and a file per cycle.
MAX_DISKS = 64
#: Above what a qcow2 with 64 KiB clusters can address usefully; a peer asking more is wrong.
MAX_DISK_SIZE = 64 << 40


class PeerRequestError(PluginError):
    """A peer asked for something this host will not do (bad or stale request)."""

    exit_code = 2


class AmbiguousNameError(PluginError):
    """A domain name names replicas of several domains here: ``--from PEER`` or the uuid picks one."""

    exit_code = 2


def human_size(n: int) -> str:
    value = float(n)
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if value < 1024 or unit == "PiB":
            return f"{n} bytes" if unit == "bytes" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def check_domain_name(value: object) -> str:
    """A libvirt domain name as this host shows and takes it: 1-255 printable characters, no '/'.

    :raise PeerRequestError: the name breaks the rule
    """
    if not isinstance(value, str) or not value:
        raise PeerRequestError(f"domain name must be a non-empty string, not {value!r:.40}")
    if len(value) > MAX_DOMAIN_NAME:
        raise PeerRequestError(f"domain name {value[:20]!r}... is {len(value)} characters long, "
                               f"at most {MAX_DOMAIN_NAME}")
    if not value.isprintable() or "/" in value:
        raise PeerRequestError(f"domain name {value!r:.60} must be printable characters without '/'")
    return value


def free_bytes(path: str) -> int:
    """Bytes an unprivileged writer may still use on the file system of ``path``."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def check_disk_size(target: str, size: object) -> int:
    """A disk size in bytes: a whole number from 1 to :data:`MAX_DISK_SIZE`.

    :raise PeerRequestError: not a size, or too large
    """
    if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
        raise PeerRequestError(f"disk {target}: bad size {size!r:.30} (a whole number of bytes > 0)")
    if size > MAX_DISK_SIZE:
        raise PeerRequestError(f"disk {target}: bad size {human_size(size)}, more than the largest replica this "
                               f"host takes ({human_size(MAX_DISK_SIZE)})")
    return size


def check_room(new: Mapping[str, int], free: int) -> None:
    """Bytes about to be promised to disks (new replicas, or growth): together no more
    than the storage has free, since a thin replica can fill up to its size.

    :raise PeerRequestError: they do not fit
    """
    total = sum(new.values())
    if total > free:
        which = ", ".join(sorted(new))
        raise PeerRequestError(f"disks {which}: {human_size(total)} is more than the replica storage has free "
                               f"({human_size(free)})")


def check_disk_count(disks: Sequence[Any]) -> None:
    if not 1 <= len(disks) <= MAX_DISKS:
        raise PeerRequestError(f"prepare names {len(disks)} disks: a domain has 1 to {MAX_DISKS}")


def check_name_free(domain: str, uuid: str, owner: str, replicas: Iterable[Any]) -> None:
    """A peer's replica may not take a domain name another peer's replica here uses.

    :param replicas: this host's replicas: rows with ``domain``, ``domain_uuid`` and ``peer``
    :raise PeerRequestError: the name is taken
    """
    for other in replicas:
        if other["domain"] == domain and other["peer"] != owner and other["domain_uuid"] != uuid:
            # Which peer holds it is not the asker's business: the name alone.
            raise PeerRequestError(f"domain name {domain!r:.60} is already used here by another peer's replica: "
                                   "rename the domain")


def pick_replica(name: str, replicas: Iterable[Any], peer: str | None = None) -> Any:
    """The replica a local command means by ``name`` (a domain name or uuid), from ``peer`` if given.

    :param replicas: rows with ``domain``, ``domain_uuid`` and ``peer``
    :return: the row, None if nothing matches
    :raise AmbiguousNameError: the name matches several replicas
    """
    rows = list(replicas)
    if peer is not None:
        rows = [r for r in rows if r["peer"] == peer]
    by_uuid = [r for r in rows if r["domain_uuid"] == name]
    if by_uuid:
        return by_uuid[0]
    matches = [r for r in rows if r["domain"] == name]
    if len(matches) > 1:
        owners = sorted({str(r["peer"]) for r in matches})
        listed = ", ".join(f"{r['domain_uuid']} from {r['peer']}" for r in matches)
        how = "give --from PEER" if len(owners) > 1 else "give the domain's uuid instead of its name"
        raise AmbiguousNameError(f"domain name {name!r:.60} names {len(matches)} replicas here ({listed}): {how}")
    return matches[0] if matches else None

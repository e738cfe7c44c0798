"""Link faults between lab hosts, applied to a host's veth end inside its netns.

``link_down``/``link_up`` flip the interface (both ends lose carrier).
``netem`` prefers the kernel's netem qdisc; this machine's kernel has no packet
schedulers at all (``CONFIG_NET_SCH_NETEM`` unset, every ``tc qdisc add`` gives
ENOENT), so loss falls back to an nftables ``netdev`` egress chain that drops
``numgen random`` packets silently (an ``output`` hook would hand EPERM to the
sender instead of losing the packet). Delay has no such fallback and raises
:class:`NetFaultUnsupportedError`; tests needing it should skip on that error.
"""

from __future__ import annotations

import errno

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from tests.lab.host import LabError, LabHost

__all__ = ["NetFaultUnsupportedError", "clear_netem", "link_down", "link_up", "netem"]

_NFT_TABLE = "vslab_netfault"


class NetFaultUnsupportedError(LabError):
    """The kernel cannot emulate this fault."""


def _ifnames(host: LabHost, ifname: str | None) -> list[str]:
    if ifname is not None:
        return [ifname]
    if not host.links:
        raise LabError(f"{host.name}: no link to act on (use link_hosts first)")
    return [link.ifname for link in host.links]


def _set_state(host: LabHost, state: str, ifname: str | None) -> None:
    with IPRoute(netns=host.netns) as ipr:
        for name in _ifnames(host, ifname):
            ipr.link("set", index=ipr.link_lookup(ifname=name)[0], state=state)


def link_down(host: LabHost, ifname: str | None = None) -> None:
    """Take the host's veth end(s) down: the peer becomes unreachable at once."""
    _set_state(host, "down", ifname)


def link_up(host: LabHost, ifname: str | None = None) -> None:
    """Bring the host's veth end(s) back up (addresses stay configured)."""
    _set_state(host, "up", ifname)


def netem(host: LabHost, *, delay_ms: int = 0, loss_pct: float = 0.0, ifname: str | None = None) -> None:
    """Delay and/or drop packets leaving the host on its veth end(s).

    :raise NetFaultUnsupportedError: delay asked and the kernel lacks netem
    """
    clear_netem(host, ifname)
    names = _ifnames(host, ifname)
    try:
        with IPRoute(netns=host.netns) as ipr:
            for name in names:
                # pyroute2 takes the delay in microseconds and loss in percent.
                ipr.tc("add", "netem", index=ipr.link_lookup(ifname=name)[0], handle="1:",
                       delay=delay_ms * 1000, loss=loss_pct)
        return
    except NetlinkError as e:
        if e.code not in (errno.ENOENT, errno.EOPNOTSUPP, errno.EINVAL):
            raise
    if delay_ms:
        raise NetFaultUnsupportedError("this kernel has no netem qdisc (CONFIG_NET_SCH_NETEM): cannot delay")
    if loss_pct <= 0:
        return
    per_10k = round(loss_pct * 100)
    match = "" if per_10k >= 10000 else f"numgen random mod 10000 < {per_10k} "
    chains = "\n".join(
        f'  chain eg_{i} {{ type filter hook egress device "{name}" priority 0; policy accept; {match}drop; }}'
        for i, name in enumerate(names)
    )
    host.netns_run(["nft", "-f", "-"], input=f"table netdev {_NFT_TABLE} {{\n{chains}\n}}\n")


def clear_netem(host: LabHost, ifname: str | None = None) -> None:
    """Remove what :func:`netem` installed (qdisc or nftables table); idempotent."""
    with IPRoute(netns=host.netns) as ipr:
        for name in _ifnames(host, ifname):
            try:
                ipr.tc("del", index=ipr.link_lookup(ifname=name)[0], handle="1:")
            except NetlinkError:
                pass  # no qdisc of ours there
    host.netns_run(["nft", "delete", "table", "netdev", _NFT_TABLE], check=False)

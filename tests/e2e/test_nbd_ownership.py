"""NBD access is bound to ownership (issue 21): three agent identities on three lab hosts.

``pri`` protects a domain to ``dr``; ``evil`` is a peer ``dr`` trusts (keys exchanged
with the real ``virtsync keys`` commands) that owns no replica there. dr runs one NBD
server per peer, each knowing only that peer's key (plugin/replication/nbd_servers.py):
evil's server on the first port, pri's on the next.

While a cycle pri opened is in progress, from evil's own network namespace and with
evil's valid key, NBD clients (``qemu-nbd -L``, ``qemu-img``, ``qemu-io``) cannot list,
read or write pri's exports, neither on pri's server nor on evil's; pri's key reads them
(the positive control). Outside a cycle pri itself reaches nothing: its server lists no
export and the last cycle's export name opens nothing. evil cannot prepare a replica
under pri's domain name nor open a cycle of pri's domain through the peer API. Then
replication between pri and dr, with TLS, still gives the source's bytes.
"""

from __future__ import annotations

import json
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.lab.agent import NBD_PORT, LabAgent
from tests.lab.host import LabHost
from tests.lab.procs import run
from tests.lab.site import define_domain, make_image

pytestmark = pytest.mark.libvirt

ROOT = Path(__file__).resolve().parents[2]
DOMAIN = "vs-own"
OTHER_UUID = "5e0c3a1f-9b2d-4c6e-8f7a-1d2c3b4a5f6e"

# ``peer PEER OP JSON`` with the agent's own keys from its config, inside its host's netns.
PEER_SCRIPT = textwrap.dedent("""
    import asyncio, json, sys
    sys.path.insert(0, sys.argv[1])
    from plugin import config, errors, keys, peer

    async def main(config_path, name, op, body):
        cfg = config.load(config_path)
        kd = keys.KeysDir(cfg.keys_dir, cfg.name)
        ctx = peer.client_context(kd.cert_path, kd.key_path, kd.peer(name).cert_pem)
        client = peer.PeerClient(cfg.peers[name], ctx, timeout=30)
        try:
            print(json.dumps({"result": await client.call(op, json.loads(body))}))
        except errors.PluginError as e:
            print(json.dumps({"error": str(e)}))
        finally:
            await client.close()

    asyncio.run(main(*sys.argv[2:6]))
""")


def peer_call(agent: LabAgent, peer: str, op: str, body: dict[str, Any]) -> dict[str, Any]:
    res = agent.host.netns_run([sys.executable, "-c", PEER_SCRIPT, str(ROOT), str(agent.config), peer, op,
                                json.dumps(body)], timeout=90)
    reply: dict[str, Any] = json.loads(res.stdout.strip().splitlines()[-1])
    return reply


class Nbd:
    """NBD clients run by ``agent``'s host with the PSK it holds for ``dr`` (user = its name)."""

    def __init__(self, agent: LabAgent, server: str) -> None:
        self.host = agent.host
        self.server = server
        self.tls = ["--object", f"tls-creds-psk,id=t0,endpoint=client,dir={agent.keys_dir / 'dr'},"
                                f"username={agent.host.name}"]

    def list(self, port: int) -> tuple[int, str]:
        res = self.host.netns_run(["qemu-nbd", "-L", "-b", self.server, "-p", str(port), *self.tls,
                                   "--tls-creds", "t0"], check=False, timeout=30)
        return res.returncode, res.stdout + res.stderr

    def image(self, tool: list[str], port: int, export: str) -> tuple[int, str]:
        spec = f"driver=nbd,host={self.server},port={port},export={export},tls-creds=t0"
        res = self.host.netns_run([*tool, *self.tls, "--image-opts", spec], check=False, timeout=30)
        return res.returncode, res.stdout + res.stderr


READ = ["qemu-io", "-c", "read -v 0 512"]
WRITE = ["qemu-io", "-c", "write -P 0xee 0 64k"]
INFO = ["qemu-img", "info"]


def guest_write(host: LabHost, pattern: int, offset: str) -> None:
    """A write through the guest's disk device, as the guest would (HMP qemu-io)."""
    cmd = f'qemu-io -d /machine/peripheral/virtio-disk0/virtio-backend "write -P {pattern:#x} {offset} 64k"'
    reply = json.loads(host.virsh("qemu-monitor-command", DOMAIN, json.dumps(
        {"execute": "human-monitor-command", "arguments": {"command-line": cmd}})))
    assert reply.get("return") == "", reply


def expected(tmp_path: Path, writes: list[tuple[int, str]]) -> str:
    path = str(tmp_path / "expected.raw")
    run(["qemu-img", "create", "-q", "-f", "raw", path, "16M"])
    for pattern, offset in writes:
        run(["qemu-io", "-f", "raw", "-c", f"write -P {pattern:#x} {offset} 64k", path])
    return path


def refused(result: tuple[int, str]) -> str:
    code, out = result
    assert code != 0, out
    assert "wrote" not in out and "read 512/512" not in out and "virtual size" not in out, out
    return out


def test_a_peer_reaches_only_its_own_exports_and_only_in_a_cycle(
        lab_factory: Callable[..., list[LabHost]], tmp_path: Path) -> None:
    pri, dr, evil = lab_factory("pri", "dr", "evil")
    # dr serves on its address on the pri link; evil reaches it over its own link to dr.
    via = next(link.address for link in dr.links if link.peer == "evil")
    evil.netns_run(["ip", "route", "add", f"{dr.address}/32", "via", via])
    agents = {"pri": LabAgent(pri, {"dr": dr}), "dr": LabAgent(dr, {"pri": pri, "evil": evil}),
              "evil": LabAgent(evil, {"dr": dr})}   # evil's agent never runs: its keys are enough
    disk = make_image(Path(pri.root) / f"{DOMAIN}.qcow2", "16M")
    try:
        agents["pri"].start()
        agents["dr"].start()
        define_domain(pri, DOMAIN, disks=[(disk, "qcow2")])
        guest_write(pri, 0x11, "1M")
        agents["pri"].call("protect", domain=DOMAIN, to="dr", rpo=3600, wait=True)
        agents["pri"].call("suspend", domain=DOMAIN)   # no cycle of the agent's own meanwhile
        uuid = pri.virsh("domuuid", DOMAIN).strip()
        ports = {"evil": NBD_PORT, "pri": NBD_PORT + 1}   # dr's peers by name
        as_pri, as_evil = Nbd(agents["pri"], dr.address), Nbd(agents["evil"], dr.address)
        status = {p["name"]: p["nbd_server"] for p in agents["dr"].call("status")["peers"]}
        assert status == {name: f"{dr.address}:{port}" for name, port in ports.items()}

        seq = peer_call(agents["pri"], "dr", "info", {"uuid": uuid})["result"]["last_marker"] + 1
        cycle = peer_call(agents["pri"], "dr", "open_cycle",
                          {"uuid": uuid, "seq": seq, "kind": "incremental", "targets": ["vda"]})["result"]
        export = cycle["exports"]["vda"]
        try:
            assert cycle["port"] == ports["pri"]
            assert export.startswith(f"{uuid}-vda-") and len(export) >= len(uuid) + 5 + 32   # a random part
            # The owner's key lists and reads its export: the refusals below are about the key.
            code, out = as_pri.list(ports["pri"])
            assert code == 0 and "exports available: 1" in out and export in out, out
            code, out = as_pri.image(INFO, ports["pri"], export)
            assert code == 0 and "virtual size: 16 MiB" in out, out

            # evil, with its valid key, on pri's server: the TLS handshake fails.
            out = refused(as_evil.list(ports["pri"]))
            assert "TLS handshake failed" in out and export not in out, out
            for tool in (INFO, READ, WRITE):
                assert "TLS handshake failed" in refused(as_evil.image(tool, ports["pri"], export))
            # On its own server evil's key works, and pri's export is not there.
            code, out = as_evil.list(ports["evil"])
            assert code == 0 and "exports available: 0" in out, out
            for tool in (INFO, READ, WRITE):
                assert "export not available" in refused(as_evil.image(tool, ports["evil"], export))

            # evil cannot take pri's domain name, nor act on pri's replica, through the peer API.
            taken = peer_call(agents["evil"], "dr", "prepare", {
                "uuid": OTHER_UUID, "domain": DOMAIN, "primary": "evil", "protection": {},
                "disks": [{"target": "vda", "size": 1 << 20}]})
            assert "already used here by another peer's replica" in taken.get("error", ""), taken
            forbidden = peer_call(agents["evil"], "dr", "open_cycle",
                                  {"uuid": uuid, "seq": seq, "kind": "incremental", "targets": ["vda"]})
            assert "belongs to pri" in forbidden.get("error", ""), forbidden
        finally:
            peer_call(agents["pri"], "dr", "abort_cycle", {"uuid": uuid, "seq": seq})

        # Outside a cycle the owner itself reaches nothing.
        code, out = as_pri.list(ports["pri"])
        assert code == 0 and "exports available: 0" in out, out
        for tool in (INFO, READ, WRITE):
            assert "export not available" in refused(as_pri.image(tool, ports["pri"], export))

        # Replication between pri and dr still works, with TLS: the replica holds the source's bytes.
        agents["pri"].call("resume", domain=DOMAIN)
        guest_write(pri, 0x22, "5M")
        marker = agents["pri"].call("mark", domain=DOMAIN, wait=True)
        assert marker["seq"] == seq and marker["bytes"] == {"vda": 64 * 1024}
        views = agents["dr"].call("markers", domain=DOMAIN)["replica"]
        assert "Images are identical" in run(["qemu-img", "compare", "-F", "raw", views["vda"],
                                              expected(tmp_path, [(0x11, "1M"), (0x22, "5M")])])
        log = agents["dr"].log.read_text(errors="replace")
        assert "vs-qsd-pri pid" in log and f"serving NBD with TLS (PSK) on {dr.address}:{ports['pri']}" in log
    finally:
        for agent in agents.values():
            agent.stop()
        pri.virsh("destroy", DOMAIN, check=False)

"""Security of the wires between two lab hosts, proved from inside the lab network.

Both agents run with TLS, as LabAgent sets them up by default (the real ``virtsync
keys`` commands). A BIOS-only domain on ``pri`` is protected to ``sec`` and then
suspended, so no cycle of the agent's own runs meanwhile. Then, from inside pri's
network namespace (the only place that reaches sec's lab address):

- with pri's own certificate, the peer API opens a cycle: sec exports the segment over NBD;
- an NBD client with the right PSK reads the export (the positive control); with a
  wrong key, or without TLS, it can neither read nor write it;
- a client with another self-signed certificate, or plain HTTP, gets nothing from the
  peer API; the cycle is aborted and the replica is still byte-for-byte the source
  after the next marker;
- ``ss -ltnp`` in each host shows no wildcard listener of ours;
- no ``vs-`` TLS object is left in the primary's QEMU between cycles.
"""

from __future__ import annotations

import contextlib
import grp
import json
import os
import secrets
import stat
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from plugin import cli
from tests.lab.fixtures import LabPair
from tests.lab.host import LabHost
from tests.lab.procs import run
from tests.lab.site import Site, define_domain, make_image, open_site

pytestmark = pytest.mark.libvirt

ROOT = Path(__file__).resolve().parents[2]
DOMAIN = "vs-tls"

# Runs inside pri's netns: ``peer OP JSON`` as pri (its own keys), or ``rogue URL`` / ``plain URL``.
PEER_SCRIPT = textwrap.dedent("""
    import asyncio, json, ssl, sys, tempfile
    sys.path.insert(0, sys.argv[1])
    import aiohttp
    from plugin import config, errors, keys, peer

    async def main(mode, arg, body):
        cfg = config.load(sys.argv[2])
        if mode == "peer":
            kd = keys.KeysDir(cfg.keys_dir, cfg.name)
            spec = cfg.peers["sec"]
            ctx = peer.client_context(kd.cert_path, kd.key_path, kd.peer("sec").cert_pem)
            client = peer.PeerClient(spec, ctx, timeout=20)
            try:
                print(json.dumps({"result": await client.call(arg, json.loads(body))}))
            except errors.PluginError as e:
                print(json.dumps({"error": str(e)}))
            finally:
                await client.close()
            return
        ctx = None
        if mode == "rogue":
            rogue = keys.KeysDir(tempfile.mkdtemp(), "rogue", gid=False)
            rogue.ensure_identity()
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE   # the rogue would take any server: the server must refuse it
            ctx.load_cert_chain(rogue.cert_path, rogue.key_path)
        try:
            async with aiohttp.ClientSession() as s:
                async with s.post(arg, json={}, ssl=ctx if ctx else True, timeout=aiohttp.ClientTimeout(total=10)) as r:
                    print(json.dumps({"status": r.status, "body": (await r.text())[:200]}))
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as e:
            print(json.dumps({"refused": f"{type(e).__name__}: {e}"}))

    asyncio.run(main(sys.argv[3], sys.argv[4], sys.argv[5] if len(sys.argv) > 5 else "{}"))
""")


@pytest.fixture
def site(lab_pair: LabPair) -> Iterator[Site]:
    pri = lab_pair.pri
    disks = Path(pri.root) / "disks"
    disks.mkdir()
    define_domain(pri, DOMAIN, disks=[(make_image(disks / f"{DOMAIN}-a.qcow2", "16M"), "qcow2")])
    with open_site(lab_pair) as s:
        s.domains.append(DOMAIN)
        yield s


def in_pri(site: Site, *args: str) -> dict[str, Any]:
    res = site.hosts.pri.netns_run([sys.executable, "-c", PEER_SCRIPT, str(ROOT), str(site.pri.config), *args],
                                   timeout=60)
    return json.loads(res.stdout.strip().splitlines()[-1])


def nbd_client(host: LabHost, tool: list[str], cycle: dict[str, Any], psk_dir: str | None,
               username: str = "pri") -> tuple[int, str]:
    """``qemu-img``/``qemu-io`` in pri's netns against the cycle's export; (exit code, output)."""
    spec = f"driver=nbd,host={cycle['host']},port={cycle['port']},export={cycle['exports']['vda']}"
    argv = [*tool]
    if psk_dir is not None:
        argv += ["--object", f"tls-creds-psk,id=vs-t,endpoint=client,dir={psk_dir},username={username}"]
        spec += ",tls-creds=vs-t"
    res = host.netns_run([*argv, "--image-opts", spec], check=False, timeout=30)
    return res.returncode, res.stdout + res.stderr


def wildcard_listeners(host: LabHost) -> list[str]:
    out = host.netns_run(["ss", "-Hltnp"]).stdout
    bad = []
    for line in out.splitlines():
        fields = line.split()
        local = fields[3] if len(fields) > 3 else ""
        address = local.rpartition(":")[0]
        if address in ("0.0.0.0", "*", "[::]", "::", "[::ffff:0.0.0.0]") and \
                any(name in line for name in ('"python', '"qemu-storage-d', '"virtsyncd')):
            bad.append(line)
    return bad


def test_tls_keeps_strangers_out(site: Site, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pri = site.hosts.pri
    code = cli.main(["protect", DOMAIN, "--to", "sec", "--rpo", "3600", "--wait", "--socket", site.pri.socket])
    capsys.readouterr()
    assert code == 0
    site.pri.call("suspend", domain=DOMAIN)
    uuid = pri.virsh("domuuid", DOMAIN).strip()

    # The local socket is 0660 for the libvirt group; state and keys are private.
    for agent, other in ((site.pri, "sec"), (site.sec, "pri")):
        st = os.stat(agent.socket)
        assert stat.S_IMODE(st.st_mode) == 0o660
        with contextlib.suppress(KeyError):
            assert st.st_gid == grp.getgrnam("libvirt").gr_gid
        assert stat.S_IMODE(os.stat(agent.dir / "state").st_mode) == 0o700
        assert stat.S_IMODE(os.stat(agent.dir / "state" / "run" / "nbd" / other / "psk" / "keys.psk").st_mode) == 0o600
        assert stat.S_IMODE(os.stat(agent.keys_dir / "agent.key").st_mode) == 0o600

    # Nothing of ours listens on a wildcard address, on either host.
    for host in site.hosts:
        listeners = host.netns_run(["ss", "-Hltnp"]).stdout
        assert "qemu-storage-d" in listeners and "python" in listeners, listeners
        assert wildcard_listeners(host) == [], listeners

    # pri's own certificate opens a cycle: sec exports a writable segment.
    info = in_pri(site, "peer", "info", json.dumps({"uuid": uuid}))["result"]
    seq = info["last_marker"] + 1
    opened = in_pri(site, "peer", "open_cycle", json.dumps({"uuid": uuid, "seq": seq, "kind": "incremental",
                                                            "targets": ["vda"]}))
    cycle = opened["result"]
    try:
        # The right key reads the export (so the refusals below are about the key, not the setup).
        good_dir = str(site.pri.keys_dir / "sec")
        code, out = nbd_client(pri, ["qemu-img", "info"], cycle, good_dir)
        assert code == 0 and "virtual size: 16 MiB" in out, out

        wrong = tmp_path / "wrong"
        wrong.mkdir(mode=0o700)
        (wrong / "keys.psk").write_text(f"pri:{secrets.token_hex(32)}\n")
        wrong_user = tmp_path / "wrong-user"
        wrong_user.mkdir(mode=0o700)
        (wrong_user / "keys.psk").write_text(f"dr9:{(site.pri.keys_dir / 'sec' / 'keys.psk').read_text().split(':')[1]}")
        for tool in (["qemu-img", "info"], ["qemu-io", "-c", "write -P 0x66 0 64k"]):
            for psk_dir, user in ((str(wrong), "pri"), (str(wrong_user), "dr9"), (None, "")):
                code, out = nbd_client(pri, tool, cycle, psk_dir, user)
                assert code != 0, (tool, psk_dir, out)
                assert "wrote" not in out and "virtual size" not in out, out
                assert "TLS" in out, out   # refused at the TLS layer, not for another reason

        # The peer API: another self-signed certificate, or plain HTTP, gets nothing.
        url = f"{site.hosts.sec.address}:8441/v1/info"
        rogue = in_pri(site, "rogue", f"https://{url}")
        assert "refused" in rogue, rogue
        plain = in_pri(site, "plain", f"http://{url}")
        assert "refused" in plain, plain
    finally:
        in_pri(site, "peer", "abort_cycle", json.dumps({"uuid": uuid, "seq": seq}))

    # Nothing reached the replica: the next marker still gives a byte-for-byte copy.
    site.pri.call("resume", domain=DOMAIN)
    marker = site.pri.call("mark", domain=DOMAIN, wait=True)
    assert marker["seq"] == seq
    views = site.sec.call("markers", domain=DOMAIN)["replica"]
    source = str(Path(pri.root) / "disks" / f"{DOMAIN}-a.qcow2")
    run(["qemu-img", "compare", "-U", source, views["vda"]])
    # The primary's TLS object lives only as long as a cycle's NBD nodes.
    objects = json.loads(pri.virsh("qemu-monitor-command", DOMAIN,
                                   json.dumps({"execute": "qom-list", "arguments": {"path": "/objects"}})))
    assert [o["name"] for o in objects["return"] if o["name"].startswith("vs-")] == []

"""QMP argument builders against golden JSON (``pytest --regenerate`` rewrites)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from qemu_blockdev import commands as c

GOLDEN = Path(__file__).parent.parent / "data" / "commands"

CASES: dict[str, Any] = {
    "file_direct": lambda: c.file_node("vs-f", "/var/lib/virtsync/r.qcow2", direct=True),
    "qcow2_no_backing": lambda: c.qcow2_node("vs-seg2", "vs-seg2-file", backing=None),
    "qcow2_own_chain": lambda: c.qcow2_node("vs-seg2", {"driver": "file", "filename": "/x"}, read_only=True),
    "raw": lambda: c.raw_node("vs-r", "vs-r-file"),
    "nbd_tls": lambda: c.nbd_node("vs-nbd0", "web01-vda", host="10.250.0.2", port=10809,
                                  tls_creds="vs-tls-dr1", reconnect_delay=5),
    "nbd_unix": lambda: c.nbd_node("vs-nbd0", "e", unix_path="/run/virtsync/nbd.sock"),
    "mirror_blocking": lambda: c.mirror_args("vs-m", "drive-virtio-disk0", "vs-nbd0", mode="write-blocking",
                                             buf_size=64 << 20, speed=0),
    "backup_incremental": lambda: c.backup_args("vs-b", "disk0", "vs-nbd0", sync="incremental",
                                                bitmap="vs-dirty", max_workers=8),
    "bitmap_add": lambda: c.bitmap_add_args("disk0", "vs-dirty", granularity=65536),
    "bitmap_merge": lambda: c.bitmap_merge_args("disk0", "vs-tmp", ["vs-dirty", {"node": "n", "name": "vs-x"}]),
    "transaction_grouped": lambda: c.transaction_args([
        c.action("blockdev-backup", c.backup_args("vs-b0", "d0", "vs-n0", sync="incremental", bitmap="vs-dirty")),
        c.action("blockdev-backup", c.backup_args("vs-b1", "d1", "vs-n1", sync="incremental", bitmap="vs-dirty")),
    ]),
    "transaction_first_cut": lambda: c.transaction_args([
        c.action("block-dirty-bitmap-add", c.bitmap_add_args("d0", "vs-dirty")),
        c.action("blockdev-backup", c.backup_args("vs-b0", "d0", "vs-n0")),
    ], grouped=False),
    "nbd_server": lambda: c.nbd_server_start_args(host="10.250.0.2", port=10809, tls_creds="vs-tls"),
    "export_add": lambda: c.block_export_add_args("vs-exp-0", "vs-seg1", name="web01-vda", writable=True),
    "export_del": lambda: c.block_export_del_args("vs-exp-0", force=True),
    "tls_psk_client_aes": lambda: c.tls_creds_psk_args("vs-tls-nbd", endpoint="client", dir="/etc/virtsync/keys/dr1",
                                                       username="pri", priority="NORMAL:-CIPHER-ALL:+AES-128-GCM"),
    "tls_psk_client": lambda: c.tls_creds_psk_args("vs-tls-dr1", endpoint="client", dir="/etc/virtsync/keys/dr1",
                                                   username="pri"),
    "tls_psk_server": lambda: c.tls_creds_psk_args("vs-tls-server", endpoint="server", dir="/run/x/nbd-psk"),
    "object_del": lambda: c.object_del_args("vs-tls-dr1"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_builder_matches_golden(name: str, regenerate: bool) -> None:
    got = CASES[name]()
    path = GOLDEN / f"{name}.json"
    if regenerate or not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(got, indent=2, sort_keys=True) + "\n")
        if not regenerate:
            pytest.fail(f"golden file {path} was missing and has been written; review and commit it")
    assert got == json.loads(path.read_text())


@pytest.mark.parametrize("call, message", [
    (lambda: c.file_node("disk0", "/x"), "refusing to manage 'disk0'"),
    (lambda: c.bitmap_args("disk0", "libvirt-chk"), "refusing to manage 'libvirt-chk'"),
    (lambda: c.nbd_node("vs-n", "e"), "exactly one of"),
    (lambda: c.nbd_node("vs-n", "e", host="h", port=70000), "bad port"),
    (lambda: c.backup_args("vs-b", "d", "t", sync="incremental"), "needs a bitmap"),
    (lambda: c.transaction_args([]), "at least one action"),
    (lambda: c.transaction_args([c.action("block-dirty-bitmap-add", {})]), "grouped supports only"),
    (lambda: c.nbd_server_start_args(host="0.0.0.0", port=10809), "wildcard"),
    (lambda: c.nbd_server_start_args(host="::", port=10809), "wildcard"),
    (lambda: c.set_speed_args("vs-j", -1), ">= 0"),
    (lambda: c.tls_creds_psk_args("vs-t", endpoint="server", dir="/k", priority="NORMAL:+NULL"), "NULL cipher"),
    (lambda: c.tls_creds_psk_args("tls0", endpoint="client", dir="/k"), "refusing to manage 'tls0'"),
    (lambda: c.tls_creds_psk_args("vs-t", endpoint="both", dir="/k"), "client or server"),  # type: ignore[arg-type]
    (lambda: c.tls_creds_psk_args("vs-t", endpoint="server", dir="/k", username="u"), "only a tls-creds-psk client"),
    (lambda: c.tls_creds_psk_args("vs-t", endpoint="client", dir=""), "directory"),
    (lambda: c.object_del_args("secret0"), "refusing to manage"),
])
def test_bad_arguments_are_refused(call: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()

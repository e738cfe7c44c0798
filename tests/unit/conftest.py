"""Fixtures shared by the unit tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from plugin.keys import KeysDir


@pytest.fixture
def pri_keys(tmp_path: Path) -> KeysDir:
    """Agent pri's keys in ``tmp_path/keys``: its identity, its NBD key for peer sec and
    sec's certificate pinned (sec's own keys in ``tmp_path/other``). Needs openssl."""
    kd = KeysDir(str(tmp_path / "keys"), "pri", gid=False)
    kd.ensure_identity()
    kd.ensure_psk("sec")
    other = KeysDir(str(tmp_path / "other"), "sec", gid=False)
    other.ensure_identity()
    kd.import_cert("sec", other.cert_path)
    return kd

"""Every parser of outside data, under hypothesis: it returns, or raises the project's own
error (a :class:`~plugin.errors.PluginError`) with a one-line message; never anything else.

Outside data: the config file (:func:`plugin.config.parse`), IPC request lines
(:func:`plugin.ipc._parse_request`), peer API bodies (the handlers of
``Agent._peer_handlers`` over a fake secondary, and the secondary's own checks),
domain XML (:func:`plugin.virt.domains.parse_disks`) and journal marker records read
back from the database (:func:`plugin.replication.journal.verify_record`).
"""

from __future__ import annotations

import asyncio
import json
import math
from typing import Any
from xml.sax.saxutils import quoteattr

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from plugin import config, ipc
from plugin.config import Config
from plugin.daemon import Agent
from plugin.errors import ConfigError, JournalCorruptError, PluginError
from plugin.replication import journal
from plugin.replication.secondary import check_target, check_uuid
from plugin.virt import domains

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
UUID = "0f6b2d1e-6a4c-4d55-9a53-2b8f7a1c9e01"


def one_line(e: BaseException) -> None:
    message = str(e)
    assert "\n" not in message and "\r" not in message, repr(message)


# -- JSON-like values -----------------------------------------------------------------------

scalars = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=30),
                    st.sampled_from(["", "vda", UUID, "full", "incremental", "pri", "../x", "\x00", "a" * 300]))
json_values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=10), inner, max_size=4)), max_leaves=12)


# -- the config file ---------------------------------------------------------------------------

def _quoted(text: str) -> str:
    """A TOML basic string: JSON's escapes are TOML's, except the surrogate pairs ensure_ascii makes."""
    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf") if math.isinf(value) else repr(value)
    if isinstance(value, str):
        return _quoted(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_quoted(k)} = {toml_value(v)}" for k, v in value.items()) + "}"
    return '""'


GOOD_CONFIG: dict[str, dict[str, Any]] = {
    "agent": {"name": ["pri", "a-b_1", "x" * 64], "listen": ["10.250.0.1:8441", "[fd00::1]:9000", "localhost:8441"],
              "socket": ["/run/virtsync/agent.sock"], "socket_group": ["libvirt", "kvm"],
              "state_dir": ["/var/lib/virtsync"], "keys_dir": ["/etc/virtsync/keys"], "libvirt_uri": ["qemu:///system"]},
    "replication": {"address": ["10.250.0.1", "fd00::1"], "port": [10809, 1], "storage": ["/srv/r"],
                    "cycle_timeout": [600, 0.5], "stall_after": [10.0], "min_cycle_interval": [0, 1.5],
                    "speed_limit": [0, 1 << 20]},
    "journal": {"apply_delay": [0, 2.5], "retain_markers": [0, 4], "retain_seconds": [0.0], "max_bytes": [0, 1 << 30],
                "on_full": ["refuse", "apply"]},
}
plausible = st.one_of(json_values, st.sampled_from([
    "pri", "10.250.0.1:8441", "0.0.0.0:8441", "[::]:8441", "127.0.0.1", "::ffff:0.0.0.0", "[::0]:1", "localhost:1",
    "/var/lib/virtsync", "", 0, 1, 65536, -1, 10809, 2.5, True, "refuse", "apply", "qemu:///system", "x\x00y"]))


@st.composite
def table(draw: st.DrawFn, good: dict[str, list[Any]]) -> dict[str, Any]:
    """Mostly good values, some wrong ones, some keys missing, now and then an unknown key."""
    out = {}
    for key, choices in good.items():
        roll = draw(st.integers(0, 19))
        if roll < 17:
            out[key] = draw(st.sampled_from(choices))
        elif roll < 19:
            out[key] = draw(plausible)
    if draw(st.integers(0, 9)) == 0:
        out[draw(st.text(min_size=1, max_size=8))] = draw(plausible)
    return out


@st.composite
def config_texts(draw: st.DrawFn) -> str:
    doc: dict[str, dict[str, Any]] = {}
    for section, good in GOOD_CONFIG.items():
        if section == "agent" or draw(st.booleans()):
            doc[section] = draw(table(good))
    peers = draw(st.dictionaries(st.sampled_from(["dr1", "dr-2", "pri", "a b", "", "x" * 70, "\u00e9"]),
                                 table({"address": ["10.250.0.2:8441", "[fd00::2]:1"],
                                        "insecure_plain": [True, False]}), max_size=3))
    if draw(st.integers(0, 9)) == 0:
        doc[draw(st.sampled_from(["resources", "bogus", "peers"]))] = {"x": draw(plausible)}
    lines = []
    for section, values in doc.items():
        lines.append(f"[{section}]")
        lines += [f"{_quoted(k)} = {toml_value(v)}" for k, v in values.items()]
    for name, values in peers.items():
        lines.append(f"[peers.{_quoted(name)}]")
        lines += [f"{_quoted(k)} = {toml_value(v)}" for k, v in values.items()]
    return "\n".join(lines) + "\n"


@SETTINGS
@given(st.one_of(config_texts(), st.text(max_size=300)))
@example('[agent]\nname = "pri"\nlisten = "10.250.0.1:8441"\n[peers.a]\naddress = "10.0.0.2:1"\ninsecure_plain = 1\n')
@example('[agent]\nname = "pri"\nlisten = "10.250.0.1:8441"\nsocket_group = ""\n')
def test_config_parse(text: str) -> None:
    try:
        cfg = config.parse(text, "/etc/virtsync/fuzz.toml")
    except ConfigError as e:
        one_line(e)
        assert "/etc/virtsync/fuzz.toml" in str(e)
        return
    assert isinstance(cfg, Config)
    assert cfg.listen_host not in config.WILDCARDS and cfg.replication_address not in config.WILDCARDS
    assert 0 < cfg.listen_port < 65536 and 0 < cfg.replication_port < 65536


# -- IPC request lines ------------------------------------------------------------------------

requests = st.one_of(
    st.binary(max_size=200),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.fixed_dictionaries({}, optional={"v": st.one_of(st.just(1), scalars), "op": scalars,
                                        "args": json_values}).map(lambda v: json.dumps(v).encode()),
)


@SETTINGS
@given(requests)
@example(b"[" * 100000)
@example(b'{"v": true, "op": "status"}')
@example(b'{"v": 1.0, "op": "status"}')
def test_ipc_request_parser(line: bytes) -> None:
    try:
        op, args = ipc._parse_request(line)
    except ipc.BadRequestError as e:
        one_line(e)
        return
    assert isinstance(op, str) and op and isinstance(args, dict)


# -- peer API bodies ------------------------------------------------------------------------------

class FakeSecondary:
    """Accepts whatever the handlers pass on (the handlers' own checks are under test); records calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[Any, ...]]] = []

    def authorize(self, uuid: str, caller: str) -> None:
        check_uuid(uuid)

    def info(self, uuid: str) -> dict[str, Any]:
        self.calls.append(("info", (uuid,)))
        return {}

    def __getattr__(self, name: str) -> Any:
        async def op(*args: Any) -> dict[str, Any]:
            self.calls.append((name, args))
            return {}
        return op


GOOD_BODIES: dict[str, dict[str, Any]] = {
    "health": {},
    "info": {"uuid": UUID},
    "prepare": {"uuid": UUID, "domain": "web01", "primary": "pri", "disks": [{"target": "vda", "size": 1 << 20}],
                "protection": {"segment": "default", "rpo": 300, "mode": "async"}},
    "open_cycle": {"uuid": UUID, "seq": 1, "kind": "full", "targets": ["vda"], "sizes": {"vda": 1 << 20}},
    "commit_cycle": {"uuid": UUID, "seq": 1, "cut_time": 5.0, "bytes": {"vda": 0}, "label": "", "apply": True},
    "abort_cycle": {"uuid": UUID, "seq": 1},
    "remove": {"uuid": UUID, "keep_replica": False},
    "retire": {"uuid": UUID, "target": "vda"},
}


@st.composite
def peer_requests(draw: st.DrawFn) -> tuple[str, dict[str, Any]]:
    """A good body of one operation with 0-3 changes: a key dropped, a value replaced, a key added."""
    op = draw(st.sampled_from(sorted(GOOD_BODIES)))
    body = dict(GOOD_BODIES[op])
    for _ in range(draw(st.integers(0, 3))):
        change = draw(st.sampled_from(["drop", "replace", "add"]))
        if change == "drop" and body:
            body.pop(draw(st.sampled_from(sorted(body))))
        elif change == "replace" and body:
            body[draw(st.sampled_from(sorted(body)))] = draw(json_values)
        else:
            body[draw(st.text(max_size=8))] = draw(json_values)
    return op, body


_handlers: dict[str, Any] = {}


def peer_handlers() -> dict[str, Any]:
    if not _handlers:
        agent = Agent(Config(name="sec", listen_host="127.0.0.1", listen_port=8441))
        agent.secondary = FakeSecondary()  # type: ignore[assignment]
        _handlers.update(agent._peer_handlers())
    return _handlers


@SETTINGS
@given(peer_requests())
def test_peer_handlers(request: tuple[str, dict[str, Any]]) -> None:
    op, body = request
    handler = peer_handlers().get(op)
    assert handler is not None, f"the peer API has no {op} handler"
    try:
        asyncio.run(handler(body, "pri"))
    except PluginError as e:
        one_line(e)


@SETTINGS
@given(st.one_of(scalars, json_values))
def test_secondary_name_checks(value: Any) -> None:
    for check in (check_uuid, check_target):
        try:
            out = check(value)
        except PluginError as e:
            one_line(e)
            continue
        assert isinstance(out, str) and "/" not in out and out not in (".", "..")


# -- domain XML --------------------------------------------------------------------------------------

attr_values = st.one_of(st.text(max_size=12), st.sampled_from(["vda", "disk", "cdrom", "file", "qcow2", ""]))


@st.composite
def domain_xml(draw: st.DrawFn) -> str:
    disks = []
    for _ in range(draw(st.integers(0, 4))):
        parts = []
        for child, attr in (("target", "dev"), ("source", "file"), ("driver", "type"), ("alias", "name")):
            if draw(st.booleans()):
                parts.append(f"<{child} {attr}={quoteattr(draw(attr_values))}/>")
        if draw(st.booleans()):
            parts.append("<readonly/>")
        attrs = " ".join(f"{a}={quoteattr(draw(attr_values))}" for a in ("type", "device") if draw(st.booleans()))
        disks.append(f"<disk {attrs}>{''.join(parts)}</disk>")
    junk = draw(st.sampled_from(["", "<devices/>", "<!-- x -->", draw(st.text(max_size=20))]))
    return f"<domain><devices>{''.join(disks)}</devices>{junk}</domain>"


BILLION_LAUGHS = ('<?xml version="1.0"?><!DOCTYPE d [<!ENTITY a "aaaaaaaaaa">'
                  + "".join(f'<!ENTITY {chr(98 + i)} "{("&" + chr(97 + i) + ";") * 10}">' for i in range(8))
                  + ']><domain><devices><disk><target dev="&i;"/></disk></devices></domain>')


@SETTINGS
@given(st.one_of(domain_xml(), st.text(max_size=200)))
@example(BILLION_LAUGHS)
@example("<domain><devices><disk><target dev='vda'/></disk><disk><target dev='vda'/></disk></devices></domain>")
@example("\x00")
def test_parse_disks(xml: str) -> None:
    try:
        disks = domains.parse_disks(xml)
    except PluginError as e:
        one_line(e)
        return
    targets = [d.target for d in disks]
    assert all(targets) and len(set(targets)) == len(targets)


# -- journal marker records ---------------------------------------------------------------------------

def good_record(seq: int) -> dict[str, Any]:
    disks, nbytes, segments = ["vda"], {"vda": 65536}, {"vda": {"size": 1, "sha256": "0" * 64}}
    return {"seq": seq, "cut_time": 5.0, "disks": json.dumps(disks), "bytes": json.dumps(nbytes), "label": "",
            "apply": 1, "segments": json.dumps(segments),
            "crc": journal.record_crc(seq, 5.0, disks, nbytes, "", True, segments)}


FIELDS = ["seq", "cut_time", "disks", "bytes", "label", "apply", "segments", "crc"]
field_values = st.one_of(scalars, json_values, json_values.map(json.dumps))


@SETTINGS
@given(st.one_of(
    st.dictionaries(st.sampled_from(FIELDS), field_values, max_size=8),
    st.tuples(st.sampled_from(FIELDS), field_values).map(lambda kv: {**good_record(3), kv[0]: kv[1]}),
    st.sampled_from(FIELDS).map(lambda k: {f: v for f, v in good_record(3).items() if f != k}),
), st.one_of(st.just(3), st.integers(min_value=-3, max_value=2**64)))
@example(good_record(3), 3)
def test_verify_record(row: dict[str, Any], expected: int) -> None:
    try:
        segments = journal.verify_record(row, expected)
    except JournalCorruptError as e:
        one_line(e)
        return
    assert isinstance(segments, dict)


def test_verify_record_accepts_a_good_record() -> None:
    assert journal.verify_record(good_record(3), 3) == {"vda": {"size": 1, "sha256": "0" * 64}}

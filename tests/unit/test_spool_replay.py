"""The hook spool's replay: in order, each entry dropped only after it ran, so an agent
killed mid-replay (a real SIGKILL at the fault point ``hook-replay-entry``) loses
nothing: its next start replays the rest."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from plugin import hook
from plugin.state import Store

ROOT = Path(__file__).resolve().parents[2]
CALLS = [{"domain": "vsa", "op": "stopped", "sub_op": "end", "extra": "-"},
         {"domain": "vsb", "op": "prepare", "sub_op": "begin", "extra": "-"},
         {"domain": "vsc", "op": "release", "sub_op": "end", "extra": "-"}]

# The agent's own replay, as its start runs it, in a process of its own.
REPLAY = """
import asyncio, sys
from plugin.config import Config
from plugin.daemon import Agent
from plugin.state import Store
cfg = Config(name="pri", listen_host="127.0.0.1", listen_port=8441, state_dir=sys.argv[1])
agent = Agent(cfg)
agent.store = Store(cfg.db_path)
asyncio.run(agent.tracking.replay_spool())
"""


def replay(state: Path, fault: str | None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VIRTSYNC_FAULT")}
    if fault:
        env["VIRTSYNC_FAULT"] = fault
    return subprocess.run([sys.executable, "-c", REPLAY, str(state)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)


def replayed(state: Path) -> list[str]:
    """The domains of the hook calls in the audit log, oldest first."""
    from plugin.config import Config
    store = Store(Config(name="pri", listen_host="127.0.0.1", listen_port=8441, state_dir=str(state)).db_path)
    try:
        rows = [r for r in reversed(store.audit_log(limit=100)) if r["event"] == "hook"]
        assert all(r["detail"]["replayed"] for r in rows)
        return [r["detail"]["domain"] for r in rows]
    finally:
        store.close()


def test_an_agent_killed_mid_replay_loses_no_spooled_call(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    spool = hook.spool_path(str(state))
    Path(spool).write_text("".join(json.dumps(c) + "\n" for c in CALLS))
    os.chmod(spool, 0o600)

    killed = replay(state, "hook-replay-entry")
    assert killed.returncode == -9, killed.stderr
    # Killed after the first call ran and before it was dropped: all three are still there.
    assert replayed(state) == ["vsa"]
    assert hook.read_spool(spool) == CALLS

    done = replay(state, None)
    assert done.returncode == 0, done.stderr
    # The rest ran, in order; the first again (replaying is idempotent): nothing lost.
    assert replayed(state) == ["vsa", "vsa", "vsb", "vsc"]
    assert hook.read_spool(spool) == []
    assert not os.path.exists(spool + hook.REPLAY_SUFFIX)


def test_each_entry_leaves_the_spool_only_after_it_ran(tmp_path: Path) -> None:
    spool = str(tmp_path / "hook-spool.jsonl")
    Path(spool).write_text("".join(json.dumps(c) + "\n" for c in CALLS))
    entries = hook.read_spool(spool)
    hook.keep_unreplayed(spool, entries[1:])
    Path(spool).write_text(json.dumps({"domain": "vsd", "op": "started"}) + "\n")   # spooled meanwhile
    assert hook.read_spool(spool) == CALLS[1:] + [{"domain": "vsd", "op": "started"}]
    hook.keep_unreplayed(spool, [])
    assert hook.read_spool(spool) == []

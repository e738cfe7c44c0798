"""Start-up never destroys (issue 21 item 3), on a lab host with its own libvirtd.

Agents run on ``pri`` and ``sec``; pri protects a BIOS-only domain. Then, as a careless
admin would:

- a second ``virtsyncd`` on the same config (same state dir, same socket) refuses in one
  line, and the first agent's socket is still there (same inode) and still answers;
- an agent whose socket path is a regular file refuses in one line and the file is intact;
- a raw-socket ``mark`` with a label the secondary refuses is refused before a cycle is cut;
- ``restore --to`` under /proc, onto a regular file or with a NUL: one line each;
- SIGTERM stops the first agent cleanly: no traceback in its log (libvirtaio's
  ``Event loop is closed`` was logged twice), nor the storage daemon's retried QMP
  connects of its start (issue 12), and it removes its own socket.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from plugin import cli
from plugin.requests import UsageError
from tests.lab.agent import LabAgent
from tests.lab.fixtures import LabPair
from tests.lab.site import define_domain, make_image, open_site

pytestmark = pytest.mark.libvirt

ROOT = Path(__file__).resolve().parents[2]
DOMAIN = "vs-start"


def virtsyncd(agent: LabAgent, config: Path) -> subprocess.CompletedProcess[str]:
    """``virtsyncd --config CONFIG`` in the agent's host, to its end."""
    argv = ["ip", "netns", "exec", agent.host.netns, sys.executable, "-m", "plugin.daemon", "--config", str(config)]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=ROOT,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))


def test_a_second_agent_and_a_file_at_the_socket_path_destroy_nothing(lab_pair: LabPair) -> None:
    pri = lab_pair.pri
    disks = Path(pri.root) / "disks"
    disks.mkdir()
    define_domain(pri, DOMAIN, disks=[(make_image(disks / f"{DOMAIN}.qcow2", "16M"), "qcow2")])
    with open_site(lab_pair) as site:
        site.domains.append(DOMAIN)
        agent = site.pri
        assert cli.main(["protect", DOMAIN, "--to", "sec", "--rpo", "600", "--wait", "--socket", agent.socket]) == 0
        before = os.lstat(agent.socket)

        second = virtsyncd(agent, agent.config)
        assert second.returncode == 2, second
        assert second.stderr.strip().splitlines() == [
            f"ConfigError: another virtsyncd already uses {agent.dir / 'state'}"], second.stderr
        after = os.lstat(agent.socket)
        assert (after.st_dev, after.st_ino) == (before.st_dev, before.st_ino)
        assert agent.call("status")["host"] == "pri"   # the first agent still answers

        # Another state dir, its socket path taken by a regular file.
        squatter = agent.dir / "not-a-socket"
        squatter.write_text("keep me\n")
        other = agent.dir / "other.toml"
        other.write_text(agent.config.read_text()
                         .replace(str(agent.dir / "state"), str(agent.dir / "state2"))
                         .replace(agent.socket, str(squatter)))
        refused = virtsyncd(agent, other)
        assert refused.returncode != 0
        assert refused.stderr.strip().splitlines() == [
            f"IpcError: {squatter} exists and is not a socket: refusing to use or replace it (agent.socket)"]
        assert squatter.read_text() == "keep me\n"
        assert agent.call("status")["host"] == "pri"

        # Item 6: a label the secondary would refuse is refused before any cycle is cut.
        markers = site.sec.call("markers", domain=DOMAIN)["markers"]
        for label in ("x" * 129, "bad\nlabel"):
            with pytest.raises(UsageError, match="at most 128 printable characters") as refusal:
                agent.call("mark", domain=DOMAIN, label=label)
            assert type(refusal.value) is UsageError and refusal.value.exit_code == 2   # arrives typed (errcodec)
        assert site.sec.call("markers", domain=DOMAIN)["markers"] == markers
        assert agent.call("mark", domain=DOMAIN, label="fine")["label"] == "fine"

        # Item 5: restore into what is not storage: one line naming the path, nothing written.
        image = Path(site.sec.dir) / "an-image"
        image.write_text("keep\n")
        for dest, rule in (("/proc/vs-restore", "/proc is a kernel filesystem"), (str(image), "is not a directory"),
                           ("/tmp/a\0b", "cannot hold a NUL character")):
            with pytest.raises(UsageError) as refusal:
                site.sec.call("restore", domain=DOMAIN, marker=1, to=dest)
            assert rule in str(refusal.value) and "\n" not in str(refusal.value)
            assert type(refusal.value) is UsageError   # arrives typed (errcodec)
        assert image.read_text() == "keep\n"

        agent.stop(signal.SIGTERM)
        log = agent.log.read_text(errors="replace")
        bad = [i for i, line in enumerate(log.splitlines())
               if any(text in line for text in ("Traceback", "Event loop is closed", "still referenced after close",
                                                "Failed to establish connection"))]
        assert not bad, "\n".join(log.splitlines()[max(bad[0] - 5, 0):bad[0] + 30])
        assert not os.path.exists(agent.socket)   # its own socket, removed at its stop

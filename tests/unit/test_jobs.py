"""Job tracking against a scripted QMP peer: events before the reply, failures
carried with QEMU's message, bounded waits, malformed replies."""

from __future__ import annotations

import asyncio

import pytest

from qemu_blockdev import (
    JobFailedError,
    JobTimeoutError,
    JobTracker,
    QmpCommandError,
    TransportError,
    commands,
    jobs,
    nodes,
)
from tests.fakes.fake_qmp import FakeQmp, job_event, jobs_reply


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


def test_events_before_the_reply_are_not_lost() -> None:
    async def main() -> list[str]:
        qmp = FakeQmp()
        qmp.on("blockdev-mirror", events_before=[job_event("vs-m", "created"), job_event("vs-m", "running"),
                                                  job_event("vs-m", "ready")])
        with JobTracker(qmp, ["vs-m"]) as tracker:
            await qmp.execute("blockdev-mirror", commands.mirror_args("vs-m", "disk0", "vs-nbd0"))
            await tracker.job("vs-m").wait_ready(timeout=1)
        return qmp.commands()

    # READY came before the reply; no query-jobs poll was needed to see it.
    assert run(main()) == ["blockdev-mirror"]


def test_failed_job_raises_with_qemu_message_and_is_dismissed() -> None:
    async def main() -> FakeQmp:
        qmp = FakeQmp()
        qmp.on("blockdev-backup")
        qmp.on("query-jobs", jobs_reply(("vs-b", "concluded", "Input/output error")))
        qmp.on("job-dismiss")
        with JobTracker(qmp, ["vs-b"]) as tracker:
            await qmp.execute("blockdev-backup", {})
            qmp.emit_later(0.01, "JOB_STATUS_CHANGE", id="vs-b", status="concluded")
            with pytest.raises(JobFailedError) as err:
                await tracker.job("vs-b").wait_concluded(timeout=1)
        assert err.value.error == "Input/output error"
        assert err.value.job_id == "vs-b"
        return qmp

    qmp = run(main())
    assert qmp.sent[-1] == ("job-dismiss", {"id": "vs-b"})


def test_waiting_for_ready_fails_when_the_job_concludes_instead() -> None:
    async def main() -> None:
        qmp = FakeQmp()
        qmp.on("query-jobs", jobs_reply(("vs-m", "concluded", "No space left on device")))
        qmp.on("job-dismiss")
        with JobTracker(qmp, ["vs-m"]) as tracker:
            qmp.emit("JOB_STATUS_CHANGE", id="vs-m", status="concluded")
            with pytest.raises(JobFailedError, match="No space left"):
                await tracker.job("vs-m").wait_ready(timeout=1)

    run(main())


def test_wait_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(jobs, "POLL_INTERVAL", 0.02)

    async def main() -> None:
        qmp = FakeQmp()
        qmp.on("query-jobs", jobs_reply(("vs-m", "running", None)))
        with JobTracker(qmp, ["vs-m"]) as tracker:
            with pytest.raises(JobTimeoutError, match="still running after 0.1s"):
                await tracker.job("vs-m").wait_ready(timeout=0.1)

    run(main())


def test_missed_event_is_caught_by_polling(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(jobs, "POLL_INTERVAL", 0.02)

    async def main() -> None:
        qmp = FakeQmp()
        qmp.on("query-jobs", jobs_reply(("vs-m", "ready", None)))
        with JobTracker(qmp, ["vs-m"]) as tracker:
            await tracker.job("vs-m").wait_ready(timeout=1)

    run(main())


def test_group_waits_for_all_and_reports_first_failure() -> None:
    async def main() -> FakeQmp:
        qmp = FakeQmp()
        qmp.on("query-jobs", jobs_reply(("vs-a", "concluded", None), ("vs-b", "concluded", "Connection reset")))
        qmp.on("job-dismiss")
        with JobTracker(qmp, ["vs-a", "vs-b"]) as tracker:
            qmp.emit("JOB_STATUS_CHANGE", id="vs-a", status="concluded")
            qmp.emit("JOB_STATUS_CHANGE", id="vs-b", status="concluded")
            with pytest.raises(JobFailedError, match="vs-b.*Connection reset"):
                await tracker.wait_all_concluded(timeout=1)
        return qmp

    qmp = run(main())
    # Both jobs were dismissed even though one failed.
    assert [a["id"] for c, a in qmp.sent if c == "job-dismiss"] == ["vs-a", "vs-b"]


def test_transport_loss_ends_the_wait_at_once() -> None:
    async def main() -> None:
        qmp = FakeQmp()
        with JobTracker(qmp, ["vs-m"]) as tracker:
            asyncio.get_running_loop().call_later(0.01, qmp.hub.fail_all, TransportError("QMP connection closed"))
            with pytest.raises(TransportError, match="closed"):
                await tracker.job("vs-m").wait_ready(timeout=5)

    run(main())


def test_command_error_names_its_subject() -> None:
    async def main() -> None:
        qmp = FakeQmp()
        qmp.on("job-dismiss", {"error": {"class": "GenericError", "desc": "Job not found"}})
        with pytest.raises(QmpCommandError) as err:
            await qmp.execute("job-dismiss", commands.job_id_args("vs-x"))
        assert str(err.value) == "job-dismiss [id=vs-x]: Job not found (GenericError)"
        assert (err.value.error_class, err.value.desc) == ("GenericError", "Job not found")

    run(main())


@pytest.mark.parametrize("reply", [[], {"return": "oops"}, {"return": [{"node-name": 5}]}, {"neither": 1},
                                   {"error": "flat"}])
def test_malformed_replies_are_transport_errors(reply: object) -> None:
    async def main() -> None:
        qmp = FakeQmp()
        qmp.on("query-named-block-nodes", lambda args: reply)  # type: ignore[arg-type,return-value]
        with pytest.raises(TransportError, match="malformed"):
            await nodes.query_nodes(qmp)

    run(main())


def test_export_del_waits_for_deleted_event() -> None:
    async def main() -> None:
        qmp = FakeQmp()
        qmp.on("block-export-del")
        qmp.emit_later(0.02, "BLOCK_EXPORT_DELETED", id="vs-exp")
        await nodes.export_del(qmp, "vs-exp", timeout=1)
        qmp.on("block-export-del")
        with pytest.raises(jobs.JobTimeoutError):
            await nodes.export_del(qmp, "vs-exp", timeout=0.05)

    run(main())

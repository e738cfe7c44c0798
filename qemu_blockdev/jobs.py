"""Block jobs driven by ``JOB_STATUS_CHANGE``.

A :class:`JobTracker` subscribes to job events *before* the command that
creates the jobs runs (QEMU 7.2 may emit created/running before its reply),
keeps each job's status, and waits with a bound on every wait. Events are the
primary signal; ``query-jobs`` is polled while waiting as a safety net, so a
missed event costs at most one poll interval, never a hang.

States: created → running → (paused) → ready → waiting → pending → aborting →
concluded → null.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterable, Mapping
from types import TracebackType
from typing import Any

from . import commands
from .errors import JobFailedError, JobTimeoutError, QmpCommandError
from .models import JobInfo, parse_jobs
from .nodes import query_jobs
from .transport import EventListener, QmpEvent, QmpTransport

JOB_EVENTS = ("JOB_STATUS_CHANGE",)
POLL_INTERVAL = 1.0


class JobTracker:
    """Follows a known set of job ids; use as a context manager around the
    command that starts them.

    ::

        with JobTracker(t, ["vs-backup-a", "vs-backup-b"]) as jobs:
            await t.execute("transaction", transaction_args(...))
            infos = await jobs.wait_all_concluded(timeout=60)
    """

    def __init__(self, transport: QmpTransport, job_ids: Iterable[str]) -> None:
        self.transport = transport
        self.status: dict[str, str] = {commands.owned(j): "undefined" for j in job_ids}
        if not self.status:
            raise ValueError("JobTracker needs at least one job id")
        self._errors: dict[str, str | None] = {}
        self._progress: dict[str, tuple[int, int]] = {}
        self._cm: contextlib.AbstractContextManager[EventListener] | None = None
        self._listener: EventListener | None = None

    def __enter__(self) -> JobTracker:
        self._cm = self.transport.listen(JOB_EVENTS, self._is_ours)
        self._listener = self._cm.__enter__()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._cm is not None
        self._cm.__exit__(exc_type, exc, tb)

    def _is_ours(self, event: QmpEvent) -> bool:
        return event.data.get("id") in self.status

    def job(self, job_id: str) -> BlockJob:
        if job_id not in self.status:
            raise KeyError(job_id)
        return BlockJob(self, job_id)

    @property
    def jobs(self) -> list[BlockJob]:
        return [BlockJob(self, j) for j in self.status]

    def progress(self, job_id: str) -> tuple[int, int]:
        """(current, total) as last polled; ``total`` grows with new writes."""
        return self._progress.get(job_id, (0, 0))

    async def poll(self) -> list[JobInfo]:
        """Refresh status, progress and errors from ``query-jobs``."""
        infos = [i for i in parse_jobs(await self.transport.execute("query-jobs")) if i.job_id in self.status]
        seen = set()
        for info in infos:
            seen.add(info.job_id)
            self.status[info.job_id] = info.status
            self._progress[info.job_id] = (info.current_progress, info.total_progress)
            if info.error is not None:
                self._errors[info.job_id] = info.error
        for job_id, status in self.status.items():
            # Known to us but gone from QEMU: dismissed (by us or auto-dismiss).
            if job_id not in seen and status not in ("undefined",):
                self.status[job_id] = "null"
        return infos

    async def wait(self, job_ids: Iterable[str], states: Iterable[str], timeout: float) -> None:
        """Wait until every job in ``job_ids`` is in one of ``states``.

        :raise JobTimeoutError: the bound passed first
        :raise JobFailedError: a job concluded with an error, or ended before
            reaching ``states`` (it can never reach them any more)
        :raise TransportError: the monitor went away
        """
        wanted = frozenset(states)
        ids = list(job_ids)
        assert self._listener is not None, "use JobTracker as a context manager"
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            pending = [j for j in ids if self.status[j] not in wanted]
            if not pending:
                return
            for job_id in pending:
                await self._check_dead_end(job_id, wanted)
            remaining = deadline - loop.time()
            if remaining <= 0:
                job_id = pending[0]
                raise JobTimeoutError(
                    job_id, f"still {self.status[job_id]} after {timeout:g}s (waiting for {'/'.join(sorted(wanted))})"
                )
            try:
                async with asyncio.timeout(min(remaining, POLL_INTERVAL)):
                    event = await self._listener.get()
                self.status[str(event.data["id"])] = str(event.data.get("status"))
            except TimeoutError:
                await self.poll()

    async def _check_dead_end(self, job_id: str, wanted: frozenset[str]) -> None:
        status = self.status[job_id]
        if status == "concluded" and "concluded" not in wanted:
            info = await self._conclude(job_id)
            raise JobFailedError(job_id, "concluded", info or f"ended before {'/'.join(sorted(wanted))}")
        if status == "null" and "null" not in wanted and "concluded" not in wanted:
            raise JobFailedError(job_id, "null", self._errors.get(job_id) or "job disappeared")

    async def _conclude(self, job_id: str) -> str | None:
        """Read the error of a concluded job, then dismiss it."""
        await self.poll()
        error = self._errors.get(job_id)
        with contextlib.suppress(QmpCommandError):
            await self.transport.execute("job-dismiss", commands.job_id_args(job_id))
        self.status[job_id] = "null"
        return error

    async def wait_all_concluded(self, timeout: float) -> dict[str, str | None]:
        """Wait for every job to conclude, dismiss them, and raise for the first
        failure (after all of them have been dismissed)."""
        await self.wait(self.status, ("concluded", "null"), timeout)
        errors: dict[str, str | None] = {}
        for job_id in self.status:
            if self.status[job_id] == "concluded":
                errors[job_id] = await self._conclude(job_id)
            else:
                errors[job_id] = self._errors.get(job_id)
        for job_id, error in errors.items():
            if error is not None:
                raise JobFailedError(job_id, "concluded", error)
        return errors


class BlockJob:
    """Handle on one tracked job; every control command is bounded by the
    caller's waits, never by an open-ended await."""

    def __init__(self, tracker: JobTracker, job_id: str) -> None:
        self.tracker = tracker
        self.job_id = job_id

    @property
    def status(self) -> str:
        return self.tracker.status[self.job_id]

    async def _exec(self, command: str, args: Mapping[str, Any]) -> Any:
        return await self.tracker.transport.execute(command, args)

    async def wait_ready(self, timeout: float) -> None:
        await self.tracker.wait([self.job_id], ("ready",), timeout)

    async def wait_concluded(self, timeout: float) -> None:
        """Wait for the job to end; dismiss it; raise its error if it failed."""
        await self.tracker.wait([self.job_id], ("concluded", "null"), timeout)
        if self.status == "concluded":
            error = await self.tracker._conclude(self.job_id)
        else:
            error = self.tracker._errors.get(self.job_id)
        if error is not None:
            raise JobFailedError(self.job_id, "concluded", error)

    async def cancel(self, *, force: bool = False) -> None:
        """``block-job-cancel``: a READY mirror cancelled without force leaves
        its target as a point-in-time copy of the source."""
        await self._exec("block-job-cancel", {"device": self.job_id, "force": force})

    async def complete(self) -> None:
        await self._exec("job-complete", commands.job_id_args(self.job_id))

    async def pause(self) -> None:
        await self._exec("job-pause", commands.job_id_args(self.job_id))

    async def resume(self) -> None:
        await self._exec("job-resume", commands.job_id_args(self.job_id))

    async def set_speed(self, speed: int) -> None:
        await self._exec("block-job-set-speed", commands.set_speed_args(self.job_id, speed))

    async def dismiss(self) -> None:
        await self._exec("job-dismiss", commands.job_id_args(self.job_id))


async def cancel_jobs(transport: QmpTransport, ours: Callable[[str], bool], *, timeout: float = 30.0) -> None:
    """Cancel every job whose id ``ours`` accepts, and wait until QEMU has none of
    them left (concluded ones are dismissed). Best effort within ``timeout``: a
    job that will not go is left for the caller's next attempt."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    cancelled: set[str] = set()
    while True:
        jobs = [j for j in await query_jobs(transport) if ours(j.job_id)]
        if not jobs or loop.time() > deadline:
            return
        for job in jobs:
            with contextlib.suppress(QmpCommandError):
                if job.status == "concluded":
                    await transport.execute("job-dismiss", commands.job_id_args(job.job_id))
                elif job.job_id not in cancelled:
                    await transport.execute("block-job-cancel", {"device": job.job_id, "force": True})
                    cancelled.add(job.job_id)
        await asyncio.sleep(0.05)

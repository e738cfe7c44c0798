"""The one error tree of qemu_blockdev.

::

    BlockdevError
     ├─ TransportError            connection lost/refused, malformed reply; cause in __cause__
     ├─ QmpCommandError           QEMU answered with an error (.command .error_class .desc)
     ├─ JobError (.job_id)
     │   ├─ JobFailedError        the job concluded with an error (.status .error)
     │   └─ JobTimeoutError       no progress to the awaited state within the bound
     └─ BitmapError               a dirty bitmap is missing, inconsistent or foreign

``__str__`` is the human message; structured data lives in attributes.
"""

from __future__ import annotations

from collections.abc import Mapping


class BlockdevError(Exception):
    """Root of every error raised by qemu_blockdev."""


class TransportError(BlockdevError):
    """The monitor could not be reached, went away, or sent something unreadable."""


class QmpCommandError(BlockdevError):
    """QEMU refused a command.

    :param command: the QMP command name
    :param error_class: QEMU's error class (``GenericError``, ``DeviceNotFound`` ...)
    :param desc: QEMU's own description, kept verbatim
    :param subject: what the command was about (job id, node), because QEMU's
        text often omits it ("Job not found")
    """

    def __init__(self, command: str, error_class: str, desc: str, subject: str | None = None) -> None:
        about = f" [{subject}]" if subject else ""
        super().__init__(f"{command}{about}: {desc} ({error_class})")
        self.command = command
        self.subject = subject
        self.error_class = error_class
        self.desc = desc


def command_subject(arguments: object) -> str | None:
    """The identifiers in a command's arguments that a reader needs to see."""
    if not isinstance(arguments, Mapping):
        return None
    keys = ("id", "job-id", "device", "node", "node-name", "name")
    parts = [f"{k}={arguments[k]}" for k in keys if isinstance(arguments.get(k), str)]
    return " ".join(parts) or None


class JobError(BlockdevError):
    """A block job did not end as required."""

    def __init__(self, job_id: str, message: str) -> None:
        super().__init__(f"job {job_id}: {message}")
        self.job_id = job_id


class JobFailedError(JobError):
    """The job concluded with QEMU's error message in ``error``."""

    def __init__(self, job_id: str, status: str, error: str) -> None:
        super().__init__(job_id, f"failed ({status}): {error}")
        self.status = status
        self.error = error


class JobTimeoutError(JobError):
    """The job did not reach the awaited state in time."""


class BitmapError(BlockdevError):
    """A dirty bitmap cannot be used as asked."""

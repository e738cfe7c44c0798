"""The one error tree of the plugin (daemon, CLI, hook helpers).

::

    PluginError                   exit_code 1
     ├─ ConfigError               exit_code 2: the configuration is unusable
     ├─ VirtError (.code)         libvirt refused or failed; libvirt's error code kept
     │   └─ DomainNotFoundError   the domain does not exist (VIR_ERR_NO_DOMAIN)
     ├─ DaemonUnavailableError    the virtsync daemon cannot be reached
     ├─ JournalError              the journal cannot be read or written
     │   └─ JournalCorruptError   a record fails its CRC or framing
     └─ StateConflictError        an operation needs another runstate (.state .required)

``exit_code`` is a class attribute (as in borg), so ``cli.main`` can return it
without a table. ``__str__`` is the human message; structured data lives in
attributes. Errors from ``qemu_blockdev`` keep their own tree (``BlockdevError``).
"""

from __future__ import annotations

from typing import ClassVar

__all__ = [
    "ConfigError",
    "DaemonUnavailableError",
    "DomainNotFoundError",
    "JournalCorruptError",
    "JournalError",
    "PluginError",
    "StateConflictError",
    "VirtError",
]


class PluginError(Exception):
    """Root of every error the plugin raises on purpose."""

    exit_code: ClassVar[int] = 1


class ConfigError(PluginError):
    """The configuration is missing, malformed or contradictory."""

    exit_code: ClassVar[int] = 2


class VirtError(PluginError):
    """libvirt failed; ``code`` is libvirt's ``virErrorNumber`` when known.

    :param message: the human message (usually libvirt's own)
    :param code: ``libvirtError.get_error_code()``, or None
    """

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


class DomainNotFoundError(VirtError):
    """The named domain does not exist on that connection."""


class DaemonUnavailableError(PluginError):
    """The virtsync daemon's socket is absent or does not answer."""


class JournalError(PluginError):
    """The journal could not be read or written."""


class JournalCorruptError(JournalError):
    """A journal record is damaged; replay stops at the last good marker."""


class StateConflictError(PluginError):
    """The pair is in a runstate that forbids the operation (qemu.qmp StateError).

    :param message: the human message
    :param state: the current runstate
    :param required: the runstate(s) the operation needs
    """

    def __init__(self, message: str, state: object, required: object) -> None:
        super().__init__(message)
        self.state = state
        self.required = required

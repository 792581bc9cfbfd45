"""The errors the core raises; the CLI turns each into one line on stderr."""

from __future__ import annotations


class QueueError(Exception):
    """Base of every error queuectl reports to a user."""


class InvalidInput(QueueError):
    """A value, job spec or option the user gave is not acceptable."""


class NotFound(QueueError):
    """No job (or other record) has the given id."""


class Conflict(QueueError):
    """The request clashes with what is stored (duplicate id, wrong state)."""


class StoreError(QueueError):
    """The database cannot be opened, is not queuectl's, or stayed locked."""


class StoreUnavailable(StoreError):
    """The connection to the store was lost (a server restarted, a connection killed); a
    new one may work."""


class CorruptLedger(StoreError):
    """An event row cannot be decoded by this version of queuectl."""


class WaitTimeout(QueueError, TimeoutError):
    """A wait for jobs ran out of time first; ``states`` holds each job's state then."""

    def __init__(self, message: str, states: dict[str, str]) -> None:
        super().__init__(message)
        self.states = states

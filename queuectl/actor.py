"""Who causes an event: every event a person or program causes names its actor (``by``).

The CLI acts as ``user@host``, the HTTP API as ``token:NAME``, a schedule as
``schedule:NAME``, a hook as ``hook:NAME``, and a worker as its own id. ``ledger.append``
stamps each event that does not name one already with ``current()``. The actor is a
context variable, so a request served on one thread never lends its name to another; the
process-wide default covers threads that set none (a worker's writer thread sets its own).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TYPE_CHECKING, TypeVar

import msgspec

if TYPE_CHECKING:
    from queuectl.events import Event

E = TypeVar("E", bound="Event")

_acting: ContextVar[str] = ContextVar("queuectl_actor", default="")
_default = ""


def current() -> str:
    """The actor events appended now are stamped with: who ``acting_as`` names, else the
    process's default, else the person running it."""
    return _acting.get() or _default or person()


def set_default(by: str) -> None:
    """Name the actor of this process, where no ``acting_as`` says otherwise."""
    global _default
    _default = by


@contextmanager
def acting_as(by: str) -> Iterator[None]:
    """Within the block, events appended on this thread (or task) are ``by``'s."""
    token = _acting.set(by)
    try:
        yield
    finally:
        _acting.reset(token)


def stamped(events: list[E], by: str) -> list[E]:
    """``events``, each that names no actor yet made ``by``'s."""
    return [e if e.by else msgspec.structs.replace(e, by=by) for e in events]


@functools.cache
def person() -> str:
    """``user@host`` for whoever runs this command."""
    user = _user_name()
    # The host's name as socket.gethostname() gives it, without importing socket: that
    # import alone would be a large share of an ``enqueue``'s start-up.
    return f"{user}@{os.uname().nodename}"


def _user_name() -> str:
    """The login name, as ``getpass.getuser()`` finds it, or the uid when there is none.
    Not getpass itself: importing it imports termios too, a share of an ``enqueue``'s
    start-up, for a lookup this short."""
    for variable in ("LOGNAME", "USER", "LNAME", "USERNAME"):
        if user := os.environ.get(variable):
            return user
    import pwd

    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:  # no name for this uid
        return str(os.getuid())

"""queuectl: a background job queue for shell commands whose store is an event ledger.

``from queuectl import Queue`` is the Python API (``queuectl/api.py``). It loads on first use,
so that the command line, which imports this package too, does not pay for it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from queuectl.errors import (
    Conflict,
    InvalidInput,
    NotFound,
    QueueError,
    StoreError,
    WaitTimeout,
)

if TYPE_CHECKING:
    from queuectl.api import Queue

__all__ = ["Conflict", "InvalidInput", "NotFound", "Queue", "QueueError", "StoreError",
           "WaitTimeout"]


def __getattr__(name: str) -> Any:
    if name == "Queue":
        from queuectl.api import Queue

        return Queue
    raise AttributeError(f"module 'queuectl' has no attribute {name!r}")

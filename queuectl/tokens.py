"""Bearer tokens for the HTTP API (``queuectl serve``): who may read, enqueue or administer.

A token is 32 random bytes (``secrets.token_urlsafe``), shown once when it is added; the
ledger keeps only its SHA-256. A plain hash is enough: a salt or a slow hash guards guessable
secrets against precomputed tables, and nobody guesses 256 random bits, while a plain hash
lets a request's token be checked with one read. Each request looks its token up afresh, so
a revoked token fails on the next request, on every running server.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from typing import Any, NamedTuple

from queuectl import cascade
from queuectl import events as ev
from queuectl.errors import Conflict, InvalidInput, NotFound
from queuectl.ledger import append, write
from queuectl.store import Db

SCOPES = ("read", "enqueue", "admin")  # each allows what the ones before it allow
PREFIX = "qctl_"  # marks a queuectl token, for secret scanners and for people
SERVE = "serve"  # the name `serve --token` acts under; no ledger token may take it
_NAME_LIMIT = 64


class Holder(NamedTuple):
    """Who a request's token names, and what it may do."""

    name: str
    scope: str

    def allows(self, scope: str) -> bool:
        return SCOPES.index(self.scope) >= SCOPES.index(scope)


def check_name(name: str) -> str:
    if not cascade.ID.fullmatch(name) or len(name) > _NAME_LIMIT:
        raise InvalidInput(f"token name {name!r} must be 1-{_NAME_LIMIT} letters, digits or "
                           "._:@/+- and start with a letter or digit")
    if name == SERVE:
        raise InvalidInput(f"token name {SERVE!r} is taken by queuectl serve --token")
    return name


def digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest()


def add(conn: Db, name: str, scope: str) -> str:
    """Add a token; returns it (the only time it is ever seen)."""
    check_name(name)
    if scope not in SCOPES:
        raise InvalidInput(f"scope {scope!r}: one of {', '.join(SCOPES)}")
    token = PREFIX + secrets.token_urlsafe(32)
    with write(conn):
        if _row(conn, name) is not None:
            raise Conflict(f"Token '{name}' already exists")
        append(conn, ev.TokenAdded(name=name, scope=scope, hash=digest(token)))
    return token


def revoke(conn: Db, name: str) -> None:
    with write(conn):
        if not cascade.ID.fullmatch(name) or _row(conn, name) is None:
            raise NotFound(f"Token '{name}' not found")
        append(conn, ev.TokenRevoked(name=name))


def listed(conn: Db) -> list[dict[str, Any]]:
    """Every token in force, by name, as ``token list --json`` gives it (never its hash)."""
    found = conn.execute(
        "SELECT name, scope, created_at, created_by FROM tokens ORDER BY name").fetchall()
    return [{"name": n, "scope": s, "created_at": at, "by": by} for n, s, at, by in found]


def holder(conn: Db, token: str) -> Holder | None:
    """The token in force that ``token`` is, or None. Every hash is compared, each in
    constant time, so how long this takes says nothing about which one came close."""
    given = digest(token)
    found = None
    for name, scope, stored in conn.execute("SELECT name, scope, hash FROM tokens"):
        if hmac.compare_digest(given, stored):
            found = Holder(name, scope)
    return found


def _row(conn: Db, name: str) -> tuple[Any, ...] | None:
    return conn.execute("SELECT name FROM tokens WHERE name = ?", (name,)).fetchone()

"""The fixtures every test stands on: a PostgreSQL database a test is given is as empty as
one just made, and of a name never given before, even when an earlier test of the same
process used it."""

from __future__ import annotations

from typing import Any

import pytest
from conftest import _IDLE, _pg_admin, pg_database

from queuectl import ledger

pytestmark = pytest.mark.stores("sqlite")  # it makes its PostgreSQL databases itself

# What a database holds outside the catalogs
CONTENTS = [
    "SELECT nspname, nspowner::regrole::text, nspacl::text FROM pg_namespace ORDER BY 1",
    "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
    " WHERE n.nspname NOT IN ('pg_catalog', 'information_schema', 'pg_toast') ORDER BY 1",
    "SELECT p.proname FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace"
    " WHERE n.nspname NOT IN ('pg_catalog', 'information_schema') ORDER BY 1",
    "SELECT extname FROM pg_extension ORDER BY 1",
]


def contents(url: str) -> list[list[Any]]:
    import psycopg

    with psycopg.connect(url) as conn:
        return [conn.execute(sql).fetchall() for sql in CONTENTS]


def oid(url: str) -> int:
    import psycopg

    with psycopg.connect(url) as conn:
        found = conn.execute(
            "SELECT oid FROM pg_database WHERE datname = current_database()").fetchone()
    assert found is not None
    return int(found[0])


def test_a_database_given_again_is_as_one_just_made() -> None:
    import psycopg

    _pg_admin().close()  # no server: skipped (failed in CI)
    with pg_database() as first:
        made, used = contents(first), oid(first)
        ledger.connect(first).close()  # queuectl's tables, functions and triggers
        left_open = psycopg.connect(first, autocommit=True)  # a session the test left
        left_open.execute("CREATE SCHEMA other; CREATE TABLE other.t (x int)")
        left_open.execute("BEGIN; LOCK TABLE jobs")  # a lock it holds to the end
        assert contents(first) != made
    with pg_database() as again:
        assert oid(again) == used  # the same database, given again ...
        assert contents(again) == made  # ... as it was made ...
        assert again != first  # ... under a new name: what the last test left behind
        with pytest.raises(psycopg.OperationalError, match="does not exist"):
            psycopg.connect(first)  # cannot find it again
    with pytest.raises(psycopg.OperationalError):
        left_open.execute("SELECT 1")  # its session was ended
    left_open.close()


def test_a_database_changed_otherwise_is_dropped_not_given_again() -> None:
    admin = _pg_admin()
    with admin:
        with pg_database() as url:
            name = url.rsplit("/", 1)[1]
            admin.execute(f"ALTER DATABASE {name} SET work_mem = '8MB'")
        assert name not in _IDLE
        assert admin.execute("SELECT FROM pg_database WHERE datname = %s", (name,)).fetchone() is None

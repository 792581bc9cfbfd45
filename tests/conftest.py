"""Shared fixtures. Every test runs in its own directory with its own database, and every
queuectl database a test leaves behind must replay to exactly its live projections: that
check runs automatically at teardown, so no test can pass while breaking replay."""

from __future__ import annotations

import compileall
import os
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

import projections
import queuectl
from queuectl import claims, ledger
from queuectl.cli import cli
from queuectl.errors import StoreError

# Helpers shared by test files assert as tests do: a failure there must show its values.
pytest.register_assert_rewrite("helpers", "properties")


def replay_problems(target: Path | str) -> list[str] | None:
    """Drift between a database's ledger and its projections; None if it isn't queuectl's."""
    try:
        conn = ledger.connect(target, create=False)
    except StoreError:
        return None
    try:
        return check_both_ways(conn)
    finally:
        conn.close()


def check_both_ways(conn: Any) -> list[str]:
    """``ledger.check`` as a replay runs on a small ledger (rows held in memory to the end),
    then again writing rows back after every event, as a big replay does now and then: every
    row is then read back from the table for its next event."""
    problems = ledger.check(conn)
    saved = ledger.FLUSH_CHECK, projections.Rows.LIMIT
    ledger.FLUSH_CHECK, projections.Rows.LIMIT = 1, 1
    try:
        return problems + [f"(flushing) {p}" for p in ledger.check(conn)]
    finally:
        ledger.FLUSH_CHECK, projections.Rows.LIMIT = saved


def _queuectl_databases(root: Path) -> list[Path]:
    found = []
    for path in root.rglob("*"):
        if path.is_file() and path.suffix in (".db", ".sqlite", ".sqlite3"):
            try:
                with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as probe:
                    names = {r[0] for r in probe.execute("SELECT name FROM sqlite_master")}
            except sqlite3.Error:
                continue
            if {"events", "projection_meta"} <= names:
                found.append(path)
    return found


# -- the stores every test runs on -----------------------------------------------------------

# The PostgreSQL server the tests use: each test gets a database of its own on it, dropped
# afterwards. QUEUECTL_TEST_PG points elsewhere; .ci/run starts the local server if it is
# down and sets QUEUECTL_CI, which turns "no server" into a failure instead of a skip.
PG_ADMIN = os.environ.get("QUEUECTL_TEST_PG", "postgresql://root@127.0.0.1:5432/postgres")
STORES = ("sqlite", "postgres")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Every test runs once on each store, unless ``@pytest.mark.stores(...)`` names some."""
    if "db" in metafunc.fixturenames:
        marker = metafunc.definition.get_closest_marker("stores")
        metafunc.parametrize("db", marker.args if marker else STORES, indirect=True)


def _pg_admin() -> Any:
    try:
        import psycopg
    except ImportError:
        reason = "psycopg is not installed (pip install -e '.[test]')"
    else:
        try:
            return psycopg.connect(PG_ADMIN, autocommit=True, connect_timeout=5)
        except psycopg.Error as exc:
            reason = f"no PostgreSQL at {PG_ADMIN}: {' '.join(str(exc).split())}"
    if os.environ.get("QUEUECTL_CI"):
        pytest.fail(f"PostgreSQL tests cannot run in CI: {reason}")
    pytest.skip(reason)


# Databases this test process made, emptied and kept for its next test. PostgreSQL 15's
# CREATE DATABASE copies its template through the WAL: a third of a second a test under
# the suite's load, a quarter of the suite's time on that store. Emptying one of ours
# again (its connections ended, its schemas dropped) takes a few milliseconds.
_IDLE: list[str] = []

# What a database made from template1 holds outside the catalogs: a public schema owned by
# the database's owner, which anyone may use, and no other schema.
_EMPTY_AGAIN = """
DO $$ DECLARE s text; BEGIN
    FOR s IN SELECT nspname FROM pg_namespace
             WHERE nspname NOT LIKE 'pg\\_%' AND nspname <> 'information_schema' LOOP
        EXECUTE format('DROP SCHEMA %I CASCADE', s);
    END LOOP;
END $$;
CREATE SCHEMA public AUTHORIZATION pg_database_owner;
GRANT USAGE ON SCHEMA public TO PUBLIC;
"""


def _pg_url(name: str) -> str:
    return PG_ADMIN.rsplit("/", 1)[0] + "/" + name


def _new_name() -> str:
    return f"queuectl_test_{uuid.uuid4().hex[:12]}"


@contextmanager
def pg_database() -> Iterator[str]:
    """A fresh, empty PostgreSQL database of a name never given before, emptied (or
    dropped) afterwards: its URL."""
    with _pg_admin() as admin:
        if _IDLE:
            name = _IDLE.pop()
        else:
            name = _new_name()
            admin.execute(f"CREATE DATABASE {name}")
    try:
        yield _pg_url(name)
    finally:
        # A new connection: the test may have restarted the server meanwhile.
        wait_for(_pg_answers, 60, "the PostgreSQL server to answer")
        again = _recycled(name)
        if again is not None:
            _IDLE.append(again)


def _recycled(name: str) -> str | None:
    """The database ``name`` as CREATE DATABASE made it, under a new name: its sessions
    ended, renamed (so that no process the test left behind finds it again by its URL),
    its schemas dropped. A database the test changed in any other way (settings of its
    own, connections refused, large objects, extensions) is dropped instead: None."""
    import psycopg

    current = name
    try:
        with _pg_admin() as admin:
            changed = admin.execute(
                "SELECT NOT datallowconn OR EXISTS (SELECT FROM pg_db_role_setting"
                " WHERE setdatabase = d.oid) FROM pg_database d WHERE datname = %s",
                (name,)).fetchone()
            if changed is not None and not changed[0]:
                admin.execute("SELECT pg_terminate_backend(pid, 10000) FROM pg_stat_activity"
                              " WHERE datname = %s AND pid <> pg_backend_pid()", (name,))
                current = _new_name()
                admin.execute(f"ALTER DATABASE {name} RENAME TO {current}")
                with psycopg.connect(_pg_url(current), connect_timeout=5) as conn:
                    conn.execute("SET lock_timeout = '10s'")
                    conn.execute(_EMPTY_AGAIN)
                    left = conn.execute(
                        "SELECT (SELECT count(*) FROM pg_largeobject_metadata)"
                        " + (SELECT count(*) FROM pg_extension WHERE extname <> 'plpgsql')"
                        " + (SELECT count(*) FROM pg_event_trigger)"
                        " + (SELECT count(*) FROM pg_publication)").fetchone()
                if left == (0,):
                    return current
    except psycopg.Error:
        pass
    with _pg_admin() as admin:
        for gone in {name, current}:
            admin.execute(f"DROP DATABASE IF EXISTS {gone} WITH (FORCE)")
    return None


def pytest_sessionfinish(session: pytest.Session) -> None:
    """Drop the databases this test process kept for its next test (each xdist worker
    runs this for its own)."""
    if not _IDLE:
        return
    with _pg_admin() as admin:
        while _IDLE:
            admin.execute(f"DROP DATABASE IF EXISTS {_IDLE.pop()} WITH (FORCE)")


def _pg_answers() -> bool:
    import psycopg

    try:
        psycopg.connect(PG_ADMIN, autocommit=True, connect_timeout=2).close()
    except psycopg.Error:
        return False
    return True


@pytest.fixture(autouse=True)
def db(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> Iterator[Any]:
    """This test's database (also in QUEUECTL_DB): a SQLite path, or a PostgreSQL URL, by
    the test's store. Every queuectl database it leaves behind is checked for replay drift."""
    monkeypatch.chdir(tmp_path)
    # Tables are drawn as a script would see them (no terminal, no COLUMNS), whatever width
    # the test run's own terminal, or pytest-xdist, gives.
    monkeypatch.delenv("COLUMNS", raising=False)
    store = getattr(request, "param", "sqlite")
    if store == "sqlite":
        path = tmp_path / "queue.db"
        monkeypatch.setenv("QUEUECTL_DB", str(path))
        yield path
        _check_replay(request, tmp_path)
        return
    with pg_database() as url:
        monkeypatch.setenv("QUEUECTL_DB", url)
        yield url
        _check_replay(request, tmp_path, url)


def _check_replay(request: pytest.FixtureRequest, tmp_path: Path, url: str | None = None) -> None:
    if request.node.get_closest_marker("corrupt_ledger"):
        return  # the test broke the ledger on purpose and asserts on that itself
    for found in [*_queuectl_databases(tmp_path), *([url] if url else [])]:
        problems = replay_problems(found)
        assert not problems, f"{found} does not replay to its projections: {problems}"


@pytest.fixture
def conn(db: Any) -> Iterator[Any]:
    connection = ledger.connect(db)
    yield connection
    connection.close()


@pytest.fixture
def run() -> Run:
    return Run()


class Run:
    """Invoke the CLI in-process, as a user would type it."""

    def __call__(self, *args: str, input: str | None = None) -> Result:
        return CliRunner().invoke(cli, list(args), input=input, catch_exceptions=False)


def queuectl_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "queuectl", *args]


def spawn(*args: str, env: dict[str, str] | None = None, **kwargs: object) -> subprocess.Popen[str]:
    """Start ``queuectl ARGS`` as a real process (workers, crashes, concurrency)."""
    return subprocess.Popen(
        queuectl_cmd(*args),
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,  # type: ignore[arg-type]
    )


def wait_for(condition: Any, timeout: float = 60.0, what: str = "", interval: float = 0.02) -> Any:
    """Poll ``condition`` until it returns something truthy; fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what or condition}")


def events_of(conn: sqlite3.Connection, job_id: str) -> list[str]:
    """The types of a job's events, in order, without ``started``: whether a job was
    claimed ahead of its worker's current one (and so records its start) is the store's
    choice (PostgreSQL's, not SQLite's), not part of a job's life."""
    return [r[0] for r in conn.execute(
        "SELECT type FROM events WHERE job_id = ? AND type != 'started' ORDER BY seq", (job_id,))]


def pytest_configure(config: pytest.Config) -> None:
    # The tests start queuectl as real processes some thousands of times. Each imports the
    # package's bytecode as an installed copy would (pip compiles it), not its sources
    # again: where PYTHONDONTWRITEBYTECODE is set no process would write it, and every
    # command started paid twice its import time compiling (a seventh of the suite).
    for package in (queuectl, projections):
        compileall.compile_dir(Path(package.__file__).parent, quiet=2)
    config.addinivalue_line("markers", "corrupt_ledger: the test corrupts the ledger on purpose")
    config.addinivalue_line("markers", "stores(*names): run only on these stores (sqlite, postgres)")
    # Tests press Ctrl-C (SIGINT) at the commands they start, as at a terminal. A shell
    # that starts the test run in the background (`pytest &`, a script's `&`) starts it with
    # SIGINT ignored, which every child inherits, and a Python started so leaves it ignored:
    # the commands would go on. A handler here is reset to the default in each child.
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def rescued(conn: sqlite3.Connection, lease: float = 30, watched: float | None = None,
            meanwhile: Any = None) -> list[Any]:
    """What a rescuer takes back after watching the workers for ``watched`` seconds of its
    own clock (a little over the lease, unless given), while ``meanwhile`` ran: silence is
    judged by the watcher's own observation, never by heartbeat times against the wall
    clock."""

    t = [0.0]
    silence = claims.Silence(clock=lambda: t[0])
    claims.silent_workers(conn, lease, silence)
    if meanwhile is not None:
        meanwhile()
    t[0] = lease + 0.001 if watched is None else watched
    return claims.rescue(conn, claims.silent_workers(conn, lease, silence))


def needs(path: str, install: str) -> None:
    """Skip, saying why, when a system tool a test drives is missing; in CI (QUEUECTL_CI set
    by .ci/run, which installs them) a missing tool fails the test instead."""
    if Path(path).exists():
        return
    if os.environ.get("QUEUECTL_CI"):
        pytest.fail(f"{path} is missing in CI; .ci/run should have run: {install}")
    pytest.skip(f"{path} is not installed ({install})")


@contextmanager
def by_hand(target: Any) -> Iterator[Any]:
    """A plain connection to the test's database, for SQL a test runs by hand (``?``
    placeholders, each statement committed on its own), whichever store holds it."""
    conn = ledger.connect(target, create=False)
    try:
        yield conn
    finally:
        conn.close()

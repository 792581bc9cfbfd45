"""The command line under hostile input: whatever text lands in any argument or in the
environment, a command either works, or says one ``Error:`` line and writes nothing; and
the ledger it leaves always decodes and replays to its projections.

Each earlier defect of this class would have been found here: ``--timeout inf`` (a ledger
no reader could decode), ``--run-at 0999-06-01`` (a time stored as ``999-...``),
``show $'\\xff'`` and ``-c $'caf\\xe9'`` (bytes that are not UTF-8), ``--priority 2**64``,
``config set backoff-base 1e100``, ``stats --since nan``, ``list --limit 1e20``,
``QUEUECTL_LOCK_TIMEOUT=abc`` and ``COLUMNS=0``: tracebacks all.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import by_hand
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from queuectl import decisions, events, ledger
from queuectl.cli import cli

numbers = st.one_of(
    st.sampled_from(["inf", "-inf", "nan", "1e20", "1e300", "1e999", "-0", "0", "1", "2.5",
                     "18446744073709551616", "99999999999999999999", "0x10", "1_000", "",
                     " ", "1e-320", "-1", "3", "٣"]),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.integers(min_value=-(2**80), max_value=2**80).map(str),
)
# Lone surrogates are what Python makes of argv bytes that are not UTF-8.
texts = st.one_of(
    st.text(max_size=20),
    st.text(alphabet=st.characters(min_codepoint=0xDC80, max_codepoint=0xDCFF), min_size=1,
            max_size=3).map(lambda bad: f"caf{bad}.txt"),
    st.sampled_from(["", " ", "\x00", "\x1b[31m", "a" * 200, "../../etc", "j1", "-", "--help"]),
)
times = st.one_of(
    st.builds(lambda y, m, d, tz: f"{y:04d}-{m:02d}-{d:02d}T00:00:00{tz}",
              st.integers(1, 9999), st.integers(1, 12), st.integers(1, 28),
              st.sampled_from(["", "Z", "+01:00", "-14:00", "+14:00"])),
    st.builds(lambda y: f"{y}-06-01T00:00:00", st.integers(-5, 99999)),
    texts,
)
durations = st.one_of(numbers, numbers.map(lambda n: n + "s"), numbers.map(lambda n: n + "d"),
                      texts)
settings_keys = st.sampled_from(["max-retries", "backoff-base", "backoff-max", "backoff-jitter",
                                 "job-timeout", "heartbeat-interval", "lease-timeout",
                                 "output-limit", "nope"])


def _json_job(value: str) -> str:
    return '{"command":"true","%s":%s}' % value  # noqa: UP031 - a template with braces


commands = st.one_of(
    st.tuples(st.just("enqueue"), st.sampled_from(["--max-retries", "--backoff-base",
              "--timeout", "--priority", "--delay"]), numbers).map(
        lambda t: ["enqueue", "-c", "true", t[1], t[2]]),
    times.map(lambda t: ["enqueue", "-c", "true", "--run-at", t]),
    texts.map(lambda t: ["enqueue", "-c", t]),
    texts.map(lambda t: ["enqueue", "-c", "true", "--id", t]),
    texts.map(lambda t: ["enqueue", "-c", "true", "--after", t]),
    st.tuples(st.sampled_from(["max_retries", "backoff_base", "timeout", "priority", "delay"]),
              st.sampled_from(["1e300", "1e999", "-1", "18446744073709551616", "1.5", "null",
                               '"5"', "true", "[]", "2"])).map(
        lambda t: ["enqueue", _json_job(t)]),
    texts.map(lambda t: ["enqueue", t]),
    st.tuples(settings_keys, numbers).map(lambda t: ["config", "set", t[0], t[1]]),
    texts.map(lambda t: ["config", "get", t]),
    numbers.map(lambda n: ["list", "--limit", n]),
    texts.map(lambda t: ["list", "-s", t]),
    texts.map(lambda t: ["show", t]),
    texts.map(lambda t: ["history", t]),
    st.tuples(texts, numbers).map(lambda t: ["logs", t[0], "--attempt", t[1]]),
    texts.map(lambda t: ["cancel", t]),
    texts.map(lambda t: ["dlq", "retry", t]),
    durations.map(lambda d: ["stats", "--since", d]),
    st.just(["status"]),
    st.just(["status", "--json"]),
)
environments = st.one_of(
    st.just({}),
    st.tuples(st.sampled_from(["QUEUECTL_LOCK_TIMEOUT", "COLUMNS"]), numbers | texts).map(
        lambda t: {t[0]: t[1]}),
)


def _ledger_rows(db: Path) -> list[tuple[int, str]]:
    with by_hand(db) as conn:
        return [tuple(r) for r in conn.execute("SELECT seq, body FROM events ORDER BY seq")]


@pytest.fixture
def seeded(db: Path) -> Path:
    conn = ledger.connect(db)
    try:
        decisions.enqueue(conn, [decisions.JobSpec(command="true", id="j1"),
                             decisions.JobSpec(command="true", id="j2", after=["j1"])])
    finally:
        conn.close()
    return db


@settings(max_examples=400, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(args=commands, env=environments)
def test_any_input_works_or_is_one_error_line(seeded: Path, args: list[str], env: dict) -> None:
    if any("\x00" in value for value in env.values()):
        env = {}  # an environment cannot hold NUL: no process could receive it
    before = _ledger_rows(seeded)
    result = CliRunner().invoke(cli, args, env=env, catch_exceptions=False)
    after = _ledger_rows(seeded)
    if result.exit_code == 0:
        assert after[: len(before)] == before  # the past is never rewritten
        for _, body in after[len(before):]:
            stored = events.decode(body)  # every event written reads back ...
            assert events.encode(stored) == body  # ... as exactly what was written
    else:
        assert result.exit_code in (1, 2), result.output
        lines = result.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
        assert result.stdout == ""
        assert after == before  # nothing written
    conn = ledger.connect(seeded)
    try:
        assert ledger.check(conn) == []
    finally:
        conn.close()

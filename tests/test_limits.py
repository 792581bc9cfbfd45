"""Numbers, times and bytes that enter queuectl: one check each, and whatever passes it
works everywhere (stored, decoded, replayed, added to a time) without a traceback."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest
from conftest import by_hand
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from queuectl import claims, clock, events, ledger, limits
from queuectl import events as ev
from queuectl.errors import InvalidInput

# -- the one validator -----------------------------------------------------------------


@pytest.mark.parametrize("text", ["inf", "-inf", "nan", "NaN", "infinity", "1e400"])
@pytest.mark.parametrize("name", [n for n, b in limits.BOUNDS.items() if not b.integer])
@pytest.mark.stores("sqlite")  # no store involved
def test_no_bound_accepts_a_non_finite_number(name, text):
    with pytest.raises(InvalidInput, match="expected a number from"):
        limits.parse(name, text)


@pytest.mark.parametrize("name", limits.BOUNDS)
@pytest.mark.stores("sqlite")  # no store involved
def test_each_bound_takes_its_ends_and_refuses_beyond(name):
    b = limits.BOUNDS[name]
    assert limits.parse(name, str(int(b.low) if b.integer else b.low)) == b.low
    assert limits.parse(name, str(int(b.high) if b.integer else b.high)) == b.high
    for outside in (b.low - 1, b.high + 1, b.high * 10 + 10):
        with pytest.raises(InvalidInput):
            limits.parse(name, str(int(outside) if b.integer else outside))


@pytest.mark.stores("sqlite")  # no store involved
def test_whole_numbers_refuse_fractions_and_exponents():
    for text in ("1.5", "1e3", "abc", "", "99999999999999999999"):
        with pytest.raises(InvalidInput, match="a whole number from 0 to 1000000"):
            limits.parse("max_retries", text)


@pytest.mark.stores("sqlite")  # no store involved
def test_retry_delays_saturate_instead_of_overflowing():
    assert limits.backoff_delay(2, 3) == 8
    assert limits.backoff_delay(1, 50) == 1
    assert limits.backoff_delay(1e6, 1) == 1e6
    assert limits.backoff_delay(60, 7) == limits.LONGEST  # 60**7 s is 89,000 years
    assert limits.backoff_delay(1e6, 1_000_000) == limits.LONGEST
    assert limits.backoff_delay(1e12, 5) == limits.LONGEST


# -- times -------------------------------------------------------------------------------


@pytest.mark.stores("sqlite")  # no store involved
def test_times_are_fixed_width_and_round_trip():
    for moment in (datetime(1970, 1, 1, tzinfo=UTC), datetime(999, 6, 1, tzinfo=UTC),
                   datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)):
        text = clock.iso(moment)
        assert len(text) == 27 and text.endswith("Z")
        assert clock.parse(text) == moment


@pytest.mark.stores("sqlite")  # no store involved
def test_adding_to_a_time_saturates_at_the_ends():
    assert clock.after("2026-01-01T00:00:00.000000Z", 1e300) == "9999-12-31T23:59:59.999999Z"
    assert clock.after("2026-01-01T00:00:00.000000Z", -1e300) == "1970-01-01T00:00:00.000000Z"
    assert clock.after("2026-01-01T00:00:00.000000Z", 60) == "2026-01-01T00:01:00.000000Z"


@pytest.mark.parametrize("when", ["0999-06-01T00:00:00", "0001-01-01T00:00:00+01:00",
                                  "1969-12-31T23:59:59Z", "9999-12-31T23:00:00-05:00"])
def test_run_at_outside_1970_to_9999_is_one_error_line(run, when):
    result = run("enqueue", "-c", "true", "--run-at", when)
    assert (result.exit_code, result.stdout) == (1, "")
    assert result.stderr == (
        f"Error: invalid job: run_at '{when}' is outside 1970-01-01 to 9999-12-31 (UTC)\n")


def test_run_at_far_ahead_is_stored_fixed_width(run, conn):
    assert run("enqueue", "--id", "late", "-c", "true", "--run-at", "9999-01-01T00:00:00"
               ).exit_code == 0
    (run_at,) = conn.execute("SELECT run_at FROM jobs WHERE id = 'late'").fetchone()
    assert run_at == "9999-01-01T00:00:00.000000Z"


# -- the ledger refuses what it could not read back ------------------------------------------


def test_append_refuses_an_event_that_would_not_decode(conn):
    before = conn.execute("SELECT count(*) FROM events").fetchone()
    bad = ev.Enqueued(job_id="x", command="true", max_retries=3, backoff_base=2.0,
                      timeout=float("inf"))
    with pytest.raises(InvalidInput, match="cannot be stored"):
        with ledger.write(conn):
            ledger.append(conn, bad)
    with pytest.raises(InvalidInput, match="cannot be stored"):
        events.encode(ev.Enqueued(job_id="x", command="caf\udce9", max_retries=3,
                                  backoff_base=2.0))
    assert conn.execute("SELECT count(*) FROM events").fetchone() == before


# -- settings ---------------------------------------------------------------------------------


def test_config_keeps_every_digit_given(run, conn):
    assert run("config", "set", "job-timeout", "1234567").stdout.startswith(
        "Configuration updated: job-timeout = 1234567\n")
    assert run("config", "set", "backoff-base", "2.123456789").exit_code == 0
    assert dict(conn.execute("SELECT key, value FROM config")) == {
        "job-timeout": "1234567", "backoff-base": "2.123456789"}
    assert json.loads(run("config", "get", "--json").stdout)["job-timeout"] == 1234567


def test_jitter_zero_says_delays_are_not_shortened(run, conn):
    assert run("config", "set", "backoff-jitter", "0").stdout == (
        "Configuration updated: backoff-jitter = 0\nRetry delays will not be shortened\n")
    assert "random 0-0.5%" in run("config", "set", "backoff-jitter", "0.005").stdout


def test_a_stored_value_out_of_todays_range_still_works(run, conn):
    """Values a ledger already holds (set before bounds existed) are read into range."""
    with ledger.write(conn):
        ledger.append(conn, ev.ConfigChanged(key="backoff-base", value="1e100"),
                      ev.ConfigChanged(key="max-retries", value="99999999999999999999"),
                      ev.ConfigChanged(key="lease-timeout", value="1e11"))
    result = run("config", "get", "--json")
    assert result.exit_code == 0, result.output
    values = json.loads(result.stdout)
    assert (values["backoff-base"], values["max-retries"], values["lease-timeout"]) == (
        1_000_000, 1_000_000, 86400)
    assert run("enqueue", "--id", "j", "-c", "true").exit_code == 0
    assert run("status").exit_code == 0
    job = json.loads(run("show", "j", "--json").stdout)
    assert (job["max_retries"], job["backoff_base"]) == (1_000_000, 1_000_000)


# -- a failing job with the largest delays keeps every worker alive --------------------------


def test_huge_backoff_saturates_and_the_worker_goes_on(run, conn):
    assert run("enqueue", "--id", "huge", "-c", "exit 3", "--backoff-base", "1000000",
               "--max-retries", "7").exit_code == 0
    assert run("enqueue", "--id", "next", "-c", "true", "--priority", "-1").exit_code == 0
    result = run("worker", "--burst", "-l", "2")
    assert result.exit_code == 0, result.output
    states = dict(conn.execute("SELECT id, state FROM jobs"))
    assert states == {"huge": "failed", "next": "completed"}
    (body,) = conn.execute(
        "SELECT body FROM events WHERE type = 'scheduled-retry' AND job_id = 'huge'").fetchone()
    retry = json.loads(body)
    assert retry["delay"] == 1_000_000
    claim = claims.Claim("huge", "exit 3", 7, 7, 1e6, 0.0)
    late = claims.retry_or_dead(claim, clock.now(), "exit status 3")
    assert isinstance(late, ev.ScheduledRetry) and late.delay == limits.LONGEST
    assert late.run_at > clock.now() and len(late.run_at) == 27


# -- the command line: any text for any numeric flag is either taken or one error line -------

NUMERIC_FLAGS = {
    "--max-retries": "max_retries", "--backoff-base": "backoff_base", "--timeout": "timeout",
    "--priority": "priority", "--delay": "delay",
}
odd_numbers = st.one_of(
    st.sampled_from(["inf", "-inf", "nan", "1e20", "1e300", "-0", "0x10", "1_000", " 5 ",
                     "18446744073709551616", "-18446744073709551617", "1e-320", "",
                     "٣", "1.", ".5", "+3"]),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.integers(min_value=-(2**70), max_value=2**70).map(str),
    st.text(max_size=8),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(flag=st.sampled_from(sorted(NUMERIC_FLAGS)), text=odd_numbers)
def test_any_number_on_enqueue_is_stored_exactly_or_refused(run, db, flag, text):
    result = run("enqueue", "-c", "true", flag, text)
    if result.exit_code == 0:
        job_id = result.stdout.rsplit(" ", 1)[-1].strip()
        with by_hand(db) as conn:
            (body,) = conn.execute("SELECT body FROM events WHERE job_id = ?", (job_id,)
                                   ).fetchone()
        stored = events.decode(body)  # every accepted value reads back from the ledger
        assert isinstance(stored, ev.Enqueued)
        if flag != "--delay":
            limits.check(NUMERIC_FLAGS[flag], getattr(stored, NUMERIC_FLAGS[flag]))
    else:
        assert result.exit_code in (1, 2)
        assert result.stdout == ""
        assert result.stderr.count("\n") == 1 and result.stderr.startswith("Error: ")

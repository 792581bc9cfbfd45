"""``queuectl token add|list|revoke`` on both stores: a token is printed once and only its
SHA-256 reaches the ledger, names are checked, a name is held by one token at a time, and
``tokens.holder`` finds a token in force (and no other)."""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

import pytest
from conftest import by_hand
from helpers import ok, one_error

from queuectl import actor, tokens

TOKEN = re.compile(r"qctl_[A-Za-z0-9_-]{43}")


def add(run: Any, name: str, scope: str) -> str:
    result = run("token", "add", name, "--scope", scope)
    assert result.exit_code == 0, result.stderr
    assert result.stderr == f"Token '{name}' added (scope {scope}); it is shown only this once:\n"
    assert TOKEN.fullmatch(result.stdout.strip()), result.stdout
    return str(result.stdout.strip())


def test_a_token_is_printed_once_and_the_ledger_keeps_only_its_hash(run: Any, db: Any) -> None:
    made = add(run, "ci", "enqueue")
    with by_hand(db) as conn:
        rows = conn.execute("SELECT type, body FROM events").fetchall()
    assert [r[0] for r in rows] == ["token-added"]
    body = json.loads(rows[0][1])
    assert body["hash"] == hashlib.sha256(made.encode()).hexdigest()
    assert (body["name"], body["scope"]) == ("ci", "enqueue")
    assert made not in rows[0][1] and made[5:] not in rows[0][1]
    listed = json.loads(ok(run, "token", "list", "--json"))
    assert [{k: t[k] for k in ("name", "scope")} for t in listed] == [
        {"name": "ci", "scope": "enqueue"}]
    assert set(listed[0]) == {"name", "scope", "created_at", "by"}
    assert listed[0]["by"] == actor.person()
    assert made not in ok(run, "token", "list") and "ci" in ok(run, "token", "list")


def test_two_tokens_differ_and_each_is_found_by_itself(run: Any, db: Any) -> None:
    first, second = add(run, "a", "read"), add(run, "b", "admin")
    assert first != second
    with by_hand(db) as conn:
        assert tokens.holder(conn, first) == ("a", "read")
        assert tokens.holder(conn, second) == ("b", "admin")
        assert tokens.holder(conn, first + "x") is None
        assert tokens.holder(conn, "") is None
    assert tokens.Holder("b", "admin").allows("enqueue")
    assert tokens.Holder("e", "enqueue").allows("read")
    assert not tokens.Holder("e", "enqueue").allows("admin")
    assert not tokens.Holder("a", "read").allows("enqueue")


def test_revoke_ends_a_token_and_frees_its_name(run: Any, db: Any) -> None:
    old = add(run, "ci", "admin")
    assert ok(run, "token", "revoke", "ci") == "Token 'ci' revoked.\n"
    with by_hand(db) as conn:
        assert tokens.holder(conn, old) is None
    assert ok(run, "token", "list") == "Tokens: none\n"
    assert json.loads(ok(run, "token", "list", "--json")) == []
    new = add(run, "ci", "read")
    with by_hand(db) as conn:
        assert tokens.holder(conn, new) == ("ci", "read")
        assert tokens.holder(conn, old) is None
        types = [r[0] for r in conn.execute("SELECT type FROM events ORDER BY seq")]
    assert types == ["token-added", "token-revoked", "token-added"]


@pytest.mark.parametrize(("args", "message", "code"), [
    (("add", "ci", "--scope", "enqueue"), "Error: Token 'ci' already exists", 1),
    (("add", "a b", "--scope", "read"), "Error: token name 'a b' must be 1-64 letters", 1),
    (("add", "-x", "--scope", "read"), "Error: No such option '-x'", 2),
    (("add", "x" * 65, "--scope", "read"), "must be 1-64 letters", 1),
    (("add", "serve", "--scope", "read"),
     "Error: token name 'serve' is taken by queuectl serve --token", 1),
    (("add", "new", "--scope", "root"), "Error: Invalid value for '--scope': 'root'", 2),
    (("add", "new"), "Error: Missing option '--scope'", 2),
    (("revoke", "nobody"), "Error: Token 'nobody' not found", 1),
    (("revoke", "a\x00b"), "Error: Token 'a", 1),
])
def test_bad_input_is_one_error_line_and_changes_nothing(
        run: Any, db: Any, args: tuple[str, ...], message: str, code: int) -> None:
    add(run, "ci", "enqueue")
    result = run("token", *args)
    assert one_error(result, message) and result.exit_code == code
    with by_hand(db) as conn:
        assert conn.execute("SELECT count(*) FROM events").fetchone()[0] == 1


def test_the_table_lists_name_scope_time_and_who(run: Any) -> None:
    add(run, "deploy", "admin")
    add(run, "ci", "read")
    lines = ok(run, "token", "list").splitlines()
    assert lines[0] == "Tokens"
    assert lines[2].split() == ["Name", "Scope", "Created", "(UTC)", "By"]
    assert [line.split()[:2] for line in lines[4:6]] == [["ci", "read"], ["deploy", "admin"]]

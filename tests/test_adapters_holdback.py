"""How long the adapters hold a statement back, and what a line sent again becomes.

A statement is held until a later record of its session shows it has ended, or until the
records after it reach a bound (SETTLE_RECORDS records, SETTLE_BYTES bytes, a record logged
SETTLE_SECONDS later); ``idle`` and ``final`` release everything. A line of a statement that
has ended is rejected as ``duplicate_statement``.
"""

from __future__ import annotations

from typing import Any

import polars as pl
import pytest

from detector.adapters import make_adapter
from detector.adapters.base import SETTLE_BYTES, SETTLE_RECORDS, SETTLE_SECONDS, Parsed, RecentKeys
from tests.auditlog import MariadbLog, PgLog, padded

A, B = "65f2ea10.2a", "65f2ea11.2b"
DESTINATIONS = ["jsonlog", "csvlog", "stderr"]
READ = "SELECT * FROM customers"


def _parser(log: PgLog | MariadbLog) -> Any:
    return make_adapter(log.adapter, location="f", timezone=log.timezone, **log.options)


def _feed(log: PgLog | MariadbLog, **flags: bool) -> Parsed:
    parsed: Parsed = _parser(log).feed(log.data(), **flags)
    return parsed


def _texts(parsed: Parsed) -> list[str]:
    return parsed.events["statement_text"].to_list()


def _a_then_b(destination: str, sizes: list[int]) -> PgLog:
    """A's statement, then B's statements of ``sizes`` bytes, then a small read of B."""
    log = PgLog(destination)
    log.statement(A, "SELECT * FROM accounts", ["public.accounts"])
    for size in sizes:
        log.statement(B, padded("SELECT * FROM orders", size), ["public.orders"])
    log.statement(B, READ, ["public.customers"])
    return log


@pytest.mark.parametrize("destination", DESTINATIONS)
def test_a_statement_is_held_until_its_session_moves_on(destination: str) -> None:
    log = _a_then_b(destination, [100, 100])
    held = _feed(log)
    assert held.events.height == 0 and held.consumed == 0  # A may still get relation lines
    log.statement(A, "SELECT * FROM invoices", ["public.invoices"])
    log.statement(B, READ, ["public.customers"])
    moved = _feed(log)
    assert moved.events.filter(pl.col("session_id") == A)["statement_id"].to_list() == ["1.1"]
    assert moved.events.height == 4  # and B's statements before its last one


@pytest.mark.parametrize("destination", DESTINATIONS)
def test_the_bytes_held_behind_a_statement_are_bounded(destination: str) -> None:
    step = 100_000
    under = _a_then_b(destination, [step] * (SETTLE_BYTES // step - 1))
    assert _feed(under).consumed == 0
    over = _a_then_b(destination, [step] * (SETTLE_BYTES // step + 2))
    released = _feed(over)
    assert _texts(released)[0] == "SELECT * FROM accounts"
    assert released.events.height == 1 + SETTLE_BYTES // step + 2  # B's last read may go on
    assert released.rejects.height == 0


@pytest.mark.parametrize("destination", DESTINATIONS)
def test_the_time_a_statement_is_held_is_bounded_by_log_time(destination: str) -> None:
    log = PgLog(destination)
    log.statement(A, "SELECT * FROM accounts", ["public.accounts"])
    for _ in range(int(SETTLE_SECONDS) - 1):
        log.advance(1)
        log.statement(B, READ, ["public.customers"])
    log.advance(0.99)  # just under SETTLE_SECONDS after A's statement
    log.statement(B, READ, ["public.customers"])
    assert _feed(log).consumed == 0
    log.advance(0.01)
    log.statement(B, READ, ["public.customers"])
    assert _texts(_feed(log))[0] == "SELECT * FROM accounts"


@pytest.mark.parametrize("destination", DESTINATIONS)
def test_the_records_held_behind_a_statement_are_bounded(destination: str) -> None:
    log = PgLog(destination)
    log.statement(A, "SELECT * FROM accounts", ["public.accounts"])
    for _ in range(SETTLE_RECORDS - 1):
        log.record(B, "connection received: host=10.0.0.7 port=5544")
    assert _feed(log).consumed == 0
    log.record(B, "connection received: host=10.0.0.7 port=5544")
    assert _texts(_feed(log)) == ["SELECT * FROM accounts"]


@pytest.mark.parametrize("destination", DESTINATIONS)
@pytest.mark.parametrize("flag", ["idle", "final"])
def test_a_statement_held_at_the_end_is_released_on_idle_and_final(
    destination: str, flag: str
) -> None:
    log = PgLog(destination)
    log.statement(B, READ, ["public.customers"])
    log.disconnect(B)
    log.statement(A, "SELECT * FROM accounts", ["public.accounts", "public.invoices"])
    assert _texts(_feed(log)) == [READ]
    parsed = _feed(log, **{flag: True})
    assert _texts(parsed) == [READ, "SELECT * FROM accounts"]
    assert parsed.events["objects"].to_list()[1] == ["public.accounts", "public.invoices"]
    assert parsed.consumed == len(log.data())


def _in_parts(log: PgLog | MariadbLog, cut_after_line: int) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Feed the log in two parts (the first ends after line ``cut_after_line``), the second
    final; the events and rejects of both."""
    parser = _parser(log)
    head = b"".join(log.lines[:cut_after_line])
    first = parser.feed(head)
    rest = head[first.consumed :] + b"".join(log.lines[cut_after_line:])
    second = parser.feed(rest, final=True)
    return pl.concat([first.events, second.events]), pl.concat([first.rejects, second.rejects])


@pytest.mark.parametrize("destination", DESTINATIONS)
@pytest.mark.parametrize("apart", [False, True])
def test_a_line_resent_after_its_session_moved_on_is_a_counted_duplicate(
    destination: str, apart: bool
) -> None:
    """Read together with the statement, or after the statement was emitted."""
    log = PgLog(destination)
    first, _ = log.statement(A, "SELECT * FROM accounts", ["public.accounts"])
    log.statement(A, "SELECT * FROM invoices", ["public.invoices"])
    for _ in range(3):
        log.statement(B, READ, ["public.customers"])
    log.disconnect(B)
    cut = len(log.lines)
    again = log.resend(first)
    log.statement(A, "SELECT * FROM payments", ["public.payments"])
    events, rejects = _in_parts(log, cut if apart else len(log.lines))
    assert events.filter(pl.col("session_id") == A)["statement_id"].to_list() == [
        "1.1",
        "2.1",
        "3.1",
    ]
    assert events.height == 6
    assert rejects.select("location", "reason").rows() == [(f"f:{again}", "duplicate_statement")]
    assert "accounts" in rejects["record"][0]


@pytest.mark.parametrize("destination", DESTINATIONS)
def test_lines_of_a_statement_between_other_sessions_records_are_one_event(
    destination: str,
) -> None:
    """Concurrent sessions: B's records between the relation lines of A's statement, and a
    relation line logged twice in a row (pgaudit does so for a table read twice)."""
    log = PgLog(destination)
    lines = [
        "SESSION,1,1,READ,SELECT,TABLE,public.t,SELECT * FROM t JOIN u USING (id),<not logged>,2",
        "SESSION,1,1,READ,SELECT,TABLE,public.u,SELECT * FROM t JOIN u USING (id),<not logged>,2",
        "SESSION,1,1,READ,SELECT,TABLE,public.t,SELECT * FROM t JOIN u USING (id),<not logged>,2",
    ]
    log.record(A, "AUDIT: " + lines[0])
    log.statement(B, READ, ["public.customers"])
    log.record(A, "AUDIT: " + lines[1])
    log.record(A, "AUDIT: " + lines[2])
    log.statement(B, READ, ["public.customers"])
    log.disconnect(A)
    log.disconnect(B)
    for parsed in (_feed(log), _feed(log, final=True)):
        assert parsed.rejects.height == 0
        mine = parsed.events.filter(pl.col("session_id") == A)
        assert mine["objects"].to_list() == [["public.t", "public.u"]]
        assert parsed.events.height == 3


@pytest.mark.parametrize("destination", ["jsonlog", "stderr"])
@pytest.mark.parametrize("bound", ["bytes", "seconds", "records"])
def test_a_statement_released_by_a_bound_takes_no_later_line(destination: str, bound: str) -> None:
    """A line of A's statement that comes after other sessions' records that would have
    released the statement was sent again: the statement ended there, whether the two are
    read together or not."""
    log = PgLog(destination)
    first, _ = log.statement(A, "SELECT * FROM accounts", ["public.accounts"])
    if bound == "bytes":
        for _ in range(SETTLE_BYTES // 100_000 + 1):
            log.statement(B, padded("SELECT * FROM orders", 100_000), ["public.orders"])
    elif bound == "seconds":
        log.advance(SETTLE_SECONDS)
        log.statement(B, READ, ["public.customers"])
    else:
        for _ in range(SETTLE_RECORDS):
            log.record(B, "connection received: host=10.0.0.7 port=5544")
    again = log.resend(first)
    log.statement(B, READ, ["public.customers"])
    log.disconnect(B)
    whole = _feed(log)
    assert whole.events.filter(pl.col("session_id") == A).height == 1
    assert whole.rejects.select("location", "reason").rows() == [
        (f"f:{again}", "duplicate_statement")
    ]


def test_emitted_statements_are_remembered_up_to_a_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    import detector.adapters.pgaudit as pgaudit

    monkeypatch.setattr(pgaudit, "MAX_STATEMENTS", 3)
    log = PgLog("jsonlog")
    starts = [log.statement(A, f"SELECT {i} FROM t", ["public.t"])[0] for i in range(5)]
    log.disconnect(A)
    parser = _parser(log)
    assert parser.feed(log.data()).events.height == 5
    assert parser.state_.emitted.height == 3
    resent = log.lines[starts[0] - 1] + log.lines[starts[4] - 1]
    parsed = parser.feed(resent, final=True)
    # the first statement is forgotten: its line is taken as new; the last one is a duplicate
    assert parsed.events["statement_id"].to_list() == ["1.1"]
    assert parsed.rejects.select("location", "reason").rows() == [("f:8", "duplicate_statement")]


def test_recent_keys_forget_the_oldest_first() -> None:
    keys: RecentKeys[str] = RecentKeys(3)
    keys.add(["a", "b"])
    keys.add(["c", "a", "d"])
    assert (
        len(keys) == 3 and "a" not in keys and {"b", "c", "d"} == {k for k in "abcd" if k in keys}
    )


# ---------------------------------------------------------------- MariaDB server_audit


def _maria_texts(parsed: Parsed) -> list[str | None]:
    return parsed.events["statement_text"].to_list()


def test_mariadb_a_call_is_one_event_with_the_statements_it_ran() -> None:
    """server_audit logs a CALL's table line first, then the statements the procedure ran
    (with their own query ids), then the CALL's QUERY line."""
    log = MariadbLog()
    log.line(14, 51, "READ", "mysql", "proc", "")
    for query, table in ((52, "t"), (53, "u")):
        log.line(14, query, "READ", "saas", table, "")
        log.line(14, query, "QUERY", "saas", f"'SELECT * FROM saas.{table}'", "0")
    log.line(14, 51, "QUERY", "saas", "'CALL saas.p()'", "0")
    for parsed in (_feed(log), _feed(log, final=True)):
        assert parsed.rejects.height == 0
        assert _maria_texts(parsed) == [
            "CALL saas.p()",
            "SELECT * FROM saas.t",
            "SELECT * FROM saas.u",
        ]
        assert parsed.events["objects"].to_list()[0] == ["mysql.proc"]
        assert parsed.events["action"].to_list()[1:] == ["read", "read"]


@pytest.mark.parametrize("apart", [False, True])
def test_mariadb_a_resent_query_line_is_a_counted_duplicate(apart: bool) -> None:
    log = MariadbLog()
    _, query = log.statement(41, "SELECT * FROM accounts", ["saas.accounts"])
    for _ in range(3):
        log.statement(42, READ, ["saas.customers"])
    cut = len(log.lines)
    again = log.resend(query)
    log.statement(42, READ, ["saas.customers"])
    events, rejects = _in_parts(log, cut if apart else len(log.lines))
    assert events.height == 5
    assert rejects.select("location", "reason").rows() == [(f"f:{again}", "duplicate_statement")]


def test_mariadb_table_lines_still_without_their_query_are_held_within_bounds() -> None:
    log = MariadbLog()
    log.statement(41, "SELECT * FROM accounts", ["saas.accounts"], query_line=False)
    log.statement(42, READ, ["saas.customers"])
    held = _feed(log)
    assert held.consumed == 0  # the query is still running
    log.advance(SETTLE_SECONDS)
    log.statement(42, READ, ["saas.customers"])
    released = _feed(log)
    objects = released.events["objects"].to_list()
    assert objects == [["saas.accounts"], ["saas.customers"], ["saas.customers"]]
    big = MariadbLog()
    big.statement(41, "SELECT * FROM accounts", ["saas.accounts"], query_line=False)
    for _ in range(SETTLE_BYTES // 100_000 + 1):
        big.statement(42, padded("SELECT * FROM orders", 100_000), ["saas.orders"])
    assert _feed(big).events["objects"].to_list()[0] == ["saas.accounts"]

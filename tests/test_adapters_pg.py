"""pgaudit adapters against a private PostgreSQL 15 cluster (all three log destinations)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from detector.adapters import make_adapter
from detector.sources.files import read_events
from tests.pgcluster import SAAS_SCHEMA, PgCluster, require_cluster

PREFIX = "%m [%p] %q%u@%d %a %h %c: "
DBEAVER = "DBeaver 23.1.0 - Main"


@pytest.fixture(scope="session")
def pg_logs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PgCluster]:
    """A private cluster that ran the SaaS traffic and was stopped; its logs are complete."""
    require_cluster()
    cluster = PgCluster.create(
        tmp_path_factory.mktemp("pg") / "cluster",
        log_line_prefix=PREFIX,
        settings={"pgaudit.log_statement_once": "on"},
    )
    cluster.start()
    try:
        with cluster.connect() as conn:
            for statement in SAAS_SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)
        app = {"password": "app-secret", "application_name": "billing-api"}
        with cluster.connect("app_api", **app) as conn:
            for client in (3, 5, 7):
                conn.execute("SELECT name, email FROM clients WHERE id = %s", (client,)).fetchall()
            conn.execute(
                "SELECT c.name, a.balance FROM clients c JOIN accounts a ON a.client_id = c.id"
                " WHERE c.id = %s",
                (3,),
            ).fetchall()
            conn.execute("UPDATE accounts SET balance = balance + 1 WHERE client_id = 3")
        with cluster.connect("app_api", password="app-secret", application_name=DBEAVER) as c:
            c.execute("SELECT * FROM clients").fetchall()
            c.execute("SELECT client_id, count(*) FROM search_counts GROUP BY client_id").fetchall()
            with c.cursor().copy("COPY clients TO STDOUT") as copy:
                for _ in copy:
                    pass
        import psycopg

        for _ in range(3):
            with pytest.raises(psycopg.OperationalError):
                psycopg.connect(cluster.dsn("app_api", password="wrong"))
        cluster.wait_for_log("jsonlog", "COPY clients TO STDOUT")
    finally:
        cluster.stop()
    yield cluster
    cluster.remove()


def _parse(cluster: PgCluster, destination: str) -> Any:
    name = {"jsonlog": "pgaudit-jsonlog", "csvlog": "pgaudit-csvlog", "stderr": "pgaudit-stderr"}
    options = {"log_line_prefix": PREFIX} if destination == "stderr" else {}
    parser = make_adapter(name[destination], location=destination, **options)
    return parser.feed(cluster.log_file(destination).read_bytes(), final=True)


def _app_events(parsed: Any) -> list[dict[str, Any]]:
    return parsed.events.filter(pl.col("db_user") == "app_api").to_dicts()


@pytest.mark.parametrize("destination", ["jsonlog", "csvlog", "stderr"])
def test_traffic_is_parsed_field_by_field(pg_logs: PgCluster, destination: str) -> None:
    parsed = _parse(pg_logs, destination)
    assert parsed.rejects.height == 0, parsed.rejects.to_dicts()
    assert parsed.skipped > 0  # server chatter: startup, connection received, disconnection
    events = _app_events(parsed)
    logins = [e for e in events if e["action"] == "login"]
    failed = [e for e in events if e["action"] == "login_failed"]
    assert len(logins) == 2 and len(failed) == 3
    assert {e["client_app"] for e in logins} == {"billing-api", DBEAVER}
    assert all(e["client_ip"] == "127.0.0.1" and e["success"] is False for e in failed)
    assert all(e["command"] == "LOGIN" and e["db_name"] == "postgres" for e in logins)
    work = [e for e in events if e["action"] not in ("login", "login_failed")]
    expected = [
        ("read", "SELECT", ["public.clients"], 1, None, "billing-api", "WHERE id = $1"),
        ("read", "SELECT", ["public.clients"], 1, None, "billing-api", "WHERE id = $1"),
        ("read", "SELECT", ["public.clients"], 1, None, "billing-api", "WHERE id = $1"),
        ("read", "SELECT", ["public.clients", "public.accounts"], 3, None, "billing-api", "JOIN"),
        ("write", "UPDATE", ["public.accounts"], None, 3, "billing-api", "UPDATE accounts"),
        ("read", "SELECT", ["public.clients"], 40, None, DBEAVER, "SELECT * FROM clients"),
        ("read", "SELECT", ["public.search_counts"], 40, None, DBEAVER, "GROUP BY client_id"),
        ("copy", "COPY", ["clients"], None, None, DBEAVER, "COPY clients TO STDOUT"),
    ]
    assert len(work) == len(expected)
    for event, (action, command, objects, returned, affected, app, text) in zip(
        work, expected, strict=True
    ):
        assert event["action"] == action
        assert event["command"] == command
        assert event["objects"] == objects
        assert event["rows_returned"] == returned
        assert event["rows_affected"] == affected
        assert event["client_app"] == app
        assert text in event["statement_text"]
        assert event["client_ip"] == "127.0.0.1"
        assert event["db_name"] == "postgres"
        assert event["source_format"] == "pgaudit" and event["db_system"] == "postgresql"
        assert event["session_id"] and event["statement_id"]
        assert event["event_time"].tzinfo is not None
    # statement ids restart per session and are unique within one
    keys = [(e["session_id"], e["statement_id"]) for e in work]
    assert len(set(keys)) == len(keys)


def test_destinations_agree(pg_logs: PgCluster) -> None:
    cols = [
        "event_time",
        "db_user",
        "action",
        "client_ip",
        "session_id",
        "statement_id",
        "command",
        "objects",
        "statement_text",
        "rows_returned",
        "rows_affected",
    ]
    frames = [_parse(pg_logs, d).events.select(cols) for d in ("jsonlog", "csvlog", "stderr")]
    assert frames[0].height > 10
    assert frames[0].equals(frames[1]) and frames[0].equals(frames[2])


def test_stderr_with_plain_prefix_uses_connection_lines(pg_logs: PgCluster, tmp_path: Path) -> None:
    """Rewrite the real stderr log to the default prefix '%m [%p] ': the user, database,
    application and address must then come from the connection lines of each pid."""
    import re

    text = pg_logs.log_file("stderr").read_bytes()
    plain = re.sub(rb"(?m)^(\S+ \S+ UTC \[\d+\]) .*?: (?=[A-Z]+:  )", rb"\1 ", text)
    path = tmp_path / "postgresql.log"
    path.write_bytes(plain)
    events = pl.concat(list(read_events(path)))
    full = _parse(pg_logs, "stderr").events
    # a failed login's line names no database: only a prefix with %d can tell it
    events = events.with_columns(
        db_name=pl.when(pl.col("action") == "login_failed").then(None).otherwise("db_name")
    )
    full = full.with_columns(
        db_name=pl.when(pl.col("action") == "login_failed").then(None).otherwise("db_name")
    )
    cols = ["db_user", "action", "db_name", "client_ip", "session_id", "statement_id", "objects"]
    diffs = [
        (a, b)
        for a, b in zip(events.select(cols).rows(), full.select(cols).rows(), strict=True)
        if a != b
    ]
    assert not diffs, diffs[:3]
    assert set(events.filter(pl.col("db_user") == "app_api")["client_app"].drop_nulls()) == {
        "billing-api",
        DBEAVER,
    }


@pytest.mark.parametrize("destination", ["jsonlog", "csvlog", "stderr"])
def test_real_log_in_random_chunks_gives_the_same_events(
    pg_logs: PgCluster, destination: str
) -> None:
    import random

    data = pg_logs.log_file(destination).read_bytes()
    whole = _parse(pg_logs, destination).events
    options = {"log_line_prefix": PREFIX} if destination == "stderr" else {}
    for seed in range(3):
        rng = random.Random(seed)
        parser = make_adapter(f"pgaudit-{destination}", location=destination, **options)
        rest, frames, pos = b"", [], 0
        while pos < len(data):
            step = rng.randrange(1, 3000)
            buffer = rest + data[pos : pos + step]
            pos += step
            parsed = parser.feed(buffer)
            assert parsed.rejects.height == 0
            frames.append(parsed.events)
            rest = buffer[parsed.consumed :]
        frames.append(parser.feed(rest, final=True).events)
        assert pl.concat(frames).equals(whole)

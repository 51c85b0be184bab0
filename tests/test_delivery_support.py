"""Shared pieces of the delivery tests: a private store (SQLite file or a fresh PostgreSQL
database), outbox and incident rows, a settable clock, and polling with a deadline.

The PostgreSQL variant needs a server at 127.0.0.1:5432 (user postgres, trust auth). It is
skipped, with the reason, when none answers, except under CI=true where that is a failure.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from detector.sinks import tables as t

PG_SERVER = "postgresql+psycopg://postgres@127.0.0.1:5432"
SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
OTHER_SECRET = "whsec_c2VjcmV0LW9mLWEtcm90YXRlZC1lbmRwb2ludC0x"
BACKENDS = ["sqlite", "postgresql"]


@contextmanager
def postgres_database() -> Iterator[str]:
    """A fresh PostgreSQL database for this test run, dropped afterwards; yields its URL."""
    admin = sa.create_engine(f"{PG_SERVER}/postgres", isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
    except sa.exc.OperationalError as exc:
        admin.dispose()
        reason = f"PostgreSQL at 127.0.0.1:5432 is unreachable: {str(exc.orig).strip()[:200]}"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    name = f"exfilwatch_test_{uuid.uuid4().hex[:16]}"
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    try:
        yield f"{PG_SERVER}/{name}"
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@contextmanager
def store(backend: str, pg_url: str | None, tmp_path: Path) -> Iterator[tuple[sa.Engine, str]]:
    """A store with empty tables; yields the engine and its URL (to open a second engine)."""
    if backend == "sqlite":
        url = f"sqlite:///{tmp_path / 'store.db'}"
    else:
        assert pg_url is not None
        url = pg_url
    engine = t.create_engine(url)
    with engine.begin() as conn:
        for table in (t.outbox, t.incidents):
            conn.execute(table.delete())
    try:
        yield engine, url
    finally:
        engine.dispose()


class FakeClock:
    """A clock that moves only when told to."""

    def __init__(self, start: datetime | None = None) -> None:
        self.now = (start or datetime.now(UTC)).replace(microsecond=0)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


def incident_doc(incident_id: str = "inc_1", **over: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "id": incident_id,
        "status": "open",
        "principal": "app_api",
        "addresses": ["203.0.113.9"],
        "client_apps": ["dbeaver"],
        "sessions": ["s-1"],
        "tables": ["public.clients", "public.accounts"],
        "tenants_touched": 41,
        "rows_read": 2140,
        "max_table_coverage": 0.97,
        "first_seen": "2024-05-01T02:10:00+00:00",
        "last_seen": "2024-05-01T02:14:00+00:00",
        "events": 12,
        "anomaly_score": 0.71,
        "severity": "high",
        "reason": "read 2,140 rows of clients; typical for app_api: 1; new address 203.0.113.9",
        "top_features": [{"feature": "rows_sensitive_10m", "actual": 2140, "typical": 1}],
        "statement": "SELECT * FROM clients WHERE tenant_id = ?",
    }
    doc.update(over)
    return doc


def add_alert(engine: sa.Engine, alert_id: str, *, sink: str = "hook",
              kind: str = "incident.opened", incident_id: str = "inc_1",
              created_at: datetime | None = None, doc: dict[str, Any] | None = None) -> None:
    """Insert an outbox row as the store does."""
    when = created_at or datetime.now(UTC)
    payload = {"type": kind, "timestamp": when.isoformat(),
               "data": doc or incident_doc(incident_id)}
    with engine.begin() as conn:
        conn.execute(t.outbox.insert().values(
            id=alert_id, sink=sink, kind=kind, incident_id=incident_id, payload=payload,
            created_at=when, next_attempt_at=when, attempts=0))


def add_incident(engine: sa.Engine, doc: dict[str, Any], *, first_seen: datetime,
                 status_changed_at: datetime | None = None) -> None:
    now = datetime.now(UTC)
    with engine.begin() as conn:
        conn.execute(t.incidents.insert().values(
            id=doc["id"], group_key=f"{doc['principal']}|s", principal=doc["principal"],
            status=doc["status"], severity=doc["severity"], first_seen=first_seen,
            last_seen=first_seen, events=doc["events"], rows_read=doc["rows_read"],
            peak_score=doc["anomaly_score"], doc=doc, created_at=now, updated_at=now,
            status_changed_at=status_changed_at))


def outbox_rows(engine: sa.Engine) -> dict[str, sa.Row[Any]]:
    with engine.connect() as conn:
        return {r.id: r for r in conn.execute(sa.select(t.outbox))}


def utc(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value


def eventually(condition: Callable[[], bool], timeout: float = 15.0, what: str = "") -> None:
    """Poll ``condition`` until it holds; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what or condition}")
        time.sleep(0.02)


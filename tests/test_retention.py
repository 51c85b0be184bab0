"""Retention: delivered alerts and closed incidents past their retention are deleted, nothing
else is (never an undelivered alert, never an open or acknowledged incident), on SQLite and
on PostgreSQL, with the clock in the test's hands; and the live service prunes by its
``retention`` settings."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from detector.sinks import tables as t
from detector.sinks.store import Store
from tests.service_support import models_copy, running, settings_for
from tests.test_delivery_support import (  # noqa: F401 - fixtures
    BACKENDS,
    FakeClock,
    incident_doc,
    postgres_database,
    store,
)

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
DAY = timedelta(days=1)


def incident(eng: sa.Engine, incident_id: str, status: str, changed: datetime) -> None:
    doc = incident_doc(incident_id, status=status)
    with eng.begin() as conn:
        conn.execute(
            t.incidents.insert().values(
                id=incident_id,
                group_key=f"{incident_id}|key",
                principal=doc["principal"],
                status=status,
                severity=doc["severity"],
                first_seen=changed - timedelta(hours=1),
                last_seen=changed,
                events=doc["events"],
                rows_read=doc["rows_read"],
                peak_score=doc["anomaly_score"],
                doc=doc,
                created_at=changed - timedelta(hours=1),
                updated_at=changed,
                status_changed_at=changed if status != "open" else None,
            )
        )


def alert(
    eng: sa.Engine, alert_id: str, incident_id: str, created: datetime, delivered: datetime | None
) -> None:
    payload: dict[str, Any] = {"type": "incident.opened", "data": incident_doc(incident_id)}
    with eng.begin() as conn:
        conn.execute(
            t.outbox.insert().values(
                id=alert_id,
                sink="soc",
                kind="incident.opened",
                incident_id=incident_id,
                payload=payload,
                created_at=created,
                attempts=1 if delivered else 7,
                next_attempt_at=created,
                delivered_at=delivered,
            )
        )


def ids(eng: sa.Engine, table: sa.Table) -> set[str]:
    with eng.connect() as conn:
        return set(conn.execute(sa.select(table.c.id)).scalars())


def history(eng: sa.Engine) -> None:
    """Incidents of every status, old and recent, and alerts delivered long ago, lately and
    never (the oldest row of all, for an incident resolved long ago)."""
    incident(eng, "open_old", "open", NOW - 400 * DAY)
    incident(eng, "acked_old", "acknowledged", NOW - 400 * DAY)
    incident(eng, "resolved_old", "resolved", NOW - 400 * DAY)
    incident(eng, "false_positive_old", "false_positive", NOW - 366 * DAY)
    incident(eng, "resolved_waiting", "resolved", NOW - 400 * DAY)
    incident(eng, "resolved_recent", "resolved", NOW - 364 * DAY)
    alert(eng, "delivered_old", "resolved_old", NOW - 300 * DAY, NOW - 299 * DAY)
    alert(eng, "delivered_31d", "open_old", NOW - 32 * DAY, NOW - 31 * DAY)
    alert(eng, "delivered_29d", "acked_old", NOW - 30 * DAY, NOW - 29 * DAY)
    alert(eng, "undelivered_ancient", "resolved_waiting", NOW - 500 * DAY, None)


def test_prune_deletes_delivered_alerts_and_closed_incidents_past_retention_only(
    engine: sa.Engine,
) -> None:
    history(engine)
    clock = FakeClock(NOW)
    st = Store(engine, clock=clock)
    # chunks of two: several transactions of each kind
    got = st.prune(delivered_before=NOW - 30 * DAY, closed_before=NOW - 365 * DAY, chunk=2)
    assert got == (2, 2)
    assert ids(engine, t.outbox) == {"delivered_29d", "undelivered_ancient"}
    assert ids(engine, t.incidents) == {
        "open_old",
        "acked_old",
        "resolved_waiting",  # an alert of it waits for delivery
        "resolved_recent",
    }
    # the waiting alert goes out: its incident may go now, the alert itself after retention
    with engine.begin() as conn:
        conn.execute(
            t.outbox.update()
            .where(t.outbox.c.id == "undelivered_ancient")
            .values(delivered_at=clock.now)
        )
    assert st.prune(delivered_before=NOW - 30 * DAY, closed_before=NOW - 365 * DAY) == (0, 1)
    assert "resolved_waiting" not in ids(engine, t.incidents)
    clock.advance(31 * 86400)
    later = clock.now
    assert st.prune(delivered_before=later - 30 * DAY, closed_before=later - 365 * DAY) == (2, 1)
    assert ids(engine, t.outbox) == set()
    assert ids(engine, t.incidents) == {"open_old", "acked_old"}  # open ones stay for ever


def test_prune_with_no_retention_keeps_everything(engine: sa.Engine) -> None:
    history(engine)
    before = ids(engine, t.outbox), ids(engine, t.incidents)
    assert Store(engine).prune(delivered_before=None, closed_before=None) == (0, 0)
    assert (ids(engine, t.outbox), ids(engine, t.incidents)) == before


def test_the_service_prunes_by_its_retention_settings(tmp_path: Path) -> None:
    """Delivered alerts kept 10 days, closed incidents 0 (for ever): the service deletes the
    alerts delivered before that and keeps every incident."""
    settings = settings_for(
        tmp_path,
        models_copy(tmp_path),
        retention={"delivered_alerts_days": 10, "closed_incidents_days": 0},
    )
    (tmp_path / "var").mkdir()
    eng = t.create_engine(settings.store_url)
    history(eng)
    alert(eng, "delivered_9d", "open_old", NOW - 10 * DAY, NOW - 9 * DAY)
    eng.dispose()
    clock = FakeClock(NOW)
    with running(settings, clock=clock) as service:
        service.prune()
        outbox, incidents = (
            ids(service.store.engine, t.outbox),
            ids(service.store.engine, t.incidents),
        )
    assert outbox == {"delivered_9d", "undelivered_ancient"}
    assert incidents == {
        "open_old",
        "acked_old",
        "resolved_old",
        "false_positive_old",
        "resolved_waiting",
        "resolved_recent",
    }

"""The state store's tables, one definition for SQLite and PostgreSQL (SQLAlchemy Core).

What commits together (see docs/ARCHITECTURE.md, "Exactly-resumable processing"): for every
micro-batch, the incident upserts, the outbox rows of the alerts they raise and the new source
positions are written in one transaction. Feature-state snapshots are files; the ``snapshots``
row that names one is written only after the file is complete.
"""

from __future__ import annotations

from typing import Final

import sqlalchemy as sa

metadata: Final = sa.MetaData()

TS = sa.DateTime(timezone=True)

#: One row per incident; ``doc`` is the whole incident document as the API returns it.
incidents: Final = sa.Table(
    "incidents",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("group_key", sa.Text, nullable=False),
    sa.Column("principal", sa.Text, nullable=False),
    sa.Column("status", sa.String(16), nullable=False),  # open|acknowledged|false_positive|resolved
    sa.Column("severity", sa.String(16), nullable=False),
    sa.Column("first_seen", TS, nullable=False),
    sa.Column("last_seen", TS, nullable=False),
    sa.Column("events", sa.BigInteger, nullable=False),
    sa.Column("rows_read", sa.BigInteger, nullable=False),
    sa.Column("peak_score", sa.Float, nullable=False),
    sa.Column("doc", sa.JSON, nullable=False),
    sa.Column("created_at", TS, nullable=False),
    sa.Column("updated_at", TS, nullable=False),
    sa.Column("status_changed_at", TS, nullable=True),
    sa.Column("status_comment", sa.Text, nullable=True),
    sa.Column("status_by", sa.Text, nullable=True),
)
sa.Index("ix_incidents_status_last", incidents.c.status, incidents.c.last_seen)
sa.Index("ix_incidents_key_last", incidents.c.group_key, incidents.c.last_seen)

#: One row per (alert, sink). ``id`` is the alert id, sent as the webhook-id on every attempt.
outbox: Final = sa.Table(
    "outbox",
    metadata,
    sa.Column("id", sa.String(80), primary_key=True),
    sa.Column("sink", sa.String(64), primary_key=True),
    sa.Column("kind", sa.String(32), nullable=False),  # incident.opened | incident.escalated ...
    sa.Column("incident_id", sa.String(64), nullable=False),
    sa.Column("payload", sa.JSON, nullable=False),
    sa.Column("created_at", TS, nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False, default=0),
    sa.Column("next_attempt_at", TS, nullable=False),
    sa.Column("delivered_at", TS, nullable=True),
    sa.Column("last_status", sa.Integer, nullable=True),
    sa.Column("last_error", sa.Text, nullable=True),
)
sa.Index("ix_outbox_due", outbox.c.sink, outbox.c.delivered_at, outbox.c.next_attempt_at)

#: Where each source has got to: ``position`` is the source's own JSON (file id, offset, ...).
positions: Final = sa.Table(
    "positions",
    metadata,
    sa.Column("source", sa.String(128), primary_key=True),
    sa.Column("key", sa.String(512), primary_key=True),
    sa.Column("position", sa.JSON, nullable=False),
    sa.Column("updated_at", TS, nullable=False),
)

#: Feature-state snapshots: the directory holding it and the source positions it reflects.
snapshots: Final = sa.Table(
    "snapshots",
    metadata,
    sa.Column("seq", sa.BigInteger, primary_key=True),
    sa.Column("path", sa.Text, nullable=False),
    sa.Column("model", sa.Text, nullable=False),
    sa.Column("positions", sa.JSON, nullable=False),
    sa.Column("events_seen", sa.BigInteger, nullable=False),
    sa.Column("created_at", TS, nullable=False),
)

#: The read log: for every committed micro-batch, what was read from where, in order. Replaying
#: the reads after the latest snapshot rebuilds the feature state exactly (see live.py).
batches: Final = sa.Table(
    "batches",
    metadata,
    sa.Column("seq", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("reads", sa.JSON, nullable=False),
    sa.Column("events", sa.BigInteger, nullable=False),
    sa.Column("committed_at", TS, nullable=False),
)

#: Analyst verdicts kept for retraining; ``suppress_until`` silences re-alerts on the pattern.
feedback: Final = sa.Table(
    "feedback",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("incident_id", sa.String(64), nullable=False),
    sa.Column("verdict", sa.String(16), nullable=False),  # false_positive | acknowledged
    sa.Column("pattern", sa.Text, nullable=False),
    sa.Column("tables", sa.JSON, nullable=False),
    sa.Column("comment", sa.Text, nullable=True),
    sa.Column("by", sa.Text, nullable=True),
    sa.Column("created_at", TS, nullable=False),
    sa.Column("suppress_until", TS, nullable=True),
)
sa.Index("ix_feedback_pattern", feedback.c.pattern, feedback.c.suppress_until)


def create_engine(url: str) -> sa.Engine:
    """An engine for ``url`` (``sqlite:///var/exfilwatch.db`` or ``postgresql+psycopg://...``)
    with the tables created. SQLite runs in WAL mode with synchronous=FULL, so a commit that
    returned survives a kill -9 and a power cut."""
    engine = sa.create_engine(url, future=True, pool_pre_ping=True)
    if engine.dialect.name == "sqlite":

        @sa.event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn, _record):  # type: ignore[no-untyped-def]
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=FULL")
            cur.execute("PRAGMA busy_timeout=10000")
            cur.close()

    metadata.create_all(engine)
    return engine

"""The state store: incidents, alert outbox, source positions, read log, snapshots, feedback.

One :class:`Store` per process over SQLite (default) or PostgreSQL. The live pipeline writes a
micro-batch's results through one :class:`Tx`, so incidents, the alerts they raise and the new
source positions commit together or not at all. The API reads and changes incident status
through the same store.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

import sqlalchemy as sa

from detector.schema import SEVERITY_RANK
from detector.sinks import tables as t
from detector.sinks.outbox import Clock, prune_delivered, utc_now


def _ts(value: Any) -> datetime:
    """A timestamp from the store as an aware UTC datetime (SQLite hands back naive ones)."""
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    assert isinstance(value, datetime)
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def alert_id(incident_id: str, kind: str, detail: str = "") -> str:
    """The alert's id (the webhook-id on every delivery attempt): derived, so reprocessing the
    same events cannot mint a second alert."""
    digest = hashlib.sha256(f"{incident_id}|{kind}|{detail}".encode()).hexdigest()[:24]
    return f"alr_{digest}"


@dataclass(frozen=True, slots=True)
class Route:
    """Which alerts an outbox sink receives."""

    sink: str
    kinds: tuple[str, ...]
    min_rank: int


@dataclass(frozen=True, slots=True)
class Snapshot:
    seq: int
    path: str
    model: str
    positions: dict[str, Any]
    events_seen: int


def _insert(engine: sa.Engine, table: sa.Table) -> Any:
    """An INSERT for the engine's dialect, which can take ON CONFLICT clauses."""
    if engine.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        return pg_insert(table)
    from sqlalchemy.dialects.sqlite import insert as sqlite_insert

    return sqlite_insert(table)


def _insert_ignore(engine: sa.Engine, table: sa.Table) -> Any:
    """INSERT ... ON CONFLICT DO NOTHING."""
    return _insert(engine, table).on_conflict_do_nothing()


def _upsert(engine: sa.Engine, table: sa.Table, keys: list[str], values: list[str]) -> Any:
    """INSERT ... ON CONFLICT (keys) DO UPDATE SET the values."""
    stmt = _insert(engine, table)
    return stmt.on_conflict_do_update(
        index_elements=keys, set_={v: stmt.excluded[v] for v in values}
    )


class Tx:
    """Writes of one transaction (see :meth:`Store.transaction`)."""

    def __init__(self, store: Store, conn: sa.Connection, now: datetime) -> None:
        self._store = store
        self._conn = conn
        self.now = now

    # ----------------------------------------------------------------- incidents
    def active_incidents(self, keys: Sequence[str]) -> dict[str, dict[str, Any]]:
        """The most recent not-resolved incident per group key (its document, with status)."""
        c = t.incidents.c
        out: dict[str, dict[str, Any]] = {}
        for chunk in _chunks(keys):
            newest = (
                sa.select(
                    c.doc,
                    c.status,
                    c.group_key,
                    sa.func.row_number()
                    .over(partition_by=c.group_key, order_by=(c.last_seen.desc(), c.id.desc()))
                    .label("rank"),
                )
                .where(c.group_key.in_(chunk))
                .where(c.status != "resolved")
                .subquery()
            )
            rows = self._conn.execute(
                sa.select(newest.c.doc, newest.c.status, newest.c.group_key).where(
                    newest.c.rank == 1
                )
            ).all()
            out.update({key: {**doc, "status": status} for doc, status, key in rows})
        return out

    def incidents_of(self, principals: Sequence[str], since: datetime) -> list[dict[str, Any]]:
        """The not-resolved incidents of ``principals`` whose last event is at ``since`` or
        later that a spray can grow from: their activity at each place, their sprays, and
        failed logins from one address for that principal alone (documents, with status)."""
        c = t.incidents.c
        lone = sa.and_(
            c.group_key.startswith("address:"), c.doc["principals_count"].as_integer() == 1
        )
        out: list[dict[str, Any]] = []
        for chunk in _chunks(principals):
            rows = self._conn.execute(
                sa.select(c.doc, c.status)
                .where(c.principal.in_(chunk))
                .where(c.status != "resolved")
                .where(c.last_seen >= since)
                .where(sa.or_(c.group_key.startswith("principal:"), lone))
                .order_by(c.last_seen, c.id)
            ).all()
            out += [{**doc, "status": status} for doc, status in rows]
        return out

    def save_incidents(self, docs: Sequence[dict[str, Any]], *, new: bool) -> None:
        """Insert (``new``) or update incidents: one statement for all of them."""
        if not docs:
            return
        rows = [
            {
                "_id": doc["id"],
                "group_key": doc["group_key"],
                "principal": doc["principal"],
                "status": doc["status"],
                "severity": doc["severity"],
                "first_seen": datetime.fromisoformat(doc["first_seen"]),
                "last_seen": datetime.fromisoformat(doc["last_seen"]),
                "events": doc["events"],
                "rows_read": doc["rows_read"],
                "peak_score": doc["anomaly_score"],
                "doc": doc,
                "updated_at": self.now,
            }
            for doc in docs
        ]
        if new:
            for row in rows:
                row["id"] = row.pop("_id")
                row["created_at"] = self.now
            self._conn.execute(_insert_ignore(self._store.engine, t.incidents), rows)
        else:
            columns = [k for k in rows[0] if k != "_id"]
            stmt = (
                t.incidents.update()
                .where(t.incidents.c.id == sa.bindparam("_id"))
                .values({c: sa.bindparam(c) for c in columns})
            )
            self._conn.execute(stmt, rows)

    def resolve_idle(
        self, event_before: datetime | None, wall_before: datetime, comment: str, limit: int
    ) -> list[dict[str, Any]]:
        """Resolve up to ``limit`` open or acknowledged incidents whose last event is before
        ``event_before`` or that have not changed since ``wall_before``, the longest quiet
        first; their documents. The limit bounds memory and transaction size after an
        incident storm: the caller repeats until fewer than ``limit`` come back."""
        c = t.incidents.c
        quiet = c.updated_at < wall_before
        if event_before is not None:
            quiet = sa.or_(quiet, c.last_seen < event_before)
        found = self._conn.execute(
            sa.select(c.id, c.doc)
            .where(c.status.in_(("open", "acknowledged")))
            .where(quiet)
            .order_by(c.last_seen, c.id)
            .limit(limit)
        ).all()
        docs = [{**doc, "status": "resolved"} for _id, doc in found]
        if docs:
            stmt = (
                t.incidents.update()
                .where(t.incidents.c.id == sa.bindparam("_id"))
                .values(
                    status="resolved",
                    doc=sa.bindparam("doc"),
                    status_changed_at=self.now,
                    status_comment=comment,
                    status_by=None,
                    updated_at=self.now,
                )
            )
            self._conn.execute(stmt, [{"_id": d["id"], "doc": d} for d in docs])
        return docs

    def set_status(
        self, incident_id: str, status: str, comment: str | None, by: str | None
    ) -> dict[str, Any]:
        """Change an incident's status; returns its stored document as changed."""
        doc = self._conn.execute(
            sa.select(t.incidents.c.doc).where(t.incidents.c.id == incident_id)
        ).scalar_one()
        changed = {**doc, "status": status}
        self._conn.execute(
            t.incidents.update()
            .where(t.incidents.c.id == incident_id)
            .values(
                status=status,
                doc=changed,
                status_changed_at=self.now,
                status_comment=comment,
                status_by=by,
                updated_at=self.now,
            )
        )
        return changed

    def suppressions(self, keys: Sequence[str]) -> dict[str, list[tuple[int, list[str], str]]]:
        """Live false-positive verdicts per pattern: (feedback id, tables, until)."""
        if not keys:
            return {}
        c = t.feedback.c
        rows = self._conn.execute(
            sa.select(c.id, c.pattern, c.tables, c.suppress_until)
            .where(c.pattern.in_(list(keys)))
            .where(c.suppress_until > self.now)
        ).all()
        out: dict[str, list[tuple[int, list[str], str]]] = {}
        for fid, pat, tables, until in rows:
            out.setdefault(pat, []).append((fid, list(tables or []), _ts(until).isoformat()))
        return out

    def add_feedback(
        self,
        incident_id: str,
        verdict: str,
        pattern: str,
        tables: list[str],
        comment: str | None,
        by: str | None,
        suppress_until: datetime | None,
    ) -> None:
        self._conn.execute(
            t.feedback.insert().values(
                incident_id=incident_id,
                verdict=verdict,
                pattern=pattern,
                tables=tables,
                comment=comment,
                by=by,
                created_at=self.now,
                suppress_until=suppress_until,
            )
        )

    # ----------------------------------------------------------------- outbox
    def add_alert(self, kind: str, doc: dict[str, Any], detail: str = "") -> str:
        """Queue ``kind`` for ``doc`` to every sink whose route takes it; returns the alert id."""
        return self.add_alerts([(kind, doc, detail)])[0]

    def add_alerts(self, alerts: Sequence[tuple[str, dict[str, Any], str]]) -> list[str]:
        """Queue several (kind, incident document, detail) alerts in one statement."""
        ids, rows = [], []
        for kind, doc, detail in alerts:
            aid = alert_id(doc["id"], kind, detail)
            ids.append(aid)
            payload = {"type": kind, "timestamp": self.now.isoformat(), "data": _shown(doc)}
            rank = SEVERITY_RANK[doc["severity"]]
            rows += [
                {
                    "id": aid,
                    "sink": route.sink,
                    "kind": kind,
                    "incident_id": doc["id"],
                    "payload": payload,
                    "created_at": self.now,
                    "attempts": 0,
                    "next_attempt_at": self.now,
                }
                for route in self._store.routes
                if kind in route.kinds and rank >= route.min_rank
            ]
        if rows:
            self._conn.execute(_insert_ignore(self._store.engine, t.outbox), rows)
        return ids

    # ----------------------------------------------------------------- positions, read log
    def set_positions(self, positions: dict[tuple[str, str], dict[str, Any]]) -> None:
        if not positions:
            return
        rows = [
            {"source": s, "key": k, "position": p, "updated_at": self.now}
            for (s, k), p in positions.items()
        ]
        stmt = _upsert(
            self._store.engine, t.positions, ["source", "key"], ["position", "updated_at"]
        )
        self._conn.execute(stmt, rows)

    def add_batch(self, seq: int, reads: list[dict[str, Any]], events: int) -> None:
        self._conn.execute(
            t.batches.insert().values(seq=seq, reads=reads, events=events, committed_at=self.now)
        )


class Store:
    """The state store over ``engine`` (see :func:`detector.sinks.tables.create_engine`)."""

    def __init__(self, engine: sa.Engine, routes: Sequence[Route] = (), clock: Clock = utc_now):
        self.engine = engine
        self.routes = tuple(routes)
        self.clock = clock
        self._write_lock = threading.RLock()

    @contextmanager
    def transaction(self) -> Iterator[Tx]:
        """One write transaction. Writers in this process take turns: SQLite cannot upgrade a
        read to a write under a concurrent writer, and PostgreSQL row locks would serialise
        them anyway."""
        with self._write_lock, self.engine.begin() as conn:
            yield Tx(self, conn, self.clock())

    def ping(self) -> None:
        with self.engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))

    # ----------------------------------------------------------------- reads
    def positions(self) -> dict[tuple[str, str], dict[str, Any]]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(t.positions.c.source, t.positions.c.key, t.positions.c.position)
            ).all()
        return {(s, k): p for s, k, p in rows}

    def last_batch(self) -> int:
        """The highest batch number used: in the read log or, when a snapshot has pruned the
        log, the snapshot's (numbers must keep growing across restarts)."""
        with self.engine.connect() as conn:
            logged = conn.execute(sa.select(sa.func.max(t.batches.c.seq))).scalar()
            snap = conn.execute(sa.select(sa.func.max(t.snapshots.c.seq))).scalar()
        return max(int(logged or 0), int(snap or 0))

    def reads_after(self, seq: int) -> Iterator[tuple[int, list[dict[str, Any]]]]:
        """The read log after batch ``seq``, in order."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(t.batches.c.seq, t.batches.c.reads)
                .where(t.batches.c.seq > seq)
                .order_by(t.batches.c.seq)
            )
            for s, reads in rows:
                yield int(s), list(reads)

    def latest_snapshot(self) -> Snapshot | None:
        with self.engine.connect() as conn:
            row = conn.execute(
                sa.select(t.snapshots).order_by(t.snapshots.c.seq.desc()).limit(1)
            ).first()
        if row is None:
            return None
        return Snapshot(row.seq, row.path, row.model, dict(row.positions), int(row.events_seen))

    def add_snapshot(self, snap: Snapshot) -> list[str]:
        """Record ``snap`` and forget the read log and older snapshots it makes obsolete;
        returns the paths of the snapshots no longer needed."""
        with self._write_lock, self.engine.begin() as conn:
            conn.execute(
                _insert_ignore(self.engine, t.snapshots).values(
                    seq=snap.seq,
                    path=snap.path,
                    model=snap.model,
                    positions=snap.positions,
                    events_seen=snap.events_seen,
                    created_at=self.clock(),
                )
            )
            old = (
                conn.execute(sa.select(t.snapshots.c.path).where(t.snapshots.c.seq < snap.seq))
                .scalars()
                .all()
            )
            conn.execute(t.snapshots.delete().where(t.snapshots.c.seq < snap.seq))
            conn.execute(t.batches.delete().where(t.batches.c.seq <= snap.seq))
        return [p for p in old if p != snap.path]

    def prune(
        self,
        *,
        delivered_before: datetime | None,
        closed_before: datetime | None,
        chunk: int = 1_000,
    ) -> tuple[int, int]:
        """Delete what retention lets go: outbox rows delivered before ``delivered_before``
        and incidents closed (resolved or false positive) whose last change is before
        ``closed_before`` and none of whose alerts waits for delivery; None keeps that kind.
        An undelivered alert and an open or acknowledged incident are never deleted. Works in
        transactions of ``chunk`` rows, so pruning a long history does not hold the batches
        up. Returns (outbox rows, incidents) deleted."""
        alerts = incidents = 0
        while delivered_before is not None:
            with self._write_lock, self.engine.begin() as conn:
                n = prune_delivered(conn, delivered_before, chunk)
            alerts += n
            if n < chunk:
                break
        while closed_before is not None:
            with self._write_lock, self.engine.begin() as conn:
                n = _prune_closed(conn, closed_before, chunk)
            incidents += n
            if n < chunk:
                break
        return alerts, incidents

    def forget_positions(self, source: str, keys: Sequence[str]) -> None:
        """Drop the positions of files that are gone for good (journal files a snapshot
        covers), so the table does not grow with every request ever journaled."""
        if not keys:
            return
        with self._write_lock, self.engine.begin() as conn:
            for i in range(0, len(keys), 500):
                conn.execute(
                    t.positions.delete()
                    .where(t.positions.c.source == source)
                    .where(t.positions.c.key.in_(list(keys[i : i + 500])))
                )

    def incident(self, incident_id: str) -> dict[str, Any] | None:
        c = t.incidents.c
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(t.incidents).where(c.id == incident_id)).first()
        return _incident_view(row) if row is not None else None

    def incidents(
        self,
        *,
        status: str | None = None,
        severity: str | None = None,
        principal: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        limit: int = 50,
        after: tuple[datetime, str] | None = None,
    ) -> list[dict[str, Any]]:
        """Incidents newest first (by last_seen, then id); ``after`` is the keyset cursor."""
        c = t.incidents.c
        q = sa.select(t.incidents)
        if status is not None:
            q = q.where(c.status == status)
        if severity is not None:
            q = q.where(c.severity == severity)
        if principal is not None:
            q = q.where(c.principal == principal)
        if since is not None:
            q = q.where(c.last_seen >= since)
        if until is not None:
            q = q.where(c.first_seen < until)
        if after is not None:
            q = q.where(
                sa.or_(c.last_seen < after[0], sa.and_(c.last_seen == after[0], c.id < after[1]))
            )
        q = q.order_by(c.last_seen.desc(), c.id.desc()).limit(limit)
        with self.engine.connect() as conn:
            return [_incident_view(r) for r in conn.execute(q)]

    def counts(self) -> dict[str, int]:
        """Incidents per status."""
        c = t.incidents.c
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(c.status, sa.func.count()).group_by(c.status)).all()
        return {s: int(n) for s, n in rows}

    def outbox_rows(self, sink: str | None = None) -> list[dict[str, Any]]:
        q = sa.select(t.outbox).order_by(t.outbox.c.created_at, t.outbox.c.id)
        if sink is not None:
            q = q.where(t.outbox.c.sink == sink)
        with self.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(q)]


def _chunks(values: Sequence[str], size: int = 500) -> Iterator[list[str]]:
    """``values`` in lists of at most ``size`` (bounded IN lists, whatever a batch holds)."""
    for i in range(0, len(values), size):
        yield list(values[i : i + size])


def _shown(doc: dict[str, Any]) -> dict[str, Any]:
    """An incident document without its working state (keys starting with "_": kept for the
    live grouping to continue from, not shown by the API or sent in alerts)."""
    return {k: v for k, v in doc.items() if not k.startswith("_")}


#: Incident statuses that retention may prune (open and acknowledged ones are kept).
CLOSED_STATUSES: Final = ("resolved", "false_positive")


def _prune_closed(conn: sa.Connection, before: datetime, limit: int) -> int:
    """Delete up to ``limit`` closed incidents last changed before ``before`` with no alert
    waiting for delivery, the longest unchanged first; returns how many went."""
    c = t.incidents.c
    waiting = (
        sa.select(t.outbox.c.id)
        .where(t.outbox.c.incident_id == c.id, t.outbox.c.delivered_at.is_(None))
        .exists()
    )
    done = c.status.in_(CLOSED_STATUSES) & (c.updated_at < before) & ~waiting
    ids = list(
        conn.execute(sa.select(c.id).where(done).order_by(c.updated_at, c.id).limit(limit))
        .scalars()
        .all()
    )
    if ids:
        conn.execute(t.incidents.delete().where(c.id.in_(ids), done))
    return len(ids)


def _incident_view(row: Any) -> dict[str, Any]:
    doc = _shown(row.doc)
    doc["status"] = row.status
    doc["status_changed_at"] = (
        _ts(row.status_changed_at).isoformat() if row.status_changed_at is not None else None
    )
    doc["status_comment"] = row.status_comment
    doc["status_by"] = row.status_by
    doc["updated_at"] = _ts(row.updated_at).isoformat()
    return doc

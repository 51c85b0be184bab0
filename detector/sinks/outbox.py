"""Alert delivery from the durable outbox: one worker per sink, at-least-once, never dropped.

The store commits each alert to the ``outbox`` table (one row per alert and sink) in the same
transaction as the incident update that raised it. An :class:`OutboxWorker` then delivers the
rows of one sink through a :class:`Sender`:

1. pick the rows that are due (``next_attempt_at <= now``, oldest due first, then oldest created);
2. claim one by moving its ``next_attempt_at`` a lease of ``lease`` seconds ahead, only if it is
   still due, so two workers on one PostgreSQL store never send the same row at the same time;
3. send it with no transaction open;
4. record the result: ``delivered_at`` on success; otherwise ``attempts + 1`` and a new
   ``next_attempt_at`` from the :class:`Backoff` (full jitter, capped, at least the receiver's
   ``Retry-After`` up to a bound). ``last_status`` and ``last_error`` say what happened.

Guarantees: an alert is retried until a receiver accepts it; a failing alert moves back in the
queue so it never blocks the others; a crash between the send and step 4 sends the same
webhook-id again once the lease has run out (receivers dedupe on it). A network error or an
explicit "come back later" (429, 503, Retry-After) pauses the whole sink for that delay instead
of trying every queued alert against a receiver that is down.
"""

from __future__ import annotations

import contextlib
import random
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final, Protocol

import sqlalchemy as sa
import structlog

from detector.sinks.metrics import Metrics
from detector.sinks.tables import outbox

log = structlog.get_logger("exfilwatch.delivery")

Clock = Callable[[], datetime]

#: The ``outcome`` label values of ``exfilwatch_alert_deliveries_total``.
SUCCESS: Final = "success"  # the receiver answered 2xx
RETRY: Final = "retry"  # the receiver asked to come back later (429, 503 or a Retry-After)
HTTP_ERROR: Final = "http_error"  # any other non-2xx answer
NETWORK_ERROR: Final = "network_error"  # no answer: refused, reset, timed out
OUTCOMES: Final = (SUCCESS, RETRY, HTTP_ERROR, NETWORK_ERROR)

MAX_ERROR_CHARS: Final = 500


def utc_now() -> datetime:
    """The default clock."""
    return datetime.now(UTC)


def as_utc(value: datetime) -> datetime:
    """``value`` as an aware UTC datetime (SQLite hands timestamps back without a zone; the store
    writes them in UTC)."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


@dataclass(frozen=True, slots=True)
class Alert:
    """One outbox row: ``id`` is the alert id, sent as the webhook-id on every attempt."""

    id: str
    sink: str
    kind: str
    incident_id: str
    payload: Mapping[str, Any]
    attempts: int
    created_at: datetime


@dataclass(frozen=True, slots=True)
class Result:
    """What one delivery attempt came to. ``retry_after`` (seconds) is the receiver's own wish."""

    delivered: bool
    outcome: str
    status: int | None = None
    error: str | None = None
    retry_after: float | None = None

    @property
    def pauses_sink(self) -> bool:
        """True when the receiver as a whole is unavailable, not just this alert."""
        return self.outcome in (RETRY, NETWORK_ERROR)

    @classmethod
    def from_exception(cls, exc: Exception) -> Result:
        """A send that got no answer."""
        return cls(False, NETWORK_ERROR, None, short_error(f"{type(exc).__name__}: {exc}"))


def cut(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters, the last one an ellipsis when anything went."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def short_error(text: str) -> str:
    """``text`` on one line, cut to :data:`MAX_ERROR_CHARS` (for ``last_error`` and logs)."""
    return cut(" ".join(text.split()), MAX_ERROR_CHARS)


@dataclass(frozen=True, slots=True)
class Backoff:
    """Exponential backoff with full jitter: attempt ``n`` (0-based) waits a uniform random time
    in ``(0, min(cap, base * 2**n)]``, and never less than the receiver's Retry-After (itself
    bounded by ``max_retry_after``)."""

    base: float = 1.0
    cap: float = 600.0
    max_retry_after: float = 3600.0

    def ceiling(self, attempt: int) -> float:
        """The longest wait after failed attempt ``attempt`` (0-based)."""
        return min(self.cap, self.base * 2.0 ** min(max(attempt, 0), 62))

    def delay(self, attempt: int, rng: random.Random, retry_after: float | None = None) -> float:
        """Seconds to wait before the next attempt."""
        ceiling = self.ceiling(attempt)
        jittered = max(ceiling * (1.0 - rng.random()), min(ceiling, 0.001))
        if retry_after is not None:
            jittered = max(jittered, min(retry_after, self.max_retry_after))
        return jittered


class Sender(Protocol):
    """Delivers one alert to one receiver. ``send`` never raises for a delivery failure: it
    returns a :class:`Result` that says whether the receiver accepted the alert."""

    @property
    def name(self) -> str:
        """The sink's configured name (the ``sink`` column of its outbox rows)."""
        ...

    def send(self, alert: Alert) -> Result:
        """Try once to deliver ``alert``."""
        ...


class OutboxWorker:
    """Delivers one sink's outbox rows in a background thread (see the module docstring).

    ``poll_interval`` bounds how long the worker sleeps without a :meth:`wake`, so rows written
    by another process are found too; ``lease`` must exceed the sender's longest request."""

    def __init__(
        self,
        engine: sa.Engine,
        sender: Sender,
        metrics: Metrics,
        *,
        clock: Clock = utc_now,
        rng: random.Random | None = None,
        backoff: Backoff | None = None,
        poll_interval: float = 5.0,
        lease: float = 30.0,
        batch_size: int = 100,
    ) -> None:
        self.engine = engine
        self.sender = sender
        self.metrics = metrics
        self.clock = clock
        self.rng = rng if rng is not None else random.Random()
        self.backoff = backoff if backoff is not None else Backoff()
        self.poll_interval = poll_interval
        self.lease = timedelta(seconds=lease)
        self.batch_size = batch_size
        self.sink = sender.name
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._commit = threading.Lock()
        self._abandoned = False
        self._inflight: tuple[str, datetime] | None = None
        self._hold_until: datetime | None = None
        self._next_due: datetime | None = None  # from the last pass's gauge query
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Start delivering in a daemon thread."""
        if self._thread is not None:
            raise RuntimeError(f"outbox worker {self.sink!r} already started")
        self._thread = threading.Thread(target=self._loop, name=f"outbox-{self.sink}", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        """Look for due rows now (call after a commit that added outbox rows)."""
        self._wake.set()

    def stop(self, timeout: float = 10.0) -> bool:
        """Stop the worker. A send still running after ``timeout`` seconds is abandoned: its
        result is never written, and its row is due again at once. True when the thread ended
        within the timeout."""
        self._stop.set()
        self._wake.set()
        thread = self._thread
        if thread is None:
            return True
        thread.join(timeout)
        if not thread.is_alive():
            return True
        with self._commit:
            self._abandoned = True
            inflight = self._inflight
        if inflight is not None:
            alert_id, lease_until = inflight
            with contextlib.suppress(sa.exc.SQLAlchemyError), self.engine.begin() as conn:
                conn.execute(
                    outbox.update()
                    .where(*self._row(alert_id), outbox.c.next_attempt_at == lease_until)
                    .where(outbox.c.delivered_at.is_(None))
                    .values(next_attempt_at=self.clock())
                )
            log.warning("delivery_abandoned", sink=self.sink, alert_id=alert_id)
        return False

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.clear()
            try:
                self._pass(honour_hold=True)
                wait = self._seconds_to_next(self._next_due)
            except Exception as exc:  # the store is unreachable: keep trying, never die
                log.error("outbox_pass_failed", sink=self.sink, error=short_error(str(exc)))
                wait = self.poll_interval
            self._wake.wait(wait)

    # -- one pass --------------------------------------------------------------------------

    def run_once(self) -> int:
        """Try every row due now once; return how many were delivered."""
        return self._pass(honour_hold=False)

    def _pass(self, *, honour_hold: bool) -> int:
        start = self.clock()
        delivered = 0
        if self._abandoned:
            self._next_due = self._pending()[2]
            return 0
        if not (honour_hold and self._hold_until is not None and start < self._hold_until):
            self._hold_until = None
            delivered = self._deliver_due(start)
        self._next_due = self._refresh_gauges()
        return delivered

    def _deliver_due(self, start: datetime) -> int:
        delivered = 0
        seen: set[str] = set()
        while not self._stop.is_set():
            rows = self._due(start, seen)
            for row in rows:
                if self._stop.is_set():
                    return delivered
                seen.add(row.id)
                result = self._attempt(row)
                if result is None:
                    continue
                delivered += result.delivered
                if result.pauses_sink:
                    return delivered
            if len(rows) < self.batch_size:
                return delivered
        return delivered

    def _due(self, start: datetime, seen: set[str]) -> list[sa.Row[Any]]:
        query = (
            sa.select(outbox)
            .where(outbox.c.sink == self.sink, outbox.c.delivered_at.is_(None))
            .where(outbox.c.next_attempt_at <= start)
            .order_by(outbox.c.next_attempt_at, outbox.c.created_at, outbox.c.id)
            .limit(self.batch_size + len(seen))
        )
        with self.engine.connect() as conn:
            rows = [r for r in conn.execute(query) if r.id not in seen]
        return rows[: self.batch_size]

    def _attempt(self, row: sa.Row[Any]) -> Result | None:
        now = self.clock()
        lease_until = now + self.lease
        with self.engine.begin() as conn:
            claimed = conn.execute(
                outbox.update()
                .where(*self._row(row.id), outbox.c.delivered_at.is_(None))
                .where(outbox.c.next_attempt_at <= now)  # still due: nobody else claimed it
                .values(next_attempt_at=lease_until)
            ).rowcount
        if claimed != 1:
            return None  # another worker has it, or it was delivered meanwhile
        alert = Alert(
            id=row.id,
            sink=row.sink,
            kind=row.kind,
            incident_id=row.incident_id,
            payload=row.payload,
            attempts=row.attempts,
            created_at=as_utc(row.created_at),
        )
        with self._commit:
            self._inflight = (row.id, lease_until)
        try:
            result = self.sender.send(alert)
        except Exception as exc:  # a sender bug must not kill delivery of the others
            result = Result.from_exception(exc)
        with self._commit:
            self._inflight = None
            if self._abandoned:
                return None
            self._record(alert, lease_until, result)
        return result

    def _record(self, alert: Alert, lease_until: datetime, result: Result) -> None:
        now = self.clock()
        self.metrics.deliveries.labels(sink=self.sink, outcome=result.outcome).inc()
        with self.engine.begin() as conn:
            if result.delivered:
                conn.execute(
                    outbox.update()
                    .where(*self._row(alert.id), outbox.c.delivered_at.is_(None))
                    .values(
                        delivered_at=now,
                        attempts=outbox.c.attempts + 1,
                        last_status=result.status,
                        last_error=None,
                    )
                )
                log.info(
                    "alert_delivered",
                    sink=self.sink,
                    alert_id=alert.id,
                    kind=alert.kind,
                    attempts=alert.attempts + 1,
                    status=result.status,
                )
                return
            delay = self.backoff.delay(alert.attempts, self.rng, result.retry_after)
            due = now + timedelta(seconds=delay)
            conn.execute(
                outbox.update()
                .where(*self._row(alert.id), outbox.c.delivered_at.is_(None))
                .where(outbox.c.next_attempt_at == lease_until)
                .values(
                    next_attempt_at=due,
                    attempts=outbox.c.attempts + 1,
                    last_status=result.status,
                    last_error=result.error,
                )
            )
        if result.pauses_sink:
            self._hold_until = due
        log.warning(
            "alert_delivery_failed",
            sink=self.sink,
            alert_id=alert.id,
            outcome=result.outcome,
            status=result.status,
            error=result.error,
            attempts=alert.attempts + 1,
            retry_in_seconds=round(delay, 3),
        )

    def _row(self, alert_id: str) -> tuple[sa.ColumnElement[bool], sa.ColumnElement[bool]]:
        return outbox.c.id == alert_id, outbox.c.sink == self.sink

    # -- gauges and sleeping ---------------------------------------------------------------

    def _pending(self) -> tuple[int, datetime | None, datetime | None]:
        query = sa.select(
            sa.func.count(), sa.func.min(outbox.c.created_at), sa.func.min(outbox.c.next_attempt_at)
        ).where(outbox.c.sink == self.sink, outbox.c.delivered_at.is_(None))
        with self.engine.connect() as conn:
            count, oldest, next_due = conn.execute(query).one()
        return (
            int(count),
            None if oldest is None else as_utc(oldest),
            None if next_due is None else as_utc(next_due),
        )

    def _refresh_gauges(self) -> datetime | None:
        """Set the depth and age gauges from one query; returns when the next row is due."""
        count, oldest, next_due = self._pending()
        age = 0.0 if oldest is None else max((self.clock() - oldest).total_seconds(), 0.0)
        self.metrics.outbox_depth.labels(sink=self.sink).set(count)
        self.metrics.outbox_oldest.labels(sink=self.sink).set(age)
        return next_due

    def _seconds_to_next(self, next_due: datetime | None) -> float:
        now = self.clock()
        if next_due is None:
            return self.poll_interval
        target = max(next_due, self._hold_until) if self._hold_until is not None else next_due
        return min(max((target - now).total_seconds(), 0.01), self.poll_interval)


def prune_delivered(conn: sa.Connection, before: datetime, limit: int) -> int:
    """Delete up to ``limit`` outbox rows delivered before ``before``, the longest delivered
    first; returns how many went. A row not delivered yet is never deleted, however old."""
    done = outbox.c.delivered_at.is_not(None) & (outbox.c.delivered_at < before)
    rows = conn.execute(
        sa.select(outbox.c.id, outbox.c.sink)
        .where(done)
        .order_by(outbox.c.delivered_at, outbox.c.id)
        .limit(limit)
    ).all()
    if not rows:
        return 0
    conn.execute(
        outbox.delete().where(
            outbox.c.id == sa.bindparam("_id"), outbox.c.sink == sa.bindparam("_sink"), done
        ),
        [{"_id": row.id, "_sink": row.sink} for row in rows],
    )
    return len(rows)

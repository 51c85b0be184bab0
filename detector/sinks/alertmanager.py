"""Alertmanager delivery as state sync (API v2), not one-shot notifications.

Every ``interval`` seconds, and soon after :meth:`AlertmanagerSync.wake`, the whole current state
is POSTed to ``/api/v2/alerts``:

* each incident in status ``open`` or ``acknowledged`` as a firing alert: ``startsAt`` is its
  first_seen, ``endsAt`` is ``expire_after`` seconds ahead (several intervals), so Alertmanager
  resolves it by itself if exfilwatch stops re-sending;
* each incident that left those states (resolved, false_positive) within ``resolve_window`` as
  resolved, ``endsAt`` = when its status changed.

The ``incidents`` table is the durable state: nothing is queued, a failed POST is simply made
again at the next interval (or after the receiver's Retry-After). Alertmanager tells alerts
apart by label set, and ``severity`` is a label, so when an incident's severity changes the
alert with the previous severity is sent as resolved (known while this process runs; after a
restart it expires by its ``endsAt``).

Each POST counts once in ``exfilwatch_alert_deliveries_total{sink, outcome}``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any, Final

import httpx
import orjson
import sqlalchemy as sa
import structlog

from detector.sinks.metrics import Metrics
from detector.sinks.outbox import Clock, as_utc, cut, utc_now
from detector.sinks.slack import incident_link
from detector.sinks.tables import incidents
from detector.sinks.webhook import DEFAULT_TIMEOUT, HttpEndpoint, post

log = structlog.get_logger("exfilwatch.delivery")

FIRING_STATES: Final = ("open", "acknowledged")
CLOSED_STATES: Final = ("resolved", "false_positive")
API_PATH: Final = "/api/v2/alerts"


def rfc3339(value: datetime) -> str:
    """``2024-05-01T12:00:00.123456Z``."""
    return as_utc(value).isoformat().replace("+00:00", "Z")


def _joined(values: Sequence[Any] | None, limit: int = 1000) -> str:
    return cut(", ".join(str(v) for v in (values or [])), limit)


class AlertmanagerSync(HttpEndpoint):
    """Keeps an Alertmanager's view of exfilwatch incidents current (see the module docstring).

    ``url`` is the Alertmanager base URL (``http://alertmanager:9093``) or the full
    ``.../api/v2/alerts`` URL. ``external_url`` is the service's own address, for
    ``generatorURL``."""

    def __init__(
        self,
        engine: sa.Engine,
        url: str,
        metrics: Metrics,
        *,
        name: str = "alertmanager",
        interval: float = 30.0,
        expire_after: float | None = None,
        resolve_window: float = 3600.0,
        min_gap: float = 1.0,
        clock: Clock = utc_now,
        client: httpx.Client | None = None,
        timeout: float | httpx.Timeout = DEFAULT_TIMEOUT,
        external_url: str | None = None,
        headers: Mapping[str, str] | None = None,
        batch_size: int = 500,
    ) -> None:
        base = url.rstrip("/")
        super().__init__(
            base if base.endswith(API_PATH) else base + API_PATH,
            client=client,
            timeout=timeout,
            headers=headers,
        )
        self.engine = engine
        self.metrics = metrics
        self.name = name
        self.interval = interval
        self.expire_after = expire_after if expire_after is not None else max(4 * interval, 60.0)
        self.resolve_window = resolve_window
        self.min_gap = min_gap
        self.clock = clock
        self.external_url = external_url
        self.batch_size = batch_size
        self._sent_severity: dict[str, str] = {}
        self._next_severities: dict[str, str] = {}
        self._wait_extra = 0.0
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Start syncing in a daemon thread."""
        if self._thread is not None:
            raise RuntimeError(f"alertmanager sync {self.name!r} already started")
        self._thread = threading.Thread(target=self._loop, name=f"sync-{self.name}", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        """Sync soon (at most once per ``min_gap`` seconds): incidents have changed."""
        self._wake.set()

    def stop(self, timeout: float = 10.0) -> bool:
        """Stop syncing; a POST still running after ``timeout`` is abandoned (the next start
        sends the state again). True when the thread ended in time."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            return not self._thread.is_alive()
        return True

    def _loop(self) -> None:
        while not self._stop.is_set():
            began = time.monotonic()
            self._wake.clear()
            try:
                self.run_once()
            except Exception as exc:  # the store is unreachable: try again next interval
                log.error("alertmanager_sync_failed", sink=self.name, error=str(exc)[:500])
            woken = self._wake.wait(max(self.interval, self._wait_extra))
            if woken and not self._stop.is_set():
                self._stop.wait(max(0.0, began + self.min_gap - time.monotonic()))

    # -- one sync --------------------------------------------------------------------------

    def alerts(self, now: datetime) -> list[dict[str, Any]]:
        """The Alertmanager alerts describing the current state, as of ``now``."""
        since = now - timedelta(seconds=self.resolve_window)
        changed = sa.func.coalesce(incidents.c.status_changed_at, incidents.c.updated_at)
        query = sa.select(
            incidents.c.id, incidents.c.status, incidents.c.severity, incidents.c.principal,
            incidents.c.first_seen, changed.label("changed"), incidents.c.doc,
        ).where(sa.or_(
            incidents.c.status.in_(FIRING_STATES),
            sa.and_(incidents.c.status.in_(CLOSED_STATES), changed >= since),
        )).order_by(incidents.c.first_seen, incidents.c.id)
        with self.engine.connect() as conn:
            rows: list[sa.Row[Any]] = list(conn.execute(query))
        ends_firing = now + timedelta(seconds=self.expire_after)
        out: list[dict[str, Any]] = []
        severities: dict[str, str] = {}
        for row in rows:
            starts = as_utc(row.first_seen)
            firing = row.status in FIRING_STATES
            ends = ends_firing if firing else max(as_utc(row.changed), starts)
            out.append(self._alert(row, row.severity, starts, ends))
            previous = self._sent_severity.get(row.id)
            if previous is not None and previous != row.severity:
                out.append(self._alert(row, previous, starts, max(now, starts)))
            if firing:
                severities[row.id] = row.severity
        self._next_severities = severities
        return out

    def _alert(self, row: sa.Row[Any], severity: str, starts: datetime,
               ends: datetime) -> dict[str, Any]:
        doc: Mapping[str, Any] = row.doc or {}
        rows_read = int(doc.get("rows_read") or 0)
        tables = doc.get("tables") or []
        description = (
            f"{row.principal} read {rows_read:,} rows from {len(tables)} table(s) "
            f"({_joined(tables, 300)}) across {doc.get('tenants_touched', 0)} tenant(s), "
            f"from {_joined(doc.get('addresses'), 200) or 'unknown addresses'} via "
            f"{_joined(doc.get('client_apps'), 200) or 'unknown clients'}; "
            f"status {row.status}."
        )
        alert: dict[str, Any] = {
            "labels": {
                "alertname": "ExfilwatchIncident",
                "severity": severity,
                "principal": row.principal,
                "incident_id": row.id,
                "service": "exfilwatch",
            },
            "annotations": {
                "summary": str(doc.get("reason") or "anomalous database access"),
                "description": description,
                "rows_read": str(rows_read),
                "tables": _joined(tables),
            },
            "startsAt": rfc3339(starts),
            "endsAt": rfc3339(ends),
        }
        link = incident_link(self.external_url, row.id)
        if link:
            alert["generatorURL"] = link
        return alert

    def run_once(self) -> int:
        """POST the current state once; return how many alerts were accepted."""
        now = self.clock()
        alerts = self.alerts(now)
        accepted = 0
        self._wait_extra = 0.0
        for i in range(0, len(alerts), self.batch_size):
            chunk = alerts[i : i + self.batch_size]
            result = post(self.client, self.url, orjson.dumps(chunk),
                          self.headers, clock=self.clock)
            self.metrics.deliveries.labels(sink=self.name, outcome=result.outcome).inc()
            if not result.delivered:
                self._wait_extra = result.retry_after or 0.0
                log.warning("alertmanager_post_failed", sink=self.name, status=result.status,
                            error=result.error, alerts=len(chunk))
                return accepted
            accepted += len(chunk)
        self._sent_severity = self._next_severities
        return accepted

"""Slack and Alertmanager delivery against a real HTTP receiver on loopback, on SQLite and on
PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa

from detector.sinks.alertmanager import AlertmanagerSync
from detector.sinks.metrics import Metrics
from detector.sinks.outbox import Backoff, OutboxWorker
from detector.sinks.receiver import WebhookReceiver
from detector.sinks.slack import SlackSender, slack_message
from detector.sinks.tables import incidents
from tests.test_delivery_support import (  # noqa: F401 - fixtures
    BACKENDS,
    FakeClock,
    add_alert,
    add_incident,
    incident_doc,
    outbox_rows,
    postgres_database,
    store,
    utc,
)


@pytest.fixture
def receiver() -> Iterator[WebhookReceiver]:
    with WebhookReceiver() as rx:
        yield rx


def deliveries(metrics: Metrics, sink: str, outcome: str) -> float:
    value = metrics.registry.get_sample_value(
        "exfilwatch_alert_deliveries_total", {"sink": sink, "outcome": outcome})
    return value or 0.0


# -- Slack ---------------------------------------------------------------------------------


def test_slack_message_shape() -> None:
    doc = incident_doc("inc_7", principal="app<api>", tables=[f"t{i}" for i in range(8)])
    msg = slack_message("alr_9", "incident.escalated", doc,
                        external_url="https://exfilwatch.example.com/")

    link = "https://exfilwatch.example.com/v1/incidents/inc_7"
    assert msg["text"].startswith("[HIGH] Incident escalated: app&lt;api&gt; read 2,140 rows")
    assert msg["text"].endswith(f"<{link}|inc_7>")
    kinds = [b["type"] for b in msg["blocks"]]
    assert kinds == ["header", "section", "section", "section", "actions", "context"]
    header = msg["blocks"][0]["text"]
    assert header["type"] == "plain_text" and "app<api>" in header["text"]
    fields = {f["text"].split("\n")[0]: f["text"].split("\n")[1]
              for f in msg["blocks"][2]["fields"]}
    assert fields["*Severity*"] == ":large_orange_circle: high"
    assert fields["*Principal*"] == "`app&lt;api&gt;`"
    assert fields["*Rows read*"] == "2,140"
    assert fields["*Tables*"] == "t0, t1, t2, t3, t4 and 3 more"
    assert len(fields) <= 10  # Slack's limit per section
    assert "rows_sensitive_10m: 2140 (typical 1)" in msg["blocks"][3]["text"]["text"]
    assert msg["blocks"][4]["elements"][0]["url"] == link
    assert "alr_9" in msg["blocks"][5]["elements"][0]["text"]
    assert "statement" not in str(msg) and "SELECT" not in str(msg)

    bare = slack_message("alr_9", "incident.opened", {"id": "inc_8"})
    assert [b["type"] for b in bare["blocks"]] == ["header", "section", "section", "context"]


def test_slack_delivery_and_its_rate_limit(engine: sa.Engine, receiver: WebhookReceiver) -> None:
    clock = FakeClock()
    add_alert(engine, "alr_1", sink="slack", created_at=clock.now)
    receiver.fail_next(1, 429, retry_after="30")
    metrics = Metrics()
    slack = SlackSender("slack", receiver.url + "/services/T0/B0/x", clock=clock,
                        external_url="https://exfilwatch.example.com")
    worker = OutboxWorker(engine, slack, metrics, clock=clock,
                          backoff=Backoff(base=0.01, cap=0.05))

    assert worker.run_once() == 0
    row = outbox_rows(engine)["alr_1"]
    assert utc(row.next_attempt_at) >= clock.now + timedelta(seconds=30)
    assert deliveries(metrics, "slack", "retry") == 1
    clock.advance(29)
    assert worker.run_once() == 0 and len(receiver.requests()) == 1  # not due yet
    clock.advance(1)
    assert worker.run_once() == 1

    [ok] = receiver.successes()
    body = ok.json()
    assert set(body) == {"text", "blocks"} and "Rows read" in str(body["blocks"])
    assert ok.path == "/services/T0/B0/x" and ok.headers["content-type"] == "application/json"
    slack.close()


# -- Alertmanager ----------------------------------------------------------------------------


def by_incident(posted: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(a["labels"]["incident_id"], a["labels"]["severity"]): a for a in posted}


def seed_incidents(engine: sa.Engine, now: datetime) -> None:
    start = now - timedelta(hours=2)
    add_incident(engine, incident_doc("inc_open"), first_seen=start)
    add_incident(engine, incident_doc("inc_ack", status="acknowledged", severity="medium"),
                 first_seen=start, status_changed_at=now - timedelta(minutes=5))
    add_incident(engine, incident_doc("inc_done", status="resolved"), first_seen=start,
                 status_changed_at=now - timedelta(minutes=10))
    add_incident(engine, incident_doc("inc_fp_old", status="false_positive"), first_seen=start,
                 status_changed_at=now - timedelta(hours=5))


def test_alertmanager_sync_posts_firing_and_resolved_alerts(
    engine: sa.Engine, receiver: WebhookReceiver
) -> None:
    clock = FakeClock()
    seed_incidents(engine, clock.now)
    metrics = Metrics()
    sync = AlertmanagerSync(engine, receiver.url, metrics, interval=30, clock=clock,
                            resolve_window=3600, external_url="https://exfilwatch.example.com")

    assert sync.run_once() == 3

    [req] = receiver.requests()
    assert req.method == "POST" and req.path == "/api/v2/alerts"
    posted = by_incident(req.json())
    assert set(posted) == {("inc_open", "high"), ("inc_ack", "medium"), ("inc_done", "high")}
    firing = posted[("inc_open", "high")]
    assert firing["labels"] == {"alertname": "ExfilwatchIncident", "severity": "high",
                                "principal": "app_api", "incident_id": "inc_open",
                                "service": "exfilwatch"}
    assert firing["annotations"]["summary"].startswith("read 2,140 rows of clients")
    assert firing["annotations"]["rows_read"] == "2140"
    assert firing["annotations"]["tables"] == "public.clients, public.accounts"
    assert "app_api read 2,140 rows from 2 table(s)" in firing["annotations"]["description"]
    assert firing["generatorURL"] == "https://exfilwatch.example.com/v1/incidents/inc_open"
    assert firing["startsAt"] == (clock.now - timedelta(hours=2)).isoformat().replace(
        "+00:00", "Z")
    ends = datetime.fromisoformat(firing["endsAt"])
    assert ends >= clock.now + timedelta(seconds=90)  # expires by itself if we stop sending
    resolved = posted[("inc_done", "high")]
    assert datetime.fromisoformat(resolved["endsAt"]) == clock.now - timedelta(minutes=10)
    assert deliveries(metrics, "alertmanager", "success") == 1


def test_alertmanager_retries_next_interval_and_resolves_a_changed_severity(
    engine: sa.Engine, receiver: WebhookReceiver
) -> None:
    clock = FakeClock()
    seed_incidents(engine, clock.now)
    metrics = Metrics()
    sync = AlertmanagerSync(engine, receiver.url + "/api/v2/alerts", metrics, clock=clock)
    receiver.fail_next(1, 503, retry_after="45")

    assert sync.run_once() == 0
    assert deliveries(metrics, "alertmanager", "retry") == 1
    assert sync.run_once() == 3

    with engine.begin() as conn:  # escalation: high -> critical
        doc = incident_doc("inc_open", severity="critical")
        conn.execute(incidents.update().where(incidents.c.id == "inc_open")
                     .values(severity="critical", doc=doc))
    clock.advance(30)
    assert sync.run_once() == 4
    posted = by_incident(receiver.requests()[-1].json())
    assert datetime.fromisoformat(posted[("inc_open", "high")]["endsAt"]) == clock.now
    assert datetime.fromisoformat(posted[("inc_open", "critical")]["endsAt"]) > clock.now


def test_alertmanager_thread_syncs_on_wake(engine: sa.Engine, receiver: WebhookReceiver) -> None:
    sync = AlertmanagerSync(engine, receiver.url, Metrics(), interval=60, min_gap=0.01)
    sync.start()
    try:
        add_incident(engine, incident_doc("inc_1"), first_seen=FakeClock().now)
        sync.wake()
        assert receiver.wait_for(lambda rx: len(rx.successes()) >= 1, timeout=10)
        assert receiver.successes()[-1].json()[0]["labels"]["incident_id"] == "inc_1"
    finally:
        assert sync.stop(5)
        sync.close()

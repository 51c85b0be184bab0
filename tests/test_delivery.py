"""The outbox worker and the signed webhook, against a real HTTP receiver on loopback, on
SQLite and on PostgreSQL."""

from __future__ import annotations

import random
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path

import pytest
import sqlalchemy as sa
from standardwebhooks import Webhook

from detector.sinks.metrics import Metrics
from detector.sinks.outbox import Backoff, OutboxWorker
from detector.sinks.receiver import Reply, WebhookReceiver
from detector.sinks.tables import create_engine, outbox
from detector.sinks.webhook import WebhookSender
from tests.test_delivery_support import (
    BACKENDS,
    OTHER_SECRET,
    SECRET,
    FakeClock,
    add_alert,
    eventually,
    outbox_rows,
    postgres_database,
    store,
    utc,
)

TINY = Backoff(base=0.01, cap=0.05, max_retry_after=3600.0)


@pytest.fixture(scope="module")
def pg_url() -> Iterator[str]:
    with postgres_database() as url:
        yield url


@pytest.fixture(params=BACKENDS)
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[sa.Engine, str]]:
    pg = request.getfixturevalue("pg_url") if request.param == "postgresql" else None
    with store(request.param, pg, tmp_path) as pair:
        yield pair


@pytest.fixture
def receiver() -> Iterator[WebhookReceiver]:
    with WebhookReceiver() as rx:
        yield rx


@pytest.fixture
def engine(db: tuple[sa.Engine, str]) -> sa.Engine:
    return db[0]


def sender(rx: WebhookReceiver, *secrets: str) -> WebhookSender:
    return WebhookSender("hook", rx.url + "/alerts", list(secrets) or [SECRET], timeout=5.0)


def count(metrics: Metrics, outcome: str, sink: str = "hook") -> float:
    value = metrics.registry.get_sample_value(
        "exfilwatch_alert_deliveries_total", {"sink": sink, "outcome": outcome})
    return value or 0.0


def gauge(metrics: Metrics, name: str, sink: str = "hook") -> float | None:
    return metrics.registry.get_sample_value(name, {"sink": sink})


def test_signed_delivery_verifies_with_the_reference_library(
    engine: sa.Engine, receiver: WebhookReceiver
) -> None:
    add_alert(engine, "alr_1")
    metrics = Metrics()
    worker = OutboxWorker(engine, sender(receiver, SECRET, OTHER_SECRET), metrics)

    assert worker.run_once() == 1

    [req] = receiver.requests()
    assert req.path == "/alerts" and req.headers["content-type"] == "application/json"
    assert req.webhook_id == "alr_1"
    assert len(req.headers["webhook-signature"].split(" ")) == 2  # one per secret
    for secret in (SECRET, OTHER_SECRET):  # a receiver holding either secret accepts it
        payload = Webhook(secret).verify(req.body, dict(req.headers))
        assert payload["type"] == "incident.opened" and payload["data"]["id"] == "inc_1"
    row = outbox_rows(engine)["alr_1"]
    assert row.delivered_at is not None and row.attempts == 1 and row.last_status == 200
    assert count(metrics, "success") == 1
    assert gauge(metrics, "exfilwatch_outbox_pending") == 0
    assert gauge(metrics, "exfilwatch_outbox_oldest_age_seconds") == 0


def test_retries_reuse_the_webhook_id_and_the_body(
    engine: sa.Engine, receiver: WebhookReceiver
) -> None:
    clock = FakeClock()
    add_alert(engine, "alr_1", created_at=clock.now)
    receiver.fail_next(2, 500)
    metrics = Metrics()
    worker = OutboxWorker(engine, sender(receiver), metrics, clock=clock, backoff=TINY)

    for _ in range(3):
        worker.run_once()
        clock.advance(1)

    attempts = receiver.deliveries_by_id()["alr_1"]
    assert [r.status for r in attempts] == [500, 500, 200]
    assert len({r.body for r in attempts}) == 1
    for r in attempts:
        Webhook(SECRET).verify(r.body, dict(r.headers))
    row = outbox_rows(engine)["alr_1"]
    assert row.attempts == 3 and row.last_status == 200 and row.last_error is None
    assert count(metrics, "http_error") == 2 and count(metrics, "success") == 1


def test_outage_then_recovery_delivers_every_alert_exactly_once(
    engine: sa.Engine, receiver: WebhookReceiver
) -> None:
    ids = [f"alr_{i:02d}" for i in range(20)]
    base = datetime.now(UTC)
    for i, alert_id in enumerate(ids):
        add_alert(engine, alert_id, created_at=base + timedelta(milliseconds=i))
    receiver.go_down()
    metrics = Metrics()
    worker = OutboxWorker(engine, sender(receiver), metrics, backoff=TINY, poll_interval=0.05)
    worker.start()
    try:
        eventually(lambda: count(metrics, "network_error") >= 3, what="failed attempts")
        assert not any(r.delivered_at for r in outbox_rows(engine).values())
        receiver.come_up()
        eventually(lambda: all(r.delivered_at for r in outbox_rows(engine).values()),
                   what="every alert delivered")
    finally:
        assert worker.stop(5)
    assert receiver.success_counts() == dict.fromkeys(ids, 1)
    assert all(r.last_status == 200 for r in outbox_rows(engine).values())


@pytest.mark.parametrize("form", ["seconds", "http-date"])
def test_retry_after_is_honoured_and_pauses_the_sink(
    engine: sa.Engine, receiver: WebhookReceiver, form: str
) -> None:
    clock = FakeClock()
    add_alert(engine, "alr_1", created_at=clock.now - timedelta(seconds=2))
    add_alert(engine, "alr_2", created_at=clock.now - timedelta(seconds=1))
    when = format_datetime(clock.now + timedelta(seconds=120), usegmt=True)
    receiver.fail_next(1, 429, retry_after="120" if form == "seconds" else when)
    metrics = Metrics()
    hook = WebhookSender("hook", receiver.url, [SECRET], clock=clock)
    worker = OutboxWorker(engine, hook, metrics, clock=clock, backoff=TINY)

    assert worker.run_once() == 0

    assert len(receiver.requests()) == 1  # the sink paused: alr_2 was not tried in that pass
    first = outbox_rows(engine)["alr_1"]
    assert utc(first.next_attempt_at) >= clock.now + timedelta(seconds=120)
    assert first.last_status == 429 and "429" in first.last_error
    assert count(metrics, "retry") == 1
    clock.advance(1)
    assert worker.run_once() == 1  # alr_2 goes first; alr_1 waits for its Retry-After
    assert receiver.success_counts() == {"alr_2": 1}
    clock.advance(120)
    assert worker.run_once() == 1
    assert receiver.success_counts() == {"alr_1": 1, "alr_2": 1}


def test_backoff_grows_is_capped_and_repeats_with_the_same_seed(
    engine: sa.Engine, receiver: WebhookReceiver
) -> None:
    add_alert(engine, "alr_1")
    receiver.default = Reply(500)
    backoff = Backoff(base=1.0, cap=16.0)

    def delays(seed: int) -> list[float]:
        clock = FakeClock()
        worker = OutboxWorker(engine, sender(receiver), Metrics(), clock=clock,
                              rng=random.Random(seed), backoff=backoff)
        out = []
        with engine.begin() as conn:
            conn.execute(outbox.update().values(attempts=0))
        for _ in range(9):
            with engine.begin() as conn:
                conn.execute(outbox.update().values(next_attempt_at=clock.now))
            worker.run_once()
            due = utc(outbox_rows(engine)["alr_1"].next_attempt_at)
            out.append((due - clock.now).total_seconds())
            clock.advance(100)
        return out

    first = delays(7)
    assert first == delays(7)
    ceilings = [1, 2, 4, 8, 16, 16, 16, 16, 16]
    assert all(0 < d <= c + 1e-6 for d, c in zip(first, ceilings, strict=True))
    assert [backoff.ceiling(n) for n in range(9)] == ceilings
    assert outbox_rows(engine)["alr_1"].attempts == 9


def test_a_failing_alert_does_not_block_the_others(
    engine: sa.Engine, receiver: WebhookReceiver
) -> None:
    clock = FakeClock()
    for i in range(3):
        add_alert(engine, f"alr_{i}", created_at=clock.now - timedelta(seconds=3 - i))
    receiver.set_responder(
        lambda _m, _p, headers, _b: Reply(400, body=b"no") if headers["webhook-id"] == "alr_0"
        else None)
    metrics = Metrics()
    worker = OutboxWorker(engine, sender(receiver), metrics, clock=clock, backoff=TINY)

    assert worker.run_once() == 2

    rows = outbox_rows(engine)
    assert rows["alr_0"].delivered_at is None and rows["alr_0"].last_status == 400
    assert rows["alr_1"].delivered_at and rows["alr_2"].delivered_at
    assert count(metrics, "http_error") == 1
    assert gauge(metrics, "exfilwatch_outbox_pending") == 1
    assert gauge(metrics, "exfilwatch_outbox_oldest_age_seconds") == 3


def test_wake_delivers_without_waiting_for_the_poll(
    engine: sa.Engine, receiver: WebhookReceiver
) -> None:
    worker = OutboxWorker(engine, sender(receiver), Metrics(), poll_interval=60)
    worker.start()
    try:
        eventually(lambda: gauge(worker.metrics, "exfilwatch_outbox_pending") == 0)
        add_alert(engine, "alr_1")
        worker.wake()
        assert receiver.wait_for(lambda rx: len(rx.successes()) == 1, timeout=10)
    finally:
        assert worker.stop(5)


def test_a_send_abandoned_at_stop_is_delivered_by_the_next_worker(
    db: tuple[sa.Engine, str], receiver: WebhookReceiver
) -> None:
    engine, url = db
    for i in range(3):
        add_alert(engine, f"alr_{i}", created_at=datetime.now(UTC) - timedelta(seconds=3 - i))
    receiver.delay_next(1, 30.0)
    old = OutboxWorker(engine, sender(receiver), Metrics(), backoff=TINY, lease=600)
    old.start()
    assert receiver.wait_for(lambda rx: rx.in_flight() == 1, timeout=10)

    assert old.stop(timeout=0.2) is False  # the send is still running: abandoned

    rows = outbox_rows(engine)
    assert rows["alr_0"].delivered_at is None and rows["alr_0"].attempts == 0
    assert utc(rows["alr_0"].next_attempt_at) <= datetime.now(UTC)  # lease given back
    receiver.go_down()  # the receiver dies holding that request: it never answers it
    receiver.come_up()
    assert old._thread is not None
    old._thread.join(10)

    second = create_engine(url)  # as a restarted service would open it
    try:
        assert OutboxWorker(second, sender(receiver), Metrics()).run_once() == 3
    finally:
        second.dispose()
    assert receiver.success_counts() == {"alr_0": 1, "alr_1": 1, "alr_2": 1}
    assert outbox_rows(engine)["alr_0"].attempts == 1  # the abandoned attempt wrote nothing


def test_two_workers_on_one_sink_never_send_the_same_alert_twice(
    engine: sa.Engine, receiver: WebhookReceiver
) -> None:
    ids = [f"alr_{i:02d}" for i in range(30)]
    for alert_id in ids:
        add_alert(engine, alert_id)
    receiver.default = Reply(200, delay=0.01)
    workers = [OutboxWorker(engine, sender(receiver), Metrics(), poll_interval=0.05)
               for _ in range(2)]
    for w in workers:
        w.start()
    try:
        eventually(lambda: all(r.delivered_at for r in outbox_rows(engine).values()),
                   what="every alert delivered")
    finally:
        for w in workers:
            assert w.stop(5)
    assert receiver.success_counts() == dict.fromkeys(ids, 1)
    assert len(receiver.requests()) == 30

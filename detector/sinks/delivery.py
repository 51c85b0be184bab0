"""Build and start the configured alert sinks: one outbox worker per webhook or Slack sink, one
state-sync loop per Alertmanager."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

from detector.config import AlertmanagerSink, Settings, SlackSink, WebhookSink
from detector.sinks.alertmanager import AlertmanagerSync
from detector.sinks.metrics import Metrics
from detector.sinks.outbox import OutboxWorker, Sender
from detector.sinks.slack import SlackSender
from detector.sinks.webhook import WebhookSender


def build(
    settings: Settings, engine: sa.Engine, metrics: Metrics, external_url: str | None = None
) -> list[Any]:
    """The delivery loops for ``settings.sinks`` (not started)."""
    loops: list[Any] = []
    for sink in settings.sinks:
        sender: Sender
        if isinstance(sink, AlertmanagerSink):
            loops.append(
                AlertmanagerSync(
                    engine,
                    sink.url,
                    metrics,
                    name=sink.name,
                    interval=sink.interval_s,
                    timeout=sink.timeout_s,
                    external_url=external_url,
                    resolve_window=settings.incidents.resolve_after_s,
                )
            )
            continue
        if isinstance(sink, WebhookSink):
            sender = WebhookSender(
                sink.name,
                sink.url,
                sink.secrets(),
                timeout=sink.timeout_s,
                headers=sink.headers,
            )
        elif isinstance(sink, SlackSink):
            sender = SlackSender(
                sink.name, sink.url, timeout=sink.timeout_s, external_url=external_url
            )
        # the lease outlives the longest send, so a send cut off by a crash is retried soon after
        loops.append(OutboxWorker(engine, sender, metrics, poll_interval=1.0,
                                  lease=2 * sink.timeout_s + 1.0))
    return loops


def start_workers(
    settings: Settings, engine: sa.Engine, metrics: Metrics, external_url: str | None = None
) -> list[Any]:
    loops = build(settings, engine, metrics, external_url)
    for loop in loops:
        loop.start()
    return loops

"""The service's Prometheus metrics, defined once.

Naming follows Prometheus conventions: the ``exfilwatch_`` prefix, base units (seconds, bytes),
``_total`` on counters. Labels take only small, bounded value sets (source name, format, reason,
severity, sink, outcome); never a principal, address, table or tenant.
"""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)
_LAG_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 86400.0)


class Metrics:
    """Every metric of one service instance, registered in ``registry`` (a fresh one per test)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.events_ingested = Counter(
            "exfilwatch_events_ingested",
            "Events accepted from a source.",
            ["source", "format"],
            registry=r,
        )
        self.events_rejected = Counter(
            "exfilwatch_events_rejected",
            "Records rejected (quarantined) by source and reason.",
            ["source", "reason"],
            registry=r,
        )
        self.events_scored = Counter(
            "exfilwatch_events_scored",
            "Events that went through features and the model.",
            registry=r,
        )
        self.events_time_held = Gauge(
            "exfilwatch_events_time_held",
            "Events stamped far past the time the stream had reached (a clock glitch), scored "
            "at that time instead, since the feature state was last started.",
            registry=r,
        )
        self.statements_cut = Counter(
            "exfilwatch_statements_cut",
            "Scored statements longer than the analysed length: their shape is that of their "
            "first part.",
            registry=r,
        )
        self.anomalies = Counter(
            "exfilwatch_anomalous_events",
            "Scored events at or above the model threshold.",
            registry=r,
        )
        self.batches = Counter("exfilwatch_batches", "Micro-batches processed.", registry=r)
        self.batch_duration = Histogram(
            "exfilwatch_batch_duration_seconds",
            "Time to score a micro-batch and commit its results.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_events = Histogram(
            "exfilwatch_batch_events",
            "Events per micro-batch.",
            buckets=(1, 10, 100, 1_000, 5_000, 10_000, 25_000, 50_000, 100_000),
            registry=r,
        )
        self.lag = Histogram(
            "exfilwatch_event_lag_seconds",
            "End-to-end lag: from an event's timestamp to its results being committed.",
            buckets=_LAG_BUCKETS,
            registry=r,
        )
        self.queue_capacity = Gauge(
            "exfilwatch_queue_capacity_events",
            "How many events each queue may hold.",
            ["queue"],
            registry=r,
        )
        self.queue_depth = Gauge(
            "exfilwatch_queue_depth_events",
            "Events accepted but not yet scored, by queue.",
            ["queue"],
            registry=r,
        )
        self.incidents_opened = Counter(
            "exfilwatch_incidents_opened",
            "Incidents opened, by severity.",
            ["severity"],
            registry=r,
        )
        self.incidents_open = Gauge(
            "exfilwatch_incidents_open", "Incidents currently open.", registry=r
        )
        self.alerts_suppressed = Counter(
            "exfilwatch_alerts_suppressed",
            "Alerts not raised because a false-positive verdict covers the pattern.",
            registry=r,
        )
        self.deliveries = Counter(
            "exfilwatch_alert_deliveries",
            "Alert delivery attempts by sink and outcome (success, retry, http_error, "
            "network_error).",
            ["sink", "outcome"],
            registry=r,
        )
        self.outbox_depth = Gauge(
            "exfilwatch_outbox_pending",
            "Alerts committed but not yet delivered, by sink.",
            ["sink"],
            registry=r,
        )
        self.outbox_oldest = Gauge(
            "exfilwatch_outbox_oldest_age_seconds",
            "Age of the oldest undelivered alert, by sink (0 when none).",
            ["sink"],
            registry=r,
        )
        self.model_info = Gauge(
            "exfilwatch_model_info",
            "The model being served (value 1).",
            ["name", "version", "feature_spec"],
            registry=r,
        )
        self.model_trained = Gauge(
            "exfilwatch_model_trained_timestamp_seconds",
            "When the served model was trained (Unix time).",
            registry=r,
        )
        self.model_reloads = Counter(
            "exfilwatch_model_reloads",
            "Model reloads after a promotion, by outcome.",
            ["outcome"],
            registry=r,
        )
        self.model_promotions = Counter(
            "exfilwatch_model_promotions",
            "Promotions seen: the served model's alias moved to another version (by the API, "
            "the command line or an edit of the alias file).",
            registry=r,
        )
        self.model_loads_refused = Counter(
            "exfilwatch_model_loads_refused",
            "Model versions refused at load, by reason (checksum, unsigned, signature, invalid).",
            ["reason"],
            registry=r,
        )
        for reason in ("checksum", "unsigned", "signature", "invalid"):
            self.model_loads_refused.labels(reason)  # every reason exported from the start
        self.source_up = Gauge(
            "exfilwatch_source_up",
            "1 while a source can be read (a JetStream source's server and stream reachable).",
            ["source"],
            registry=r,
        )
        self.last_event = Gauge(
            "exfilwatch_source_last_event_timestamp_seconds",
            "Timestamp of the newest event seen from each source (Unix time).",
            ["source"],
            registry=r,
        )
        self.snapshots = Counter(
            "exfilwatch_state_snapshots", "Feature-state snapshots written.", registry=r
        )
        self.snapshot_duration = Histogram(
            "exfilwatch_state_snapshot_duration_seconds",
            "Time to write a feature-state snapshot.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.http_requests = Counter(
            "exfilwatch_ingest_requests",
            "HTTP ingest requests by outcome.",
            ["outcome"],
            registry=r,
        )
        # the standard process_* and python_* series (memory, CPU, open files), for the
        # dashboard and the sizing alerts
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)

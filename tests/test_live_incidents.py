"""Live incidents and alerts are a function of the events: one labelled stream (the live
sample: two days after the default model's training window, seven attacks on the second) cut
into micro-batches anywhere, with restarts from a snapshot in between, gives the incidents of
batch scoring and the same alerts, each carrying the same severity and counts.

The micro-batches go through what the service runs for each one (the model's
``Scorer.anomalies`` and ``live.fold_anomalies`` in one store transaction); a restart is what a
restart from a snapshot is: the feature state saved and loaded into a fresh scorer, and a new
store over the same database file."""

from __future__ import annotations

import contextlib
import itertools
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from detector import pipeline
from detector.live import fold_anomalies
from detector.schema import SEVERITY_RANK
from detector.scoring import artefact
from detector.sinks import tables as t
from detector.sinks.store import Route, Store, alert_id
from tests.conftest import ROOT
from tests.test_delivery_support import BACKENDS, postgres_database

KINDS = ("incident.opened", "incident.escalated", "incident.resolved")
WALL = datetime(2026, 2, 1, tzinfo=UTC)  # every transaction's wall time: nothing resolves by it
_LIVE_ONLY = ("status_changed_at", "status_comment", "status_by", "updated_at")


@dataclass(frozen=True)
class Stream:
    events: pl.DataFrame
    anomalous: list[int]  # positions of the events over the threshold
    incidents: list[dict[str, Any]]  # what `exfilwatch score` makes of the whole stream
    alerts: list[tuple[Any, ...]]  # what one pass raises
    labels: dict[str, Any]


def _alert(kind: str, doc: dict[str, Any], webhook_id: str) -> tuple[Any, ...]:
    """An alert as its receiver sees it, placed by the event that raised it."""
    counts = (doc["events"], doc["rows_read"], doc["tenants_touched"], doc["addresses_count"])
    rank = SEVERITY_RANK[doc["severity"]]
    return (doc["last_seen"], doc["id"], rank, kind, doc["severity"], webhook_id, *counts)


@pytest.fixture(scope="module")
def stream(live_sample: Path) -> Stream:
    model = ROOT / "models" / "default"
    events = pl.read_parquet(live_sample / "events.parquet")
    scorer = pipeline.Scorer(artefact.load(model))
    scored = scorer.score(events)
    anomalous = scored.with_row_index().filter(pl.col("anomaly_score") >= scorer.threshold)
    whole = pipeline.Scorer(artefact.load(model)).incident_grouping()
    whole.add(pipeline.Scorer(artefact.load(model)).anomalies(events))
    batch = pipeline.score(model, [live_sample / "events.parquet"], None)
    return Stream(
        events,
        anomalous["index"].to_list(),
        batch.incidents,
        sorted(
            _alert(kind, doc, alert_id(doc["id"], kind, detail))
            for kind, doc, detail in whole.alerts
        ),
        json.loads((live_sample / "labels.json").read_text()),
    )


def _live(
    stream: Stream, cuts: list[int], restarts: list[bool], state: Path, url: str | None = None
) -> tuple[list[dict[str, Any]], list[tuple[Any, ...]]]:
    """The stream through the live path in batches ending at ``cuts``, restarting after the
    batches ``restarts`` marks (cycled), over the store at ``url`` (a new SQLite file by
    default); the stored incidents and the queued alerts."""
    url = url or f"sqlite:///{state / 'store.db'}"
    art = artefact.load(ROOT / "models" / "default")

    def open_store() -> Store:
        return Store(t.create_engine(url), [Route("soc", KINDS, 0)], clock=lambda: WALL)

    store, scorer = open_store(), pipeline.Scorer(art)
    bounds = [0, *sorted(set(cuts) - {0}), stream.events.height]
    marks = itertools.cycle(restarts)
    for n, (lo, hi) in enumerate(itertools.pairwise(bounds)):
        anomalies = scorer.anomalies(stream.events.slice(lo, hi - lo))
        with store.transaction() as tx:
            fold_anomalies(tx, scorer, anomalies)
        if next(marks):
            snapshot = state / f"snapshot-{n}"
            scorer.engine.save_state(snapshot)
            store.engine.dispose()
            store, scorer = open_store(), pipeline.Scorer(art, continue_state=False)
            scorer.engine.load_state(snapshot)
    docs = [
        {k: v for k, v in doc.items() if k not in _LIVE_ONLY}
        for doc in store.incidents(limit=100_000)
    ]
    alerts = [_alert(r["kind"], r["payload"]["data"], r["id"]) for r in store.outbox_rows()]
    store.engine.dispose()
    docs.sort(key=lambda d: (d["first_seen"], d["id"]))
    return docs, sorted(alerts)


def _check(
    stream: Stream, cuts: list[int], restarts: list[bool], state: Path, url: str | None = None
) -> None:
    docs, alerts = _live(stream, cuts, restarts, state, url)
    assert docs == stream.incidents
    assert alerts == stream.alerts


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_cross_tenant_sweep_cut_into_small_batches_is_graded_on_all_of_it(
    stream: Stream, tmp_path: Path, backend: str
) -> None:
    """Cut between every 20th anomalous event, restarting after every third batch: the
    cross-tenant fan-out's pieces each stay below 100 tenants and 10,000 rows, the incident
    does not, and it is critical live as in batch, announced below that and escalated to it."""
    with contextlib.ExitStack() as stack:
        url = stack.enter_context(postgres_database()) if backend == "postgresql" else None
        _check(stream, stream.anomalous[::20], [False, False, True], tmp_path, url)
    sweep = next(s for s in stream.labels["scenarios"] if s["scenario"] == "cross_tenant_fanout")
    [incident] = [i for i in stream.incidents if set(i["addresses"]) & set(sweep["addresses"])]
    assert incident["severity"] == "critical" and incident["tenants_touched"] > 100
    raised = [(a[3], a[4]) for a in stream.alerts if a[1] == incident["id"]]
    assert raised[0][0] == "incident.opened" and raised[0][1] != "critical"
    assert raised[-1] == ("incident.escalated", "critical")


@settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(data=st.data())
def test_any_cut_and_any_restart_gives_the_incidents_and_alerts_of_batch_scoring(
    stream: Stream, tmp_path_factory: pytest.TempPathFactory, data: st.DataObject
) -> None:
    near = st.sampled_from(stream.anomalous).flatmap(lambda i: st.sampled_from([i, i + 1]))
    cuts = data.draw(st.lists(near | st.integers(1, stream.events.height - 1), max_size=40))
    restarts = data.draw(st.lists(st.booleans(), min_size=1, max_size=6))
    _check(stream, cuts, restarts, tmp_path_factory.mktemp("live"))

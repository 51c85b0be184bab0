"""The ground truth of a sample (``labels.json``): where each attack is and which heavy work
is benign. Everything is read back from the final event frame, so the labels describe exactly
the events that were written."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import TypedDict

import polars as pl

from detector.samples.attacks import ScenarioRun
from detector.samples.jobs import BENIGN_ACTIVITIES, HeavyWindow

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class ScenarioLabel(TypedDict):
    """One injected attack. ``start``/``end`` are its first and last event."""

    scenario: str
    principal: str
    principals: list[str]
    sessions: list[str]
    addresses: list[str]
    client_apps: list[str]
    start: str
    end: str
    tables: list[str]
    events: int
    description: str


class BenignLabel(TypedDict):
    """Every run of one benign heavy activity, as ``[start, end]`` pairs."""

    activity: str
    principal: str
    windows: list[list[str]]


class Labels(TypedDict):
    """The document written as ``labels.json``."""

    seed: int
    days: int
    start: str
    end: str
    events: int
    scenarios: list[ScenarioLabel]
    benign_heavy: list[BenignLabel]


def iso(value: int | datetime) -> str:
    """ISO 8601 in UTC with microseconds and ``Z``; ``value`` is a datetime or epoch us."""
    moment = value if isinstance(value, datetime) else _EPOCH + timedelta(microseconds=value)
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _sorted_strings(column: pl.Series) -> list[str]:
    return sorted(str(v) for v in column.drop_nulls().unique().to_list())


def scenario_label(frame: pl.DataFrame, run: ScenarioRun) -> ScenarioLabel:
    """Describe ``run`` from its events in the sorted ``frame`` (with ``session_key``)."""
    events = frame.filter(pl.col("session_key").is_in(list(run.session_keys)))
    tables = events["objects"].explode().drop_nulls()
    return ScenarioLabel(
        scenario=run.scenario.name,
        principal=run.principals[0],
        principals=list(run.principals),
        sessions=[str(s) for s in events["session_id"].unique(maintain_order=True).to_list()],
        addresses=_sorted_strings(events["client_ip"]),
        client_apps=_sorted_strings(events["client_app"]),
        start=iso(events["event_time"].min()),  # type: ignore[arg-type]
        end=iso(events["event_time"].max()),  # type: ignore[arg-type]
        tables=sorted(t for t in set(tables.to_list()) if t.startswith("public.")),
        events=events.height,
        description=run.scenario.description,
    )


def benign_labels(windows: list[HeavyWindow], end_us: int) -> list[BenignLabel]:
    """Group the runs of each benign activity (only runs that start inside the sample)."""
    labels = []
    for activity in BENIGN_ACTIVITIES:
        runs = [w for w in windows if w.activity == activity and w.start_us < end_us]
        for principal in sorted({w.principal for w in runs}):
            spans = sorted((w.start_us, w.end_us) for w in runs if w.principal == principal)
            labels.append(
                BenignLabel(
                    activity=activity,
                    principal=principal,
                    windows=[[iso(a), iso(min(b, end_us - 1))] for a, b in spans],
                )
            )
    return labels

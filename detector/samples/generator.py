"""Generate a labelled sample: the simulated days, the injected attacks, the files.

>>> frame, labels = generate(days=1, seed=1, events_per_day=2_000, attack_days=0)
>>> frame.schema == pl.Schema(EVENT_SCHEMA), labels["scenarios"]
(True, [])
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import date, datetime
from pathlib import Path
from types import MappingProxyType
from typing import Final

import polars as pl

from detector.errors import ConfigError
from detector.samples.app import WEEKEND_FACTOR, simulate_app_day
from detector.samples.attacks import inject_attacks
from detector.samples.events import EventLog, assign_session_ids
from detector.samples.jobs import HeavyWindow, simulate_jobs
from detector.samples.labels import Labels, benign_labels, iso, scenario_label
from detector.samples.output import (
    Compression,
    jsonl_name,
    write_json,
    write_jsonl,
    write_parquet,
)
from detector.samples.staff import simulate_staff
from detector.samples.world import DEFAULT_START, World, build_world, np_rng
from detector.schema import COLUMNS, EVENT_SCHEMA

Progress = Callable[[int, int], None]

#: Mean events a day of everyone but app_api (jobs, BI, people), measured on the simulator.
OTHER_EVENTS_PER_DAY: Final = 900
#: app_api never falls below this share of the requested volume.
MIN_APP_SHARE: Final = 0.5
MIN_EVENTS_PER_DAY: Final = 500
MAX_DAYS: Final = 3660


@dataclass(frozen=True, slots=True)
class SampleSummary:
    """What :func:`write_sample` wrote."""

    directory: Path
    parquet: Path
    jsonl: Path
    labels: Path
    events: int
    days: int
    start: date
    per_principal: Mapping[str, int]
    scenarios: int


def _validate(days: int, start: date, events_per_day: int, attack_days: int) -> None:
    if isinstance(start, datetime) or not isinstance(start, date):
        raise ConfigError(f"start must be a date (not a datetime), got {start!r}")
    if not 1 <= days <= MAX_DAYS:
        raise ConfigError(f"days must be between 1 and {MAX_DAYS}, got {days}")
    if events_per_day < MIN_EVENTS_PER_DAY:
        raise ConfigError(
            f"events_per_day must be at least {MIN_EVENTS_PER_DAY}, got {events_per_day}"
        )
    if not 0 <= attack_days <= days:
        raise ConfigError(f"attack_days must be between 0 and days ({days}), got {attack_days}")


def _app_weekday_events(events_per_day: int) -> float:
    """app_api events on a weekday so that a whole week averages ``events_per_day``."""
    app_mean = max(events_per_day - OTHER_EVENTS_PER_DAY, MIN_APP_SHARE * events_per_day)
    return app_mean * 7 / (5 + 2 * WEEKEND_FACTOR)


def _simulate(world: World, progress: Progress | None) -> tuple[EventLog, list[HeavyWindow]]:
    log = EventLog()
    windows: list[HeavyWindow] = []
    weekday_events = _app_weekday_events(world.events_per_day)
    for day in range(world.days):
        windows.extend(simulate_jobs(log, world, day))
        simulate_staff(log, world, day)
        simulate_app_day(log, world, day, weekday_events)
        if progress is not None:
            progress(day + 1, world.days)
    return log, windows


def generate(
    *,
    days: int,
    seed: int,
    start: date = DEFAULT_START,
    events_per_day: int = 40_000,
    attack_days: int = 2,
    progress: Progress | None = None,
) -> tuple[pl.DataFrame, Labels]:
    """Simulate ``days`` days from ``start`` and inject the seven attack scenarios into the
    last ``attack_days`` days. Returns the canonical frame (schema exactly
    :data:`~detector.schema.EVENT_SCHEMA`, sorted by ``event_time``) and the labels.
    ``progress(done_days, total_days)`` is called after each simulated day.
    The same arguments always give the same result."""
    _validate(days, start, events_per_day, attack_days)
    world = build_world(seed=seed, start=start, days=days, events_per_day=events_per_day)
    log, windows = _simulate(world, progress)
    runs = inject_attacks(log, world, attack_days)
    frame = (
        log.to_frame()
        .filter(pl.col("event_time") < pl.lit(world.end_us).cast(EVENT_SCHEMA["event_time"]))
        .sort("event_time", maintain_order=True)
    )
    frame = assign_session_ids(frame, np_rng(seed, "pids"))
    labels = Labels(
        seed=seed,
        days=days,
        start=iso(world.start_us),
        end=iso(world.end_us),
        events=frame.height,
        scenarios=[scenario_label(frame, run) for run in runs],
        benign_heavy=benign_labels(windows, world.end_us),
    )
    return frame.select(COLUMNS), labels


def write_sample(
    out: Path,
    *,
    days: int,
    seed: int,
    start: date = DEFAULT_START,
    events_per_day: int = 40_000,
    attack_days: int = 2,
    jsonl_compression: Compression = None,
    progress: Progress | None = None,
) -> SampleSummary:
    """Generate a sample (see :func:`generate`) and write ``out/events.parquet``,
    ``out/events.jsonl`` (``.gz``/``.zst`` when compressed) and ``out/labels.json``."""
    jsonl = out / jsonl_name(jsonl_compression)
    frame, labels = generate(
        days=days,
        seed=seed,
        start=start,
        events_per_day=events_per_day,
        attack_days=attack_days,
        progress=progress,
    )
    out.mkdir(parents=True, exist_ok=True)
    parquet, labels_path = out / "events.parquet", out / "labels.json"
    write_parquet(frame, parquet)
    write_jsonl(frame, jsonl, jsonl_compression)
    write_json(labels, labels_path)
    counts = frame.group_by("db_user").len().sort("db_user")
    per_principal = dict(zip(counts["db_user"].to_list(), counts["len"].to_list(), strict=True))
    return SampleSummary(
        directory=out,
        parquet=parquet,
        jsonl=jsonl,
        labels=labels_path,
        events=frame.height,
        days=days,
        start=start,
        per_principal=MappingProxyType(per_principal),
        scenarios=len(labels["scenarios"]),
    )

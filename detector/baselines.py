"""Published baseline rules, run on the same events as the model, so ``exfilwatch eval
--baselines`` can say what plain rules catch and what they cost.

The rules are the plain detections published after the 2024 thefts from cloud data warehouses
with stolen credentials. Each learns from the events before a cutoff (the *training window*)
and raises alerts only for events at or after it (the *scored stream*). The cutoff is the end of
a model's training window (``training.window.end`` in its ``metadata.json``) or given
explicitly. All four work on canonical events (:data:`detector.schema.EVENT_SCHEMA`); "rows" of
an event is ``rows_returned``, null counted as 0.

``volume_z_per_database``
    An event fires when it returns more than 500 rows and its rows' z-score exceeds 3. The
    z-score is ``(rows - mean) / max(std, 1)``, with the mean and the sample standard deviation
    (ddof 1) of the rows of the training events that returned rows (``rows_returned`` not null)
    of the event's database: ``db_name``, or ``db_instance`` when that is null. An event whose
    database is null, or had fewer than 30 such training events, is compared with the same
    figures over all databases; with fewer than 30 training events anywhere, the rule is silent.

``copy_to``
    An event fires when it copies data out: ``action`` is ``copy``, or ``command`` is ``COPY``
    and the statement text names a ``TO`` target (``TO STDOUT``, ``TO PROGRAM`` or ``TO '...'``,
    case-insensitive); unless the statement is a ``COPY table [(columns)] FROM ...``, which
    loads data in. No training needed.

``new_login_address``
    A login fires when its address was never seen for its user before it: no event of that
    user (any action) from that ``client_ip`` has an earlier ``event_time``, in the training
    window or earlier in the scored stream. A login is an event with action ``login`` whose
    ``success`` is not false; for a user with no ``login`` event at all in the input, the first
    event of each of its sessions (and every event without a session) stands in for its logins.
    Events without a ``client_ip`` never fire. Logins at the very same instant as the first
    sighting all fire.

``hourly_volume_z_per_user``
    Per user and UTC clock hour, the total rows of the user's events. The user's history is the
    hourly totals of the training window over its *active days* (UTC calendar days with at least
    one event of the user there): 24 hours per active day, an hour without events counting as 0.
    A scored hour fires when ``(total - mean) / floor_std`` exceeds 3, where ``floor_std =
    max(std, 0.1 * mean, 1)`` with the population standard deviation of the history. The floor
    keeps a constant history from dividing by zero: a history that never varied tolerates 30%
    above its mean, and one of only zeros tolerates 3 rows an hour. A user without training
    events is silent (no history to compare). The events of a firing hour that returned rows
    are its alerts. An hour the cutoff falls in is split: its part before the cutoff is history,
    its part after is scored.

Alerts become *alert groups* shaped like incidents (what :func:`detector.evaluation.evaluate`
reads): one per rule, user and address (``client_ip``, else none), split where the alerts are
more than 30 minutes apart. ``any_rule`` groups the alerts of all four rules the same way, per
user and address. A group's id is derived from its rule, key and first alert, and every list in
it is sorted, so the groups do not depend on the order of the input rows.

Each rule is a few polars group-bys and joins over the whole input: costs grow linearly with the
events, with no Python work per event.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import polars as pl

from detector.errors import InputError
from detector.evaluation import EvalReport, evaluate
from detector.incidents.grouping import DEFAULT_GAP_S
from detector.pipeline import Reading
from detector.quarantine import Quarantine
from detector.schema import EVENT_SCHEMA
from detector.scoring import artefact as store
from detector.sources.files import read_events

RULES: Final = (
    "volume_z_per_database",
    "copy_to",
    "new_login_address",
    "hourly_volume_z_per_user",
)
ANY_RULE: Final = "any_rule"

#: The columns the rules read.
COLUMNS: Final = (
    "event_time",
    "db_user",
    "action",
    "db_instance",
    "db_name",
    "client_ip",
    "client_app",
    "session_id",
    "command",
    "objects",
    "statement_text",
    "rows_returned",
    "success",
)

_COPY_TO_TARGET: Final = r"(?i)\bTO\s+(STDOUT\b|PROGRAM\b|E?')"
_COPY_FROM: Final = r'(?is)^\s*COPY\s+[\w."]+\s*(\([^)]*\))?\s*FROM\b'


@dataclass(frozen=True)
class RuleSettings:
    """The rules' constants (the module docstring states them with these defaults)."""

    min_rows: int = 500
    z: float = 3.0
    min_history: int = 30
    std_floor: float = 1.0
    hourly_relative_floor: float = 0.1
    gap_s: float = DEFAULT_GAP_S  # the gap incidents are grouped by


# ---------------------------------------------------------------------------- input
def read(
    paths: Sequence[str | Path],
    reading: Reading | None = None,
    *,
    quarantine: Quarantine | None = None,
    batch_rows: int = 100_000,
) -> pl.DataFrame:
    """The events of ``paths`` as one frame of :data:`COLUMNS`, read by the same reader and
    with the same :class:`~detector.pipeline.Reading` as batch scoring."""
    how = reading or Reading()
    batches = read_events(
        paths,
        batch_rows=batch_rows,
        quarantine=quarantine,
        default_tz=how.default_tz,
        log_format=how.log_format,
        adapter_options=how.adapter_options,
    )
    frames = [batch.select(COLUMNS) for batch in batches]
    if not frames:
        return pl.DataFrame(schema={c: EVENT_SCHEMA[c] for c in COLUMNS})
    return pl.concat(frames, rechunk=True)


def training_end(model_ref: str | Path) -> datetime:
    """The end of a model's training window: the default cutoff of the rules."""
    meta = store.load(model_ref).metadata
    try:
        return parse_time(str(meta["training"]["window"]["end"]))
    except (KeyError, TypeError) as exc:
        raise InputError(f"model {model_ref} has no training window in its metadata") from exc


def parse_time(text: str) -> datetime:
    """An ISO 8601 time with a zone ('Z' or an offset), as an aware UTC datetime."""
    try:
        value = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError as exc:
        raise InputError(f"not an ISO 8601 time: {text!r}") from exc
    if value.tzinfo is None:
        raise InputError(f"time {text!r} has no zone; add Z or an offset such as +00:00")
    return value.astimezone(UTC)


# ---------------------------------------------------------------------------- rules
def _rows() -> pl.Expr:
    return pl.col("rows_returned").fill_null(0)


def volume_z_per_database(
    events: pl.DataFrame, cutoff: datetime, settings: RuleSettings | None = None
) -> pl.DataFrame:
    """Alerted events of ``volume_z_per_database`` (see the module docstring)."""
    s = settings or RuleSettings()
    database = pl.coalesce(pl.col("db_name"), pl.col("db_instance"))
    returning = events.filter(pl.col("rows_returned").is_not_null()).with_columns(_db=database)
    history = returning.filter(pl.col("event_time") < cutoff)
    overall = history.select(
        _n=pl.len(),
        _mean=pl.col("rows_returned").cast(pl.Float64).mean(),
        _std=pl.col("rows_returned").cast(pl.Float64).std(),
    ).row(0, named=True)
    if overall["_n"] < s.min_history:
        return events.clear()
    per_db = (
        history.filter(pl.col("_db").is_not_null())
        .group_by("_db")
        .agg(
            _n=pl.len(),
            _mean=pl.col("rows_returned").cast(pl.Float64).mean(),
            _std=pl.col("rows_returned").cast(pl.Float64).std(),
        )
        .filter(pl.col("_n") >= s.min_history)
    )
    scored = returning.filter(
        (pl.col("event_time") >= cutoff) & (pl.col("rows_returned") > s.min_rows)
    ).join(per_db, on="_db", how="left")
    mean = pl.col("_mean").fill_null(overall["_mean"])
    std = pl.col("_std").fill_null(overall["_std"])
    z = (pl.col("rows_returned") - mean) / pl.max_horizontal(std, s.std_floor)
    return scored.filter(z > s.z).select(events.columns)


def copy_to(
    events: pl.DataFrame, cutoff: datetime, settings: RuleSettings | None = None
) -> pl.DataFrame:
    """Alerted events of ``copy_to`` (see the module docstring)."""
    text = pl.col("statement_text").fill_null("")
    copy_command = pl.col("command").str.to_uppercase() == "COPY"
    out = (pl.col("action") == "copy") | (
        copy_command.fill_null(False) & text.str.contains(_COPY_TO_TARGET)
    )
    loads = text.str.contains(_COPY_FROM)
    return events.filter((pl.col("event_time") >= cutoff) & out & ~loads)


def new_login_address(
    events: pl.DataFrame, cutoff: datetime, settings: RuleSettings | None = None
) -> pl.DataFrame:
    """Alerted events of ``new_login_address`` (see the module docstring)."""
    first_seen = (
        events.filter(pl.col("client_ip").is_not_null())
        .group_by("db_user", "client_ip")
        .agg(_first=pl.col("event_time").min())
    )
    with_logins = events.filter(pl.col("action") == "login").select("db_user").unique()
    session_start = pl.col("session_id").is_null() | (
        pl.col("event_time") == pl.col("event_time").min().over("db_user", "session_id")
    )
    login = (
        pl.when(pl.col("db_user").is_in(with_logins["db_user"].implode()))
        .then((pl.col("action") == "login") & pl.col("success").fill_null(True))
        .otherwise(session_start)
    )
    logins = events.filter(login & pl.col("client_ip").is_not_null())
    return (
        logins.join(first_seen, on=["db_user", "client_ip"], how="inner")
        .filter((pl.col("event_time") == pl.col("_first")) & (pl.col("event_time") >= cutoff))
        .select(events.columns)
    )


def hourly_volume_z_per_user(
    events: pl.DataFrame, cutoff: datetime, settings: RuleSettings | None = None
) -> pl.DataFrame:
    """Alerted events of ``hourly_volume_z_per_user`` (see the module docstring)."""
    s = settings or RuleSettings()
    hour = pl.col("event_time").dt.truncate("1h")
    before = pl.col("event_time") < cutoff
    history = events.filter(before)
    totals = (
        history.group_by("db_user", hour.alias("_hour"))
        .agg(_total=_rows().sum().cast(pl.Float64))
        .group_by("db_user")
        .agg(_sum=pl.col("_total").sum(), _squares=(pl.col("_total") ** 2).sum())
    )
    days = history.group_by("db_user").agg(_days=pl.col("event_time").dt.date().n_unique())
    habits = (
        totals.join(days, on="db_user")
        .with_columns(_hours=pl.col("_days").cast(pl.Float64) * 24.0)
        .with_columns(_mean=pl.col("_sum") / pl.col("_hours"))
        .with_columns(
            _std=(pl.col("_squares") / pl.col("_hours") - pl.col("_mean") ** 2).clip(0.0).sqrt()
        )
        .with_columns(
            _floor=pl.max_horizontal(
                pl.col("_std"), s.hourly_relative_floor * pl.col("_mean"), pl.lit(s.std_floor)
            )
        )
        .select("db_user", "_mean", "_floor")
    )
    scored = events.filter(~before).with_columns(_hour=hour)
    hot = (
        scored.group_by("db_user", "_hour")
        .agg(_total=_rows().sum().cast(pl.Float64))
        .join(habits, on="db_user", how="inner")
        .filter((pl.col("_total") - pl.col("_mean")) / pl.col("_floor") > s.z)
        .select("db_user", "_hour")
    )
    return (
        scored.filter(_rows() > 0)
        .join(hot, on=["db_user", "_hour"], how="inner")
        .select(events.columns)
    )


_RULE_FUNCTIONS: Final = {
    "volume_z_per_database": volume_z_per_database,
    "copy_to": copy_to,
    "new_login_address": new_login_address,
    "hourly_volume_z_per_user": hourly_volume_z_per_user,
}


def alerts(
    events: pl.DataFrame, cutoff: datetime, settings: RuleSettings | None = None
) -> pl.DataFrame:
    """Every rule's alerted events, one row per (rule, event), with a ``rule`` column."""
    frame = events.select(COLUMNS)
    parts = [
        _RULE_FUNCTIONS[rule](frame, cutoff, settings).with_columns(rule=pl.lit(rule))
        for rule in RULES
    ]
    return pl.concat(parts)


# ---------------------------------------------------------------------------- alert groups
def _iso(t: datetime) -> str:
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def group(alerted: pl.DataFrame, method: str, gap_s: float = DEFAULT_GAP_S) -> list[dict[str, Any]]:
    """Alert groups of ``method`` (a rule, or :data:`ANY_RULE` for all the ``alerted``
    together): one per user and address, split at gaps longer than ``gap_s``; sorted by first
    alert and id."""
    if method != ANY_RULE:
        alerted = alerted.filter(pl.col("rule") == method)
    if alerted.height == 0:
        return []
    address = pl.col("client_ip").fill_null("-")
    frame = alerted.with_columns(_address=address).sort("db_user", "_address", "event_time")
    new = (
        (pl.col("db_user") != pl.col("db_user").shift(1))
        | (pl.col("_address") != pl.col("_address").shift(1))
        | (pl.col("event_time") - pl.col("event_time").shift(1) > pl.duration(seconds=gap_s))
    ).fill_null(True)

    def distinct(col: str) -> pl.Expr:
        return pl.col(col).drop_nulls().unique().sort()

    summary = (
        frame.with_columns(_seq=new.cum_sum())
        .group_by("_seq")
        .agg(
            pl.col("db_user").first(),
            pl.col("_address").first(),
            pl.col("client_ip").drop_nulls().unique().sort().alias("addresses"),
            distinct("session_id").alias("sessions"),
            distinct("client_app").alias("client_apps"),
            pl.col("objects").explode().drop_nulls().unique().sort().alias("tables"),
            distinct("rule").alias("rules"),
            pl.col("event_time").min().alias("first"),
            pl.col("event_time").max().alias("last"),
            pl.len().alias("alerts"),
            _rows().sum().alias("rows_read"),
        )
    )
    groups = []
    for row in summary.iter_rows(named=True):
        key = f"{method}|{row['db_user']}@{row['_address']}"
        first = _iso(row["first"])
        digest = hashlib.sha256(f"{key}|{first}".encode()).hexdigest()[:16]
        groups.append(
            {
                "id": f"bl_{digest}",
                "rule": method,
                "rules": row["rules"],
                "group_key": key,
                "principal": row["db_user"],
                "principals": [row["db_user"]],
                "addresses": row["addresses"],
                "sessions": row["sessions"][:20],
                "client_apps": row["client_apps"],
                "tables": row["tables"][:50],
                "first_seen": first,
                "last_seen": _iso(row["last"]),
                "alerts": row["alerts"],
                "rows_read": row["rows_read"],
                "severity": "medium",
            }
        )
    groups.sort(key=lambda g: (g["first_seen"], g["id"]))
    return groups


def run(
    events: pl.DataFrame, cutoff: datetime, settings: RuleSettings | None = None
) -> dict[str, list[dict[str, Any]]]:
    """Alert groups per method: each of :data:`RULES`, then :data:`ANY_RULE`."""
    s = settings or RuleSettings()
    alerted = alerts(events, cutoff, s)
    return {method: group(alerted, method, s.gap_s) for method in (*RULES, ANY_RULE)}


# ---------------------------------------------------------------------------- comparison
def scored_labels(labels: dict[str, Any], cutoff: datetime) -> dict[str, Any]:
    """``labels`` cut to the scored stream: from the later of its start and ``cutoff``, with
    only the scenarios that end at or after ``cutoff`` (the rules cannot see the others)."""
    start = max(parse_time(labels["start"]), cutoff)
    end = max(parse_time(labels["end"]), start)
    return {
        **labels,
        "start": _iso(start),
        "end": _iso(end),
        "scenarios": [sc for sc in labels["scenarios"] if parse_time(sc["end"]) >= cutoff],
    }


def since(incidents: Sequence[dict[str, Any]], cutoff: datetime) -> list[dict[str, Any]]:
    """The incidents that last until ``cutoff`` or later (those in the scored stream)."""
    return [i for i in incidents if parse_time(i["last_seen"]) >= cutoff]


@dataclass(frozen=True)
class Comparison:
    """One method's line of the comparison."""

    method: str
    report: EvalReport

    @property
    def variants(self) -> tuple[int, int]:
        return sum(s.caught for s in self.report.scenarios), len(self.report.scenarios)

    @property
    def shapes(self) -> tuple[int, int]:
        names = {s.scenario for s in self.report.scenarios}
        return len({s.scenario for s in self.report.scenarios if s.caught}), len(names)

    @property
    def benign_heavy(self) -> int:
        return sum(self.report.benign_heavy.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "variants_caught": self.variants[0],
            "variants": self.variants[1],
            "shapes_caught": self.shapes[0],
            "shapes": self.shapes[1],
            "alert_groups": self.report.incidents,
            "false_alert_groups": len(self.report.false_incidents),
            "false_per_day": self.report.false_per_day,
            "benign_heavy_alert_groups": self.benign_heavy,
            "report": self.report.to_dict(),
        }


def compare(
    methods: Mapping[str, Sequence[dict[str, Any]]], labels: dict[str, Any], cutoff: datetime
) -> list[Comparison]:
    """Each method's alert groups (or incidents) evaluated on the scored stream only."""
    window = scored_labels(labels, cutoff)
    return [
        Comparison(name, evaluate(since(groups, cutoff), window))
        for name, groups in methods.items()
    ]


def history_size(events: pl.DataFrame, cutoff: datetime) -> int:
    """How many of ``events`` the rules learn from (those before ``cutoff``)."""
    return events.filter(pl.col("event_time") < cutoff).height

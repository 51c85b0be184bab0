"""The real-server lab: a short seeded run against a private PostgreSQL under libfaketime."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import polars as pl
import pytest

from detector.adapters import make_adapter
from detector.lab.run import DEFAULT_PREFIX, LabConfig, run_lab
from tests.pgcluster import require_cluster

SHAPES = {
    "stolen_app_credentials_dump",
    "aggregate_theft",
    "slow_pagination",
    "copy_export",
    "off_hours_insider",
    "brute_force_then_login",
    "cross_tenant_fanout",
}
FILES = {
    "pgaudit-jsonlog": "postgresql.json",
    "pgaudit-csvlog": "postgresql.csv",
    "pgaudit-stderr": "postgresql.log",
}


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    require_cluster(lab=True)
    out = tmp_path_factory.mktemp("lab")
    config = LabConfig(seed=7, days=2, attack_days=1, scale=0.1)
    summary = run_lab(config, out, command="test")
    return out, summary


def _events(out: Path, adapter: str) -> pl.DataFrame:
    options = {"log_line_prefix": DEFAULT_PREFIX} if adapter == "pgaudit-stderr" else {}
    parser = make_adapter(adapter, location=FILES[adapter], **options)
    parsed = parser.feed((out / FILES[adapter]).read_bytes(), final=True)
    assert parsed.rejects.height == 0, parsed.rejects.head(5).to_dicts()
    events: pl.DataFrame = parsed.events
    return events


@pytest.mark.slow
@pytest.mark.parametrize("adapter", sorted(FILES))
def test_every_log_parses_with_no_rejects(lab: tuple[Path, dict[str, Any]], adapter: str) -> None:
    out, summary = lab
    events = _events(out, adapter)
    assert events.height == summary["counts"]["events"]
    assert events["client_ip"].drop_nulls().n_unique() >= 4


@pytest.mark.slow
def test_timestamps_span_the_simulated_days(lab: tuple[Path, dict[str, Any]]) -> None:
    out, summary = lab
    events = _events(out, "pgaudit-jsonlog")
    start = datetime(2026, 3, 30, tzinfo=UTC)
    first, last = events["event_time"].min(), events["event_time"].max()
    assert isinstance(first, datetime) and isinstance(last, datetime)
    assert (first - start).total_seconds() < 2 * 3600
    assert last.date().isoformat() == "2026-03-31"
    assert (last - start).total_seconds() > 1.8 * 86400
    assert summary["max_clock_drift_s"] < 1.0


@pytest.mark.slow
def test_app_binds_parameters_and_backup_copy_rows_are_unknown(
    lab: tuple[Path, dict[str, Any]],
) -> None:
    out, _ = lab
    events = _events(out, "pgaudit-jsonlog")
    app = events.filter((pl.col("db_user") == "app_api") & pl.col("statement_text").is_not_null())
    assert app.height > 100
    assert app["statement_text"].str.contains(r"\$1").mean() > 0.9  # type: ignore[operator]
    copies = events.filter((pl.col("db_user") == "backup") & (pl.col("command") == "COPY"))
    assert copies.height >= 5
    assert set(copies["rows_returned"].to_list()) <= {None, 0}
    staff = events.filter(pl.col("db_user").str.starts_with("support_"))
    assert staff["statement_text"].str.contains("WHERE id = [0-9]").any()


@pytest.mark.slow
def test_labels_cover_every_shape_with_sessions_from_the_log(
    lab: tuple[Path, dict[str, Any]],
) -> None:
    out, summary = lab
    labels = json.loads((out / "labels.json").read_text())
    assert labels["source"] == "lab" and labels["seed"] == 7
    assert {s["scenario"] for s in labels["scenarios"]} == SHAPES
    sessions = set()
    for line in (out / "postgresql.json").read_bytes().splitlines():
        sessions.add(orjson.loads(line).get("session_id"))
    for scenario in labels["scenarios"]:
        assert scenario["sessions"] and set(scenario["sessions"]) <= sessions
        assert scenario["start"] <= scenario["end"]
        assert scenario["start"] >= "2026-03-31"
        assert scenario["events"] > 0 and scenario["addresses"]
    activities = {h["activity"] for h in labels["benign_heavy"]}
    assert {"nightly_backup", "bi_refresh", "nightly_aggregation"} <= activities
    assert "deploy_login_failures" in activities
    lab_json = json.loads((out / "lab.json").read_text())
    assert lab_json == summary and lab_json["counts"]["adapter_rejects"] == 0


class _Recorder:
    """Stands in for the driver: records what would be spawned when, runs nothing."""

    def __init__(self) -> None:
        self.spawned: list[float] = []

    def spawn(self, at: float, actor: Any) -> None:
        self.spawned.append(at)
        actor.close()


def _schedule(seed: int) -> tuple[list[float], list[tuple[str, str, str, float]]]:
    import random

    from detector.lab.attacks import schedule_attacks
    from detector.lab.schema import Sizes
    from detector.lab.traffic import World, schedule_benign

    recorder = _Recorder()
    start = datetime(2026, 3, 30, tzinfo=UTC).timestamp()
    world = World(recorder, random.Random(seed), seed, Sizes.at(0.1), start, 7, 0.1, 2)  # type: ignore[arg-type]
    schedule_benign(world)
    attacks = [(a.scenario, a.variant, a.principal, a.at) for a in schedule_attacks(world)]
    return recorder.spawned, attacks


def test_a_seed_gives_the_same_schedule_and_seeds_differ() -> None:
    spawned, attacks = _schedule(3)
    assert _schedule(3) == (spawned, attacks)
    assert [a[0] for a in attacks] == sorted(SHAPES, key=[a[0] for a in attacks].index)
    assert {a[0] for a in attacks} == SHAPES
    last_two = datetime(2026, 4, 4, tzinfo=UTC).timestamp()
    assert all(a[3] >= last_two for a in attacks)
    assert len(spawned) > 1500
    variants = {tuple(a[1] for a in _schedule(s)[1]) for s in range(1, 9)}
    assert len(variants) > 4

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
from detector.lab.run import DEFAULT_PREFIX, LabConfig, run_lab, seeded_start
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
VARIANTS = {
    "stolen_app_credentials_dump": {"gui", "psql", "script"},
    "aggregate_theft": {"support_psql", "analyst_gui", "support_console"},
    "slow_pagination": {"per_page_sessions", "team_page_sweep", "keyset_psql"},
    "copy_export": {"pg_dump_tables", "copy_psql_night", "copy_join_csv"},
    "off_hours_insider": {"night_psql", "night_gui", "late_psql_joins"},
    "brute_force_then_login": {"brute_force", "password_spray", "low_and_slow"},
    "cross_tenant_fanout": {"support_psql_literals", "app_bound_session", "analyst_gui"},
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
    start = datetime.fromisoformat(summary["start"])
    assert start.date() == seeded_start(7, 2, 1) and summary["start_from"] == "seed"
    first, last = events["event_time"].min(), events["event_time"].max()
    assert isinstance(first, datetime) and isinstance(last, datetime)
    assert (first - start).total_seconds() < 2 * 3600
    assert last.date().isoformat() == summary["attack_dates"][-1]
    assert len(summary["attack_dates"]) == 1
    assert (last - start).total_seconds() > 1.8 * 86400
    assert summary["max_clock_drift_s"] < 1.0


@pytest.mark.slow
def test_every_line_of_every_log_carries_simulated_time(
    lab: tuple[Path, dict[str, Any]],
) -> None:
    out, summary = lab
    assert summary["wait_shim"]
    assert summary["log_outside_simulated_span"] == {"jsonlog": 0, "csvlog": 0, "stderr": 0}
    text = (out / "postgresql.log").read_text()
    for needle in ("database system is ready to accept connections",
                   "database system is shut down"):
        line = next(x for x in text.splitlines() if needle in x)
        assert line[:10] in (summary["start"][:10], summary["log_first"][:10],
                             summary["end"][:10], summary["log_last"][:10]), line


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
    found: dict[str, set[str]] = {}
    for s in labels["scenarios"]:
        found.setdefault(s["scenario"], set()).add(s["variant"])
    assert found == VARIANTS
    assert len(labels["scenarios"]) == sum(len(v) for v in VARIANTS.values())
    sessions = set()
    for line in (out / "postgresql.json").read_bytes().splitlines():
        sessions.add(orjson.loads(line).get("session_id"))
    for scenario in labels["scenarios"]:
        assert scenario["sessions"] and set(scenario["sessions"]) <= sessions
        assert scenario["start"] <= scenario["end"]
        assert scenario["start"] >= summary["attack_dates"][0]
        assert scenario["events"] > 0 and scenario["addresses"]
    activities = {h["activity"] for h in labels["benign_heavy"]}
    assert {"nightly_backup", "bi_refresh", "nightly_aggregation"} <= activities
    assert "deploy_login_failures" in activities
    # the DBA's changes and the deploy's failed logins are in the training data too
    training, attack = summary["start"][:10], summary["attack_dates"][0]
    for activity in ("dba_changes", "deploy_login_failures"):
        heavy = next(h for h in labels["benign_heavy"] if h["activity"] == activity)
        days = {w[0][:10] for w in heavy["windows"]}
        assert any(d < attack for d in days) and attack in days, (activity, days)
        assert min(days) >= training
    lab_json = json.loads((out / "lab.json").read_text())
    assert lab_json == summary and lab_json["counts"]["adapter_rejects"] == 0


class _Recorder:
    """Stands in for the driver: records what would be spawned when, runs nothing."""

    def __init__(self) -> None:
        self.spawned: list[float] = []

    def spawn(self, at: float, actor: Any) -> None:
        self.spawned.append(at)
        actor.close()


def _world(seed: int, scale: float, start: datetime, days: int = 7) -> Any:
    import random

    from detector.lab.schema import Sizes
    from detector.lab.traffic import World, schedule_benign

    world = World(_Recorder(), random.Random(seed), seed, Sizes.at(scale),  # type: ignore[arg-type]
                  start.timestamp(), days, scale, 2)
    schedule_benign(world)
    return world


def _schedule(
    seed: int, scale: float = 0.1
) -> tuple[list[float], list[tuple[str, str, str, float, float, frozenset[str]]]]:
    from detector.lab.attacks import schedule_attacks

    world = _world(seed, scale, datetime(2026, 3, 30, tzinfo=UTC))
    recorder = world.sim
    attacks = [(a.scenario, a.variant, a.principal, a.at, a.planned_end, frozenset(a.principals))
               for a in schedule_attacks(world)]
    return recorder.spawned, attacks


def test_a_seed_gives_the_same_schedule_and_seeds_differ() -> None:
    spawned, attacks = _schedule(3)
    assert _schedule(3) == (spawned, attacks)
    assert {(a[0], a[1]) for a in attacks} == {(s, v) for s, vs in VARIANTS.items() for v in vs}
    last_two = datetime(2026, 4, 4, tzinfo=UTC).timestamp()
    assert all(last_two <= a[3] < a[4] <= last_two + 2 * 86400 for a in attacks)
    assert len(spawned) > 1500
    schedules = {tuple((a[2], round(a[3])) for a in _schedule(s)[1]) for s in range(1, 9)}
    assert len(schedules) == 8


@pytest.mark.parametrize("seed", [3, 101, 202])
def test_attacks_of_one_principal_are_hours_apart_and_keep_their_character(seed: int) -> None:
    _, attacks = _schedule(seed, scale=1.0)
    for i, a in enumerate(attacks):
        for b in attacks[i + 1 :]:
            if a[5] & b[5]:
                first, second = sorted((a, b), key=lambda x: x[3])
                assert second[3] - first[4] >= 2 * 3600, (first[:3], second[:3])
        hour = datetime.fromtimestamp(a[3], UTC).hour
        weekend = datetime.fromtimestamp(a[3], UTC).weekday() >= 5
        if a[1] in ("night_psql", "night_gui", "copy_psql_night"):
            assert hour < 5 or weekend, a[:4]
        if a[1] == "late_psql_joins":
            assert hour >= 22 or weekend, a[:4]
    by_shape: dict[str, list[str]] = {}
    for a in attacks:
        by_shape.setdefault(a[0], []).append(a[2])
    # different principals for the variants of a shape where the roles allow it
    for shape in ("aggregate_theft", "copy_export", "off_hours_insider",
                  "brute_force_then_login", "cross_tenant_fanout"):
        assert len(set(by_shape[shape])) == 3, (shape, by_shape[shape])
    # one insider is one incident: every staff attack has a principal of its own, and the
    # spray gets in as a principal that carries no other attack
    staff = [a[2] for a in attacks if a[2].startswith(("analyst_", "support_"))]
    assert len(staff) == 14 and len(set(staff)) == len(staff), sorted(staff)
    spray = next(a for a in attacks if a[1] == "password_spray")
    assert all(a[2] != spray[2] for a in attacks if a is not spray)
    sprayed = spray[5] - {spray[2]}
    assert len(sprayed) >= 4 and sprayed <= set(staff)
    # only app_api carries more than one attack
    shared = {p for p in (a[2] for a in attacks) if [a[2] for a in attacks].count(p) > 1}
    assert shared == {"app_api"}


def test_staff_roster_and_their_clients() -> None:
    from detector.lab.mariadb import MARIADB_GRANTS
    from detector.lab.schema import ROLE_GRANTS
    from detector.lab.traffic import DBEAVER, STAFF_ADDRESSES, STAFF_CLIENT

    analysts = [f"analyst_{i}" for i in range(1, 7)]
    support = [f"support_{i}" for i in range(1, 9)]
    assert sorted(STAFF_ADDRESSES) == sorted(analysts + support) == sorted(STAFF_CLIENT)
    assert len(set(STAFF_ADDRESSES.values())) == 14
    assert all(a.startswith("127.") for a in STAFF_ADDRESSES.values())
    assert set(STAFF_ADDRESSES) <= set(ROLE_GRANTS) and set(STAFF_ADDRESSES) <= set(MARIADB_GRANTS)
    assert sorted(STAFF_CLIENT[a] for a in analysts) == sorted([DBEAVER] * 3 + ["psql"] * 3)
    assert sorted(STAFF_CLIENT[s] for s in support) == sorted(
        ["support-console"] * 4 + ["psql"] * 4)


@pytest.mark.parametrize("seed", [3, 7, 101, 202])
@pytest.mark.parametrize("start", [datetime(2026, 3, 30, tzinfo=UTC),
                                   datetime(2026, 4, 1, tzinfo=UTC)])
def test_heavy_benign_activity_is_in_training_and_attack_days(seed: int, start: datetime) -> None:
    world = _world(seed, 0.1, start)
    training, attack = range(5), range(5, 7)
    for days in (world.dba_change_days, world.deploy_failure_days):
        assert any(d in training for d in days) and any(d in attack for d in days), days
    # the DBA works on weekdays where the part of the run has one
    assert all(not world.weekend(d) for d in world.dba_change_days if d in training)
    if not all(world.weekend(d) for d in attack):
        assert all(not world.weekend(d) for d in world.dba_change_days if d in attack)


def test_the_seed_chooses_the_start() -> None:
    from datetime import date, timedelta

    starts = [seeded_start(seed, 7, 3) for seed in range(100, 107)]
    assert len({d.weekday() for d in starts}) == 7
    # a Monday start would put both attack days of a 7-day run on the weekend
    assert len({seeded_start(seed, 7, 2).weekday() for seed in range(100, 107)}) == 6
    for days, attack_days in ((7, 2), (2, 1), (10, 3), (7, 1)):
        for seed in range(30):
            start = seeded_start(seed, days, attack_days)
            assert start == seeded_start(seed, days, attack_days)
            training = [start + timedelta(days=d) for d in range(days - attack_days)]
            attack = [start + timedelta(days=d) for d in range(days - attack_days, days)]
            assert any(d.day == 1 for d in training), (seed, start)
            if days >= 7:
                assert any(d.weekday() < 5 for d in attack), (seed, start)
    assert LabConfig(start=date(2026, 3, 30)).first_day() == date(2026, 3, 30)
    assert LabConfig(seed=5).first_day() == seeded_start(5, 7, 2)


@pytest.fixture(scope="module")
def mariadb_lab(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    import os

    from detector.lab.mariadb import mariadb_unavailable_reason

    require_cluster(lab=True)
    reason = mariadb_unavailable_reason()
    if reason is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true but no MariaDB lab: {reason}")
        pytest.skip(reason)
    out = tmp_path_factory.mktemp("mariadb-lab")
    config = LabConfig(seed=7, days=2, attack_days=1, scale=0.1, engine="mariadb")
    return out, run_lab(config, out, command="test")


@pytest.mark.slow
def test_mariadb_lab_parses_and_labels_every_shape(
    mariadb_lab: tuple[Path, dict[str, Any]],
) -> None:
    out, summary = mariadb_lab
    parser = make_adapter("mariadb-audit", location="server_audit.log", timezone="UTC")
    parsed = parser.feed((out / "server_audit.log").read_bytes(), final=True)
    assert parsed.rejects.height == 0, parsed.rejects.head(5).to_dicts()
    events: pl.DataFrame = parsed.events
    assert events.height == summary["counts"]["events"] > 1000
    assert summary["counts"]["adapter_rejects"] == 0
    assert summary["log_outside_simulated_span"] == {"server_audit": 0}
    assert summary["max_clock_drift_s"] <= 2.0
    labels = json.loads((out / "labels.json").read_text())
    assert labels["engine"] == "mariadb"
    found: dict[str, set[str]] = {}
    for s in labels["scenarios"]:
        found.setdefault(s["scenario"], set()).add(s["variant"])
    assert set(found) == SHAPES and found == VARIANTS
    ids = set(events["session_id"].to_list())
    connects: dict[str, str] = {}
    for line in (out / "server_audit.log").read_text().splitlines():
        head = line.split(",", 8)
        if head[6] in ("CONNECT", "FAILED_CONNECT"):
            connects[head[4]] = head[3]
    for s in labels["scenarios"]:
        assert s["sessions"] and set(s["sessions"]) <= set(connects), s["variant"]
        assert {connects[c] for c in s["sessions"]} == set(s["addresses"])
        assert set(s["sessions"]) & ids and s["events"] > 0
        assert s["start"] >= summary["attack_dates"][0]
    # the app's statements carry literals (no prepared statements), the backup is a dump
    app = events.filter(pl.col("db_user") == "app_api")["statement_text"].drop_nulls()
    assert app.str.contains(r"client_id = \d+").any() and not app.str.contains(r"\$1").any()
    dumps = events.filter((pl.col("db_user") == "backup") & (pl.col("action") == "copy"))
    assert dumps.height >= 5
    assert events["rows_returned"].is_null().all()

"""The published baseline rules: each fires on its case and not on the near miss, learns only
before the cutoff, groups like incidents, and is scored by evaluate() unchanged."""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from detector import baselines
from detector.evaluation import evaluate
from detector.testing import make_events

CUTOFF = datetime(2026, 1, 10, tzinfo=UTC)
DAY = timedelta(days=1)


def at(day: int, hour: int = 10, minute: int = 0, second: int = 0) -> datetime:
    """A time ``day`` days after the cutoff's day (negative: in the training window)."""
    return CUTOFF + day * DAY + timedelta(hours=hour, minutes=minute, seconds=second)


def events(rows: list[Mapping[str, Any]]) -> pl.DataFrame:
    return make_events(rows)


def rule(frame: pl.DataFrame, name: str, cutoff: datetime = CUTOFF) -> list[dict[str, Any]]:
    return baselines.run(frame, cutoff)[name]


def read(t: datetime, rows: int, **more: Any) -> dict[str, Any]:
    return {
        "event_time": t,
        "db_user": "app",
        "client_ip": "10.0.0.1",
        "session_id": "s1",
        "db_name": "shop",
        "rows_returned": rows,
        **more,
    }


# ---------------------------------------------------------------------------- volume_z_per_database
def shop_history(users: str = "app") -> list[dict[str, Any]]:
    """40 training reads of db shop alternating 400 and 600 rows: mean 500, std 101.3."""
    return [read(at(-3, 9, minute=i), 400 if i % 2 else 600, db_user=users) for i in range(40)]


def test_volume_z_fires_above_z3_and_500_rows_only() -> None:
    frame = events(
        [
            *shop_history(),
            read(at(0, 12), 900),  # z = 3.95
            read(at(0, 14), 700, client_ip="10.0.0.2"),  # z = 1.97: near miss
        ]
    )
    groups = rule(frame, "volume_z_per_database")
    assert [(g["addresses"], g["rows_read"]) for g in groups] == [(["10.0.0.1"], 900)]


def test_volume_z_needs_more_than_500_rows() -> None:
    # a quiet history (mean 10, std 1): 400 rows is z 390 and still below the row floor
    history = [read(at(-2, 9, minute=i), 9 + i % 3) for i in range(40)]
    frame = events([*history, read(at(0, 12), 400), read(at(0, 13, 40), 501)])
    groups = rule(frame, "volume_z_per_database")
    assert [g["rows_read"] for g in groups] == [501]


def test_volume_z_is_per_database_with_fallback_to_all() -> None:
    tiny = [read(at(-2, 8, minute=i), 1000, db_name="tiny") for i in range(3)]
    big = [
        read(at(-2, 9, minute=i), 20_000 + 1000 * (i % 3), db_name="warehouse") for i in range(40)
    ]
    frame = events(
        [
            *shop_history(),
            *big,
            *tiny,
            read(at(0, 12), 2000, client_ip="10.0.0.2"),  # shop: z 14.8
            read(at(0, 12), 2000, db_name="warehouse", client_ip="10.0.0.3"),  # z -22
            # unknown database: the distribution of all (mean 10600, std 10300) -> silent
            read(at(0, 12), 2000, db_name="new_db", client_ip="10.0.0.4"),
            # three training events are too few for a database of its own: all again
            read(at(0, 12), 2000, db_name="tiny", client_ip="10.0.0.6"),
            # db_instance stands in for a null db_name
            read(at(0, 12), 2000, db_name=None, db_instance="warehouse", client_ip="10.0.0.5"),
        ]
    )
    groups = rule(frame, "volume_z_per_database")
    assert [g["addresses"] for g in groups] == [["10.0.0.2"]]


def test_volume_z_is_silent_without_history() -> None:
    frame = events([read(at(0, 12), 1_000_000)])
    assert rule(frame, "volume_z_per_database") == []


# ---------------------------------------------------------------------------- copy_to
def test_copy_to_fires_on_copy_out_not_copy_in() -> None:
    frame = events(
        [
            read(
                at(0, 1),
                100,
                action="copy",
                command="COPY",
                statement_text="COPY public.accounts TO STDOUT",
                client_ip="10.0.0.1",
            ),
            read(
                at(0, 2),
                100,
                action="read",
                command="COPY",
                statement_text="copy (select * from public.clients) to stdout with csv",
                client_ip="10.0.0.2",
            ),
            read(
                at(0, 3),
                None,
                action="write",
                command="COPY",
                statement_text="COPY public.accounts (id, email) FROM STDIN",
                client_ip="10.0.0.3",
            ),
            read(
                at(0, 4),
                None,
                action="copy",
                command="COPY",
                statement_text="COPY public.accounts FROM '/tmp/a.csv'",
                client_ip="10.0.0.4",
            ),
            read(
                at(0, 5),
                100,
                action="read",
                command="SELECT",
                statement_text="SELECT 'copy to stdout'",
                client_ip="10.0.0.5",
            ),
            read(
                at(-1, 5),
                100,
                action="copy",
                command="COPY",
                statement_text="COPY public.accounts TO STDOUT",
                client_ip="10.0.0.6",
            ),
        ]
    )
    groups = rule(frame, "copy_to")
    assert [g["addresses"] for g in groups] == [["10.0.0.1"], ["10.0.0.2"]]


# ---------------------------------------------------------------------------- new_login_address
def login(t: datetime, user: str, address: str, session: str, **more: Any) -> dict[str, Any]:
    return {
        "event_time": t,
        "db_user": user,
        "action": "login",
        "command": None,
        "client_ip": address,
        "session_id": session,
        "success": True,
        **more,
    }


def test_new_login_address_fires_once_per_new_address() -> None:
    frame = events(
        [
            login(at(-2), "ann", "10.0.0.1", "a1"),
            login(at(0, 9), "ann", "10.0.0.1", "a2"),  # known from training
            login(at(0, 10), "ann", "203.0.113.9", "a3"),  # new: fires
            login(at(0, 11), "ann", "203.0.113.9", "a4"),  # seen earlier in the stream
            login(at(0, 12), "ann", "198.51.100.7", "a5", action="login_failed"),
            login(at(0, 13), "ann", "198.51.100.8", "a6", success=False),
            # bob's address is new for ann's rule only if it is new for bob
            login(at(-1), "bob", "203.0.113.10", "b1"),
            login(at(0, 10), "ann", "203.0.113.10", "a7"),
            login(at(0, 10), "bob", "203.0.113.10", "b2"),
        ]
    )
    groups = rule(frame, "new_login_address")
    assert sorted((g["principal"], g["addresses"], g["sessions"]) for g in groups) == [
        ("ann", ["203.0.113.10"], ["a7"]),
        ("ann", ["203.0.113.9"], ["a3"]),
    ]


def test_new_login_address_uses_session_starts_without_logins() -> None:
    frame = events(
        [
            read(at(-1, 9), 1, db_user="etl", session_id="e1", client_ip="10.0.0.1"),
            read(at(0, 9), 1, db_user="etl", session_id="e2", client_ip="10.0.0.1"),
            read(at(0, 10), 1, db_user="etl", session_id="e3", client_ip="192.0.2.5"),
            read(at(0, 10, 5), 1, db_user="etl", session_id="e3", client_ip="192.0.2.5"),
        ]
    )
    groups = rule(frame, "new_login_address")
    assert [(g["addresses"], g["alerts"]) for g in groups] == [(["192.0.2.5"], 1)]


def test_new_login_address_counts_any_earlier_sighting() -> None:
    # ann read from the address before she ever logged in from it: not new at the login
    frame = events(
        [
            login(at(-2), "ann", "10.0.0.1", "a1"),
            read(at(-1), 5, db_user="ann", client_ip="10.0.0.9", session_id="a2"),
            login(at(0), "ann", "10.0.0.9", "a3"),
        ]
    )
    assert rule(frame, "new_login_address") == []


# ---------------------------------------------------------------------------- hourly_volume_z_per_user
def office_hours(days: tuple[int, ...] = (1, 2, 3, 4, 5)) -> list[dict[str, Any]]:
    """carl reads 100 rows in each of hours 9..17 on the training days ``days`` before the
    cutoff: per hour over the active days, mean 37.5 and population std 48.41 (z 3 at 182.7)."""
    return [read(at(-d, h, 30), 100, db_user="carl") for d in days for h in range(9, 18)]


@pytest.mark.parametrize(("rows", "fires"), [(134, False), (183, True), (250, True), (180, False)])
def test_hourly_volume_z_at_three(rows: int, fires: bool) -> None:
    half = rows // 2
    frame = events(
        [
            *office_hours(),
            read(at(1, 20, 5), half, db_user="carl"),
            read(at(1, 20, 25), rows - half, db_user="carl"),
        ]
    )
    groups = rule(frame, "hourly_volume_z_per_user")
    assert bool(groups) is fires
    if fires:
        assert groups[0]["rows_read"] == rows and groups[0]["alerts"] == 2


def test_hourly_volume_counts_idle_hours_of_active_days_only() -> None:
    # the same five active days with three idle days among them: the idle days are not
    # history (counted as zeros they would put z 3 at 150.6 rows and 180 would fire)
    spread = office_hours(days=(1, 2, 6, 7, 8))
    frame = events([*spread, read(at(0, 20), 183, db_user="carl")])
    assert len(rule(frame, "hourly_volume_z_per_user")) == 1
    frame = events([*spread, read(at(0, 20), 180, db_user="carl")])
    assert rule(frame, "hourly_volume_z_per_user") == []


def test_hourly_volume_std_floor_on_a_constant_history() -> None:
    # dora only ever logged in (no rows): mean 0, std 0; the floor of 1 row lets 3 rows pass
    history = [login(at(-d, 9), "dora", "10.0.0.1", f"d{d}") for d in range(1, 4)]
    quiet = events([*history, read(at(0, 9), 3, db_user="dora")])
    assert rule(quiet, "hourly_volume_z_per_user") == []
    loud = events([*history, read(at(0, 9), 4, db_user="dora")])
    assert len(rule(loud, "hourly_volume_z_per_user")) == 1
    # a constant 1000 rows every hour: the 10% floor (100 rows) tolerates up to 1300
    flat = [read(at(-1, h, 10), 1000, db_user="erin") for h in range(24)]
    assert (
        rule(events([*flat, read(at(0, 3), 1300, db_user="erin")]), "hourly_volume_z_per_user")
        == []
    )
    assert (
        len(rule(events([*flat, read(at(0, 3), 1301, db_user="erin")]), "hourly_volume_z_per_user"))
        == 1
    )


def test_hourly_volume_is_silent_for_users_without_history() -> None:
    assert rule(events([read(at(0, 3), 10**6, db_user="new")]), "hourly_volume_z_per_user") == []


# ---------------------------------------------------------------------------- cutoff and groups
def test_cutoff_splits_learning_from_alerting() -> None:
    frame = events(
        [
            *office_hours(),
            read(
                at(0, 9),
                5000,
                db_user="carl",
                action="copy",
                command="COPY",
                statement_text="COPY t TO STDOUT",
            ),
        ]
    )
    # before the cutoff nothing alerts; moved past the copy, it is history
    assert rule(frame, "any_rule", cutoff=at(0, 9, second=1)) == []
    caught = baselines.run(frame, CUTOFF)
    assert {g["rule"] for m in baselines.RULES for g in caught[m]} == {
        "copy_to",
        "hourly_volume_z_per_user",
        "volume_z_per_database",
    }
    # the copy's hour as history makes carl's habit large: a 1000-row hour is then normal
    later = events([*frame.to_dicts(), read(at(1, 9), 1000, db_user="carl")])
    assert rule(later, "hourly_volume_z_per_user", cutoff=at(1)) == []
    assert len(rule(later, "hourly_volume_z_per_user", cutoff=CUTOFF)) == 2


def copy_out(t: datetime, address: str = "10.0.0.1", user: str = "app") -> dict[str, Any]:
    return read(
        t,
        10,
        db_user=user,
        client_ip=address,
        action="copy",
        command="COPY",
        statement_text="COPY t TO STDOUT",
        objects=["public.t"],
    )


def test_groups_split_at_the_gap_and_by_address() -> None:
    frame = events(
        [
            copy_out(at(0, 10, 0)),
            copy_out(at(0, 10, 10)),
            copy_out(at(0, 10, 40)),  # 30 minutes after the last: same group
            copy_out(at(0, 11, 10, 1)),  # 30 min 1 s after: a new group
            copy_out(at(0, 10, 5), address="10.0.0.2"),
        ]
    )
    groups = rule(frame, "copy_to")
    got = [(g["addresses"], g["first_seen"], g["last_seen"], g["alerts"]) for g in groups]
    assert got == [
        (["10.0.0.1"], "2026-01-10T10:00:00.000000Z", "2026-01-10T10:40:00.000000Z", 3),
        (["10.0.0.2"], "2026-01-10T10:05:00.000000Z", "2026-01-10T10:05:00.000000Z", 1),
        (["10.0.0.1"], "2026-01-10T11:10:01.000000Z", "2026-01-10T11:10:01.000000Z", 1),
    ]
    assert all(g["severity"] == "medium" and g["rule"] == "copy_to" for g in groups)
    assert groups[0]["tables"] == ["public.t"] and len({g["id"] for g in groups}) == 3


def test_any_rule_merges_the_rules_per_principal_and_address() -> None:
    frame = events(
        [
            login(at(-1), "app", "10.0.0.1", "s0"),
            login(at(0, 10), "app", "203.0.113.5", "s1"),
            copy_out(at(0, 10, 20), address="203.0.113.5"),
            copy_out(at(0, 12), address="203.0.113.5"),
        ]
    )
    result = baselines.run(frame, CUTOFF)
    assert len(result["new_login_address"]) == 1 and len(result["copy_to"]) == 2
    # app's history is one login without rows, so each 10-row hour also passes the hourly
    # rule's floor: the union has every rule's alerts, merged by principal, address and gap
    assert len(result["hourly_volume_z_per_user"]) == 2
    merged = [(g["rules"], g["alerts"]) for g in result["any_rule"]]
    assert merged == [
        (["copy_to", "hourly_volume_z_per_user", "new_login_address"], 3),
        (["copy_to", "hourly_volume_z_per_user"], 2),
    ]


def test_evaluate_scores_alert_groups_unchanged() -> None:
    frame = events([copy_out(at(0, 10)), copy_out(at(0, 15), address="10.0.0.7", user="bi")])
    groups = rule(frame, "copy_to")
    labels = {
        "start": "2026-01-09T00:00:00Z",
        "end": "2026-01-11T00:00:00Z",
        "scenarios": [
            {
                "scenario": "copy_export",
                "variant": "stdout",
                "principal": "app",
                "addresses": ["10.0.0.1"],
                "sessions": [],
                "start": "2026-01-10T09:59:00Z",
                "end": "2026-01-10T10:01:00Z",
            },
            {
                "scenario": "copy_export",
                "variant": "program",
                "principal": "zed",
                "addresses": ["10.0.0.9"],
                "sessions": [],
                "start": "2026-01-10T09:59:00Z",
                "end": "2026-01-10T10:01:00Z",
            },
        ],
        "benign_heavy": [
            {
                "activity": "bi_export",
                "principal": "bi",
                "windows": [["2026-01-10T14:59:00Z", "2026-01-10T15:01:00Z"]],
            }
        ],
    }
    report = evaluate(groups, labels)
    assert [s.caught for s in report.scenarios] == [True, False]
    assert report.false_per_day == 0.5 and report.benign_heavy == {"bi_export": 1}
    (line,) = baselines.compare({"copy_to": groups}, labels, CUTOFF)
    assert line.variants == (1, 2) and line.shapes == (1, 1) and line.benign_heavy == 1
    # the comparison only scores the stream after the cutoff: one day, not two
    assert line.report.days == 1.0 and line.report.false_per_day == 1.0


# ---------------------------------------------------------------------------- order independence
_USERS = ("app", "etl")
_ADDRESSES = ("10.0.0.1", "203.0.113.9", None)
_ACTIONS = ("read", "read", "login", "copy", "write")

event_rows = st.lists(
    st.fixed_dictionaries(
        {
            # few distinct instants, so that many events share one
            "hour": st.integers(-4, 4),
            "minute": st.sampled_from((0, 0, 20)),
            "db_user": st.sampled_from(_USERS),
            "client_ip": st.sampled_from(_ADDRESSES),
            "session_id": st.sampled_from(("s1", "s2", "s3", None)),
            "action": st.sampled_from(_ACTIONS),
            "rows_returned": st.one_of(st.none(), st.integers(0, 5000)),
            "db_name": st.sampled_from(("shop", None)),
            "client_app": st.sampled_from(("psql", "app", None)),
        }
    ),
    min_size=1,
    max_size=80,
)


@settings(max_examples=150, deadline=None)
@given(rows=event_rows, seed=st.integers(0, 2**32 - 1))
def test_groups_do_not_depend_on_row_order(rows: list[dict[str, Any]], seed: int) -> None:
    frame = events(
        [
            *shop_history(),
            *(
                {
                    **{k: v for k, v in r.items() if k not in ("hour", "minute")},
                    "event_time": CUTOFF + timedelta(hours=r["hour"], minutes=r["minute"]),
                    "command": "COPY" if r["action"] == "copy" else "SELECT",
                    "statement_text": "COPY t TO STDOUT" if r["action"] == "copy" else None,
                }
                for r in rows
            ),
        ]
    )
    shuffled = frame.sample(fraction=1.0, shuffle=True, seed=seed)
    assert baselines.run(shuffled, CUTOFF) == baselines.run(frame, CUTOFF)


# ---------------------------------------------------------------------------- command line
@pytest.fixture(scope="module")
def small_eval(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Three simulated days (attacks on the last two) and a small model trained on them."""
    from detector import pipeline
    from detector.samples import write_sample

    out = tmp_path_factory.mktemp("baselines")
    write_sample(out, days=3, seed=3, start=date(2026, 1, 28), events_per_day=3000)
    model = out / "models" / "small"
    pipeline.train(
        [out / "events.parquet"],
        model,
        pipeline.TrainOptions(n_trees=20, warmup_hours=12.0, exclude_labels=out / "labels.json"),
    )
    return out, model


def test_eval_baselines_table_and_json(small_eval: tuple[Path, Path], tmp_path: Path) -> None:
    from detector.cli import app

    sample, model = small_eval
    runner = CliRunner()
    args = [
        "eval",
        "--model",
        str(model),
        "--input",
        str(sample / "events.parquet"),
        "--labels",
        str(sample / "labels.json"),
    ]
    env = {"COLUMNS": "220", "NO_COLOR": "1"}
    plain = runner.invoke(app, [*args, "--json", str(tmp_path / "plain.json")], env=env)
    assert plain.exit_code == 0, plain.output
    assert "baselines" not in plain.output and "any_rule" not in plain.output
    assert "baselines" not in json.loads((tmp_path / "plain.json").read_text())

    report_path = tmp_path / "with.json"
    cut = ["--baseline-train-until", "2026-01-29T00:00:00Z", "--json", str(report_path)]
    run = runner.invoke(app, [*args, "--baselines", *cut], env=env)
    assert run.exit_code == 0, run.output
    table = run.output[run.output.index("baselines: rules learnt from") :]
    for method in ("small@v1", *baselines.RULES, baselines.ANY_RULE):
        assert method in table
    assert "variants caught" in table and "false alert groups per day" in table
    report = json.loads(report_path.read_text())["baselines"]
    assert report["train_until"] == "2026-01-29T00:00:00+00:00"
    assert report["scored_window"] == {
        "start": "2026-01-29T00:00:00.000000Z",
        "end": "2026-01-31T00:00:00.000000Z",
    }
    methods = report["methods"]
    assert list(methods) == ["small@v1", *baselines.RULES, baselines.ANY_RULE]
    copy = methods["copy_to"]
    assert copy["variants"] == 7 and copy["shapes"] == 7 and copy["variants_caught"] >= 1
    union = methods["any_rule"]
    assert union["variants_caught"] >= max(methods[r]["variants_caught"] for r in baselines.RULES)
    # the rows of the table are the figures of the report
    line = next(ln for ln in table.splitlines() if "copy_to" in ln)
    assert f"{copy['variants_caught']}/7" in line and f"{copy['false_per_day']:.2f}" in line


def test_eval_baselines_default_to_the_models_training_end(
    small_eval: tuple[Path, Path], tmp_path: Path
) -> None:
    from detector.cli import app

    sample, model = small_eval
    report_path = tmp_path / "r.json"
    run = CliRunner().invoke(
        app,
        [
            "eval",
            "--model",
            str(model),
            "--input",
            str(sample / "events.parquet"),
            "--labels",
            str(sample / "labels.json"),
            "--baselines",
            "--json",
            str(report_path),
        ],
        env={"COLUMNS": "220", "NO_COLOR": "1"},
    )
    assert run.exit_code == 0, run.output
    end = baselines.training_end(model)
    assert json.loads(report_path.read_text())["baselines"]["train_until"] == end.isoformat()
    # trained on the whole sample: nothing left to compare on, and the command says so
    assert "nothing to compare" in run.output

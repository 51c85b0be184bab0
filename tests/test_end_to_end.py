"""The quality floor, end to end through the console script: a model trained on the bundled
sample catches every attack scenario in a sample of the same company generated with another
seed after the training window, with at most two false incidents a day and none on the benign
heavy work (backup, billing run, BI refreshes, nightly aggregation)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import exfilwatch

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def eval_sample(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("eval")
    run = exfilwatch(
        "samples",
        "generate",
        "--days",
        "5",
        "--seed",
        "7",
        "--start",
        "2026-01-30",
        "--events-per-day",
        "20000",
        "--out",
        str(out),
    )
    assert run.returncode == 0, run.stderr
    return out


def test_quality_floor(trained_model: Path, eval_sample: Path, tmp_path: Path) -> None:
    report = tmp_path / "eval.json"
    run = exfilwatch(
        "eval",
        "--model",
        str(trained_model),
        "--input",
        str(eval_sample / "events.parquet"),
        "--labels",
        str(eval_sample / "labels.json"),
        "--min-recall",
        "1.0",
        "--max-false-per-day",
        "2.0",
        "--json",
        str(report),
    )
    assert run.returncode == 0, run.stdout + run.stderr
    result = next(iter(json.loads(report.read_text()).values()))
    scenarios = {s["scenario"]: s for s in result["scenarios"]}
    assert len(scenarios) == 7
    missed = [name for name, s in scenarios.items() if not s["caught"]]
    assert missed == []
    assert all(s["time_to_detect_s"] < 3600 for s in scenarios.values())
    # the false incidents here are the attacked principals' next hours (their windows still
    # hold the attack's volume); measured 1.4 a day on this sample
    assert result["false_per_day"] <= 2.0
    assert result["benign_heavy"] == {
        "nightly_backup": 0,
        "billing_run": 0,
        "bi_refresh": 0,
        "nightly_aggregation": 0,
    }


def test_score_writes_explained_redacted_incidents(
    trained_model: Path, eval_sample: Path, tmp_path: Path
) -> None:
    out = tmp_path / "incidents.jsonl"
    run = exfilwatch(
        "score",
        "--model",
        str(trained_model),
        "--input",
        str(eval_sample / "events.jsonl"),
        "--out",
        str(out),
    )
    assert run.returncode == 0, run.stderr
    incidents = [json.loads(line) for line in out.read_text().splitlines()]
    assert incidents, "the attacks in the sample must raise incidents"
    labels = json.loads((eval_sample / "labels.json").read_text())
    dump = next(s for s in labels["scenarios"] if s["scenario"] == "stolen_app_credentials_dump")
    mine = [i for i in incidents if set(i["addresses"]) & set(dump["addresses"])]
    assert mine and mine[0]["principal"] == "app_api"
    assert mine[0]["rows_read"] > 10_000
    assert "new address" in mine[0]["reason"] or "new client" in mine[0]["reason"]
    for inc in incidents:
        assert inc["reason"] and inc["top_features"]
        assert inc["anomaly_score"] > 0 and inc["severity"] in {"low", "medium", "high", "critical"}
        assert inc["first_seen"] <= inc["last_seen"]
        statement = inc["statement"] or ""
        assert "'" not in statement and "@" not in statement, statement  # literals redacted


LAB = Path(__file__).resolve().parents[1] / "sample_logs" / "lab"


def _lab_reading() -> list[str]:
    meta = json.loads((LAB / "lab.json").read_text())
    return ["--log-format", "pgaudit-stderr", "--log-line-prefix", meta["log_line_prefix"]]


def _lab_training_end() -> str:
    labels = json.loads((LAB / "labels.json").read_text())
    return min(s["start"] for s in labels["scenarios"])[:10]


def test_quality_floor_on_a_real_servers_audit_log(tmp_path: Path) -> None:
    """The bundled pgaudit log of a real PostgreSQL 15 (sample_logs/lab): trained on its days
    before the attacks, every one of the seven shapes is caught in at least one variant and at
    least 19 of its 21 variants (matched by session or address; the measured floor, see the
    README), with at most one false incident a day and none on the benign heavy work."""
    model = tmp_path / "models" / "lab"
    log = str(LAB / "postgresql.log")
    run = exfilwatch(
        "train", "--input", log, *_lab_reading(), "--until", _lab_training_end(),
        "--out", str(model), "--false-alerts-per-day", "1",
    )
    assert run.returncode == 0, run.stderr
    report = tmp_path / "eval.json"
    run = exfilwatch(
        "eval", "--model", str(model), "--input", log, *_lab_reading(),
        "--labels", str(LAB / "labels.json"), "--baselines",
        "--min-recall", "0.9", "--max-false-per-day", "1.0", "--json", str(report),
    )
    assert run.returncode == 0, run.stdout + run.stderr
    data = json.loads(report.read_text())
    result = next(v for k, v in data.items() if k != "baselines")
    shapes = {
        "stolen_app_credentials_dump", "aggregate_theft", "slow_pagination", "copy_export",
        "off_hours_insider", "brute_force_then_login", "cross_tenant_fanout",
    }
    assert {s["scenario"] for s in result["scenarios"]} == shapes
    assert {s["scenario"] for s in result["scenarios"] if s["caught"]} == shapes
    caught = [s for s in result["scenarios"] if s["caught"]]
    assert len(result["scenarios"]) == 21 and len(caught) >= 19
    assert sorted(s["time_to_detect_s"] for s in caught)[len(caught) // 2] < 60
    assert result["false_per_day"] <= 1.0
    assert all(n == 0 for n in result["benign_heavy"].values()), result["benign_heavy"]
    # the published rules, scored on the same window, are in the report beside the model
    assert "any_rule" in json.dumps(data["baselines"])

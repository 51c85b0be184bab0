"""The command line through the real console entry point."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import SAMPLE, exfilwatch, small_sample_cli


@pytest.fixture(scope="module")
def small_sample(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("small")
    run = small_sample_cli(out, "--jsonl-compression", "gzip")
    assert "events.parquet" in run.stdout
    return out


def test_generate_is_deterministic(small_sample: Path, tmp_path: Path) -> None:
    again = exfilwatch(
        "samples",
        "generate",
        "--days",
        "3",
        "--seed",
        "3",
        "--start",
        "2026-01-28",
        "--events-per-day",
        "3000",
        "--jsonl-compression",
        "gzip",
        "--out",
        str(tmp_path),
    )
    assert again.returncode == 0
    for name in ("events.parquet", "labels.json"):
        assert (tmp_path / name).read_bytes() == (small_sample / name).read_bytes()


def test_train_versions_promote_and_list(small_sample: Path, tmp_path: Path) -> None:
    model = tmp_path / "models" / "small"
    for expected in ("v1", "v2"):
        run = exfilwatch(
            "train",
            "--input",
            str(small_sample / "events.jsonl.gz"),
            "--out",
            str(model),
            "--warmup-hours",
            "12",
            "--trees",
            "20",
        )
        assert run.returncode == 0, run.stderr
        assert f"small@{expected}" in run.stdout
    assert (model / "current").read_text().strip() == "v1"  # first version only
    run = exfilwatch("models", "promote", "small", "v2", "--root", str(tmp_path / "models"))
    assert run.returncode == 0 and (model / "current").read_text().strip() == "v2"
    listing = exfilwatch("models", "list", str(tmp_path / "models"))
    assert "v1" in listing.stdout and "v2" in listing.stdout and "current" in listing.stdout
    meta = json.loads((model / "v2" / "metadata.json").read_text())
    assert meta["training"]["events"] > 5000 and len(meta["feature_spec_hash"]) == 64


def test_eval_gates_exit_non_zero(small_sample: Path, tmp_path: Path) -> None:
    default = str(SAMPLE.parent / "models" / "default")
    labels = json.loads((small_sample / "labels.json").read_text())
    ghost = {
        **labels["scenarios"][0],
        "scenario": "never_happened",
        "principal": "nobody",
        "principals": ["nobody"],
        "addresses": ["192.0.2.250"],
        "sessions": ["none"],
    }
    with_ghost = tmp_path / "labels.json"
    with_ghost.write_text(json.dumps({**labels, "scenarios": [*labels["scenarios"], ghost]}))
    args = ["eval", "--model", default, "--input", str(small_sample / "events.parquet")]
    failing = exfilwatch(*args, "--labels", str(with_ghost), "--min-recall", "1.0")
    assert failing.returncode == 1
    assert "never_happened" in failing.stdout and "missed" in failing.stdout
    assert "gate not met" in failing.stderr and "recall" in failing.stderr
    passing = exfilwatch(
        *args,
        "--labels",
        str(small_sample / "labels.json"),
        "--min-recall",
        "0",
        "--max-false-per-day",
        "1000",
    )
    assert passing.returncode == 0, passing.stderr
    assert "false incidents per day" in passing.stdout


def test_errors_are_one_line_not_tracebacks(tmp_path: Path) -> None:
    missing = exfilwatch(
        "score",
        "--model",
        "models/default",
        "--input",
        str(tmp_path / "nope.jsonl"),
        "--out",
        str(tmp_path / "o.jsonl"),
    )
    assert missing.returncode == 2
    assert "error:" in missing.stderr and "Traceback" not in missing.stderr
    (tmp_path / "x.csv").write_text("a,b\n")
    unknown = exfilwatch(
        "score",
        "--model",
        "models/default",
        "--input",
        str(tmp_path / "x.csv"),
        "--out",
        str(tmp_path / "o.jsonl"),
    )
    assert unknown.returncode == 2 and "x.csv" in unknown.stderr
    assert "Traceback" not in unknown.stderr


def test_tampered_model_is_refused(tmp_path: Path) -> None:
    import shutil

    model = tmp_path / "default"
    shutil.copytree(SAMPLE.parent / "models" / "default", model)
    with (model / "v1" / "model.npz").open("ab") as fh:
        fh.write(b"x")
    run = exfilwatch(
        "score",
        "--model",
        str(model),
        "--input",
        str(SAMPLE / "events.parquet"),
        "--out",
        str(tmp_path / "o.jsonl"),
    )
    assert run.returncode == 2 and "checksum mismatch" in run.stderr


def test_score_on_training_window_warms_up_fresh(tmp_path: Path) -> None:
    out = tmp_path / "incidents.jsonl"
    run = exfilwatch(
        "score",
        "--model",
        str(SAMPLE.parent / "models" / "default"),
        "--input",
        str(SAMPLE / "events.parquet"),
        "--out",
        str(out),
    )
    assert run.returncode == 0, run.stderr
    assert "warm-up" in run.stdout
    incidents = [json.loads(line) for line in out.read_text().splitlines()]
    labels = json.loads((SAMPLE / "labels.json").read_text())
    warm_end = "2026-01-01T00:01"
    assert all(i["first_seen"] >= warm_end for i in incidents)
    attacked = {a for s in labels["scenarios"] for a in s["addresses"]}
    assert any(set(i["addresses"]) & attacked for i in incidents)


def test_usage_error_exits_2_without_traceback() -> None:
    run = exfilwatch("score", "--bogus")
    assert run.returncode == 2
    assert "No such option" in run.stderr and "Traceback" not in run.stderr

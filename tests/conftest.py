"""Shared fixtures: the bundled sample and a console-script runner."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from tests import test_delivery_support as _support

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "sample_logs"
logging.getLogger("sqlglot").setLevel(logging.ERROR)


@pytest.fixture(scope="session", autouse=True)
def compiled_kernels() -> None:
    """Compile the feature kernel and the forest scorer once, before any test starts a clock:
    a fresh checkout has no compiled cache, and a service test's bounded wait measures the
    service, not the compiler (tens of seconds on a busy two-core machine)."""
    from detector.pipeline import Scorer
    from detector.scoring import artefact
    from detector.testing import make_events

    scorer = Scorer(artefact.load(ROOT / "models" / "default"), continue_state=False)
    scorer.anomalies(make_events([{"db_user": "warm-up", "rows_returned": 1}]))


def exfilwatch(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run the installed console script, as a user would."""
    exe = shutil.which("exfilwatch")
    assert exe is not None, "the exfilwatch console script is not installed (pip install -e .)"
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1"}
    return subprocess.run(
        [exe, *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=600, check=False
    )


def small_sample_cli(out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    """``exfilwatch samples generate`` of a small three-day sample into ``out``."""
    args = ("--days", "3", "--seed", "3", "--start", "2026-01-28", "--events-per-day", "3000")
    run = exfilwatch("samples", "generate", *args, *extra, "--out", str(out))
    assert run.returncode == 0, run.stderr
    return run


@pytest.fixture(scope="session")
def trained_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default model's recipe, trained afresh on the bundled sample."""
    out = tmp_path_factory.mktemp("models") / "default"
    run = exfilwatch(
        "train",
        "--input",
        str(SAMPLE / "events.parquet"),
        "--out",
        str(out),
        "--exclude-labels",
        str(SAMPLE / "labels.json"),
        "--false-alerts-per-day",
        "0.5",
    )
    assert run.returncode == 0, run.stderr
    return out


@pytest.fixture(scope="session")
def live_sample(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two simulated days after the default model's training window, attacks on the second."""
    from tests.service_support import write_live_sample

    return write_live_sample(tmp_path_factory.mktemp("live_sample"))


@pytest.fixture(scope="module")
def pg_url() -> Iterator[str]:
    """A database on the machine's PostgreSQL for the tests of one module."""
    with _support.postgres_database() as url:
        yield url


@pytest.fixture(params=_support.BACKENDS)
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[sa.Engine]:
    """A store's engine on each backend in turn."""
    pg = request.getfixturevalue("pg_url") if request.param == "postgresql" else None
    with _support.store(request.param, pg, tmp_path) as (eng, _url):
        yield eng

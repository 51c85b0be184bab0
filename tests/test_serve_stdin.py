"""`exfilwatch serve --stdin`: lines piped in are journaled, scored, and the service exits when
stdin ends and everything is committed; logs are JSON with query literals redacted."""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import sqlalchemy as sa
import structlog

from detector import logs
from tests.pgcluster import free_port
from tests.service_support import models_copy


@pytest.mark.slow
def test_stdin_lines_are_scored_and_the_service_exits_when_stdin_ends(
    tmp_path: Path, live_sample: Path
) -> None:
    models = models_copy(tmp_path)
    lines = (live_sample / "events.jsonl").read_bytes().splitlines(keepends=True)
    body = b"".join(lines[:5000]) + b"this is not json\n" + b"".join(lines[5000:8000])
    exe = shutil.which("exfilwatch")
    assert exe is not None
    env = {**os.environ, "EXFILWATCH_API__PORT": str(free_port()),
           "EXFILWATCH_MODELS_DIR": str(models), "EXFILWATCH_STATE_DIR": str(tmp_path / "var")}
    started = time.monotonic()
    run = subprocess.run([exe, "serve", "--stdin"], input=body, cwd=tmp_path, env=env,
                         capture_output=True, timeout=300, check=False)
    assert run.returncode == 0, run.stderr[-2000:]
    assert time.monotonic() - started < 300
    events = [json.loads(line) for line in run.stderr.splitlines() if line.startswith(b"{")]
    assert any(e["event"] == "stdin_finished" for e in events)
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'var' / 'exfilwatch.db'}")
    with engine.connect() as conn:
        seen = conn.execute(sa.text("SELECT max(events_seen) FROM snapshots")).scalar_one()
    engine.dispose()
    model_seen = json.loads((models / "default" / "v1" / "state.json").read_text())["events_seen"]
    assert seen - model_seen == 8000  # every good line went through the features once
    quarantined = (tmp_path / "var" / "quarantine" / "rejected.jsonl").read_text()
    assert "malformed_json" in quarantined and quarantined.count("\n") == 1


def test_logs_are_json_lines_with_literals_redacted(capsys: pytest.CaptureFixture[str]) -> None:
    logs.configure("info")
    try:
        structlog.get_logger("t").info("query_seen", statement="SELECT * FROM t WHERE email = 'ann@example.com' AND id = 42")
        logging.getLogger("uvicorn.error").info("library line")
    finally:
        logging.getLogger().handlers[:] = []
        structlog.reset_defaults()
    err = capsys.readouterr().err.strip().splitlines()
    records = [json.loads(line) for line in err]
    assert records[0]["statement"] == "SELECT * FROM t WHERE email = ? AND id = ?"
    assert records[0]["event"] == "query_seen" and records[0]["level"] == "info"
    assert records[1]["event"] == "library line" and "timestamp" in records[1]
    assert "ann@example.com" not in io.StringIO("\n".join(err)).getvalue()

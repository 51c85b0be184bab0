"""The README's first set-up command, as a newcomer runs it: `exfilwatch serve` with no config,
fed the bundled sample through the spool directory, shows the sample's incidents."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import ROOT, SAMPLE
from tests.pgcluster import free_port


def test_readme_commands_are_the_ones_tested() -> None:
    text = (ROOT / "README.md").read_text()
    assert "    pip install -e . && exfilwatch serve\n" in text
    assert "cp sample_logs/events.parquet spool/" in text
    assert "    pip install -e '.[test]' && python -m pytest\n" in text
    ci = (ROOT / ".ci" / "run").read_text()
    assert "python -m pytest" in ci.splitlines()[-1]


@pytest.mark.slow
def test_serve_on_defaults_shows_the_sample_incidents(tmp_path: Path) -> None:
    shutil.copytree(ROOT / "models", tmp_path / "models")
    port = free_port()  # the default 8080 may be taken on a shared machine
    exe = shutil.which("exfilwatch")
    assert exe is not None
    env = {**os.environ, "EXFILWATCH_API__PORT": str(port)}
    with (tmp_path / "serve.log").open("wb") as log:
        proc = subprocess.Popen([exe, "serve"], cwd=tmp_path, env=env, stderr=log,
                                stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "spool").is_dir():
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.1)
        shutil.copy(SAMPLE / "events.parquet", tmp_path / "spool")
        url = f"http://127.0.0.1:{port}/v1/incidents"
        deadline = time.monotonic() + 120
        critical: list[dict[str, object]] = []
        while not critical:
            assert time.monotonic() < deadline, (tmp_path / "serve.log").read_text()[-2000:]
            with contextlib.suppress(httpx.HTTPError):
                critical = httpx.get(url, params={"severity": "critical"}).json()["items"]
            time.sleep(0.5)
        assert (tmp_path / "var" / "exfilwatch.db").exists()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0

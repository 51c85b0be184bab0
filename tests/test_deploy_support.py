"""What the deployment tests share: finding the real tools (Prometheus, Alertmanager, podman),
free loopback ports, polling with deadlines, and a running `exfilwatch serve` subprocess.

A test that needs a tool skips with the reason when the tool is missing, except under CI=true,
where a missing tool is a failure (CI installs them: .ci/run)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest

from tests.pgcluster import free_port

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
T = TypeVar("T")


def need_tool(name: str, *alternatives: str, install: str) -> str:
    """The path of the first of ``name, *alternatives`` on PATH (or in /usr/sbin); skip the
    test when none is there, fail under CI=true."""
    for candidate in (name, *alternatives):
        found = shutil.which(candidate) or shutil.which(candidate, path="/usr/sbin:/sbin")
        if found:
            return found
    reason = f"{name} is not installed ({install})"
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true and {reason}")
    pytest.skip(reason)


def wait_for(probe: Callable[[], T | None], timeout: float, what: str, every: float = 0.2) -> T:
    """Call ``probe`` until it returns something true (not None, False or empty); fail after
    ``timeout`` seconds, naming ``what`` was awaited."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = probe()
        except (httpx.HTTPError, OSError, ValueError) as exc:
            last = exc
        else:
            if last:
                return last
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}; last: {last!r}")


def get_json(url: str, **params: Any) -> Any:
    response = httpx.get(url, params=params, timeout=5)
    response.raise_for_status()
    return response.json()


@contextmanager
def process(args: list[str], log: Path, env: dict[str, str] | None = None,
            cwd: Path | None = None) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``args`` with output in ``log``; SIGTERM (then SIGKILL) at the end."""
    with log.open("ab") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, cwd=cwd,
                                env={**os.environ, **(env or {})})
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


def log_tail(log: Path, chars: int = 3000) -> str:
    return log.read_text(errors="replace")[-chars:] if log.exists() else "(no log)"


class Serve:
    """A running `exfilwatch serve` on a loopback port, its spool directory and log."""

    def __init__(self, port: int, spool: Path, log: Path, proc: subprocess.Popen[bytes]) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.spool = spool
        self.log = log
        self.proc = proc

    def drop(self, source: Path) -> None:
        """Put a file into the spool directory atomically (copy aside, then rename)."""
        tmp = self.spool.parent / f".{source.name}.part"
        shutil.copyfile(source, tmp)
        os.replace(tmp, self.spool / source.name)

    def incidents(self, **params: Any) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = get_json(f"{self.url}/v1/incidents", limit=500,
                                               **params)["items"]
        return items


@contextmanager
def serve(tmp: Path, extra_toml: str = "", env: dict[str, str] | None = None) -> Iterator[Serve]:
    """`exfilwatch serve` with a private copy of the shipped models, state and spool under
    ``tmp``, ready (``/readyz`` 200) when this yields."""
    exe = shutil.which("exfilwatch")
    assert exe is not None, "the exfilwatch console script is not installed (pip install -e .)"
    models = tmp / "models"
    if not models.exists():
        shutil.copytree(ROOT / "models", models)
    spool = tmp / "spool"
    spool.mkdir(exist_ok=True)
    port = free_port()
    cfg = tmp / "exfilwatch.toml"
    cfg.write_text(
        f"""
state_dir = "{tmp / "var"}"
models_dir = "{models}"

[api]
host = "127.0.0.1"
port = {port}

[[sources]]
name = "spool"
kind = "directory"
path = "{spool}"

[pipeline]
batch_delay_s = 0.05
poll_s = 0.05
{extra_toml}
"""
    )
    log = tmp / "serve.log"
    with process([exe, "serve", "--config", str(cfg)], log, env=env) as proc:
        running = Serve(port, spool, log, proc)

        def ready() -> bool:
            assert proc.poll() is None, f"serve exited {proc.returncode}: {log_tail(log)}"
            return httpx.get(f"{running.url}/readyz", timeout=2).status_code == 200

        wait_for(ready, 90, "exfilwatch serve to be ready")
        yield running

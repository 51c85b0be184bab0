"""The Dockerfile, built and run with podman on the local Debian 12 base image (no image registry
is reachable here): the image runs as a non-root user on a read-only root filesystem with its
state on the one volume, scores the bundled sample dropped into the spool volume and posted over
HTTP, answers /metrics, passes its HEALTHCHECK, and drains cleanly on SIGTERM; given no API
token, it refuses to start.

Needs podman and runc, and the base image that ../shared/tools/container-base.sh makes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest

from tests.test_deploy_support import ROOT, free_port, need_tool, wait_for

BASE_IMAGE = os.environ.get("EXFILWATCH_TEST_BASE_IMAGE", "localhost/debian:bookworm")
TAG = "localhost/exfilwatch:test"
CONTAINERS_CONF = Path("/etc/containers/exfilwatch-containers.conf")
RUNC = Path("/usr/sbin/runc")
UID = 10001


def _podman() -> list[str]:
    podman = need_tool("podman", install="../shared/tools/container-base.sh")
    if not RUNC.exists():
        need_tool("runc", install="../shared/tools/container-base.sh")
    return [podman, "--runtime", str(RUNC)]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    if CONTAINERS_CONF.exists():
        env.setdefault("CONTAINERS_CONF", str(CONTAINERS_CONF))
    return env


def _run(args: list[str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, check=False, timeout=timeout,
                          env=_env())


def _pip_setting(env_name: str, key: str) -> str:
    """The host's pip setting (environment first, then pip's config), passed into the build."""
    if os.environ.get(env_name):
        return os.environ[env_name]
    run = subprocess.run(["python", "-m", "pip", "config", "get", key], capture_output=True,
                         text=True, check=False, timeout=60)
    return run.stdout.strip() if run.returncode == 0 else ""


def _build(podman: list[str]) -> None:
    args = [*podman, "build", "--format", "docker", "--network=host",
            "--build-arg", f"BASE_IMAGE={BASE_IMAGE}", "-t", TAG]
    index = _pip_setting("PIP_INDEX_URL", "global.index-url")
    if index:
        args += ["--build-arg", f"PIP_INDEX={index}"]
    cert = _pip_setting("PIP_CERT", "global.cert")
    if cert and Path(cert).is_file():
        args += ["--secret", f"id=pip_cert,src={cert}"]
    run = _run([*args, str(ROOT)], timeout=1200)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]


@pytest.mark.slow
def test_image_builds_runs_non_root_and_scores_the_sample(tmp_path: Path) -> None:
    podman = _podman()
    if _run([*podman, "image", "exists", BASE_IMAGE]).returncode != 0:
        reason = f"base image {BASE_IMAGE} is missing (../shared/tools/container-base.sh)"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    _build(podman)
    inspect = json.loads(_run([*podman, "image", "inspect", TAG]).stdout)[0]
    cfg = inspect["Config"]
    assert cfg["User"] == f"{UID}:{UID}"
    assert cfg["Entrypoint"] == ["exfilwatch"]
    assert "/var/lib/exfilwatch" in cfg["Volumes"]
    assert inspect["Healthcheck"]["Test"][0] == "CMD"
    print(f"image size: {inspect['Size'] / 1e6:.0f} MB")  # reported in the test log (-s)

    # as shipped (its config listens on 0.0.0.0) and given no token, it refuses to start; in a
    # network namespace of its own (--network=none), so even a bind would reach nothing
    bare = _run([*podman, "run", "--rm", "--network=none", "--read-only", "--tmpfs", "/tmp", TAG],
                timeout=120)
    assert bare.returncode == 2, bare.stdout + bare.stderr
    assert bare.stderr.strip().splitlines()[-1] == (
        "error: refusing to listen on 0.0.0.0 with no api.token or api.token_file")

    state = tmp_path / "state"
    (state / "spool").mkdir(parents=True)
    for path in (state, state / "spool"):  # the image's user owns its volume
        if os.geteuid() == 0:
            shutil.chown(path, UID, UID)
        else:
            path.chmod(0o777)
    port = free_port()
    name = f"exfilwatch-test-{port}"
    run = _run([*podman, "run", "-d", "--name", name, "--network=host", "--read-only",
                "--tmpfs", "/tmp", "-e", f"EXFILWATCH_API__PORT={port}",
                "-e", "EXFILWATCH_API__HOST=127.0.0.1", "-e", "EXFILWATCH_API__TOKEN=s3cret",
                "-v", f"{state}:/var/lib/exfilwatch", TAG])
    assert run.returncode == 0, run.stderr
    url = f"http://127.0.0.1:{port}"
    try:
        def ready() -> bool:
            state_now = _run([*podman, "inspect", "--format", "{{.State.Status}}", name]).stdout
            assert "exited" not in state_now, _run([*podman, "logs", name]).stderr[-3000:]
            return httpx.get(f"{url}/readyz", timeout=2).status_code == 200

        wait_for(ready, 120, "the container to be ready")
        assert _run([*podman, "exec", name, "id", "-u"]).stdout.strip() == str(UID)
        health = _run([*podman, "healthcheck", "run", name])
        assert health.returncode == 0, health.stdout + health.stderr

        # through the spool volume
        sample = ROOT / "sample_logs" / "events.parquet"
        part = state / ".events.parquet.part"
        shutil.copyfile(sample, part)
        if os.geteuid() == 0:
            shutil.chown(part, UID, UID)
        os.replace(part, state / "spool" / "events.parquet")
        incidents = wait_for(
            lambda: httpx.get(f"{url}/v1/incidents", timeout=5).json()["items"], 180,
            "incidents from the spooled sample")
        assert {"principal", "severity", "reason"} <= incidents[0].keys()
        assert (state / "exfilwatch.db").exists()  # the store is on the volume

        # through HTTP (writes need the token)
        body = sample.read_bytes()
        headers = {"content-type": "application/vnd.apache.parquet"}
        assert httpx.post(f"{url}/v1/events", content=body, headers=headers,
                          timeout=60).status_code == 401
        posted = httpx.post(f"{url}/v1/events", content=body, timeout=120,
                            headers={**headers, "authorization": "Bearer s3cret"})
        assert posted.status_code == 202, posted.text
        assert posted.json()["accepted"] > 200_000

        def http_ingested() -> bool:
            text = httpx.get(f"{url}/metrics", timeout=5).text
            return 'exfilwatch_events_ingested_total{format="parquet",source="http"}' in text

        wait_for(http_ingested, 60, "HTTP events counted in /metrics")
        metrics = httpx.get(f"{url}/metrics", timeout=5).text
        assert 'exfilwatch_model_info{feature_spec=' in metrics
        assert "exfilwatch_incidents_opened_total" in metrics

        stop = _run([*podman, "stop", "--time", "60", name], timeout=90)
        assert stop.returncode == 0, stop.stderr
        code = _run([*podman, "inspect", "--format", "{{.State.ExitCode}}", name]).stdout
        assert code.strip() == "0", _run([*podman, "logs", name]).stderr[-3000:]
        logs = _run([*podman, "logs", name]).stderr
        assert "service_stopped" in logs
    finally:
        _run([*podman, "rm", "-f", name])

"""docs/operations.md and deploy/compose: the configuration reference is exactly what
tools/gen_config_reference.py generates from the settings model, and the compose trial's files fit
together (its configs pass the real tools)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from detector import config
from tests.test_deploy_support import DEPLOY, ROOT, need_tool

GENERATOR = ROOT / "tools" / "gen_config_reference.py"
COMPOSE = DEPLOY / "compose"


def _generate(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(GENERATOR), *args], capture_output=True,
                          text=True, check=False, timeout=120, cwd=ROOT)


def test_config_reference_is_generated_from_the_settings_model() -> None:
    run = _generate("--check")
    assert run.returncode == 0, run.stderr
    doc = (ROOT / "docs" / "operations.md").read_text()
    # every settings key is documented, nested ones with their environment name
    for name, field in config.Settings.model_fields.items():
        assert f"`{name}`" in doc or f"`[{name}]`" in doc or f"`[[{name}]]`" in doc
        model = field.annotation
        if isinstance(model, type) and issubclass(model, config.BaseModel):
            for sub in model.model_fields:
                assert f"| `{name}.{sub}` |" in doc
                assert f"`EXFILWATCH_{name.upper()}__{sub.upper()}`" in doc
    for sink in (config.WebhookSink, config.SlackSink, config.AlertmanagerSink):
        assert f'#### kind = "{sink.model_fields["kind"].default}"' in doc


def test_the_check_notices_a_stale_reference(tmp_path: Path) -> None:
    """The drift check can fail: a hand edit inside the generated section is caught."""
    copy = tmp_path / "repo"
    shutil.copytree(ROOT / "tools", copy / "tools")
    (copy / "docs").mkdir()
    doc = (ROOT / "docs" / "operations.md").read_text()
    (copy / "docs" / "operations.md").write_text(
        doc.replace("| `api.port` | integer", "| `api.port` | string"))
    run = subprocess.run([sys.executable, str(copy / "tools" / GENERATOR.name), "--check"],
                         capture_output=True, text=True, check=False, timeout=120, cwd=ROOT,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert run.returncode == 1, run.stdout + run.stderr
    assert "stale" in run.stderr


def test_compose_mounts_exist_and_configs_are_valid(tmp_path: Path) -> None:
    compose = yaml.safe_load((COMPOSE / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"exfilwatch", "prometheus", "alertmanager", "grafana"}
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (COMPOSE / source).exists(), f"{name}: {source} does not exist"
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:"), f"{name} publishes beyond loopback: {port}"
    assert (COMPOSE / services["exfilwatch"]["build"]["context"] / "Dockerfile").exists()
    settings = config.load(COMPOSE / "exfilwatch.toml")
    assert [s.kind for s in settings.sinks] == ["alertmanager"]
    assert settings.sinks[0].url == "http://alertmanager:9093"
    assert settings.api.host == "0.0.0.0" and settings.api.port == 8080
    # both tokens come from the user's environment; compose stops when one is unset (`:?`),
    # so the trial never runs on a default token
    env = services["exfilwatch"]["environment"]
    for name, variable in (("EXFILWATCH_API__TOKEN", "EXFILWATCH_TOKEN"),
                           ("EXFILWATCH_API__READ_TOKEN", "EXFILWATCH_READ_TOKEN")):
        assert env[name].startswith("${" + variable + ":?"), env[name]
    assert settings.api.token is None and settings.api.token_file is None

    prom = yaml.safe_load((COMPOSE / "prometheus.yml").read_text())
    assert prom["scrape_configs"][0]["job_name"] == "exfilwatch"  # what the rules expect
    promtool = need_tool("promtool", install="apt-get install prometheus")
    shutil.copy(COMPOSE / "prometheus.yml", tmp_path / "prometheus.yml")
    shutil.copy(DEPLOY / "prometheus" / "exfilwatch-rules.yml", tmp_path)
    run = subprocess.run([promtool, "check", "config", str(tmp_path / "prometheus.yml")],
                         capture_output=True, text=True, check=False, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
    rules = yaml.safe_load((DEPLOY / "prometheus" / "exfilwatch-rules.yml").read_text())
    count = sum(len(g["rules"]) for g in rules["groups"])
    assert f"SUCCESS: {count} rules found" in run.stdout

"""deploy/alertmanager against a real Alertmanager (Debian's prometheus-alertmanager, 0.25) on
loopback: the config passes amtool, routes incidents by severity, and an incident that
exfilwatch pushes arrives with its labels, is notified to the routed receiver, and resolves when
the incident is resolved through the API."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from detector.sinks.receiver import WebhookReceiver
from tests.test_deploy_support import (
    DEPLOY,
    ROOT,
    free_port,
    get_json,
    log_tail,
    need_tool,
    process,
    serve,
    wait_for,
)

CONFIG = DEPLOY / "alertmanager" / "alertmanager.yml"
INSTALL = "apt-get install prometheus-alertmanager"


def _amtool() -> str:
    return need_tool("amtool", install=INSTALL)


def test_amtool_accepts_the_config() -> None:
    run = subprocess.run([_amtool(), "check-config", str(CONFIG)], capture_output=True,
                         text=True, check=False, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr


@pytest.mark.parametrize(
    ("labels", "receiver"),
    [
        (["alertname=ExfilwatchIncident", "service=exfilwatch", "severity=critical"],
         "security-pager"),
        (["alertname=ExfilwatchIncident", "service=exfilwatch", "severity=high"], "security-soc"),
        (["alertname=ExfilwatchIncident", "service=exfilwatch", "severity=medium"],
         "security-tickets"),
        (["alertname=ExfilwatchDown", "severity=critical"], "ops-pager"),
        (["alertname=ExfilwatchModelStale", "severity=info"], "ops-tickets"),
    ],
)
def test_routes(labels: list[str], receiver: str) -> None:
    run = subprocess.run(
        [_amtool(), "config", "routes", "test", f"--config.file={CONFIG}", *labels],
        capture_output=True, text=True, check=False, timeout=60,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == [receiver]


def _loopback_config(receiver_url: str, out: Path) -> Path:
    """The shipped config with every receiver pointed at the loopback receiver (its name in the
    path) and the incident route's waits shortened for a test."""
    config: dict[str, Any] = yaml.safe_load(CONFIG.read_text())
    for receiver in config["receivers"]:
        for hook in receiver["webhook_configs"]:
            hook["url"] = f"{receiver_url}/{receiver['name']}"
    incidents = config["route"]["routes"][0]
    incidents.update(group_wait="1s", group_interval="1s")
    out.write_text(yaml.safe_dump(config))
    return out


def _notifications(receiver: WebhookReceiver, incident_id: str) -> list[tuple[str, str]]:
    """(receiver path, alert status) for each notification about ``incident_id``."""
    out = []
    for request in receiver.requests():
        for alert in request.json().get("alerts", []):
            if alert["labels"].get("incident_id") == incident_id:
                out.append((request.path.strip("/"), alert["status"]))
    return out


@pytest.mark.slow
def test_an_incident_arrives_with_its_labels_and_resolves(tmp_path: Path) -> None:
    alertmanager = need_tool("prometheus-alertmanager", "alertmanager", install=INSTALL)
    with WebhookReceiver() as hooks:
        port = free_port()
        am = f"http://127.0.0.1:{port}"
        config = _loopback_config(hooks.url, tmp_path / "alertmanager.yml")
        log = tmp_path / "alertmanager.log"
        with process([alertmanager, f"--config.file={config}",
                      f"--storage.path={tmp_path / 'am-data'}",
                      f"--web.listen-address=127.0.0.1:{port}",
                      "--cluster.listen-address="], log):
            status = wait_for(lambda: get_json(f"{am}/api/v2/status"), 60,
                              f"Alertmanager to start ({log_tail(log, 500)})")
            assert status["versionInfo"]["version"].startswith("0.")
            with serve(tmp_path, f"""
[[sinks]]
name = "alertmanager"
kind = "alertmanager"
url = "{am}"
interval_s = 1.0
timeout_s = 2.0

[incidents]
resolve_after_s = 315360000.0
""") as svc:
                svc.drop(ROOT / "sample_logs" / "events.parquet")
                critical = wait_for(lambda: svc.incidents(severity="critical"), 120,
                                    "a critical incident from the sample")
                incident = critical[0]
                ident = incident["id"]

                def active() -> dict[str, Any] | None:
                    alerts = get_json(f"{am}/api/v2/alerts",
                                      filter=f'incident_id="{ident}"')
                    return alerts[0] if alerts else None

                alert = wait_for(active, 60, f"incident {ident} in Alertmanager")
                assert alert["labels"] == {
                    "alertname": "ExfilwatchIncident",
                    "severity": "critical",
                    "principal": incident["principal"],
                    "incident_id": ident,
                    "service": "exfilwatch",
                }
                assert alert["status"]["state"] == "active"
                assert [r["name"] for r in alert["receivers"]] == ["security-pager"]
                assert alert["annotations"]["summary"] == incident["reason"]
                wait_for(lambda: ("security-pager", "firing") in _notifications(hooks, ident),
                         60, "the firing notification to security-pager")
                # incidents of one principal are grouped into one notification group
                groups = get_json(f"{am}/api/v2/alerts/groups")
                mine = [g for g in groups
                        if any(a["labels"]["incident_id"] == ident for a in g["alerts"])]
                assert len(mine) == 1
                assert mine[0]["labels"] == {"alertname": "ExfilwatchIncident",
                                             "principal": incident["principal"]}

                resolved = httpx.post(f"{svc.url}/v1/incidents/{ident}/resolve",
                                      json={"comment": "contained", "by": "test"}, timeout=10)
                assert resolved.status_code == 200, resolved.text
                assert resolved.json()["status"] == "resolved"
                wait_for(lambda: active() is None, 60, f"incident {ident} to resolve")
                wait_for(lambda: ("security-pager", "resolved") in _notifications(hooks, ident),
                         60, "the resolved notification to security-pager")
                # the other incidents are still firing
                others = get_json(f"{am}/api/v2/alerts", filter='alertname="ExfilwatchIncident"')
                assert others and all(a["labels"]["incident_id"] != ident for a in others)

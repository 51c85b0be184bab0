"""deploy/prometheus and deploy/grafana against the real tools: promtool checks and unit-tests the
rules; a real Prometheus on loopback scrapes a running `exfilwatch serve` fed the bundled sample,
loads the rules, and answers every dashboard panel's query with data."""

from __future__ import annotations

import json
import math
import re
import subprocess
import time
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

RULES = DEPLOY / "prometheus" / "exfilwatch-rules.yml"
RULE_TESTS = DEPLOY / "prometheus" / "tests" / "exfilwatch-rules.test.yml"
PROMETHEUS_RULE = DEPLOY / "kubernetes" / "prometheusrule.yaml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "exfilwatch.json"
SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
INSTALL = "apt-get install prometheus"


def _promtool() -> str:
    return need_tool("promtool", install=INSTALL)


def test_promtool_checks_the_rules() -> None:
    run = subprocess.run([_promtool(), "check", "rules", str(RULES)], capture_output=True,
                         text=True, check=False, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "SUCCESS" in run.stdout


def test_every_alert_has_a_promtool_unit_test_and_they_pass() -> None:
    rules = yaml.safe_load(RULES.read_text())
    alerts = {r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r}
    tests = yaml.safe_load(RULE_TESTS.read_text())
    firing = {
        case["alertname"]
        for group in tests["tests"]
        for case in group.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    assert alerts == firing, f"alerts without a firing test: {sorted(alerts - firing)}"
    run = subprocess.run([_promtool(), "test", "rules", RULE_TESTS.name], cwd=RULE_TESTS.parent,
                         capture_output=True, text=True, check=False, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "SUCCESS" in run.stdout


def test_every_alert_links_its_runbook_section() -> None:
    ops = (ROOT / "docs" / "operations.md").read_text()
    anchors = {
        re.sub(r"[^a-z0-9 -]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
        for line in ops.splitlines()
        if line.startswith("#")
    }
    rules = yaml.safe_load(RULES.read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            if "alert" not in rule:
                continue
            runbook = rule["annotations"]["runbook"]
            assert runbook == f"docs/operations.md#{rule['alert'].lower()}"
            assert runbook.split("#")[1] in anchors, f"no section {runbook} in docs/operations.md"
            assert rule["labels"]["severity"] in {"critical", "warning", "info"}


def test_the_prometheusrule_carries_the_same_groups() -> None:
    plain = yaml.safe_load(RULES.read_text())
    crd = yaml.safe_load(PROMETHEUS_RULE.read_text())
    assert crd["apiVersion"] == "monitoring.coreos.com/v1"
    assert crd["kind"] == "PrometheusRule"
    assert crd["spec"]["groups"] == plain["groups"]


# -- the dashboard ---------------------------------------------------------------------------


def _dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def _panels(dash: dict[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for panel in dash["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))
    return [p for p in out if p["type"] != "row"]


def test_dashboard_is_provisionable_and_picks_its_datasource_by_variable() -> None:
    text = DASHBOARD.read_text()
    dash = _dashboard()
    assert dash["uid"] == "exfilwatch-overview"
    assert "__inputs" not in dash and "${DS_" not in text
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    panels = _panels(dash)
    assert len({p["id"] for p in panels}) == len(panels)
    for panel in panels:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert 'job=~"$job"' in target["expr"] and 'instance=~"$instance"' in target["expr"]
    titles = " | ".join(p["title"] for p in panels)
    for wanted in ("Ingest rate by source", "Rejected records by reason", "End-to-end lag",
                   "Batch latency", "Incidents opened by severity", "Alert delivery outcomes",
                   "Outbox depth", "Model version"):
        assert wanted in titles
    provider = yaml.safe_load(
        (DEPLOY / "grafana" / "provisioning" / "dashboards" / "exfilwatch.yaml").read_text()
    )
    assert provider["providers"][0]["type"] == "file"


def _expr(expr: str, rate_interval: str) -> str:
    """A panel's query as Grafana would send it, with every variable at "All"."""
    return (expr.replace("$__rate_interval", rate_interval)
            .replace('"$job"', '".+"').replace('"$instance"', '".+"'))


def _has_data(prom: str, expr: str, start: float) -> list[dict[str, Any]] | None:
    """The series of a range query from ``start`` to now with at least one finite value."""
    result = get_json(f"{prom}/api/v1/query_range", query=expr, start=start, end=time.time(),
                      step="1s")
    assert result["status"] == "success", result
    series = [s for s in result["data"]["result"]
              if any(math.isfinite(float(v)) for _, v in s["values"])]
    return series or None


def _write_bad_records(path: Path) -> None:
    path.write_text(
        "this is not json\n"
        '{"event_time": "yesterday", "db_user": "app_api", "action": "read", '
        '"source_format": "canonical"}\n'
    )


@pytest.mark.slow
def test_every_dashboard_query_returns_data_from_a_real_prometheus(tmp_path: Path) -> None:
    prometheus = need_tool("prometheus", install=INSTALL)
    with WebhookReceiver(secrets=[SECRET]) as receiver, serve(
        tmp_path,
        f"""
[[sinks]]
name = "soc"
kind = "webhook"
url = "{receiver.url}/hook"
secret = "{SECRET}"
timeout_s = 2.0
""",
    ) as svc:
        prom_port = free_port()
        prom = f"http://127.0.0.1:{prom_port}"
        config = tmp_path / "prometheus.yml"
        config.write_text(yaml.safe_dump({
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(RULES)],
            "scrape_configs": [{
                "job_name": "exfilwatch",
                "static_configs": [{"targets": [f"127.0.0.1:{svc.port}"]}],
            }],
        }))
        log = tmp_path / "prometheus.log"
        with process([prometheus, f"--config.file={config}",
                      f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                      f"--web.listen-address=127.0.0.1:{prom_port}"], log):

            def target_up() -> bool:
                res = get_json(f"{prom}/api/v1/query", query='up{job="exfilwatch"} == 1')
                return bool(res["data"]["result"])

            wait_for(target_up, 60, f"Prometheus to scrape exfilwatch ({log_tail(log, 500)})")
            start = time.time() - 5
            svc.drop(ROOT / "sample_logs" / "events.parquet")
            _write_bad_records(svc.spool / "broken.jsonl")
            wait_for(lambda: len(svc.incidents()) >= 5, 120, "incidents from the sample")
            wait_for(lambda: len(receiver.successes()) >= 5, 60, "webhook deliveries")

            dash = _dashboard()
            for variable in dash["templating"]["list"][1:]:
                metric = re.search(r"label_values\((\w+)", variable["definition"])
                assert metric is not None
                values = get_json(f"{prom}/api/v1/label/{variable['name']}/values",
                                  **{"match[]": metric.group(1)})["data"]
                assert values, f"variable {variable['name']} has no values"

            missing = []
            for panel in _panels(dash):
                for target in panel["targets"]:
                    expr = _expr(target["expr"], "5s")
                    try:
                        wait_for(lambda e=expr: _has_data(prom, e, start), 30, expr)
                    except AssertionError:
                        missing.append(f"{panel['title']}: {expr}")
            assert not missing, "panels without data:\n" + "\n".join(missing)

            # the rules load and evaluate in a real Prometheus
            def evaluated() -> list[dict[str, Any]] | None:
                groups = get_json(f"{prom}/api/v1/rules")["data"]["groups"]
                rules = [r for g in groups for r in g["rules"]]
                return rules if all(r["health"] == "ok" for r in rules) else None

            rules = wait_for(evaluated, 60, "every rule to be evaluated without error")
            assert len(rules) == sum(len(g["rules"]) for g in yaml.safe_load(
                RULES.read_text())["groups"])
            firing = get_json(f"{prom}/api/v1/alerts")["data"]["alerts"]
            assert not [a for a in firing if a["labels"]["alertname"] == "ExfilwatchDown"]
        assert httpx.get(f"{svc.url}/healthz", timeout=5).status_code == 200

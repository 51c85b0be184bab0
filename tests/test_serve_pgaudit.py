"""End to end against a real PostgreSQL with pgaudit: `exfilwatch serve` tails the cluster's
jsonlog directory; normal application traffic raises nothing, a bulk read of the clients table
with the application's credentials from a new client becomes a stored incident and a signed
webhook.

Loopback has one source address (127.0.0.1), so "new address" cannot be staged here; the
attack differs from the history by its client application and its volume.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import polars as pl
import pytest

from detector import pipeline
from detector.samples import write_sample
from detector.sinks.receiver import WebhookReceiver
from tests.pgcluster import PgCluster, free_port, require_cluster
from tests.test_deploy_support import get_json, wait_for

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
CLIENTS = 20_000
SCHEMA = f"""
CREATE TABLE clients (id text PRIMARY KEY, name text NOT NULL, email text NOT NULL);
INSERT INTO clients SELECT 'c' || g, 'client ' || g, 'c' || g || '@example.com'
  FROM generate_series(1, {CLIENTS}) g;
CREATE ROLE app_api LOGIN PASSWORD 'app-secret';
GRANT SELECT ON clients TO app_api;
"""


def _history_model(tmp: Path) -> Path:
    """A model trained on six simulated days ending yesterday, in which the application's
    account connects from 127.0.0.1, as it will in the live cluster."""
    start = (datetime.now(UTC) - timedelta(days=7)).date()
    sample = tmp / "history"
    write_sample(sample, days=6, seed=11, start=start, events_per_day=6000, attack_days=0)
    events = pl.read_parquet(sample / "events.parquet").with_columns(
        client_ip=pl.when(pl.col("db_user") == "app_api")
        .then(pl.lit("127.0.0.1"))
        .otherwise(pl.col("client_ip"))
    )
    events.write_parquet(sample / "local.parquet")
    models = tmp / "models"
    pipeline.train(
        [sample / "local.parquet"], models / "default",
        pipeline.TrainOptions(false_alerts_per_day=0.5, promote=True),
    )
    return models


def saas_cluster(tmp: Path) -> PgCluster:
    """A started private cluster logging jsonlog, with :data:`SCHEMA` loaded and a fresh log
    file: what set it up is not the traffic under test (the rotation is not audited)."""
    cluster = PgCluster.create(tmp / "pg", settings={"log_destination": "'jsonlog'"})
    cluster.start()
    try:
        with cluster.connect() as conn:
            for statement in SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)
        setup_log = cluster.log_file("jsonlog")
        with cluster.connect() as conn:
            conn.execute("SET pgaudit.log = 'none'")
            shutil.move(setup_log, tmp / "setup.json")
            conn.execute("SELECT pg_rotate_logfile()")
        wait_for(setup_log.exists, 20, "the server to reopen its log")
    except BaseException:
        cluster.stop()
        cluster.remove()
        raise
    return cluster


def write_config(
    path: Path, state: Path, models: Path, port: int, log_dir: Path, hook: str, sinks: str = ""
) -> None:
    """A service config tailing the cluster's jsonlog directory, with a signed webhook to
    ``hook`` and any further ``sinks`` (TOML tables)."""
    path.write_text(
        f"""
state_dir = "{state}"
models_dir = "{models}"
[api]
port = {port}
[[sources]]
name = "pg"
kind = "directory"
path = "{log_dir}"
pattern = "*.json"
format = "pgaudit-jsonlog"
[[sinks]]
name = "soc"
kind = "webhook"
url = "{hook}/hook"
secret = "{SECRET}"
{sinks}
[pipeline]
batch_delay_s = 0.05
poll_s = 0.05
"""
    )


@pytest.mark.slow
def test_serve_tails_pgaudit_and_turns_a_bulk_read_into_an_incident_and_a_webhook(
    tmp_path: Path,
) -> None:
    require_cluster()
    models = _history_model(tmp_path)
    cluster = saas_cluster(tmp_path)
    proc = None
    try:
        port = free_port()
        with WebhookReceiver(secrets=[SECRET]) as receiver:
            cfg = tmp_path / "serve.toml"
            write_config(cfg, tmp_path / "var", models, port, cluster.log_dir, receiver.url)
            exe = shutil.which("exfilwatch")
            assert exe is not None
            log = (tmp_path / "serve.log").open("wb")
            proc = subprocess.Popen([exe, "serve", "--config", str(cfg)], stderr=log,
                                    stdout=subprocess.DEVNULL)
            url = f"http://127.0.0.1:{port}"
            wait_for(lambda: get_json(f"{url}/readyz"), 60, "the service to be ready")

            def events_seen() -> int:
                seen: int = get_json(f"{url}/v1/model")["feature_state"]["events_seen"]
                return seen

            seen0 = events_seen()
            # normal traffic: the application reads one client at a time, with the statement
            # it ran throughout its history (the simulated application inlines its literals)
            app = {"password": "app-secret", "application_name": "saas-web"}
            for round_ in range(4):
                with cluster.connect("app_api", **app) as conn:
                    for client in range(1 + round_ * 5, 6 + round_ * 5):
                        conn.execute(f"SELECT * FROM public.clients WHERE id = 'c{client}'"
                                     ).fetchall()
            # 4 logins + 20 reads, as many tenants and sessions as the application's history has
            wait_for(lambda: events_seen() >= seen0 + 24, 60, "the normal traffic to be scored")
            assert get_json(f"{url}/v1/incidents")["items"] == []
            # the attack: the application's credentials in a desktop SQL client, whole table
            with cluster.connect("app_api", password="app-secret",
                                 application_name="DBeaver 23.2.0") as conn:
                rows = conn.execute("SELECT * FROM clients").fetchall()
            assert len(rows) == CLIENTS
            items = wait_for(lambda: get_json(f"{url}/v1/incidents")["items"], 60, "an incident")
            assert len(items) == 1
            incident = items[0]
            assert incident["principal"] == "app_api"
            assert "public.clients" in incident["tables"]
            assert incident["rows_read"] >= CLIENTS
            assert "DBeaver 23.2.0" in incident["client_apps"]
            assert incident["severity"] in ("high", "critical")
            assert incident["statement"] == "SELECT * FROM clients"
            wait_for(lambda: [r for r in receiver.successes()
                           if r.json()["data"]["id"] == incident["id"]], 60, "the webhook")
            assert all(r.verified for r in receiver.successes())
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(60) == 0
            proc = None
    finally:
        if proc is not None:
            proc.kill()
        cluster.stop()
        cluster.remove()

"""Canaries planted in the literals and comments of statements a real server ran never leave
exfilwatch: not in the API, webhook, Slack or Alertmanager bodies, the store, the outbox, the
quarantine, the feature snapshots or the logs.

* PostgreSQL 15 + pgaudit: ``exfilwatch serve`` tails the cluster's log, a bulk read whose
  WHERE clause carries a canary in every PostgreSQL literal and comment syntax becomes an
  incident and alerts; every byte the service wrote or sent is searched.
* Lines that cannot be read go to quarantine: from a real MariaDB's audit log below, and from
  generated statements in both dialects (as a rejected record and as a raw line) at the end.
* MariaDB + server_audit: the MySQL syntaxes (double-quoted strings, backslash escapes, ``#``
  comments, introducers), read from the server's own audit log by the adapter, through the
  engine, grouping, the sinks' bodies, the store and the quarantine.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
from datetime import UTC, datetime
from pathlib import Path

import polars as pl
import pytest
import structlog
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs

from detector import logs, pipeline
from detector.lab.mariadb import MariaServer, mariadb_unavailable_reason
from detector.quarantine import Quarantine
from detector.scoring import artefact
from detector.sinks.alertmanager import AlertmanagerSync
from detector.sinks.metrics import Metrics
from detector.sinks.receiver import WebhookReceiver
from detector.sinks.slack import slack_message
from detector.sinks.store import Store
from detector.sinks.tables import create_engine
from detector.sinks.webhook import body_bytes
from detector.testing import make_events
from tests.pgcluster import free_port, require_cluster
from tests.test_deploy_support import get_json, wait_for
from tests.test_serve_pgaudit import SECRET, _history_model, saas_cluster, write_config
from tests.test_sqltext import planted

MARK = b"cnry7q"

#: One bulk read of the whole clients table whose every literal and comment holds a canary.
PG_ATTACK = (
    "SELECT * FROM clients WHERE name <> $$cnry7qA 'x$$ AND name <> $t1$cnry7qB$t1$"
    " AND email <> E'cnry7qC\\'x' AND name <> 'cnry7qD''s' AND name <> U&'cnry7qE'"
    " /* cnry7qF /* cnry7qG */ cnry7qH */ AND id <> 'cnry7qI' /* cnry7qJ **/"
    " -- cnry7qK\n"
)


def _leaks(data: bytes) -> int:
    return data.lower().count(MARK)


def _tree_leaks(root: Path) -> dict[str, int]:
    found = {}
    for path in root.rglob("*"):
        if path.is_file():
            n = _leaks(path.read_bytes())
            if n:
                found[str(path.relative_to(root))] = n
    return found


@pytest.mark.slow
def test_no_canary_leaves_the_service_watching_a_real_postgresql(tmp_path: Path) -> None:
    require_cluster()
    models = _history_model(tmp_path)
    cluster = saas_cluster(tmp_path)
    proc = None
    try:
        port = free_port()
        state = tmp_path / "var"
        with WebhookReceiver(secrets=[SECRET]) as hooks, WebhookReceiver() as others:
            cfg = tmp_path / "serve.toml"
            more = (
                f'[[sinks]]\nname = "chat"\nkind = "slack"\nurl = "{others.url}/slack"\n'
                f'[[sinks]]\nname = "am"\nkind = "alertmanager"\nurl = "{others.url}"\n'
                "interval_s = 0.5"
            )
            write_config(cfg, state, models, port, cluster.log_dir, hooks.url, more)
            exe = shutil.which("exfilwatch")
            assert exe is not None
            log_path = tmp_path / "serve.log"
            with log_path.open("wb") as log:
                proc = subprocess.Popen(
                    [exe, "serve", "--config", str(cfg)],
                    stderr=log,
                    stdout=subprocess.DEVNULL,
                )
            url = f"http://127.0.0.1:{port}"
            wait_for(lambda: get_json(f"{url}/readyz"), 60, "the service to be ready")
            seen0 = get_json(f"{url}/v1/model")["feature_state"]["events_seen"]
            app = {"password": "app-secret", "application_name": "saas-web"}
            with cluster.connect("app_api", **app) as conn:
                for client in range(1, 6):
                    conn.execute(f"SELECT * FROM public.clients WHERE id = 'c{client}'").fetchall()
            with cluster.connect(
                "app_api", password="app-secret", application_name="DBeaver 23.2.0"
            ) as conn:
                rows = conn.execute(PG_ATTACK).fetchall()
            assert len(rows) > 10_000
            # 2 logins + 5 reads + the attack, scored (a first batch may wait for the kernel
            # to compile on a busy machine)
            try:
                wait_for(
                    lambda: (
                        get_json(f"{url}/v1/model")["feature_state"]["events_seen"] >= seen0 + 8
                    ),
                    180,
                    "the traffic to be scored",
                )
            except AssertionError as exc:
                raise AssertionError(f"{exc}\n{log_path.read_text()[-4000:]}") from None
            items = wait_for(lambda: get_json(f"{url}/v1/incidents")["items"], 30, "an incident")
            incident = items[0]
            assert incident["principal"] == "app_api"
            # the evidence keeps what was read, without the values it was read with
            assert incident["statement"].startswith("SELECT * FROM clients WHERE name <> ?")
            wait_for(lambda: hooks.successes(), 60, "the webhook")
            wait_for(lambda: [r for r in others.requests() if r.path == "/slack"], 60, "Slack")
            wait_for(
                lambda: [r for r in others.requests() if r.path.endswith("/alerts")],
                60,
                "Alertmanager",
            )
            api = [
                get_json(f"{url}/v1/incidents"),
                get_json(f"{url}/v1/incidents/{incident['id']}"),
            ]
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(60) == 0
            proc = None
            sent = [r.body for r in hooks.requests()] + [r.body for r in others.requests()]
        assert _leaks(json.dumps(api).encode()) == 0
        assert [_leaks(body) for body in sent] == [0] * len(sent)
        assert _tree_leaks(state) == {}
        assert _leaks(log_path.read_bytes()) == 0
        # the service did see them: the server's own log holds every canary
        assert _leaks(cluster.log_file("jsonlog").read_bytes()) >= 11
    finally:
        if proc is not None:
            proc.kill()
        cluster.stop()
        cluster.remove()


#: MySQL's literal and comment syntaxes, each holding a canary; all rows still match.
MARIA_ATTACK = (
    "SELECT * FROM clients WHERE name <> \"cnry7qA\" AND name <> 'cnry7qB\\'s'"
    " AND name <> \"cnry7qC\\\"x\" AND name <> 'cnry7qD''s' AND name <> _utf8mb4'cnry7qE'"
    " AND name <> N'cnry7qF' /* cnry7qG **/ AND id <> 0x636e7279 # cnry7qH\n"
    " AND name <> 'cnry7qI'"
)


@pytest.mark.slow
def test_no_canary_leaves_the_pipeline_reading_a_real_mariadb_audit_log(tmp_path: Path) -> None:
    reason = mariadb_unavailable_reason()
    if reason is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true but no private MariaDB can start here: {reason}")
        pytest.skip(reason)
    # the server's account must reach its directory, which a test's tmp_path may not let it
    root_dir = Path(tempfile.mkdtemp(prefix="exfilwatch-maria-"))
    root_dir.chmod(0o755)
    server = MariaServer.create(root_dir / "server", {})
    server.start()
    try:
        root = server.root_connection()
        with root.cursor() as cur:
            cur.execute("CREATE DATABASE shop")
            cur.execute("USE shop")
            cur.execute("CREATE TABLE shop.clients (id int PRIMARY KEY, name text, email text)")
            cur.execute(
                "INSERT INTO shop.clients SELECT seq, CONCAT('client ', seq), 'c@example.com'"
                " FROM seq_1_to_500"
            )
            cur.execute("CREATE USER analyst@'%' IDENTIFIED BY 'pw'")
            cur.execute("GRANT SELECT ON shop.* TO analyst@'%'")
        root.close()
        import pymysql

        conn = pymysql.connect(
            host="127.0.0.1",
            port=server.port,
            user="analyst",
            password="pw",
            database="shop",
            autocommit=True,
        )
        with conn.cursor() as cur:
            cur.execute(MARIA_ATTACK)
            assert len(cur.fetchall()) == 500
            cur.execute("SELECT /*!40001 SQL_NO_CACHE */ * FROM `clients` WHERE 'cnry7qJ' <> ''")
            cur.fetchall()
        conn.close()
        server.stop()
        audit = server.audit_log.read_bytes()
    finally:
        server.remove()
        shutil.rmtree(root_dir, ignore_errors=True)
    assert _leaks(audit) >= 10  # the server logged them all
    # a copy of the log with some lines cut and mangled, so some go to quarantine
    lines = audit.splitlines()
    mangled = [line[: len(line) // 2] if b"cnry7q" in line else line for line in lines[-3:]]
    log = tmp_path / "server_audit.log"
    log.write_bytes(b"\n".join(lines + mangled) + b"\n")
    quarantine = Quarantine(tmp_path / "rejected.jsonl")
    frames = list(
        pipeline.read_events(
            [log],
            batch_rows=10_000,
            quarantine=quarantine,
            default_tz="UTC",
            log_format="mariadb-audit",
            adapter_options={},
        )
    )
    quarantine.close()
    events = pl.concat(frames)
    assert events.filter(pl.col("statement_text").str.contains("cnry7qA")).height >= 1
    scorer = pipeline.Scorer(artefact.load("models/default"), continue_state=False)
    # every event alerts, the longest statement most
    scored = scorer.score(events).with_columns(
        anomaly_score=1.0 + pl.col("statement_text").str.len_chars().fill_null(0) / 1e6
    )
    incidents = scorer.incidents(scored)
    assert any((i["statement"] or "").startswith("SELECT * FROM clients") for i in incidents), [
        i["statement"] for i in incidents
    ]
    store = Store(
        create_engine(f"sqlite:///{tmp_path / 'store.db'}"),
        clock=lambda: datetime(2026, 12, 1, tzinfo=UTC),
    )
    with store.transaction() as tx:
        tx.save_incidents(incidents, new=True)
        tx.add_alerts([("incident.opened", doc, "") for doc in incidents])
    outputs: list[bytes] = [json.dumps(incidents, default=str).encode()]
    outputs += [body_bytes({"type": "incident.opened", "data": doc}) for doc in incidents]
    outputs += [
        json.dumps(slack_message("a1", "incident.opened", doc)).encode() for doc in incidents
    ]
    outputs.append(json.dumps(store.outbox_rows(), default=str).encode())
    assert [_leaks(o) for o in outputs] == [0] * len(outputs)
    rejected = (tmp_path / "rejected.jsonl").read_bytes()
    assert rejected.count(b"\n") >= 1
    stored = b"".join(p.read_bytes() for p in tmp_path.glob("store.db*"))
    assert _leaks(rejected) == 0
    assert _leaks(stored) == 0


@pytest.fixture(scope="module")
def scorer() -> pipeline.Scorer:
    return pipeline.Scorer(artefact.load("models/default"), continue_state=False)


@pytest.mark.parametrize("dialect", ["postgres", "mysql"])
@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_no_planted_literal_reaches_any_output(
    dialect: str, data: st.DataObject, scorer: pipeline.Scorer, tmp_path: Path
) -> None:
    """Generated statements with canaries in every literal and comment syntax of their
    dialect, through the incident, the webhook and Slack bodies, the store and its outbox, the
    quarantine (as a rejected record and as a raw line) and the logs."""
    statements = data.draw(st.lists(planted(dialect), min_size=1, max_size=3))
    system = "mariadb" if dialect == "mysql" else "postgresql"
    events = make_events(
        [{"statement_text": s, "db_system": system, "rows_returned": 5000} for s in statements]
    )
    scored = scorer.score(events).with_columns(anomaly_score=pl.lit(1.0))
    incidents = scorer.incidents(scored)
    assert incidents and all(i["statement"] for i in incidents)
    root = Path(tempfile.mkdtemp(dir=tmp_path))
    store = Store(create_engine(f"sqlite:///{root / 'store.db'}"))
    with store.transaction() as tx:
        tx.save_incidents(incidents, new=True)
        tx.add_alerts([("incident.opened", doc, "") for doc in incidents])
    with Quarantine(root / "rejected.jsonl") as q:
        for s in statements:
            q.write_raw("x:1", "bad_line", "a raw line", f"2026-12-01 LOG:  AUDIT: {s},<x>")
            record = json.dumps({"db_user": "app", "statement_text": s, "db_system": system})
            q.write(
                pl.DataFrame(
                    {
                        "location": ["x:2"],
                        "reason": ["bad_type"],
                        "detail": ["d"],
                        "record": [record],
                    }
                )
            )
    with capture_logs(processors=[logs.redact_fields]) as logged:
        for s in statements:
            structlog.get_logger().info("statement_seen", statement=s, query=s)
    outputs = [json.dumps(incidents, default=str).encode(), json.dumps(logged).encode()]
    outputs += [body_bytes({"type": "incident.opened", "data": d}) for d in incidents]
    outputs += [json.dumps(slack_message("a", "incident.opened", d)).encode() for d in incidents]
    outputs.append(json.dumps(store.outbox_rows(), default=str).encode())
    manager = AlertmanagerSync(store.engine, "http://127.0.0.1:9", Metrics(CollectorRegistry()))
    annotated = manager.alerts(datetime.now(UTC))
    assert len(annotated) == len(incidents)
    outputs.append(json.dumps(annotated).encode())
    assert [_leaks(o) for o in outputs] == [0] * len(outputs)
    assert _tree_leaks(root) == {}
    assert (root / "rejected.jsonl").read_bytes().count(b"\n") == 2 * len(statements)

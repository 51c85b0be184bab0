"""The HTTP API over a running service: ingest formats and limits, auth, incidents, health."""

from __future__ import annotations

import functools
import io
import json
import re
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson
import polars as pl
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from detector.sources.journal import CONTENT_TYPES
from tests.service_support import all_incidents, api, metric, models_copy, running, settings_for

NDJSON = {"content-type": "application/x-ndjson"}


def _events(sample: Path, n: int, offset: int = 0) -> pl.DataFrame:
    return pl.read_parquet(sample / "events.parquet").slice(offset, n)


def _ndjson(frame: pl.DataFrame) -> bytes:
    buf = io.BytesIO()
    frame.write_ndjson(buf)
    return buf.getvalue()


def test_ingest_takes_every_body_format_and_counts_rejects(tmp_path: Path, live_sample: Path) -> None:
    settings = settings_for(tmp_path, models_copy(tmp_path))
    with running(settings) as service, api(service) as client:
        frame = _events(live_sample, 400)
        records = orjson.loads(b"[" + b",".join(_ndjson(frame.slice(0, 100)).splitlines()) + b"]")
        records.insert(3, {"db_user": "x"})  # missing fields
        records.insert(7, {"event_time": "2026-01-14T00:00:00", "db_user": "y", "action": "read",
                           "source_format": "canonical"})  # naive timestamp
        r = client.post("/v1/events", content=orjson.dumps(records),
                        headers={"content-type": "application/json"})
        assert r.status_code == 202, r.text
        assert r.json()["accepted"] == 100 and r.json()["rejected"] == 2
        assert {e["reason"] for e in r.json()["errors"]} >= {"missing_field"}
        r = client.post("/v1/events", content=_ndjson(frame.slice(100, 100)) + b"{oops\n", headers=NDJSON)
        assert (r.status_code, r.json()["accepted"], r.json()["rejected"]) == (202, 100, 1)
        buf = io.BytesIO()
        frame.slice(200, 100).write_parquet(buf)
        r = client.post("/v1/events", content=buf.getvalue(),
                        headers={"content-type": "application/vnd.apache.parquet"})
        assert (r.status_code, r.json()["accepted"]) == (202, 100)
        sink = pa.BufferOutputStream()
        table = frame.slice(300, 100).to_arrow()
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
        r = client.post("/v1/events", content=sink.getvalue().to_pybytes(),
                        headers={"content-type": "application/vnd.apache.arrow.stream"})
        assert (r.status_code, r.json()["accepted"]) == (202, 100)
        assert client.post("/v1/events", content=b"x", headers={"content-type": "text/plain"}).status_code == 415
        assert client.post("/v1/events", content=b"{not json", headers={"content-type": "application/json"}).status_code == 400
        assert client.post("/v1/events", content=b"PAR1garbage", headers={"content-type": "application/x-parquet"}).status_code == 400
        assert service.wait_idle(timeout=60)
        assert metric(service, "exfilwatch_events_scored_total") == 400
        assert metric(service, "exfilwatch_events_ingested_total", {"source": "http", "format": "json"}) == 100
        assert metric(service, "exfilwatch_events_rejected_total", {"source": "http", "reason": "malformed_json"}) == 1
        service.snapshot()
        positions = service.store.positions()
    # the journal is durable state: nothing left over once a snapshot covered it
    assert not [p for p in (tmp_path / "var" / "journal" / "http").iterdir() if not p.name.startswith(".")]
    assert not [key for key in positions if key[0] == "http"]


def test_body_limit_and_token(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("s3cret\n")  # a mounted secret wins over the inline token
    settings = settings_for(tmp_path, models_copy(tmp_path),
                            api={"token": "other", "token_file": str(tmp_path / "token"),
                                 "max_body_bytes": 2048})
    with running(settings) as service, api(service) as client:
        body = b"[]"
        assert client.post("/v1/events", content=body).status_code == 401
        assert client.post("/v1/events", content=body, headers={"authorization": "Bearer nope"}).status_code == 401
        ok = {"authorization": "Bearer s3cret", "content-type": "application/json"}
        assert client.post("/v1/events", content=body, headers=ok).status_code == 202
        assert client.post("/v1/events", content=b" " * 4096, headers=ok).status_code == 413
        assert client.post("/v1/incidents/x/ack").status_code == 401
        assert client.post("/v1/model/promote", json={"version": "v1"}).status_code == 401
        assert client.get("/v1/incidents").status_code == 200  # reads are open


def test_a_full_backlog_answers_429_with_retry_after(tmp_path: Path, live_sample: Path) -> None:
    # batches wait 30 s to fill, so the first request's events stay in the backlog
    settings = settings_for(tmp_path, models_copy(tmp_path),
                            pipeline={"queue_events": 50, "batch_delay_s": 30, "batch_events": 10_000})
    with running(settings) as service, api(service) as client:
        body = _ndjson(_events(live_sample, 60))
        assert client.post("/v1/events", content=body, headers=NDJSON).status_code == 202
        r = client.post("/v1/events", content=body, headers=NDJSON)
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
        assert metric(service, "exfilwatch_ingest_requests_total", {"outcome": "throttled"}) == 1
        deadline = time.monotonic() + 30
        while service.queue.events < 60:  # read from the journal, waiting for its batch
            assert time.monotonic() < deadline
            time.sleep(0.01)
        service.stop()  # drains: what is queued is scored and committed before exit
        assert metric(service, "exfilwatch_events_scored_total") == 60


def test_incident_listing_paging_and_verdicts(tmp_path: Path, live_sample: Path) -> None:
    settings = settings_for(
        tmp_path, models_copy(tmp_path),
        sinks=[{"name": "soc", "kind": "webhook", "url": "http://127.0.0.1:9/hook",
                "secret": "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"}],
    )
    with running(settings) as service, api(service) as client:
        r = client.post("/v1/events", content=_ndjson(pl.read_parquet(live_sample / "events.parquet")),
                        headers=NDJSON)
        assert r.status_code == 202
        assert service.wait_idle(timeout=120)
        everything = all_incidents(service)
        assert len(everything) >= 7
        seen: list[str] = []
        cursor = None
        while True:
            page = client.get("/v1/incidents", params={"limit": 2, **({"cursor": cursor} if cursor else {})}).json()
            seen += [i["id"] for i in page["items"]]
            cursor = page["next_cursor"]
            if cursor is None:
                break
        assert sorted(seen) == sorted(i["id"] for i in everything) and len(seen) == len(set(seen))
        critical = client.get("/v1/incidents", params={"severity": "critical"}).json()["items"]
        assert critical and all(i["severity"] == "critical" for i in critical)
        target = critical[0]
        got = client.get(f"/v1/incidents/{target['id']}").json()
        for field in ("principal", "addresses", "tables", "rows_read", "reason", "top_features", "first_seen"):
            assert got[field] == target[field]
        assert not re.search(r"'[^']+'", got["statement"] or "")  # literals redacted
        assert client.get("/v1/incidents/inc_nope").status_code == 404
        assert client.get("/v1/incidents", params={"since": "2026-01-15T00:00:00"}).status_code == 422
        # one 'incident.opened' alert per incident, queued for the sink
        opened = [r for r in service.store.outbox_rows("soc") if r["kind"] == "incident.opened"]
        assert sorted(r["incident_id"] for r in opened) == sorted(i["id"] for i in everything)
        acked = client.post(f"/v1/incidents/{target['id']}/ack", json={"by": "ann"}).json()
        assert acked["status"] == "acknowledged" and acked["status_by"] == "ann"
        assert client.post(f"/v1/incidents/{target['id']}/false-positive", json={}).status_code == 422
        fp = client.post(f"/v1/incidents/{target['id']}/false-positive",
                         json={"comment": "pen test", "by": "ann"}).json()
        assert fp["status"] == "false_positive" and fp["status_comment"] == "pen test"
        other = next(i for i in everything if i["id"] != target["id"])
        # with no token configured, a write must say it is JSON (a bodiless cross-site POST cannot)
        assert client.post(f"/v1/incidents/{other['id']}/resolve").status_code == 415
        assert client.post(f"/v1/incidents/{other['id']}/resolve", json={}).json()["status"] == "resolved"
        kinds = {(r["incident_id"], r["kind"]) for r in service.store.outbox_rows("soc")}
        assert (other["id"], "incident.resolved") in kinds
        assert client.get("/v1/incidents", params={"status": "false_positive"}).json()["items"][0]["id"] == target["id"]


def test_a_false_positive_verdict_suppresses_the_same_pattern(tmp_path: Path) -> None:
    settings = settings_for(
        tmp_path, models_copy(tmp_path),
        sinks=[{"name": "soc", "kind": "webhook", "url": "http://127.0.0.1:9/hook",
                "secret": "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"}],
    )

    def piece(when: str, tables: list[str], address: str = "10.0.0.9") -> pl.DataFrame:
        """One anomalous read by ``bi`` (a feature row with its score, as the scorer gives)."""
        return pl.DataFrame(
            {"event_time": [datetime.fromisoformat(when)], "db_user": ["bi"], "action": ["read"],
             "client_ip": [address], "session_id": [None], "tables": [tables], "row_count": [500],
             "anomaly_score": [9.0]},
            schema_overrides={"event_time": pl.Datetime("us", "UTC"), "session_id": pl.String,
                              "tables": pl.List(pl.String)},
        )

    with running(settings) as service:
        with service.store.transaction() as tx:
            [first] = service._apply(tx, piece("2026-01-14T10:00:00+00:00", ["public.reports"]))
        service.set_status(first["id"], "false_positive", "dashboard refresh", "ann")
        with service.store.transaction() as tx:
            later = pl.concat([
                piece("2026-01-14T14:00:00+00:00", ["public.reports"]),
                piece("2026-01-14T14:00:00+00:00", ["public.reports", "public.accounts"],
                      address="10.0.0.10"),
            ])
            opened = service._apply(tx, later)
        # four hours later: new incidents, one of the silenced pattern, one of another
        [same, wider] = sorted((d for d in all_incidents(service) if d["id"] != first["id"]),
                               key=lambda d: d["group_key"] != "principal:bi@10.0.0.9")
        assert wider["group_key"] == "principal:bi@10.0.0.10"
        assert [d["id"] for d in opened] == [wider["id"]]
        assert same["status"] == "false_positive"
        assert same["suppressed_by"]["feedback"] >= 1
        assert metric(service, "exfilwatch_alerts_suppressed_total") == 1
        queued = {(r["incident_id"], r["kind"]) for r in service.store.outbox_rows("soc")}
        assert (same["id"], "incident.opened") not in queued
        assert (wider["id"], "incident.opened") in queued


def test_health_readiness_and_metrics_follow_the_naming_rules(tmp_path: Path) -> None:
    settings = settings_for(tmp_path, models_copy(tmp_path))
    with running(settings) as service, api(service) as client:
        assert client.get("/healthz").json() == {"status": "ok"}
        ready = client.get("/readyz")
        assert ready.status_code == 200 and ready.json()["ready"] is True
        text = client.get("/metrics").text
        names = set(re.findall(r"^# TYPE (\S+) (\S+)", text, re.M))
        ours = {(n, k) for n, k in names if n.startswith("exfilwatch_")}
        # besides ours, only the client library's standard process and runtime series
        assert ours and all(n.startswith(("process_", "python_")) for n, _ in names - ours)
        names = ours
        assert all(n.endswith("_total") or kind != "counter" for n, kind in names)
        labels = set(re.findall(r"[{,](\w+)=", text))
        assert labels <= {"source", "format", "reason", "severity", "sink", "outcome", "queue",
                          "name", "version", "feature_spec", "le", "implementation", "major",
                          "minor", "patchlevel"}
        assert client.get("/openapi.json").json()["paths"]["/v1/events"]["post"]
        service.crash_for_tests()
        assert client.get("/readyz").status_code == 503
        assert client.get("/healthz").status_code == 200


_CONTENT_TYPES = ["application/json", "application/x-ndjson", "application/vnd.apache.parquet",
                  "application/vnd.apache.arrow.stream", "application/vnd.apache.arrow.file",
                  "text/csv", "text/plain", "application/x-www-form-urlencoded",
                  "multipart/form-data; boundary=x"]


@functools.cache
def _tabular_seeds() -> list[bytes]:
    """Small valid Parquet and Arrow bodies of sample events, for the damaged-body strategy."""
    from tests.conftest import SAMPLE

    frame = pl.read_parquet(SAMPLE / "events.parquet", n_rows=5)
    parquet = io.BytesIO()
    frame.write_parquet(parquet)
    table = frame.to_arrow()
    seeds = [parquet.getvalue()]
    for opener, compression in ((pa.ipc.new_stream, None), (pa.ipc.new_file, "zstd")):
        sink = pa.BufferOutputStream()
        with opener(sink, table.schema, options=pa.ipc.IpcWriteOptions(compression=compression)) as w:
            w.write_table(table)
        seeds.append(sink.getvalue().to_pybytes())
    return seeds


@st.composite
def _damaged(draw: st.DrawFn) -> bytes:
    body = bytearray(draw(st.sampled_from(_tabular_seeds())))
    for _ in range(draw(st.integers(0, 6))):
        body[draw(st.integers(0, len(body) - 1))] = draw(st.integers(0, 255))
    return bytes(body[: draw(st.integers(0, len(body)))])


@pytest.fixture(scope="module")
def shared_service(tmp_path_factory: pytest.TempPathFactory) -> Any:
    tmp = tmp_path_factory.mktemp("api_property")
    with running(settings_for(tmp, models_copy(tmp))) as service, api(service) as client:
        yield service, client


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    body=st.one_of(
        st.binary(max_size=2000),
        st.lists(st.dictionaries(st.sampled_from(["event_time", "db_user", "action", "rows_returned", "objects", "zzz"]),
                                 st.one_of(st.none(), st.integers(), st.text(max_size=30), st.lists(st.text(max_size=5), max_size=3)),
                                 max_size=6), max_size=20).map(lambda v: json.dumps(v).encode()),
        st.lists(st.text(max_size=80), max_size=20).map(lambda ls: "\n".join(ls).encode("utf-8", "surrogatepass") if all(c < "\ud800" or c > "\udfff" for s in ls for c in s) else b""),
        _damaged(),
    ),
    content_type=st.sampled_from(_CONTENT_TYPES),
)
def test_any_body_gets_a_clear_answer_and_never_a_server_error(shared_service: Any, body: bytes, content_type: str) -> None:
    _service, client = shared_service
    r = client.post("/v1/events", content=body, headers={"content-type": content_type})
    assert r.status_code in (202, 400, 415), r.text
    if content_type.split(";")[0] not in CONTENT_TYPES:  # form and text types never get in
        assert r.status_code == 415
    if r.status_code == 202:
        data = r.json()
        assert data["accepted"] >= 0 and data["rejected"] >= 0
    else:
        assert isinstance(r.json()["detail"], str)

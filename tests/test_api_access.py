"""Who may call the API and what they may send (detector/api/gate.py), checked on the app itself
through its ASGI interface, so each test sees exactly how much of a body the server pulled:
a refused request is answered before any of its body is received."""

from __future__ import annotations

import asyncio
import io
import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fastapi import FastAPI
from fastapi.routing import APIRoute
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from detector.api.app import create_app
from detector.live import Service
from detector.sources.journal import CONTENT_TYPES
from tests.conftest import SAMPLE
from tests.service_support import api, metric, models_copy, running, settings_for

WRITE, READ = "w-7f1c2a", "r-93bd04"
LIMIT_INGEST, LIMIT_VERDICT = 1 << 20, 2_048
MAX_ROWS = 1_000
KIB = b"x" * 1024
FORM_TYPES = [
    "application/x-www-form-urlencoded",
    "multipart/form-data; boundary=x",
    "text/plain",
    "text/plain; charset=utf-8",
]
WRITES = {  # path: (limit, a content type it takes)
    "/v1/events": (LIMIT_INGEST, "application/vnd.apache.parquet"),
    "/v1/incidents/inc_nope/ack": (LIMIT_VERDICT, "application/json"),
    "/v1/incidents/inc_nope/false-positive": (LIMIT_VERDICT, "application/json"),
    "/v1/incidents/inc_nope/resolve": (LIMIT_VERDICT, "application/json"),
    "/v1/model/promote": (LIMIT_VERDICT, "application/json"),
}
READS = ["/v1/incidents", "/v1/incidents/inc_nope", "/v1/model", "/v1/unknown"]
PROBES = ["/healthz", "/readyz", "/metrics"]


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes
    pulled: int = 0  # receive() calls the app made
    chunks: list[bytes] = field(default_factory=list)

    def json(self) -> Any:
        return orjson.loads(self.body)


class Overread(AssertionError):
    """The app asked for more of the body than the test allows: it is reading what it should
    have refused (the test fails here instead of streaming on)."""


def call(
    app: FastAPI,
    method: str,
    path: str,
    headers: dict[str, str],
    body: Iterator[bytes] | None = None,
    *,
    most: int | None = None,
) -> Answer:
    """One request straight into the ASGI app; ``body`` is handed out a chunk per receive(),
    and receive() may be called at most ``most`` times."""
    chunks = body if body is not None else iter(())
    answer = Answer(0, {}, b"")

    async def receive() -> dict[str, Any]:
        answer.pulled += 1
        if most is not None and answer.pulled > most:
            raise Overread(f"{method} {path}: receive() called {answer.pulled} times")
        chunk = next(chunks, None)
        if chunk is None:
            return {"type": "http.request", "body": b"", "more_body": False}
        return {"type": "http.request", "body": chunk, "more_body": True}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            answer.status = message["status"]
            answer.headers = {k.decode().lower(): v.decode() for k, v in message["headers"]}
        elif message["type"] == "http.response.body":
            answer.body += message.get("body", b"")

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "client": ("127.0.0.1", 40000),
        "server": ("127.0.0.1", 8080),
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
    }
    asyncio.run(app(scope, receive, send))
    return answer


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Service, FastAPI, Path]]:
    tmp = tmp_path_factory.mktemp("guarded")
    overrides = {
        "token": WRITE,
        "read_token": READ,
        "max_body_bytes": LIMIT_INGEST,
        "max_verdict_body_bytes": LIMIT_VERDICT,
        "max_decoded_rows": MAX_ROWS,
        "max_decoded_bytes": 1 << 20,
    }
    with running(settings_for(tmp, models_copy(tmp), api=overrides)) as service:
        yield service, create_app(service), tmp


def test_every_route_has_its_own_rule(guarded: tuple[Service, FastAPI, Path]) -> None:
    _service, app, _tmp = guarded
    rules = app.state.access_rules
    routes = [r for r in app.routes if isinstance(r, APIRoute)]
    assert {r.name for r in routes} == set(rules)
    for route in routes:
        rule = rules[route.name]
        assert (rule.access == "write") == ("POST" in route.methods), route.path
        assert (rule.access == "open") == (route.path in PROBES), route.path
    assert rules["ingest"].max_body == LIMIT_INGEST and rules["promote"].max_body == LIMIT_VERDICT
    assert set(rules["ingest"].content_types) == set(CONTENT_TYPES)
    assert set(rules["acknowledge"].content_types) == {"application/json"}


@pytest.mark.parametrize("path", list(WRITES))
@pytest.mark.parametrize(
    "auth", [None, "Bearer nope", f"Basic {WRITE}", f"Bearer {READ}", f"Bearer {WRITE}x"]
)
def test_a_write_without_the_write_token_is_refused_before_its_body_is_read(
    guarded: tuple[Service, FastAPI, Path], path: str, auth: str | None
) -> None:
    service, app, _tmp = guarded
    before = metric(service, "exfilwatch_ingest_requests_total", {"outcome": "unauthorized"})
    headers = {
        "content-type": WRITES[path][1],
        "content-length": "300000000",
        **({"authorization": auth} if auth else {}),
    }
    answer = call(app, "POST", path, headers, itertools.repeat(KIB), most=0)
    assert answer.status == 401 and answer.pulled == 0
    assert answer.headers["www-authenticate"] == "Bearer"
    assert answer.headers["connection"] == "close"  # the sender cannot go on streaming
    assert "write token" in answer.json()["detail"]
    after = metric(service, "exfilwatch_ingest_requests_total", {"outcome": "unauthorized"})
    assert after - before == (1 if path == "/v1/events" else 0)


@pytest.mark.parametrize("path", list(WRITES))
def test_a_body_over_the_routes_limit_is_refused_as_declared_or_as_it_arrives(
    guarded: tuple[Service, FastAPI, Path], path: str
) -> None:
    service, app, _tmp = guarded
    limit, content_type = WRITES[path]
    headers = {**bearer(WRITE), "content-type": content_type}
    before = metric(service, "exfilwatch_ingest_requests_total", {"outcome": "too_large"})
    declared = call(
        app,
        "POST",
        path,
        {**headers, "content-length": str(limit + 1)},
        itertools.repeat(KIB),
        most=0,
    )
    assert declared.status == 413 and declared.pulled == 0
    assert f"larger than {limit} bytes" in declared.json()["detail"]
    # no length given: the body is read until it passes the limit, and not a chunk further
    allowed = limit // len(KIB) + 1  # the chunk that passes the limit is the last one read
    streamed = call(
        app,
        "POST",
        path,
        {**headers, "transfer-encoding": "chunked"},
        itertools.repeat(KIB),
        most=allowed,
    )
    assert streamed.status == 413 and streamed.pulled == allowed
    assert streamed.headers["connection"] == "close"
    after = metric(service, "exfilwatch_ingest_requests_total", {"outcome": "too_large"})
    assert after - before == (2 if path == "/v1/events" else 0)


def test_each_route_has_its_own_limit(guarded: tuple[Service, FastAPI, Path]) -> None:
    _service, app, _tmp = guarded
    events = pl.read_parquet(SAMPLE / "events.parquet").slice(0, 20)
    buf = io.BytesIO()
    events.write_ndjson(buf)
    body = buf.getvalue()
    assert LIMIT_VERDICT < len(body) <= LIMIT_INGEST
    ingest = call(
        app,
        "POST",
        "/v1/events",
        {**bearer(WRITE), "content-type": "application/x-ndjson", "content-length": str(len(body))},
        iter([body]),
    )
    assert ingest.status == 202 and ingest.json()["accepted"] == 20
    verdict = orjson.dumps({"by": "ann", "comment": "c" * (len(body) - 30)})
    ack = call(
        app,
        "POST",
        "/v1/incidents/inc_nope/ack",
        {**bearer(WRITE), "content-type": "application/json", "content-length": str(len(verdict))},
        iter([verdict]),
    )
    assert ack.status == 413 and ack.pulled == 0
    # exactly the limit is still taken: the body is parsed and the incident looked up
    exact = b'{"by": "ann"' + b" " * (LIMIT_VERDICT - 13) + b"}"
    assert len(exact) == LIMIT_VERDICT
    ack = call(
        app,
        "POST",
        "/v1/incidents/inc_nope/ack",
        {**bearer(WRITE), "content-type": "application/json", "content-length": str(len(exact))},
        iter([exact]),
    )
    assert ack.status == 404 and ack.pulled >= 1


@pytest.mark.parametrize("path", list(WRITES))
@pytest.mark.parametrize("content_type", FORM_TYPES)
def test_a_write_takes_none_of_the_types_a_cross_site_form_can_send(
    guarded: tuple[Service, FastAPI, Path], path: str, content_type: str
) -> None:
    _service, app, _tmp = guarded
    answer = call(
        app,
        "POST",
        path,
        {**bearer(WRITE), "content-type": content_type, "content-length": "5"},
        iter([b"a=b&c"]),
    )
    assert answer.status == 415 and answer.pulled == 0
    assert "content type must be one of" in answer.json()["detail"]


def test_with_the_write_token_a_write_may_leave_the_type_out(
    guarded: tuple[Service, FastAPI, Path],
) -> None:
    """A browser cannot add the token cross-site, so a tokened client keeps working as before."""
    _service, app, _tmp = guarded
    assert call(app, "POST", "/v1/incidents/inc_nope/ack", bearer(WRITE)).status == 404
    body = b"[]"
    answer = call(app, "POST", "/v1/events", {**bearer(WRITE), "content-length": "2"}, iter([body]))
    assert answer.status == 202 and answer.json()["accepted"] == 0


@pytest.mark.parametrize("path", READS)
def test_reads_need_the_read_or_the_write_token(
    guarded: tuple[Service, FastAPI, Path], path: str
) -> None:
    _service, app, _tmp = guarded
    for headers in ({}, bearer("nope"), {"authorization": READ}, bearer(READ + "x")):
        answer = call(app, "GET", path, headers)
        assert answer.status == 401, headers
        assert "read or write token" in answer.json()["detail"]
    expected = 404 if "nope" in path or "unknown" in path else 200
    assert call(app, "GET", path, bearer(READ)).status == expected
    assert call(app, "GET", path, bearer(WRITE)).status == expected


def test_the_read_token_cannot_write_and_probes_need_no_token(
    guarded: tuple[Service, FastAPI, Path],
) -> None:
    _service, app, _tmp = guarded
    for path in PROBES:
        assert call(app, "GET", path, {}).status == 200, path
    answer = call(
        app,
        "POST",
        "/v1/incidents/inc_nope/resolve",
        {**bearer(READ), "content-type": "application/json", "content-length": "2"},
        iter([b"{}"]),
    )
    assert answer.status == 401 and answer.pulled == 0


def test_a_read_with_a_body_is_refused(guarded: tuple[Service, FastAPI, Path]) -> None:
    _service, app, _tmp = guarded
    answer = call(
        app,
        "GET",
        "/v1/incidents",
        {**bearer(READ), "content-length": "1000000"},
        itertools.repeat(KIB),
        most=0,
    )
    assert answer.status == 413 and answer.pulled == 0


def test_the_api_description_names_both_tokens(guarded: tuple[Service, FastAPI, Path]) -> None:
    _service, app, _tmp = guarded
    doc = call(app, "GET", "/openapi.json", {}).json()
    assert set(doc["components"]["securitySchemes"]) == {"write_token", "read_token"}
    assert doc["paths"]["/v1/events"]["post"]["security"] == [{"write_token": []}]
    listed = doc["paths"]["/v1/incidents"]["get"]["security"]
    assert {name for option in listed for name in option} == {"read_token", "write_token"}
    assert "security" not in doc["paths"]["/healthz"]["get"]


def _parquet(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


def _arrow(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def test_a_parquet_or_arrow_body_past_the_decoded_bounds_gets_413_and_is_counted(
    guarded: tuple[Service, FastAPI, Path],
) -> None:
    service, _app, tmp = guarded
    journal = tmp / "var" / "journal" / "http"
    events = pq.read_table(SAMPLE / "events.parquet").slice(0, MAX_ROWS + 1)
    repeated = pa.DictionaryArray.from_arrays(
        pa.array(np.zeros(800, dtype=np.int32)), pa.array(["select " + "x" * 4089])
    )
    refused = [
        ("application/vnd.apache.parquet", _parquet(events), "1,001 events"),
        ("application/vnd.apache.arrow.stream", _arrow(events), "1,001 events"),
        (
            "application/vnd.apache.parquet",
            _parquet(pa.table({"statement_text": repeated})),
            "api.max_decoded_bytes",
        ),
    ]
    assert all(len(body) <= LIMIT_INGEST for _, body, _ in refused)  # within the wire limit
    before = metric(service, "exfilwatch_ingest_requests_total", {"outcome": "too_large"})
    journaled = sorted(journal.glob("*"))
    with api(service) as client:
        for content_type, body, why in refused:
            r = client.post(
                "/v1/events", content=body, headers={**bearer(WRITE), "content-type": content_type}
            )
            assert r.status_code == 413, r.text
            assert why in r.json()["detail"]
        assert sorted(journal.glob("*")) == journaled  # nothing of them journaled
        after = metric(service, "exfilwatch_ingest_requests_total", {"outcome": "too_large"})
        assert after - before == len(refused)
        # one event fewer is within the bound
        r = client.post(
            "/v1/events",
            content=_parquet(events.slice(0, MAX_ROWS)),
            headers={**bearer(WRITE), "content-type": "application/vnd.apache.parquet"},
        )
        assert r.status_code == 202 and r.json()["accepted"] == MAX_ROWS


def _incident(ident: str) -> dict[str, Any]:
    return {
        "id": ident,
        "status": "open",
        "principal": "bi",
        "principals": ["bi"],
        "group_key": "principal:bi@10.0.0.9",
        "first_seen": "2026-01-14T10:00:00+00:00",
        "last_seen": "2026-01-14T10:05:00+00:00",
        "events": 3,
        "sessions": [],
        "addresses": ["10.0.0.9"],
        "client_apps": [],
        "actions": {"read": 3},
        "tables": ["public.accounts"],
        "tenants_touched": 1,
        "tenants": ["t1"],
        "rows_read": 500,
        "max_table_coverage": 0.2,
        "anomaly_score": 0.7,
        "severity": "high",
        "reason": "r",
        "top_features": [],
        "statement": None,
    }


def test_with_no_token_a_cross_site_form_cannot_touch_an_incident(tmp_path: Path) -> None:
    """Loopback without a token (the default): what a page in a browser can send without a
    preflight (a form post, a bodiless fetch) changes nothing; a JSON client still can."""
    with running(settings_for(tmp_path, models_copy(tmp_path))) as service:
        with service.store.transaction() as tx:
            tx.save_incidents([_incident("inc_0123456789abcdef")], new=True)
        app = create_app(service)
        for verb in ("ack", "false-positive", "resolve"):
            path = f"/v1/incidents/inc_0123456789abcdef/{verb}"
            for content_type in FORM_TYPES:
                body = b"comment=pen+test"
                answer = call(
                    app,
                    "POST",
                    path,
                    {"content-type": content_type, "content-length": str(len(body))},
                    iter([body]),
                )
                assert answer.status == 415 and answer.pulled == 0, (verb, content_type)
            empty = call(
                app,
                "POST",
                path,
                {"content-type": "application/x-www-form-urlencoded", "content-length": "0"},
            )
            assert empty.status == 415 and empty.pulled == 0
            bare = call(app, "POST", path, {})  # fetch(url, {method: "POST", mode: "no-cors"})
            assert bare.status == 415 and bare.pulled == 0
        promote = call(
            app,
            "POST",
            "/v1/model/promote",
            {"content-type": "text/plain", "content-length": "17"},
            iter([b'{"version":"v1"}\n']),
        )
        assert promote.status == 415
        doc = service.store.incident("inc_0123456789abcdef")
        assert doc is not None and doc["status"] == "open"
        with api(service) as client:
            acked = client.post("/v1/incidents/inc_0123456789abcdef/ack", json={"by": "ann"})
            assert acked.status_code == 200 and acked.json()["status"] == "acknowledged"
            assert client.get("/v1/incidents").status_code == 200  # no read token: reads open


@pytest.mark.parametrize(
    ("host", "served"),
    [
        ("127.0.0.1:8080", True),
        ("127.3.0.9", True),
        ("localhost:8080", True),
        ("[::1]:8080", True),
        (None, True),  # not a browser: browsers always name the host
        ("rebind.attacker.example:8080", False),
        ("203.0.113.7:8080", False),
        ("127.0.0.1.attacker.example", False),
        ("[::ffff:203.0.113.7]:8080", False),
    ],
)
def test_with_no_token_only_requests_naming_a_loopback_host_are_served(
    tmp_path: Path, host: str | None, served: bool
) -> None:
    """A page whose own name was made to resolve to 127.0.0.1 (DNS rebinding) is same-origin
    with a tokenless API, so neither the preflight rule nor the content type stops it; the
    name it sends in Host does. Probes stay open to any name."""
    with running(settings_for(tmp_path, models_copy(tmp_path))) as service:
        with service.store.transaction() as tx:
            tx.save_incidents([_incident("inc_0123456789abcdef")], new=True)
        app = create_app(service)
        named = {"host": host} if host is not None else {}
        read = call(app, "GET", "/v1/incidents", named)
        body = b'{"by": "page", "comment": "benign"}'
        write = call(
            app,
            "POST",
            "/v1/incidents/inc_0123456789abcdef/false-positive",
            {**named, "content-type": "application/json", "content-length": str(len(body))},
            iter([body]),
        )
        probe = call(app, "GET", "/healthz", named)
        doc = service.store.incident("inc_0123456789abcdef")
        assert doc is not None
        if served:
            assert (read.status, write.status) == (200, 200)
            assert doc["status"] == "false_positive"
        else:
            assert (read.status, write.status) == (403, 403) and write.pulled == 0
            assert b"principal" not in read.body and doc["status"] == "open"
        assert probe.status == 200


def test_a_configured_token_serves_any_host(guarded: tuple[Service, FastAPI, Path]) -> None:
    _service, app, _root = guarded
    answer = call(app, "GET", "/v1/incidents", {"host": "exfilwatch.corp.example", **bearer(WRITE)})
    assert answer.status == 200


_TYPES = [
    None,
    "application/json",
    "application/json; charset=utf-8",
    "application/x-ndjson",
    "application/vnd.apache.parquet",
    *FORM_TYPES,
]


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    path=st.sampled_from([*WRITES, *READS, *PROBES]),
    token=st.sampled_from([None, WRITE, READ, "nope"]),
    content_type=st.sampled_from(_TYPES),
    size=st.integers(0, 3 * LIMIT_VERDICT),
    declared=st.booleans(),
)
def test_the_gate_refuses_what_the_rules_say_before_reading_it(
    guarded: tuple[Service, FastAPI, Path],
    path: str,
    token: str | None,
    content_type: str | None,
    size: int,
    declared: bool,
) -> None:
    _service, app, _tmp = guarded
    write = path in WRITES
    limit = WRITES[path][0] if write else 0
    headers = {
        **(bearer(token) if token else {}),
        **({"content-type": content_type} if content_type else {}),
    }
    if size and declared:
        headers["content-length"] = str(size)
    elif size:
        headers["transfer-encoding"] = "chunked"
    if write:
        media = (content_type or "").split(";")[0]
        takes = set(CONTENT_TYPES) if path == "/v1/events" else {"application/json"}
        if token != WRITE:
            expected = 401
        elif content_type is not None and media not in takes:
            expected = 415
        else:
            expected = 413 if size > limit else 0
    elif path in READS and token not in (READ, WRITE):
        expected = 401
    else:
        expected = 413 if size and declared else 0
    body = iter([b"x" * size] if size else [])
    unread = expected in (401, 415) or (expected == 413 and declared)
    answer = call(app, "POST" if write else "GET", path, headers, body, most=0 if unread else None)
    if unread:
        assert (answer.status, answer.pulled) == (expected, 0), answer.body
    elif expected == 413:
        assert answer.status == 413  # arrived past the limit, refused as it came in
    else:
        assert answer.status not in (401, 413, 415), answer.body

"""The HTTP API: ingest, incidents, model, health and metrics.

Writes (ingest, acknowledge, false positive, resolve, promote) need ``Authorization: Bearer
<token>`` when a token is configured, and the service does not listen beyond loopback without
one; reads of incidents and of the model need the read token (or the write token) when a read
token is configured; health, readiness and metrics are open for probes. Every route has a body
limit and every write a content type. :mod:`detector.api.gate` enforces all of this before a
body is read; a Parquet or Arrow body is then held to a number of rows and decoded bytes
(:mod:`detector.api.decoded`). Errors are JSON ``{"detail": ...}`` with the usual status codes.
"""

from __future__ import annotations

import base64
import uuid
from collections.abc import Callable
from datetime import datetime
from typing import Annotated, Any, Literal

import orjson
from fastapi import FastAPI, Header, HTTPException, Query, Request, Response, Security
from fastapi.responses import JSONResponse
from fastapi.security import HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from detector.api import decoded
from detector.api.gate import Gate, Refusal, Rule
from detector.config import ApiSettings
from detector.errors import ExfilwatchError, InputError
from detector.live import Busy, Service
from detector.scoring import artefact
from detector.sources.journal import CONTENT_TYPES

STATUS_FILTER = Literal["open", "acknowledged", "false_positive", "resolved"]
SEVERITY_FILTER = Literal["low", "medium", "high", "critical"]

# The schemes document the tokens in the OpenAPI description; the gate checks them.
_WRITE_TOKEN = Security(
    HTTPBearer(scheme_name="write_token", auto_error=False, description="api.token")
)
_READ_TOKEN = Security(
    HTTPBearer(scheme_name="read_token", auto_error=False, description="api.read_token")
)
#: The outcome an ingest request refused by the gate is counted under.
_REFUSED_INGEST = {401: "unauthorized", 413: "too_large", 415: "unsupported_media_type"}


class IngestResult(BaseModel):
    accepted: int = Field(description="Events journaled; they will be scored.")
    rejected: int = Field(description="Records quarantined.")
    errors: list[dict[str, str]] = Field(description="The first few rejects and why.")


class Verdict(BaseModel):
    comment: str | None = Field(None, max_length=4000)
    by: str | None = Field(None, max_length=200, description="Who gives the verdict.")


class FalsePositive(BaseModel):
    comment: str = Field(min_length=1, max_length=4000)
    by: str | None = Field(None, max_length=200)


class Promote(BaseModel):
    version: str = Field(pattern=r"^v\d+$")


class IncidentPage(BaseModel):
    items: list[dict[str, Any]]
    next_cursor: str | None


def _cursor(doc: dict[str, Any]) -> str:
    raw = orjson.dumps([doc["last_seen"], doc["id"]])
    return base64.urlsafe_b64encode(raw).decode()


def _uncursor(cursor: str) -> tuple[datetime, str]:
    try:
        last, ident = orjson.loads(base64.urlsafe_b64decode(cursor.encode()))
        return datetime.fromisoformat(last), str(ident)
    except (ValueError, TypeError, orjson.JSONDecodeError) as exc:
        raise HTTPException(400, "bad cursor") from exc


def create_app(service: Service) -> FastAPI:
    """The API over a started :class:`~detector.live.Service`."""
    app = FastAPI(
        title="exfilwatch",
        summary="Catches bulk theft of customer data in database access logs.",
        version="0.1.0",
    )
    settings = service.settings.api
    bounds = decoded.Limits(settings.max_decoded_rows, settings.max_decoded_bytes)
    app.state.access_rules = _rules(settings)

    def refused(refusal: Refusal) -> None:
        if refusal.route == "ingest" and refusal.status in _REFUSED_INGEST:
            service.metrics.http_requests.labels(_REFUSED_INGEST[refusal.status]).inc()

    app.add_middleware(
        Gate,
        routes=app.router.routes,
        rules=app.state.access_rules,
        fallback=_fallback(settings.max_verdict_body_bytes),
        write_token=service.settings.api_token(),
        read_token=service.settings.api_read_token(),
        on_refusal=refused,
    )

    @app.exception_handler(ExfilwatchError)
    async def _known(_request: Request, exc: ExfilwatchError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=400)

    @app.get("/healthz", tags=["operations"])
    def healthz() -> dict[str, str]:
        """The process is up."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["operations"])
    def readyz() -> JSONResponse:
        """Model loaded, store reachable, sources running."""
        ok, checks = service.ready()
        return JSONResponse({"ready": ok, **checks}, status_code=200 if ok else 503)

    @app.get("/metrics", tags=["operations"])
    def metrics() -> Response:
        return Response(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post(
        "/v1/events",
        status_code=202,
        response_model=IngestResult,
        dependencies=[_WRITE_TOKEN],
        tags=["ingest"],
        responses={401: {}, 413: {}, 415: {}, 429: {}},
    )
    async def ingest(
        request: Request, content_type: Annotated[str, Header()] = "application/json"
    ) -> IngestResult:
        """Accept events as a JSON array, NDJSON, Parquet or Arrow IPC body (at most
        ``api.max_body_bytes``; Parquet and Arrow at most ``api.max_decoded_rows`` events and
        ``api.max_decoded_bytes`` decoded). They are on disk when this answers 202; each
        rejected record is quarantined and counted."""
        kind = CONTENT_TYPES.get(content_type.split(";")[0].strip().lower())
        if kind is None:
            raise HTTPException(415, f"content type must be one of: {', '.join(CONTENT_TYPES)}")
        body = b"".join([chunk async for chunk in request.stream()])  # the gate bounds it
        request_id = request.headers.get("x-request-id") or uuid.uuid4().hex[:16]

        def accept() -> Any:
            decoded.check(body, kind, bounds)
            return service.ingest(body, kind, request_id[:64])

        try:
            result = await run_in_threadpool(accept)
        except decoded.TooLarge as exc:
            service.metrics.http_requests.labels("too_large").inc()
            raise HTTPException(413, str(exc)) from None
        except Busy as exc:
            raise HTTPException(
                429, str(exc), {"Retry-After": str(int(exc.retry_after + 0.999))}
            ) from None
        except InputError as exc:
            service.metrics.http_requests.labels("rejected").inc()
            raise HTTPException(400, str(exc)) from None
        return IngestResult(
            accepted=result.accepted, rejected=result.rejected, errors=result.errors
        )

    @app.get(
        "/v1/incidents",
        response_model=IncidentPage,
        dependencies=[_READ_TOKEN, _WRITE_TOKEN],
        tags=["incidents"],
    )
    def incidents(
        status: STATUS_FILTER | None = None,
        severity: SEVERITY_FILTER | None = None,
        principal: Annotated[str | None, Query(max_length=200)] = None,
        since: datetime | None = None,
        until: datetime | None = None,
        limit: Annotated[int, Query(ge=1, le=500)] = 50,
        cursor: Annotated[str | None, Query(max_length=400)] = None,
    ) -> IncidentPage:
        """Incidents, most recent activity first; pass ``next_cursor`` back for the next page."""
        for value in (since, until):
            if value is not None and value.tzinfo is None:
                raise HTTPException(422, "since/until need a time zone (e.g. Z)")
        after = _uncursor(cursor) if cursor else None
        items = service.store.incidents(
            status=status,
            severity=severity,
            principal=principal,
            since=since,
            until=until,
            limit=limit + 1,
            after=after,
        )
        more = len(items) > limit
        items = items[:limit]
        return IncidentPage(items=items, next_cursor=_cursor(items[-1]) if more else None)

    @app.get(
        "/v1/incidents/{incident_id}", dependencies=[_READ_TOKEN, _WRITE_TOKEN], tags=["incidents"]
    )
    def incident(incident_id: str) -> dict[str, Any]:
        doc = service.store.incident(incident_id)
        if doc is None:
            raise HTTPException(404, f"no incident {incident_id}")
        return doc

    def _verdict(
        incident_id: str, status: str, comment: str | None, by: str | None
    ) -> dict[str, Any]:
        doc = service.set_status(incident_id, status, comment, by)
        if doc is None:
            raise HTTPException(404, f"no incident {incident_id}")
        return doc

    @app.post("/v1/incidents/{incident_id}/ack", dependencies=[_WRITE_TOKEN], tags=["incidents"])
    def acknowledge(incident_id: str, body: Verdict | None = None) -> dict[str, Any]:
        """Someone is on it: no more escalation pages; the incident stays open to updates."""
        body = body or Verdict()
        return _verdict(incident_id, "acknowledged", body.comment, body.by)

    @app.post(
        "/v1/incidents/{incident_id}/false-positive",
        dependencies=[_WRITE_TOKEN],
        tags=["incidents"],
    )
    def false_positive(incident_id: str, body: FalsePositive) -> dict[str, Any]:
        """Not an attack: kept as feedback for retraining, and the same pattern (principal and
        address, no new tables) raises no alert for the configured suppression time."""
        return _verdict(incident_id, "false_positive", body.comment, body.by)

    @app.post(
        "/v1/incidents/{incident_id}/resolve", dependencies=[_WRITE_TOKEN], tags=["incidents"]
    )
    def resolve(incident_id: str, body: Verdict | None = None) -> dict[str, Any]:
        body = body or Verdict()
        return _verdict(incident_id, "resolved", body.comment, body.by)

    @app.get("/v1/model", dependencies=[_READ_TOKEN, _WRITE_TOKEN], tags=["model"])
    def model() -> dict[str, Any]:
        art = service.scorer.artefact
        meta = art.metadata
        return {
            "name": service.settings.model,
            "version": art.path.name,
            "feature_spec_hash": meta["feature_spec_hash"],
            "threshold": art.threshold,
            "created_at": meta.get("created_at"),
            "feature_state": {
                "events_seen": service.scorer.engine.events_seen_,
                "events_time_held": service.scorer.engine.events_time_held_,
                "principals": len(service.scorer.engine.principals_),
            },
            "aliases": artefact.aliases(service.settings.models_dir / service.settings.model),
            "versions": artefact.versions(service.settings.models_dir / service.settings.model),
        }

    @app.post("/v1/model/promote", dependencies=[_WRITE_TOKEN], tags=["model"])
    def promote(body: Promote) -> dict[str, Any]:
        """Point ``current`` at a version once it loads as the service would load it
        (checksums, range checks, and its signature when the service has a model-signing
        key: an unsigned or wrongly signed version is refused, never signed here); the service
        switches to it within seconds, keeping its learnt feature state when the feature spec
        is the same."""
        checksum = artefact.promote(
            service.settings.models_dir / service.settings.model,
            body.version,
            keys=service.settings.model_signing_keys(),
        )
        return {"promoted": body.version, "checksum": checksum}

    return app


def _rules(settings: ApiSettings) -> dict[str, Rule]:
    """Each route's rule, by route name."""
    probe, read = Rule("open"), Rule("read")
    verdict = Rule("write", settings.max_verdict_body_bytes)
    ingest = Rule("write", settings.max_body_bytes, frozenset(CONTENT_TYPES))
    return {
        "healthz": probe,
        "readyz": probe,
        "metrics": probe,
        "ingest": ingest,
        "incidents": read,
        "incident": read,
        "acknowledge": verdict,
        "false_positive": verdict,
        "resolve": verdict,
        "model": read,
        "promote": verdict,
    }


def _fallback(max_verdict_body: int) -> Callable[[str, str], Rule]:
    """The rule for a request no route's rule covers (the API description, unknown paths): a
    read under /v1/ needs the read token, other reads are open, anything else is a write."""

    def rule(method: str, path: str) -> Rule:
        if method in ("GET", "HEAD"):
            return Rule("read") if path.startswith("/v1/") else Rule("open")
        return Rule("write", max_verdict_body)

    return rule

"""The HTTP API: ingest, incidents, model, health and metrics.

Reads are open (bind to loopback or put the service behind your proxy); writes (ingest,
acknowledge, false positive, resolve, promote) need ``Authorization: Bearer <token>`` when a
token is configured. Errors are JSON ``{"detail": ...}`` with the usual status codes.
"""

from __future__ import annotations

import base64
import hmac
import uuid
from datetime import datetime
from typing import Annotated, Any, Literal

import orjson
from fastapi import Depends, FastAPI, Header, HTTPException, Query, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from detector.errors import ExfilwatchError, InputError
from detector.live import Busy, Service
from detector.scoring import artefact
from detector.sources.journal import CONTENT_TYPES

STATUS_FILTER = Literal["open", "acknowledged", "false_positive", "resolved"]
SEVERITY_FILTER = Literal["low", "medium", "high", "critical"]


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
    token = service.settings.api_token()
    limit = service.settings.api.max_body_bytes

    def writer(authorization: Annotated[str | None, Header()] = None) -> None:
        if token is None:
            return
        scheme, _, given = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.encode(), token.encode()):
            raise HTTPException(401, "a bearer token is required", {"WWW-Authenticate": "Bearer"})

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
        dependencies=[Depends(writer)],
        tags=["ingest"],
        responses={413: {}, 415: {}, 429: {}},
    )
    async def ingest(
        request: Request, content_type: Annotated[str, Header()] = "application/json"
    ) -> IngestResult:
        """Accept events as a JSON array, NDJSON, Parquet or Arrow IPC body. They are on disk
        when this answers 202; each rejected record is quarantined and counted."""
        kind = CONTENT_TYPES.get(content_type.split(";")[0].strip().lower())
        if kind is None:
            raise HTTPException(415, f"content type must be one of: {', '.join(CONTENT_TYPES)}")
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise HTTPException(413, f"body larger than {limit} bytes")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise HTTPException(413, f"body larger than {limit} bytes")
            chunks.append(chunk)
        body = b"".join(chunks)
        request_id = request.headers.get("x-request-id") or uuid.uuid4().hex[:16]
        try:
            result = await run_in_threadpool(service.ingest, body, kind, request_id[:64])
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

    @app.get("/v1/incidents", response_model=IncidentPage, tags=["incidents"])
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

    @app.get("/v1/incidents/{incident_id}", tags=["incidents"])
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

    @app.post("/v1/incidents/{incident_id}/ack", dependencies=[Depends(writer)], tags=["incidents"])
    def acknowledge(incident_id: str, body: Verdict | None = None) -> dict[str, Any]:
        """Someone is on it: no more escalation pages; the incident stays open to updates."""
        body = body or Verdict()
        return _verdict(incident_id, "acknowledged", body.comment, body.by)

    @app.post(
        "/v1/incidents/{incident_id}/false-positive",
        dependencies=[Depends(writer)],
        tags=["incidents"],
    )
    def false_positive(incident_id: str, body: FalsePositive) -> dict[str, Any]:
        """Not an attack: kept as feedback for retraining, and the same pattern (principal and
        address, no new tables) raises no alert for the configured suppression time."""
        return _verdict(incident_id, "false_positive", body.comment, body.by)

    @app.post(
        "/v1/incidents/{incident_id}/resolve", dependencies=[Depends(writer)], tags=["incidents"]
    )
    def resolve(incident_id: str, body: Verdict | None = None) -> dict[str, Any]:
        body = body or Verdict()
        return _verdict(incident_id, "resolved", body.comment, body.by)

    @app.get("/v1/model", tags=["model"])
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

    @app.post("/v1/model/promote", dependencies=[Depends(writer)], tags=["model"])
    def promote(body: Promote) -> dict[str, Any]:
        """Point ``current`` at a version (checksums verified); the service switches to it
        within seconds, keeping its learnt feature state when the feature spec is the same."""
        artefact.promote(service.settings.models_dir / service.settings.model, body.version)
        return {"promoted": body.version}

    return app

"""Who may call a route and what they may send, decided before the request body is read.

:class:`Gate` is a plain ASGI middleware in front of the routes. For the route a request names
it checks, in this order, each before a byte of the body is received:

1. **the token**: a write needs the write token when one is configured; a read of incidents or
   of the model needs the read token or the write token when a read token is configured; probes
   and metrics are open (401; the connection is closed when the request announced a body, so
   its sender cannot keep streaming it). A route no configured token guards is served only to
   requests whose Host names a loopback address (403 otherwise): a web page whose own name an
   attacker made resolve to 127.0.0.1 is same-origin with the API, and its Host gives it away;
2. **the content type** of a write: one of the route's own (JSON for verdicts and promotion;
   JSON, NDJSON, Parquet or Arrow for ingest). None of them is a type an HTML form or a plain
   cross-site ``fetch`` can send without a CORS preflight, which this API never grants, so a
   page in a browser cannot write. A write that names no type is taken as JSON only when it
   carries the write token, which such a page cannot add either (415);
3. **the size**: the declared Content-Length, then the bytes as they arrive, against the
   route's limit (413).
"""

from __future__ import annotations

import hmac
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Final, Literal

import orjson
from starlette.exceptions import HTTPException
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

Access = Literal["open", "read", "write"]

#: Content types of a JSON write; an ingest route lists its own.
JSON_TYPES: Final = frozenset({"application/json"})
_BODY_METHODS: Final = frozenset({"POST", "PUT", "PATCH", "DELETE"})


@dataclass(frozen=True, slots=True)
class Rule:
    """What a route asks of a request: ``access``, the largest body in bytes, and for a write
    the content types it takes."""

    access: Access
    max_body: int = 0
    content_types: frozenset[str] = JSON_TYPES


@dataclass(frozen=True, slots=True)
class Refusal:
    """A request the gate answered itself: the route's name (None when no route matched) and
    the status sent."""

    route: str | None
    status: int


class Gate:
    """The ASGI middleware. ``rules`` maps route names to rules; a request no rule covers is
    held to ``fallback(method, path)``. ``on_refusal`` hears of every request refused."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        routes: Iterable[BaseRoute],
        rules: Mapping[str, Rule],
        fallback: Callable[[str, str], Rule],
        write_token: str | None,
        read_token: str | None,
        on_refusal: Callable[[Refusal], None] | None = None,
    ) -> None:
        self.app = app
        self._routes = routes
        self._rules = rules
        self._fallback = fallback
        self._write = write_token.encode() if write_token else None
        self._read = read_token.encode() if read_token else None
        self._on_refusal = on_refusal

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        name, rule = self._rule(scope)
        headers = _headers(scope)
        method = str(scope["method"]).upper()
        announced = headers.get(b"content-length", b"0") != b"0" or b"transfer-encoding" in headers
        refused = self._refusal(rule, method, headers)
        if refused is not None:
            status, detail, extra = refused
            if announced:
                extra = {**extra, "connection": "close"}
            self._refused(name, status)
            await _answer(send, status, detail, extra)
            return
        await self.app(scope, self._bounded(receive, rule.max_body, name), send)

    def _rule(self, scope: Scope) -> tuple[str | None, Rule]:
        for route in self._routes:
            match, _child = route.matches(scope)
            if match is Match.FULL:
                name = getattr(route, "name", None)
                if isinstance(name, str) and name in self._rules:
                    return name, self._rules[name]
                break
        return None, self._fallback(str(scope["method"]).upper(), str(scope["path"]))

    def _refusal(
        self, rule: Rule, method: str, headers: Mapping[bytes, bytes]
    ) -> tuple[int, str, dict[str, str]] | None:
        tokens = self._tokens(rule.access)
        given = _bearer(headers.get(b"authorization"))
        if tokens and not any(hmac.compare_digest(given, token) for token in tokens):
            what = "the write token" if rule.access == "write" else "the read or write token"
            return 401, f"{what} is required (Authorization: Bearer)", _CHALLENGE
        if not tokens and rule.access != "open" and not _loopback_host(headers.get(b"host")):
            # no token vouches for the caller: a page whose name was made to resolve to this
            # address (DNS rebinding) would be same-origin, so only loopback names are served
            return 403, _HOST_DETAIL, {}
        if rule.access == "write" and method in _BODY_METHODS:
            declared = headers.get(b"content-type")
            if declared is None:
                if not tokens:  # no token vouches for the sender: it may be a web page
                    return 415, _type_detail(rule), {}
            elif _media_type(declared) not in rule.content_types:
                return 415, _type_detail(rule), {}
        length = headers.get(b"content-length")
        if length is not None and length.strip().isdigit() and int(length) > rule.max_body:
            return 413, f"body larger than {rule.max_body} bytes", {}
        return None

    def _tokens(self, access: Access) -> tuple[bytes, ...]:
        """The tokens that open a route of ``access``; none when it needs no token."""
        if access == "write":
            return (self._write,) if self._write else ()
        if access == "read" and self._read:
            return tuple(t for t in (self._read, self._write) if t)
        return ()

    def _refused(self, route: str | None, status: int) -> None:
        if self._on_refusal is not None:
            self._on_refusal(Refusal(route, status))

    def _bounded(self, receive: Receive, limit: int, route: str | None) -> Receive:
        """``receive`` that raises 413 once more than ``limit`` body bytes have arrived."""
        seen = 0

        async def bounded() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    self._refused(route, 413)
                    raise HTTPException(
                        413, f"body larger than {limit} bytes", {"connection": "close"}
                    )
            return message

        return bounded


_CHALLENGE: Final = {"www-authenticate": "Bearer"}
_HOST_DETAIL: Final = (
    "with no token configured, only requests naming a loopback host (Host: 127.0.0.1 or "
    "localhost) are served; configure api.token (and api.read_token) to serve other names"
)


def _loopback_host(value: bytes | None) -> bool:
    """Whether a Host header names this machine by a loopback name (no header: a client that
    is not a browser, which always sends one)."""
    if value is None:
        return True
    host = value.decode("latin-1").strip().lower()
    if host.startswith("["):
        name = host[1 : host.find("]")] if "]" in host else host[1:]
    else:
        name = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    if name in ("localhost", "::1") or name.endswith(".localhost"):
        return True
    parts = name.split(".")
    numeric = all(p.isdigit() and int(p) < 256 for p in parts)
    return len(parts) == 4 and parts[0] == "127" and numeric


def _headers(scope: Scope) -> dict[bytes, bytes]:
    """Request headers by lower-case name (the first of repeated ones)."""
    found: dict[bytes, bytes] = {}
    for key, value in scope.get("headers", []):
        found.setdefault(bytes(key).lower(), bytes(value))
    return found


def _bearer(value: bytes | None) -> bytes:
    scheme, _, token = (value or b"").partition(b" ")
    return token.strip() if scheme.lower() == b"bearer" else b""


def _media_type(value: bytes) -> str:
    return value.split(b";")[0].strip().lower().decode("latin-1")


def _type_detail(rule: Rule) -> str:
    return f"content type must be one of: {', '.join(sorted(rule.content_types))}"


async def _answer(send: Send, status: int, detail: str, headers: dict[str, str]) -> None:
    body = orjson.dumps({"detail": detail})
    raw: list[tuple[bytes, bytes]] = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        *((k.encode(), v.encode()) for k, v in headers.items()),
    ]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})

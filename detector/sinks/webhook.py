"""Generic webhook delivery, signed per the Standard Webhooks specification.

Every request carries ``webhook-id`` (the alert id, the same on every attempt),
``webhook-timestamp`` (Unix seconds at send time) and ``webhook-signature``: one
``v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">`` per configured secret, separated by
spaces, so a receiver can rotate secrets without losing a delivery. A secret is given as
``whsec_<base64>`` (the form the specification prints), bare base64, or raw bytes; the HMAC key
is the decoded bytes. The body is the alert payload as compact JSON with sorted keys, the same
bytes on every attempt.

>>> key = decode_secret("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
>>> sign("msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, b'{"test": 2432232314}', [key])
'v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE='
"""

from __future__ import annotations

import base64
import binascii
import email.utils
import hashlib
import hmac
import math
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Final

import httpx
import orjson

from detector import __version__
from detector.errors import ConfigError, ExfilwatchError
from detector.sinks.outbox import (
    HTTP_ERROR,
    RETRY,
    SUCCESS,
    Alert,
    Clock,
    Result,
    short_error,
    utc_now,
)

SECRET_PREFIX: Final = "whsec_"  # noqa: S105 - the format's prefix, not a secret
MIN_KEY_BYTES: Final = 24  # the specification's recommended range: 24 to 64 bytes
MAX_KEY_BYTES: Final = 64
TOLERANCE_SECONDS: Final = 300
USER_AGENT: Final = f"exfilwatch/{__version__}"
DEFAULT_TIMEOUT: Final = httpx.Timeout(10.0, connect=5.0)
_RESERVED: Final = frozenset({"webhook-id", "webhook-timestamp", "webhook-signature"})


# -- HTTP delivery, shared by every HTTP sink ----------------------------------------------


def http_client(timeout: float | httpx.Timeout = DEFAULT_TIMEOUT) -> httpx.Client:
    """A client for one sender: bounded timeouts, no redirects followed (a redirect is an
    answer to fix in the configuration, not to chase with a signed body)."""
    return httpx.Client(timeout=timeout, follow_redirects=False)


def parse_retry_after(value: str | None, *, now: datetime, maximum: float) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or an HTTP-date), within
    ``[0, maximum]``; None when absent or unreadable. Never raises."""
    if value is None:
        return None
    text = value.strip()
    if not text:
        return None
    try:
        if text.isascii() and text.isdigit():
            seconds = float(int(text[:12]))
        else:
            when = email.utils.parsedate_to_datetime(text)
            if when.tzinfo is None:  # an HTTP-date is always GMT
                when = when.replace(tzinfo=UTC)
            seconds = (when - now).total_seconds()
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if seconds != seconds:  # NaN
        return None
    return min(max(seconds, 0.0), max(maximum, 0.0))


def response_result(response: httpx.Response, *, now: datetime, max_retry_after: float) -> Result:
    """Classify an HTTP answer: 2xx is delivered; anything else is retried, as ``retry`` when
    the receiver asked to come back later (429, 503, Retry-After), else ``http_error``."""
    status = response.status_code
    if 200 <= status < 300:
        return Result(True, SUCCESS, status)
    retry_after = parse_retry_after(
        response.headers.get("retry-after"), now=now, maximum=max_retry_after
    )
    outcome = RETRY if status in (429, 503) or retry_after is not None else HTTP_ERROR
    reason = response.reason_phrase or "error"
    detail = short_error(response.text) if outcome == HTTP_ERROR else ""
    error = f"HTTP {status} {reason}" + (f": {detail}" if detail else "")
    return Result(False, outcome, status, error, retry_after)


def post(
    client: httpx.Client,
    url: str,
    content: bytes,
    headers: Mapping[str, str],
    *,
    clock: Clock = utc_now,
    max_retry_after: float = 86_400.0,
) -> Result:
    """POST ``content`` once and classify the answer; never raises for a delivery failure."""
    try:
        response = client.post(url, content=content, headers=dict(headers))
    except httpx.HTTPError as exc:
        return Result.from_exception(exc)
    return response_result(response, now=clock(), max_retry_after=max_retry_after)


# -- Standard Webhooks signing -----------------------------------------------------------


class SignatureError(ExfilwatchError):
    """A request's Standard Webhooks headers are missing, stale or do not match its body."""


def decode_secret(secret: str | bytes) -> bytes:
    """The HMAC key of ``secret`` (``whsec_<base64>``, bare base64, or the raw key bytes)."""
    if isinstance(secret, bytes):
        key = secret
    else:
        text = secret.strip().removeprefix(SECRET_PREFIX)
        try:
            key = base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
        except (binascii.Error, ValueError):
            raise ConfigError("a webhook secret must be whsec_ followed by base64") from None
    if not MIN_KEY_BYTES <= len(key) <= MAX_KEY_BYTES:
        raise ConfigError(
            f"a webhook secret must decode to {MIN_KEY_BYTES}..{MAX_KEY_BYTES} bytes "
            f"(got {len(key)}); generate one as whsec_ + base64 of 32 random bytes"
        )
    return key


def body_bytes(payload: Mapping[str, Any]) -> bytes:
    """The request body: compact JSON, keys sorted, UTF-8; identical for identical payloads."""
    return orjson.dumps(payload, option=orjson.OPT_SORT_KEYS)


def _digest(key: bytes, msg_id: str, timestamp: int, body: bytes) -> bytes:
    signed = msg_id.encode() + b"." + str(timestamp).encode() + b"." + body
    return hmac.new(key, signed, hashlib.sha256).digest()


def sign(msg_id: str, timestamp: int, body: bytes, keys: Iterable[bytes]) -> str:
    """The ``webhook-signature`` header value: one ``v1,<base64>`` per key, space-separated."""
    return " ".join(
        "v1," + base64.b64encode(_digest(key, msg_id, timestamp, body)).decode() for key in keys
    )


def verify(
    body: bytes,
    headers: Mapping[str, str],
    keys: Sequence[bytes],
    *,
    now: float,
    tolerance: float = TOLERANCE_SECONDS,
) -> str:
    """Check a received request; return its webhook-id or raise :class:`SignatureError`.
    ``now`` is Unix seconds; a timestamp more than ``tolerance`` seconds away is refused."""
    lowered = {k.lower(): v for k, v in headers.items()}
    msg_id = lowered.get("webhook-id")
    stamp = lowered.get("webhook-timestamp")
    signatures = lowered.get("webhook-signature")
    if not (msg_id and stamp and signatures):
        raise SignatureError("missing webhook-id, webhook-timestamp or webhook-signature")
    if not (stamp.isascii() and stamp.isdigit()) or len(stamp) > 12:
        raise SignatureError(f"webhook-timestamp {stamp[:20]!r} is not Unix seconds")
    timestamp = int(stamp)
    if not math.isfinite(now) or abs(now - timestamp) > tolerance:
        raise SignatureError("webhook-timestamp outside the accepted tolerance")
    expected = [_digest(key, msg_id, timestamp, body) for key in keys]
    for entry in signatures.split(" "):
        version, _, encoded = entry.partition(",")
        if version != "v1":
            continue
        try:
            given = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            continue
        if any(hmac.compare_digest(given, digest) for digest in expected):
            return msg_id
    raise SignatureError("no webhook-signature matches the body")


class HttpEndpoint:
    """What every HTTP sink holds: the receiver's URL, the default request headers (JSON,
    our user agent, then ``headers``) and a client, which is closed in :meth:`close` only when
    it was made here (a shared ``client`` is closed by its owner)."""

    def __init__(
        self,
        url: str,
        *,
        client: httpx.Client | None = None,
        timeout: float | httpx.Timeout = DEFAULT_TIMEOUT,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.url = url
        self.headers = {"content-type": "application/json", "user-agent": USER_AGENT,
                        **(headers or {})}
        self._owns_client = client is None
        self.client = client if client is not None else http_client(timeout)

    def close(self) -> None:
        """Close the HTTP client if it was made here."""
        if self._owns_client:
            self.client.close()


class WebhookSender(HttpEndpoint):
    """Delivers alerts as signed JSON POSTs to ``url``.

    ``secrets``: one or more secrets; every one signs each request (list the new secret next to
    the old while a receiver rotates). ``headers``: extra request headers (e.g. Authorization);
    the webhook-* headers cannot be overridden. ``client``: a shared ``httpx.Client`` (closed by
    its owner); without one the sender makes its own with ``timeout`` and closes it in
    :meth:`close`."""

    def __init__(
        self,
        name: str,
        url: str,
        secrets: str | bytes | Sequence[str | bytes],
        *,
        client: httpx.Client | None = None,
        timeout: float | httpx.Timeout = DEFAULT_TIMEOUT,
        headers: Mapping[str, str] | None = None,
        clock: Clock = utc_now,
    ) -> None:
        if isinstance(secrets, str | bytes):
            secrets = [secrets]
        if not secrets:
            raise ConfigError(f"webhook sink {name!r} needs at least one secret")
        reserved = _RESERVED & {k.lower() for k in (headers or {})}
        if reserved:
            raise ConfigError(f"webhook sink {name!r} cannot set headers {sorted(reserved)}")
        super().__init__(url, client=client, timeout=timeout, headers=headers)
        self._name = name
        self.keys = [decode_secret(s) for s in secrets]
        self.clock = clock

    @property
    def name(self) -> str:
        return self._name

    def request_headers(self, alert_id: str, timestamp: int, body: bytes) -> dict[str, str]:
        """The headers of one attempt."""
        return {
            **self.headers,
            "webhook-id": alert_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": sign(alert_id, timestamp, body, self.keys),
        }

    def send(self, alert: Alert) -> Result:
        body = body_bytes(alert.payload)
        timestamp = int(self.clock().timestamp())
        headers = self.request_headers(alert.id, timestamp, body)
        return post(self.client, self.url, body, headers, clock=self.clock)


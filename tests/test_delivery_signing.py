"""The Standard Webhooks signer against the specification's test vector and the reference
library, and the Retry-After parser."""

from __future__ import annotations

import base64
import time
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from standardwebhooks import Webhook, WebhookVerificationError

from detector.errors import ConfigError
from detector.sinks.outbox import Alert, Backoff
from detector.sinks.webhook import (
    SignatureError,
    WebhookSender,
    body_bytes,
    decode_secret,
    parse_retry_after,
    sign,
    verify,
)
from tests.test_delivery_support import OTHER_SECRET, SECRET

# The specification's published test vector (also the reference libraries' own test).
VECTOR_ID = "msg_p5jXN8AQM9LWM0D4loKWxJek"
VECTOR_TS = 1614265330
VECTOR_BODY = b'{"test": 2432232314}'
VECTOR_SIGNATURE = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)
payloads = st.dictionaries(st.text(), json_values, max_size=6)
secrets = st.binary(min_size=24, max_size=64).map(
    lambda key: "whsec_" + base64.b64encode(key).decode())
msg_ids = st.text(min_size=1, max_size=60).filter(lambda s: s == s.strip() and " " not in s)


def test_signer_reproduces_the_published_test_vector() -> None:
    key = decode_secret(SECRET)
    assert sign(VECTOR_ID, VECTOR_TS, VECTOR_BODY, [key]) == VECTOR_SIGNATURE
    when = datetime.fromtimestamp(VECTOR_TS, UTC)
    assert Webhook(SECRET).sign(VECTOR_ID, when, VECTOR_BODY.decode()) == VECTOR_SIGNATURE
    headers = {"webhook-id": VECTOR_ID, "webhook-timestamp": str(VECTOR_TS),
               "webhook-signature": VECTOR_SIGNATURE}
    assert verify(VECTOR_BODY, headers, [key], now=VECTOR_TS + 10) == VECTOR_ID


def test_secrets_in_every_accepted_form_give_the_same_key() -> None:
    key = decode_secret(SECRET)
    assert decode_secret(SECRET.removeprefix("whsec_")) == key
    assert decode_secret(key) == key
    for bad in ("whsec_", "whsec_not base64!", "whsec_" + base64.b64encode(b"short").decode()):
        with pytest.raises(ConfigError):
            decode_secret(bad)


def _send_headers(secret_list: list[str], msg_id: str, payload: dict[str, Any],
                  now: datetime) -> tuple[bytes, dict[str, str]]:
    sender = WebhookSender("hook", "http://127.0.0.1:9/", secret_list, clock=lambda: now)
    try:
        body = body_bytes(payload)
        return body, sender.request_headers(msg_id, int(now.timestamp()), body)
    finally:
        sender.close()


@settings(max_examples=150, deadline=None)
@given(secret=secrets, other=secrets, msg_id=msg_ids, payload=payloads,
       position=st.integers(min_value=0))
def test_any_delivery_verifies_with_the_reference_library_and_a_changed_byte_fails(
    secret: str, other: str, msg_id: str, payload: dict[str, Any], position: int
) -> None:
    body, headers = _send_headers([other, secret], msg_id, payload, datetime.now(UTC))
    assert Webhook(secret).verify(body, headers) == payload
    assert verify(body, headers, [decode_secret(secret)], now=time.time()) == msg_id

    ascii_at = [i for i, b in enumerate(body) if b < 0x80]
    i = ascii_at[position % len(ascii_at)]
    tampered = body[:i] + (b"0" if body[i] != ord("0") else b"1") + body[i + 1 :]
    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(tampered, headers)
    with pytest.raises(SignatureError):
        verify(tampered, headers, [decode_secret(secret)], now=time.time())


@settings(max_examples=100, deadline=None)
@given(secret=secrets, msg_id=msg_ids, payload=payloads,
       timestamp=st.integers(min_value=0, max_value=2**33))
def test_signature_matches_the_reference_signer_at_any_timestamp(
    secret: str, msg_id: str, payload: dict[str, Any], timestamp: int
) -> None:
    body = body_bytes(payload)
    ours = sign(msg_id, timestamp, body, [decode_secret(secret)])
    theirs = Webhook(secret).sign(msg_id, datetime.fromtimestamp(timestamp, UTC), body.decode())
    assert ours == theirs


def test_stale_or_unsigned_requests_are_refused() -> None:
    key = decode_secret(SECRET)
    now = int(time.time())
    body = b"{}"
    good = {"webhook-id": "a", "webhook-timestamp": str(now),
            "webhook-signature": sign("a", now, body, [key])}
    assert verify(body, good, [key], now=now) == "a"
    with pytest.raises(SignatureError, match="tolerance"):
        verify(body, good, [key], now=now + 301)
    with pytest.raises(SignatureError, match="missing"):
        verify(body, {"webhook-id": "a"}, [key], now=now)
    with pytest.raises(SignatureError, match="no webhook-signature"):
        verify(body, good, [decode_secret(OTHER_SECRET)], now=now)


def test_body_is_identical_for_every_attempt() -> None:
    alert = Alert("alr_1", "hook", "incident.opened", "inc_1",
                  {"type": "incident.opened", "data": {"b": 1, "a": [1.5, "é"]}}, 0,
                  datetime.now(UTC))
    assert body_bytes(alert.payload) == body_bytes(dict(reversed(alert.payload.items())))
    assert body_bytes(alert.payload) == (
        '{"data":{"a":[1.5,"é"],"b":1},"type":"incident.opened"}'.encode())


NOW = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("120", 120.0),
        (" 0 ", 0.0),
        (format_datetime(NOW + timedelta(seconds=90), usegmt=True), 90.0),
        (format_datetime(NOW - timedelta(hours=1), usegmt=True), 0.0),  # in the past: now
        ("99999999999999999999", 3600.0),  # bounded
        ("-5", None),
        ("soon", None),
        ("", None),
        (None, None),
    ],
)
def test_retry_after_forms(value: str | None, expected: float | None) -> None:
    assert parse_retry_after(value, now=NOW, maximum=3600.0) == expected


@settings(max_examples=300, deadline=None)
@given(value=st.text() | st.from_regex(r"\d{1,30}", fullmatch=True)
       | st.datetimes(timezones=st.just(UTC)).map(lambda d: format_datetime(d, usegmt=True)),
       maximum=st.floats(min_value=0, max_value=1e9))
def test_retry_after_parser_never_raises_and_is_bounded(value: str, maximum: float) -> None:
    seconds = parse_retry_after(value, now=NOW, maximum=maximum)
    assert seconds is None or 0.0 <= seconds <= maximum


@given(attempt=st.integers(min_value=-5, max_value=10_000), seed=st.integers(),
       retry_after=st.none() | st.floats(min_value=0, max_value=1e7))
def test_backoff_delay_is_positive_and_bounded(attempt: int, seed: int,
                                               retry_after: float | None) -> None:
    import random

    backoff = Backoff(base=0.5, cap=600.0, max_retry_after=3600.0)
    delay = backoff.delay(attempt, random.Random(seed), retry_after)
    assert 0 < delay <= 3600.0
    if retry_after is not None:
        assert delay >= min(retry_after, 3600.0)


def test_the_receiver_checks_signatures_when_given_a_secret() -> None:
    from detector.sinks.receiver import WebhookReceiver

    alert = Alert("alr_1", "hook", "incident.opened", "inc_1", {"type": "incident.opened"}, 0,
                  datetime.now(UTC))
    with WebhookReceiver(secrets=[SECRET]) as rx:
        wrong = WebhookSender("hook", rx.url, [OTHER_SECRET])
        right = WebhookSender("hook", rx.url, [OTHER_SECRET, SECRET])  # during a rotation
        try:
            refused = wrong.send(alert)
            accepted = right.send(alert)
        finally:
            wrong.close()
            right.close()
    assert (refused.delivered, refused.outcome, refused.status) == (False, "http_error", 401)
    assert (accepted.delivered, accepted.outcome, accepted.status) == (True, "success", 200)
    assert [r.verified for r in rx.requests()] == [False, True]
    assert list(rx.deliveries_by_id()) == ["alr_1"] and len(rx.successes()) == 1

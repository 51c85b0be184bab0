"""Slack delivery through an incoming webhook: a text fallback plus Block Kit blocks.

Slack answers 429 with ``Retry-After`` when rate limited; the outbox honours it. Slack does not
deduplicate, so the rare resend after a crash shows twice in the channel; the message names the
alert id so a reader can tell.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Final

import httpx

from detector.sinks.outbox import Alert, Clock, Result, cut, utc_now
from detector.sinks.webhook import DEFAULT_TIMEOUT, HttpEndpoint, body_bytes, post

TITLES: Final = {
    "incident.opened": "New incident",
    "incident.escalated": "Incident escalated",
    "incident.resolved": "Incident resolved",
}
SEVERITY_MARK: Final = {
    "low": ":large_blue_circle:",
    "medium": ":large_yellow_circle:",
    "high": ":large_orange_circle:",
    "critical": ":red_circle:",
}
_HEADER_MAX: Final = 150  # Slack's limit for a header block
_FIELD_MAX: Final = 1900  # below Slack's 2,000 per field
_TEXT_MAX: Final = 2900  # below Slack's 3,000 per section


def escape(text: str) -> str:
    """Escape the three characters Slack's mrkdwn treats as markup."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _listing(values: Sequence[Any] | None, limit: int = 5) -> str:
    items = [str(v) for v in (values or [])]
    if not items:
        return "unknown"
    more = len(items) - limit
    return ", ".join(items[:limit]) + (f" and {more} more" if more > 0 else "")


def incident_link(external_url: str | None, incident_id: str) -> str | None:
    """Where a reader opens the incident, when the service has an external base URL."""
    if not external_url:
        return None
    return f"{external_url.rstrip('/')}/v1/incidents/{incident_id}"


def slack_message(alert_id: str, kind: str, doc: Mapping[str, Any],
                  *, external_url: str | None = None) -> dict[str, Any]:
    """The incoming-webhook body for one alert about incident document ``doc``."""
    title = TITLES.get(kind, kind)
    severity = str(doc.get("severity", "unknown"))
    principal = str(doc.get("principal", "unknown"))
    rows = int(doc.get("rows_read") or 0)
    tables = _listing(doc.get("tables"))
    reason = str(doc.get("reason") or "anomalous database access")
    incident_id = str(doc.get("id", ""))
    link = incident_link(external_url, incident_id)
    mark = SEVERITY_MARK.get(severity, ":white_circle:")

    text = cut(escape(
        f"[{severity.upper()}] {title}: {principal} read {rows:,} rows from {tables}. {reason}"
    ), _TEXT_MAX - 300)
    if link:
        text += f" <{link}|{escape(incident_id)}>"
    fields = {
        "Severity": f"{mark} {severity}",
        "Principal": f"`{principal}`",
        "Rows read": f"{rows:,}",
        "Tables": tables,
        "Tenants touched": str(doc.get("tenants_touched", "unknown")),
        "From": f"{_listing(doc.get('addresses'), 3)} via {_listing(doc.get('client_apps'), 3)}",
        "Seen": f"{doc.get('first_seen', '?')} → {doc.get('last_seen', '?')}",
        "Score": f"{float(doc.get('anomaly_score') or 0.0):.3f} ({doc.get('events', 0)} events)",
    }
    blocks: list[dict[str, Any]] = [
        {"type": "header", "text": {"type": "plain_text", "emoji": True,
                                     "text": cut(f"{mark} {title}: {principal}", _HEADER_MAX)}},
        {"type": "section", "text": {"type": "mrkdwn", "text": cut(f"*{escape(reason)}*",
                                                                     _TEXT_MAX)}},
        {"type": "section", "fields": [
            {"type": "mrkdwn", "text": cut(f"*{name}*\n{escape(value)}", _FIELD_MAX)}
            for name, value in fields.items()
        ]},
    ]
    features = [f for f in (doc.get("top_features") or []) if isinstance(f, Mapping)][:5]
    if features:
        lines = [f"• {f.get('feature')}: {f.get('actual')} (typical {f.get('typical')})"
                 for f in features]
        blocks.append({"type": "section", "text": {
            "type": "mrkdwn", "text": cut("*Why*\n" + escape("\n".join(lines)), _TEXT_MAX)}})
    if link:
        blocks.append({"type": "actions", "elements": [
            {"type": "button", "text": {"type": "plain_text", "text": "Open incident"},
             "url": link}]})
    blocks.append({"type": "context", "elements": [{"type": "mrkdwn", "text": escape(
        f"exfilwatch · incident {incident_id} · status {doc.get('status', '?')} · "
        f"alert {alert_id}")}]})
    return {"text": text, "blocks": blocks}


class SlackSender(HttpEndpoint):
    """Posts alerts to a Slack incoming-webhook ``url``. ``external_url`` is the service's
    address as readers reach it (adds a link to each incident)."""

    def __init__(
        self,
        name: str,
        url: str,
        *,
        client: httpx.Client | None = None,
        timeout: float | httpx.Timeout = DEFAULT_TIMEOUT,
        external_url: str | None = None,
        headers: Mapping[str, str] | None = None,
        clock: Clock = utc_now,
    ) -> None:
        super().__init__(url, client=client, timeout=timeout, headers=headers)
        self._name = name
        self.external_url = external_url
        self.clock = clock

    @property
    def name(self) -> str:
        return self._name

    def send(self, alert: Alert) -> Result:
        doc = alert.payload.get("data") or {}
        message = slack_message(alert.id, alert.kind, doc, external_url=self.external_url)
        return post(self.client, self.url, body_bytes(message), self.headers, clock=self.clock)


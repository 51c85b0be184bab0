"""Anomalous events become incidents: one per principal and address (or session), split where
the principal has been quiet for ``gap``. Failed logins group by address instead, so a password
spray over fifty accounts is one incident, not fifty.

Incident ids are derived from the group key and the first event, so scoring the same events
twice yields the same ids (idempotent updates downstream).
"""

from __future__ import annotations

import hashlib
import itertools
from collections import Counter
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any, Final

import polars as pl

from detector.redact import redact_sql

DEFAULT_GAP_S: Final = 1800.0
HEAVY_ROWS: Final = 10_000
HEAVY_COVERAGE: Final = 0.5
HEAVY_TENANTS: Final = 100


def key_expr() -> pl.Expr:
    """The grouping key of an event."""
    where = pl.coalesce(pl.col("client_ip"), pl.col("session_id"), pl.lit("-"))
    return (
        pl.when(pl.col("action") == "login_failed")
        .then(pl.concat_str(pl.lit("address:"), where))
        .otherwise(pl.concat_str(pl.lit("principal:"), pl.col("db_user"), pl.lit("@"), where))
    )


def segment(anomalies: pl.DataFrame, gap_s: float = DEFAULT_GAP_S) -> pl.DataFrame:
    """Sort by key and time and add ``incident_seq``: one value per incident."""
    frame = anomalies.with_columns(_key=key_expr()).sort("_key", "event_time")
    gap = pl.duration(seconds=gap_s)
    new = (
        (pl.col("_key") != pl.col("_key").shift(1))
        | ((pl.col("event_time") - pl.col("event_time").shift(1)) > gap)
    ).fill_null(True)
    return frame.with_columns(incident_seq=new.cum_sum())


def count(anomalies: pl.DataFrame, gap_s: float = DEFAULT_GAP_S) -> int:
    """Number of incidents the given anomalous events form."""
    if anomalies.height == 0:
        return 0
    last = (
        segment(
            anomalies.select("event_time", "action", "client_ip", "session_id", "db_user"), gap_s
        )["incident_seq"].max()
        or 0
    )
    return int(last) if isinstance(last, int | float) else 0


def build(
    anomalies: pl.DataFrame,
    *,
    explain: Callable[[Mapping[str, Any]], dict[str, Any]],
    severity: Callable[[float, bool], str],
    gap_s: float = DEFAULT_GAP_S,
) -> list[dict[str, Any]]:
    """Incident records from scored anomalous events (feature rows with ``anomaly_score``)."""
    if anomalies.height == 0:
        return []
    incidents = []
    # rows one at a time, grouped as they come (segment sorts by incident): a frame per
    # incident would cost kilobytes per column each, hundreds of MiB in an alert storm
    rows = segment(anomalies, gap_s).iter_rows(named=True)
    for _seq, part in itertools.groupby(rows, key=lambda r: r["incident_seq"]):
        incidents.append(_incident(list(part), explain, severity))
    incidents.sort(key=lambda inc: (inc["first_seen"], inc["id"]))
    return incidents


def _incident(
    rows: list[dict[str, Any]],
    explain: Callable[[Mapping[str, Any]], dict[str, Any]],
    severity: Callable[[float, bool], str],
) -> dict[str, Any]:
    peak = max(rows, key=lambda r: r["anomaly_score"])
    first: datetime = rows[0]["event_time"]
    last: datetime = rows[-1]["event_time"]
    key = rows[0]["_key"]
    users = Counter(r["db_user"] for r in rows)
    reading = [r for r in rows if r["action"] in ("read", "copy")]
    rows_read = sum(int(r["row_count"] or 0) for r in reading)
    tenants = _distinct(r["tenant_id"] for r in rows)
    tables = _distinct(t for r in rows for t in (r["tables"] or []))
    coverage = max((r.get("coverage_ratio") or 0.0) for r in rows)
    heavy = rows_read >= HEAVY_ROWS or coverage >= HEAVY_COVERAGE or len(tenants) >= HEAVY_TENANTS
    explanation = explain(peak)
    digest = hashlib.sha256(f"{key}|{first.isoformat()}".encode()).hexdigest()[:16]
    return {
        "id": f"inc_{digest}",
        "status": "open",
        "principal": users.most_common(1)[0][0],
        "principals": sorted(users),
        "group_key": key,
        "first_seen": first.isoformat(),
        "last_seen": last.isoformat(),
        "events": len(rows),
        "sessions": _distinct(r["session_id"] for r in rows)[:20],
        "addresses": _distinct(r["client_ip"] for r in rows),
        "client_apps": _distinct(r["client_app"] for r in rows),
        "actions": dict(Counter(r["action"] for r in rows)),
        "tables": tables[:50],
        "tenants_touched": len(tenants),
        "tenants": tenants[:20],
        "rows_read": rows_read,
        "max_table_coverage": round(float(coverage), 4),
        "anomaly_score": round(float(peak["anomaly_score"]), 6),
        "severity": severity(float(peak["anomaly_score"]), heavy),
        "reason": explanation["reason"],
        "top_features": explanation["top_features"],
        "statement": redact_sql(peak["statement_text"]) if peak.get("statement_text") else None,
    }


def _distinct(values: Any) -> list[Any]:
    return list(dict.fromkeys(v for v in values if v is not None))

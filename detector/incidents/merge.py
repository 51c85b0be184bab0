"""Live incidents: fold the incidents one micro-batch forms into the ones already stored.

A micro-batch's anomalies are grouped exactly as in batch scoring (:mod:`grouping`); each piece
then either extends the stored incident with the same key whose last event is within the gap,
or opens a new one. The new incident keeps the piece's deterministic id, so reprocessing the
same events after a crash yields the same incident.
"""

from __future__ import annotations

from collections import Counter
from datetime import datetime, timedelta
from typing import Any, Final

from detector.schema import SEVERITY_RANK

ACTIVE: Final = ("open", "acknowledged", "false_positive")
_CAPS: Final = {
    "sessions": 20,
    "addresses": 50,
    "client_apps": 50,
    "tables": 50,
    "tenants": 20,
    "principals": 50,
}


def extends(stored: dict[str, Any], piece: dict[str, Any], gap_s: float) -> bool:
    """Whether ``piece`` continues ``stored`` (same key, active, within the gap)."""
    if stored["status"] not in ACTIVE or stored.get("group_key") != piece.get("group_key"):
        return False
    last = datetime.fromisoformat(stored["last_seen"])
    first = datetime.fromisoformat(piece["first_seen"])
    return first - last <= timedelta(seconds=gap_s)


def fold(stored: dict[str, Any], piece: dict[str, Any]) -> dict[str, Any]:
    """``stored`` extended by ``piece`` (a new dict; neither input changes)."""
    out = dict(stored)
    out["first_seen"] = min(stored["first_seen"], piece["first_seen"], key=datetime.fromisoformat)
    out["last_seen"] = max(stored["last_seen"], piece["last_seen"], key=datetime.fromisoformat)
    out["events"] = stored["events"] + piece["events"]
    out["rows_read"] = stored["rows_read"] + piece["rows_read"]
    for field, cap in _CAPS.items():
        merged = list(dict.fromkeys([*stored.get(field, []), *piece.get(field, [])]))
        out[field] = merged[:cap]
    # a lower bound once the tenant list is capped: the exact count needs the events
    out["tenants_touched"] = max(
        stored["tenants_touched"], piece["tenants_touched"], len(out["tenants"])
    )
    out["actions"] = dict(Counter(stored.get("actions", {})) + Counter(piece.get("actions", {})))
    out["max_table_coverage"] = max(stored["max_table_coverage"], piece["max_table_coverage"])
    if piece["anomaly_score"] > stored["anomaly_score"]:
        for field in ("anomaly_score", "reason", "top_features", "statement"):
            out[field] = piece[field]
    if SEVERITY_RANK[piece["severity"]] > SEVERITY_RANK[stored["severity"]]:
        out["severity"] = piece["severity"]
    return out


def escalated(before: dict[str, Any], after: dict[str, Any]) -> bool:
    return SEVERITY_RANK[after["severity"]] > SEVERITY_RANK[before["severity"]]


def pattern(doc: dict[str, Any]) -> str:
    """The false-positive pattern of an incident: its grouping key (principal and address)."""
    return str(doc["group_key"])


def covered(doc: dict[str, Any], verdict_tables: list[str]) -> bool:
    """Whether a false-positive verdict over ``verdict_tables`` covers ``doc``: same pattern
    (checked by the caller) and no table the verdict did not see."""
    return set(doc.get("tables", [])) <= set(verdict_tables)

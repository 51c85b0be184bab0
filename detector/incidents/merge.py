"""One incident as it grows, an anomalous event at a time.

An :class:`Incident` starts from its first event (:meth:`Incident.open`) or from its stored
document (:meth:`Incident.restore`) and takes events one by one (:meth:`Incident.add`). What it
keeps is a function of its events alone, in bounded space: totals, a running peak, the first
few distinct sessions, tables and client applications, and distinct counts of principals,
addresses and tenants (:mod:`detector.incidents.distinct`) with samples of each. So an incident
built in one pass over its events and one folded batch after batch, stored and restored in
between, are the same incident, and its severity is always graded on all of it.
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

from detector.incidents.distinct import Distinct

#: Statuses in which an incident still takes events (a false positive takes them silently).
ACTIVE: Final = ("open", "acknowledged", "false_positive")
HEAVY_ROWS: Final = 10_000
HEAVY_COVERAGE: Final = 0.5
HEAVY_TENANTS: Final = 100
#: How many of the first distinct values an incident shows, per field.
SAMPLES: Final = {
    "principals": 50,
    "addresses": 50,
    "tenants": 20,
    "sessions": 20,
    "client_apps": 50,
    "tables": 50,
}
#: The document key of the distinct counters' state: kept in the store, never shown.
STATE: Final = "_distinct"
_COUNTED: Final = ("principals", "addresses", "tenants")
_LISTED: Final = ("sessions", "client_apps", "tables")
_READS: Final = ("read", "copy")


@dataclass(frozen=True, slots=True)
class Event:
    """What an incident needs of one anomalous event (``index`` is its row in the batch)."""

    index: int
    time: datetime
    user: str
    action: str
    address: str | None
    session: str | None
    client_app: str | None
    tenant: str | None
    tables: tuple[str, ...]
    rows: int  # rows read (reads and COPY ... TO); 0 for anything else
    coverage: float  # the table coverage it reached, to 4 places as the document shows it
    score: float  # anomaly_score, to 6 places as the document shows it


def incident_id(key: str, first: datetime) -> str:
    """Derived from the group key and the first event, so scoring the same events again gives
    the same id (idempotent updates downstream)."""
    digest = hashlib.sha256(f"{key}|{first.isoformat()}".encode()).hexdigest()[:16]
    return f"inc_{digest}"


#: Explains a peak: the batch's row at an index -> reason, top_features, statement.
Explainer = Callable[[int], dict[str, Any]]


class Incident:
    """One incident's running state (see the module docstring)."""

    def __init__(self, key: str, first: Event, explainer: Explainer | None) -> None:
        self.id = incident_id(key, first.time)
        self.key = key
        self.status = "open"
        self.principal = first.user  # the principal it began with
        self.first_seen = first.time
        self.last_seen = first.time
        self.events = 0
        self.actions: Counter[str] = Counter()
        self.rows_read = 0
        self.coverage = 0.0
        self.score = -math.inf
        self.severity = "low"
        self.counted = {name: Distinct() for name in _COUNTED}
        self.listed: dict[str, list[str]] = {name: [] for name in _LISTED}
        self.peak: dict[str, Any] = {"reason": None, "top_features": [], "statement": None}
        self.extra: dict[str, Any] = {}
        self._explain_peak: Callable[[], dict[str, Any]] | None = None
        self.add(first, explainer)

    @classmethod
    def restore(cls, doc: Mapping[str, Any]) -> Incident:
        """The incident a stored document describes, ready to take more events."""
        inc = cls.__new__(cls)
        inc.id = str(doc["id"])
        inc.key = str(doc["group_key"])
        inc.status = str(doc.get("status", "open"))
        inc.principal = str(doc["principal"])
        inc.first_seen = datetime.fromisoformat(doc["first_seen"])
        inc.last_seen = datetime.fromisoformat(doc["last_seen"])
        inc.events = int(doc["events"])
        inc.actions = Counter(doc.get("actions") or {})
        inc.rows_read = int(doc["rows_read"])
        inc.coverage = float(doc["max_table_coverage"])
        inc.score = float(doc["anomaly_score"])
        inc.severity = str(doc["severity"])
        state = doc.get(STATE) or {}
        inc.counted = {
            # a document written before the counters were kept starts them from its samples
            name: Distinct.restore(state[name]) if name in state else Distinct(doc.get(name) or [])
            for name in _COUNTED
        }
        inc.listed = {name: list(doc.get(name) or []) for name in _LISTED}
        inc.peak = {k: doc.get(k) for k in ("reason", "top_features", "statement")}
        inc.extra = {k: v for k, v in doc.items() if k not in _OWN}
        inc._explain_peak = None
        return inc

    def add(self, ev: Event, explainer: Explainer | None) -> None:
        """Fold one more event in (``explainer`` explains it, should it become the peak)."""
        self.first_seen = min(self.first_seen, ev.time)
        self.last_seen = max(self.last_seen, ev.time)
        self.events += 1
        self.actions[ev.action] += 1
        self.rows_read += ev.rows
        self.coverage = max(self.coverage, ev.coverage)
        if ev.score > self.score:  # the first of equal peaks stays the peak
            self.score = ev.score
            if explainer is not None:
                index = ev.index
                self._explain_peak = lambda: explainer(index)
        self.counted["principals"].add(ev.user)
        for name, value in (("addresses", ev.address), ("tenants", ev.tenant)):
            if value is not None:
                self.counted[name].add(value)
        for name, values in (
            ("sessions", (ev.session,)),
            ("client_apps", (ev.client_app,)),
            ("tables", ev.tables),
        ):
            kept = self.listed[name]
            for value in values:
                if value is not None and len(kept) < SAMPLES[name] and value not in kept:
                    kept.append(value)

    @property
    def heavy(self) -> bool:
        """A large volume, half a table or many tenants: what lifts a high incident to
        critical."""
        return (
            self.rows_read >= HEAVY_ROWS
            or self.coverage >= HEAVY_COVERAGE
            or self.counted["tenants"].at_least(HEAVY_TENANTS)
        )

    def names_only(self, user: str) -> bool:
        """Whether ``user`` is the one principal among its events."""
        names = self.counted["principals"]
        return names.exact and names.values == [user]

    def document(self) -> dict[str, Any]:
        """The incident document (a new dict), with the counters' state under :data:`STATE`."""
        if self._explain_peak is not None:
            self.peak = self._explain_peak()
            self._explain_peak = None
        counted = self.counted
        return {
            **self.extra,
            "id": self.id,
            "status": self.status,
            "principal": self.principal,
            "principals": counted["principals"].values[: SAMPLES["principals"]],
            "principals_count": counted["principals"].count,
            "group_key": self.key,
            "first_seen": self.first_seen.isoformat(),
            "last_seen": self.last_seen.isoformat(),
            "events": self.events,
            "sessions": list(self.listed["sessions"]),
            "addresses": counted["addresses"].values[: SAMPLES["addresses"]],
            "addresses_count": counted["addresses"].count,
            "client_apps": list(self.listed["client_apps"]),
            "actions": dict(self.actions),
            "tables": list(self.listed["tables"]),
            "tenants_touched": counted["tenants"].count,
            "tenants": counted["tenants"].values[: SAMPLES["tenants"]],
            "rows_read": self.rows_read,
            "max_table_coverage": self.coverage,
            "anomaly_score": self.score,
            "severity": self.severity,
            "reason": self.peak["reason"],
            "top_features": self.peak["top_features"],
            "statement": self.peak["statement"],
            STATE: {name: counter.dump() for name, counter in counted.items()},
        }


_OWN: Final = frozenset(
    (
        "id",
        "status",
        "principal",
        "principals",
        "principals_count",
        "group_key",
        "first_seen",
        "last_seen",
        "events",
        "sessions",
        "addresses",
        "addresses_count",
        "client_apps",
        "actions",
        "tables",
        "tenants_touched",
        "tenants",
        "rows_read",
        "max_table_coverage",
        "anomaly_score",
        "severity",
        "reason",
        "top_features",
        "statement",
        STATE,
    )
)


def shown(doc: Mapping[str, Any]) -> dict[str, Any]:
    """The document without the counters' state (what the API, alerts and files show)."""
    return {k: v for k, v in doc.items() if k != STATE}


def pattern(doc: Mapping[str, Any]) -> str:
    """The false-positive pattern of an incident: its grouping key (principal and address)."""
    return str(doc["group_key"])


def covered(tables: list[str] | tuple[str, ...], verdict_tables: list[str]) -> bool:
    """Whether a false-positive verdict over ``verdict_tables`` covers an incident that has
    read ``tables``: same pattern (checked by the caller) and no table the verdict did not
    see."""
    return set(tables) <= set(verdict_tables)

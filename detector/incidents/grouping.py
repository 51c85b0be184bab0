"""Anomalous events become incidents, one event at a time, in the order they arrive.

Which incident an event joins is decided by the events before it and nothing else, so batch
scoring (one pass over everything) and the live service (micro-batches, restarts, the store in
between) form the same incidents and raise the same alerts:

- a principal's activity groups per principal and place (address, or the session when the log
  names no address): ``principal:NAME@PLACE``;
- failed logins group per address (``address:ADDR``; ``address:-`` when the log names none):
  a password or name spray from one address is one incident with the number of names tried
  (``principals_count``) and the first of them (``principals``);
- a spray from many places at one principal is one incident for the principal,
  ``principal:NAME@*``, with the number of addresses (``addresses_count``): failed logins for a
  name that another address's incident tried alone turn that incident into the principal's,
  and activity at a further place joins it once the principal is anomalous at
  :data:`SPRAY_PLACES` places at once (an application's servers, up to that many, stay apart).

An event joins an active incident with its key (open, acknowledged or a false positive) when
it comes within ``gap`` of the incident's last event; otherwise it opens a new one.

Severity is graded on the whole incident after every event: its peak score with ``heavy``
(10,000 rows read, half a table, or 100 tenants). The alerts follow the events: an incident is
announced (``incident.opened``) as it stands at its first event, and ``incident.escalated``
is raised at the event that lifts its severity, carrying the incident as it stands then, so
neither what is sent nor its counts depend on where the stream was cut into batches.

Incident ids are derived from the group key and the first event, so scoring the same events
twice yields the same ids (idempotent updates downstream).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from datetime import timedelta
from typing import Any, Final

import polars as pl

from detector.incidents.merge import ACTIVE, Event, Explainer, Incident, covered, shown
from detector.redact import redact_shown
from detector.schema import SEVERITY_RANK

DEFAULT_GAP_S: Final = 1800.0
FAILED: Final = "login_failed"
#: A principal anomalous at this many places at once (each an incident of its own) is being
#: sprayed: activity at any further place joins one incident for the principal.
SPRAY_PLACES: Final = 8

#: An alert: kind, the incident document as the event that raised it left it, detail.
Alert = tuple[str, dict[str, Any], str]
#: A false-positive verdict that silences a new incident: (group key, tables) -> its record.
Suppress = Callable[[str, tuple[str, ...]], dict[str, Any] | None]


def place_key(user: str, place: str) -> str:
    return f"principal:{user}@{place}"


def spray_key(user: str) -> str:
    return f"principal:{user}@*"


def address_key(address: str) -> str:
    return f"address:{address}"


def candidate_keys(anomalies: pl.DataFrame) -> list[str]:
    """Every group key the events of ``anomalies`` could join or open."""
    failed = pl.col("action") == FAILED
    keys = anomalies.select(
        own=pl.when(failed)
        .then(pl.concat_str(pl.lit("address:"), pl.coalesce("client_ip", pl.lit("-"))))
        .otherwise(
            pl.concat_str(
                pl.lit("principal:"),
                pl.col("db_user"),
                pl.lit("@"),
                pl.coalesce("client_ip", "session_id", pl.lit("-")),
            )
        ),
        spray=pl.concat_str(pl.lit("principal:"), pl.col("db_user"), pl.lit("@*")),
    )
    return sorted(set(keys["own"].to_list()) | set(keys["spray"].to_list()))


class Grouping:
    """Anomalous events folded into incidents (see the module docstring).

    ``stored`` are the incidents already known (the live service passes the active ones its
    batch can touch); ``suppress`` finds the false-positive verdict, if any, that silences a new
    incident. Without ``explain`` and ``severity`` it only groups (for counting)."""

    def __init__(
        self,
        *,
        explain: Callable[[Mapping[str, Any]], dict[str, Any]] | None = None,
        severity: Callable[[float, bool], str] | None = None,
        gap_s: float = DEFAULT_GAP_S,
        stored: Iterable[Mapping[str, Any]] = (),
        suppress: Suppress | None = None,
    ) -> None:
        self._explain = explain
        self._severity = severity
        self._gap = timedelta(seconds=gap_s)
        self._suppress = suppress
        self._by_key: dict[str, Incident] = {}
        self._places: dict[str, dict[str, Incident]] = {}  # principal -> its places' incidents
        self._lone: dict[str, Incident] = {}  # name -> failed logins from one address, for it alone
        self._all: dict[str, Incident] = {}
        self._touched: dict[str, Incident] = {}
        #: Ids of the incidents opened here (the rest of the touched ones were stored).
        self.opened: set[str] = set()
        #: The alerts raised, in the order of the events that raised them.
        self.alerts: list[Alert] = []
        #: New incidents a false-positive verdict silenced.
        self.suppressed = 0
        for doc in stored:
            self._adopt(Incident.restore(doc))

    # ------------------------------------------------------------------ results
    def documents(self) -> list[dict[str, Any]]:
        """Every incident, stored or opened, as documents by first event."""
        return _ordered(self._all.values())

    def changed(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """(opened, updated): the documents of the incidents opened here and of the stored ones
        that took events, as they stand now."""
        docs = _ordered(self._touched.values())
        return (
            [d for d in docs if d["id"] in self.opened],
            [d for d in docs if d["id"] not in self.opened],
        )

    # ------------------------------------------------------------------ events
    def add(self, anomalies: pl.DataFrame) -> None:
        """Fold ``anomalies`` (feature rows with ``anomaly_score``, in arrival order) in."""
        if anomalies.height == 0:
            return
        explainer = self._explainer(anomalies)
        for ev in _events(anomalies):
            inc = self._find(ev)
            if inc is None:
                own = address_key(ev.address or "-") if ev.action == FAILED else _place(ev)
                key = own if not self._sprayed(ev) else spray_key(ev.user)
                self._open(key, ev, explainer)
                continue
            before = inc.severity
            inc.add(ev, explainer)
            self._touched[inc.id] = inc
            if inc.key.startswith("address:") and not inc.names_only(inc.principal):
                self._forget_lone(inc)
            if self._severity is None:
                continue
            inc.severity = self._severity(inc.score, inc.heavy)
            rose = SEVERITY_RANK[inc.severity] > SEVERITY_RANK[before]
            if rose and inc.status != "false_positive":
                self.alerts.append(("incident.escalated", shown(inc.document()), inc.severity))

    def _find(self, ev: Event) -> Incident | None:
        """The active incident ``ev`` joins, if any (turning a lone failure into a spray)."""
        if ev.action != FAILED:
            return self._live(_place(ev), ev) or self._live(spray_key(ev.user), ev)
        inc = self._live(address_key(ev.address or "-"), ev) or self._live(spray_key(ev.user), ev)
        if inc is not None:
            return inc
        lone = self._lone.get(ev.user)
        if (
            lone is None
            or lone.status == "false_positive"
            or not self._active(lone, ev)
            or not lone.names_only(ev.user)
        ):
            return None
        # a second address tries the name another one tried alone: a spray at the principal
        self._forget_lone(lone)
        if self._by_key.get(lone.key) is lone:
            del self._by_key[lone.key]
        lone.key = spray_key(ev.user)
        self._by_key[lone.key] = lone
        return lone

    def _sprayed(self, ev: Event) -> bool:
        """Whether activity at a new place finds its principal at SPRAY_PLACES places already."""
        if ev.action == FAILED:
            return False
        places = self._places.get(ev.user)
        if not places:
            return False
        # places quiet for longer than the gap cannot count again (the store does not hand
        # them to the live service either): forget them, so a long history costs nothing here
        for key in [k for k, inc in places.items() if ev.time - inc.last_seen > self._gap]:
            del places[key]
        return sum(1 for inc in places.values() if self._active(inc, ev)) >= SPRAY_PLACES

    def _open(self, key: str, ev: Event, explainer: Explainer | None) -> None:
        inc = Incident(key, ev, explainer)
        self.opened.add(inc.id)
        self._touched[inc.id] = inc
        self._adopt(inc)
        if self._severity is None:
            return
        inc.severity = self._severity(inc.score, inc.heavy)
        verdict = self._suppress(key, ev.tables) if self._suppress is not None else None
        if verdict is not None:
            inc.status = "false_positive"
            inc.extra["suppressed_by"] = verdict
            self.suppressed += 1
            return
        self.alerts.append(("incident.opened", shown(inc.document()), ""))

    # ------------------------------------------------------------------ bookkeeping
    def _adopt(self, inc: Incident) -> None:
        self._all[inc.id] = inc
        held = self._by_key.get(inc.key)
        if held is None or (held.last_seen, held.id) < (inc.last_seen, inc.id):
            self._by_key[inc.key] = inc
        if inc.key.startswith("principal:") and inc.key != spray_key(inc.principal):
            self._places.setdefault(inc.principal, {})[inc.key] = inc
        elif inc.key.startswith("address:") and inc.names_only(inc.principal):
            held = self._lone.get(inc.principal)
            if held is None or (held.last_seen, held.id) < (inc.last_seen, inc.id):
                self._lone[inc.principal] = inc

    def _forget_lone(self, inc: Incident) -> None:
        if self._lone.get(inc.principal) is inc:
            del self._lone[inc.principal]

    def _active(self, inc: Incident, ev: Event) -> bool:
        return inc.status in ACTIVE and ev.time - inc.last_seen <= self._gap

    def _live(self, key: str, ev: Event) -> Incident | None:
        inc = self._by_key.get(key)
        return inc if inc is not None and self._active(inc, ev) else None

    def _explainer(self, anomalies: pl.DataFrame) -> Explainer | None:
        explain = self._explain
        if explain is None:
            return None
        return lambda index: _explained(anomalies.row(index, named=True), explain)


def _explained(
    peak: Mapping[str, Any], explain: Callable[[Mapping[str, Any]], dict[str, Any]]
) -> dict[str, Any]:
    """What an incident shows of its peak event: the reason, the top features, the statement."""
    explanation = explain(peak)
    return {
        "reason": explanation["reason"],
        "top_features": explanation["top_features"],
        "statement": (
            redact_shown(peak["statement_text"], peak.get("db_system"))
            if peak.get("statement_text")
            else None
        ),
    }


def _place(ev: Event) -> str:
    return place_key(ev.user, ev.address or ev.session or "-")


def _ordered(incidents: Iterable[Incident]) -> list[dict[str, Any]]:
    docs = [inc.document() for inc in incidents]
    docs.sort(key=lambda d: (d["first_seen"], d["id"]))
    return docs


def _column(frame: pl.DataFrame, name: str) -> list[Any]:
    return frame[name].to_list() if name in frame.columns else [None] * frame.height


def _events(frame: pl.DataFrame) -> Iterator[Event]:
    columns = (
        "event_time",
        "db_user",
        "action",
        "client_ip",
        "session_id",
        "client_app",
        "tenant_id",
        "tables",
        "row_count",
        "coverage_ratio",
        "anomaly_score",
    )
    rows = zip(*(_column(frame, c) for c in columns), strict=True)
    for i, (t, user, action, ip, session, app, tenant, tables, n, cov, score) in enumerate(rows):
        yield Event(
            index=i,
            time=t,
            user=user,
            action=action,
            address=ip,
            session=session,
            client_app=app,
            tenant=None if tenant is None else str(tenant),
            tables=tuple(tables or ()),
            rows=int(n or 0) if action in ("read", "copy") else 0,
            coverage=round(float(cov), 4) if cov is not None and math.isfinite(cov) else 0.0,
            score=round(float(score), 6) if score is not None else 0.0,
        )


# ---------------------------------------------------------------------------- batch
def build(
    anomalies: pl.DataFrame,
    *,
    explain: Callable[[Mapping[str, Any]], dict[str, Any]],
    severity: Callable[[float, bool], str],
    gap_s: float = DEFAULT_GAP_S,
) -> list[dict[str, Any]]:
    """Incident records from scored anomalous events (feature rows with ``anomaly_score``),
    by first event."""
    grouping = Grouping(explain=explain, severity=severity, gap_s=gap_s)
    grouping.add(anomalies)
    return [shown(doc) for doc in grouping.documents()]


def count(anomalies: pl.DataFrame, gap_s: float = DEFAULT_GAP_S) -> int:
    """Number of incidents the given anomalous events form."""
    grouping = Grouping(gap_s=gap_s)
    grouping.add(anomalies)
    return len(grouping.opened)


def verdicts(
    found: Mapping[str, list[tuple[int, list[str], str]]],
) -> Suppress:
    """A :data:`Suppress` over false-positive verdicts per pattern: (feedback id, tables,
    until)."""

    def suppress(key: str, tables: tuple[str, ...]) -> dict[str, Any] | None:
        match = next((v for v in found.get(key, []) if covered(tables, v[1])), None)
        return None if match is None else {"feedback": match[0], "until": match[2]}

    return suppress

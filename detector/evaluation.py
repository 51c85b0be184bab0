"""Evaluation against labelled logs: which scenarios were caught and how fast, how many false
incidents per day, and how many on each benign heavy activity.

An incident matches a scenario when it names one of the scenario's principals, shares an
address or session with it, and overlaps its time window (widened by ``SLACK`` after the end,
since an incident may outlive the last labelled event by its grouping gap).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Final

from detector.errors import InputError
from detector.schema import SEVERITY_RANK

SLACK: Final = timedelta(minutes=30)


def _t(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


@dataclass
class ScenarioResult:
    scenario: str
    principal: str
    start: str
    caught: bool
    time_to_detect_s: float | None
    incidents: list[str] = field(default_factory=list)
    severity: str | None = None


@dataclass
class EvalReport:
    days: float
    scenarios: list[ScenarioResult]
    incidents: int
    false_incidents: list[dict[str, Any]]
    benign_heavy: dict[str, int]

    @property
    def recall(self) -> float:
        return (
            sum(s.caught for s in self.scenarios) / len(self.scenarios) if self.scenarios else 1.0
        )

    @property
    def false_per_day(self) -> float:
        return len(self.false_incidents) / self.days if self.days > 0 else 0.0

    @property
    def precision(self) -> float:
        return 1.0 - len(self.false_incidents) / self.incidents if self.incidents else 1.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "days": self.days,
            "recall": self.recall,
            "precision": self.precision,
            "incidents": self.incidents,
            "false_incidents": len(self.false_incidents),
            "false_per_day": self.false_per_day,
            "benign_heavy": self.benign_heavy,
            "scenarios": [vars(s) for s in self.scenarios],
            "false_incident_ids": [i["id"] for i in self.false_incidents],
        }


def load_labels(path: Path) -> dict[str, Any]:
    try:
        labels: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read labels {path}: {exc}") from exc
    if "scenarios" not in labels or "start" not in labels or "end" not in labels:
        raise InputError(f"{path} is not a labels file (needs start, end, scenarios)")
    return labels


def matches(incident: dict[str, Any], scenario: dict[str, Any]) -> bool:
    principals = set(scenario.get("principals") or [scenario["principal"]])
    if not principals & set(incident["principals"]):
        return False
    shared = set(incident["addresses"]) & set(scenario.get("addresses", [])) or set(
        incident["sessions"]
    ) & set(scenario.get("sessions", []))
    if not shared:
        return False
    first, last = _t(incident["first_seen"]), _t(incident["last_seen"])
    return first <= _t(scenario["end"]) + SLACK and last >= _t(scenario["start"])


def evaluate(incidents: Sequence[dict[str, Any]], labels: dict[str, Any]) -> EvalReport:
    days = (_t(labels["end"]) - _t(labels["start"])).total_seconds() / 86400.0
    matched: set[str] = set()
    results = []
    for sc in labels["scenarios"]:
        hits = sorted((i for i in incidents if matches(i, sc)), key=lambda i: i["first_seen"])
        matched.update(i["id"] for i in hits)
        ttd = (
            max(0.0, (_t(hits[0]["first_seen"]) - _t(sc["start"])).total_seconds())
            if hits
            else None
        )
        sev = max((i["severity"] for i in hits), key=SEVERITY_RANK.__getitem__) if hits else None
        results.append(
            ScenarioResult(
                sc["scenario"],
                sc["principal"],
                sc["start"],
                bool(hits),
                ttd,
                [i["id"] for i in hits],
                sev,
            )
        )
    false = [i for i in incidents if i["id"] not in matched]
    heavy: dict[str, int] = {}
    for activity in labels.get("benign_heavy", []):
        name = activity["activity"]
        windows = [(_t(a) - SLACK, _t(b) + SLACK) for a, b in activity.get("windows", [])]
        heavy[name] = heavy.get(name, 0) + sum(
            1
            for i in false
            if activity["principal"] in i["principals"]
            and any(_t(i["first_seen"]) <= b and _t(i["last_seen"]) >= a for a, b in windows)
        )
    return EvalReport(days, results, len(incidents), false, heavy)

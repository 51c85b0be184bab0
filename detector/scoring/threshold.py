"""Threshold policy: calibrate to an alert budget, and severity bands.

The budget is in *incidents* per day, the unit a person pays for, not in events: the threshold
is the lowest score at which grouping the held-back training data's anomalies into incidents
gives at most ``budget * days`` of them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Calibration:
    value: float
    budget_per_day: float
    heldback_days: float
    heldback_incidents: int
    bands: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def calibrate(
    scores: np.ndarray,
    incidents_at: Callable[[float], int],
    *,
    days: float,
    budget_per_day: float,
    max_candidates: int = 20_000,
) -> Calibration:
    """Lowest threshold among the top held-back scores whose incident count fits the budget.

    ``incidents_at(t)`` counts incidents formed by held-back events scoring >= t.
    """
    if scores.size == 0 or days <= 0:
        raise ValueError("calibration needs held-back scores covering a positive time span")
    allowed = int(np.floor(budget_per_day * days + 1e-9))
    top = np.unique(scores)[::-1][:max_candidates]  # descending, distinct
    # incidents_at is non-increasing in t; find the last candidate index that fits.
    lo, hi = -1, len(top) - 1  # invariant: top[lo] fits (or lo = -1), answer in (lo, hi]
    if incidents_at(float(top[hi])) <= allowed:
        lo = hi
    else:
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if incidents_at(float(top[mid])) <= allowed:
                lo = mid
            else:
                hi = mid
    # when even the single highest score is over budget, alert above every score seen
    value = float(top[lo]) if lo >= 0 else float(np.nextafter(top[0], np.inf))
    if lo >= 0 and lo + 1 < len(top):  # sit between the last fitting score and the next one
        value = float((top[lo] + top[lo + 1]) / 2)
    count = incidents_at(value)
    high = max(value, float(np.nextafter(top[0], np.inf)))
    bands = {"low": value, "medium": (value + high) / 2, "high": high}
    return Calibration(value, budget_per_day, days, count, bands)


def severity(score: float, bands: dict[str, float], *, heavy: bool) -> str:
    """Severity of an incident from its peak score; ``heavy`` (a large share of a sensitive
    table or a large volume) lifts a high incident to critical."""
    if score >= bands["high"]:
        return "critical" if heavy else "high"
    if score >= bands["medium"]:
        return "high" if heavy else "medium"
    return "medium" if heavy else "low"

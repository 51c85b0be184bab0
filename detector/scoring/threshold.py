"""Threshold policy: calibrate to an alert budget, and severity bands.

The budget is in *incidents* per day, the unit a person pays for, not in events: the threshold
is the lowest score at which grouping the calibration data's anomalies into incidents gives at
most ``budget * days`` of them. All days are calibrated together, and weekdays and weekends
apart when each has days enough (MIN_REGIME_DAYS); the highest threshold holds, so a quiet
weekend cannot set a bar that floods the weekdays, and two days of a regime cannot set one
from what happened to fall on them.

Scores are surprise in log10 units (see detector.scoring.ensemble), so the bands mean a
rarity: ``medium`` is ten times rarer in normal traffic than the alert threshold, ``high``
a hundred times; ``critical`` is high and heavy (a large share of a sensitive table or a
large volume).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from typing import Any, Final

import numpy as np
import polars as pl


@dataclass(frozen=True)
class Calibration:
    value: float
    budget_per_day: float
    heldback_days: float
    heldback_incidents: int
    bands: dict[str, float]
    regimes: dict[str, float] = field(default_factory=dict)  # regime -> its own threshold

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> Calibration:
        """The calibration stored in a model's metadata, refused (ValueError naming the field)
        unless it is one :func:`calibrate_regimes` can make: a positive, finite threshold;
        bands low <= medium <= high, finite and starting at the threshold; each regime's own
        threshold at most the one that holds; a non-negative budget, a positive calibration
        span and a whole number of incidents."""
        if not isinstance(data, dict):
            raise ValueError("threshold is not a table")
        value = _number(data, "value")
        if value <= 0:
            raise ValueError(f"threshold.value is {value}: it must be positive")
        budget, days = _number(data, "budget_per_day"), _number(data, "heldback_days")
        if budget < 0 or days <= 0:
            raise ValueError("threshold.budget_per_day must be >= 0 and heldback_days > 0")
        incidents = data.get("heldback_incidents")
        if not isinstance(incidents, int) or isinstance(incidents, bool) or incidents < 0:
            raise ValueError(f"threshold.heldback_incidents is {incidents!r}, not a count")
        bands = data.get("bands")
        if not isinstance(bands, dict) or set(bands) != set(BANDS):
            raise ValueError(f"threshold.bands must name exactly {', '.join(BANDS)}")
        levels = [_number(bands, name, "threshold.bands") for name in BANDS]
        if levels[0] < value or levels != sorted(levels):
            raise ValueError(
                f"threshold.bands {dict(zip(BANDS, levels, strict=True))} must ascend from "
                f"the threshold {value}"
            )
        regimes = data.get("regimes", {})
        if not isinstance(regimes, dict):
            raise ValueError("threshold.regimes is not a table")
        per_regime = {str(k): _number(regimes, k, "threshold.regimes") for k in regimes}
        if any(not 0 <= t <= value for t in per_regime.values()):
            raise ValueError(f"threshold.regimes {per_regime} must lie in [0, {value}]")
        return cls(
            value, budget, days, incidents, dict(zip(BANDS, levels, strict=True)), per_regime
        )


#: Severity band names, lowest first.
BANDS: Final = ("low", "medium", "high")
#: The lowest threshold calibration sets (surprise: one row in a hundred).
FLOOR: Final = 2.0


def _number(table: dict[str, Any], key: str, where: str = "threshold") -> float:
    value = table.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{where}.{key} is {value!r}, not a finite number")
    return float(value)


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
    # the nearest whole number of incidents: 0.5 a day over 1.99 days allows one, not none
    allowed = int(np.floor(budget_per_day * days + 0.5))
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


#: Weekday numbers (ISO, Monday = 1) of the weekend regime.
WEEKEND: tuple[int, ...] = (6, 7)
#: A regime with less calibration time than this (days) does not set a threshold of its own:
#: one or two days of it are too few to tell its rate of incidents from chance (two weekdays
#: of a week's history, one of them the month's invoice run), and all days together set it.
MIN_REGIME_DAYS = 2.5


def regime_days(times: pl.Series) -> dict[str, float]:
    """Days of calibration time in each regime (``weekday``, ``weekend``): the span from the
    first to the last time, cut at midnights (UTC)."""
    start, end = times.min(), times.max()
    if not isinstance(start, datetime) or not isinstance(end, datetime) or end <= start:
        return {"weekday": 0.0, "weekend": 0.0}
    out = {"weekday": 0.0, "weekend": 0.0}
    day = start.replace(hour=0, minute=0, second=0, microsecond=0)
    while day < end:
        nxt = day + timedelta(days=1)
        covered = (min(nxt, end) - max(day, start)).total_seconds() / 86400.0
        out["weekend" if day.isoweekday() in WEEKEND else "weekday"] += max(0.0, covered)
        day = nxt
    return out


def calibrate_regimes(
    scores: np.ndarray,
    times: pl.Series,
    incidents_at: Callable[[np.ndarray, float], int],
    *,
    regimes: dict[str, float],
    budget_per_day: float,
    floor: float = FLOOR,
) -> Calibration:
    """The lowest threshold at which all calibration days together, and every regime with
    enough calibration time of its own, stay within the budget; ``incidents_at(rows, t)``
    counts incidents formed by the rows selected by the boolean mask ``rows`` scoring >= t.
    The threshold is never below ``floor`` (surprise: one row in a hundred)."""
    weekend = times.dt.weekday().is_in(list(WEEKEND)).to_numpy()
    masks = {"weekday": ~weekend, "weekend": weekend}
    total_days = sum(regimes.values())
    every = np.ones(scores.shape[0], dtype=bool)
    per_regime: dict[str, float] = {}
    for name, mask in masks.items():
        days = regimes.get(name, 0.0)
        if days < MIN_REGIME_DAYS or not mask.any():
            continue
        part = calibrate(
            scores[mask],
            lambda t, m=mask: incidents_at(m, t),  # type: ignore[misc]
            days=days,
            budget_per_day=budget_per_day,
        )
        per_regime[name] = part.value
    # every day together holds too (and alone when neither regime has days enough)
    whole = calibrate(
        scores,
        lambda t: incidents_at(every, t),
        days=max(total_days, 1e-6),
        budget_per_day=budget_per_day,
    )
    per_regime["all"] = whole.value
    value = max(floor, *per_regime.values())
    bands = {"low": value, "medium": value + 1.0, "high": value + 2.0}
    count = incidents_at(every, value)
    return Calibration(value, budget_per_day, total_days, count, bands, per_regime)

"""Why an event is unusual: the top contributing features with actual vs typical values, and
one line a person can act on.

A feature contributes by how far it lies beyond what the training data made ordinary:
``(x - median) / spread`` with the spread between the median and the 99th percentile of the
fit rows. Every model feature is an excess over the principal's own habit (or a novelty or
failure count), so the text names the actual value and the principal's typical one.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Final

import numpy as np

MIN_CONTRIBUTION: Final = 1.0  # at least one spread past the median to be named
TOP: Final = 4


def feature_stats(X: np.ndarray, names: tuple[str, ...] | list[str]) -> dict[str, dict[str, float]]:
    """Median and spread of each feature on the fit rows (stored in the model metadata)."""
    stats = {}
    for j, name in enumerate(names):
        col = X[:, j]
        median = float(np.median(col))
        p99 = float(np.quantile(col, 0.99))
        p999 = float(np.quantile(col, 0.999))
        spread = max(p99 - median, (p999 - median) / 3, 0.05)
        stats[name] = {"median": median, "p99": p99, "spread": spread}
    return stats


def contributions(
    row: Mapping[str, Any], stats: Mapping[str, Mapping[str, float]]
) -> list[tuple[str, float]]:
    """(feature, contribution) pairs, largest first, above MIN_CONTRIBUTION."""
    out = []
    for name, st in stats.items():
        value = float(row.get(name) or 0.0)
        z = (value - st["median"]) / st["spread"]
        if z >= MIN_CONTRIBUTION:
            out.append((name, z))
    return sorted(out, key=lambda kv: -kv[1])


def _n(x: float) -> str:
    return f"{x:,.0f}"


def _back(v: Any) -> float:
    """Undo log1p; NaN/None -> 0."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return 0.0
    return float(np.expm1(v))


def _share(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "never before"
    return f"{float(v):.0%} of its statements"


def _logins(n: float) -> str:
    return f"{_n(n)} failed login{'' if round(n) == 1 else 's'}"


def _table(row: Mapping[str, Any]) -> str:
    tables = row.get("tables") or []
    return ", ".join(tables[:3]) if tables else "a table"


def describe(
    name: str, row: Mapping[str, Any]
) -> tuple[str, float | str | None, float | str | None]:
    """(text, actual, typical) for one feature of one event row."""
    user = row.get("db_user")
    q = name.removesuffix("_excess")
    typ = row.get(f"{q}_typical")
    if q == "rows":
        actual, typical = row.get("row_count"), _back(typ)
        return (
            f"{_n(actual or 0)} rows of {_table(row)}; typical for {user}: {_n(typical)}",
            actual,
            typical,
        )
    counters = {
        "sensitive_rows_1h": "rows read from sensitive tables in the last hour",
        "sensitive_rows_24h": "rows read from sensitive tables in the last 24 h",
        "tenants_10m": "tenants touched in 10 minutes",
        "tables_1h": "tables touched in an hour",
        "rate_5m": "statements in 5 minutes",
        "fingerprint_repeats_1h": "runs of the same statement shape in an hour",
        "offset": "as pagination OFFSET",
        "new_shape_runs_1h": "runs of statement shapes new to it in an hour",
    }
    if q in counters:
        actual, typical = _back(row.get(q)), _back(typ)
        return f"{_n(actual)} {counters[q]}; typical for {user}: {_n(typical)}", actual, typical
    sessions = {
        "session_statements": "statements in the last hour",
        "session_shapes": "distinct statement shapes",
        "session_sensitive_rows": "rows of sensitive tables in the last hour",
        "session_sensitive_tables": "sensitive tables",
    }
    if q in sessions:
        actual, typical = _back(row.get(q)), _back(typ)
        return (
            f"one session ran {_n(actual)} {sessions[q]}; {user}'s sessions run at most "
            f"{_n(typical)}",
            actual,
            typical,
        )
    if q == "off_hours_sensitive_rows":
        actual, typical = _back(row.get(q)), _back(typ)
        t = row.get("event_time")
        hour = f"{t.hour:02d}:00 UTC" if t is not None else "an hour"
        return (
            f"one session read {_n(actual)} rows of sensitive tables at {hour}, when {user} "
            f"rarely works; its most at such hours: {_n(typical)}",
            actual,
            typical,
        )
    shapes = {
        "new_shape": f"a statement shape {user} never ran",
        "new_shape_sensitive": f"a statement shape {user} never ran, on {_table(row)}",
        "new_shape_anyone": "a statement shape no principal ran before",
    }
    if q == "new_sensitive_table":
        text = f"{user} never read {_table(row)} before; it reads new tables in {_share(typ)}"
        return text, 1.0, typ
    if q in shapes:
        return f"{shapes[q]}; {user} runs new shapes in {_share(typ)}", 1.0, typ
    if q == "table_coverage":
        actual = float(row.get("coverage_ratio") or 0.0)
        typical = (10 ** float(typ) - 1) / 1e4 if typ is not None and not math.isnan(typ) else 0.0
        size = row.get("table_rows")
        size_txt = f" ({_n(size)} rows)" if size and not math.isnan(size) else ""
        portion = "all" if actual >= 1.0 else f"{actual:.0%}"
        return (
            f"read {portion} of {_table(row)}{size_txt} within hours; typical for {user}: "
            f"{typical:.1%}",
            actual,
            typical,
        )
    flags = {
        "aggregate_all_tenants": "aggregate per tenant over all tenants",
        "bulk_sensitive_read": f"read {_table(row)} without a tenant filter",
        "copy_out": "exported with COPY / dump",
    }
    if q in flags:
        return f"{flags[q]}; {user} does this in {_share(typ)}", 1.0, typ
    if q == "new_address":
        return f"new address {row.get('client_ip')}", row.get("client_ip"), None
    if q == "new_client_app":
        return f"new client '{row.get('client_app')}'", row.get("client_app"), None
    if name == "off_hours":
        t = row.get("event_time")
        hour = f"{t.hour:02d}:00 UTC" if t is not None else "this hour"
        share = float(row.get("hour_share") or 0.0)
        return f"active at {hour}, when {user} rarely is ({share:.1%} of its activity)", hour, share
    if name == "failed_logins_address_1h":
        actual = _back(row.get(name))
        return (
            f"{_logins(actual)} from {row.get('client_ip')} in the last hour",
            actual,
            0,
        )
    if name == "failed_logins_principal_1h":
        usual = row.get("failed_logins_usual_1h")
        if usual is not None and usual > 0.0:
            actual, before = _back(usual), _back(row.get("failed_logins_usual_high"))
            return (
                f"{_logins(actual)} for {user} from its own address {row.get('client_ip')} in "
                f"the last hour; its most before: {_n(before)}",
                actual,
                before,
            )
        actual = _back(row.get(name))
        return f"{_logins(actual)} for {user} in the last hour", actual, 0
    if name == "new_principal":
        return f"principal {user} never seen before", 1, 0
    return name, row.get(name), typ


#: Who and from where: named in a reason whenever they contribute.
ACCESS: Final = frozenset(
    {
        "new_address_excess",
        "new_client_app_excess",
        "new_principal",
        "failed_logins_address_1h",
        "failed_logins_principal_1h",
    }
)

#: Features that say one thing: only the first of a family present is named, in this order.
FAMILIES: Final = (
    ("new_shape_anyone_excess", "new_shape_sensitive_excess", "new_shape_excess"),
    ("sensitive_rows_1h_excess", "session_sensitive_rows_excess", "sensitive_rows_24h_excess"),
)


def _one_per_family(items: list[tuple[str, float]]) -> list[tuple[str, float]]:
    present = {name for name, _ in items}
    drop = set()
    for family in FAMILIES:
        found = [f for f in family if f in present]
        drop.update(found[1:])
    return [(name, z) for name, z in items if name not in drop]


def explain(row: Mapping[str, Any], stats: Mapping[str, Mapping[str, float]]) -> dict[str, Any]:
    """The explanation of one scored event: top features and a one-line reason."""
    ranked = _one_per_family(contributions(row, stats))
    top = ranked[:TOP]
    # who and from where is always named when it contributes: it is what a person acts on
    for item in ranked[TOP:]:
        if item[0] in ACCESS and all(name not in ACCESS for name, _ in top):
            top = [*top[: TOP - 1], item]
            break
    items = []
    for name, z in top:
        text, actual, typical = describe(name, row)
        items.append(
            {
                "feature": name,
                "contribution": round(z, 2),
                "actual": _plain(actual),
                "typical": _plain(typical),
                "text": text,
            }
        )
    reason = "; ".join(i["text"] for i in items) if items else "unusual combination of features"
    return {"reason": reason, "top_features": items}


def _plain(v: Any) -> Any:
    if isinstance(v, float):
        return None if math.isnan(v) else round(v, 4)
    return v

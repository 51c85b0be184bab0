"""Settings of the feature engine: which tables are sensitive, which columns name a tenant,
and the time horizons of the per-principal state (FeatureSettings: part of the feature spec
hash, so changing any of these makes older models refuse to load against this engine); and
how much state it keeps whatever the input (StateBounds: not part of it)."""

from __future__ import annotations

import fnmatch
import re
from functools import lru_cache
from typing import Final

from pydantic import BaseModel, ConfigDict, Field

DEFAULT_TABLE_CLASSES: dict[str, list[str]] = {
    "customer": [
        "*clients",
        "*customers",
        "*organizations",
        "*organisations",
        "*accounts",
        "*users",
        "*contacts",
        "*tenants",
    ],
    "usage": ["*search_events", "*search_counts", "*usage*", "*events_daily*", "*activity*"],
    "billing": ["*invoices", "*payments", "*subscriptions", "*billing*"],
    "credentials": ["*api_keys", "*tokens", "*passwords", "*secrets", "*credentials"],
}


class FeatureSettings(BaseModel):
    """What the feature engine needs to know about the watched database."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    table_classes: dict[str, list[str]] = Field(
        default_factory=lambda: {k: list(v) for k, v in DEFAULT_TABLE_CLASSES.items()},
        description="Sensitive table classes: class name -> glob patterns over "
        "'schema.table' (lower case). A table in any class counts as sensitive.",
    )
    tenant_keys: list[str] = Field(
        default_factory=lambda: [
            "client_id",
            "tenant_id",
            "org_id",
            "organization_id",
            "customer_id",
            "account_id",
        ],
        description="Column names that identify a tenant (SaaS client) in WHERE and GROUP BY.",
    )
    tenant_tables: list[str] = Field(
        default_factory=lambda: ["*clients", "*tenants", "*organizations", "*customers"],
        description="Tables whose own primary key `id` is the tenant id (WHERE id = ... "
        "on them is a single-tenant filter).",
    )
    table_rows: dict[str, int] = Field(
        default_factory=dict,
        description="Known table sizes ('schema.table' -> rows) for coverage; sizes are "
        "also learned from whole-table reads.",
    )
    new_pair_expiry_days: float = Field(
        30.0, gt=0, description="An address or client app unseen this long is new again."
    )
    baseline_days: float = Field(
        7.0, gt=0, description="Time constant of each principal's own baseline."
    )
    peer_groups: dict[str, list[str]] = Field(
        default_factory=dict,
        description="Peer groups: group name -> glob patterns over principal names. A "
        "principal in its first day is compared with its group's habits and highs as well as "
        "its own. Principals matching no pattern whose names end in a number (analyst_4, "
        "support-12) form a group by the name without it; others have no peers.",
    )

    def peer_group(self, principal: str) -> str | None:
        """The peer group of ``principal`` (None: no peers)."""
        return _peer_group(principal, tuple((g, tuple(p)) for g, p in self.peer_groups.items()))

    def table_class(self, table: str) -> int:
        """Bitmask of the classes ``table`` belongs to (bit i = i-th class in sorted order)."""
        return _classify(table.lower(), self._patterns())

    def is_tenant_table(self, table: str) -> bool:
        name = table.lower()
        return any(fnmatch.fnmatchcase(name, p) for p in self.tenant_tables)

    def class_names(self) -> list[str]:
        return sorted(self.table_classes)

    def _patterns(self) -> tuple[tuple[str, ...], ...]:
        return tuple(tuple(p.lower() for p in self.table_classes[c]) for c in self.class_names())


class StateBounds(BaseModel):
    """How much per-principal state the engine keeps, whatever the input. Not part of the
    feature spec: a bound decides what is kept of names that never got in and of rows unused
    past their horizon (which read as new then), never what a feature means."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_unproven: int = Field(
        10_000,
        ge=0,
        description="Names never seen to get in (failed logins only) that hold a state row "
        "of their own; the failed logins of further new names share one row.",
    )
    unproven_idle_s: float = Field(
        86_400.0,
        gt=0,
        description="A name that never got in and has been quiet this long reads as new; its "
        "row is dropped.",
    )
    idle_days: int = Field(
        180,
        ge=1,
        description="A principal (or peer group) unseen for this many days of the stream "
        "(days with events; gaps do not count) reads as new; its row is dropped.",
    )


_NUMBERED: Final = re.compile(r"^(.*?[A-Za-z].*?)[_\-.]?[0-9]+$")


@lru_cache(maxsize=65536)
def _peer_group(principal: str, groups: tuple[tuple[str, tuple[str, ...]], ...]) -> str | None:
    for group, patterns in groups:
        if any(fnmatch.fnmatchcase(principal, p) for p in patterns):
            return group
    numbered = _NUMBERED.match(principal)
    return numbered.group(1) if numbered else None


@lru_cache(maxsize=65536)
def _classify(table: str, patterns: tuple[tuple[str, ...], ...]) -> int:
    mask = 0
    for bit, pats in enumerate(patterns):
        if any(fnmatch.fnmatchcase(table, p) for p in pats):
            mask |= 1 << bit
    return mask

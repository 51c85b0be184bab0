"""The web application's service account (``app_api``): most of the volume.

Many short single-tenant sessions from four application servers, following a diurnal curve.
The numbers (session starts, clients, statement counts and kinds, think times) are drawn as
numpy vectors per day; a Python loop only formats the statements.
"""

# Statement texts here are log data for a simulated audit trail, never executed: S608
# ("SQL built from strings") does not apply.
# ruff: noqa: S608

from __future__ import annotations

import random
from collections.abc import Callable
from datetime import timedelta
from typing import Final

import numpy as np
import numpy.typing as npt

from detector.samples.events import EventLog, Query, Session
from detector.samples.world import (
    ACCOUNTS,
    API_KEYS,
    APP_SETTINGS,
    CLIENTS,
    DAILY_COUNTS,
    FEATURE_FLAGS,
    INVOICES,
    SEARCH_EVENTS,
    US_PER_DAY,
    US_PER_S,
    World,
    app_intensity,
    np_rng,
    py_rng,
)

#: Statements per session are min(20, Geometric(p)): mean ~4.9.
STATEMENTS_P: Final = 0.2
MAX_STATEMENTS: Final = 20
WEEKEND_FACTOR: Final = 0.45
_BINS: Final = 144  # ten-minute bins

_SEARCH_WORDS: Final = (
    "invoice",
    "pricing",
    "red",
    "shoes",
    "laptop",
    "refund",
    "shipping",
    "warranty",
    "blue",
    "order",
    "status",
    "login",
    "reset",
    "password",
    "export",
    "report",
    "tax",
    "eu",
    "vat",
    "delivery",
    "bulk",
    "discount",
    "api",
    "limits",
    "team",
    "seats",
    "plan",
    "upgrade",
    "contract",
    "gdpr",
    "sso",
    "saml",
    "webhook",
    "latency",
    "usage",
    "storage",
    "mobile",
    "android",
    "ios",
    "widget",
)
_SETTINGS_KEYS: Final = (
    "maintenance_banner",
    "max_search_results",
    "signup_enabled",
    "default_locale",
    "support_email",
)

_OBJ: Final = {
    t: [t]
    for t in (
        ACCOUNTS,
        API_KEYS,
        APP_SETTINGS,
        CLIENTS,
        DAILY_COUNTS,
        FEATURE_FLAGS,
        INVOICES,
        SEARCH_EVENTS,
    )
}


def expected_events_per_session() -> float:
    """The login plus the mean of min(20, Geometric(p))."""
    q = 1.0 - STATEMENTS_P
    return 1.0 + (1.0 - q**MAX_STATEMENTS) / STATEMENTS_P


class AppDay:
    """Statement templates of the web application for one day and one random stream."""

    def __init__(self, world: World, day: int, rng: random.Random) -> None:
        self.world = world
        self.day = day
        self.rng = rng
        self.today = world.date_of(day)
        self.month_start = self.today.replace(day=1).isoformat()
        self.quarter_ago = (self.today - timedelta(days=90)).isoformat()
        self.days_since_month = (self.today - self.today.replace(day=1)).days + 1
        self.flags = world.size(FEATURE_FLAGS, day)
        self.day0 = world.day_start_us(day)
        self.templates: tuple[Callable[[int, str, int], Query], ...] = (
            self.client_by_id,
            self.accounts_page,
            self.account_by_email,
            self.insert_search,
            self.search_counts,
            self.touch_login,
            self.api_key,
            self.feature_flags,
            self.recent_searches,
            self.invoices,
            self.setting,
        )

    #: Relative frequency of each template, in the order of ``templates``.
    WEIGHTS: Final = (0.13, 0.15, 0.08, 0.22, 0.07, 0.10, 0.11, 0.04, 0.05, 0.03, 0.02)

    def timestamp(self, t_us: int) -> str:
        """A timestamptz literal for ``t_us`` (within a day or two of this day)."""
        offset = t_us - self.day0
        day, rest = divmod(offset, US_PER_DAY)
        date_text = (self.today + timedelta(days=day)).isoformat()
        seconds, micro = divmod(rest, US_PER_S)
        hours, seconds = divmod(seconds, 3600)
        minutes, seconds = divmod(seconds, 60)
        return f"{date_text} {hours:02d}:{minutes:02d}:{seconds:02d}.{micro // 1000:03d}+00"

    def client_by_id(self, client: int, cid: str, t_us: int) -> Query:
        """The tenant's own client row."""
        return Query(
            f"SELECT * FROM public.clients WHERE id = '{cid}'",
            _OBJ[CLIENTS],
            1,
            tenant=cid,
            width=160,
        )

    def accounts_page(self, client: int, cid: str, t_us: int) -> Query:
        """One page of the tenant's user list (offset 0..200)."""
        offset = 50 * min(4, int(self.rng.expovariate(1.4)))
        rows = max(0, min(50, int(self.world.accounts[client]) - offset))
        return Query(
            f"SELECT id, email, name FROM public.accounts WHERE client_id = '{cid}' "
            f"ORDER BY created_at DESC LIMIT 50 OFFSET {offset}",
            _OBJ[ACCOUNTS],
            rows,
            tenant=cid,
            width=70,
            scanned=rows + offset,
        )

    def account_by_email(self, client: int, cid: str, t_us: int) -> Query:
        """A sign-in lookup by e-mail (rarely a miss)."""
        email = self.world.email(client, self.world.account_id(client, self.rng))
        rows = 0 if self.rng.random() < 0.03 else 1
        return Query(
            f"SELECT id, client_id, name, role, password_hash FROM public.accounts "
            f"WHERE client_id = '{cid}' AND email = '{email}'",
            _OBJ[ACCOUNTS],
            rows,
            tenant=cid,
            width=150,
        )

    def insert_search(self, client: int, cid: str, t_us: int) -> Query:
        """A user ran a search."""
        rng = self.rng
        words = f"{rng.choice(_SEARCH_WORDS)} {rng.choice(_SEARCH_WORDS)}"
        account = self.world.account_id(client, rng)
        return Query(
            "INSERT INTO public.search_events (client_id, account_id, query, created_at) "
            f"VALUES ('{cid}', {account}, '{words}', '{self.timestamp(t_us)}')",
            _OBJ[SEARCH_EVENTS],
            1,
            "INSERT",
            "write",
            tenant=cid,
        )

    def search_counts(self, client: int, cid: str, t_us: int) -> Query:
        """The usage chart: daily search counts since the month or quarter began."""
        if self.rng.random() < 0.7:
            since, rows = self.month_start, self.days_since_month - 1
        else:
            since, rows = self.quarter_ago, 89
        return Query(
            f"SELECT day, searches FROM public.client_daily_search_counts "
            f"WHERE client_id = '{cid}' AND day >= '{since}' ORDER BY day",
            _OBJ[DAILY_COUNTS],
            max(rows, 0),
            tenant=cid,
            width=18,
        )

    def touch_login(self, client: int, cid: str, t_us: int) -> Query:
        """Record a sign-in."""
        account = self.world.account_id(client, self.rng)
        return Query(
            f"UPDATE public.accounts SET last_login_at = '{self.timestamp(t_us)}' "
            f"WHERE id = {account}",
            _OBJ[ACCOUNTS],
            1,
            "UPDATE",
            "write",
            tenant=cid,
        )

    def api_key(self, client: int, cid: str, t_us: int) -> Query:
        """Authenticate an API call by key hash."""
        key = self.world.key_hash(client, self.rng.randrange(2))
        return Query(
            f"SELECT id, client_id, scopes FROM public.api_keys WHERE key_hash = '{key}' "
            "AND revoked_at IS NULL",
            _OBJ[API_KEYS],
            1,
            tenant=cid,
            width=60,
        )

    def feature_flags(self, client: int, cid: str, t_us: int) -> Query:
        """The flag table, read whole (it is small and shared)."""
        return Query(
            "SELECT * FROM public.feature_flags", _OBJ[FEATURE_FLAGS], self.flags, width=52
        )

    def recent_searches(self, client: int, cid: str, t_us: int) -> Query:
        """A user's search history."""
        account = self.world.account_id(client, self.rng)
        rows = min(20, int(self.rng.expovariate(0.12)))
        return Query(
            f"SELECT query, created_at FROM public.search_events WHERE client_id = '{cid}' "
            f"AND account_id = {account} ORDER BY created_at DESC LIMIT 20",
            _OBJ[SEARCH_EVENTS],
            rows,
            tenant=cid,
            width=40,
            scanned=rows * 3,
        )

    def invoices(self, client: int, cid: str, t_us: int) -> Query:
        """The billing page."""
        rows = min(12, 1 + (client * 7) % 24)
        return Query(
            f"SELECT id, period, amount_cents, status FROM public.invoices "
            f"WHERE client_id = '{cid}' ORDER BY period DESC LIMIT 12",
            _OBJ[INVOICES],
            rows,
            tenant=cid,
            width=40,
        )

    def setting(self, client: int, cid: str, t_us: int) -> Query:
        """One application setting."""
        key = self.rng.choice(_SETTINGS_KEYS)
        return Query(
            f"SELECT value FROM public.app_settings WHERE key = '{key}'",
            _OBJ[APP_SETTINGS],
            1,
            width=40,
        )


def app_sessions_per_day(world: World, day: int, weekday_events: float) -> float:
    """Expected sessions on ``day`` when a weekday carries ``weekday_events`` app events."""
    factor = WEEKEND_FACTOR if world.is_weekend(day) else 1.0
    return weekday_events * factor / expected_events_per_session()


def _session_starts(
    world: World, day: int, n: int, nrng: np.random.Generator
) -> npt.NDArray[np.int64]:
    """``n`` sorted session start times (us) following the day's noisy diurnal curve."""
    hours = (np.arange(_BINS) + 0.5) * 24 / _BINS
    weights = app_intensity(hours, weekend=world.is_weekend(day))
    weights = weights * nrng.lognormal(0.0, 0.15, _BINS)
    bins = nrng.choice(_BINS, size=n, p=weights / weights.sum())
    width = US_PER_DAY // _BINS
    offsets = bins * width + nrng.integers(0, width, n)
    starts: npt.NDArray[np.int64] = np.sort(world.day_start_us(day) + offsets)
    return starts


def _client_weights(world: World, day: int) -> npt.NDArray[np.float64]:
    """Bigger tenants (more accounts) generate more sessions."""
    weights: npt.NDArray[np.float64] = world.accounts[: world.active[day]].astype(np.float64)
    return weights**0.75 / np.sum(weights**0.75)


def simulate_app_day(log: EventLog, world: World, day: int, weekday_events: float) -> None:
    """All ``app_api`` sessions of one day."""
    nrng = np_rng(world.seed, "app", day)
    rng = py_rng(world.seed, "app", day)
    expected = app_sessions_per_day(world, day, weekday_events) * nrng.lognormal(0.0, 0.06)
    n = int(nrng.poisson(expected))
    starts = _session_starts(world, day, n, nrng).tolist()
    clients = nrng.choice(world.active[day], size=n, p=_client_weights(world, day)).tolist()
    servers = nrng.integers(0, len(world.app.addresses), n).tolist()
    lengths = np.minimum(nrng.geometric(STATEMENTS_P, n), MAX_STATEMENTS)
    total = int(lengths.sum())
    kinds = nrng.choice(len(AppDay.WEIGHTS), size=total, p=_normalised(AppDay.WEIGHTS)).tolist()
    gaps = nrng.lognormal(-0.3, 1.2, total).tolist()
    templates = AppDay(world, day, rng).templates
    user, app, addresses = world.app.name, world.app.client_app, world.app.addresses
    cursor = 0
    for start, client, server, length in zip(
        starts, clients, servers, lengths.tolist(), strict=True
    ):
        session: Session = log.open(user, addresses[server], app, start, rng)
        session.advance(0.002 + 0.01 * rng.random())
        cid = world.client_ids[client]
        for i in range(cursor, cursor + length):
            t = session.advance(gaps[i])
            session.run(templates[kinds[i]](client, cid, t))
        cursor += length


def _normalised(weights: tuple[float, ...]) -> npt.NDArray[np.float64]:
    array = np.asarray(weights, dtype=np.float64)
    normalised: npt.NDArray[np.float64] = array / array.sum()
    return normalised

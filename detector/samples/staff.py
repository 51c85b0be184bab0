"""People at work: analysts, support agents and the DBA, in business hours on weekdays."""

# Statement texts here are log data for a simulated audit trail, never executed: S608
# ("SQL built from strings") does not apply.
# ruff: noqa: S608

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Final

from detector.samples.events import EventLog, Query
from detector.samples.world import (
    ACCOUNTS,
    API_KEYS,
    APP_SETTINGS,
    CLIENTS,
    COUNTRIES,
    DAILY_COUNTS,
    FEATURE_FLAGS,
    INVOICES,
    PLANS,
    ROW_WIDTH,
    SCHEMA_MIGRATIONS,
    SEARCH_EVENTS,
    US_PER_HOUR,
    US_PER_S,
    Principal,
    World,
    py_rng,
)

ABSENCE_RATE: Final = 0.06
MISTYPE_RATE: Final = 0.2  # per analyst and working day: about once a week


def ide_preamble(app: str) -> list[Query]:
    """Metadata queries a GUI client runs when it connects (none for psql)."""
    if app.startswith("psql"):
        return []
    return [
        Query("SELECT current_schema(), session_user", None, 1, width=24),
        Query(
            "SELECT n.oid, n.nspname, n.nspowner FROM pg_catalog.pg_namespace n ORDER BY n.nspname",
            ["pg_catalog.pg_namespace"],
            6,
            width=40,
        ),
        Query(
            "SELECT c.oid, c.relname, c.relkind FROM pg_catalog.pg_class c "
            "WHERE c.relnamespace = 2200 AND c.relkind IN ('r', 'v', 'm', 'p') "
            "ORDER BY c.relname",
            ["pg_catalog.pg_class"],
            10,
            width=40,
        ),
    ]


def _moderate_rows(rng: random.Random, natural_max: int) -> int:
    """Heavy-tailed ad-hoc result sizes, 10..5,000 and never more than the data holds."""
    rows = int(rng.lognormvariate(math.log(120), 1.3))
    return max(min(10, natural_max), min(rows, 5000, natural_max))


@dataclass(frozen=True, slots=True)
class _AdHoc:
    """What one ad-hoc question is about: a look-back window and one client in focus."""

    world: World
    day: int
    rng: random.Random
    days_back: int
    since: str
    client: int
    cid: str

    @property
    def clients(self) -> int:
        return self.world.size(CLIENTS, self.day)

    @property
    def accounts(self) -> int:
        return self.world.size(ACCOUNTS, self.day)


def _new_clients(q: _AdHoc) -> Query:
    plan = q.rng.choice(PLANS)
    return Query(
        f"SELECT id, name, plan, created_at FROM public.clients WHERE plan = '{plan}' "
        f"AND created_at >= '{q.since}' ORDER BY created_at",
        [CLIENTS],
        _moderate_rows(q.rng, q.clients),
        width=60,
        scanned=q.clients,
    )


def _signups_per_client(q: _AdHoc) -> Query:
    return Query(
        f"SELECT client_id, count(*) FROM public.accounts WHERE created_at >= "
        f"'{q.since}' GROUP BY client_id",
        [ACCOUNTS],
        _moderate_rows(q.rng, q.clients),
        width=16,
        scanned=q.accounts,
    )


def _searches_per_day(q: _AdHoc) -> Query:
    until = (q.world.date_of(q.day) - timedelta(days=1)).isoformat()
    return Query(
        "SELECT day, sum(searches) FROM public.client_daily_search_counts "
        f"WHERE day BETWEEN '{q.since}' AND '{until}' GROUP BY day ORDER BY day",
        [DAILY_COUNTS],
        q.days_back,
        width=20,
        scanned=q.clients * q.days_back,
    )


def _client_users(q: _AdHoc) -> Query:
    rows = int(q.world.accounts[q.client] * q.rng.uniform(0.6, 1.0))
    return Query(
        "SELECT a.id, a.email, a.role, a.created_at FROM public.accounts a "
        f"WHERE a.client_id = '{q.cid}' AND a.status = 'active'",
        [ACCOUNTS],
        rows,
        tenant=q.cid,
        width=80,
    )


def _big_invoices(q: _AdHoc) -> Query:
    today = q.world.date_of(q.day)
    period = (today.replace(day=1) - timedelta(days=1)).strftime("%Y-%m")
    amount = q.rng.choice((10_000, 50_000, 100_000, 250_000))
    return Query(
        f"SELECT * FROM public.invoices WHERE period = '{period}' AND "
        f"amount_cents > {amount} ORDER BY amount_cents DESC",
        [INVOICES],
        _moderate_rows(q.rng, q.clients),
        width=ROW_WIDTH[INVOICES],
        scanned=q.clients,
    )


def _client_searches(q: _AdHoc) -> Query:
    return Query(
        "SELECT client_id, query, created_at FROM public.search_events "
        f"WHERE client_id = '{q.cid}' AND created_at >= '{q.since}' LIMIT 1000",
        [SEARCH_EVENTS],
        _moderate_rows(q.rng, 1000),
        tenant=q.cid,
        width=60,
        scanned=5000,
    )


def _search_total(q: _AdHoc) -> Query:
    return Query(
        f"SELECT count(*) FROM public.search_events WHERE created_at >= '{q.since}'",
        [SEARCH_EVENTS],
        1,
        width=12,
        scanned=q.world.search_growth[q.day] * q.days_back,
    )


def _usage_by_plan(q: _AdHoc) -> Query:
    return Query(
        "SELECT c.plan, avg(d.searches) FROM public.client_daily_search_counts d "
        f"JOIN public.clients c ON c.id = d.client_id WHERE d.day >= '{q.since}' "
        "GROUP BY c.plan",
        [DAILY_COUNTS, CLIENTS],
        4,
        width=24,
        scanned=q.clients * q.days_back,
    )


def _users_by_domain(q: _AdHoc) -> Query:
    domain = q.world.client_domains[q.client]
    return Query(
        f"SELECT id, email, name, created_at FROM public.accounts WHERE email "
        f"LIKE '%@{domain}' ORDER BY created_at",
        [ACCOUNTS],
        int(q.world.accounts[q.client]),
        width=90,
        scanned=q.accounts,
    )


def _idle_admins(q: _AdHoc) -> Query:
    threshold = q.rng.randint(2, 20)
    return Query(
        "SELECT a.client_id, count(*) FROM public.accounts a WHERE a.role = 'admin' "
        f"AND a.last_login_at < '{q.since}' GROUP BY a.client_id "
        f"HAVING count(*) > {threshold}",
        [ACCOUNTS],
        _moderate_rows(q.rng, q.clients // 3),
        width=16,
        scanned=q.accounts,
    )


def _revenue_by_plan(q: _AdHoc) -> Query:
    today = q.world.date_of(q.day)
    period = (today - timedelta(days=q.rng.choice((60, 120, 365)))).strftime("%Y-%m")
    return Query(
        "SELECT c.plan, count(*), sum(i.amount_cents) FROM public.invoices i "
        f"JOIN public.clients c ON c.id = i.client_id WHERE i.period >= '{period}' "
        "GROUP BY c.plan",
        [INVOICES, CLIENTS],
        4,
        width=30,
        scanned=q.clients * 12,
    )


def _harmless_read(q: _AdHoc) -> Query:
    table = q.rng.choice((COUNTRIES, FEATURE_FLAGS, SCHEMA_MIGRATIONS, APP_SETTINGS))
    rows = q.world.size(table, q.day)
    return Query(f"SELECT * FROM {table}", [table], rows, width=ROW_WIDTH[table], scanned=rows)


#: The analysts' repertoire with relative frequencies (reference tables now and then).
_AD_HOC: Final[tuple[tuple[Callable[[_AdHoc], Query], int], ...]] = (
    (_new_clients, 1),
    (_signups_per_client, 1),
    (_searches_per_day, 1),
    (_client_users, 1),
    (_big_invoices, 1),
    (_client_searches, 1),
    (_search_total, 1),
    (_usage_by_plan, 1),
    (_users_by_domain, 1),
    (_idle_admins, 1),
    (_revenue_by_plan, 1),
    (_harmless_read, 2),
)


def analyst_query(world: World, day: int, rng: random.Random) -> Query:
    """One ad-hoc analytical statement: filtered selects and GROUP BYs with WHERE clauses,
    sometimes a bigger read of a harmless table."""
    days_back = rng.choice((7, 14, 30, 60, 90, 180))
    client = rng.randrange(world.active[day])
    question = _AdHoc(
        world,
        day,
        rng,
        days_back,
        (world.date_of(day) - timedelta(days=days_back)).isoformat(),
        client,
        world.client_ids[client],
    )
    (template,) = rng.choices([t for t, _ in _AD_HOC], weights=[w for _, w in _AD_HOC])
    return template(question)


def _split(rng: random.Random, total: int, parts: int) -> list[int]:
    """``total`` statements over ``parts`` sessions, each getting at least one."""
    cuts = sorted(rng.sample(range(1, total), parts - 1))
    return [b - a for a, b in zip([0, *cuts], [*cuts, total], strict=True)]


def analyst_day(log: EventLog, world: World, day: int, who: Principal) -> None:
    """20-80 ad-hoc statements in 2-4 sessions between the analyst's usual hours."""
    rng = py_rng(world.seed, "analyst", who.name, day)
    habit = py_rng(world.seed, "habit", who.name)
    first_hour, last_hour = habit.uniform(7.8, 9.5), habit.uniform(16.3, 17.9)
    if world.is_weekend(day) or rng.random() < ABSENCE_RATE:
        return
    sessions = rng.randint(2, 4)
    sizes = _split(rng, rng.randint(20, 80), sessions)
    starts = sorted(rng.uniform(first_hour, last_hour - 0.75) for _ in range(sessions))
    for number, (hour, size) in enumerate(zip(starts, sizes, strict=True)):
        t = world.day_start_us(day) + int(hour * US_PER_HOUR)
        address = rng.choice(who.addresses)
        if number == 0 and rng.random() < MISTYPE_RATE:
            log.failed_login(who.name, address, who.client_app, t)
            t += int(rng.uniform(4, 25) * US_PER_S)
        s = log.open(who.name, address, who.client_app, t, rng)
        for query in ide_preamble(who.client_app):
            s.run(query, rng.uniform(0.01, 0.2))
        for _ in range(size):
            s.run(analyst_query(world, day, rng), rng.lognormvariate(math.log(45), 0.9))


def _ticket_queries(world: World, day: int, client: int, rng: random.Random) -> list[Query]:
    """What a support agent looks at for one client's ticket (one tenant throughout)."""
    cid, accounts = world.client_ids[client], int(world.accounts[client])
    since = (world.date_of(day) - timedelta(days=30)).isoformat()
    account = world.account_id(client, rng)
    email = world.email(client, account)
    a, c = [ACCOUNTS], [CLIENTS]
    pool = [
        Query(
            f"SELECT * FROM public.accounts WHERE client_id = '{cid}'",
            a,
            accounts,
            tenant=cid,
            width=ROW_WIDTH[ACCOUNTS],
        ),
        Query(
            f"SELECT * FROM public.invoices WHERE client_id = '{cid}' ORDER BY period DESC",
            [INVOICES],
            1 + (client * 7) % 24,
            tenant=cid,
            width=ROW_WIDTH[INVOICES],
        ),
        Query(
            f"SELECT * FROM public.client_daily_search_counts WHERE client_id = '{cid}' "
            f"AND day >= '{since}' ORDER BY day",
            [DAILY_COUNTS],
            30,
            tenant=cid,
            width=ROW_WIDTH[DAILY_COUNTS],
        ),
        Query(
            f"SELECT * FROM public.accounts WHERE client_id = '{cid}' AND email = '{email}'",
            a,
            1,
            tenant=cid,
            width=ROW_WIDTH[ACCOUNTS],
        ),
        Query(
            "SELECT id, key_hash, scopes, created_at, revoked_at FROM public.api_keys "
            f"WHERE client_id = '{cid}'",
            [API_KEYS],
            1 + client % 3,
            tenant=cid,
            width=130,
        ),
        Query(
            "UPDATE public.accounts SET status = 'active', failed_logins = 0 "
            f"WHERE id = {account} AND client_id = '{cid}'",
            a,
            1,
            "UPDATE",
            "write",
            tenant=cid,
        ),
        Query(
            "SELECT query, created_at FROM public.search_events "
            f"WHERE client_id = '{cid}' ORDER BY created_at DESC LIMIT 100",
            [SEARCH_EVENTS],
            min(100, 5 + accounts * 3),
            tenant=cid,
            width=40,
            scanned=400,
        ),
    ]
    first = Query(
        f"SELECT * FROM public.clients WHERE id = '{cid}'",
        c,
        1,
        tenant=cid,
        width=ROW_WIDTH[CLIENTS],
    )
    return [first, *rng.sample(pool, rng.randint(2, 7))]


def support_day(log: EventLog, world: World, day: int, who: Principal) -> None:
    """5-20 tickets, each one short session reading one client."""
    rng = py_rng(world.seed, "support", who.name, day)
    habit = py_rng(world.seed, "habit", who.name)
    first_hour = habit.uniform(7.9, 9.0)
    last_hour = first_hour + habit.uniform(8.0, 9.0)
    if world.is_weekend(day) or rng.random() < ABSENCE_RATE:
        return
    weights = world.accounts[: world.active[day]].tolist()
    tickets = rng.randint(5, 20)
    starts = sorted(rng.uniform(first_hour, last_hour - 0.2) for _ in range(tickets))
    clients = rng.choices(range(world.active[day]), weights=weights, k=tickets)
    for hour, client in zip(starts, clients, strict=True):
        t = world.day_start_us(day) + int(hour * US_PER_HOUR)
        s = log.open(who.name, who.addresses[0], who.client_app, t, rng)
        for query in _ticket_queries(world, day, client, rng):
            s.run(query, rng.uniform(5, 75))


_DBA_CATALOG: Final = (
    Query(
        "SELECT relname, n_live_tup, n_dead_tup FROM pg_catalog.pg_stat_user_tables "
        "ORDER BY n_dead_tup DESC LIMIT 20",
        ["pg_catalog.pg_stat_user_tables"],
        10,
        width=40,
    ),
    Query(
        "SELECT pid, usename, application_name, state, query_start FROM "
        "pg_catalog.pg_stat_activity WHERE state <> 'idle'",
        ["pg_catalog.pg_stat_activity"],
        7,
        width=120,
    ),
    Query(
        "SELECT indexrelname, idx_scan FROM pg_catalog.pg_stat_user_indexes WHERE idx_scan = 0",
        ["pg_catalog.pg_stat_user_indexes"],
        3,
        width=40,
    ),
    Query(
        "SELECT pg_size_pretty(pg_total_relation_size('public.search_events'))", None, 1, width=12
    ),
)


def _dba_changes(world: World, day: int, rng: random.Random) -> list[Query]:
    version = world.date_of(day).strftime("%Y%m%d") + f"{rng.randint(90000, 165959):06d}"
    return [
        Query(
            "ALTER TABLE public.accounts ADD COLUMN IF NOT EXISTS mfa_enrolled boolean "
            "NOT NULL DEFAULT false",
            [ACCOUNTS],
            command="ALTER",
            action="ddl",
        ),
        Query(
            "CREATE INDEX CONCURRENTLY IF NOT EXISTS idx_search_events_client_created ON "
            "public.search_events (client_id, created_at)",
            [SEARCH_EVENTS],
            command="CREATE",
            action="ddl",
            scanned=world.size(SEARCH_EVENTS, day) // 20,
        ),
        Query(
            "GRANT SELECT ON public.invoices TO analyst_3",
            [INVOICES],
            command="GRANT",
            action="dcl",
        ),
        Query(
            "REVOKE UPDATE ON public.feature_flags FROM analyst_2",
            [FEATURE_FLAGS],
            command="REVOKE",
            action="dcl",
        ),
        Query(
            f"UPDATE public.app_settings SET value = '{rng.choice((50, 100, 200))}', "
            "updated_at = now() WHERE key = 'max_search_results'",
            [APP_SETTINGS],
            1,
            "UPDATE",
            "write",
        ),
        Query(
            "ALTER TABLE public.invoices ALTER COLUMN currency SET DEFAULT 'EUR'",
            [INVOICES],
            command="ALTER",
            action="ddl",
        ),
        Query(
            f"INSERT INTO public.schema_migrations (version) VALUES ('{version}')",
            [SCHEMA_MIGRATIONS],
            1,
            "INSERT",
            "write",
        ),
        Query(
            "VACUUM (VERBOSE, ANALYZE) public.accounts",
            [ACCOUNTS],
            command="VACUUM",
            action="other",
            scanned=world.size(ACCOUNTS, day),
        ),
    ]


def _dba_works(world: World, day: int) -> bool:
    """The DBA touches the database on 1-3 weekdays of each ISO week."""
    year, week, weekday = world.date_of(day).isocalendar()
    plan = py_rng(world.seed, "dba-week", year, week)
    return weekday in plan.sample(range(1, 6), plan.randint(1, 3))


def dba_day(log: EventLog, world: World, day: int) -> None:
    """A psql session with catalog looks and a change or two, if today is a DBA day."""
    if not _dba_works(world, day):
        return
    rng = py_rng(world.seed, "dba", day)
    who = world.dba
    t = world.day_start_us(day) + int(rng.uniform(9.0, 16.5) * US_PER_HOUR)
    s = log.open(who.name, who.addresses[0], who.client_app, t, rng)
    for query in rng.sample(_DBA_CATALOG, rng.randint(1, 3)):
        s.run(query, rng.uniform(5, 60))
    for query in rng.sample(_dba_changes(world, day, rng), rng.randint(1, 2)):
        s.run(query, rng.uniform(20, 200))


def simulate_staff(log: EventLog, world: World, day: int) -> None:
    """Every person's work on ``day``."""
    for analyst in world.analysts:
        analyst_day(log, world, day, analyst)
    for agent in world.support:
        support_day(log, world, day, agent)
    dba_day(log, world, day)

"""Scheduled heavy-but-habitual work: nightly aggregation, monthly billing, BI dashboard
refreshes and the nightly backup. Each run is one session and is reported as a
:class:`HeavyWindow` so the labels can say "this is benign"."""

# Statement texts here are log data for a simulated audit trail, never executed: S608
# ("SQL built from strings") does not apply.
# ruff: noqa: S608

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import date, timedelta
from typing import Final

from detector.samples.events import EventLog, Query, Session
from detector.samples.world import (
    ACCOUNTS,
    API_KEYS,
    CLIENTS,
    DAILY_COUNTS,
    DUMP_ORDER,
    INVOICES,
    ROW_WIDTH,
    SEARCH_EVENTS,
    TABLE_COLUMNS,
    US_PER_HOUR,
    US_PER_S,
    Principal,
    World,
    py_rng,
)

BENIGN_ACTIVITIES: Final = ("nightly_backup", "billing_run", "bi_refresh", "nightly_aggregation")


@dataclass(frozen=True, slots=True)
class HeavyWindow:
    """One run of a benign heavy activity: first and last event time (us)."""

    activity: str
    principal: str
    start_us: int
    end_us: int


def _at(world: World, day: int, hour: float, rng: random.Random, jitter_min: float) -> int:
    """``hour`` o'clock on ``day`` give or take a normal jitter of ``jitter_min`` minutes."""
    minutes = rng.gauss(0.0, jitter_min)
    return world.day_start_us(day) + int(hour * US_PER_HOUR + minutes * 60 * US_PER_S)


def _open(log: EventLog, who: Principal, t_us: int, rng: random.Random) -> Session:
    return log.open(who.name, who.addresses[0], who.client_app, t_us, rng, may_fail=False)


def _window(log: EventLog, activity: str, who: Principal, start_us: int) -> HeavyWindow:
    return HeavyWindow(activity, who.name, start_us, log.time_us[-1])


def nightly_aggregation(log: EventLog, world: World, day: int) -> HeavyWindow:
    """``batch_worker`` at ~01:00: reads every client, counts accounts per client and writes
    yesterday's per-client search counts, then some housekeeping."""
    rng = py_rng(world.seed, "nightly", day)
    who, n = world.batch, world.size(CLIENTS, day)
    today, yesterday = world.date_of(day), world.date_of(day - 1)
    start = _at(world, day, 1.0, rng, 4.0) + int(rng.uniform(0, 120) * US_PER_S)
    s = _open(log, who, start, rng)
    s.run(Query("SET statement_timeout = '15min'", None, command="SET", action="other"), 0.01)
    s.run(
        Query("SELECT id, name, plan FROM public.clients", [CLIENTS], n, width=40, scanned=n), 0.05
    )
    s.run(
        Query(
            "SELECT client_id, count(*) FROM public.accounts GROUP BY client_id",
            [ACCOUNTS],
            n,
            width=16,
            scanned=world.size(ACCOUNTS, day),
        ),
        0.05,
    )
    s.run(
        Query(
            "INSERT INTO public.client_daily_search_counts (client_id, day, searches) "
            f"SELECT client_id, '{yesterday}', count(*) FROM public.search_events "
            f"WHERE created_at >= '{yesterday}' AND created_at < '{today}' GROUP BY client_id",
            [DAILY_COUNTS, SEARCH_EVENTS],
            world.daily_counts_inserted[day],
            "INSERT",
            "write",
            scanned=world.search_growth[max(day - 1, 0)],
        ),
        0.05,
    )
    dormant = int(rng.lognormvariate(2.0, 1.0))
    s.run(
        Query(
            "UPDATE public.accounts SET status = 'dormant' WHERE status = 'active' "
            f"AND last_login_at < '{today - timedelta(days=180)}'",
            [ACCOUNTS],
            dormant,
            "UPDATE",
            "write",
            scanned=world.size(ACCOUNTS, day),
        ),
        0.05,
    )
    s.run(
        Query(
            f"DELETE FROM public.api_keys WHERE revoked_at < '{today - timedelta(days=90)}'",
            [API_KEYS],
            rng.randrange(4),
            "DELETE",
            "write",
        ),
        0.05,
    )
    s.run(
        Query(
            "VACUUM ANALYZE public.search_events",
            [SEARCH_EVENTS],
            command="VACUUM",
            action="other",
            scanned=world.search_growth[max(day - 1, 0)] * 40,
        ),
        0.1,
    )
    s.run(
        Query(
            "ANALYZE public.client_daily_search_counts",
            [DAILY_COUNTS],
            command="ANALYZE",
            action="other",
            scanned=30_000,
        ),
        0.1,
    )
    return _window(log, "nightly_aggregation", who, start)


def _previous_month(day: date) -> tuple[str, str, str]:
    """(period 'YYYY-MM', first day, last day) of the month before ``day``."""
    last = day.replace(day=1) - timedelta(days=1)
    return last.strftime("%Y-%m"), last.replace(day=1).isoformat(), last.isoformat()


def billing_run(log: EventLog, world: World, day: int) -> HeavyWindow:
    """``batch_worker`` at ~03:00 on the 1st: full reads of clients and accounts, usage sums
    per client, one invoice per client, then the invoices read back and marked sent."""
    rng = py_rng(world.seed, "billing", day)
    who, n = world.batch, world.size(CLIENTS, day)
    accounts = world.size(ACCOUNTS, day)
    period, first, last = _previous_month(world.date_of(day))
    start = _at(world, day, 3.0, rng, 5.0)
    s = _open(log, who, start, rng)
    s.run(
        Query(
            "SELECT id, name, plan, billing_email FROM public.clients",
            [CLIENTS],
            n,
            width=90,
            scanned=n,
        ),
        0.01,
    )
    s.run(
        Query(
            "SELECT id, client_id, email, role, status FROM public.accounts",
            [ACCOUNTS],
            accounts,
            width=90,
            scanned=accounts,
        ),
        0.05,
    )
    s.run(
        Query(
            "SELECT client_id, sum(searches) FROM public.client_daily_search_counts "
            f"WHERE day BETWEEN '{first}' AND '{last}' GROUP BY client_id",
            [DAILY_COUNTS],
            n,
            width=20,
            scanned=n * 31,
        ),
        0.05,
    )
    s.run(
        Query(
            "INSERT INTO public.invoices (client_id, period, amount_cents, currency, status, "
            f"created_at) SELECT c.id, '{period}', sum(d.searches) * 2 + 4900, 'EUR', 'draft', "
            "now() "
            "FROM public.clients c JOIN public.client_daily_search_counts d ON d.client_id = c.id "
            f"WHERE d.day BETWEEN '{first}' AND '{last}' GROUP BY c.id, c.plan",
            [INVOICES, CLIENTS, DAILY_COUNTS],
            n,
            "INSERT",
            "write",
            scanned=n * 32,
        ),
        0.05,
    )
    s.run(
        Query(
            f"SELECT * FROM public.invoices WHERE period = '{period}'",
            [INVOICES],
            n,
            width=ROW_WIDTH[INVOICES],
            scanned=world.size(INVOICES, day),
        ),
        0.2,
    )
    s.run(
        Query(
            f"UPDATE public.invoices SET status = 'sent' WHERE period = '{period}' "
            "AND status = 'draft'",
            [INVOICES],
            n,
            "UPDATE",
            "write",
            scanned=n,
        ),
        30.0,
    )
    return _window(log, "billing_run", who, start)


def _bi_cards(world: World, day: int) -> list[Query]:
    """The dashboard's saved questions, several of them over all tenants."""
    today, n = world.date_of(day), world.size(CLIENTS, day)
    accounts, counts = world.size(ACCOUNTS, day), world.size(DAILY_COUNTS, day)
    ago = {k: (today - timedelta(days=k)).isoformat() for k in (7, 30, 90, 365)}
    period = _previous_month(today)[0]
    year_ago = (today - timedelta(days=365)).strftime("%Y-%m")
    c, a, d, i = [CLIENTS], [ACCOUNTS], [DAILY_COUNTS], [INVOICES]
    return [
        Query(
            "SELECT client_id, sum(searches) FROM public.client_daily_search_counts "
            f"WHERE day >= '{ago[30]}' GROUP BY client_id",
            d,
            n,
            width=20,
            scanned=n * 30,
        ),
        Query(
            "SELECT c.plan, count(*) FROM public.accounts a JOIN public.clients c "
            "ON c.id = a.client_id GROUP BY c.plan",
            [ACCOUNTS, CLIENTS],
            4,
            width=20,
            scanned=accounts,
        ),
        Query(
            "SELECT day, sum(searches) FROM public.client_daily_search_counts "
            f"WHERE day >= '{ago[90]}' GROUP BY day ORDER BY day",
            d,
            90,
            width=20,
            scanned=n * 90,
        ),
        Query("SELECT plan, count(*) FROM public.clients GROUP BY plan", c, 4, width=20, scanned=n),
        Query(
            "SELECT date_trunc('week', created_at) AS week, count(*) FROM public.accounts "
            f"WHERE created_at >= '{ago[365]}' GROUP BY 1 ORDER BY 1",
            a,
            53,
            width=24,
            scanned=accounts,
        ),
        Query(
            "SELECT country_code, count(*) FROM public.clients GROUP BY country_code",
            c,
            20,
            width=12,
            scanned=n,
        ),
        Query(
            "SELECT period, sum(amount_cents) FROM public.invoices "
            f"WHERE period >= '{year_ago}' GROUP BY period ORDER BY period",
            i,
            12,
            width=20,
            scanned=n * 12,
        ),
        Query(
            "SELECT c.id, c.name, sum(d.searches) AS searches FROM "
            "public.client_daily_search_counts d JOIN public.clients c ON c.id = d.client_id "
            f"WHERE d.day >= '{ago[7]}' GROUP BY c.id, c.name ORDER BY searches DESC LIMIT 20",
            [DAILY_COUNTS, CLIENTS],
            20,
            width=48,
            scanned=n * 7,
        ),
        Query(
            f"SELECT count(*) FROM public.search_events WHERE created_at >= '{today}'",
            [SEARCH_EVENTS],
            1,
            width=12,
            scanned=world.search_growth[day] // 2,
        ),
        Query(
            f"SELECT status, count(*) FROM public.invoices WHERE period = '{period}' "
            "GROUP BY status",
            i,
            3,
            width=16,
            scanned=n,
        ),
        Query(
            "SELECT client_id, count(*) FROM public.accounts "
            f"WHERE created_at >= '{ago[30]}' GROUP BY client_id",
            a,
            n // 4,
            width=16,
            scanned=accounts,
        ),
        Query(
            f"SELECT count(*) FROM public.clients WHERE created_at >= '{ago[30]}'",
            c,
            1,
            width=12,
            scanned=n,
        ),
        Query(
            "SELECT role, count(*) FROM public.accounts GROUP BY role",
            a,
            3,
            width=16,
            scanned=accounts,
        ),
        Query(
            "SELECT client_id, count(*) AS keys FROM public.api_keys "
            "WHERE revoked_at IS NULL GROUP BY client_id",
            [API_KEYS],
            n * 9 // 10,
            width=16,
            scanned=world.size(API_KEYS, day),
        ),
        Query(
            "SELECT avg(searches), max(searches) FROM public.client_daily_search_counts "
            f"WHERE day = '{today - timedelta(days=1)}'",
            d,
            1,
            width=20,
            scanned=counts // 700,
        ),
    ]


def bi_refreshes(log: EventLog, world: World, day: int) -> list[HeavyWindow]:
    """``bi_service``: hourly 07:00-19:00 on weekdays, every four hours at weekends; each
    refresh runs 8-15 of the dashboard's questions."""
    rng = py_rng(world.seed, "bi", day)
    hours = range(0, 24, 4) if world.is_weekend(day) else range(7, 20)
    cards = _bi_cards(world, day)
    windows = []
    for hour in hours:
        start = world.day_start_us(day) + hour * US_PER_HOUR + int(rng.uniform(3, 150) * US_PER_S)
        s = _open(log, world.bi, start, rng)
        for card in rng.sample(cards, rng.randint(8, min(15, len(cards)))):
            s.run(card, rng.uniform(0.02, 1.5))
        windows.append(_window(log, "bi_refresh", world.bi, start))
    return windows


_DUMP_PREAMBLE: Final = (
    Query("SET statement_timeout = 0", None, command="SET", action="other"),
    Query("SET lock_timeout = 0", None, command="SET", action="other"),
    Query("SET idle_in_transaction_session_timeout = 0", None, command="SET", action="other"),
    Query("SELECT pg_catalog.set_config('search_path', '', false)", None, 1, width=8),
    Query("BEGIN", None, command="BEGIN", action="other"),
    Query(
        "SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY",
        None,
        command="SET",
        action="other",
    ),
    Query(
        "SELECT c.tableoid, c.oid, c.relname, c.relacl, c.relkind, c.relnamespace, "
        "c.relowner FROM pg_catalog.pg_class c LEFT JOIN pg_catalog.pg_namespace n "
        "ON n.oid = c.relnamespace WHERE c.relkind IN ('r', 'S', 'v', 'c', 'm', 'f', 'p') "
        "ORDER BY c.oid",
        ["pg_catalog.pg_class", "pg_catalog.pg_namespace"],
        431,
        width=96,
    ),
    Query(
        "SELECT a.attnum, a.attname, a.atttypmod, a.attnotnull, a.atthasdef "
        "FROM pg_catalog.pg_attribute a WHERE a.attnum > 0 AND a.attrelid = '16412'::oid "
        "ORDER BY a.attnum",
        ["pg_catalog.pg_attribute"],
        62,
        width=48,
    ),
)


def nightly_backup(log: EventLog, world: World, day: int) -> HeavyWindow:
    """``backup`` (pg_dump) at ~02:30: catalog queries, then ``COPY ... TO stdout`` of every
    table with the table's current size."""
    rng = py_rng(world.seed, "backup", day)
    who = world.backup
    start = _at(world, day, 2.5, rng, 3.0)
    s = _open(log, who, start, rng)
    for query in _DUMP_PREAMBLE:
        s.run(query, rng.uniform(0.001, 0.02))
    for table in DUMP_ORDER:
        rows = world.size(table, day)
        columns = ", ".join(TABLE_COLUMNS[table])
        copy = Query(
            f"COPY {table} ({columns}) TO stdout;",
            [table],
            rows,
            "COPY",
            "copy",
            width=ROW_WIDTH[table],
            scanned=rows,
        )
        s.run(
            copy,
            rng.uniform(0.005, 0.05),
            duration=round((3.0 + rows * 0.0021) * rng.lognormvariate(0.0, 0.12), 3),
        )
    s.run(Query("COMMIT", None, command="COMMIT", action="other"), 0.01)
    return _window(log, "nightly_backup", who, start)


def simulate_jobs(log: EventLog, world: World, day: int) -> list[HeavyWindow]:
    """Every scheduled job of ``day``."""
    windows = [nightly_aggregation(log, world, day), nightly_backup(log, world, day)]
    if world.date_of(day).day == 1:
        windows.append(billing_run(log, world, day))
    windows.extend(bi_refreshes(log, world, day))
    return windows

"""The seven labelled exfiltration scenarios and where they are placed in time.

Each scenario is a builder that writes its sessions into the log from a start time. Builders
are deterministic in their random stream and do not depend on the start time, so a dry run
into a scratch log measures a scenario's duration before it is placed: inside the final
``attack_days`` days, at hours that fit its story, never overlapping another scenario.
"""

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

from detector.errors import ConfigError
from detector.samples.events import EventLog, Query, Session
from detector.samples.staff import ide_preamble
from detector.samples.world import (
    ACCOUNTS,
    API_KEYS,
    CLIENTS,
    DAILY_COUNTS,
    ROW_WIDTH,
    US_PER_HOUR,
    US_PER_S,
    Principal,
    World,
    py_rng,
)

#: Minimum quiet time between two scenarios.
MARGIN_US: Final = 10 * 60 * US_PER_S
_TRIES: Final = 400


@dataclass(frozen=True, slots=True)
class Cast:
    """Who plays which part. Every scenario that borrows a person gets a different one."""

    aggregate_agent: Principal
    paging_agent: Principal
    fanout_agent: Principal
    copy_analyst: Principal
    night_analyst: Principal
    sprayed_analyst: Principal
    dump_address: str
    spray_address: str
    sprayed: tuple[str, ...]


#: A builder writes one scenario from ``t0`` and returns its principals (the main one first).
Builder = Callable[[EventLog, World, int, int, random.Random, Cast], tuple[str, ...]]


@dataclass(frozen=True, slots=True)
class Scenario:
    """One attack story: the hours (UTC) it must lie within and whether it prefers a weekday."""

    name: str
    description: str
    earliest_hour: float
    latest_hour: float
    weekday: bool
    build: Builder


@dataclass(frozen=True, slots=True)
class ScenarioRun:
    """A placed scenario: its principals and the keys of the sessions it opened."""

    scenario: Scenario
    principals: tuple[str, ...]
    session_keys: tuple[int, ...]


def _select(rng: random.Random, q: Query, gap_s: float, s: Session) -> None:
    s.run(q, gap_s, duration=round((2.0 + q.rows * 0.004) * rng.lognormvariate(0.0, 0.3), 3))


def _full(table: str, rows: int, text: str | None = None) -> Query:
    return Query(
        text or f"SELECT * FROM {table}", [table], rows, width=ROW_WIDTH[table], scanned=rows
    )


def stolen_app_credentials_dump(
    log: EventLog, world: World, day: int, t0: int, rng: random.Random, cast: Cast
) -> tuple[str, ...]:
    """app_api's password used from a new address and a GUI client to dump three tables."""
    app = "DBeaver 23.2.0"
    s = log.open(world.app.name, cast.dump_address, app, t0, rng, may_fail=False)
    for query in ide_preamble(app):
        s.run(query, rng.uniform(0.05, 0.4))
    for table in (CLIENTS, ACCOUNTS, API_KEYS):
        _select(rng, _full(table, world.size(table, day)), rng.uniform(20, 90), s)
    return (world.app.name,)


def aggregate_theft(
    log: EventLog, world: World, day: int, t0: int, rng: random.Random, cast: Cast
) -> tuple[str, ...]:
    """Per-client counts and sums over whole tables: few rows each, every client covered."""
    who, n = cast.aggregate_agent, world.size(CLIENTS, day)
    s = log.open(who.name, who.addresses[0], "psql", t0, rng, may_fail=False)
    queries = (
        Query(
            "SELECT client_id, count(*) FROM public.accounts GROUP BY client_id",
            [ACCOUNTS],
            n,
            width=16,
            scanned=world.size(ACCOUNTS, day),
        ),
        Query(
            "SELECT client_id, sum(searches) FROM public.client_daily_search_counts "
            "GROUP BY client_id",
            [DAILY_COUNTS],
            n,
            width=20,
            scanned=world.size(DAILY_COUNTS, day),
        ),
        Query("SELECT id, name, domain FROM public.clients", [CLIENTS], n, width=60, scanned=n),
    )
    for query in queries:
        s.run(query, rng.uniform(25, 150))
    return (who.name,)


def slow_pagination(
    log: EventLog, world: World, day: int, t0: int, rng: random.Random, cast: Cast
) -> tuple[str, ...]:
    """The whole accounts table, 200 rows at a time, one page every 15-45 seconds."""
    who, size = cast.paging_agent, world.size(ACCOUNTS, day)
    s = log.open(who.name, who.addresses[0], who.client_app, t0, rng, may_fail=False)
    for page in range(math.ceil(size / 200)):
        rows = min(200, size - page * 200)
        s.run(
            Query(
                f"SELECT * FROM public.accounts ORDER BY id LIMIT 200 OFFSET {page * 200}",
                [ACCOUNTS],
                rows,
                width=ROW_WIDTH[ACCOUNTS],
                scanned=page * 200 + rows,
            ),
            rng.uniform(0.5, 1.0) if page == 0 else rng.uniform(15, 45),
        )
    return (who.name,)


def copy_export(
    log: EventLog, world: World, day: int, t0: int, rng: random.Random, cast: Cast
) -> tuple[str, ...]:
    """An analyst, who never exports, copies accounts and clients out with COPY TO STDOUT."""
    who = cast.copy_analyst
    app = "pg_dump" if who.client_app == "psql" else "psql"
    s = log.open(who.name, who.addresses[0], app, t0, rng, may_fail=False)
    for text, table in (
        ("COPY (SELECT * FROM public.accounts) TO STDOUT WITH CSV HEADER", ACCOUNTS),
        ("COPY public.clients TO STDOUT", CLIENTS),
    ):
        rows = world.size(table, day)
        s.run(
            Query(text, [table], rows, "COPY", "copy", width=ROW_WIDTH[table], scanned=rows),
            rng.uniform(20, 120),
            duration=round(rows * 0.0025 * rng.uniform(0.8, 1.3), 3),
        )
    return (who.name,)


def _client_list(world: World, day: int, rng: random.Random) -> str:
    clients = rng.sample(range(world.active[day]), rng.randint(8, 30))
    return ", ".join(f"'{world.client_ids[c]}'" for c in sorted(clients))


def off_hours_insider(
    log: EventLog, world: World, day: int, t0: int, rng: random.Random, cast: Cast
) -> tuple[str, ...]:
    """Daytime-looking reads (500-3,000 rows each) by an analyst at night, for about an hour."""
    who = cast.night_analyst
    since = (world.date_of(day) - timedelta(days=rng.choice((90, 180, 365)))).isoformat()
    s = log.open(who.name, who.addresses[0], who.client_app, t0, rng, may_fail=False)
    for query in ide_preamble(who.client_app):
        s.run(query, rng.uniform(0.01, 0.2))
    count = rng.randint(20, 40)
    for _ in range(count):
        ids = _client_list(world, day, rng)
        rows = int(math.exp(rng.uniform(math.log(500), math.log(3000))))
        if rng.random() < 0.55:
            query = Query(
                "SELECT a.id, a.client_id, a.email, a.name, a.role, a.created_at "
                f"FROM public.accounts a WHERE a.client_id IN ({ids}) AND "
                "a.status = 'active' ORDER BY a.client_id",
                [ACCOUNTS],
                rows,
                width=110,
                scanned=rows,
            )
        else:
            query = Query(
                "SELECT client_id, day, searches FROM public.client_daily_search_counts "
                f"WHERE client_id IN ({ids}) AND day >= '{since}' "
                "ORDER BY client_id, day",
                [DAILY_COUNTS],
                rows,
                width=26,
                scanned=rows,
            )
        s.run(query, 3600 / count * rng.uniform(0.5, 1.5))
    return (who.name,)


def brute_force_then_login(
    log: EventLog, world: World, day: int, t0: int, rng: random.Random, cast: Cast
) -> tuple[str, ...]:
    """Password spraying over many principals from one address, then a login that works."""
    attempts = rng.randint(150, 300)
    offsets = sorted(rng.uniform(0, 600) for _ in range(attempts - 1))
    targets = list(cast.sprayed)
    order: list[str] = []
    while len(order) < attempts:
        rng.shuffle(targets)
        order.extend(targets)
    for offset, user in zip([0.0, *offsets], order, strict=False):
        log.failed_login(user, cast.spray_address, None, t0 + int(offset * US_PER_S))
    who = cast.sprayed_analyst
    t = t0 + int((offsets[-1] + rng.uniform(20, 90)) * US_PER_S)
    s = log.open(who.name, cast.spray_address, "psql", t, rng, may_fail=False)
    s.run(
        Query(
            "SELECT n.nspname, c.relname FROM pg_catalog.pg_class c JOIN "
            "pg_catalog.pg_namespace n ON n.oid = c.relnamespace WHERE c.relkind = 'r' "
            "AND n.nspname = 'public'",
            ["pg_catalog.pg_class", "pg_catalog.pg_namespace"],
            10,
            width=40,
        ),
        rng.uniform(3, 15),
    )
    for table, limit in ((CLIENTS, 1000), (ACCOUNTS, 5000)):
        rows = min(limit, world.size(table, day))
        _select(
            rng, _full(table, rows, f"SELECT * FROM {table} LIMIT {limit}"), rng.uniform(10, 60), s
        )
    others = sorted(set(order[:attempts]) - {who.name})
    return (who.name, *others)


def cross_tenant_fanout(
    log: EventLog, world: World, day: int, t0: int, rng: random.Random, cast: Cast
) -> tuple[str, ...]:
    """One support agent reads the accounts of 300-500 different clients in ~15 minutes."""
    who = cast.fanout_agent
    count = min(rng.randint(300, 500), world.active[day] - 1)
    s = log.open(who.name, who.addresses[0], who.client_app, t0, rng, may_fail=False)
    for client in rng.sample(range(world.active[day]), count):
        cid = world.client_ids[client]
        s.run(
            Query(
                f"SELECT * FROM public.accounts WHERE client_id = '{cid}'",
                [ACCOUNTS],
                int(world.accounts[client]),
                tenant=cid,
                width=ROW_WIDTH[ACCOUNTS],
            ),
            900 / count * rng.uniform(0.4, 1.6),
        )
    return (who.name,)


SCENARIOS: Final = (
    Scenario(
        "stolen_app_credentials_dump",
        "app_api credentials used from a new address with a GUI client to read all of "
        "clients, accounts and api_keys",
        0,
        24,
        False,
        stolen_app_credentials_dump,
    ),
    Scenario(
        "aggregate_theft",
        "a support agent's credentials, usual address but psql: per-client COUNT/SUM over "
        "accounts and search counts plus the client list (few rows, whole tables)",
        0,
        24,
        False,
        aggregate_theft,
    ),
    Scenario(
        "slow_pagination",
        "a support agent pages through all of accounts with LIMIT 200 OFFSET k every "
        "15-45 s for hours",
        8,
        18,
        True,
        slow_pagination,
    ),
    Scenario(
        "copy_export",
        "an analyst exports accounts and clients with COPY ... TO STDOUT from a tool "
        "they do not normally use",
        8,
        18,
        True,
        copy_export,
    ),
    Scenario(
        "off_hours_insider",
        "an analyst with normal daytime volume runs 20-40 daytime-looking reads of "
        "accounts and search counts between 01:00 and 04:00",
        1,
        4,
        True,
        off_hours_insider,
    ),
    Scenario(
        "brute_force_then_login",
        "password spraying over analysts, support agents and the DBA from one address, "
        "then a successful analyst login with psql and bulk reads",
        0,
        24,
        False,
        brute_force_then_login,
    ),
    Scenario(
        "cross_tenant_fanout",
        "a support agent reads the accounts of 300-500 different clients in ~15 minutes",
        8,
        18,
        True,
        cross_tenant_fanout,
    ),
)
SCENARIO_NAMES: Final = tuple(s.name for s in SCENARIOS)
#: Longest and most constrained first, so the placement always finds room.
_PLACEMENT_ORDER: Final = (
    "slow_pagination",
    "off_hours_insider",
    "cross_tenant_fanout",
    "copy_export",
    "brute_force_then_login",
    "stolen_app_credentials_dump",
    "aggregate_theft",
)


def _cast(world: World, rng: random.Random) -> Cast:
    agents = rng.sample(world.support, 3)
    analysts = rng.sample(world.analysts, 3)
    sprayed = tuple(p.name for p in (*world.analysts, *world.support, world.dba))
    dump_net = rng.choice(("203.0.113", "198.51.100"))
    return Cast(
        aggregate_agent=agents[0],
        paging_agent=agents[1],
        fanout_agent=agents[2],
        copy_analyst=analysts[0],
        night_analyst=analysts[1],
        sprayed_analyst=analysts[2],
        dump_address=f"{dump_net}.{rng.randint(2, 254)}",
        spray_address=f"192.0.2.{rng.randint(2, 254)}",
        sprayed=sprayed,
    )


def _duration(scenario: Scenario, world: World, day: int, cast: Cast) -> int:
    """Microseconds from a scenario's first to its last event (a dry run)."""
    scratch = EventLog()
    t0 = world.day_start_us(day)
    scenario.build(scratch, world, day, t0, py_rng(world.seed, "attack", scenario.name), cast)
    return max(scratch.time_us) - t0


def _free(start: int, end: int, taken: list[tuple[int, int]]) -> bool:
    return all(end + MARGIN_US <= a or start >= b + MARGIN_US for a, b in taken)


def _find_start(
    scenario: Scenario,
    world: World,
    day: int,
    duration: int,
    taken: list[tuple[int, int]],
    rng: random.Random,
) -> int | None:
    """A start on ``day`` such that the scenario lies within its hours (or starts at the
    earliest hour if it is longer than they are) and overlaps nothing already placed."""
    day0 = world.day_start_us(day)
    lo = day0 + int(scenario.earliest_hour * US_PER_HOUR)
    hi = min(day0 + int(scenario.latest_hour * US_PER_HOUR), world.end_us - US_PER_S) - duration
    hi = max(lo, hi)
    candidates = [rng.randint(lo, hi) for _ in range(_TRIES)]
    candidates += list(range(lo, hi + 1, 60 * US_PER_S))
    for start in candidates:
        if _free(start, start + duration, taken) and start + duration < world.end_us:
            return start
    return None


def _candidate_days(
    scenario: Scenario, world: World, window: list[int], rng: random.Random
) -> list[int]:
    """The attack days in random order; weekdays first for a scenario that prefers them (a
    window of only Saturday and Sunday leaves it the weekend at the same hours)."""
    preferred = [d for d in window if not (scenario.weekday and world.is_weekend(d))]
    rng.shuffle(preferred)
    return preferred + [d for d in window if d not in preferred]


def inject_attacks(log: EventLog, world: World, attack_days: int) -> list[ScenarioRun]:
    """Write each scenario once into the final ``attack_days`` days; returns them in
    :data:`SCENARIOS` order."""
    if attack_days == 0:
        return []
    rng = py_rng(world.seed, "attacks")
    cast = _cast(world, rng)
    window = list(range(world.days - attack_days, world.days))
    taken: list[tuple[int, int]] = []
    runs: dict[str, ScenarioRun] = {}
    by_name = {s.name: s for s in SCENARIOS}
    for name in _PLACEMENT_ORDER:
        scenario = by_name[name]
        for day in _candidate_days(scenario, world, window, rng):
            duration = _duration(scenario, world, day, cast)
            start = _find_start(scenario, world, day, duration, taken, rng)
            if start is not None:
                break
        else:
            raise ConfigError(f"no room for scenario {name!r} in the last {attack_days} day(s)")
        first_key = log.sessions
        principals = scenario.build(
            log, world, day, start, py_rng(world.seed, "attack", scenario.name), cast
        )
        taken.append((start, start + duration))
        runs[name] = ScenarioRun(scenario, principals, tuple(range(first_key, log.sessions)))
    return [runs[s.name] for s in SCENARIOS]

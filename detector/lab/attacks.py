"""The seven attack shapes, every variant of each in every run, in the last attack days.

The seed chooses each variant's principal (every staff variant a person of its own, so one
insider is one incident), day and time of day (night or weekend for the off-hours variants,
working hours or any hour for the others), size and speed. Two attacks that share a principal
(app_api's, from different addresses, and the spray with the staff names it tries) are kept at
least :data:`GAP_S` apart (less only when the attack days cannot hold them all), so no attack
is judged against another one's aftermath.

Every attack connection carries the tag ``attack:<n>``; :mod:`detector.lab.labels` resolves
the tagged connections to their session ids, addresses, apps, tables and times from the log.
"""

# ruff: noqa: S608 - statements are built from the simulation's own integers

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from detector.lab.sim import Actor
from detector.lab.traffic import (
    ANALYST_ADDRESSES,
    APP_ADDRESSES,
    DAY,
    DBEAVER,
    DBEAVER_PREAMBLE,
    GUI_ANALYSTS,
    HOUR,
    STAFF_ADDRESSES,
    STAFF_CLIENT,
    SUPPORT_ADDRESSES,
    StaffSession,
    World,
)


@dataclass
class Attack:
    """One scheduled attack: what the labels say about it besides what the log resolves."""

    scenario: str
    variant: str
    principal: str
    description: str
    at: float
    tag: str = ""
    principals: list[str] = field(default_factory=list)
    #: the latest the attack can end (its start plus its planned duration), epoch seconds
    planned_end: float = 0.0


def _pause(w: World, low: float, high: float) -> float:
    return w.rng.uniform(low, high)


def stolen_dump(w: World, a: Attack, tool: str, address: str) -> Actor:
    tables = ["clients", "accounts", "api_keys", "users"]
    if tool == "psql":
        p = w.sim.psql(address, "app_api", w.pw("app_api"), a.tag)
        try:
            for t in tables:
                yield _pause(w, 10, 90)
                p.run(f"COPY {t} TO STDOUT;")
        finally:
            p.close()
        return
    app = DBEAVER if tool == "gui" else ""
    conn = w.sim.connect(address, "app_api", w.pw("app_api"), app, a.tag, literal=tool == "gui")
    try:
        if tool == "gui":
            for sql in DBEAVER_PREAMBLE:
                w.sim.query(conn, sql)
        for t in tables:
            yield _pause(w, 20, 120)
            w.sim.query(conn, f"SELECT * FROM {t}")
    finally:
        conn.close()


def staff_reads(w: World, a: Attack, address: str, client: str | None, statements: list[str],
                gap: tuple[float, float]) -> Actor:
    s = StaffSession(w, a.principal, address, a.tag, client)
    try:
        for sql in statements:
            yield _pause(w, *gap)
            s.run(sql)
    finally:
        s.close()


def per_page_sessions(w: World, a: Attack, address: str, pages: int, size: int) -> Actor:
    for page in range(pages):
        conn = w.sim.connect(address, "app_api", w.pw("app_api"), "app-api", a.tag, literal=False)
        try:
            w.sim.query(conn, "SELECT * FROM users ORDER BY id LIMIT %s OFFSET %s",
                        (size, page * size))
        finally:
            conn.close()
        yield _pause(w, 15, 90)


def team_page_sweep(w: World, a: Attack, address: str, tenants: int) -> Actor:
    conn = w.sim.connect(address, "app_api", w.pw("app_api"), "app-api", a.tag, literal=False)
    try:
        for client in w.rng.sample(range(1, w.sizes.clients + 1), tenants):
            w.sim.query(conn, "SELECT id, name, email, role FROM users WHERE client_id = %s"
                        " ORDER BY name LIMIT %s OFFSET %s", (client, 100, 0))
            yield _pause(w, 2, 12)
    finally:
        conn.close()


def keyset_scrape(w: World, a: Attack, pages: int, size: int) -> Actor:
    s = StaffSession(w, a.principal, SUPPORT_ADDRESSES[a.principal], a.tag, "psql")
    last = 0
    try:
        for _ in range(pages):
            yield _pause(w, 20, 75)
            s.run(f"SELECT * FROM accounts WHERE id > {last} ORDER BY id LIMIT {size}")
            last += size
    finally:
        s.close()


def dump_tables(w: World, a: Attack, address: str) -> Actor:
    w.sim.pg_dump(address, a.principal, w.pw(a.principal), a.tag, ("accounts", "clients"))
    yield 0.0


def login_attack(w: World, a: Attack, address: str, guesses: list[tuple[str, str]],
                 reads: list[str]) -> Actor:
    for user, secret in guesses:
        w.sim.try_login(address, user, secret, "", a.tag)
        yield _pause(w, 0.5, 4)
    conn = w.sim.connect(address, a.principal, w.pw(a.principal), "", a.tag, literal=True)
    try:
        for sql in reads:
            yield _pause(w, 5, 40)
            w.sim.query(conn, sql)
    finally:
        conn.close()


def app_fanout(w: World, a: Attack, address: str, tenants: int) -> Actor:
    conn = w.sim.connect(address, "app_api", w.pw("app_api"), "app-api", a.tag, literal=False)
    try:
        for client in w.rng.sample(range(1, w.sizes.clients + 1), tenants):
            w.sim.query(conn, "SELECT id, name, email, balance, status FROM accounts"
                        " WHERE client_id = %s", (client,))
            yield _pause(w, 0.3, 2.5)
    finally:
        conn.close()


def slow_guessing(w: World, a: Attack, address: str, guesses: int, gap: tuple[float, float],
                  reads: list[str]) -> Actor:
    """Low and slow: one wrong password every few minutes (under any lockout rate), then the
    right one and full reads."""
    for i in range(guesses):
        w.sim.try_login(address, a.principal, f"{a.principal}{2019 + i % 7}!", "", a.tag)
        yield _pause(w, *gap)
    yield from login_attack(w, a, address, [], reads)


GAP_S = 2 * HOUR
#: Gaps tried in turn when the attack days cannot hold every attack GAP_S apart.
FALLBACK_GAPS_S = (GAP_S, HOUR, HOUR / 2, 0.0)
WORK_HOURS = (9.0, 17.0)
NIGHT = "night"
WORK = "work"
ANY = "any"


@dataclass
class Plan:
    """An attack before it has a time: when it may run and how long it can take."""

    attack: Attack
    make: Callable[[World, Attack], Actor]
    #: the longest it can take, simulated seconds (every pause at its maximum, plus margin)
    duration: float
    #: NIGHT (night hours, or daytime on a weekend day), WORK (working hours of a weekday when
    #: there is one) or ANY (any day)
    days: str
    hours: tuple[float, float]
    conflicts: frozenset[str] = frozenset()


def _bound(*parts: float) -> float:
    """An upper bound of an attack's duration from its pauses: 10% and a minute of margin for
    the statements themselves."""
    return sum(parts) * 1.1 + 60.0


#: The staff variants and who may carry each, the most constrained first: every one gets a
#: principal of its own (:func:`cast_staff`).
STAFF_VARIANTS: tuple[tuple[str, str, str], ...] = (
    ("aggregate_theft", "analyst_gui", "gui_analysts"),
    ("off_hours_insider", "night_gui", "gui_analysts"),
    ("cross_tenant_fanout", "analyst_gui", "gui_analysts"),
    ("copy_export", "copy_psql_night", "psql_analysts"),
    ("off_hours_insider", "night_psql", "psql_analysts"),
    ("off_hours_insider", "late_psql_joins", "psql_analysts"),
    ("aggregate_theft", "support_psql", "psql_support"),
    ("slow_pagination", "keyset_psql", "psql_support"),
    ("cross_tenant_fanout", "support_psql_literals", "psql_support"),
    ("aggregate_theft", "support_console", "console_support"),
    ("copy_export", "copy_join_csv", "psql_or_gui"),
    ("brute_force_then_login", "brute_force", "support"),
    ("copy_export", "pg_dump_tables", "staff"),
    ("brute_force_then_login", "low_and_slow", "staff"),
)


def staff_pools() -> dict[str, list[str]]:
    """The people each kind of staff variant may be carried by."""
    gui = sorted(GUI_ANALYSTS)
    psql_analysts = sorted(a for a in ANALYST_ADDRESSES if STAFF_CLIENT[a] == "psql")
    psql_support = sorted(s for s in SUPPORT_ADDRESSES if STAFF_CLIENT[s] == "psql")
    return {
        "gui_analysts": gui,
        "psql_analysts": psql_analysts,
        "psql_support": psql_support,
        "console_support": sorted(s for s in SUPPORT_ADDRESSES if s not in psql_support),
        "psql_or_gui": [*psql_analysts, *gui, *psql_support],
        "support": sorted(SUPPORT_ADDRESSES),
        "staff": sorted(STAFF_ADDRESSES),
    }


def cast_staff(w: World) -> dict[tuple[str, str], str]:
    """A principal for every staff variant, each a different person (one insider is one
    incident: no attack raises another's baselines). In :data:`STAFF_VARIANTS` order, each
    variant takes one of the people of its pool nobody has taken yet (the seed chooses)."""
    pools = staff_pools()
    taken: set[str] = set()
    out: dict[tuple[str, str], str] = {}
    for scenario, variant, pool in STAFF_VARIANTS:
        free = [p for p in pools[pool] if p not in taken]
        if not free:
            raise ValueError(f"no staff principal left for {scenario}/{variant}")
        out[scenario, variant] = who = w.rng.choice(free)
        taken.add(who)
    return out


#: The spray's successful login: the BI tool's service account, which no other attack uses
#: (every analyst and support agent carries one attack of their own).
SPRAY_PRINCIPAL = "bi"


def plan_attacks(w: World) -> list[Plan]:
    """Every variant of the seven shapes with its principal, size and speed (no times yet)."""
    rng = w.rng
    cast = cast_staff(w)
    plans: list[Plan] = []
    new_addresses = iter(rng.sample(range(10, 250), 6))

    def new_address() -> str:
        return f"127.0.99.{next(new_addresses)}"

    def add(a: Attack, make: Callable[..., Actor], duration: float, days: str,
            hours: tuple[float, float], **kwargs: Any) -> None:
        a.principals = a.principals or [a.principal]
        plans.append(Plan(a, partial(make, **kwargs), duration, days, hours,
                          frozenset(a.principals)))

    full = ["clients", "accounts", "api_keys", "users"]

    # 1. stolen application credentials: three tools from three new addresses
    for tool in ("gui", "psql", "script"):
        address = new_address()
        kind = {"gui": "a GUI client", "psql": "psql (COPY)", "script": "a script"}[tool]
        add(Attack("stolen_app_credentials_dump", tool, "app_api",
                   f"app_api credentials used from new address {address} with {kind} to read"
                   " all of " + ", ".join(full), 0.0),
            stolen_dump, _bound(4 * 120), ANY, (0, 24), tool=tool, address=address)

    # 2. aggregate theft: few rows, whole tables
    aggregates = [
        "SELECT client_id, count(*), sum(balance) FROM accounts GROUP BY client_id",
        "SELECT client_id, sum(searches), max(day) FROM client_daily_search_counts"
        " GROUP BY client_id",
        "SELECT id, name, email, country FROM clients",
    ]
    for variant in ("support_psql", "analyst_gui", "support_console"):
        statements = list(aggregates)
        if variant == "support_console":
            statements.insert(2, "SELECT client_id, count(*) FROM users GROUP BY client_id")
        who = cast["aggregate_theft", variant]
        client = STAFF_CLIENT[who]
        address = STAFF_ADDRESSES[who]
        add(Attack("aggregate_theft", variant, who,
                   f"{who}'s credentials from the usual address and client ({client}): per-client"
                   " COUNT/SUM over accounts and search counts plus the client list (few rows,"
                   " whole tables)", 0.0),
            staff_reads, _bound(len(statements) * 150), WORK, WORK_HOURS,
            address=address, client=client, statements=statements, gap=(30, 150))

    # 3. slow pagination: two app servers, one support agent
    app_servers = rng.sample(APP_ADDRESSES, 2)
    pages = rng.randint(60, 100)
    size = -(-w.sizes.users // pages)
    add(Attack("slow_pagination", "per_page_sessions", "app_api",
               f"app_api from app server {app_servers[0]}: one short session per page of"
               f" `SELECT * FROM users ORDER BY id LIMIT $1 OFFSET $2` ({pages} pages of {size},"
               " every 15-90 s), a shape the app never runs", 0.0),
        per_page_sessions, _bound(pages * 90), ANY, (0, 22),
        address=app_servers[0], pages=pages, size=size)
    tenants = min(w.sizes.clients, rng.randint(200, 500))
    add(Attack("slow_pagination", "team_page_sweep", "app_api",
               f"one app_api session from app server {app_servers[1]} running the app's own"
               f" team-page query for {tenants} tenants, 2-12 s apart", 0.0),
        team_page_sweep, _bound(tenants * 12), ANY, (0, 22),
        address=app_servers[1], tenants=tenants)
    who = cast["slow_pagination", "keyset_psql"]
    pages = rng.randint(60, 90)
    size = max(50, -(-w.sizes.accounts // pages))
    add(Attack("slow_pagination", "keyset_psql", who,
               f"{who} via psql: keyset pagination over accounts (`WHERE id > N ORDER BY id"
               f" LIMIT {size}`), {pages} pages, one every 20-75 s", 0.0),
        keyset_scrape, _bound(pages * 75), WORK, (9, 15), pages=pages, size=size)

    # 4. COPY export by staff who never export: pg_dump by anyone, the night \\copy by a psql
    # analyst, the join by someone who works in psql or the GUI client, in that client
    dumper = cast["copy_export", "pg_dump_tables"]
    night_who = cast["copy_export", "copy_psql_night"]
    join_who = cast["copy_export", "copy_join_csv"]
    add(Attack("copy_export", "pg_dump_tables", dumper,
               f"{dumper}, who never exported, runs `pg_dump -t accounts -t clients`", 0.0),
        dump_tables, _bound(60), WORK, (12, 20), address=STAFF_ADDRESSES[dumper])
    add(Attack("copy_export", "copy_psql_night", night_who,
               f"{night_who}, who never exported, runs `\\copy clients TO 'clients.csv' WITH"
               " CSV HEADER` in psql at night (logged as `COPY clients TO STDOUT`), near the"
               " nightly backup", 0.0),
        staff_reads, _bound(30), NIGHT, (2.6, 3.0), address=ANALYST_ADDRESSES[night_who],
        client="psql", statements=[f"\\copy clients TO '{os.devnull}' WITH CSV HEADER"],
        gap=(5, 30))
    join = ("COPY (SELECT c.id, c.name, c.email, a.id AS account_id, a.email AS account_email,"
            " a.balance FROM clients c JOIN accounts a ON a.client_id = c.id) TO STDOUT WITH CSV")
    join_client = STAFF_CLIENT[join_who]
    add(Attack("copy_export", "copy_join_csv", join_who,
               f"{join_who}, who never exported, runs `COPY (SELECT ... JOIN ...) TO STDOUT WITH"
               f" CSV` via {join_client}", 0.0),
        staff_reads, _bound(30), WORK, (13, 19), address=STAFF_ADDRESSES[join_who],
        client=join_client, statements=[join], gap=(5, 30))

    # 5. off-hours insider from the usual address and client
    reads = [f"SELECT * FROM {t}" for t in ("accounts", "clients", "api_keys", "invoices")]
    for variant, hours in (("night_psql", (0.5, 4.5)), ("night_gui", (0.5, 4.5)),
                           ("late_psql_joins", (22.0, 23.6))):
        who = cast["off_hours_insider", variant]
        statements = list(reads)
        if variant == "late_psql_joins":
            statements[0] = ("SELECT a.*, c.name AS client_name, c.email AS client_email"
                             " FROM accounts a JOIN clients c ON c.id = a.client_id")
        add(Attack("off_hours_insider", variant, who,
                   f"{who} at night from the usual address and client reads accounts, clients,"
                   " api_keys and invoices in full (daytime volume normal)", 0.0),
            staff_reads, _bound(4 * 300), NIGHT, hours, address=ANALYST_ADDRESSES[who],
            client=None, statements=statements, gap=(60, 300))

    # 6. guessing passwords from a new address, then a login and full reads
    after = ["SELECT * FROM clients", "SELECT * FROM accounts", "SELECT * FROM users"]
    who = cast["brute_force_then_login", "brute_force"]
    address = new_address()
    guesses = [(who, f"guess{i}") for i in range(rng.randint(30, 80))]
    add(Attack("brute_force_then_login", "brute_force", who,
               f"{len(guesses)} failed logins for {who} from new address {address} within"
               " minutes, then a successful login and full reads", 0.0),
        login_attack, _bound(len(guesses) * 4, 3 * 40), ANY, (0, 24),
        address=address, guesses=guesses, reads=after)
    # the spray tries several real staff names (whose days go on as usual) and names that do
    # not exist; it gets in as a principal that carries no other attack
    who = SPRAY_PRINCIPAL
    address = new_address()
    sprayed = rng.sample(sorted(STAFF_ADDRESSES), rng.randint(4, 6))
    names = ["admin", "root", "test", "readonly", "report", "oracle", "deploy", "guest",
             "analytics", "sa", *sprayed]
    rng.shuffle(names)
    spray = [(n, p) for p in ("Spring2026!", "Welcome1") for n in names]
    a = Attack("brute_force_then_login", "password_spray", who,
               f"password spraying across {len(names)} user names ({len(sprayed)} of staff,"
               f" the rest nonexistent) from {address}, then a successful login as {who} and"
               " full reads", 0.0)
    # every real role it tries is a principal of it (and kept apart from their attacks)
    a.principals = sorted({*sprayed, who})
    add(a, login_attack, _bound(len(spray) * 4, 3 * 40), ANY, (0, 24),
        address=address, guesses=spray, reads=after)
    who = cast["brute_force_then_login", "low_and_slow"]
    address = new_address()
    n = rng.randint(12, 25)
    add(Attack("brute_force_then_login", "low_and_slow", who,
               f"{n} failed logins for {who} from new address {address}, one every 2-6"
               " minutes (under a lockout rate), then a successful login and full reads", 0.0),
        slow_guessing, _bound(n * 360, 3 * 40), ANY, (0, 22),
        address=address, guesses=n, gap=(120, 360), reads=after)

    # 7. cross-tenant fan-out
    who = cast["cross_tenant_fanout", "support_psql_literals"]
    n = min(w.sizes.clients, rng.randint(100, 300))
    ids = rng.sample(range(1, w.sizes.clients + 1), n)
    add(Attack("cross_tenant_fanout", "support_psql_literals", who,
               f"{who} looks up {n} different clients by literal id within minutes via psql",
               0.0),
        staff_reads, _bound(n * 4), WORK, WORK_HOURS, address=STAFF_ADDRESSES[who],
        client="psql", statements=[f"SELECT * FROM clients WHERE id = {i}" for i in ids],
        gap=(0.5, 4.0))
    n = min(w.sizes.clients, rng.randint(200, 500))
    address = rng.choice(APP_ADDRESSES)
    add(Attack("cross_tenant_fanout", "app_bound_session", "app_api",
               f"one app_api session from app server {address} reads the accounts of {n}"
               " tenants (bound parameters: tenant ids invisible)", 0.0),
        app_fanout, _bound(n * 2.5), ANY, (0, 24), address=address, tenants=n)
    n = min(w.sizes.clients, rng.randint(120, 300))
    ids = rng.sample(range(1, w.sizes.clients + 1), n)
    who = cast["cross_tenant_fanout", "analyst_gui"]
    add(Attack("cross_tenant_fanout", "analyst_gui", who,
               f"{who} in the GUI client reads the accounts of {n} tenants one by one"
               " (`WHERE client_id = N`, literal ids), seconds apart", 0.0),
        staff_reads, _bound(n * 6), WORK, WORK_HOURS, address=STAFF_ADDRESSES[who],
        client=DBEAVER, statements=[f"SELECT * FROM accounts WHERE client_id = {i}" for i in ids],
        gap=(1.0, 6.0))
    return plans


def _candidate_days(w: World, days: str) -> list[int]:
    attack = list(range(w.days - w.attack_days, w.days))
    if days == WORK:
        return [d for d in attack if not w.weekend(d)] or attack
    return attack


def _draw(w: World, plan: Plan) -> float:
    day = w.rng.choice(_candidate_days(w, plan.days))
    low, high = plan.hours
    if plan.days == NIGHT and w.weekend(day) and w.rng.random() < 0.5:
        low, high = 10.0, 18.0  # a weekend day is off hours all day
    return w.at(day, w.rng.uniform(low, high))


def _clear(plan: Plan, at: float, placed: list[tuple[Plan, float]], gap: float) -> bool:
    for other, start in placed:
        if plan.conflicts & other.conflicts and not (
            at >= start + other.duration + gap or at + plan.duration + gap <= start
        ):
            return False
    return True


def place_plans(w: World, plans: list[Plan], tries: int = 600) -> tuple[list[float], float]:
    """A start for every plan: inside the attack days and its hours, clear of the attacks
    sharing a principal by GAP_S (else the largest gap of FALLBACK_GAPS_S that fits). The
    starts in ``plans`` order and the smallest gap between two attacks of one principal."""
    end = w.start + w.days * DAY
    # the most constrained first: most principals, then longest
    order = sorted(range(len(plans)), key=lambda i: (-len(plans[i].conflicts),
                                                     -plans[i].duration, i))
    placed: list[tuple[Plan, float]] = []
    starts: dict[int, float] = {}
    for i in order:
        plan = plans[i]
        at = None
        for gap in FALLBACK_GAPS_S:
            for _ in range(tries):
                candidate = _draw(w, plan)
                if candidate + plan.duration <= end and _clear(plan, candidate, placed, gap):
                    at = candidate
                    break
            if at is not None:
                break
        if at is None:  # no gap at all fits: overlap, but inside the days
            at = min(_draw(w, plan), end - plan.duration)
        placed.append((plan, at))
        starts[i] = at
    smallest = math.inf
    for n, (a, sa) in enumerate(placed):
        for b, sb in placed[n + 1 :]:
            if a.conflicts & b.conflicts:
                first, second = sorted(((sa, a), (sb, b)), key=lambda x: x[0])
                smallest = min(smallest, second[0] - first[0] - first[1].duration)
    return [starts[i] for i in range(len(plans))], smallest


def schedule_attacks(w: World) -> list[Attack]:
    """Plan every variant, place them in the attack days, spawn them; the attacks (their
    ``min_gap_s`` on the first: the smallest planned gap between attacks of one principal)."""
    plans = plan_attacks(w)
    starts, smallest = place_plans(w, plans)
    attacks: list[Attack] = []
    for n, (plan, at) in enumerate(zip(plans, starts, strict=True)):
        a = plan.attack
        a.at = at
        a.tag = f"attack:{n}"
        a.planned_end = at + plan.duration
        attacks.append(a)
        w.sim.spawn(at, plan.make(w.fork(), a))
    w.attack_gap_s = smallest
    return attacks

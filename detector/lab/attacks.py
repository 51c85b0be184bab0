"""The seven attack shapes, each in 2-3 variants the seed picks, in the last attack days.

Every attack connection carries the tag ``attack:<n>``; :mod:`detector.lab.labels` resolves
the tagged connections to their session ids, addresses, apps, tables and times from the log.
"""

# ruff: noqa: S608 - statements are built from the simulation's own integers

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

from detector.lab.sim import Actor
from detector.lab.traffic import (
    ANALYST_ADDRESSES,
    APP_ADDRESSES,
    DBEAVER,
    DBEAVER_PREAMBLE,
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


def schedule_attacks(w: World) -> list[Attack]:
    """Pick a variant of each shape, place it in the attack days, spawn it; the attacks."""
    rng = w.rng
    first = w.days - w.attack_days
    support = rng.sample(sorted(SUPPORT_ADDRESSES), 4)
    psql_analysts = rng.sample(["analyst_1", "analyst_2"], 2)
    attacks: list[Attack] = []

    def when(low: float, high: float) -> float:
        return w.at(rng.randrange(first, w.days), rng.uniform(low, high))

    def place(a: Attack, make: Callable[[World, Attack], Actor]) -> None:
        a.tag = f"attack:{len(attacks)}"
        a.principals = a.principals or [a.principal]
        attacks.append(a)
        w.sim.spawn(a.at, make(w.fork(), a))

    full = ["clients", "accounts", "api_keys", "users"]
    # 1. stolen application credentials
    tool = rng.choice(["gui", "psql", "script"])
    address = f"127.0.99.{rng.randint(10, 49)}"
    place(Attack("stolen_app_credentials_dump", tool, "app_api",
                 f"app_api credentials used from new address {address} with "
                 + {"gui": "a GUI client", "psql": "psql (COPY)", "script": "a script"}[tool]
                 + " to read all of " + ", ".join(full), when(0, 24)),
          partial(stolen_dump, tool=tool, address=address))

    # 2. aggregate theft
    variant = rng.choice(["support_psql", "analyst_gui", "support_console"])
    aggregates = [
        "SELECT client_id, count(*), sum(balance) FROM accounts GROUP BY client_id",
        "SELECT client_id, sum(searches), max(day) FROM client_daily_search_counts"
        " GROUP BY client_id",
        "SELECT id, name, email, country FROM clients",
    ]
    if variant == "support_console":
        aggregates.insert(2, "SELECT client_id, count(*) FROM users GROUP BY client_id")
    who = {"support_psql": support[0], "analyst_gui": "analyst_3",
           "support_console": rng.choice(["support_3", "support_4"])}[variant]
    if who in support[1:]:
        support.remove(who)
        support.insert(0, who)
    client = {"support_psql": "psql", "analyst_gui": DBEAVER,
              "support_console": "support-console"}[variant]
    address = {**SUPPORT_ADDRESSES, **ANALYST_ADDRESSES}[who]
    place(Attack("aggregate_theft", variant, who,
                 f"{who}'s credentials from the usual address: per-client COUNT/SUM over accounts"
                 " and search counts plus the client list (few rows, whole tables)",
                 when(9, 17)),
          partial(staff_reads, address=address, client=client, statements=aggregates,
                  gap=(30, 150)))

    # 3. slow pagination
    variant = rng.choice(["per_page_sessions", "team_page_sweep", "keyset_psql"])
    if variant == "per_page_sessions":
        pages = rng.randint(60, 100)
        size = -(-w.sizes.users // pages)
        address = rng.choice(APP_ADDRESSES)
        place(Attack("slow_pagination", variant, "app_api",
                     f"app_api from app server {address}: one short session per page of"
                     f" `SELECT * FROM users ORDER BY id LIMIT $1 OFFSET $2` ({pages} pages of"
                     f" {size}, every 15-90 s), a shape the app never runs", when(0, 22)),
              partial(per_page_sessions, address=address, pages=pages, size=size))
    elif variant == "team_page_sweep":
        tenants = min(w.sizes.clients, rng.randint(200, 500))
        address = rng.choice(APP_ADDRESSES)
        place(Attack("slow_pagination", variant, "app_api",
                     f"one app_api session from {address} running the app's own team-page"
                     f" query for {tenants} tenants, a few seconds apart", when(0, 22)),
              partial(team_page_sweep, address=address, tenants=tenants))
    else:
        who = support[1]
        pages = rng.randint(60, 90)
        size = max(50, -(-w.sizes.accounts // pages))
        place(Attack("slow_pagination", variant, who,
                     f"{who} via psql: keyset pagination over accounts (`WHERE id > N ORDER BY"
                     f" id LIMIT {size}`), a page every 20-75 s", when(9, 16)),
              partial(keyset_scrape, pages=pages, size=size))

    # 4. COPY export
    variant = rng.choice(["copy_psql_night", "pg_dump_tables", "copy_join_csv"])
    who = psql_analysts[0]
    address = ANALYST_ADDRESSES[who]
    if variant == "pg_dump_tables":
        place(Attack("copy_export", variant, who,
                     f"{who}, who never exported, runs `pg_dump -t accounts -t clients`",
                     when(12, 20)),
              partial(dump_tables, address=address))
    else:
        statement = ("COPY clients TO STDOUT" if variant == "copy_psql_night" else
                     "COPY (SELECT c.id, c.name, c.email, a.id AS account_id, a.email AS"
                     " account_email, a.balance FROM clients c JOIN accounts a ON"
                     " a.client_id = c.id) TO STDOUT WITH CSV")
        hours = (2.6, 3.0) if variant == "copy_psql_night" else (13, 19)
        place(Attack("copy_export", variant, who,
                     f"{who}, who never exported, runs `{statement[:40]}...` via psql",
                     when(*hours)),
              partial(staff_reads, address=address, client="psql", statements=[statement],
                      gap=(5, 30)))

    # 5. off-hours insider
    variant = rng.choice(["night_psql", "night_gui", "late_psql_joins"])
    who = psql_analysts[1] if variant != "night_gui" else "analyst_3"
    reads = [f"SELECT * FROM {t}" for t in ("accounts", "clients", "api_keys", "invoices")]
    if variant == "late_psql_joins":
        reads[0] = ("SELECT a.*, c.name AS client_name, c.email AS client_email FROM accounts a"
                    " JOIN clients c ON c.id = a.client_id")
    hours = (22.5, 23.8) if variant == "late_psql_joins" else (0.5, 4.5)
    place(Attack("off_hours_insider", variant, who,
                 f"{who} at night from the usual address and client reads accounts, clients,"
                 " api_keys and invoices in full (daytime volume normal)", when(*hours)),
          partial(staff_reads, address=ANALYST_ADDRESSES[who], client=None, statements=reads,
                  gap=(60, 300)))

    # 6. brute force, then login
    variant = rng.choice(["brute_force", "password_spray"])
    address = f"127.0.99.{rng.randint(50, 99)}"
    who = support[2]
    after = ["SELECT * FROM clients", "SELECT * FROM accounts", "SELECT * FROM users"]
    if variant == "brute_force":
        guesses = [(who, f"guess{i}") for i in range(rng.randint(30, 80))]
        a = Attack("brute_force_then_login", variant, who,
                   f"{len(guesses)} failed logins for {who} from new address {address}, then"
                   " a successful login and full reads", when(0, 24))
    else:
        names = ["admin", "root", "test", "readonly", "report", "oracle", "deploy", "guest",
                 "analytics", "sa", *sorted(SUPPORT_ADDRESSES), *sorted(ANALYST_ADDRESSES)]
        names += ["app_api", "bi", "worker"]
        rng.shuffle(names)
        names = [n for n in names if n != who]
        guesses = [(n, p) for p in ("Spring2026!", "Welcome1") for n in names]
        a = Attack("brute_force_then_login", variant, who,
                   f"password spraying across {len(names)} user names (some nonexistent) from"
                   f" {address}, then a successful login as {who} and full reads", when(0, 24))
        a.principals = sorted({n for n, _ in guesses} | {who})
    place(a, partial(login_attack, address=address, guesses=guesses, reads=after))

    # 7. cross-tenant fan-out
    variant = rng.choice(["support_psql_literals", "app_bound_session"])
    if variant == "support_psql_literals":
        who = support[3]
        n = min(w.sizes.clients, rng.randint(100, 300))
        ids = rng.sample(range(1, w.sizes.clients + 1), n)
        statements = [f"SELECT * FROM clients WHERE id = {i}" for i in ids]
        place(Attack("cross_tenant_fanout", variant, who,
                     f"{who} looks up {n} different clients by literal id within minutes via"
                     " psql", when(9, 17)),
              partial(staff_reads, address=SUPPORT_ADDRESSES[who], client="psql",
                      statements=statements, gap=(0.5, 4.0)))
    else:
        n = min(w.sizes.clients, rng.randint(200, 500))
        address = rng.choice(APP_ADDRESSES)
        place(Attack("cross_tenant_fanout", variant, "app_api",
                     f"one app_api session from {address} reads the accounts of {n} tenants"
                     " (bound parameters: tenant ids invisible)", when(0, 24)),
              partial(app_fanout, address=address, tenants=n))
    return attacks

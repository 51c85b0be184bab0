"""The benign traffic of the simulated SaaS, role by role (see docs/lab.md).

Each function schedules one role's actors for the whole run on :class:`World`'s driver. Times
are epoch seconds of the simulated clock (UTC); every draw comes from the world's seeded
random generator, in a fixed order, so a seed gives the same schedule every time.
"""

# ruff: noqa: S608 - statements are built from the simulation's own integers and dates

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime, timedelta
from typing import Any

import psycopg

from detector.lab.schema import Sizes, password
from detector.lab.sim import Actor, Psql, Sim

DAY = 86400.0
HOUR = 3600.0

APP_ADDRESSES = ("127.0.10.1", "127.0.10.2", "127.0.10.3")
WORKER_ADDRESS = "127.0.20.1"
BI_ADDRESS = "127.0.30.1"
ANALYST_ADDRESSES = {f"analyst_{i}": f"127.0.40.{i}" for i in range(1, 7)}
SUPPORT_ADDRESSES = {f"support_{i}": f"127.0.50.{i}" for i in range(1, 9)}
BACKUP_ADDRESS = "127.0.60.1"
BILLING_ADDRESS = "127.0.70.1"
DBA_ADDRESS = "127.0.80.1"
DBEAVER = "DBeaver 23.2.0 - Main"
SUPPORT_CONSOLE = "support-console"
#: The analysts who work in the GUI client (the others in psql): one for each GUI attack
#: variant, so that no analyst carries two attacks.
GUI_ANALYSTS = ("analyst_3", "analyst_5", "analyst_6")
#: The support agents who work in the support console (the others in psql).
CONSOLE_SUPPORT = ("support_3", "support_4", "support_7", "support_8")
#: How each analyst and support agent connects: real psql or a GUI/console through psycopg.
STAFF_CLIENT = {
    **{who: DBEAVER if who in GUI_ANALYSTS else "psql" for who in ANALYST_ADDRESSES},
    **{who: SUPPORT_CONSOLE if who in CONSOLE_SUPPORT else "psql" for who in SUPPORT_ADDRESSES},
}
#: Every analyst's and support agent's address.
STAFF_ADDRESSES = {**ANALYST_ADDRESSES, **SUPPORT_ADDRESSES}
DBEAVER_PREAMBLE = (
    "SET application_name = 'DBeaver 23.2.0 - Main'",
    "SELECT current_schema(), session_user",
    "SHOW search_path",
    "SET search_path = public",
    "SELECT t.oid, t.typname FROM pg_catalog.pg_type t WHERE t.typname = 'hstore'",
)


def diurnal(hour: float) -> float:
    """Relative app traffic at an hour of the day (UTC): low at night, peak mid-afternoon."""
    return 0.08 + math.exp(-(((hour - 14.5) / 4.2) ** 2))


@dataclass
class World:
    """Everything the role and attack schedulers share."""

    sim: Sim
    rng: random.Random
    seed: int
    sizes: Sizes
    start: float
    days: int
    scale: float
    attack_days: int
    deploy_failure_days: list[int] = field(default_factory=list)
    dba_change_days: list[int] = field(default_factory=list)
    #: the smallest planned gap between two attacks of one principal (seconds)
    attack_gap_s: float = 0.0

    def fork(self) -> World:
        """The same world with a generator of its own for one actor: what an actor draws
        then never depends on the order in which actors happen to run."""
        return replace(self, rng=random.Random(self.rng.getrandbits(64)))

    def day_start(self, day: int) -> float:
        return self.start + day * DAY

    def date_of(self, day: int) -> date:
        return datetime.fromtimestamp(self.day_start(day), UTC).date()

    def weekend(self, day: int) -> bool:
        return self.date_of(day).weekday() >= 5

    def pw(self, role: str) -> str:
        return password(role, self.seed)

    def client(self) -> int:
        return self.rng.randint(1, self.sizes.clients)

    def account_of(self, client: int) -> int:
        return client + self.sizes.clients * self.rng.randrange(self.sizes.accounts_per_client)

    def user_of(self, client: int) -> int:
        return client + self.sizes.clients * self.rng.randrange(self.sizes.users_per_client)

    def key_hash(self, client: int) -> str:
        import hashlib

        return hashlib.md5(f"key{client}{self.seed}".encode()).hexdigest()  # noqa: S324

    def at(self, day: int, hour: float) -> float:
        return self.day_start(day) + hour * HOUR


# --- app_api ------------------------------------------------------------------------------------


def app_statement(w: World) -> tuple[str, tuple[object, ...]]:
    """One statement of the app's closed vocabulary, with bound parameters."""
    c = w.client()
    r = w.rng.random()
    if r < 0.16:
        return ("SELECT id, name, email, balance, status FROM accounts"
                " WHERE client_id = %s AND id = %s", (c, w.account_of(c)))
    if r < 0.30:
        return ("SELECT id, name, email, role FROM users WHERE client_id = %s AND id = %s",
                (c, w.user_of(c)))
    if r < 0.40:
        return ("SELECT id, name, email, role FROM users WHERE client_id = %s"
                " ORDER BY name LIMIT %s OFFSET %s", (c, 25, 25 * w.rng.choice((0, 0, 0, 1))))
    if r < 0.55:
        return ("INSERT INTO search_events (client_id, query_hash, created_at)"
                " VALUES (%s, %s, now())", (c, f"{w.rng.getrandbits(64):016x}"))
    if r < 0.68:
        return ("INSERT INTO client_daily_search_counts (client_id, day, searches)"
                " VALUES (%s, current_date, 1) ON CONFLICT (client_id, day)"
                " DO UPDATE SET searches = client_daily_search_counts.searches + 1", (c,))
    if r < 0.76:
        return ("UPDATE accounts SET balance = balance + %s, updated_at = now()"
                " WHERE client_id = %s AND id = %s",
                (round(w.rng.uniform(-50, 200), 2), c, w.account_of(c)))
    if r < 0.84:
        return "SELECT id, name, plan_id, country FROM clients WHERE id = %s", (c,)
    if r < 0.90:
        return ("SELECT enabled FROM feature_flags WHERE name = %s",
                (f"flag_{w.rng.randint(1, 30)}",))
    if r < 0.96:
        return ("SELECT month, amount FROM invoices WHERE client_id = %s"
                " ORDER BY month DESC LIMIT %s", (c, 12))
    return "SELECT count(*) FROM accounts WHERE client_id = %s", (c,)


def app_session(w: World, address: str) -> Actor:
    conn = w.sim.connect(address, "app_api", w.pw("app_api"), "app-api", literal=False)
    try:
        if w.rng.random() < 0.7:
            w.sim.query(conn, "SELECT id, client_id, scopes FROM api_keys WHERE key_hash = %s",
                        (w.key_hash(w.client()),))
            yield w.rng.uniform(0.005, 0.2)
        for _ in range(w.rng.randint(1, 3)):
            sql, params = app_statement(w)
            w.sim.query(conn, sql, params)
            yield w.rng.uniform(0.005, 0.5)
    finally:
        conn.close()


def schedule_app(w: World) -> None:
    weights = [diurnal(h + 0.5) for h in range(24)]
    total = sum(weights)
    for day in range(w.days):
        n = 3000 * w.scale * (0.4 if w.weekend(day) else 1.0) * w.rng.uniform(0.9, 1.1)
        for hour, weight in enumerate(weights):
            for _ in range(round(n * weight / total)):
                at = w.at(day, hour + w.rng.random())
                w.sim.spawn(at, app_session(w.fork(), w.rng.choice(APP_ADDRESSES)))


def deploy_failures(w: World, day: int) -> Actor:
    """A bad deploy: one app server retries with a wrong password 20-60 times in a minute."""
    address = w.rng.choice(APP_ADDRESSES)
    attempts = w.rng.randint(20, 60)
    for _ in range(attempts):
        w.sim.try_login(address, "app_api", "stale-" + w.pw("app_api"), "app-api",
                        "heavy:deploy_login_failures")
        yield 55.0 / attempts * w.rng.uniform(0.5, 1.5)


def schedule_deploys(w: World) -> None:
    attack_first = w.days - w.attack_days
    train = list(range(min(attack_first, w.days)))
    picks = w.rng.sample(train, min(len(train), w.rng.randint(1, 2)))
    picks.append(w.rng.randrange(attack_first, w.days))
    w.deploy_failure_days = sorted(set(picks))
    for day in w.deploy_failure_days:
        w.sim.spawn(w.at(day, w.rng.uniform(10, 17)), deploy_failures(w.fork(), day))


# --- worker -------------------------------------------------------------------------------------


def hourly_job(w: World, job: str) -> Actor:
    conn = w.sim.connect(WORKER_ADDRESS, "worker", w.pw("worker"), "worker", literal=False)
    try:
        w.sim.query(conn, "INSERT INTO job_runs (job, started_at, status)"
                    " VALUES (%s, now(), 'running') RETURNING id", (job,))
        yield w.rng.uniform(0.5, 3)
        if job == "usage_rollup":
            w.sim.query(conn, "SELECT client_id, count(*) FROM search_events"
                        " WHERE created_at > now() - interval '1 hour' GROUP BY client_id")
        else:
            w.sim.query(conn, "DELETE FROM job_runs WHERE started_at < now() - interval '30 days'")
        yield w.rng.uniform(0.5, 5)
        w.sim.query(conn, "UPDATE job_runs SET finished_at = now(), status = 'ok'"
                    " WHERE job = %s AND status = 'running'", (job,))
    finally:
        conn.close()


def nightly_aggregation(w: World, day: int) -> Actor:
    conn = w.sim.connect(WORKER_ADDRESS, "worker", w.pw("worker"), "worker",
                         "heavy:nightly_aggregation", literal=False)
    yesterday = w.date_of(day) - timedelta(days=1)
    try:
        w.sim.query(conn, "INSERT INTO job_runs (job, started_at, status)"
                    " VALUES ('nightly_aggregation', now(), 'running')")
        yield w.rng.uniform(0.5, 2)
        w.sim.query(conn, "INSERT INTO client_daily_search_counts (client_id, day, searches)"
                    " SELECT client_id, created_at::date, count(*) FROM search_events"
                    " WHERE created_at >= %s AND created_at < %s GROUP BY client_id,"
                    " created_at::date ON CONFLICT (client_id, day)"
                    " DO UPDATE SET searches = EXCLUDED.searches",
                    (yesterday, yesterday + timedelta(days=1)))
        yield w.rng.uniform(2, 20)
        w.sim.query(conn, "SELECT client_id, sum(searches) FROM client_daily_search_counts"
                    " WHERE day >= %s GROUP BY client_id", (yesterday - timedelta(days=30),))
        yield w.rng.uniform(1, 5)
        w.sim.query(conn, "UPDATE job_runs SET finished_at = now(), status = 'ok'"
                    " WHERE job = 'nightly_aggregation' AND status = 'running'")
    finally:
        conn.close()


def schedule_worker(w: World) -> None:
    for day in range(w.days):
        for hour in range(24):
            job = "usage_rollup" if hour % 2 == 0 else "cleanup"
            at = w.at(day, hour + (5 + w.rng.uniform(0, 2)) / 60)
            w.sim.spawn(at, hourly_job(w.fork(), job))
        at = w.at(day, 1 + w.rng.uniform(-0.1, 0.2))
        w.sim.spawn(at, nightly_aggregation(w.fork(), day))


# --- bi -----------------------------------------------------------------------------------------


def bi_queries(w: World, when: date) -> list[str]:
    since = (when - timedelta(days=30)).isoformat()

    def tag() -> str:
        return (f"-- Metabase:: userID: {w.rng.choice((1, 1, 4, 7))} queryType: MBQL"
                f" queryHash: {w.rng.getrandbits(128):032x}\n")

    return [
        tag() + 'SELECT "public"."clients"."plan_id" AS "plan_id", count(*) AS "count"'
        ' FROM "public"."clients" GROUP BY "public"."clients"."plan_id"'
        ' ORDER BY "public"."clients"."plan_id" ASC',
        tag() + 'SELECT "public"."client_daily_search_counts"."client_id" AS "client_id",'
        ' sum("public"."client_daily_search_counts"."searches") AS "sum"'
        ' FROM "public"."client_daily_search_counts"'
        f" WHERE \"public\".\"client_daily_search_counts\".\"day\" >= date '{since}'"
        ' GROUP BY "public"."client_daily_search_counts"."client_id" ORDER BY "sum" DESC',
        tag() + 'SELECT "public"."accounts"."status" AS "status", count(*) AS "count",'
        ' sum("public"."accounts"."balance") AS "sum" FROM "public"."accounts"'
        ' GROUP BY "public"."accounts"."status" ORDER BY "public"."accounts"."status" ASC',
        tag() + "SELECT CAST(date_trunc('day', \"public\".\"search_events\".\"created_at\")"
        ' AS date) AS "created_at", count(*) AS "count" FROM "public"."search_events"'
        f" WHERE \"public\".\"search_events\".\"created_at\" >= timestamp with time zone"
        f" '{(when - timedelta(days=7)).isoformat()} 00:00:00.000Z' GROUP BY 1 ORDER BY 1 ASC",
        tag() + 'SELECT "public"."invoices"."month" AS "month", sum("public"."invoices"."amount")'
        ' AS "sum" FROM "public"."invoices" GROUP BY "public"."invoices"."month"'
        ' ORDER BY "public"."invoices"."month" ASC',
        tag() + 'SELECT "public"."clients"."country" AS "country", count(*) AS "count"'
        ' FROM "public"."clients" GROUP BY "public"."clients"."country" ORDER BY 2 DESC',
    ]


def bi_pool(w: World) -> Actor:
    """Metabase's pooled connection: dashboard refreshes every few hours for the whole run."""
    conn = w.sim.connect(BI_ADDRESS, "bi", w.pw("bi"), "Metabase v0.47.2",
                         "heavy:bi_refresh", literal=True)
    try:
        day = 0
        while day < w.days:
            hours = [6, 9, 12, 15, 18] if not w.weekend(day) else [8, 16]
            for hour in hours:
                at = w.at(day, hour + w.rng.uniform(0, 0.1))
                yield max(0.0, at - w.sim.clock.now())
                for sql in bi_queries(w, w.date_of(day)):
                    w.sim.query(conn, sql)
                    yield w.rng.uniform(0.2, 3)
            day += 1
    finally:
        conn.close()


# --- analysts and support -----------------------------------------------------------------------


class StaffSession:
    """One analyst's or support agent's session through their usual client."""

    def __init__(self, w: World, who: str, address: str, tag: str = "",
                 client: str | None = None) -> None:
        self.w = w
        self.client = client or STAFF_CLIENT[who]
        self.psql: Psql | None = None
        self.conn: psycopg.Connection[Any] | None = None
        if self.client == "psql":
            self.psql = w.sim.psql(address, who, w.pw(who), tag)
        else:
            self.conn = w.sim.connect(address, who, w.pw(who), self.client, tag, literal=True)
            if self.client == DBEAVER:
                for sql in DBEAVER_PREAMBLE:
                    w.sim.query(self.conn, sql)

    def run(self, sql: str) -> None:
        if self.psql is not None:
            # a backslash command (\copy) takes the rest of its line: no semicolon
            self.psql.run(sql if sql.startswith("\\") else sql.rstrip(";") + ";")
        elif self.conn is not None:
            if sql.lstrip().upper().startswith("COPY"):
                self.w.sim.copy_out(self.conn, sql)
            else:
                self.w.sim.query(self.conn, sql)

    def close(self) -> None:
        if self.psql is not None:
            self.psql.close()
        if self.conn is not None:
            self.conn.close()


def analyst_query(w: World, today: date) -> str:
    r = w.rng.random()
    month = date(today.year, today.month, 1) - timedelta(days=1)
    month = date(month.year, month.month, 1)
    if r < 0.15:
        return "SELECT plan_id, count(*) FROM clients GROUP BY plan_id ORDER BY plan_id"
    if r < 0.30:
        status = w.rng.choice(["active", "closed", "suspended"])
        return f"SELECT count(*) FROM accounts WHERE status = '{status}'"
    if r < 0.45:
        return (f"SELECT * FROM invoices WHERE month = DATE '{month.isoformat()}'"
                f" ORDER BY amount DESC LIMIT {w.rng.choice((50, 100, 500))}")
    if r < 0.60:
        country = w.rng.choice(["US", "DE", "FR", "GB", "NL", "SE", "JP", "BR"])
        return ("SELECT c.id, c.name, sum(i.amount) AS revenue FROM clients c"
                " JOIN invoices i ON i.client_id = c.id"
                f" WHERE c.country = '{country}' AND i.month >= DATE '{month.isoformat()}'"
                " GROUP BY c.id, c.name ORDER BY revenue DESC LIMIT 20")
    if r < 0.70:
        low = w.rng.randint(9000, 9700)
        return (f"SELECT id, client_id, balance FROM accounts WHERE balance > {low}"
                " ORDER BY balance DESC")
    if r < 0.80:
        hours, limit = w.rng.randint(1, 6), w.rng.choice((1000, 2000, 5000))
        return (f"SELECT * FROM search_events WHERE created_at > now() - interval"
                f" '{hours} hours' ORDER BY created_at DESC LIMIT {limit}")
    if r < 0.90:
        return ("SELECT day, sum(searches) FROM client_daily_search_counts"
                f" WHERE day >= DATE '{(today - timedelta(days=14)).isoformat()}'"
                " GROUP BY day ORDER BY day")
    return f"SELECT * FROM clients WHERE id = {w.client()}"


def analyst_session(w: World, who: str, day: int) -> Actor:
    s = StaffSession(w, who, ANALYST_ADDRESSES[who])
    try:
        for _ in range(w.rng.randint(3, 12)):
            yield w.rng.uniform(20, 300)
            s.run(analyst_query(w, w.date_of(day)))
    finally:
        s.close()


def support_session(w: World, who: str) -> Actor:
    s = StaffSession(w, who, SUPPORT_ADDRESSES[who])
    try:
        for _ in range(w.rng.randint(1, 3)):
            c = w.client()
            lookups = [
                f"SELECT * FROM clients WHERE id = {c}",
                f"SELECT * FROM accounts WHERE client_id = {c}",
                f"SELECT id, name, email, role FROM users WHERE client_id = {c}",
                f"SELECT * FROM invoices WHERE client_id = {c} ORDER BY month DESC LIMIT 12",
            ]
            for sql in lookups[: w.rng.randint(1, 4)]:
                yield w.rng.uniform(5, 90)
                s.run(sql)
            yield w.rng.uniform(30, 240)
    finally:
        s.close()


def schedule_staff(w: World) -> None:
    for day in range(w.days):
        if w.weekend(day):
            continue
        for who in ANALYST_ADDRESSES:
            for _ in range(w.rng.randint(1, 3)):
                at = w.at(day, w.rng.uniform(9, 17.5))
                w.sim.spawn(at, analyst_session(w.fork(), who, day))
        for who in SUPPORT_ADDRESSES:
            for _ in range(w.rng.randint(2, 6)):
                w.sim.spawn(w.at(day, w.rng.uniform(8, 18)), support_session(w.fork(), who))


# --- backup, billing, dba -----------------------------------------------------------------------


def backup(w: World) -> Actor:
    w.sim.pg_dump(BACKUP_ADDRESS, "backup", w.pw("backup"), "heavy:nightly_backup")
    yield 0.0


def billing_nightly(w: World, day: int) -> Actor:
    conn = w.sim.connect(BILLING_ADDRESS, "billing", w.pw("billing"), "billing",
                         "heavy:billing_run", literal=False)
    today = w.date_of(day)
    try:
        due = w.sim.fetch(conn, "SELECT id, plan_id FROM clients WHERE anniversary_day = %s",
                          (today.day,))
        yield w.rng.uniform(0.2, 1)
        for client, _plan in due[:200]:
            w.sim.query(conn, "SELECT coalesce(sum(searches), 0) FROM client_daily_search_counts"
                        " WHERE client_id = %s AND day >= %s",
                        (client, today - timedelta(days=30)))
            yield w.rng.uniform(0.02, 0.3)
        w.sim.query(conn, "INSERT INTO job_runs (job, started_at, finished_at, status)"
                    " VALUES ('billing_cycle', now(), now(), %s)", (f"ok:{len(due)}",))
    finally:
        conn.close()


def billing_monthly(w: World, day: int) -> Actor:
    """The invoice run of the 1st: clients, accounts and usage in full, invoices written."""
    conn = w.sim.connect(BILLING_ADDRESS, "billing", w.pw("billing"), "billing",
                         "heavy:billing_run", literal=False)
    today = w.date_of(day)
    prev = today - timedelta(days=1)
    month = date(prev.year, prev.month, 1)
    try:
        w.sim.query(conn, "SELECT id, name, email, plan_id, country FROM clients")
        yield w.rng.uniform(1, 5)
        w.sim.query(conn, "SELECT client_id, count(*), sum(balance) FROM accounts"
                    " GROUP BY client_id")
        yield w.rng.uniform(1, 5)
        w.sim.query(conn, "SELECT client_id, sum(searches) FROM client_daily_search_counts"
                    " WHERE day >= %s AND day < %s GROUP BY client_id", (month, today))
        yield w.rng.uniform(2, 10)
        w.sim.query(conn, "INSERT INTO invoices (client_id, month, amount)"
                    " SELECT c.id, %s, p.monthly_fee + coalesce(u.s, 0) * 0.01"
                    " FROM clients c JOIN plans p ON p.id = c.plan_id LEFT JOIN"
                    " (SELECT client_id, sum(searches) AS s FROM client_daily_search_counts"
                    " WHERE day >= %s AND day < %s GROUP BY client_id) u ON u.client_id = c.id",
                    (month, month, today))
    finally:
        conn.close()


def dba_session(w: World, kind: int) -> Actor:
    p = w.sim.psql(DBA_ADDRESS, "dba", w.pw("dba"), "heavy:dba_changes")
    try:
        statements = [
            ["CREATE INDEX IF NOT EXISTS accounts_status_idx ON accounts (status);",
             "ANALYZE accounts;"],
            ["ALTER TABLE job_runs ADD COLUMN IF NOT EXISTS host text;",
             "CREATE INDEX IF NOT EXISTS job_runs_job_idx ON job_runs (job, started_at);",
             "ANALYZE job_runs;"],
            ["ANALYZE search_events;", "ANALYZE client_daily_search_counts;"],
        ][kind % 3]
        for sql in statements:
            yield w.rng.uniform(10, 120)
            p.run(sql)
    finally:
        p.close()


def schedule_ops(w: World) -> None:
    for day in range(w.days):
        w.sim.spawn(w.at(day, 2.5 + w.rng.uniform(-0.1, 0.1)), backup(w))
        w.sim.spawn(w.at(day, 3 + w.rng.uniform(0, 0.2)), billing_nightly(w.fork(), day))
        if w.date_of(day).day == 1:
            w.sim.spawn(w.at(day, 4 + w.rng.uniform(0, 0.3)), billing_monthly(w.fork(), day))
    w.dba_change_days = dba_days(w)
    for kind, day in enumerate(w.dba_change_days, start=w.dba_change_days[0]):
        # consecutive kinds: the two days make different changes
        w.sim.spawn(w.at(day, w.rng.uniform(10, 16)), dba_session(w.fork(), kind))


def dba_days(w: World) -> list[int]:
    """The days of the DBA's changes: one training day and one attack day, each a weekday when
    its part of the run has one, so the changes are in the training data and in the attack
    days alike."""
    attack_first = w.days - w.attack_days
    out = []
    for part in (range(attack_first), range(attack_first, w.days)):
        weekdays = [d for d in part if not w.weekend(d)]
        out.append(w.rng.choice(weekdays or list(part)))
    return out


def schedule_benign(w: World) -> None:
    schedule_app(w)
    schedule_deploys(w)
    schedule_worker(w)
    w.sim.spawn(w.start + 60, bi_pool(w.fork()))
    schedule_staff(w)
    schedule_ops(w)

"""The simulated SaaS database: schema, data (generate_series, seeded) and login roles."""

# ruff: noqa: S608 - the SQL is built from the lab's own integers, never from input

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, timedelta

#: Login roles of the lab and what each may do (the role's password is ``<name>-pw-<seed>``).
ROLE_GRANTS: dict[str, str] = {
    "app_api": "GRANT SELECT, INSERT, UPDATE ON ALL TABLES IN SCHEMA public TO app_api",
    "worker": "GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO worker",
    "bi": "GRANT SELECT ON ALL TABLES IN SCHEMA public TO bi",
    **{f"analyst_{i}": f"GRANT pg_read_all_data TO analyst_{i}" for i in range(1, 7)},
    **{f"support_{i}": f"GRANT SELECT ON ALL TABLES IN SCHEMA public TO support_{i}"
       for i in range(1, 9)},
    "backup": "GRANT pg_read_all_data TO backup",
    "billing": "GRANT SELECT, INSERT, UPDATE ON ALL TABLES IN SCHEMA public TO billing",
    "dba": "ALTER ROLE dba SUPERUSER",
}

DATABASE = "saas"


@dataclass(frozen=True)
class Sizes:
    """Row counts of the simulated tables at a ``scale``."""

    clients: int
    accounts_per_client: int
    users_per_client: int
    search_days: int = 60
    search_events_per_client: int = 40
    invoice_months: int = 12

    @classmethod
    def at(cls, scale: float, *, jitter: float = 1.0) -> Sizes:
        return cls(
            clients=max(60, round(2000 * scale * jitter)),
            accounts_per_client=20,
            users_per_client=10,
        )

    @property
    def accounts(self) -> int:
        return self.clients * self.accounts_per_client

    @property
    def users(self) -> int:
        return self.clients * self.users_per_client


def password(role: str, seed: int) -> str:
    return f"{role}-pw-{seed}"


def schema_sql(sizes: Sizes, start: date, seed: int) -> list[str]:
    """The statements that create and fill the database (run as the superuser in it)."""
    n = sizes.clients
    first_day = start - timedelta(days=sizes.search_days)
    first_month = date(start.year, start.month, 1)
    months = [first_month]
    for _ in range(sizes.invoice_months - 1):
        prev = months[-1] - timedelta(days=1)
        months.append(date(prev.year, prev.month, 1))
    oldest = months[-1]
    return [
        f"SELECT setseed({(seed % 1000) / 1000.0})",
        "CREATE TABLE plans (id int PRIMARY KEY, name text NOT NULL, monthly_fee numeric NOT NULL)",
        "INSERT INTO plans VALUES (1, 'free', 0), (2, 'starter', 49), (3, 'team', 199),"
        " (4, 'business', 799), (5, 'enterprise', 2999)",
        "CREATE TABLE feature_flags (id int PRIMARY KEY, name text UNIQUE NOT NULL,"
        " enabled boolean NOT NULL)",
        "INSERT INTO feature_flags SELECT g, 'flag_' || g, g % 3 <> 0"
        " FROM generate_series(1, 30) g",
        "CREATE TABLE clients (id int PRIMARY KEY, name text NOT NULL, email text NOT NULL,"
        " country text NOT NULL, plan_id int NOT NULL REFERENCES plans(id),"
        " anniversary_day int NOT NULL, created_at timestamptz NOT NULL)",
        f"INSERT INTO clients SELECT g, 'Client ' || g || ' ' || md5(g::text || '{seed}'),"
        " 'billing@client' || g || '.example.com',"
        " (ARRAY['US','DE','FR','GB','NL','SE','JP','BR'])[1 + floor(random() * 8)::int],"
        " 1 + floor(random() * 5)::int, 1 + floor(random() * 28)::int,"
        f" TIMESTAMPTZ '{oldest.isoformat()} 00:00Z' - (random() * 900) * interval '1 day'"
        f" FROM generate_series(1, {n}) g",
        "CREATE TABLE accounts (id int PRIMARY KEY, client_id int NOT NULL REFERENCES clients(id),"
        " name text NOT NULL, email text NOT NULL, balance numeric(12,2) NOT NULL,"
        " status text NOT NULL, updated_at timestamptz NOT NULL)",
        f"INSERT INTO accounts SELECT g, 1 + (g - 1) % {n}, 'Account ' || g,"
        " 'person' || g || '@mail.example.org', round((random() * 10000)::numeric, 2),"
        " (ARRAY['active','active','active','suspended','closed'])[1 + floor(random() * 5)::int],"
        f" TIMESTAMPTZ '{first_day.isoformat()} 00:00Z' + random() * interval '60 days'"
        f" FROM generate_series(1, {sizes.accounts}) g",
        "CREATE INDEX accounts_client_idx ON accounts (client_id)",
        "CREATE TABLE users (id int PRIMARY KEY, client_id int NOT NULL REFERENCES clients(id),"
        " name text NOT NULL, email text NOT NULL, role text NOT NULL, last_login timestamptz)",
        f"INSERT INTO users SELECT g, 1 + (g - 1) % {n}, 'User ' || md5(g::text),"
        " 'member' || g || '@team.example.net',"
        " (ARRAY['owner','admin','member','member','viewer'])[1 + floor(random() * 5)::int],"
        f" TIMESTAMPTZ '{first_day.isoformat()} 00:00Z' + random() * interval '60 days'"
        f" FROM generate_series(1, {sizes.users}) g",
        "CREATE INDEX users_client_name_idx ON users (client_id, name)",
        "CREATE TABLE api_keys (id int PRIMARY KEY, client_id int NOT NULL REFERENCES clients(id),"
        " key_hash text UNIQUE NOT NULL, scopes text NOT NULL, created_at timestamptz NOT NULL)",
        f"INSERT INTO api_keys SELECT g, 1 + (g - 1) % {n}, md5('key' || g || '{seed}'),"
        " 'read,write', now() - random() * interval '400 days'"
        f" FROM generate_series(1, {2 * n}) g",
        "CREATE TABLE client_daily_search_counts (client_id int NOT NULL REFERENCES clients(id),"
        " day date NOT NULL, searches int NOT NULL, PRIMARY KEY (client_id, day))",
        "INSERT INTO client_daily_search_counts SELECT c, d::date, floor(random() * 400)::int"
        f" FROM generate_series(1, {n}) c, generate_series(DATE '{first_day.isoformat()}',"
        f" DATE '{(start - timedelta(days=1)).isoformat()}', interval '1 day') d",
        "CREATE TABLE search_events (id bigserial PRIMARY KEY, client_id int NOT NULL,"
        " query_hash text NOT NULL, created_at timestamptz NOT NULL)",
        "INSERT INTO search_events (client_id, query_hash, created_at)"
        f" SELECT 1 + floor(random() * {n})::int, md5(g::text),"
        f" TIMESTAMPTZ '{(start - timedelta(days=7)).isoformat()} 00:00Z'"
        " + random() * interval '7 days'"
        f" FROM generate_series(1, {n * sizes.search_events_per_client}) g",
        "CREATE INDEX search_events_created_idx ON search_events (created_at)",
        "CREATE TABLE invoices (id serial PRIMARY KEY, client_id int NOT NULL REFERENCES"
        " clients(id), month date NOT NULL, amount numeric(12,2) NOT NULL)",
        "INSERT INTO invoices (client_id, month, amount) SELECT c, m::date,"
        " round((random() * 3000)::numeric, 2)"
        f" FROM generate_series(1, {n}) c, generate_series(DATE '{oldest.isoformat()}',"
        f" DATE '{months[1].isoformat()}', interval '1 month') m",
        "CREATE INDEX invoices_client_month_idx ON invoices (client_id, month)",
        "CREATE TABLE job_runs (id serial PRIMARY KEY, job text NOT NULL,"
        " started_at timestamptz NOT NULL, finished_at timestamptz, status text NOT NULL)",
        "ANALYZE",
    ]


def roles_sql(seed: int) -> list[str]:
    """CREATE ROLE and the grants of every lab role (run after :func:`schema_sql`)."""
    out = [f"CREATE ROLE {r} LOGIN PASSWORD '{password(r, seed)}'" for r in ROLE_GRANTS]
    out += list(ROLE_GRANTS.values())
    out += ["GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO app_api, worker, billing"]
    return out

"""The simulated company: its clients, tables, principals and the rhythm of its week.

A :class:`World` is built once per sample from the seed and holds everything that does not
change while the days are simulated: who the clients are, how many accounts each one has, how
the tables grow day by day, and which addresses and tools each principal habitually uses.
All times are integer microseconds since the Unix epoch (UTC).
"""

from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Final

import numpy as np
import numpy.typing as npt

SOURCE_FORMAT: Final = "canonical"
DB_SYSTEM: Final = "postgresql"
DB_INSTANCE: Final = "prod-main"
DB_NAME: Final = "saas"
DEFAULT_START: Final = date(2026, 1, 26)

US_PER_S: Final = 1_000_000
US_PER_HOUR: Final = 3600 * US_PER_S
US_PER_DAY: Final = 24 * US_PER_HOUR

#: Client count at the default scale (40,000 events a day); the world grows with the traffic.
DEFAULT_CLIENTS: Final = 2000
DEFAULT_EVENTS_PER_DAY: Final = 40_000
MIN_CLIENTS: Final = 600
MAX_CLIENTS: Final = 8000
#: New search_events rows a weekday per requested event: about what the logged web-app
#: inserts amount to, so the table grows as the log says it does.
SEARCHES_PER_EVENT: Final = 0.2

CLIENTS: Final = "public.clients"
ACCOUNTS: Final = "public.accounts"
SEARCH_EVENTS: Final = "public.search_events"
DAILY_COUNTS: Final = "public.client_daily_search_counts"
INVOICES: Final = "public.invoices"
API_KEYS: Final = "public.api_keys"
FEATURE_FLAGS: Final = "public.feature_flags"
COUNTRIES: Final = "public.countries"
SCHEMA_MIGRATIONS: Final = "public.schema_migrations"
APP_SETTINGS: Final = "public.app_settings"

#: Column lists as ``SELECT *`` and ``COPY`` see them.
TABLE_COLUMNS: Final[dict[str, tuple[str, ...]]] = {
    ACCOUNTS: (
        "id",
        "client_id",
        "email",
        "name",
        "role",
        "status",
        "password_hash",
        "failed_logins",
        "created_at",
        "last_login_at",
    ),
    API_KEYS: ("id", "client_id", "key_hash", "scopes", "created_at", "revoked_at"),
    APP_SETTINGS: ("key", "value", "updated_at"),
    DAILY_COUNTS: ("client_id", "day", "searches"),
    CLIENTS: ("id", "name", "domain", "plan", "billing_email", "country_code", "created_at"),
    COUNTRIES: ("code", "name"),
    FEATURE_FLAGS: ("name", "enabled", "rollout_percent", "updated_at"),
    INVOICES: ("id", "client_id", "period", "amount_cents", "currency", "status", "created_at"),
    SCHEMA_MIGRATIONS: ("version", "applied_at"),
    SEARCH_EVENTS: ("id", "client_id", "account_id", "query", "created_at"),
}
#: Average bytes of one full row on the wire (text protocol).
ROW_WIDTH: Final[dict[str, int]] = {
    ACCOUNTS: 230,
    API_KEYS: 130,
    APP_SETTINGS: 60,
    DAILY_COUNTS: 26,
    CLIENTS: 160,
    COUNTRIES: 22,
    FEATURE_FLAGS: 52,
    INVOICES: 72,
    SCHEMA_MIGRATIONS: 32,
    SEARCH_EVENTS: 92,
}
#: Tables in the order pg_dump copies them.
DUMP_ORDER: Final = tuple(sorted(TABLE_COLUMNS))

PLANS: Final = ("free", "starter", "business", "enterprise")
ANALYST_APPS: Final = ("DBeaver 23.3.0", "DataGrip 2023.3", "psql")
FIRST_NAMES: Final = (
    "anna",
    "ben",
    "carla",
    "david",
    "elena",
    "farid",
    "grace",
    "hugo",
    "ines",
    "jonas",
    "kira",
    "liam",
    "maya",
    "noah",
    "olga",
    "pablo",
    "quinn",
    "rosa",
    "sami",
    "tara",
    "umar",
    "vera",
    "wei",
    "xenia",
    "yusuf",
    "zoe",
    "amir",
    "bianca",
    "chen",
    "dora",
    "emil",
    "freya",
    "gus",
    "hana",
    "ivan",
    "julia",
    "kofi",
    "lena",
    "marco",
    "nadia",
)
LAST_NAMES: Final = (
    "smith",
    "garcia",
    "muller",
    "rossi",
    "kowalski",
    "nielsen",
    "dubois",
    "tanaka",
    "silva",
    "novak",
    "jensen",
    "okafor",
    "larsen",
    "moreau",
    "fischer",
    "kim",
    "patel",
    "berg",
    "costa",
    "weber",
    "ivanova",
    "lind",
    "meyer",
    "haddad",
    "olsen",
    "santos",
    "varga",
    "wagner",
    "yilmaz",
    "zhang",
)
_ADJECTIVES: Final = (
    "bright",
    "northern",
    "blue",
    "swift",
    "silver",
    "quiet",
    "bold",
    "clear",
    "green",
    "prime",
    "urban",
    "coastal",
    "golden",
    "rapid",
    "solid",
    "open",
    "true",
    "vivid",
    "alpine",
    "amber",
)
_NOUNS: Final = (
    "harbor",
    "labs",
    "works",
    "analytics",
    "logistics",
    "media",
    "health",
    "foods",
    "energy",
    "systems",
    "retail",
    "studio",
    "finance",
    "travel",
    "robotics",
    "learning",
    "design",
    "legal",
    "cloud",
    "farms",
)
_SUFFIXES: Final = ("Ltd", "Inc", "GmbH", "AB", "BV", "SAS", "Oy", "AS", "LLC", "SRL")


def stream_seed(seed: int, *keys: object) -> int:
    """A 64-bit seed for one independent random stream, derived from the sample seed and keys.

    Every actor and day draws from its own stream, so changing one habit does not reshuffle
    the rest of the sample.
    """
    digest = hashlib.sha256(repr((seed, *keys)).encode()).digest()
    return int.from_bytes(digest[:8], "big")


def py_rng(seed: int, *keys: object) -> random.Random:
    """A scalar random stream (fast per draw) for ``(seed, *keys)``."""
    return random.Random(stream_seed(seed, *keys))


def np_rng(seed: int, *keys: object) -> np.random.Generator:
    """A vector random stream for ``(seed, *keys)``."""
    return np.random.default_rng(stream_seed(seed, *keys))


@dataclass(frozen=True, slots=True)
class Principal:
    """A database role and the addresses and client application it habitually uses."""

    name: str
    role: str
    addresses: tuple[str, ...]
    client_app: str


@dataclass(frozen=True)
class World:
    """Everything fixed for one sample. Clients are ordered by sign-up, so the clients that
    exist on day ``d`` are the first ``active[d]``; ``sizes[d]`` are the tables' row counts
    at the start of day ``d``."""

    seed: int
    start: date
    days: int
    events_per_day: int
    client_ids: tuple[str, ...]
    client_names: tuple[str, ...]
    client_domains: tuple[str, ...]
    client_plans: tuple[str, ...]
    accounts: np.ndarray
    account_base: np.ndarray
    active: tuple[int, ...]
    sizes: tuple[dict[str, int], ...]
    search_growth: tuple[int, ...]
    daily_counts_inserted: tuple[int, ...]
    app: Principal
    batch: Principal
    bi: Principal
    backup: Principal
    dba: Principal
    analysts: tuple[Principal, ...]
    support: tuple[Principal, ...]

    @property
    def start_us(self) -> int:
        """The first microsecond of the sample."""
        return epoch_us(self.start)

    @property
    def end_us(self) -> int:
        """The first microsecond after the sample."""
        return self.start_us + self.days * US_PER_DAY

    def day_start_us(self, day: int) -> int:
        """Midnight UTC at the start of simulated day ``day`` (0-based)."""
        return self.start_us + day * US_PER_DAY

    def date_of(self, day: int) -> date:
        """The calendar date of simulated day ``day`` (may lie outside the sample)."""
        return self.start + timedelta(days=day)

    def is_weekend(self, day: int) -> bool:
        """Saturday or Sunday."""
        return self.date_of(day).weekday() >= 5

    def size(self, table: str, day: int) -> int:
        """Rows in ``table`` at the start of day ``day``."""
        return self.sizes[day][table]

    def principals(self) -> tuple[Principal, ...]:
        """Every benign principal."""
        return (self.app, self.batch, self.bi, self.backup, self.dba, *self.analysts, *self.support)

    def account_id(self, client: int, rng: random.Random) -> int:
        """A random account id belonging to ``client``."""
        return int(self.account_base[client]) + rng.randrange(int(self.accounts[client]))

    def email(self, client: int, account_id: int) -> str:
        """The (stable) e-mail address of an account."""
        first = FIRST_NAMES[(account_id * 7919) % len(FIRST_NAMES)]
        last = LAST_NAMES[(account_id * 104_729) % len(LAST_NAMES)]
        return f"{first}.{last}{account_id % 97}@{self.client_domains[client]}"

    def key_hash(self, client: int, key: int) -> str:
        """The SHA-256 hex digest stored for API key number ``key`` of ``client``."""
        return hashlib.sha256(f"{self.seed}:{self.client_ids[client]}:{key}".encode()).hexdigest()


def epoch_us(day: date) -> int:
    """Microseconds since the epoch at midnight UTC of ``day``."""
    return int(datetime(day.year, day.month, day.day, tzinfo=UTC).timestamp()) * US_PER_S


def client_count(events_per_day: int) -> int:
    """Clients at the start of a sample: ~2,000 at the default scale, proportional to traffic
    and clamped so every attack scenario stays possible and finishes in a working day."""
    scaled = round(DEFAULT_CLIENTS * events_per_day / DEFAULT_EVENTS_PER_DAY)
    return min(MAX_CLIENTS, max(MIN_CLIENTS, scaled))


def _client_names(rng: random.Random, n: int) -> tuple[list[str], list[str]]:
    names: list[str] = []
    domains: list[str] = []
    seen: dict[str, int] = {}
    for _ in range(n):
        adj, noun = rng.choice(_ADJECTIVES), rng.choice(_NOUNS)
        slug = f"{adj}-{noun}"
        seen[slug] = seen.get(slug, 0) + 1
        if seen[slug] > 1:
            slug = f"{slug}-{seen[slug]}"
        names.append(f"{adj.title()} {noun.title()} {rng.choice(_SUFFIXES)}")
        domains.append(f"{slug}.example")
    return names, domains


def _plan_for(accounts: int, rng: random.Random) -> str:
    if rng.random() < 0.1:
        return rng.choice(PLANS)
    if accounts > 200:
        return "enterprise"
    if accounts > 40:
        return "business"
    return "starter" if accounts > 8 else "free"


def _new_clients_per_day(rng: random.Random, start: date, days: int, scale: float) -> list[int]:
    """How many clients sign up on each day (weekdays busier)."""
    counts = []
    for day in range(days):
        weekend = (start + timedelta(days=day)).weekday() >= 5
        mean = (0.4 if weekend else 1.6) * scale
        counts.append(_poisson(rng, mean))
    return counts


def _poisson(rng: random.Random, mean: float) -> int:
    """A Poisson draw by inversion (small means only)."""
    limit, k, p = math.exp(-mean), 0, rng.random()
    while p > limit:
        k += 1
        p *= rng.random()
    return k


def _principals(rng: random.Random) -> tuple[tuple[Principal, ...], tuple[Principal, ...]]:
    """Analysts (1-2 fixed addresses, one fixed tool) and support agents (one address each)."""
    hosts = rng.sample(range(21, 250), 10)
    apps = list(ANALYST_APPS) + [rng.choice(ANALYST_APPS) for _ in range(2)]
    rng.shuffle(apps)
    analysts = []
    for i in range(5):
        addresses = [f"10.0.20.{hosts[2 * i]}"]
        if rng.random() < 0.5:
            addresses.append(f"10.0.20.{hosts[2 * i + 1]}")
        analysts.append(Principal(f"analyst_{i + 1}", "analyst", tuple(addresses), apps[i]))
    support_hosts = rng.sample(range(21, 250), 8)
    support = tuple(
        Principal(f"support_{i + 1}", "support", (f"10.0.30.{host}",), "support-console")
        for i, host in enumerate(support_hosts)
    )
    return tuple(analysts), support


def build_world(*, seed: int, start: date, days: int, events_per_day: int) -> World:
    """Build the company for one sample; deterministic in its arguments."""
    rng = py_rng(seed, "world")
    nrng = np_rng(seed, "world")
    n0 = client_count(events_per_day)
    scale = n0 / DEFAULT_CLIENTS
    new_per_day = _new_clients_per_day(rng, start, days, scale)
    total = n0 + sum(new_per_day)

    old = np.maximum(1, np.round(nrng.lognormal(2.44, 1.25, n0))).astype(np.int64)
    new = np.maximum(1, np.round(nrng.lognormal(1.3, 0.9, total - n0))).astype(np.int64)
    accounts = np.concatenate([old, new])
    account_base = np.concatenate([[1001], 1001 + np.cumsum(accounts)[:-1]]).astype(np.int64)
    active = tuple(n0 + sum(new_per_day[:d]) for d in range(days + 1))

    names, domains = _client_names(rng, total)
    plans = tuple(_plan_for(int(a), rng) for a in accounts)
    search_growth = tuple(
        round(
            SEARCHES_PER_EVENT
            * events_per_day
            * rng.uniform(0.9, 1.1)
            * (0.45 if (start + timedelta(days=d)).weekday() >= 5 else 1.0)
        )
        for d in range(days)
    )
    inserted = tuple(round(active[d] * rng.uniform(0.9, 0.96)) for d in range(days))
    sizes = _table_sizes(start, days, n0, active, accounts, search_growth, inserted)
    # The staff directory (who works from which address with which tool) is the company's, not
    # the sample's: every seed simulates other days of the same people.
    analysts, support = _principals(py_rng(0, "staff"))
    return World(
        seed=seed,
        start=start,
        days=days,
        events_per_day=events_per_day,
        client_ids=tuple(f"c{i + 1:05d}" for i in range(total)),
        client_names=tuple(names),
        client_domains=tuple(domains),
        client_plans=plans,
        accounts=accounts,
        account_base=account_base,
        active=active,
        sizes=sizes,
        search_growth=search_growth,
        daily_counts_inserted=inserted,
        app=Principal("app_api", "app", tuple(f"10.0.1.{h}" for h in range(11, 15)), "saas-web"),
        batch=Principal("batch_worker", "batch", ("10.0.2.5",), "saas-worker"),
        bi=Principal("bi_service", "bi", ("10.0.5.20",), "metabase"),
        backup=Principal("backup", "backup", ("10.0.9.5",), "pg_dump"),
        dba=Principal("dba", "dba", ("10.0.40.2",), "psql"),
        analysts=analysts,
        support=support,
    )


def _table_sizes(
    start: date,
    days: int,
    n0: int,
    active: tuple[int, ...],
    accounts: np.ndarray,
    search_growth: tuple[int, ...],
    inserted: tuple[int, ...],
) -> tuple[dict[str, int], ...]:
    """Row counts of every table at the start of each day (plus one day past the end)."""
    account_totals = np.concatenate([[0], np.cumsum(accounts)])
    searches = 2500 * n0
    daily_counts = 700 * n0
    invoices = 22 * n0
    sizes = []
    for day in range(days + 1):
        n = active[day]
        sizes.append(
            {
                CLIENTS: n,
                ACCOUNTS: int(account_totals[n]),
                SEARCH_EVENTS: searches,
                DAILY_COUNTS: daily_counts,
                INVOICES: invoices,
                API_KEYS: round(n * 1.4),
                FEATURE_FLAGS: 118,
                COUNTRIES: 249,
                SCHEMA_MIGRATIONS: 412,
                APP_SETTINGS: 37,
            }
        )
        if day < days:
            searches += search_growth[day]
            daily_counts += inserted[day]
            if (start + timedelta(days=day)).day == 1:
                invoices += n
    return tuple(sizes)


def app_intensity(hours: npt.NDArray[np.float64], *, weekend: bool) -> npt.NDArray[np.float64]:
    """Relative web-application traffic by hour of day (UTC): a European working-day peak,
    a smaller American evening peak and a quiet night. Weekends are flatter."""

    def bump(centre: float, width: float) -> npt.NDArray[np.float64]:
        distance = np.minimum(np.abs(hours - centre), 24 - np.abs(hours - centre))
        result: npt.NDArray[np.float64] = np.exp(-0.5 * (distance / width) ** 2)
        return result

    if weekend:
        return 0.2 + 0.45 * bump(14.0, 4.0) + 0.25 * bump(19.5, 3.0)
    return 0.15 + 0.7 * bump(12.5, 3.0) + 0.45 * bump(18.5, 2.5)

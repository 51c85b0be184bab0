"""Grouping anomalous events into incidents, on synthetic anomalies (no model): sprays at the
scale an attacker reaches, and incidents and alerts that do not depend on where the stream was
cut or on a trip through the store in between."""

from __future__ import annotations

import itertools
import random
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import polars as pl
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from detector.incidents import grouping
from detector.incidents.distinct import EXACT, Distinct
from detector.incidents.merge import HEAVY_ROWS, HEAVY_TENANTS, incident_id
from detector.scoring.threshold import severity as graded

START = datetime(2026, 1, 14, 10, 0, tzinfo=UTC)
BANDS = {"low": 1.0, "medium": 2.0, "high": 3.0}
SCHEMA: dict[str, Any] = {
    "event_time": pl.Datetime("us", "UTC"),
    "db_user": pl.String,
    "action": pl.String,
    "client_ip": pl.String,
    "session_id": pl.String,
    "client_app": pl.String,
    "tenant_id": pl.String,
    "tables": pl.List(pl.String),
    "row_count": pl.Int64,
    "coverage_ratio": pl.Float64,
    "anomaly_score": pl.Float64,
    "statement_text": pl.String,
}


def explain(row: Any) -> dict[str, Any]:
    return {"reason": f"{row['db_user']} scored {row['anomaly_score']:.3f}", "top_features": []}


def severity(score: float, heavy: bool) -> str:
    return graded(score, BANDS, heavy=heavy)


def frame(rows: list[dict[str, Any]]) -> pl.DataFrame:
    return pl.DataFrame([{c: r.get(c) for c in SCHEMA} for r in rows], schema=SCHEMA)


def grouped(anomalies: pl.DataFrame) -> grouping.Grouping:
    g = grouping.Grouping(explain=explain, severity=severity)
    g.add(anomalies)
    return g


def opened(g: grouping.Grouping) -> list[dict[str, Any]]:
    return [doc for kind, doc, _ in g.alerts if kind == "incident.opened"]


def near(value: int, target: int, tolerance: float = 0.05) -> bool:
    return abs(value - target) <= tolerance * target


# ------------------------------------------------------------------ sprays at scale
def test_a_name_spray_is_one_incident_per_address_counting_the_names() -> None:
    n = 100_000
    addresses = ["198.51.100.7", "198.51.100.8", "203.0.113.9"]
    spray = pl.DataFrame(
        {
            "event_time": [START + timedelta(milliseconds=5 * i) for i in range(n)],
            "db_user": [f"user{i}" for i in range(n)],
            "action": ["login_failed"] * n,
            "client_ip": [addresses[i % 3] for i in range(n)],
            "session_id": [f"s{i}" for i in range(n)],  # one connection per guess
            "anomaly_score": [3.5] * n,
        }
    )
    g = grouped(spray)
    docs = g.documents()
    assert [d["group_key"] for d in docs] == [f"address:{a}" for a in addresses]
    assert [d["events"] for d in docs] == [33_334, 33_333, 33_333]
    for k, doc in enumerate(docs):
        assert near(doc["principals_count"], doc["events"])  # every guess a new name
        assert doc["principals"] == [f"user{i}" for i in range(k, 150, 3)]  # the first 50
        assert doc["principal"] == f"user{k}" and doc["addresses"] == [addresses[k]]
        assert doc["severity"] == "high"
    assert len(opened(g)) == 3 and len(g.alerts) == 3


def test_one_principal_guessed_from_65536_addresses_is_one_incident_with_the_count() -> None:
    n = 65_536
    spray = pl.DataFrame(
        {
            "event_time": [START + timedelta(milliseconds=10 * i) for i in range(n)],
            "db_user": ["app_api"] * n,
            "action": ["login_failed"] * n,
            "client_ip": [f"10.{i >> 16}.{(i >> 8) & 255}.{i & 255}" for i in range(n)],
            "anomaly_score": [2.5] * n,
        }
    )
    g = grouped(spray)
    [doc] = g.documents()
    assert doc["group_key"] == "principal:app_api@*" and doc["events"] == n
    assert near(doc["addresses_count"], n)
    assert doc["addresses"][:2] == ["10.0.0.0", "10.0.0.1"] and len(doc["addresses"]) == 50
    assert doc["principals"] == ["app_api"] and doc["principals_count"] == 1
    assert len(g.alerts) == 1 and opened(g)[0]["id"] == doc["id"]


def test_activity_from_more_places_than_the_spray_bound_joins_one_incident() -> None:
    """One account reading from 65,536 addresses: its first SPRAY_PLACES places are incidents
    of their own (an application's servers stay apart), the rest one incident with the count."""
    n = 65_536
    reads = pl.DataFrame(
        {
            "event_time": [START + timedelta(milliseconds=10 * i) for i in range(n)],
            "db_user": ["support_3"] * n,
            "action": ["read"] * n,
            "client_ip": [f"10.{i >> 16}.{(i >> 8) & 255}.{i & 255}" for i in range(n)],
            "tenant_id": [f"t{i % 500}" for i in range(n)],
            "tables": [["public.clients"]] * n,
            "row_count": [1] * n,
            "anomaly_score": [2.5] * n,
        },
        schema_overrides={"tables": pl.List(pl.String)},
    )
    g = grouped(reads)
    docs = g.documents()
    places, (spray,) = docs[:-1], docs[-1:]
    assert len(places) == grouping.SPRAY_PLACES
    assert all(d["group_key"].startswith("principal:support_3@10.0.0.") for d in places)
    assert spray["group_key"] == "principal:support_3@*"
    assert spray["events"] == n - grouping.SPRAY_PLACES
    assert near(spray["addresses_count"], n - grouping.SPRAY_PLACES)
    assert spray["tenants_touched"] == 500  # exact below the sketch's bound
    assert len(opened(g)) == grouping.SPRAY_PLACES + 1


def test_a_guess_of_a_name_another_address_tried_alone_makes_that_incident_the_principals() -> None:
    rows = [
        {"db_user": "ann", "client_ip": "192.0.2.1"},  # brute force from one address
        {"db_user": "ann", "client_ip": "192.0.2.1"},
        {"db_user": "ann", "client_ip": "192.0.2.2"},  # and a second address: at ann
        {"db_user": "bob", "client_ip": "192.0.2.3"},  # a name spray from a third
        {"db_user": "cid", "client_ip": "192.0.2.3"},
        {"db_user": "ann", "client_ip": "192.0.2.3"},  # joins that address's spray
        {"db_user": "ann", "client_ip": "192.0.2.1"},  # the first address again: ann's
    ]
    events = frame(
        [
            {
                **r,
                "action": "login_failed",
                "anomaly_score": 2.5,
                "event_time": START + timedelta(seconds=i),
            }
            for i, r in enumerate(rows)
        ]
    )
    docs = {d["group_key"]: d for d in grouped(events).documents()}
    assert set(docs) == {"principal:ann@*", "address:192.0.2.3"}
    at_ann = docs["principal:ann@*"]
    assert at_ann["events"] == 4 and at_ann["addresses"] == ["192.0.2.1", "192.0.2.2"]
    assert at_ann["id"] == incident_id("address:192.0.2.1", START)  # the id it opened with
    assert docs["address:192.0.2.3"]["principals"] == ["bob", "cid", "ann"]


# ------------------------------------------------------------------ grading and alerts
def test_a_slow_scrape_is_graded_on_its_total_and_alerted_as_it_crosses_the_bands() -> None:
    pages = [
        {
            "db_user": "support_7",
            "client_ip": "10.0.30.138",
            "action": "read",
            "tables": ["public.clients"],
            "row_count": 200,
            "tenant_id": "t1",
            "anomaly_score": 2.5 if i < 10 else 3.5,
            "event_time": START + timedelta(seconds=30 * i),
        }
        for i in range(60)
    ]
    g = grouped(frame(pages))
    [doc] = g.documents()
    assert doc["rows_read"] == 12_000 and doc["severity"] == "critical"
    sequence = [(kind, d["severity"], d["events"], d["rows_read"]) for kind, d, _ in g.alerts]
    assert sequence == [
        ("incident.opened", "medium", 1, 200),
        ("incident.escalated", "high", 11, 2_200),  # the peak reaches the high band
        ("incident.escalated", "critical", HEAVY_ROWS // 200, HEAVY_ROWS),  # and it is heavy
    ]


# ------------------------------------------------------------------ any cut, any restart
def _stream(seed: int = 7) -> pl.DataFrame:
    """Two hours of anomalies of every shape, interleaved: a name spray, a principal guessed
    from many addresses, a principal active at many places, a scrape across many tenants,
    a brute force that pauses past the gap, and scattered one-off events."""
    rng = random.Random(seed)
    rows: list[dict[str, Any]] = []
    shapes = ["names"] * 4 + ["guess", "places", "scrape", "brute", "other"]
    for i in range(6_000):
        t = START + timedelta(seconds=1.2 * i)
        shape = rng.choice(shapes)
        if shape == "names":
            row = {
                "db_user": f"n{rng.randrange(5_000)}",
                "action": "login_failed",
                "client_ip": rng.choice(["198.51.100.1", "198.51.100.2"]),
            }
        elif shape == "guess":
            row = {
                "db_user": "app_api",
                "action": "login_failed",
                "client_ip": f"10.9.{rng.randrange(256)}.{rng.randrange(256)}",
            }
        elif shape == "places":
            row = {
                "db_user": "bi",
                "action": "read",
                "client_ip": None,
                "session_id": f"bi-{rng.randrange(2_000)}",
                "tables": ["public.events"],
                "row_count": rng.randrange(500),
            }
        elif shape == "scrape":
            row = {
                "db_user": "support_1",
                "action": "read",
                "client_ip": "10.0.30.244",
                "tenant_id": f"t{rng.randrange(3_000)}",
                "tables": ["public.invoices"],
                "row_count": rng.randrange(40),
                "coverage_ratio": rng.random() / 2,
            }
        elif shape == "brute":
            if 2_000 <= i < 4_000:  # quiet for 40 minutes: a new incident after
                continue
            row = {"db_user": "dba", "action": "login_failed", "client_ip": "192.0.2.44"}
        else:
            row = {
                "db_user": f"u{rng.randrange(30)}",
                "action": rng.choice(["read", "write"]),
                "client_ip": f"10.0.1.{rng.randrange(40)}",
                "row_count": rng.randrange(3_000),
                "statement_text": "SELECT * FROM accounts WHERE email = 'a@b.example'",
            }
        rows.append({**row, "event_time": t, "anomaly_score": round(rng.uniform(1.0, 4.0), 3)})
    return frame(rows)


STREAM = _stream()
WHOLE = grouped(STREAM)


def _joinable(stored: dict[str, dict[str, Any]], batch: pl.DataFrame) -> list[dict[str, Any]]:
    """What the store hands the live service for a batch (``Tx.active_incidents`` and
    ``Tx.incidents_of``): the newest incident of each key the batch could join, and the
    principals' recent places, sprays and lone failed logins."""
    keys = set(grouping.candidate_keys(batch))
    principals = set(batch["db_user"].to_list())
    since = (batch["event_time"][0] - timedelta(seconds=grouping.DEFAULT_GAP_S)).isoformat()
    newest: dict[str, dict[str, Any]] = {}
    for doc in stored.values():
        held = newest.get(doc["group_key"])
        if doc["group_key"] in keys and (held is None or held["last_seen"] < doc["last_seen"]):
            newest[doc["group_key"]] = doc
    picked = {d["id"]: d for d in newest.values()}
    for doc in stored.values():
        key = doc["group_key"]
        lone = key.startswith("address:") and doc["principals_count"] == 1
        if (
            doc["principal"] in principals
            and doc["last_seen"] >= since
            and (key.startswith("principal:") or lone)
        ):
            picked[doc["id"]] = doc
    return [orjson.loads(orjson.dumps(d)) for d in picked.values()]  # as JSON comes back


def _through_the_store(cuts: list[int]) -> tuple[list[dict[str, Any]], list[Any]]:
    """The stream folded batch by batch, the incidents stored between batches and the ones a
    batch can join restored for it, as the live service does."""
    stored: dict[str, dict[str, Any]] = {}
    alerts: list[Any] = []
    bounds = [0, *sorted(cuts), STREAM.height]
    for lo, hi in itertools.pairwise(bounds):
        batch = STREAM.slice(lo, hi - lo)
        g = grouping.Grouping(explain=explain, severity=severity, stored=_joinable(stored, batch))
        g.add(batch)
        created, updated = g.changed()
        for doc in (*created, *updated):
            stored[doc["id"]] = doc
        alerts += g.alerts
    docs = sorted(stored.values(), key=lambda d: (d["first_seen"], d["id"]))
    return docs, alerts


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cuts=st.lists(st.integers(1, STREAM.height - 1), max_size=30, unique=True))
@example(cuts=list(range(1, STREAM.height, 1)))  # every event a batch of its own
def test_incidents_and_alerts_do_not_depend_on_the_cuts(cuts: list[int]) -> None:
    docs, alerts = _through_the_store(cuts)
    assert docs == WHOLE.documents()
    assert alerts == WHOLE.alerts


def test_the_stream_exercises_every_shape() -> None:
    """What the cut test runs over: each shape forms the incidents it should."""
    docs = WHOLE.documents()
    keys = [d["group_key"] for d in docs]
    assert keys.count("principal:app_api@*") == 1
    assert (
        keys.count("principal:bi@*") == 1
        and sum(k.startswith("principal:bi@bi-") for k in keys) == grouping.SPRAY_PLACES
    )
    assert keys.count("address:192.0.2.44") == 2  # split by the quiet 40 minutes
    names = [d for d in docs if d["group_key"].startswith("address:198.51.100.")]
    assert len(names) == 2 and all(d["principals_count"] > EXACT for d in names)
    scrape = next(d for d in docs if d["group_key"] == "principal:support_1@10.0.30.244")
    assert scrape["tenants_touched"] > HEAVY_TENANTS and scrape["severity"] == "critical"
    assert {k for k, _, _ in WHOLE.alerts} == {"incident.opened", "incident.escalated"}
    assert all("'" not in (d["statement"] or "") for d in docs)  # literals redacted


# ------------------------------------------------------------------ distinct counts
@pytest.mark.parametrize("n", [1, EXACT, EXACT + 1, 5_000, 50_000])
def test_distinct_counts_are_exact_to_the_bound_and_close_beyond(n: int) -> None:
    values = [f"v{i}" for i in range(n)]
    whole = Distinct(values)
    pieces = Distinct()
    for lo in range(0, n, 777):  # in pieces, through JSON each time
        pieces = Distinct.restore(orjson.loads(orjson.dumps(pieces.dump())))
        for v in values[lo : lo + 777] + values[: min(lo, 10)]:  # with repeats
            pieces.add(v)
    assert pieces.count == whole.count and pieces.values == whole.values
    assert whole.count == n if n <= EXACT else near(whole.count, n)


def test_the_distinct_counts_docstring_example_runs() -> None:
    import doctest

    from detector.incidents import distinct

    assert doctest.testmod(distinct).failed == 0

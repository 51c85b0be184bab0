"""The feature engine: batch-size invariance, restart invariance, and the signals it must carry."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from detector.errors import ModelError
from detector.features.engine import MODEL_FEATURES, FeatureEngine
from detector.features.kernel import OUT_COLUMNS
from detector.features.settings import FeatureSettings
from detector.testing import make_events

T0 = datetime(2026, 1, 5, tzinfo=UTC)
STATEMENTS = [
    ("SELECT * FROM public.clients WHERE id = 'c{n}'", ["public.clients"], "read"),
    ("SELECT * FROM public.accounts ORDER BY id LIMIT 200 OFFSET {n}", ["public.accounts"], "read"),
    (
        "SELECT client_id, count(*) FROM public.accounts GROUP BY client_id",
        ["public.accounts"],
        "read",
    ),
    ("COPY public.clients TO stdout", ["public.clients"], "copy"),
    (
        "INSERT INTO public.search_events (client_id) VALUES ({n})",
        ["public.search_events"],
        "write",
    ),
    ("SELECT * FROM public.feature_flags", None, "read"),
    ("SELECT id FROM api_keys WHERE key_hash = $1 AND client_id = ${n}", ["api_keys"], "read"),
    ("not sql at all ((( {n}", None, "other"),
    (None, None, "login"),
    (None, None, "login_failed"),
]

event = st.fixed_dictionaries(
    {
        "gap": st.one_of(
            st.floats(0, 5),
            st.floats(0, 900),
            st.sampled_from([0.0, 4000.0, 90000.0, 40 * 86400.0]),
        ),
        # support_1 and support_2 share a peer group (their names differ by a number)
        "user": st.sampled_from(["app", "bi", "ann", "support_1", "support_2"]),
        "session": st.one_of(st.none(), st.integers(0, 5).map(lambda n: f"s{n}")),
        "system": st.sampled_from(["postgresql", "mariadb"]),
        "ip": st.one_of(st.none(), st.sampled_from(["10.0.0.1", "10.0.0.2", "203.0.113.9"])),
        "app": st.one_of(st.none(), st.sampled_from(["web", "psql", "dbeaver"])),
        "tenant": st.one_of(st.none(), st.integers(0, 3000).map(lambda n: f"c{n}")),
        "stmt": st.integers(0, len(STATEMENTS) - 1),
        "n": st.integers(0, 10**6),
        "rows": st.one_of(st.none(), st.integers(0, 10**7)),
    }
)


def build(specs: list[dict[str, object]]) -> pl.DataFrame:
    t = T0
    rows = []
    for s in specs:
        t += timedelta(seconds=float(s["gap"]))  # type: ignore[arg-type]
        text, objects, action = STATEMENTS[s["stmt"]]  # type: ignore[index]
        rows.append(
            {
                "event_time": t,
                "db_user": s["user"],
                "client_ip": s["ip"],
                "client_app": s["app"],
                "tenant_id": s["tenant"],
                "session_id": s["session"],
                "db_system": s["system"],
                "action": action,
                "objects": objects,
                "statement_text": text.format(n=s["n"]) if text else None,
                "rows_returned": s["rows"] if action != "write" else None,
                "rows_affected": s["rows"] if action == "write" else None,
            }
        )
    return make_events(rows)


COMPARED = list(dict.fromkeys([*OUT_COLUMNS, *MODEL_FEATURES]))


def features_in_batches(
    events: pl.DataFrame, cuts: list[int], tmp: Path | None = None
) -> pl.DataFrame:
    engine = FeatureEngine()
    frames, start = [], 0
    for k, end in enumerate([*sorted(set(cuts)), events.height]):
        if tmp is not None and k % 2 == 1:  # restart: state through disk, fresh engine
            engine.save_state(tmp)
            engine = FeatureEngine()
            engine.load_state(tmp)
        frames.append(engine.transform(events.slice(start, end - start)))
        start = end
    return pl.concat(frames).select(COMPARED)


def assert_same(a: pl.DataFrame, b: pl.DataFrame) -> None:
    assert a.shape == b.shape
    np.testing.assert_allclose(a.to_numpy(), b.to_numpy(), rtol=1e-9, atol=1e-9)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(event, min_size=1, max_size=700), st.lists(st.integers(1, 699), max_size=8))
def test_batch_size_does_not_change_features(
    specs: list[dict[str, object]], cuts: list[int]
) -> None:
    events = build(specs)
    cuts = [c for c in cuts if c < events.height]
    assert_same(features_in_batches(events, []), features_in_batches(events, cuts))


@settings(
    max_examples=15,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    st.lists(event, min_size=2, max_size=400), st.lists(st.integers(1, 399), min_size=1, max_size=4)
)
def test_restart_through_saved_state_does_not_change_features(
    tmp_path: Path, specs: list[dict[str, object]], cuts: list[int]
) -> None:
    events = build(specs)
    cuts = [c for c in cuts if c < events.height] or [1]
    assert_same(features_in_batches(events, []), features_in_batches(events, cuts, tmp_path))


def test_many_pairs_force_table_rebuilds_without_changing_results() -> None:
    specs = [
        {
            "gap": 1.0,
            "user": "app",
            "ip": f"10.0.{i % 250}.{i % 7}",
            "app": "web",
            "tenant": f"c{i}",
            "stmt": 0,
            "n": i,
            "rows": 1,
            "session": f"s{i // 3}",  # many short sessions: session entries churn too
            "system": "postgresql",
        }
        for i in range(5000)
    ]
    events = build(specs)
    assert_same(features_in_batches(events, []), features_in_batches(events, [1, 777, 2500]))


def history(days: int = 3) -> list[dict[str, object]]:
    """A support agent reading one client at a time, business hours, from one address."""
    rows: list[dict[str, object]] = []
    for d in range(days):
        for k in range(40):
            rows.append(
                {
                    "event_time": T0 + timedelta(days=d, hours=9, minutes=10 * k),
                    "db_user": "support_1",
                    "client_ip": "10.0.30.1",
                    "client_app": "console",
                    "tenant_id": f"c{k}",
                    "objects": ["public.accounts"],
                    "rows_returned": 25,
                    "statement_text": f"SELECT * FROM public.accounts WHERE client_id = 'c{k}'",
                }
            )
    return rows


def run(rows: list[dict[str, object]]) -> pl.DataFrame:
    return FeatureEngine().transform(make_events(rows))


def test_habitual_work_has_no_excess_and_a_dump_from_a_new_address_has() -> None:
    base = history(6)
    dump = {
        "event_time": T0 + timedelta(days=3, hours=10),
        "db_user": "support_1",
        "client_ip": "203.0.113.9",
        "client_app": "dbeaver",
        "objects": ["public.accounts"],
        "rows_returned": 50_000,
        "statement_text": "SELECT * FROM public.accounts",
    }
    usual = {**base[-1], "event_time": T0 + timedelta(days=3, hours=10)}
    f_dump = run([*base, dump]).row(-1, named=True)
    f_usual = run([*base, usual]).row(-1, named=True)
    for name in ("rows_excess", "sensitive_rows_1h_excess"):  # volumes: far past the high
        assert f_dump[name] > 0.9, name
        assert f_usual[name] == 0.0, name
    # habits never done before are fully surprising (the principal's first day, when
    # everything is new, does not count as a habit of novelty)
    for name in ("new_address_excess", "new_client_app_excess", "bulk_sensitive_read_excess"):
        assert f_dump[name] == 1.0, name
        assert f_usual[name] == 0.0, name
    assert f_dump["new_shape_excess"] == 1.0
    assert f_dump["new_shape_sensitive_excess"] == 1.0
    assert f_usual["new_shape_excess"] == 0.0
    assert f_dump["rows_typical"] == pytest.approx(np.log1p(25))


def test_off_hours_and_cross_tenant_fanout() -> None:
    base = history()
    night = {**base[0], "event_time": T0 + timedelta(days=3, hours=2)}
    assert run([*base, night])["off_hours"][-1] > 0.8  # 120 hours known: 0.83 at most
    assert (
        run([*base, {**base[0], "event_time": T0 + timedelta(days=3, hours=10)}])["off_hours"][-1]
        < 0.1
    )
    fan = [
        {
            **base[0],
            "tenant_id": f"c{1000 + i}",
            "event_time": T0 + timedelta(days=3, hours=10, seconds=3 * i),
        }
        for i in range(300)
    ]
    feats = run([*base, *fan])
    assert feats["tenants_10m_excess"][-1] > 3.0  # ~e^3 more tenants than usual in 10 minutes


def test_failed_logins_are_counted_per_address_across_principals() -> None:
    spray = [
        {
            "db_user": f"user_{i}",
            "client_ip": "192.0.2.7",
            "action": "login_failed",
            "command": None,
        }
        for i in range(50)
    ]
    feats = run(
        [
            *spray,
            {"db_user": "user_1", "client_ip": "192.0.2.7", "action": "login", "command": None},
        ]
    )
    assert np.expm1(feats["failed_logins_address_1h"][-1]) == pytest.approx(50, rel=0.01)
    assert np.expm1(feats["failed_logins_principal_1h"][-1]) == pytest.approx(1, rel=0.03)


def test_table_coverage_grows_with_pagination() -> None:
    pages = [
        {
            "event_time": T0 + timedelta(seconds=30 * k),
            "db_user": "support_2",
            "objects": ["public.accounts"],
            "rows_returned": 200,
            "statement_text": f"SELECT * FROM public.accounts ORDER BY id LIMIT 200 OFFSET {200 * k}",
        }
        for k in range(100)
    ]
    feats = FeatureEngine(FeatureSettings(table_rows={"public.accounts": 20_000})).transform(
        make_events(pages)
    )
    assert feats["coverage_ratio"][-1] > 0.8  # 20k rows in 50 min, decaying over 3 h
    assert feats["offset"][-1] == pytest.approx(np.log1p(200 * 99))
    assert feats["fingerprint_repeats_1h"][-1] > np.log1p(50)


def test_state_refuses_another_feature_spec(tmp_path: Path) -> None:
    engine = FeatureEngine()
    engine.transform(make_events(history(1)))
    engine.save_state(tmp_path)
    other = FeatureEngine(FeatureSettings(baseline_days=3))
    with pytest.raises(ModelError, match="another feature spec"):
        other.load_state(tmp_path)


def test_model_matrix_is_the_frames_model_columns() -> None:
    engine = FeatureEngine()
    batch = engine.update(make_events(history(2)))
    feats = engine.frame(batch)
    assert batch.model.shape == (feats.height, len(MODEL_FEATURES))
    assert np.array_equal(batch.model, feats.select(MODEL_FEATURES).to_numpy())


def test_state_with_a_short_row_is_refused(tmp_path: Path) -> None:
    engine = FeatureEngine()
    engine.transform(make_events(history(1)))
    engine.save_state(tmp_path)
    with np.load(tmp_path / "state.npz") as z:
        arrays = {k: z[k] for k in z.files}
    arrays["principal_state"] = arrays["principal_state"][:, :-1]
    np.savez_compressed(tmp_path / "state.npz", **arrays)
    with pytest.raises(ModelError, match="inconsistent"):
        FeatureEngine().load_state(tmp_path)


def _sessions(
    user: str, days: int, per_session: int, start_day: int = 0
) -> list[dict[str, object]]:
    """Short application sessions: ``per_session`` parameterised lookups each, all day."""
    rows: list[dict[str, object]] = []
    for d in range(start_day, start_day + days):
        for k in range(60):
            t = T0 + timedelta(days=d, hours=8, minutes=10 * k)
            for j in range(per_session):
                rows.append(
                    {
                        "event_time": t + timedelta(seconds=j),
                        "db_user": user,
                        "session_id": f"{user}-{d}-{k}",
                        "client_ip": "10.0.10.1",
                        "client_app": "app",
                        "objects": ["public.users"],
                        "rows_returned": 20,
                        "statement_text": "SELECT id, name FROM users WHERE client_id = $1 "
                        "ORDER BY name LIMIT $2 OFFSET $3",
                    }
                )
    return rows


def test_one_session_running_the_apps_own_query_for_hundreds_of_tenants_stands_out() -> None:
    """Every statement is one the account runs all day; the session is not."""
    base = _sessions("app_api", 3, 3)
    t = T0 + timedelta(days=3, hours=10)
    scrape = [
        {**base[0], "event_time": t + timedelta(seconds=2 * j), "session_id": "scraper"}
        for j in range(240)
    ]
    usual = [
        {**r, "event_time": t + timedelta(seconds=j), "session_id": "fresh"}
        for j, r in enumerate(base[:3])
    ]
    f_scrape = run([*base, *scrape]).row(-1, named=True)
    f_usual = run([*base, *usual]).row(-1, named=True)
    # e^3 beyond 1.5x the usual sessions, weighed by the ~140 (decayed) sessions behind them
    assert f_scrape["session_statements_excess"] > 2.0
    assert f_scrape["session_statements_typical"] == pytest.approx(np.log1p(3), abs=0.01)
    assert f_usual["session_statements_excess"] == 0.0
    # the tenant filter is a bound parameter: a filtered lookup, not a bulk read
    assert f_scrape["bulk_sensitive_read_excess"] == 0.0
    assert f_scrape["new_shape_excess"] == 0.0  # the app's own shape


def test_a_new_shape_weighs_by_how_closed_the_vocabulary_is() -> None:
    base = _sessions("app_api", 3, 2)
    t = T0 + timedelta(days=3, hours=10)
    new = {
        **base[0],
        "event_time": t,
        "session_id": "page-1",
        "statement_text": "SELECT * FROM users ORDER BY id LIMIT $1 OFFSET $2",
    }
    f = run([*base, new]).row(-1, named=True)
    assert f["new_shape_excess"] == 1.0 and f["new_shape_sensitive_excess"] == 1.0
    assert f["new_shape_anyone_excess"] == 1.0
    assert f["bulk_sensitive_read_excess"] == 1.0  # no filter at all on users
    # an analyst who writes a new query several times a day: the same novelty weighs less
    ad_hoc = [
        {
            "event_time": T0 + timedelta(days=d, hours=9, minutes=20 * k),
            "db_user": "ann",
            "session_id": f"ann-{d}",
            "objects": ["public.users"],
            "rows_returned": 5,
            "statement_text": f"SELECT name FROM users WHERE id = {k} AND plan_{d}_{k % 4} = 1",
        }
        for d in range(3)
        for k in range(12)
    ]
    g = run([*ad_hoc, {**new, "db_user": "ann", "session_id": "ann-x"}]).row(-1, named=True)
    assert 0.0 < g["new_shape_excess"] < 0.6


def test_a_principal_in_its_first_day_is_compared_with_its_peers() -> None:
    """support_9 joins on day 3 and reads as support agents do: no excess; a principal with
    no peers is new, and nothing else, on its first day."""
    peers = [r for u in ("support_1", "support_2") for r in _sessions(u, 3, 2)]
    newcomer = [
        {**r, "db_user": user, "session_id": f"{user}-{r['session_id']}"}
        for user in ("support_9", "zed")
        for r in _sessions("x", 1, 2, start_day=3)[:30]
    ]
    feats = run([*peers, *newcomer])
    most = {
        u: feats.filter(pl.col("db_user") == u)
        .select(pl.all().exclude("tables").max())
        .row(0, named=True)
        for u in ("support_9", "zed")
    }
    assert most["support_9"]["new_principal"] == 1.0 == most["zed"]["new_principal"]
    assert most["support_9"]["sensitive_rows_24h_excess"] == 0.0
    # zed has no peers: its first day sets its bar, and only its newness is a signal
    assert most["zed"]["sensitive_rows_24h_excess"] == 0.0
    assert most["zed"]["bulk_sensitive_read_excess"] == 0.0
    # a newcomer reading far more than its peers ever do is still measured against them
    burst = [{**newcomer[0], "event_time": newcomer[0]["event_time"], "rows_returned": 50_000}]
    f = run([*peers, *burst]).row(-1, named=True)
    assert f["rows_excess"] > 3.0


def test_mariadb_statements_are_read_as_mysql() -> None:
    rows = [
        {
            "db_user": "app",
            "db_system": "mariadb",
            "objects": None,
            "rows_returned": 10,
            "statement_text": "SELECT SQL_NO_CACHE `id`, `email` FROM `shop`.`customers`",
        }
    ]
    f = run(rows).row(-1, named=True)
    assert f["tables"] == ["shop.customers"]
    assert f["bulk_sensitive_read"] == 1.0


# --- what real audit logs showed (lab weeks): time, echoes, per-table coverage, sessions ------


def _staff(user: str, days: list[int], *, hours: tuple[int, int] = (9, 16)) -> list[dict]:
    """A support agent's lookups, 30 a day between ``hours``, on the given day offsets."""
    rows: list[dict[str, object]] = []
    lo, hi = hours
    for d in days:
        for k in range(30):
            rows.append(
                {
                    "event_time": T0 + timedelta(days=d, hours=lo, minutes=(hi - lo) * 2 * k),
                    "db_user": user,
                    "session_id": f"{user}-{d}-{k // 5}",
                    "client_ip": "10.0.30.1",
                    "client_app": "console",
                    "objects": ["public.accounts"],
                    "rows_returned": 25,
                    "statement_text": f"SELECT * FROM public.accounts WHERE client_id = {k}",
                }
            )
    return rows


def _read(user: str, at: datetime, rows: int = 5000, **extra: object) -> dict[str, object]:
    return {
        "event_time": at,
        "db_user": user,
        "session_id": f"{user}-{at:%j%H%M}",
        "client_ip": "10.0.30.1",
        "client_app": "console",
        "objects": ["public.accounts"],
        "rows_returned": rows,
        "statement_text": "SELECT * FROM public.accounts WHERE balance > 9000",
        **extra,
    }


def test_a_weekend_day_is_off_hours_for_staff_who_only_work_weekdays() -> None:
    """T0 is a Monday: two weeks of weekday work, then a Saturday and a Monday afternoon."""
    weekdays = [d for d in range(12) if d % 7 < 5]
    base = _staff("support_1", weekdays)
    saturday = _read("support_1", T0 + timedelta(days=12, hours=11))
    monday = _read("support_1", T0 + timedelta(days=14, hours=11))
    f_sat = run([*base, saturday]).row(-1, named=True)
    f_mon = run([*base, monday]).row(-1, named=True)
    assert f_sat["day_type_ratio"] < 0.5 and f_sat["off_hours"] > 0.5
    assert f_sat["off_hours_sensitive_rows_excess"] > 3.0  # never read at such a time
    assert f_mon["day_type_ratio"] == 1.0 and f_mon["off_hours"] < 0.1
    assert f_mon["off_hours_sensitive_rows_excess"] == 0.0
    # the same Saturday for someone who works every day is a day like the others
    every_day = _staff("support_1", list(range(12)))
    assert run([*every_day, saturday]).row(-1, named=True)["day_type_ratio"] > 0.9


def test_no_kind_of_day_is_rare_before_the_stream_has_seen_one() -> None:
    """A log that begins on a Wednesday: a job that runs every day is not off hours on the
    first Saturday, only because no weekend day was in the log before it."""
    job = _staff("worker", [2, 3, 4])
    first_saturday = _read("worker", T0 + timedelta(days=5, hours=11))
    f = run([*job, first_saturday]).row(-1, named=True)
    assert f["day_type_ratio"] == 1.0
    assert f["off_hours_sensitive_rows_excess"] == 0.0


def test_no_hour_is_rare_before_enough_hours_are_known() -> None:
    """A day of 30 lookups between 09:00 and 16:00 does not make 18:00 a rare hour; a month
    of weekdays of them does."""
    evening = {"hours": 18}
    short = _staff("support_1", [0])
    long = _staff("support_1", [d for d in range(31) if d % 7 < 5])
    f_short = run([*short, _read("support_1", T0 + timedelta(days=1, **evening))])
    f_long = run([*long, _read("support_1", T0 + timedelta(days=31, **evening))])
    assert f_short.row(-1, named=True)["off_hours"] < 0.9
    assert f_short.row(-1, named=True)["off_hours_sensitive_rows_excess"] == 0.0
    assert f_long.row(-1, named=True)["off_hours"] > 0.8
    assert f_long.row(-1, named=True)["off_hours_sensitive_rows_excess"] > 3.0


def test_a_lookup_after_a_scrape_does_not_carry_the_scrape() -> None:
    """A scrape's volume is the evidence of the scrape's pages, not of the agent's ordinary
    lookup an hour later from the same address."""
    settings = FeatureSettings(table_rows={"public.accounts": 20_000})
    base = _staff("support_1", [0, 1, 2])
    t = T0 + timedelta(days=3, hours=10)
    pages = [
        _read("support_1", t + timedelta(seconds=30 * k), rows=200, session_id="scrape")
        for k in range(100)
    ]
    later = {**base[0], "event_time": t + timedelta(minutes=50 + 60), "session_id": "later"}
    feats = FeatureEngine(settings).transform(make_events([*base, *pages, later]))
    last_page, f_later = feats.row(-2, named=True), feats.row(-1, named=True)
    for name in ("sensitive_rows_1h_excess", "sensitive_rows_24h_excess", "table_coverage_excess"):
        assert last_page[name] > 1.0, name
        assert f_later[name] == 0.0, name  # the volume is still high, but not this event's
    # every page sustained the volume (each replaced what decayed since the one before)
    scrape = feats.filter(pl.col("session_id") == "scrape")
    assert (scrape["sensitive_rows_1h_excess"].tail(80) > 0.0).all()


def test_lookups_a_minute_apart_after_a_scrape_do_not_carry_it() -> None:
    """The agent's own pace after her scrape of the client list (one-row lookups of the
    scraped shape a minute apart, 55 minutes on) replaces more than half of each minute's
    decay of the scrape's 3-hour coverage, so the replenish test alone would credit her with
    it; the volumes have fallen away from their peak, so they are not the lookups' evidence.
    A slow scraper's pages, five minutes apart, keep theirs."""
    settings = FeatureSettings(table_rows={"public.accounts": 20_000, "public.clients": 2_000})
    t = T0 + timedelta(days=3, hours=10)

    def lookup(at: datetime, k: int, session: str, rows: int = 1) -> dict[str, object]:
        return {
            **_read("support_1", at, rows=rows, session_id=session),
            "objects": ["public.clients"],
            "statement_text": f"SELECT * FROM public.clients WHERE id = {k}",
        }

    base = _staff("support_1", [0, 1, 2]) + [
        lookup(T0 + timedelta(days=d, hours=11, minutes=3 * k), k, f"day{d}")
        for d in range(3)
        for k in range(5)
    ]
    scrape = [lookup(t + timedelta(seconds=3 * k), k, "scrape") for k in range(300)]
    after = [lookup(t + timedelta(minutes=55, seconds=60 * k), 900 + k, "after") for k in range(10)]
    rows = sorted([*base, *scrape, *after], key=lambda r: r["event_time"])  # type: ignore[arg-type, return-value]
    feats = FeatureEngine(settings).transform(make_events(rows))
    names = ("table_coverage_excess", "fingerprint_repeats_1h_excess")
    last_page = feats.filter(pl.col("session_id") == "scrape").row(-1, named=True)
    for name in names:
        assert last_page[name] > 0.5, name
    trailing = feats.filter(pl.col("session_id") == "after")
    for name in names:
        assert (trailing[name] == 0.0).all(), name

    slow = [lookup(t + timedelta(minutes=5 * k), 2000 + k, "slow", rows=20) for k in range(30)]
    rows = sorted([*base, *slow], key=lambda r: r["event_time"])  # type: ignore[arg-type, return-value]
    pages = FeatureEngine(settings).transform(make_events(rows))
    pages = pages.filter(pl.col("session_id") == "slow")
    assert (pages["table_coverage_excess"].tail(25) > 0.0).all()


def test_coverage_is_compared_with_the_principals_own_past_of_that_table() -> None:
    """An analyst who reads a quarter of the accounts every day and one client at a time has
    not read the client list before: reading all of it is an excess, of that table."""
    settings = FeatureSettings(table_rows={"public.accounts": 20_000, "public.clients": 1_000})
    rows: list[dict[str, object]] = []
    for d in range(3):
        at = T0 + timedelta(days=d, hours=10)
        rows.append(_read("ann", at, rows=5000, db_user="ann"))
        for k in range(5):
            rows.append(
                {
                    **_read("ann", at + timedelta(minutes=5 + k), rows=1),
                    "objects": ["public.clients"],
                    "statement_text": f"SELECT * FROM public.clients WHERE id = {k}",
                }
            )
    whole = {
        **_read("ann", T0 + timedelta(days=3, hours=10), rows=1000),
        "objects": ["public.clients"],
        "statement_text": "SELECT id, name, email FROM public.clients",
    }
    accounts_again = _read("ann", T0 + timedelta(days=3, hours=11), rows=5000)
    feats = FeatureEngine(settings).transform(make_events([*rows, whole, accounts_again]))
    f_whole, f_again = feats.row(-2, named=True), feats.row(-1, named=True)
    assert f_whole["coverage_ratio"] == pytest.approx(1.0, abs=1e-3)
    # log10(1 + 1e4 x coverage): all of it against 0.5% of it before, less the allowance
    assert f_whole["table_coverage_excess"] > 2.0
    assert f_again["table_coverage_excess"] == 0.0


def test_a_table_whose_size_was_unknown_has_no_past_coverage() -> None:
    """Sizes are learnt from whole reads: the first coverage anyone has of a table (after the
    month's first invoice run read it whole) is no rise over a past nobody could measure."""
    job = {
        "event_time": T0 + timedelta(days=2, hours=4),
        "db_user": "billing",
        "objects": ["public.clients"],
        "rows_returned": 1000,
        "statement_text": "SELECT id, name FROM public.clients",
    }
    lookups = [
        {
            "event_time": T0 + timedelta(days=d, hours=10, minutes=k),
            "db_user": "support_1",
            "objects": ["public.clients"],
            "rows_returned": 20 if d == 2 else 1,
            "statement_text": f"SELECT * FROM public.clients WHERE plan = {k}",
        }
        for d in range(3)
        for k in range(10)
    ]
    feats = run(sorted([job, *lookups], key=lambda r: r["event_time"]))  # type: ignore[arg-type, return-value]
    day2 = feats.filter(
        (pl.col("db_user") == "support_1") & (pl.col("event_time").dt.day() == T0.day + 2)
    )
    assert day2["coverage_ratio"].max() > 0.0  # the size is known now
    assert day2["table_coverage_excess"].max() == 0.0


def test_session_counts_weigh_by_the_sessions_behind_the_bar() -> None:
    """The same 240-statement session: against an application's thousands of short sessions
    it is a full-weight excess; against an analyst's few sessions, a fraction of it."""
    many = _sessions("app_api", 3, 3)  # 180 sessions
    few = [r for r in many if int(str(r["session_id"]).split("-")[-1]) < 2]  # 6 sessions
    t = T0 + timedelta(days=3, hours=10)

    def scraped(base: list[dict[str, object]]) -> dict[str, object]:
        scrape = [
            {**base[0], "event_time": t + timedelta(seconds=2 * j), "session_id": "scraper"}
            for j in range(240)
        ]
        row: dict[str, object] = run([*base, *scrape]).row(-1, named=True)
        return row

    f_many, f_few = scraped(many), scraped(few)
    assert f_many["sessions_seen"] > 100 and f_few["sessions_seen"] < 10
    assert f_many["session_statements_excess"] > 2.0
    assert 0.0 < f_few["session_statements_excess"] < 0.6 * f_many["session_statements_excess"]


def test_a_first_days_new_queries_teach_an_open_vocabulary() -> None:
    """Nothing is new in a principal's first day, but the habit learns from that day what was
    first seen in it: the analyst who wrote 20 queries on day one is not surprised by a new
    one on day two; the application that ran 3 shapes 180 times is."""
    analyst = [
        {
            "event_time": T0 + timedelta(hours=9, minutes=10 * k),
            "db_user": "ann",
            "objects": ["public.invoices"],
            "rows_returned": 5,
            "statement_text": f"SELECT * FROM public.invoices WHERE month = {k} AND plan_{k} = 1",
        }
        for k in range(20)
    ]
    app = _sessions("app_api", 1, 3)
    new = {
        "event_time": T0 + timedelta(days=1, hours=10),
        "objects": ["public.invoices"],
        "rows_returned": 5,
        "statement_text": "SELECT * FROM public.invoices WHERE amount > 100",
    }
    f_ann = run([*analyst, {**new, "db_user": "ann"}]).row(-1, named=True)
    f_app = run([*app, {**new, "db_user": "app_api"}]).row(-1, named=True)
    assert f_app["new_shape_excess"] > 0.7  # one shape in 180 statements: -log10(1/180) / 3
    assert 0.0 < f_ann["new_shape_excess"] < 0.5 * f_app["new_shape_excess"]


@pytest.mark.parametrize(
    ("sql", "per_tenant"),
    [
        ("SELECT client_id, count(*), sum(balance) FROM accounts GROUP BY client_id", 1.0),
        ("SELECT c.id, sum(i.amount) FROM clients c JOIN invoices i ON i.client_id = c.id"
         " GROUP BY c.id ORDER BY 2 DESC LIMIT 20", 0.0),
        ("SELECT plan_id, count(*) FROM clients GROUP BY plan_id", 0.0),
        ("SELECT count(*) FROM accounts WHERE status = 'active'", 0.0),
        ("SELECT client_id, count(*) FROM accounts WHERE client_id = 7 GROUP BY client_id", 0.0),
    ],
)
def test_an_aggregate_over_all_tenants_is_one_figure_per_tenant_for_every_tenant(
    sql: str, per_tenant: float
) -> None:
    f = run([{"db_user": "ann", "objects": None, "rows_returned": 20, "statement_text": sql}])
    assert f.row(-1, named=True)["aggregate_all_tenants"] == per_tenant


def test_a_record_stamped_months_ahead_does_not_stall_the_state() -> None:
    """One line of a real server's log carried the wall clock instead of the server's time:
    held at the stream's time, it leaves every later count decaying as before; a stream that
    really resumes days later moves on at its second record."""
    base = _staff("support_1", [0, 1, 2])
    glitch = {**base[-1], "event_time": T0 + timedelta(days=210)}
    after = _staff("support_1", [3])
    # what it is scored as: the same record at the time the stream had reached
    clean = FeatureEngine()
    clean.transform(make_events([*base, {**glitch, "event_time": base[-1]["event_time"]}]))
    want = clean.transform(make_events(after)).select(COMPARED)
    engine = FeatureEngine()
    engine.transform(make_events([*base, glitch]))
    got = engine.transform(make_events(after)).select(COMPARED)
    assert engine.events_time_held_ == 1
    assert engine.last_event_time_ == pytest.approx(after[-1]["event_time"].timestamp())  # type: ignore[attr-defined]
    # (the held record's hour of the day is the one it claims: the hour bins differ by it)
    assert_same(want.drop("hour_share", "off_hours"), got.drop("hour_share", "off_hours"))
    # a real jump: the first record of it is held, the second moves the stream on
    resumed = _staff("support_1", [30])
    engine.transform(make_events(resumed[:2]))
    assert engine.events_time_held_ == 2
    assert engine.last_event_time_ == pytest.approx(resumed[1]["event_time"].timestamp())  # type: ignore[attr-defined]


def test_a_deploys_failed_logins_from_the_apps_own_hosts_are_judged_by_its_earlier_bursts() -> None:
    """A deploy with a stale password fails from the application's own servers, where it has
    worked for days; the same burst from an address it never worked from is a guess."""
    hosts = ["10.0.10.1", "10.0.10.2", "10.0.10.3"]
    work = [
        {
            "event_time": T0 + timedelta(days=d, hours=h, minutes=m),
            "db_user": "app_api",
            "client_ip": host,
            "objects": ["public.accounts"],
            "rows_returned": 1,
            "statement_text": "SELECT * FROM accounts WHERE id = $1",
        }
        for d in range(4)
        for h in range(8, 20)
        for m in (0, 30)
        for host in hosts
    ]

    def burst(day: int, host: str, n: int) -> list[dict[str, object]]:
        at = T0 + timedelta(days=day, hours=12, minutes=7)
        return [
            {
                "event_time": at + timedelta(seconds=2 * k),
                "db_user": "app_api",
                "client_ip": host,
                "action": "login_failed",
                "command": None,
                "statement_text": None,
            }
            for k in range(n)
        ]

    def last(rows: list[dict[str, object]]) -> dict[str, object]:
        """The features of the last failed login."""
        ordered = sorted(rows, key=lambda r: r["event_time"])  # type: ignore[arg-type, return-value]
        feats = run(ordered).filter(pl.col("action") == "login_failed")
        row: dict[str, object] = feats.row(-1, named=True)
        return row

    first = last([*work, *burst(2, "10.0.10.3", 24)])
    again = last([*work, *burst(2, "10.0.10.3", 24), *burst(3, "10.0.10.2", 45)])
    guess = last([*work, *burst(2, "10.0.10.3", 24), *burst(3, "203.0.113.5", 45)])
    # the first burst from its own hosts has nothing before it to go by: in full
    assert first["failed_logins_principal_1h"] > np.log1p(24) - np.log(1.5) - 0.05
    assert first["failed_logins_address_1h"] == 0.0
    # the next, bigger one from another of its hosts is within reach of the last
    assert 0.0 <= again["failed_logins_principal_1h"] < 0.5
    assert again["failed_logins_address_1h"] == 0.0
    assert np.expm1(again["failed_logins_usual_high"]) == pytest.approx(24, rel=0.05)
    # from an address it never worked from, every failure counts, per address and principal
    assert np.expm1(guess["failed_logins_address_1h"]) == pytest.approx(45, rel=0.05)
    assert guess["failed_logins_principal_1h"] > 3.5

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
    assert run([*base, night])["off_hours"][-1] > 0.9
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
    feats = engine.transform(make_events(history(2)))
    assert np.array_equal(engine.model_matrix_, feats.select(MODEL_FEATURES).to_numpy())


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
    assert f_scrape["session_statements_excess"] > 3.0  # e^3 beyond 1.5x the usual sessions
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

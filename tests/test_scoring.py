"""Scoring: the compiled forest equals scikit-learn, artefacts are verified, the threshold
keeps to its budget, explanations name real values."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from sklearn.ensemble import IsolationForest

from detector.errors import ModelError
from detector.features.engine import MODEL_FEATURES, PLAUSIBLE
from detector.scoring import artefact as store
from detector.scoring.ensemble import Ensemble, fit_ensemble
from detector.scoring.explain import explain, feature_stats
from detector.scoring.forest import Forest, fit_forest, flatten, sklearn_anomaly_score
from detector.scoring.threshold import (
    MIN_REGIME_DAYS,
    calibrate,
    calibrate_regimes,
    regime_days,
    severity,
)
from tests.model_support import metadata_for


@settings(max_examples=25, deadline=None)
@given(
    data=arrays(
        np.float64,
        st.tuples(st.integers(20, 400), st.integers(1, 6)),
        elements=st.floats(-1e6, 1e6, allow_nan=False, width=32),
    ),
    trees=st.integers(1, 30),
    max_features=st.sampled_from([1.0, 0.5]),
    seed=st.integers(0, 2**16),
)
def test_compiled_scores_equal_sklearn(
    data: np.ndarray, trees: int, max_features: float, seed: int
) -> None:
    model = IsolationForest(n_estimators=trees, max_features=max_features, random_state=seed)
    model.fit(data.astype(np.float32))
    forest = flatten(model)
    probe = np.vstack([data, data * 1.5 + 1, np.zeros((3, data.shape[1])), data[:0]])
    assert np.array_equal(forest.score(probe), sklearn_anomaly_score(model, probe))
    # every flattened forest passes the load-time checks, unless no tree could split at all
    # (each one's sample held a single distinct row), which loading refuses on purpose
    if forest.child.size > forest.n_trees:
        assert forest.problem() is None
    else:
        assert forest.problem() == "no tree splits: every row would score the same"


def test_higher_score_means_more_anomalous() -> None:
    rng = np.random.default_rng(1)
    forest, _ = fit_forest(rng.normal(size=(2000, 4)), n_trees=50)
    normal, outlier = forest.score(np.zeros((1, 4)))[0], forest.score(np.full((1, 4), 9.0))[0]
    assert 0 < normal < outlier <= 1


def _ensemble(seed: int, n: int = 2000) -> Ensemble:
    """Grouped forests fitted on sparse, non-negative rows like the engine's."""
    rng = np.random.default_rng(seed)
    f = len(MODEL_FEATURES)
    # mild excesses are common (each feature in a third of the rows, up to 0.2); 1% of the
    # rows have one stronger excess; copy_out_excess stays quiet (never seen in training)
    X = np.where(rng.random((n, f)) < 0.3, rng.uniform(0.0, 0.2, (n, f)), 0.0)
    strong = rng.random(n) < 0.01
    X[strong, rng.integers(0, f, int(strong.sum()))] = rng.uniform(0.3, 0.8, int(strong.sum()))
    X[:, MODEL_FEATURES.index("copy_out_excess")] = 0.0
    model, _ = fit_ensemble(X, MODEL_FEATURES, np.asarray(PLAUSIBLE), n_trees=20, seed=seed)
    return model


def _version(tmp_path: Path) -> Path:
    forest = _ensemble(2, 500)

    def state(d: Path) -> None:
        (d / "state.npz").write_bytes(b"state")
        (d / "state.json").write_text("{}")

    return store.write_version(tmp_path / "m", forest, metadata_for(forest), state)


def test_artefact_round_trip_and_alias(tmp_path: Path) -> None:
    v1 = _version(tmp_path)
    v2 = _version(tmp_path)
    assert (v1.name, v2.name) == ("v1", "v2")
    with pytest.raises(ModelError, match="no alias 'current'"):
        store.load(tmp_path / "m")
    store.promote(tmp_path / "m", "v2")
    art = store.load(tmp_path / "m")
    assert art.path == v2 and art.threshold == 2.5 and art.ref == "m@v2"
    assert art.checksum == store.sha256(v2 / store.SUMS)
    assert store.load(f"{tmp_path / 'm'}@v1").path == v1
    with pytest.raises(ModelError, match="no version 'v9'"):
        store.promote(tmp_path / "m", "v9")


@pytest.mark.parametrize("victim", ["model.npz", "metadata.json", "state.npz"])
def test_tampered_artefact_is_refused_before_loading(tmp_path: Path, victim: str) -> None:
    v1 = _version(tmp_path)
    with (v1 / victim).open("ab") as fh:
        fh.write(b"\0")
    with pytest.raises(ModelError, match="checksum mismatch"):
        store.load(v1)


def test_forest_with_out_of_range_arrays_is_refused(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    forest, _ = fit_forest(rng.normal(size=(300, 2)), n_trees=3)
    bad = Forest(
        forest.roots,
        forest.child + 10**6,
        forest.feature,
        forest.threshold,
        forest.value,
        forest.depth,
        forest.denominator,
        forest.n_features,
    )
    bad.save(tmp_path / "f.npz")
    with pytest.raises(ModelError, match="inconsistent"):
        Forest.load(tmp_path / "f.npz")


def test_model_file_holds_no_pickled_objects(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    forest, _ = fit_forest(rng.normal(size=(300, 2)), n_trees=3)
    forest.save(tmp_path / "f.npz")
    with np.load(tmp_path / "f.npz", allow_pickle=False) as z:
        assert all(z[k].dtype != object for k in z.files)


def test_calibration_keeps_the_incident_budget() -> None:
    rng = np.random.default_rng(5)
    scores = rng.beta(2, 5, size=5000)

    def incidents_at(t: float) -> int:  # each event above t is its own incident
        return int((scores >= t).sum())

    cal = calibrate(scores, incidents_at, days=4.0, budget_per_day=1.5)
    assert cal.heldback_incidents == 6 == incidents_at(cal.value)
    assert incidents_at(np.sort(scores)[-7]) == 7 > 6  # one step lower would break the budget
    assert cal.bands["low"] <= cal.bands["medium"] <= cal.bands["high"]
    assert severity(cal.bands["high"], cal.bands, heavy=True) == "critical"
    assert severity(cal.value, cal.bands, heavy=False) == "low"


def test_explanation_names_actual_and_typical_values() -> None:
    names = ["rows_excess", "new_address_excess", "off_hours"]
    stats = feature_stats(np.zeros((100, 3)), names)
    row = {
        "db_user": "app_api",
        "row_count": 2140,
        "rows_typical": np.log1p(1.0),
        "rows_excess": 7.0,
        "new_address_excess": 1.0,
        "client_ip": "203.0.113.9",
        "off_hours": 0.0,
        "tables": ["public.clients"],
        "event_time": datetime(2026, 1, 1, 3, tzinfo=UTC) + timedelta(0),
    }
    ex = explain(row, stats)
    assert ex["reason"].startswith("2,140 rows of public.clients; typical for app_api: 1")
    assert "new address 203.0.113.9" in ex["reason"]
    assert [f["feature"] for f in ex["top_features"]] == ["rows_excess", "new_address_excess"]


def test_explanation_names_the_session_and_one_new_shape() -> None:
    names = [
        "session_statements_excess",
        "new_shape_excess",
        "new_shape_sensitive_excess",
        "new_shape_anyone_excess",
    ]
    stats = feature_stats(np.zeros((100, len(names))), names)
    row = {
        "db_user": "app_api",
        "session_statements": np.log1p(240.0),
        "session_statements_typical": np.log1p(6.0),
        "session_statements_excess": 3.2,
        "new_shape_excess": 1.0,
        "new_shape_sensitive_excess": 1.0,
        "new_shape_anyone_excess": 1.0,
        "new_shape_anyone_typical": 0.0,
        "tables": ["public.users"],
    }
    ex = explain(row, stats)
    assert ex["reason"].startswith(
        "one session ran 240 statements in the last hour; app_api's sessions run at most 6"
    )
    # three views of one fact (a new shape) are named once, the strongest
    assert ex["reason"].count("statement shape") == 1
    assert "no principal ran before" in ex["reason"]


def test_scores_frame_is_independent_of_batch_size() -> None:
    rng = np.random.default_rng(6)
    forest, _ = fit_forest(rng.normal(size=(1000, 5)), n_trees=20)
    X = rng.normal(size=(777, 5)) * 2
    whole = forest.score(X)
    parts = np.concatenate([forest.score(X[i : i + 50]) for i in range(0, 777, 50)])
    assert np.array_equal(whole, parts)
    assert pl.Series(whole).is_finite().all()


def test_large_batches_split_across_threads_score_exactly_like_sklearn() -> None:
    rng = np.random.default_rng(7)
    forest, model = fit_forest(rng.normal(size=(3000, 6)), n_trees=25)
    X = rng.normal(size=(45_001, 6)) * 2  # above the row count that splits work over threads
    X[::3] = 0.0  # all-zero rows take the shared-score path
    assert np.array_equal(forest.score(X), sklearn_anomaly_score(model, X))


def _row(**values: float) -> np.ndarray:
    x = np.zeros((1, len(MODEL_FEATURES)))
    for name, v in values.items():
        x[0, MODEL_FEATURES.index(name)] = v
    return x


def test_one_signal_at_full_strength_outranks_a_mix_of_mild_ones() -> None:
    model = _ensemble(7)
    strong = _row(copy_out_excess=1.0)
    mild = _row(rows_excess=0.1, tables_1h_excess=0.1, off_hours=0.2, session_shapes_excess=0.1)
    usual = _row()
    s_strong, s_mild, s_usual = (float(model.score(x)[0]) for x in (strong, mild, usual))
    assert s_usual == 0.0
    assert s_strong > s_mild > 0.0
    assert s_strong >= 2.5  # rarer than one training row in ~300


def test_the_strongest_anomalies_do_not_share_one_ceiling() -> None:
    model = _ensemble(8)
    scores = [
        float(model.score(_row(rows_excess=v, sensitive_rows_1h_excess=v))[0])
        for v in (5.0, 10.0, 20.0)
    ]
    assert scores[0] < scores[1] < scores[2]
    both = float(
        model.score(_row(rows_excess=5.0, sensitive_rows_1h_excess=5.0, new_address_excess=1.0))[0]
    )
    assert both > scores[0]  # another kind of evidence adds to it


def test_ensemble_round_trip_scores_the_same_and_refuses_tampering(tmp_path: Path) -> None:
    model = _ensemble(9)
    rng = np.random.default_rng(1)
    X = np.where(
        rng.random((300, len(MODEL_FEATURES))) < 0.2,
        rng.exponential(1.0, (300, len(MODEL_FEATURES))),
        0.0,
    )
    model.save(tmp_path / "m.npz")
    back = Ensemble.load(tmp_path / "m.npz")
    assert np.array_equal(model.score(X), back.score(X))
    with np.load(tmp_path / "m.npz", allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["g0_columns"] = arrays["g0_columns"] + 1000
    with (tmp_path / "bad.npz").open("wb") as fh:
        np.savez(fh, **arrays)
    with pytest.raises(ModelError, match=r"out of range|inconsistent"):
        Ensemble.load(tmp_path / "bad.npz")


@pytest.mark.parametrize("start_day", range(7))
def test_calibration_holds_whichever_weekday_the_history_starts_on(start_day: int) -> None:
    """Weekdays are busy and noisy, weekends quiet: the threshold keeps all days together, and
    each regime with days enough of its own, within the budget, whatever day the calibration
    span starts on; a regime of fewer days does not set one alone."""
    rng = np.random.default_rng(start_day)
    t0 = datetime(2026, 3, 2, tzinfo=UTC) + timedelta(days=start_day)  # 2026-03-02 is a Monday
    times, scores = [], []
    for d in range(10):
        day = t0 + timedelta(days=d)
        weekend = day.isoweekday() >= 6
        n = 200 if weekend else 2000
        times += [day + timedelta(seconds=float(s)) for s in np.sort(rng.uniform(0, 86399, n))]
        scores += list(rng.exponential(0.5 if weekend else 1.0, n))
    frame = pl.DataFrame({"event_time": times}, schema={"event_time": pl.Datetime("us", "UTC")})
    s = np.asarray(scores)

    def incidents_at(rows: np.ndarray, t: float) -> int:
        return int(((s >= t) & rows).sum())

    regimes = regime_days(frame["event_time"])
    assert sum(regimes.values()) == pytest.approx(10.0, abs=0.01)
    cal = calibrate_regimes(
        s, frame["event_time"], incidents_at, regimes=regimes, budget_per_day=1.0
    )
    weekday = frame["event_time"].dt.weekday().to_numpy() < 6
    every = np.ones_like(weekday)
    assert incidents_at(every, cal.value) <= 10
    for name, rows in (("weekday", weekday), ("weekend", ~weekday)):
        if regimes[name] >= MIN_REGIME_DAYS:
            # the nearest whole number of incidents over the regime's span
            assert incidents_at(rows, cal.value) <= int(regimes[name] + 0.5), name
            assert name in cal.regimes
        else:
            assert name not in cal.regimes
    # the noisy regime is the one that needs the higher bar
    assert cal.value == max(2.0, *cal.regimes.values()) == max(2.0, cal.regimes["weekday"])
    assert cal.bands["medium"] == cal.value + 1.0 and cal.bands["high"] == cal.value + 2.0


def test_two_days_of_a_regime_do_not_set_the_threshold_alone() -> None:
    """Four calibration days, two of them weekdays, one of which holds the month's invoice run
    and a DBA's first login: all four days together set the bar."""
    t0 = datetime(2026, 4, 1, tzinfo=UTC)  # a Wednesday: Thu, Fri, Sat, Sun follow
    times = [t0 + timedelta(days=d, hours=h) for d in range(1, 5) for h in range(24)]
    s = np.full(len(times), 1.0)
    s[[3, 10]] = [13.8, 8.7]  # Thursday: two rare things
    s[[30, 60]] = [6.0, 5.9]  # Friday and Saturday: one each, milder
    frame = pl.DataFrame({"event_time": times}, schema={"event_time": pl.Datetime("us", "UTC")})

    def incidents_at(rows: np.ndarray, t: float) -> int:
        return int(((s >= t) & rows).sum())

    regimes = regime_days(frame["event_time"])
    assert regimes["weekday"] < MIN_REGIME_DAYS and regimes["weekend"] < MIN_REGIME_DAYS
    cal = calibrate_regimes(
        s, frame["event_time"], incidents_at, regimes=regimes, budget_per_day=1.0
    )
    assert set(cal.regimes) == {"all"}
    assert 2.0 <= cal.value < 5.9  # four days allow the four incidents
    assert incidents_at(np.ones(len(s), dtype=bool), cal.value) == 4


def test_a_value_just_past_the_training_top_is_about_as_rare_as_the_top() -> None:
    """Above the top 1% of training values the rarity follows the tail fitted there: a value
    a hair past the highest one seen is not one in all N at once, and it keeps growing."""
    rng = np.random.default_rng(3)
    n, f = 5000, len(MODEL_FEATURES)
    X = np.zeros((n, f))
    j = MODEL_FEATURES.index("off_hours")
    X[: n // 10, j] = rng.uniform(0.6, 0.8, n // 10)  # a tenth of the rows: night-time work
    model, _ = fit_ensemble(X, MODEL_FEATURES, np.asarray(PLAUSIBLE), n_trees=20, seed=3)
    top = float(X[:, j].max())

    def hour(v: float) -> float:
        return float(model.surprises(_row(off_hours=v))[0, model.names.index("hour")])

    at_top, past, far = hour(top), hour(top + 0.01), hour(1.0)
    assert past - at_top < 0.5
    assert past < np.log10(n + 1) - 0.5  # short of one in all the rows
    assert far > past + 0.8  # and rarer the further past the top


def test_a_bounded_signal_from_habitual_to_never_spans_its_whole_tail() -> None:
    """COPY is habitual for some rows (surprise 0.1: the backup), never done for the row
    scored: the step from 0.1 to 1 is as rare as a never-seen signal can be."""
    rng = np.random.default_rng(4)
    n, f = 5000, len(MODEL_FEATURES)
    X = np.where(rng.random((n, f)) < 0.3, rng.uniform(0.0, 0.2, (n, f)), 0.0)
    j = MODEL_FEATURES.index("copy_out_excess")
    X[:, j] = 0.0
    X[:50, j] = 0.1
    model, _ = fit_ensemble(X, MODEL_FEATURES, np.asarray(PLAUSIBLE), n_trees=20, seed=4)
    first_copy = float(model.score(_row(copy_out_excess=1.0))[0])
    assert first_copy > np.log10(n + 1)

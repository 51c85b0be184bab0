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
from detector.scoring import artefact as store
from detector.scoring.explain import explain, feature_stats
from detector.scoring.forest import Forest, fit_forest, flatten, sklearn_anomaly_score
from detector.scoring.threshold import calibrate, severity


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


def test_higher_score_means_more_anomalous() -> None:
    rng = np.random.default_rng(1)
    forest, _ = fit_forest(rng.normal(size=(2000, 4)), n_trees=50)
    normal, outlier = forest.score(np.zeros((1, 4)))[0], forest.score(np.full((1, 4), 9.0))[0]
    assert 0 < normal < outlier <= 1


def _version(tmp_path: Path) -> Path:
    rng = np.random.default_rng(2)
    forest, _ = fit_forest(rng.normal(size=(500, 3)), n_trees=10)

    def state(d: Path) -> None:
        (d / "state.npz").write_bytes(b"state")
        (d / "state.json").write_text("{}")

    meta = {"threshold": {"value": 0.6}, "created_at": "x"}
    return store.write_version(tmp_path / "m", forest, meta, state)


def test_artefact_round_trip_and_alias(tmp_path: Path) -> None:
    v1 = _version(tmp_path)
    v2 = _version(tmp_path)
    assert (v1.name, v2.name) == ("v1", "v2")
    with pytest.raises(ModelError, match="no alias 'current'"):
        store.load(tmp_path / "m")
    store.promote(tmp_path / "m", "v2")
    art = store.load(tmp_path / "m")
    assert art.path == v2 and art.threshold == 0.6 and art.ref == "m@v2"
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

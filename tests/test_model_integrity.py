"""Models cannot be swapped silently: a forged version whose SHA256SUMS was recomputed is
refused by its values, a signed version loads only under the configured key, and promotions
and refusals are logged and counted, by the store, the command line and the running service."""

from __future__ import annotations

import hashlib
import math
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from structlog.testing import capture_logs

from detector import config
from detector.errors import ConfigError
from detector.scoring import artefact as store
from detector.sinks.metrics import Metrics
from tests.conftest import exfilwatch, small_sample_cli
from tests.model_support import Arrays, Metadata, forge, shipped_copy
from tests.service_support import metric, running, settings_for

KEY = "4f2d0c6a9b1e8f7d3c5a2b9e0d1f4a7c6b3e8d2f1a0c9b7e5d4c3b2a1f0e9d8c"
OTHER = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"


def _inner(a: Arrays, g: int = 0) -> np.ndarray:
    """Indices of the internal (split) nodes of group g's forest."""
    child = a[f"g{g}_child"]
    return np.flatnonzero(child != np.arange(child.size))


def _leaves(a: Arrays, g: int = 0) -> np.ndarray:
    child = a[f"g{g}_child"]
    return np.flatnonzero(child == np.arange(child.size))


def _set(key: str, index: object, value: float) -> Callable[[Arrays], None]:
    def edit(a: Arrays) -> None:
        a[key][index] = value  # type: ignore[index]

    return edit


def _child_out_of_range(a: Arrays) -> None:
    a["g0_child"][_inner(a)[0]] = 10**6


def _cycle(a: Arrays) -> None:
    """The root's left child points back at the root."""
    a["g0_child"][a["g0_child"][0]] = 0


def _shared_children(a: Arrays) -> None:
    """The root's left child (a split) takes its sibling as its own left child: the sibling
    then has two parents, and the left child's old children none."""
    child = a["g0_child"]
    left = child[0]
    assert child[left] != left, "the shipped model's first split has a split below it"
    child[left] = left + 1


def _feature_out_of_range(a: Arrays) -> None:
    a["g0_feature"][_inner(a)[0]] = int(a["g0_meta"][2])  # one past the group's columns


def _never_splits(a: Arrays) -> None:
    """Every tree of the first group a single leaf: each row gets the same score."""
    trees = a["g0_roots"].size
    a["g0_roots"] = np.arange(trees, dtype=np.int64)
    a["g0_child"] = np.arange(trees, dtype=np.int64)
    a["g0_feature"] = np.zeros(trees, dtype=np.int64)
    a["g0_threshold"] = np.full(trees, np.inf)
    a["g0_value"] = np.full(trees, a["g0_meta"][1] / trees)


def _splits_beyond_range(a: Arrays) -> None:
    a["g0_threshold"][_inner(a)] = 1e30


def _negative_leaves(a: Arrays) -> None:
    a["g0_value"][_leaves(a)] = -1.0


def _duplicate_columns(a: Arrays) -> None:
    a["g0_columns"][1] = a["g0_columns"][0]


def _unsorted_scores(a: Arrays) -> None:
    a["g0_quantiles"] = a["g0_quantiles"][::-1].copy()


FORGED_ARRAYS: dict[str, tuple[Callable[[Arrays], None], str]] = {
    "child index out of range": (_child_out_of_range, "child index points outside its tree"),
    "cyclic tree": (_cycle, "back to an earlier node"),
    "node with two parents": (_shared_children, "shared by two parents"),
    "feature index out of range": (_feature_out_of_range, "split feature lies outside"),
    "NaN split threshold": (
        lambda a: _set("g0_threshold", _inner(a)[0], np.nan)(a),
        "split threshold is not a finite",
    ),
    "trees that never split": (_never_splits, "no tree splits"),
    "splits beyond the training range": (_splits_beyond_range, "outside its features' training"),
    "negative leaf path lengths": (_negative_leaves, "leaf's path length"),
    "walk shorter than the trees": (_set("g0_meta", 0, 1.0), "deeper than the scorer's walk"),
    "infinite full strength": (_set("full", 0, np.inf), "full strengths"),
    "tail without scale": (_set("tail", (0, 1), 0.0), "tails need a positive scale"),
    "unsorted training scores": (_unsorted_scores, "not sorted finite values"),
    "column used twice": (_duplicate_columns, "do not cover each of the"),
}


def _threshold(value: float, **bands: float) -> Callable[[Metadata], None]:
    def edit(m: Metadata) -> None:
        m["threshold"]["value"] = value
        m["threshold"]["bands"] = {"low": value, "medium": value + 1, "high": value + 2, **bands}
        m["threshold"]["regimes"] = {}

    return edit


def _heldback_max(value: float, top: float) -> Callable[[Metadata], None]:
    def edit(m: Metadata) -> None:
        _threshold(value)(m)
        m["score_quantiles_heldback"]["max"] = top

    return edit


def _put(path: str, value: object) -> Callable[[Metadata], None]:
    def edit(m: Metadata) -> None:
        *parents, last = path.split(".")
        for key in parents:
            m = m[key]
        m[last] = value

    return edit


FORGED_METADATA: dict[str, tuple[Callable[[Metadata], None], str]] = {
    "NaN threshold": (_put("threshold.value", math.nan), "threshold.value is nan"),
    "infinite threshold": (_put("threshold.value", math.inf), "threshold.value is inf"),
    "negative threshold": (_threshold(-1.0), "threshold.value is -1.0"),
    "negative band": (_put("threshold.bands.low", -1.0), "must ascend from the threshold"),
    "infinite band": (_put("threshold.bands.high", math.inf), "threshold.bands.high is inf"),
    "bands out of order": (_put("threshold.bands.medium", 100.0), "must ascend"),
    "band missing": (_put("threshold.bands", {"low": 6.0}), "must name exactly low, medium"),
    "threshold above every held-back score": (_threshold(1e9), "above every held-back score"),
    "threshold the model can never reach": (_heldback_max(1e12, 2e12), "could never alert"),
    "NaN calibration span": (_put("threshold.heldback_days", math.nan), "heldback_days is nan"),
    "endless incidents": (_put("grouping.gap_s", 1e12), "grouping.gap_s is 1000000000000.0"),
    "zero explanation spread": (_put("feature_stats.rows_excess.spread", 0.0), "spread > 0"),
    "naive creation time": (_put("created_at", "2026-01-01T00:00:00"), "time zone"),
    "one feature short": (lambda m: m["features"].pop(), "distinct names, one per column"),
    "groups swapped": (
        lambda m: m["forest"]["groups"].update(
            access=m["forest"]["groups"]["hour"], hour=m["forest"]["groups"]["access"]
        ),
        "forest.groups does not name",
    ),
}


def _refused(version_dir: Path, **kwargs: object) -> store.Refused:
    with pytest.raises(store.Refused) as caught:
        store.load(version_dir, **kwargs)  # type: ignore[arg-type]
    return caught.value


# ------------------------------------------------------------------------- range checks
def test_the_shipped_model_passes_every_check() -> None:
    art = store.load(store.resolve(Path(__file__).resolve().parents[1] / "models" / "default"))
    assert art.forest.problem() is None
    assert all(f.problem() is None for f in art.forest.forests)
    assert art.checksum == store.sha256(art.path / store.SUMS)


@pytest.mark.parametrize("name", FORGED_ARRAYS)
def test_forged_forest_arrays_with_a_valid_sums_are_refused(tmp_path: Path, name: str) -> None:
    edit, expected = FORGED_ARRAYS[name]
    v1 = shipped_copy(tmp_path) / "v1"
    checksum = forge(v1, arrays=edit)
    store.verify(v1)  # the forgery passes the checksums: only the values give it away
    exc = _refused(v1)
    assert exc.reason == "invalid" and exc.checksum == checksum
    assert expected in str(exc) and str(v1 / "model.npz") in str(exc)
    assert "\n" not in str(exc)


@pytest.mark.parametrize("name", FORGED_METADATA)
def test_forged_metadata_with_a_valid_sums_is_refused(tmp_path: Path, name: str) -> None:
    edit, expected = FORGED_METADATA[name]
    v1 = shipped_copy(tmp_path) / "v1"
    checksum = forge(v1, metadata=edit)
    store.verify(v1)
    exc = _refused(v1)
    assert exc.reason == "invalid" and exc.checksum == checksum
    assert expected in str(exc) and str(v1 / "metadata.json") in str(exc)
    assert "\n" not in str(exc)


def test_a_model_file_that_inflates_past_the_limit_is_refused_unread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from detector.scoring import forest

    v1 = shipped_copy(tmp_path) / "v1"
    monkeypatch.setattr(forest, "MAX_ARRAY_BYTES", 1 << 20)  # the shipped model holds 1.7 MiB
    exc = _refused(v1)
    assert exc.reason == "invalid" and "bytes of arrays, more than 1,048,576" in str(exc)


# ------------------------------------------------------------------------------ signing
def test_a_signed_version_loads_under_its_key_only(tmp_path: Path) -> None:
    v1 = shipped_copy(tmp_path) / "v1"
    checksum = store.sign(v1, [KEY.encode()])
    assert (v1 / store.SIGNATURE).read_text().startswith("hmac-sha256 ")
    art = store.load(v1, keys=[KEY.encode()])
    assert art.checksum == checksum == hashlib.sha256((v1 / store.SUMS).read_bytes()).hexdigest()
    exc = _refused(v1, keys=[OTHER.encode()])
    assert exc.reason == "signature" and str(v1 / store.SIGNATURE) in str(exc)
    assert exc.checksum == checksum
    # a rotation: the new key signs, the old one still verifies what it signed
    assert store.load(v1, keys=[OTHER.encode(), KEY.encode()]).checksum == checksum


def test_an_unsigned_version_is_refused_while_a_key_is_configured(tmp_path: Path) -> None:
    v1 = shipped_copy(tmp_path) / "v1"
    store.load(v1)  # no key configured: the checksums and values decide
    exc = _refused(v1, keys=[KEY.encode()])
    assert exc.reason == "unsigned" and f"{v1 / store.SIGNATURE} is missing" in str(exc)


def test_a_plausible_forgery_of_a_signed_version_is_caught_by_the_signature(
    tmp_path: Path,
) -> None:
    """Declaring the thief's own work habitual passes every range check (it is a plausible
    model), so only the signature can refuse it."""
    v1 = shipped_copy(tmp_path) / "v1"
    store.sign(v1, [KEY.encode()])
    forge(v1, metadata=lambda m: m["habitual"].append(["thief", "10.9.9.9", "psql", "1"]))
    store.load(v1)  # without a key it would be served
    exc = _refused(v1, keys=[KEY.encode()])
    assert exc.reason == "signature" and "does not match SHA256SUMS" in str(exc)


def test_signing_refuses_what_it_cannot_vouch_for(tmp_path: Path) -> None:
    model_dir = shipped_copy(tmp_path, versions=2)
    forge(model_dir / "v1", metadata=_put("threshold.value", math.nan))
    with pytest.raises(store.Refused, match=r"threshold\.value is nan"):
        store.sign(model_dir / "v1", [KEY.encode()])
    assert not store.signed(model_dir / "v1")
    store.sign(model_dir / "v2", [OTHER.encode()])
    with pytest.raises(store.Refused, match="under the configured key") as caught:
        store.sign(model_dir / "v2", [KEY.encode()])
    assert caught.value.reason == "signature"


def test_promotion_validates_signs_and_refuses_a_forged_version(tmp_path: Path) -> None:
    model_dir = shipped_copy(tmp_path, versions=3)
    keys = [KEY.encode()]
    with pytest.raises(store.Refused, match="is missing"):
        store.promote(model_dir, "v2", keys=keys)
    checksum = store.promote(model_dir, "v2", keys=keys, sign_unsigned=True)
    assert store.aliases(model_dir) == {"current": "v2"}
    assert store.load(model_dir, keys=keys).checksum == checksum
    forge(model_dir / "v3", metadata=_threshold(1e9))
    with pytest.raises(store.Refused, match="above every held-back score"):
        store.promote(model_dir, "v3")
    assert store.aliases(model_dir) == {"current": "v2"}


def test_signing_keys_come_from_a_file_or_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    key_file = tmp_path / "model.key"
    key_file.write_text(f"{KEY}\n{OTHER}\n")
    assert config.Settings(model_signing_key_file=key_file).model_signing_keys() == (
        KEY.encode(),
        OTHER.encode(),
    )
    assert config.Settings().model_signing_keys() == ()
    toml = tmp_path / "exfilwatch.toml"
    toml.write_text('model_signing_key = "short"\n')
    with pytest.raises(ConfigError, match=r"model_signing_key: .*at least 32 characters") as bad:
        config.load(toml)
    assert "short" not in str(bad.value)  # the key itself is never echoed
    key_file.write_text("\n")
    with pytest.raises(ConfigError, match="holds no model-signing key"):
        config.Settings(model_signing_key_file=key_file).model_signing_keys()
    monkeypatch.setenv("EXFILWATCH_MODEL_SIGNING_KEY", KEY)
    assert config.Settings().model_signing_keys() == (KEY.encode(),)


# -------------------------------------------------------------------------- command line
def test_models_promote_signs_with_a_key_file_and_refuses_a_forgery(tmp_path: Path) -> None:
    model_dir = shipped_copy(tmp_path, versions=3)
    key_file = tmp_path / "model.key"
    key_file.write_text(KEY)
    root = str(model_dir.parent)
    run = exfilwatch(
        "models", "promote", "default", "v2", "--root", root, "--signing-key-file", str(key_file)
    )
    assert run.returncode == 0, run.stderr
    checksum = store.load(model_dir, keys=[KEY.encode()]).checksum
    assert f"default@current -> v2 (SHA256SUMS {checksum}, signed)" in run.stdout
    forge(model_dir / "v3", arrays=_cycle)
    run = exfilwatch(
        "models", "promote", "default", "v3", "--root", root, "--signing-key-file", str(key_file)
    )
    assert run.returncode == 2
    assert run.stderr.startswith("error: ") and run.stderr.count("error:") == 1
    assert str(model_dir / "v3" / "model.npz") in run.stderr and "earlier node" in run.stderr
    assert store.aliases(model_dir) == {"current": "v2"} and not store.signed(model_dir / "v3")


def test_train_signs_with_the_key_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sample = tmp_path / "sample"
    small_sample_cli(sample)
    monkeypatch.setenv("EXFILWATCH_MODEL_SIGNING_KEY", KEY)
    out = tmp_path / "models" / "small"
    args = (
        "train",
        "--input",
        str(sample / "events.parquet"),
        "--out",
        str(out),
        "--warmup-hours",
        "12",
        "--trees",
        "20",
    )
    for _ in range(2):
        run = exfilwatch(*args, "--promote")
        assert run.returncode == 0, run.stderr
        assert KEY not in run.stdout + run.stderr
    art = store.load(out, keys=[KEY.encode()])
    assert art.path.name == "v2" and f"signed (SHA256SUMS {art.checksum})" in run.stdout


# ---------------------------------------------------------------------------- the service
def test_every_refusal_reason_is_exported_from_the_start() -> None:
    metrics = Metrics()
    for reason in store.REASONS:
        labels = {"reason": reason}
        assert (
            metrics.registry.get_sample_value("exfilwatch_model_loads_refused_total", labels) == 0.0
        )
    assert metrics.registry.get_sample_value("exfilwatch_model_promotions_total") == 0.0


def _until(condition: Callable[[], bool], what: str) -> None:
    """Wait for something the service does on its own, checking often; fail after a minute."""
    tick = threading.Event()
    for _ in range(1200):
        if condition():
            return
        tick.wait(0.05)
    raise AssertionError(f"the service did not {what}")


@pytest.mark.parametrize(
    ("key", "reason"), [(None, "invalid"), (KEY, "signature")], ids=["no key", "signing key"]
)
def test_the_service_refuses_a_tampered_promotion_and_keeps_serving(
    tmp_path: Path, key: str | None, reason: str
) -> None:
    model_dir = shipped_copy(tmp_path, versions=2)
    if key is not None:
        store.sign(model_dir / "v1", [key.encode()])
        store.sign(model_dir / "v2", [key.encode()])
        # a plausible change: the signature is all that gives it away
        checksum = forge(model_dir / "v2", metadata=_put("habitual", [["thief", "", "", ""]]))
    else:
        checksum = forge(model_dir / "v2", metadata=_put("threshold.value", math.nan))
    settings = settings_for(tmp_path, model_dir.parent, model_signing_key=key)
    with capture_logs() as logs, running(settings) as service:
        assert service.scorer.artefact.path.name == "v1"
        (model_dir / "current").write_text("v2\n")  # the alias moved behind the API's back
        _until(
            lambda: metric(service, "exfilwatch_model_reloads_total", {"outcome": "failed"}) == 1,
            "give up on the tampered version",
        )
        assert service.scorer.artefact.path.name == "v1"
        assert metric(service, "exfilwatch_model_promotions_total") == 1
        assert metric(service, "exfilwatch_model_loads_refused_total", {"reason": reason}) == 1
        assert (
            metric(
                service,
                "exfilwatch_model_info",
                {
                    "name": "default",
                    "version": "v1",
                    "feature_spec": service.scorer.artefact.metadata["feature_spec_hash"][:12],
                },
            )
            == 1
        )
        assert service.health.sources_running and not service.health.problems
    promoted = [e for e in logs if e["event"] == "model_promoted"]
    refused = [e for e in logs if e["event"] == "model_load_refused"]
    assert [(e["version"], e["checksum"]) for e in promoted] == [("v2", checksum)]
    assert [(e["version"], e["reason"], e["checksum"]) for e in refused] == [
        ("v2", reason, checksum)
    ]


def test_the_service_will_not_start_on_an_unsigned_model_when_a_key_is_set(
    tmp_path: Path,
) -> None:
    model_dir = shipped_copy(tmp_path)
    settings = settings_for(tmp_path, model_dir.parent, model_signing_key=KEY)
    metrics = Metrics()
    from detector.live import Service

    service = Service(settings, metrics=metrics)
    try:
        with pytest.raises(store.Refused) as caught:
            service.start()
    finally:
        service.quarantine.close()
        service.store.engine.dispose()
    assert f"{model_dir / 'v1' / store.SIGNATURE} is missing" in str(caught.value)
    assert (
        metrics.registry.get_sample_value(
            "exfilwatch_model_loads_refused_total", {"reason": "unsigned"}
        )
        == 1
    )
    assert not service.health.model_loaded

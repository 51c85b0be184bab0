"""Snapshots are written off the scorer thread: scoring goes on while one is being written,
nothing is recorded before its files are complete, and a crash afterwards restores exactly the
state of batch scoring over the same events."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from detector import pipeline
from detector.features.engine import FeatureEngine, StateCopy
from detector.scoring import artefact
from detector.sinks import tables
from detector.sinks.store import Store
from detector.sources.files import read_events
from tests.service_support import metric, models_copy, running, settings_for


def _principal_state(engine: FeatureEngine) -> dict[str, np.ndarray]:
    return {
        name: np.concatenate([engine.state_[i], engine.highs_[i]])
        for name, i in engine.principals_.items()
    }


def test_scoring_goes_on_while_a_snapshot_is_written_and_a_crash_restores_exactly(
    tmp_path: Path, live_sample: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lines = (live_sample / "events.jsonl").read_bytes().splitlines(keepends=True)[:16000]
    models = models_copy(tmp_path)
    spool = tmp_path / "spool"
    spool.mkdir()
    # a snapshot is due at every housekeeping pass; the first one's write is held
    settings = settings_for(tmp_path, models, pipeline={"snapshot_every_s": 0.01})
    writing, release = threading.Event(), threading.Event()
    write = StateCopy.write

    def held(self: StateCopy, directory: Path) -> list[Path]:
        if not writing.is_set():
            writing.set()
            assert release.wait(120)
        return write(self, directory)

    monkeypatch.setattr(StateCopy, "write", held)
    (spool / "a.jsonl").write_bytes(b"".join(lines[:8000]))
    with running(settings) as service:
        assert service.wait_idle(timeout=120)
        assert writing.wait(120)
        scored = metric(service, "exfilwatch_events_scored_total")
        (spool / "b.jsonl").write_bytes(b"".join(lines[8000:]))
        assert service.wait_idle(timeout=120)
        # the second file was scored while the snapshot's write was held
        assert metric(service, "exfilwatch_events_scored_total") == scored + len(lines) - 8000
        assert service.store.latest_snapshot() is None  # nothing recorded before its files
        release.set()
        service.crash_for_tests()  # waits for the write, then stops as a kill would leave it
    engine = tables.create_engine(settings.store_url)
    snap = Store(engine).latest_snapshot()
    engine.dispose()
    # the restart goes through a snapshot written off the scorer thread, complete on disk
    assert snap is not None
    assert {p.name for p in Path(snap.path).iterdir()} == {"state.npz", "state.json"}
    with running(settings) as service:
        assert service.wait_idle(timeout=120)
        live_state = _principal_state(service.scorer.engine)
        live_seen = service.scorer.engine.events_seen_
    whole = tmp_path / "whole.jsonl"
    whole.write_bytes(b"".join(lines))
    batch = pipeline.Scorer(artefact.load(models / "default"), continue_state=True)
    batch.score(pl.concat(read_events([whole])))
    assert live_seen == batch.engine.events_seen_
    expected = _principal_state(batch.engine)
    assert live_state.keys() == expected.keys()
    for name, row in expected.items():
        np.testing.assert_allclose(live_state[name], row, rtol=1e-9, atol=1e-9, err_msg=name)

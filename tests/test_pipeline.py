"""The scoring stage end to end with the package's own test doubles."""

from __future__ import annotations

import numpy as np
import polars as pl

from detector.pipeline import Scorer
from detector.scoring import artefact as store
from detector.sources.files import read_events
from detector.testing import CollectingSink, ListSource
from tests.conftest import ROOT, SAMPLE


def test_micro_batches_score_like_one_batch() -> None:
    events = next(read_events([SAMPLE / "events.parquet"], batch_rows=3000))
    art = store.load(ROOT / "models" / "default")
    whole = Scorer(art).score(events)["anomaly_score"].to_numpy()
    scorer, sink = Scorer(art), CollectingSink()
    for batch in ListSource(events.iter_slices(n_rows=137)).batches():
        sink.write_batch(scorer.score(batch).select("db_user", "anomaly_score"))
    sink.close()
    parts = pl.concat(sink.batches)
    assert sink.closed and parts.height == events.height
    np.testing.assert_allclose(parts["anomaly_score"].to_numpy(), whole, rtol=0, atol=1e-12)
    assert parts["db_user"].to_list() == events["db_user"].to_list()


def test_anomalies_are_exactly_the_scored_rows_over_the_threshold() -> None:
    events = pl.concat(list(read_events([SAMPLE / "events.parquet"], batch_rows=50_000)))
    events = events.filter(
        pl.col("event_time") >= pl.col("event_time").max() - pl.duration(days=2)
    )  # the attack days
    art = store.load(ROOT / "models" / "default")
    full = Scorer(art, continue_state=False).score(events)
    scorer = Scorer(art, continue_state=False)
    hits = scorer.anomalies(events)
    expected = full.filter(pl.col("anomaly_score") >= scorer.threshold)
    assert hits.height == expected.height > 0
    assert hits.columns == expected.columns
    assert hits.drop("tables").equals(expected.drop("tables"))


def test_read_ahead_keeps_order_and_raises_where_the_failure_was() -> None:
    import threading

    import polars as pl
    import pytest

    from detector.pipeline import prefetched

    def frames(fail_at: int | None):
        for i in range(10):
            if i == fail_at:
                raise ValueError(f"broken at {i}")
            yield pl.DataFrame({"i": [i]})

    assert [f["i"][0] for f in prefetched(frames(None))] == list(range(10))
    got: list[int] = []

    def drain() -> None:
        for f in prefetched(frames(6)):
            got.append(f["i"][0])

    with pytest.raises(ValueError, match="broken at 6"):
        drain()
    assert got == list(range(6))
    before = threading.active_count()
    ahead = prefetched(frames(None))
    assert next(ahead)["i"][0] == 0
    ahead.close()  # abandoned: the reader thread ends
    assert threading.active_count() == before


def test_chained_read_ahead_abandoned_stops_every_thread() -> None:
    """Scoring chains two read-aheads (reading, then preparing); leaving the outer one early
    ends both threads, not only its own."""
    import threading

    from detector.pipeline import prefetched

    def frames():
        for i in range(100):
            yield pl.DataFrame({"i": [i]})

    before = threading.active_count()
    outer = prefetched(f.with_columns(j=pl.col("i") * 2) for f in prefetched(frames()))
    assert next(outer)["j"][0] == 0
    outer.close()
    assert threading.active_count() == before


def test_overlapped_batch_scoring_finds_what_one_pass_in_order_finds(tmp_path) -> None:
    """pipeline.score overlaps reading, preparing, the kernel and the forest across threads;
    its anomalies and incidents are those of one batch scored in order in this thread."""
    from detector.pipeline import score

    events = pl.concat(list(read_events([SAMPLE / "events.parquet"], batch_rows=50_000)))
    events = events.filter(pl.col("event_time") >= pl.col("event_time").max() - pl.duration(days=3))
    path = tmp_path / "days.parquet"
    events.write_parquet(path)
    art = store.load(ROOT / "models" / "default")
    report = score(ROOT / "models" / "default", [path], None, batch_rows=7_001, warmup_hours=0)
    one = Scorer(art, continue_state=report.continued_state)
    hits = one.anomalies(events)
    assert report.anomalies == hits.height > 0
    expected = one.incidents(hits)
    assert [i["id"] for i in report.incidents] == [i["id"] for i in expected]
    assert report.incidents == expected

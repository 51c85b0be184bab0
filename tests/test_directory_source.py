"""DirectorySource on its own: whole files, tailing under random writes, rotation, replay."""

from __future__ import annotations

import gzip
import io
import shutil
from pathlib import Path

import polars as pl
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from detector.quarantine import Quarantine
from detector.sources.directory import DirectorySource


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _lines(sample: Path, n: int) -> list[bytes]:
    with (sample / "events.jsonl").open("rb") as fh:
        return [next(fh) for _ in range(n)]


def _users(frames: list[pl.DataFrame]) -> list[str]:
    return [u for f in frames for u in f["db_user"].to_list()]


def _expected(lines: list[bytes]) -> list[str]:
    return [pl.read_ndjson(io.BytesIO(line))["db_user"][0] for line in lines]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_tailing_random_writes_emits_every_line_once_in_order(
    tmp_path_factory: pytest.TempPathFactory, live_sample: Path, data: st.DataObject
) -> None:
    lines = _lines(live_sample, 60)
    blob = b"".join(lines)
    cuts = sorted(data.draw(st.sets(st.integers(1, len(blob) - 1), max_size=12)))
    root = tmp_path_factory.mktemp("tail")
    clock = Clock()
    source = DirectorySource("t", root, clock=clock)
    target = root / "app.jsonl"
    reads = []
    restart_at = data.draw(st.integers(0, len(cuts)))
    for i, (lo, hi) in enumerate(zip([0, *cuts], [*cuts, len(blob)], strict=True)):
        with target.open("ab") as fh:
            fh.write(blob[lo:hi])
        reads += list(source.scan())
        if i == restart_at:  # a restart: a new source from the positions saved so far
            source = DirectorySource("t", root, clock=clock, positions=source.positions())
    reads += list(source.scan())
    assert _users([r.events for r in reads]) == _expected(lines)
    # every logged stretch reads back as the same events (the restart replay)
    for r in reads:
        if r.events.height:
            again = source.reread(r.log_entry())
            assert again["db_user"].to_list() == r.events["db_user"].to_list()


def test_whole_files_are_read_once_in_frames(tmp_path: Path, live_sample: Path) -> None:
    lines = _lines(live_sample, 300)
    (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress(b"".join(lines[:100])))
    (tmp_path / "b.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(b"".join(lines[100:200])))
    pl.read_ndjson(io.BytesIO(b"".join(lines[200:]))).write_parquet(tmp_path / "c.parquet")
    source = DirectorySource("s", tmp_path, read_events=40)
    reads = list(source.scan())
    assert sum(r.events.height for r in reads) == 300
    assert max(r.events.height for r in reads) <= 40
    assert all(p.get("done") for p in source.positions().values())
    assert list(source.scan()) == []  # done files are not read again
    again = DirectorySource("s", tmp_path, read_events=40, positions=source.positions())
    assert list(again.scan()) == []  # nor after a restart


def test_a_parquet_file_still_being_written_waits_then_an_unreadable_one_is_quarantined(
    tmp_path: Path, live_sample: Path
) -> None:
    whole = tmp_path / "whole.parquet"
    pl.read_parquet(live_sample / "events.parquet").head(500).write_parquet(whole)
    spool = tmp_path / "spool"
    spool.mkdir()
    half = whole.read_bytes()[: whole.stat().st_size // 2]
    (spool / "x.parquet").write_bytes(half)
    clock = Clock()
    q = Quarantine(tmp_path / "q.jsonl")
    rejected: list[pl.DataFrame] = []
    source = DirectorySource("s", spool, clock=clock, quarantine=q, on_reject=rejected.append)
    assert [r for r in source.scan() if r.events.height] == []
    shutil.copy(whole, spool / "x.parquet")  # the writer finishes
    assert sum(r.events.height for r in source.scan()) == 500
    (spool / "junk.parquet").write_bytes(b"PAR1 this is not parquet at all")
    assert [r.end.get("done") for r in source.scan()] == []  # not yet: it may still be written
    clock.now += 10  # still for longer than settle_s
    reads = list(source.scan())
    assert [r.end.get("done") for r in reads] == [True]
    q.close()
    assert "unreadable_file" in (tmp_path / "q.jsonl").read_text()
    assert sum(f.height for f in rejected) == 1


def test_inode_reuse_is_told_apart_by_the_head(tmp_path: Path, live_sample: Path) -> None:
    lines = _lines(live_sample, 20)
    target = tmp_path / "app.jsonl"
    target.write_bytes(b"".join(lines[:10]))
    source = DirectorySource("s", tmp_path)
    assert sum(r.events.height for r in source.scan()) == 10
    saved = source.positions()
    # the same inode now holds other content (truncated and rewritten, longer than before)
    with target.open("r+b") as fh:
        fh.truncate(0)
        fh.write(b"".join(lines[10:]) + b"".join(lines[10:]))
    fresh = DirectorySource("s", tmp_path, positions=saved)
    assert sum(r.events.height for r in fresh.scan()) == 20

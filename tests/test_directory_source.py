"""DirectorySource on its own: whole files, tailing under random writes, rotation, replay, and
audit logs whose statements the adapters hold back (bounded, never at the cost of a record)."""

from __future__ import annotations

import gzip
import io
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import orjson
import polars as pl
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from detector import formats
from detector.quarantine import Quarantine
from detector.schema import EVENT_SCHEMA
from detector.sources.directory import MAX_CHUNK, DirectorySource, Read
from detector.validation import REJECT_SCHEMA
from tests.auditlog import MariadbLog, PgLog, padded


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


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
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
    (tmp_path / "b.jsonl.zst").write_bytes(
        zstandard.ZstdCompressor().compress(b"".join(lines[100:200]))
    )
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


# ---------------------------------------------------------------- audit logs: hold-back bounds

A, B = "65f2ea10.2a", "65f2ea11.2b"  # two sessions: A logs little, B a lot
CONN_A, CONN_B = 41, 42
READ = "SELECT * FROM customers"
BIG = 100_000  # bytes of each large statement


def _audit_source(
    root: Path, log: PgLog | MariadbLog, clock: Clock, quarantine: Quarantine | None = None
) -> tuple[DirectorySource, list[pl.DataFrame]]:
    """The directory source as the service builds it for an audit-log directory."""
    make = formats.factory(log.adapter)
    rejected: list[pl.DataFrame] = []
    source = DirectorySource(
        "audit",
        root,
        make_feeder=lambda where, line: make(where, line, log.timezone, log.options),
        clock=clock,
        quarantine=quarantine,
        on_reject=rejected.append,
    )
    return source, rejected


def _events(reads: Iterable[Read]) -> pl.DataFrame:
    frames = [r.events for r in reads]
    return pl.concat(frames) if frames else pl.DataFrame(schema=EVENT_SCHEMA)


def _reads(events: pl.DataFrame) -> pl.DataFrame:
    return events.filter(pl.col("statement_text") == READ)


def _rejects(frames: list[pl.DataFrame]) -> pl.DataFrame:
    return pl.concat(frames) if frames else pl.DataFrame(schema=REJECT_SCHEMA)


def _log(kind: str) -> PgLog | MariadbLog:
    return MariadbLog() if kind == "mariadb" else PgLog(kind)


def _statement(
    log: PgLog | MariadbLog, who: str, text: str, tables: list[str], **kw: Any
) -> tuple[int, int]:
    if isinstance(log, MariadbLog):
        conn = CONN_A if who == A else CONN_B
        return log.statement(conn, text, [t.replace("public.", "saas.") for t in tables], **kw)
    kw.pop("query_line", None)
    return log.statement(who, text, tables, **kw)


def _end(log: PgLog | MariadbLog) -> None:
    """Session B disconnects: a last record after B's statements."""
    if isinstance(log, MariadbLog):
        log.disconnect(CONN_B)
    else:
        log.disconnect(B)


KINDS = ["jsonlog", "csvlog", "stderr", "mariadb"]


@pytest.mark.parametrize("kind", KINDS)
def test_an_idle_session_cannot_blind_the_reader_to_another_sessions_reads(
    tmp_path: Path, kind: str
) -> None:
    """Session A logs one statement (MariaDB: the table line of a query still running) and
    goes quiet; B alternates 100 KB statements with small reads, 10 MB in all. Every read is
    emitted while the writer is still busy, without waiting for the file to go still."""
    log = _log(kind)
    _statement(log, A, "SELECT * FROM accounts", ["public.accounts"], query_line=False)
    for _ in range(100):
        _statement(log, B, padded("SELECT * FROM orders", BIG), ["public.orders"])
        _statement(log, B, READ, ["public.customers"])
    _end(log)
    (tmp_path / "audit.log").write_bytes(log.data())
    assert len(log.data()) > 10_000_000
    clock = Clock()
    source, rejected = _audit_source(tmp_path, log, clock)
    busy = _events(source.scan())
    reads = _reads(busy)
    assert reads.height == 100 and reads["statement_id"].n_unique() == 100
    assert busy.height == 201  # A's statement too: held back only a bounded stretch
    assert (
        busy.filter(pl.col("session_id") == (str(CONN_A) if kind == "mariadb" else A)).height == 1
    )
    clock.now += 2  # the writer has paused: the last record (B's disconnection) is settled
    assert _events(source.scan()).height == 0
    assert _rejects(rejected).height == 0


@pytest.mark.parametrize("kind", KINDS)
def test_a_short_statement_before_large_ones_loses_no_record(tmp_path: Path, kind: str) -> None:
    """One short statement, then 100 statements of 100 KB over seven tables each: 701
    records, the text on every line as pgaudit logs it by default (MariaDB: seven table lines
    and the query line each)."""
    log = _log(kind)
    _statement(log, A, "SELECT 1 FROM accounts", ["public.accounts"], query_line=False)
    tables = [f"public.t{i}" for i in range(7)]
    for _ in range(100):
        _statement(log, B, padded("SELECT * FROM t0", BIG), tables)
    _end(log)
    (tmp_path / "audit.log").write_bytes(log.data())
    clock = Clock()
    source, rejected = _audit_source(tmp_path, log, clock)
    events = _events(source.scan())
    assert events.height == 101  # all while the writer is busy
    big = events.filter(pl.col("statement_text").str.starts_with("SELECT * FROM t0"))
    assert big.height == 100 and big["statement_id"].n_unique() == 100
    assert all(len(objects) == 7 for objects in big["objects"].to_list())
    assert _rejects(rejected).height == 0


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("pairs", [40, 100])  # the resent line in the same 8 MiB chunk, or later
def test_a_resent_line_is_one_counted_duplicate_and_stalls_nothing(
    tmp_path: Path, kind: str, pairs: int
) -> None:
    log = _log(kind)
    first, _ = _statement(log, A, "SELECT * FROM accounts", ["public.accounts"])
    _statement(log, A, "SELECT * FROM invoices", ["public.invoices"])
    for _ in range(pairs):
        _statement(log, B, padded("SELECT * FROM orders", BIG), ["public.orders"])
        _statement(log, B, READ, ["public.customers"])
    # a shipper sends A's first statement again (MariaDB: its query line)
    again = log.resend(first + 1 if kind == "mariadb" else first)
    for _ in range(20):
        _statement(log, B, READ, ["public.customers"])
    _end(log)
    path = tmp_path / "audit.log"
    path.write_bytes(log.data())
    clock = Clock()
    quarantine = Quarantine(tmp_path / "q.jsonl")
    source, rejected = _audit_source(tmp_path, log, clock, quarantine)
    events = _events(source.scan())
    assert _reads(events).height == pairs + 20
    assert events.height == 2 + 2 * pairs + 20
    assert events.select("session_id", "statement_id").is_unique().all()
    rejects = _rejects(rejected)
    assert rejects.select("location", "reason").rows() == [
        (f"{path}:{again}", "duplicate_statement")
    ]
    quarantine.close()
    quarantined = [orjson.loads(line) for line in (tmp_path / "q.jsonl").read_bytes().splitlines()]
    assert [(q["location"], q["reason"]) for q in quarantined] == [
        (f"{path}:{again}", "duplicate_statement")
    ]


@pytest.mark.parametrize("pairs", [40, 100])
def test_a_line_resent_while_its_session_is_quiet_is_taken_once(tmp_path: Path, pairs: int) -> None:
    """Nothing of A's session comes between A's statement and its resent line: the line is
    merged into the statement when both are read together, and rejected as a duplicate when
    the statement was emitted before; either way A's statement is one event and B's reads
    all come through."""
    log = PgLog("jsonlog")
    first, _ = log.statement(A, "SELECT * FROM accounts", ["public.accounts"])
    for _ in range(pairs):
        log.statement(B, padded("SELECT * FROM orders", BIG), ["public.orders"])
        log.statement(B, READ, ["public.customers"])
    again = log.resend(first)
    for _ in range(20):
        log.statement(B, READ, ["public.customers"])
    log.disconnect(B)
    path = tmp_path / "postgresql.json"
    path.write_bytes(log.data())
    source, rejected = _audit_source(tmp_path, log, Clock())
    events = _events(source.scan())
    assert events.filter(pl.col("session_id") == A)["statement_id"].to_list() == ["1.1"]
    assert _reads(events).height == pairs + 20
    rejects = _rejects(rejected)
    assert rejects.select("location", "reason").rows() in (
        [],
        [(f"{path}:{again}", "duplicate_statement")],
    )


@pytest.mark.parametrize("kind", ["jsonlog", "stderr"])
def test_only_a_record_longer_than_a_chunk_is_skipped(tmp_path: Path, kind: str) -> None:
    """A held statement, then one record longer than the 8 MiB a read takes, then more: the
    held statement is released, only the long record is skipped (one ``too_large`` at its
    line) and the lines after it keep their numbers."""
    log = PgLog(kind)
    log.statement(A, "SELECT * FROM accounts", ["public.accounts"])
    huge = log.statement(
        B, padded("SELECT * FROM orders", MAX_CHUNK + 1_000_000), ["public.orders"]
    )
    log.lines.append(b"not a log line\n")
    log.statement(B, READ, ["public.customers"])
    log.disconnect(B)
    path = tmp_path / "audit.log"
    path.write_bytes(log.data())
    clock = Clock()
    source, rejected = _audit_source(tmp_path, log, clock)
    events = _events(source.scan())
    assert events["statement_text"].to_list() == ["SELECT * FROM accounts", READ]
    rejects = _rejects(rejected)
    assert rejects.select("location", "reason").rows() == [
        (f"{path}:{huge[0]}", "too_large"),
        (
            f"{path} (resumed at line 3):1",
            "malformed_json" if kind == "jsonlog" else "malformed_line",
        ),
    ]


@pytest.mark.parametrize("kind", KINDS)
def test_a_statement_held_at_the_end_of_a_file_is_released_when_the_writer_pauses(
    tmp_path: Path, kind: str
) -> None:
    log = _log(kind)
    for _ in range(3):
        _statement(log, B, READ, ["public.customers"])
    _end(log)
    _statement(log, A, "SELECT * FROM accounts", ["public.accounts"], query_line=False)
    (tmp_path / "audit.log").write_bytes(log.data())
    clock = Clock()
    source, rejected = _audit_source(tmp_path, log, clock)
    assert _events(source.scan()).height == 3  # A's statement may still get lines
    clock.now += 0.5
    assert _events(source.scan()).height == 0
    clock.now += 1  # a second without growth: the writer has paused
    held = _events(source.scan())
    assert held["objects"].to_list() == [
        ["saas.accounts" if kind == "mariadb" else "public.accounts"]
    ]
    assert _rejects(rejected).height == 0


def test_an_unterminated_last_statement_is_released_at_the_end_of_the_file(tmp_path: Path) -> None:
    log = PgLog("jsonlog")
    log.statement(B, READ, ["public.customers"])
    log.disconnect(B)
    log.statement(A, "SELECT * FROM accounts", ["public.accounts"])
    (tmp_path / "postgresql.json").write_bytes(log.data()[:-1])  # no newline after the last
    clock = Clock()
    source, rejected = _audit_source(tmp_path, log, clock)
    assert _events(source.scan()).height == 1
    clock.now += 2  # paused, but the last line may still be completed
    assert _events(source.scan()).height == 0
    clock.now += 5  # still for settle_s: the file is complete
    assert _events(source.scan())["statement_text"].to_list() == ["SELECT * FROM accounts"]
    assert _rejects(rejected).height == 0

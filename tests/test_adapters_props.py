"""Property tests for every adapter: random and mutated input never raises, bad records are
quarantined with a reason, good records around them survive, and chunking changes nothing."""

from __future__ import annotations

import random
from typing import Any

import polars as pl
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from detector.adapters import ADAPTER_REASONS, ADAPTERS, make_adapter
from detector.adapters.synthetic import mariadb_log, pg_log
from detector.errors import UnknownNameError
from detector.schema import EVENT_SCHEMA
from detector.validation import REASONS, REJECT_SCHEMA

SAMPLES: dict[str, tuple[bytes, dict[str, Any]]] = {
    "pgaudit-jsonlog": (pg_log(400, "jsonlog", seed=3), {}),
    "pgaudit-csvlog": (pg_log(400, "csvlog", seed=3), {}),
    "pgaudit-stderr": (pg_log(400, "stderr", seed=3), {}),
    "mariadb-audit": (mariadb_log(300, seed=3), {"timezone": "UTC"}),
    "mariadb-syslog": (mariadb_log(300, seed=3, syslog=True), {"timezone": "UTC", "year": 2026}),
}
MUTATIONS = ("truncate", "quote", "utf8", "huge", "class", "garbage")


def _whole(name: str, data: bytes) -> Any:
    return make_adapter(name, location="f", **SAMPLES[name][1]).feed(data, final=True)


def _mutate(line: bytes, how: str, rng: random.Random) -> bytes:
    if how == "truncate":
        return line[: rng.randrange(1, max(2, len(line)))]
    if how == "quote":
        at = rng.randrange(len(line))
        return line[:at] + b'"' + line[at:]
    if how == "utf8":
        at = rng.randrange(len(line))
        return line[:at] + b"\xff\xfe" + line[at:]
    if how == "huge":
        return line.replace(b"SELECT", b"SELECT " + b"x" * 3_000_000, 1)
    if how == "class":
        return line.replace(b"READ", b"BOGUS", 1).replace(b",QUERY,", b",BOGUS,", 1)
    return bytes(rng.randrange(256) for _ in range(rng.randrange(1, 80)))


@pytest.mark.parametrize("name", list(ADAPTERS))
@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), how=st.sampled_from(MUTATIONS))
def test_mutated_line_is_quarantined_and_neighbours_survive(name: str, seed: int, how: str) -> None:
    rng = random.Random(seed)
    data = SAMPLES[name][0]
    lines = data.split(b"\n")[:-1]
    victim = rng.randrange(len(lines))
    mutated = [*lines[:victim], _mutate(lines[victim], how, rng), *lines[victim + 1 :]]
    parsed = _whole(name, b"\n".join(mutated) + b"\n")
    assert parsed.events.schema == pl.Schema(EVENT_SCHEMA)
    assert parsed.rejects.schema == pl.Schema(REJECT_SCHEMA)
    assert set(parsed.rejects["reason"]) <= set(REASONS) | set(ADAPTER_REASONS)
    # every event of the unmutated file is still emitted or accounted for by a reject (a
    # stderr session whose connection line broke has its events rejected as unknown principal)
    clean = _whole(name, data).events
    assert parsed.events.height + parsed.rejects.height >= clean.height - 1
    if how in ("utf8", "garbage", "class"):
        assert parsed.rejects.height >= 1 or parsed.events.height >= clean.height - 1


@pytest.mark.parametrize("name", list(ADAPTERS))
@settings(max_examples=20, deadline=None)
@given(blob=st.binary(max_size=2000))
@example(blob=b"null\n")  # Arrow's JSON reader crashes the process on a first value of null
def test_random_bytes_never_raise(name: str, blob: bytes) -> None:
    parser = make_adapter(name, location="f", **SAMPLES[name][1])
    first = parser.feed(blob)
    assert 0 <= first.consumed <= len(blob)
    last = parser.feed(blob[first.consumed :], final=True)
    assert last.consumed == len(blob) - first.consumed


@pytest.mark.parametrize("name", list(ADAPTERS))
@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000), idle=st.booleans())
def test_random_chunk_splits_give_identical_events(name: str, seed: int, idle: bool) -> None:
    data, options = SAMPLES[name]
    whole = _whole(name, data)
    rng = random.Random(seed)
    parser = make_adapter(name, location="f", **options)
    rest, frames, rejects, pos, skipped = b"", [], [], 0, 0
    while pos < len(data):
        step = rng.randrange(1, 4000)
        buffer = rest + data[pos : pos + step]
        pos += step
        parsed = parser.feed(buffer, idle=idle and rng.random() < 0.2 and buffer.endswith(b"\n"))
        frames.append(parsed.events)
        rejects.append(parsed.rejects)
        skipped += parsed.skipped
        rest = buffer[parsed.consumed :]
    last = parser.feed(rest, final=True)
    frames.append(last.events)
    rejects.append(last.rejects)
    merged = pl.concat(frames)
    if idle:  # a flush may split a statement: every statement still comes out, and a line
        # of a statement already emitted is rejected as such (MariaDB: its QUERY line makes
        # an event of its own)
        keys = ["session_id", "statement_id"]
        assert set(merged.select(keys).rows()) == set(whole.events.select(keys).rows())
        assert set(pl.concat(rejects)["reason"]) <= {"duplicate_statement"}
    else:
        assert merged.equals(whole.events)
        assert pl.concat(rejects).height == whole.rejects.height == 0
        assert skipped + last.skipped == whole.skipped


def test_unknown_adapter_name_lists_the_valid_ones() -> None:
    with pytest.raises(UnknownNameError, match="pgaudit-jsonlog"):
        make_adapter("oracle")


@pytest.mark.parametrize(
    ("prefix", "line"),
    [
        (
            "%m [%p] ",
            "2026-03-02 09:00:00.123 UTC [42] LOG:  AUDIT: SESSION,1,1,READ,SELECT,TABLE,public.t,select 1,<not logged>,1",
        ),
        (
            "%m %u %d [%p]: ",
            "2026-03-02 09:00:00.123 UTC ann saas [42]: LOG:  AUDIT: SESSION,1,1,READ,SELECT,TABLE,public.t,select 1,<not logged>,1",
        ),
        (
            "%t [%p]: [%l-1] user=%u,db=%d,app=%a,client=%h ",
            "2026-03-02 09:00:00 UTC [42]: [3-1] user=ann,db=saas,app=psql x,client=10.0.0.1 LOG:  AUDIT: SESSION,1,1,READ,SELECT,TABLE,public.t,select 1,<not logged>,1",
        ),
        (
            "%m %c %r %a: ",
            "2026-03-02 09:00:00.123 UTC 65f2ea10.2a 10.0.0.1(5544) my app: LOG:  AUDIT: SESSION,1,1,READ,SELECT,TABLE,public.t,select 1,<not logged>,1",
        ),
    ],
)
def test_log_line_prefixes(prefix: str, line: str) -> None:
    parsed = make_adapter("pgaudit-stderr", log_line_prefix=prefix).feed(
        (line + "\n").encode(), final=True
    )
    assert parsed.rejects.height == (0 if "%u" in prefix else 1)  # no user: unknown principal
    if "%u" in prefix:
        event = parsed.events.row(0, named=True)
        assert event["db_user"] == "ann" and event["objects"] == ["public.t"]
        assert event["rows_returned"] == 1


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=60))
def test_stderr_character_to_byte_offsets_agree_with_utf8(text: str) -> None:
    """The vectorised offsets for clean UTF-8 and the per-character ones give the byte offset
    of every character position."""
    from detector.adapters.pg_stderr import _byte_offsets

    raw = text.encode()
    fast, careful = _byte_offsets(text, raw, True), _byte_offsets(text, raw, False)
    for c in range(len(text) + 1):
        assert fast(c) == careful(c) == len(text[:c].encode())


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


_SESSIONS = ("65f2ea10.2a", "65f2ea11.2b", "65f2ea12.2c")
_SIZES = (60, 3_000, 250_000, 900_000, 900_000, 900_000)  # bytes of a statement's text


@pytest.mark.parametrize("kind", ["jsonlog", "csvlog", "stderr", "mariadb"])
@settings(
    max_examples=10,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_no_complete_record_is_lost_for_any_interleaving_of_sessions_and_sizes(
    tmp_path_factory: pytest.TempPathFactory, kind: str, data: st.DataObject
) -> None:
    """Statements of three sessions in any order, of any size up to 0.9 MB, over one to three
    tables, with pauses, appended to a file in random pieces and read by the directory source
    after each piece: every statement comes out once, whole, and nothing is rejected."""
    from detector import formats
    from detector.sources.directory import DirectorySource
    from tests.auditlog import MariadbLog, PgLog, padded

    plan = data.draw(
        st.lists(
            st.tuples(
                st.integers(0, len(_SESSIONS) - 1),
                st.sampled_from(_SIZES),
                st.integers(1, 3),
                st.sampled_from((0.0, 0.0, 0.0, 6.0)),
                st.booleans(),
            ),
            min_size=1,
            max_size=24,
        )
    )
    log = MariadbLog() if kind == "mariadb" else PgLog(kind)
    expected: dict[tuple[str, str], tuple[list[str], str | None]] = {}
    for n, (who, size, count, pause, flag) in enumerate(plan):
        log.advance(pause)
        text = padded(f"SELECT * FROM t{n}", size)
        tables = [f"t{n}_{i}" for i in range(count)]
        if isinstance(log, MariadbLog):  # flag: the query is still running (no QUERY line)
            log.statement(41 + who, text, [f"saas.{t}" for t in tables], query_line=not flag)
            key = (str(41 + who), str(log.query))
            expected[key] = ([f"saas.{t}" for t in tables], None if flag else text)
        else:  # flag: the text only on the first line (pgaudit.log_statement_once)
            log.statement(_SESSIONS[who], text, [f"public.{t}" for t in tables], text_once=flag)
            stmt = sum(1 for s, _ in expected if s == _SESSIONS[who]) + 1
            expected[(_SESSIONS[who], f"{stmt}.1")] = ([f"public.{t}" for t in tables], text)
    blob = log.data()
    cuts = sorted(data.draw(st.sets(st.integers(1, len(blob) - 1), max_size=5)))
    root = tmp_path_factory.mktemp("interleaved")
    make = formats.factory(log.adapter)
    clock, rejected = _Clock(), []
    source = DirectorySource(
        "audit",
        root,
        make_feeder=lambda where, line: make(where, line, log.timezone, log.options),
        clock=clock,
        on_reject=rejected.append,
    )
    frames = []
    for lo, hi in zip([0, *cuts], [*cuts, len(blob)], strict=True):
        with (root / "audit.log").open("ab") as fh:
            fh.write(blob[lo:hi])
        frames += [r.events for r in source.scan()]  # the writer is busy: nothing is idle
    clock.now += 2  # the writer pauses: what is still held is released
    frames += [r.events for r in source.scan()]
    events = pl.concat(frames)
    got = {
        (row["session_id"], row["statement_id"]): (row["objects"], row["statement_text"])
        for row in events.iter_rows(named=True)
    }
    assert events.height == len(expected)
    assert got == expected
    assert sum(f.height for f in rejected) == 0


@pytest.mark.parametrize("first", [b"null", b" null", b"\n\nnull", b"[1]", b"1"])
def test_a_jsonlog_chunk_that_begins_with_a_value_not_an_object_keeps_its_records(
    first: bytes,
) -> None:
    """A top-level null as the first value of a chunk took the process down inside Arrow's
    JSON reader (pyarrow 26); such a chunk is read line by line: the odd line is rejected, and
    every record after it is emitted."""
    data = SAMPLES["pgaudit-jsonlog"][0]
    clean = _whole("pgaudit-jsonlog", data)
    parsed = _whole("pgaudit-jsonlog", first + b"\n" + data)
    assert parsed.events.height == clean.events.height > 0
    assert parsed.rejects.height == clean.rejects.height + 1

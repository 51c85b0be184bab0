"""File readers and the quarantine: round trips, bad records, bad files, paths."""

from __future__ import annotations

import datetime as dt
import gzip
import io
import os
import random
import tempfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any
from unittest import mock

import orjson
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from polars.testing import assert_frame_equal

from detector import schema
from detector.errors import ConfigError, InputError
from detector.quarantine import MAX_RECORD_BYTES, NullQuarantine, Quarantine, redact_text
from detector.sources import files
from detector.sources.files import SUPPORTED_SUFFIXES, expand_paths, read_events

UTC = dt.UTC
BASE = dt.datetime(2024, 3, 1, tzinfo=UTC)
SECRET = "zqxSecretLiteral"
SECRET_NUMBER = "8675309"
SECRET_SQL = f"SELECT * FROM clients WHERE email = '{SECRET}@example.com' AND id = {SECRET_NUMBER}"


# --- making canonical rows and files --------------------------------------------------------


def canonical_rows(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """``n`` valid canonical rows (as polars would return them) with a mix of nulls."""
    rng = random.Random(seed)

    def maybe(value: Any) -> Any:
        return None if rng.random() < 0.2 else value

    rows = []
    for i in range(n):
        extra = maybe([{"key": "app_user", "value": f"u{i}"}, {"key": "pid", "value": str(i)}])
        rows.append(
            {
                "event_time": BASE + dt.timedelta(seconds=7 * i, microseconds=rng.randrange(10**6)),
                "db_user": f"user{rng.randrange(20)}",
                "action": rng.choice(schema.ACTIONS),
                "source_format": rng.choice(schema.SOURCE_FORMATS),
                "db_system": maybe(rng.choice(["postgresql", "mariadb"])),
                "tenant_id": maybe(f"t{rng.randrange(100)}"),
                "db_instance": maybe("db-1"),
                "db_name": maybe("app"),
                "client_ip": maybe(f"10.0.0.{rng.randrange(256)}"),
                "client_app": maybe("psql"),
                "session_id": maybe(f"s{i // 5}"),
                "statement_id": maybe(str(i)),
                "command": maybe("SELECT"),
                "objects": maybe(rng.choice([["public.accounts"], ["a.b", "c.d"], []])),
                "statement_text": maybe(f"SELECT * FROM accounts WHERE id = {i} -- ünïcode"),
                "rows_returned": maybe(rng.randrange(10**6)),
                "rows_affected": maybe(0),
                "bytes_scanned": maybe(rng.randrange(10**9)),
                "bytes_sent": maybe(rng.randrange(10**6)),
                "duration_ms": maybe(round(rng.uniform(0, 5000), 3)),
                "success": maybe(rng.random() < 0.9),
                "extra": rng.choice([extra, []]),
            }
        )
    return rows


def canonical_frame(rows: list[dict[str, Any]]) -> pl.DataFrame:
    return pl.DataFrame(rows, schema=schema.EVENT_SCHEMA)


def json_line(row: dict[str, Any], *, drop_nulls: bool = False) -> bytes:
    """One canonical row as a JSON line (``extra`` as an object; nulls optionally left out)."""
    out: dict[str, Any] = {}
    for key, value in row.items():
        if value is None and drop_nulls:
            continue
        if key == "event_time" and value is not None:
            value = value.isoformat().replace("+00:00", "Z")
        elif key == "extra" and value is not None:
            value = {pair["key"]: pair["value"] for pair in value}
        out[key] = value
    return orjson.dumps(out)


def compress(data: bytes, compression: str) -> bytes:
    if compression == ".gz":
        return gzip.compress(data)
    if compression == ".zst":
        return zstandard.ZstdCompressor().compress(data)
    return data


def write_jsonl(path: Path, lines: list[bytes], *, end: bytes = b"\n") -> Path:
    compression = next((c for c in (".gz", ".zst") if path.name.endswith(c)), "")
    path.write_bytes(compress(end.join(lines) + (end if lines else b""), compression))
    return path


def write_parquet(path: Path, table: pa.Table, *, row_group_size: int = 1_000_000) -> Path:
    sink = io.BytesIO()
    pq.write_table(table, sink, row_group_size=row_group_size)
    compression = next((c for c in (".gz", ".zst") if path.name.endswith(c)), "")
    path.write_bytes(compress(sink.getvalue(), compression))
    return path


def read_all(paths: Any, **kwargs: Any) -> pl.DataFrame:
    frames = list(read_events(paths, **kwargs))
    for frame in frames:
        assert frame.schema == pl.Schema(schema.EVENT_SCHEMA)
        assert frame.height > 0
    return pl.concat(frames) if frames else schema.empty_events()


def quarantined(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [orjson.loads(line) for line in path.read_bytes().splitlines()]


def where(entries: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(entry["location"], entry["reason"]) for entry in entries]


# --- round trips ----------------------------------------------------------------------------


@pytest.mark.parametrize("compression", ["", ".gz", ".zst"])
@pytest.mark.parametrize("suffix", [".jsonl", ".ndjson"])
def test_jsonl_round_trip(tmp_path: Path, suffix: str, compression: str) -> None:
    rows = canonical_rows(500, seed=1)
    lines = [json_line(r, drop_nulls=i % 2 == 0) for i, r in enumerate(rows)]
    path = write_jsonl(tmp_path / f"events{suffix}{compression}", lines)
    q = Quarantine(tmp_path / "q.jsonl")
    assert_frame_equal(read_all(path, quarantine=q, batch_rows=64), canonical_frame(rows))
    assert q.total == 0


@pytest.mark.parametrize("compression", ["", ".gz", ".zst"])
def test_parquet_round_trip(tmp_path: Path, compression: str) -> None:
    expected = canonical_frame(canonical_rows(500, seed=2))
    path = write_parquet(
        tmp_path / f"events.parquet{compression}", schema.to_arrow(expected), row_group_size=128
    )
    q = Quarantine(tmp_path / "q.jsonl")
    assert_frame_equal(read_all(path, quarantine=q, batch_rows=50), expected)
    assert q.total == 0


def test_batches_are_exactly_batch_rows_but_the_last(tmp_path: Path) -> None:
    rows = canonical_rows(1000, seed=3)
    jsonl = write_jsonl(tmp_path / "a.jsonl", [json_line(r) for r in rows])
    parquet = write_parquet(
        tmp_path / "b.parquet", schema.to_arrow(canonical_frame(rows)), row_group_size=300
    )
    for path in (jsonl, parquet):
        sizes = [frame.height for frame in read_events(path, batch_rows=64)]
        assert sizes == [64] * 15 + [40]


def test_crlf_bom_blank_lines_and_no_final_newline(tmp_path: Path) -> None:
    rows = canonical_rows(3, seed=4)
    body = b"\xef\xbb\xbf" + b"\r\n".join(
        [json_line(rows[0]), b"", b"   ", json_line(rows[1]), b"\t", json_line(rows[2])]
    )
    path = tmp_path / "a.jsonl"
    path.write_bytes(body)
    q = Quarantine(tmp_path / "q.jsonl")
    assert_frame_equal(read_all(path, quarantine=q), canonical_frame(rows))
    assert q.total == 0


@pytest.mark.parametrize(
    "name", ["e.jsonl", "e.jsonl.gz", "e.ndjson.zst", "e.parquet", "e.parquet.gz"]
)
def test_empty_files_yield_nothing(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_bytes(compress(b"", next((c for c in (".gz", ".zst") if name.endswith(c)), "")))
    assert list(read_events(path)) == []


def test_parquet_without_rows_yields_nothing(tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "e.parquet", schema.to_arrow(schema.empty_events()))
    assert list(read_events(path)) == []


# --- bad records in JSON lines --------------------------------------------------------------


def test_each_rejection_has_its_line_and_reason(tmp_path: Path) -> None:
    good = canonical_rows(4, seed=5)
    base = orjson.loads(json_line(good[0]))
    lines = [
        json_line(good[0]),  # 1
        b"this is not json",  # 2
        b"[1, 2, 3]",  # 3
        orjson.dumps({**base, "rows_returned": "many"}),  # 4
        orjson.dumps({**base, "event_time": "2024-03-01T10:00:00"}),  # 5
        orjson.dumps({**base, "action": "exfiltrate"}),  # 6
        b"",  # 7 blank: skipped
        json_line(good[1]),  # 8
        orjson.dumps({**base, "rows_returned": -4}),  # 9
        orjson.dumps({**base, "bytes_sent": schema.MAX_BYTES * 10}),  # 10
        orjson.dumps({k: v for k, v in base.items() if k != "db_user"}),  # 11
        b'{"db_user": "\xff\xfe"}',  # 12
        orjson.dumps({**base, "objects": "public.accounts"}),  # 13
        orjson.dumps({**base, "extra": ["not", "an", "object"]}),  # 14
        json_line(good[2])[:40],  # 15 truncated
        orjson.dumps({**base, "source_format": "csv"}),  # 16
        json_line(good[3]),  # 17
    ]
    path = write_jsonl(tmp_path / "mixed.jsonl", lines)
    q = Quarantine(tmp_path / "q.jsonl")
    frame = read_all(path, quarantine=q)
    assert_frame_equal(frame, canonical_frame([good[0], good[1], good[3]]))
    p = str(path)
    assert where(quarantined(q.path)) == [  # type: ignore[arg-type]
        (f"{p}:2", "malformed_json"),
        (f"{p}:3", "not_an_object"),
        (f"{p}:4", "bad_type"),
        (f"{p}:5", "naive_timestamp"),
        (f"{p}:6", "unknown_action"),
        (f"{p}:9", "negative_value"),
        (f"{p}:10", "absurd_value"),
        (f"{p}:11", "missing_field"),
        (f"{p}:12", "malformed_json"),
        (f"{p}:13", "bad_type"),
        (f"{p}:14", "bad_type"),
        (f"{p}:15", "malformed_json"),
        (f"{p}:16", "unknown_source_format"),
    ]
    assert q.counts["malformed_json"] == 3
    assert q.total == 13


def test_two_objects_on_a_line_next_to_a_blank_line(tmp_path: Path) -> None:
    rows = canonical_rows(3, seed=10)
    lines = [json_line(rows[0]) + json_line(rows[1]), b"", json_line(rows[2])]
    path = write_jsonl(tmp_path / "a.jsonl", lines)
    q = Quarantine(tmp_path / "q.jsonl")
    assert_frame_equal(read_all(path, quarantine=q), canonical_frame([rows[2]]))
    assert where(quarantined(tmp_path / "q.jsonl")) == [(f"{path}:1", "malformed_json")]


def test_naive_timestamps_read_with_default_zone(tmp_path: Path) -> None:
    line = b'{"event_time": "2024-07-01 12:00:00", "db_user": "a", "action": "read", "source_format": "canonical"}'
    path = write_jsonl(tmp_path / "a.jsonl", [line])
    q = NullQuarantine()
    assert read_all(path, quarantine=q).height == 0
    assert q.counts == {"naive_timestamp": 1}
    frame = read_all(path, default_tz="America/New_York")
    assert frame["event_time"].to_list() == [dt.datetime(2024, 7, 1, 16, tzinfo=UTC)]


def test_lenient_types_read_line_by_line(tmp_path: Path) -> None:
    base = {"event_time": "2024-03-01T00:00:00Z", "action": "read", "source_format": "canonical"}
    lines = [
        orjson.dumps({**base, "db_user": 42, "rows_returned": "12", "success": "TRUE"}),
        orjson.dumps({**base, "db_user": "b", "extra": {"n": 1.5, "o": {"x": [1]}, "z": None}}),
        orjson.dumps({**base, "db_user": "c", "unknown": {"any": "thing"}}),
    ]
    frame = read_all(write_jsonl(tmp_path / "a.jsonl", lines))
    assert frame["db_user"].to_list() == ["42", "b", "c"]
    assert frame["rows_returned"].to_list() == [12, None, None]
    assert frame["success"].to_list() == [True, None, None]
    assert frame["extra"][1].to_list() == [
        {"key": "n", "value": "1.5"},
        {"key": "o", "value": '{"x":[1]}'},
    ]


def test_overlong_line_is_rejected_and_reading_goes_on(tmp_path: Path) -> None:
    rows = canonical_rows(3, seed=6)
    huge = b'{"statement_text": "' + b"9" * 5000 + b'"}'
    path = write_jsonl(tmp_path / "a.jsonl", [json_line(rows[0]), huge, json_line(rows[1]), huge])
    path.write_bytes(path.read_bytes() + json_line(rows[2]))
    q = Quarantine(tmp_path / "q.jsonl")
    limits: dict[str, Any] = {"MAX_LINE_BYTES": 1000, "_FIRST_BLOCK": 256, "_MIN_BLOCK": 128}
    with mock.patch.multiple(files, **limits):
        frame = read_all(path, quarantine=q, batch_rows=1)
    assert_frame_equal(frame, canonical_frame(rows))
    assert where(quarantined(tmp_path / "q.jsonl")) == [
        (f"{path}:2", "too_large"),
        (f"{path}:4", "too_large"),
    ]
    assert "9999" not in (tmp_path / "q.jsonl").read_text()


def test_runs_stay_bounded(tmp_path: Path) -> None:
    lines = [json_line(r) for r in canonical_rows(400, seed=7)]
    path = write_jsonl(tmp_path / "a.jsonl.zst", lines)
    longest = max(len(line) for line in lines) + 1
    limits: dict[str, Any] = {"_FIRST_BLOCK": 1024, "_MIN_BLOCK": 1024, "_MAX_BLOCK": 4096}
    with mock.patch.multiple(files, **limits), files._opened(path, ".zst") as stream:
        runs = list(files._LineReader(stream, str(path), batch_rows=1000))
    ends = [run.end for run in runs if isinstance(run, files._Lines)]
    assert len(ends) > 10
    assert max(ends) <= 4096 + longest
    assert sum(run.count for run in runs if isinstance(run, files._Lines)) == 400


# --- hypothesis: good records around garbage --------------------------------------------------

_TEXT = st.text(st.characters(exclude_categories=["Cs"]), max_size=12)
_NAME = st.text("abcdefghijklmnopqrstuvwxyz0123456789_.", min_size=1, max_size=10)


@st.composite
def valid_rows(draw: st.DrawFn) -> dict[str, Any]:
    """A canonical row (polars values) drawn by hypothesis."""
    moment = draw(st.datetimes(dt.datetime(1990, 1, 1), dt.datetime(2090, 1, 1)))  # noqa: DTZ001
    extra = draw(st.none() | st.dictionaries(_NAME, _TEXT, max_size=3))
    count = st.none() | st.integers(0, schema.MAX_ROWS)
    return {
        "event_time": moment.replace(tzinfo=UTC),
        "db_user": draw(_NAME),
        "action": draw(st.sampled_from(schema.ACTIONS)),
        "source_format": draw(st.sampled_from(schema.SOURCE_FORMATS)),
        **{c: draw(st.none() | _TEXT) for c in ("db_system", "tenant_id", "client_ip")},
        "objects": draw(st.none() | st.lists(_NAME, max_size=3)),
        "statement_text": draw(st.none() | _TEXT | st.just(SECRET_SQL)),
        "rows_returned": draw(count),
        "bytes_sent": draw(st.none() | st.integers(0, schema.MAX_BYTES)),
        "duration_ms": draw(st.none() | st.floats(0, schema.MAX_DURATION_MS)),
        "success": draw(st.none() | st.booleans()),
        "extra": None
        if extra is None
        else [{"key": k, "value": v} for k, v in sorted(extra.items())],
    }


def _wrong(line: bytes, key: str, value: Any) -> bytes:
    return orjson.dumps({**orjson.loads(line), key: value})


def _with_raw(line: bytes, key: str, raw: bytes) -> bytes:
    """The line's object with ``key`` set to raw (possibly non-standard) JSON text."""
    fields = {k: v for k, v in orjson.loads(line).items() if k != key}
    return orjson.dumps(fields)[:-1] + b',"' + key.encode() + b'":' + raw + b"}"


_BREAKERS: list[tuple[str, Callable[[bytes, st.DrawFn], bytes]]] = [
    ("malformed_json", lambda line, draw: line + draw(st.sampled_from([b"", b" ", b"\t"])) + line),
    (
        "bad_type",
        lambda line, draw: _with_raw(
            line, "duration_ms", draw(st.sampled_from([b"NaN", b"-Infinity"]))
        ),
    ),
    ("malformed_json", lambda line, draw: line[: draw(st.integers(1, len(line) - 1))]),
    (
        "bad_type",
        lambda line, draw: _wrong(
            line, "rows_returned", draw(st.sampled_from(["x", 1.5, True, [1]]))
        ),
    ),
    (
        "bad_type",
        lambda line, draw: _wrong(line, "objects", draw(st.sampled_from(["t", [1], {"a": 1}]))),
    ),
    ("bad_type", lambda line, draw: _wrong(line, "extra", draw(st.sampled_from(["t", [1], 3])))),
    ("naive_timestamp", lambda line, draw: _wrong(line, "event_time", "2024-01-01T00:00:00")),
    ("unknown_action", lambda line, draw: _wrong(line, "action", "steal")),
    ("negative_value", lambda line, draw: _wrong(line, "rows_affected", -draw(st.integers(1, 99)))),
    (
        "not_an_object",
        lambda line, draw: draw(st.sampled_from([b"[]", b"3", b'"x"', b"null", b"true"])),
    ),
    (
        "malformed_json",
        lambda line, draw: b'{"db_user": "' + draw(st.sampled_from([b"\xff", b"\xc3("])) + b'"}',
    ),
    (
        "malformed_json",
        lambda line, draw: b"SELECT " + draw(st.binary(max_size=20)).replace(b"\n", b""),
    ),
]


@st.composite
def mixed_files(draw: st.DrawFn) -> tuple[list[bytes], list[dict[str, Any]], dict[int, str]]:
    """Lines of a file; the good rows in order; line number -> expected reason."""
    lines: list[bytes] = []
    good: list[dict[str, Any]] = []
    bad: dict[int, str] = {}
    for _ in range(draw(st.integers(0, 40))):
        row = draw(valid_rows())
        line = json_line(row, drop_nulls=draw(st.booleans()))
        kind = draw(st.sampled_from(["good", "good", "odd", "blank", *range(len(_BREAKERS))]))
        if kind == "good":
            good.append(row)
        elif kind == "odd":  # non-standard JSON in a field nobody reads: still a good record
            line = _with_raw(line, "zz_unknown", draw(st.sampled_from([b"NaN", b"Infinity"])))
            good.append(row)
        elif kind == "blank":
            line = draw(st.sampled_from([b"", b" ", b"\t", b"\r"]))
        else:
            reason, breaker = _BREAKERS[int(kind)]
            line = breaker(line, draw)
            bad[len(lines) + 1] = reason
        lines.append(line)
    return lines, good, bad


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    mixed_files(),
    st.integers(1, 7),
    st.sampled_from([1, 2, 16]),
    st.sampled_from([300, 4 << 20]),
    st.sampled_from(["", ".gz"]),
)
def test_good_lines_survive_any_garbage(
    case: tuple[list[bytes], list[dict[str, Any]], dict[int, str]],
    batch_rows: int,
    leaf_lines: int,
    span_bytes: int,
    compression: str,
) -> None:
    lines, good, bad = case
    sizes: dict[str, Any] = {"_LEAF_LINES": leaf_lines, "_SPAN_BYTES": span_bytes}
    with tempfile.TemporaryDirectory() as tmp, mock.patch.multiple(files, **sizes):
        path = write_jsonl(Path(tmp) / f"mixed.jsonl{compression}", lines)
        q = Quarantine(Path(tmp) / "q.jsonl")
        frame = read_all(path, quarantine=q, batch_rows=batch_rows)
        entries = quarantined(Path(tmp) / "q.jsonl")
        text = (Path(tmp) / "q.jsonl").read_text() if entries else ""
    assert_frame_equal(frame, canonical_frame(good) if good else schema.empty_events())
    assert where(entries) == [(f"{path}:{n}", reason) for n, reason in sorted(bad.items())]
    assert SECRET not in text
    assert SECRET_NUMBER not in text


# --- Parquet specifics ----------------------------------------------------------------------


def test_parquet_rejects_per_row_with_row_group_locations(tmp_path: Path) -> None:
    rows = canonical_rows(10, seed=8)
    table = schema.to_arrow(canonical_frame(rows))
    counts = pa.array(
        [str(r["rows_returned"]) if r["rows_returned"] is not None else None for r in rows]
    )
    counts = pa.array([*counts.to_pylist()[:6], "lots", *counts.to_pylist()[7:]])
    actions = pa.array(
        [*table.column("action").to_pylist()[:3], "steal", *table.column("action").to_pylist()[4:]]
    )
    table = table.set_column(table.schema.get_field_index("rows_returned"), "rows_returned", counts)
    table = table.set_column(table.schema.get_field_index("action"), "action", actions)
    table = table.append_column("unknown", pa.array(range(10)))
    path = write_parquet(tmp_path / "a.parquet", table, row_group_size=4)
    q = Quarantine(tmp_path / "q.jsonl")
    frame = read_all(path, quarantine=q, batch_rows=3)
    assert_frame_equal(frame, canonical_frame([r for i, r in enumerate(rows) if i not in (3, 6)]))
    assert where(quarantined(tmp_path / "q.jsonl")) == [
        (f"{path}:0:3", "unknown_action"),
        (f"{path}:1:2", "bad_type"),
    ]


def test_parquet_timestamps(tmp_path: Path) -> None:
    base = {"db_user": ["a", "b"], "action": ["read"] * 2, "source_format": ["canonical"] * 2}
    stamps = [dt.datetime(2024, 1, 1, 9), dt.datetime(2024, 1, 1, 10)]  # noqa: DTZ001
    zoned = pa.array(stamps, pa.timestamp("ns", tz="+09:00"))
    path = write_parquet(tmp_path / "z.parquet", pa.table({**base, "event_time": zoned}))
    assert read_all(path)["event_time"].to_list() == [
        dt.datetime(2024, 1, 1, 9, tzinfo=UTC),
        dt.datetime(2024, 1, 1, 10, tzinfo=UTC),
    ]
    naive = pa.array(stamps, pa.timestamp("ms"))
    path = write_parquet(tmp_path / "n.parquet", pa.table({**base, "event_time": naive}))
    q = NullQuarantine()
    assert read_all(path, quarantine=q).height == 0
    assert q.counts == {"naive_timestamp": 2}
    assert read_all(path, default_tz="Asia/Tokyo")["event_time"].to_list() == [
        dt.datetime(2024, 1, 1, 0, tzinfo=UTC),
        dt.datetime(2024, 1, 1, 1, tzinfo=UTC),
    ]


def test_parquet_odd_column_types_are_judged_per_row(tmp_path: Path) -> None:
    table = pa.table(
        {
            "event_time": ["2024-01-01T00:00:00Z"] * 3,
            "db_user": ["a", "b", "c"],
            "action": ["read"] * 3,
            "source_format": ["canonical"] * 3,
            "db_name": pa.array(["x", "y", "z"]).dictionary_encode(),
            "objects": pa.array([[1], None, None], pa.list_(pa.int32())),
            "rows_returned": pa.array([b"\x01", None, None], pa.binary()),
            "bytes_sent": pa.array([1.0, 2.5, 3.0], pa.float32()),
            "duration_ms": pa.array([1, 2, 3], pa.decimal128(10, 2)),
        }
    )
    path = write_parquet(tmp_path / "odd.parquet", table)
    q = Quarantine(tmp_path / "q.jsonl")
    frame = read_all(path, quarantine=q)
    assert frame.select("db_user", "db_name", "bytes_sent", "duration_ms").rows() == [
        ("c", "z", 3, 3.0)
    ]
    entries = quarantined(tmp_path / "q.jsonl")
    assert where(entries) == [(f"{path}:0:0", "bad_type"), (f"{path}:0:1", "bad_type")]
    assert entries[0]["record"]["rows_returned"] == "<Binary>"


def test_parquet_missing_required_column(tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "a.parquet", pa.table({"db_user": ["a", "b"]}))
    q = NullQuarantine()
    assert list(read_events(path, quarantine=q)) == []
    assert q.counts == {"missing_field": 2}


# --- paths ----------------------------------------------------------------------------------


def touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def test_directory_expansion_is_recursive_sorted_and_filtered(tmp_path: Path) -> None:
    expected = [
        touch(tmp_path / "a.jsonl"),
        touch(tmp_path / "b" / "c.parquet.zst"),
        touch(tmp_path / "b" / "d.NDJSON.gz"),
        touch(tmp_path / "e.parquet"),
    ]
    touch(tmp_path / "notes.txt")
    touch(tmp_path / ".hidden.jsonl")
    touch(tmp_path / ".cache" / "f.jsonl")
    assert expand_paths(tmp_path) == expected
    assert expand_paths([str(tmp_path), tmp_path / "a.jsonl"]) == expected


def test_glob_expansion(tmp_path: Path) -> None:
    a = touch(tmp_path / "x" / "a.jsonl")
    b = touch(tmp_path / "y" / "b.jsonl.gz")
    touch(tmp_path / "y" / "c.csv")
    assert expand_paths(str(tmp_path / "*" / "*")) == [a, b]
    assert expand_paths(str(tmp_path / "**" / "*.jsonl*")) == [a, b]
    with pytest.raises(InputError, match=r"\*\.parquet"):
        expand_paths(str(tmp_path / "*.parquet"))


def test_unknown_extension_lists_supported_ones(tmp_path: Path) -> None:
    path = touch(tmp_path / "events.csv")
    with pytest.raises(InputError) as caught:
        list(read_events(path))
    assert "events.csv" in str(caught.value)
    assert all(suffix in str(caught.value) for suffix in SUPPORTED_SUFFIXES)


def test_nothing_matched(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"missing.jsonl"):
        expand_paths(tmp_path / "missing.jsonl")
    with pytest.raises(InputError, match="no supported files"):
        expand_paths(touch(tmp_path / "d" / "x.txt").parent)
    with pytest.raises(InputError):
        expand_paths([])


# --- unreadable files -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("bad.jsonl.gz", b"this is not gzip at all"),
        ("bad.jsonl.zst", b"this is not zstd at all"),
        ("bad.parquet", b"PAR? not really parquet"),
        ("bad.parquet.gz", gzip.compress(b"plain text, not parquet")),
    ],
)
def test_unreadable_file_is_one_input_error_naming_it(
    tmp_path: Path, name: str, content: bytes
) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(InputError) as caught:
        list(read_events(path))
    assert name in str(caught.value)


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root reads anything")
def test_permission_denied(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "a.jsonl", [json_line(canonical_rows(1)[0])])
    path.chmod(0)
    with pytest.raises(InputError, match=r"a.jsonl"):
        list(read_events(path))


def test_truncated_gzip_keeps_earlier_rows_and_skip_goes_on(tmp_path: Path) -> None:
    rows = canonical_rows(3000, seed=9)
    whole = write_jsonl(tmp_path / "a.jsonl.gz", [json_line(r) for r in rows])
    whole.write_bytes(whole.read_bytes()[:-2000])
    bad_parquet = tmp_path / "b.parquet"
    bad_parquet.write_bytes(b"nope")
    last = write_jsonl(tmp_path / "c.jsonl", [json_line(r) for r in rows[:5]])
    with pytest.raises(InputError, match=r"a\.jsonl\.gz"):
        list(read_events([whole, bad_parquet, last]))
    q = Quarantine(tmp_path / "q.jsonl")
    small: dict[str, Any] = {"_FIRST_BLOCK": 4096, "_MIN_BLOCK": 4096, "_MAX_BLOCK": 8192}
    with mock.patch.multiple(files, **small):
        frame = read_all([whole, bad_parquet, last], quarantine=q, on_error="skip", batch_rows=7)
    readable = zlib.decompressobj(wbits=31).decompress(whole.read_bytes())
    kept = readable.count(b"\n")  # every line read whole before the break comes through
    assert 1000 < kept < 3000
    assert_frame_equal(frame.head(frame.height - 5), canonical_frame(rows[:kept]))
    assert_frame_equal(frame.tail(5), canonical_frame(rows[:5]))
    assert where(quarantined(tmp_path / "q.jsonl")) == [
        (str(whole), "unreadable_file"),
        (str(bad_parquet), "unreadable_file"),
    ]


def test_bad_arguments() -> None:
    with pytest.raises(ConfigError, match="on_error"):
        list(read_events("x.jsonl", on_error="ignore"))
    with pytest.raises(ValueError, match="batch_rows"):
        list(read_events("x.jsonl", batch_rows=0))
    with pytest.raises(ConfigError, match="Nowhere"):
        list(read_events("x.jsonl", default_tz="Nowhere/Land"))


# --- quarantine -----------------------------------------------------------------------------


def rejects_frame(*records: tuple[str, str, str, str | None]) -> pl.DataFrame:
    return pl.DataFrame(records, schema=["location", "reason", "detail", "record"], orient="row")


def test_quarantine_is_lazy_appends_and_counts(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "q.jsonl"
    clock = mock.Mock(return_value=dt.datetime(2024, 5, 1, 12, tzinfo=UTC))
    q = Quarantine(path, clock=clock)
    q.write(rejects_frame())
    assert not path.exists()
    q.write(rejects_frame(("f:1", "bad_type", "x", '{"a": 1}'), ("f:2", "bad_type", "y", None)))
    assert len(quarantined(path)) == 2  # flushed without close
    q.close()
    with Quarantine(path, clock=clock) as again:
        again.write_raw("f:3", "malformed_json", "nope", b"garbage 42")
    entries = quarantined(path)
    assert entries[0] == {
        "time": "2024-05-01T12:00:00Z",
        "location": "f:1",
        "reason": "bad_type",
        "detail": "x",
        "record": {"a": 1},
    }
    assert entries[1]["record"] is None
    assert entries[2]["record"] == "garbage ?"
    assert (q.counts, q.total) == ({"bad_type": 2}, 2)


def test_quarantine_redacts_and_truncates(tmp_path: Path) -> None:
    q = Quarantine(tmp_path / "q.jsonl")
    big = {"statement_text": SECRET_SQL, "db_user": "a" * (2 * MAX_RECORD_BYTES)}
    q.write(
        rejects_frame(
            ("f:1", "bad_type", "d", orjson.dumps({"statement_text": SECRET_SQL}).decode()),
            ("f:2", "too_large", "d", orjson.dumps(big).decode()),
            ("f:3", "malformed_json", "d", SECRET_SQL + " {"),
        )
    )
    q.write_raw("f:4", "malformed_json", "d", (SECRET_SQL + "; ") * 2000)
    text = (tmp_path / "q.jsonl").read_text()
    assert SECRET not in text
    assert SECRET_NUMBER not in text
    entries = quarantined(tmp_path / "q.jsonl")
    assert entries[0]["record"]["statement_text"].endswith("email = ? AND id = ?")
    assert entries[1]["truncated"] is True
    assert len(entries[1]["record"].encode()) <= MAX_RECORD_BYTES
    assert entries[3]["truncated"] is True


@pytest.mark.parametrize(
    "text",
    [
        # a quote in another field must not pair with the statement's quotes
        (orjson.dumps({"statement_text": SECRET_SQL, "extra": {"k": "'_"}}) * 2).decode(),
        orjson.dumps({"a": "it's", "statement_text": SECRET_SQL}).decode()[:-30],
        '{"statement_text": "select \\u0027' + SECRET + "\\u0027, " + SECRET_NUMBER,
        f"not json at all: {SECRET_SQL}",
    ],
)
def test_redact_text_keeps_no_literal(text: str) -> None:
    redacted = redact_text(text)
    assert SECRET not in redacted
    assert SECRET_NUMBER not in redacted


def test_null_quarantine_only_counts(tmp_path: Path) -> None:
    q = NullQuarantine()
    q.write(rejects_frame(("f:1", "bad_type", "x", "{}")))
    q.write_raw("f:2", "malformed_json", "x", "text")
    assert q.counts == {"bad_type": 1, "malformed_json": 1}
    assert q.total == 2
    assert q.path is None

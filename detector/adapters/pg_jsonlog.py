"""PostgreSQL 15+ ``jsonlog`` (one JSON object per line) with pgaudit messages.

Whole spans of lines are decoded by Arrow's JSON reader against a fixed schema; a span that
fails (a bad line, an odd type, invalid UTF-8) is decoded line by line with orjson, so a bad
line is rejected on its own and costs its neighbours only speed.
"""

from __future__ import annotations

from typing import Any, Final

import numpy as np
import orjson
import polars as pl
import pyarrow as pa
import pyarrow.json as pj

from detector.adapters.base import RejectList, line_bounds, newline_positions, starts_with_object
from detector.adapters.pgaudit import RecordParser, empty_records

_FIELDS: Final = {
    "timestamp": ("time", pa.string()),
    "user": ("user", pa.string()),
    "dbname": ("db", pa.string()),
    "pid": ("pid", pa.int64()),
    "session_id": ("session", pa.string()),
    "remote_host": ("host", pa.string()),
    "application_name": ("app", pa.string()),
    "error_severity": ("severity", pa.string()),
    "message": ("message", pa.string()),
}
_SCHEMA: Final = pa.schema([(k, t) for k, (_, t) in _FIELDS.items()])
_PARSE: Final = pj.ParseOptions(explicit_schema=_SCHEMA, unexpected_field_behavior="ignore")
_SPAN_LINES: Final = 16_384
_RENAME: Final = {k: v for k, (v, _) in _FIELDS.items()}


class PgJsonlogParser(RecordParser):
    """Incremental parser of a PostgreSQL jsonlog stream (see :mod:`detector.adapters`)."""

    name = "pgaudit-jsonlog"

    def _records(
        self, data: bytes, end: int, final: bool, rejects: RejectList
    ) -> tuple[pl.DataFrame, int]:
        """Every line up to ``end`` is one complete record."""
        if end == 0:
            return empty_records(), 0
        starts, ends = line_bounds(newline_positions(data[:end]), 0, end)
        numbers = np.arange(len(starts), dtype=np.int64) + self._lines.line
        frames: list[pl.DataFrame] = []
        for i in range(0, len(starts), _SPAN_LINES):
            sl = slice(i, i + _SPAN_LINES)
            frames.append(self._span(data, starts[sl], ends[sl], numbers[sl], rejects))
        return (pl.concat(frames, how="vertical_relaxed") if frames else empty_records()), end

    def _span(
        self,
        data: bytes,
        starts: np.ndarray,
        ends: np.ndarray,
        numbers: np.ndarray,
        rejects: RejectList,
    ) -> pl.DataFrame:
        blank = (ends - starts) <= 1
        if blank.any():
            stripped = [not data[s:e].strip() for s, e in zip(starts, ends, strict=True)]
            blank = np.array(stripped, dtype=bool)
        lo, hi = int(starts[0]), int(ends[-1])
        if not starts_with_object(memoryview(data)[lo:hi]):  # e.g. a "null" line first
            return self._line_by_line(data, starts, ends, numbers, rejects)
        try:
            data[lo:hi].decode()  # Arrow's reader does not check UTF-8; orjson does
        except UnicodeDecodeError:
            return self._line_by_line(data, starts, ends, numbers, rejects)
        try:
            options = pj.ReadOptions(use_threads=False, block_size=max(hi - lo + 1, 1 << 16))
            table = pj.read_json(pa.py_buffer(data[lo:hi]), options, _PARSE)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            return self._line_by_line(data, starts, ends, numbers, rejects)
        keep = ~blank
        if table.num_rows != int(keep.sum()):
            return self._line_by_line(data, starts, ends, numbers, rejects)
        frame = pl.from_arrow(table)
        assert isinstance(frame, pl.DataFrame)
        return frame.rename(_RENAME).select(
            pl.Series("_start", starts[keep], dtype=pl.Int64),
            pl.Series("_line", numbers[keep], dtype=pl.Int64),
            *_record_columns(),
        )

    def _line_by_line(
        self,
        data: bytes,
        starts: np.ndarray,
        ends: np.ndarray,
        numbers: np.ndarray,
        rejects: RejectList,
    ) -> pl.DataFrame:
        rows: list[dict[str, Any]] = []
        where = self.options.name
        for start, stop, number in zip(
            starts.tolist(), ends.tolist(), numbers.tolist(), strict=True
        ):
            raw = data[start:stop]
            if not raw.strip():
                continue
            try:
                value = orjson.loads(raw)
            except orjson.JSONDecodeError as exc:
                reason = "invalid_utf8" if "utf-8" in str(exc).lower() else "malformed_json"
                rejects.add(start, f"{where}:{number}", reason, str(exc)[:120], raw)
                continue
            if not isinstance(value, dict):
                rejects.add(start, f"{where}:{number}", "not_an_object", "not a JSON object", raw)
                continue
            row = {"_start": start, "_line": number}
            for key, (column, _) in _FIELDS.items():
                item = value.get(key)
                row[column] = None if item is None or isinstance(item, dict | list) else str(item)
            rows.append(row)
        if not rows:
            return empty_records()
        return pl.DataFrame(rows, schema=empty_records().schema)


def _record_columns() -> list[pl.Expr]:
    return [
        pl.col("time"),
        pl.col("user"),
        pl.col("db"),
        pl.col("pid").cast(pl.String),
        pl.col("session"),
        pl.col("host"),
        pl.col("app"),
        pl.col("severity"),
        pl.col("message"),
    ]

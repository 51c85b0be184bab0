"""PostgreSQL ``csvlog`` (one CSV record per log message, messages may span lines).

The whole chunk goes through one csv reader (C speed). Only when a record is malformed (wrong
number of fields, stray carriage return) does reading restart record by record: the first line
of the bad record is rejected and reading resumes on the line after it, so a broken quote
cannot swallow the good records that follow.
"""

from __future__ import annotations

import csv
import io
import re
from itertools import islice
from typing import Final

import numpy as np
import polars as pl

from detector.adapters.base import RejectList, newline_positions
from detector.adapters.pgaudit import RecordParser, empty_records

#: Field counts of csvlog records: PostgreSQL 12 (23), 13 (24), 14 and later (26).
FIELD_COUNTS: Final = frozenset((23, 24, 26))
_COLUMNS: Final = {
    "time": 0,
    "user": 1,
    "db": 2,
    "pid": 3,
    "host": 4,
    "session": 5,
    "severity": 11,
    "message": 13,
    "app": 22,
}
#: Statements may be megabytes long; the csv module's default field limit is 128 KiB.
FIELD_LIMIT: Final = 256 * 1024 * 1024
if csv.field_size_limit() < FIELD_LIMIT:
    csv.field_size_limit(FIELD_LIMIT)


class PgCsvlogParser(RecordParser):
    """Incremental parser of a PostgreSQL csvlog stream (see :mod:`detector.adapters`)."""

    name = "pgaudit-csvlog"

    def _records(
        self, data: bytes, stop: int, final: bool, rejects: RejectList
    ) -> tuple[pl.DataFrame, int]:
        """Records of ``data[:stop]`` and the end of the last complete one."""
        if stop == 0:
            return empty_records(), 0
        nl = newline_positions(data[:stop])
        line_starts = np.concatenate(([0], nl + 1)).tolist()
        try:
            text = data[:stop].decode()
            clean = True
        except UnicodeDecodeError:
            text, clean = data[:stop].decode("utf-8", "surrogateescape"), False
        lines = text.split("\n")
        if lines and lines[-1] == "":
            lines.pop()
        head, fast = (_last_record_start(lines), None) if clean else (0, None)
        if head > 0:
            fast = _fast_columns("\n".join(lines[:head]))
        if fast is not None and fast[1].sum() == head:
            columns, spans = fast
            firsts_fast = (np.cumsum(spans) - spans).tolist()
            rows, firsts, end_line = _read_rows(
                lines[head:],
                final,
                rejects,
                self.options.name,
                self.line + head,
                line_starts[head:],
            )
            firsts = [f + head for f in firsts]
            end_line += head
        else:
            columns, firsts_fast = None, []
            rows, firsts, end_line = _read_rows(
                lines, final, rejects, self.options.name, self.line, line_starts
            )
        end = line_starts[end_line] if end_line < len(line_starts) else stop
        if not clean:
            rows, firsts = self._drop_invalid_utf8(rows, firsts, rejects, line_starts)
        parts = []
        if columns is not None and columns.height:
            parts.append(self._frame(columns, firsts_fast, line_starts))
        if rows:
            careful = pl.DataFrame(
                {
                    name: pl.Series(name, [r[i] for r in rows], dtype=pl.String)
                    for name, i in _COLUMNS.items()
                }
            )
            parts.append(self._frame(careful, firsts, line_starts))
        if not parts:
            return empty_records(), end
        return pl.concat(parts), end

    def _frame(
        self, columns: pl.DataFrame, firsts: list[int], line_starts: list[int]
    ) -> pl.DataFrame:
        frame = columns.with_columns(
            pl.when(pl.col(c) == "").then(None).otherwise(pl.col(c)).alias(c) for c in _COLUMNS
        )
        starts = [line_starts[f] for f in firsts]
        numbers = [f + self._lines.line for f in firsts]
        frame = frame.with_columns(
            _start=pl.Series(starts, dtype=pl.Int64),
            _line=pl.Series(numbers, dtype=pl.Int64),
            host=pl.col("host").str.replace(r":\d+$", ""),
        )
        return frame.select(empty_records().columns)

    def _drop_invalid_utf8(
        self,
        rows: list[list[str]],
        firsts: list[int],
        rejects: RejectList,
        line_starts: list[int],
    ) -> tuple[list[list[str]], list[int]]:
        kept_rows, kept_firsts = [], []
        for row, first in zip(rows, firsts, strict=True):
            joined = ",".join(row)
            try:
                joined.encode()
            except UnicodeEncodeError:
                raw = joined.encode("utf-8", "surrogateescape")
                where = f"{self.options.name}:{first + self._lines.line}"
                rejects.add(line_starts[first], where, "invalid_utf8", "not UTF-8", raw)
                continue
            kept_rows.append(row)
            kept_firsts.append(first)
        return kept_rows, kept_firsts


_RECORD_START: Final = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d")


def _last_record_start(lines: list[str]) -> int:
    """Index of the last line that starts a record (a log time at the start of the line); 0
    when none does past the first. Everything before it is complete records, parsed at once;
    the last record, which may still be being written, is read record by record."""
    for index in range(len(lines) - 1, 0, -1):
        if _RECORD_START.match(lines[index]):
            return index
    return 0


def _fast_columns(text: str) -> tuple[pl.DataFrame, np.ndarray] | None:
    """The needed columns of every record in ``text`` and the number of lines each spans, read
    at once by polars' CSV reader; None when the text is not plainly well-formed (every record
    a log time first, one field count PostgreSQL writes), so the careful reader decides."""
    if "\r" in text:
        return None  # polars' reader and the csv module differ on carriage returns
    try:
        frame = pl.read_csv(
            io.BytesIO(text.encode()), has_header=False, infer_schema=False, quote_char='"'
        )
    except (pl.exceptions.PolarsError, ValueError):
        return None
    # polars pads a record with too few fields with nulls; the careful reader rejects it. The
    # last field of PostgreSQL 13+ (backend type, query id) is never empty, so a null there
    # means a short record; PostgreSQL 12's (application name) may be empty: no fast path.
    if frame.width not in FIELD_COUNTS - {23} or frame.height == 0:
        return None
    names = frame.columns
    if frame.get_column(names[-1]).null_count():
        return None
    stamps = frame.get_column(names[0]).str.contains(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d")
    if not stamps.fill_null(False).all():
        return None
    spans = (
        1
        + frame.select(
            pl.sum_horizontal(pl.col(c).str.count_matches("\n").fill_null(0) for c in names)
        )
        .to_series()
        .to_numpy()
    )
    picked = frame.select(pl.col(names[i]).alias(name) for name, i in _COLUMNS.items())
    return picked, spans


def _read_rows(
    lines: list[str],
    final: bool,
    rejects: RejectList,
    name: str,
    first_line: int,
    line_starts: list[int],
) -> tuple[list[list[str]], list[int], int]:
    """Rows with the index of their first line, and the index of the first line not consumed.

    One reader runs over the lines; a malformed record has its first line rejected and a new
    reader starts on the line after it."""
    out: list[list[str]] = []
    firsts: list[int] = []
    total = len(lines)
    at = 0
    while at < total:
        reader = csv.reader((line + "\n" for line in islice(lines, at, None)), strict=False)
        base, done = at, 0
        while True:
            try:
                row: list[str] | None = next(reader)
                error = None
            except StopIteration:
                return out, firsts, total
            except csv.Error as exc:
                row, error = None, str(exc)
            first, span = base + done, reader.line_num - done
            done = reader.line_num
            if row is not None and len(row) in FIELD_COUNTS:
                out.append(row)
                firsts.append(first)
                continue
            if row == []:
                continue  # a blank line
            if first + span >= total and not final and error is None:
                return out, firsts, first  # the last record may still be being written
            where = f"{name}:{first + first_line}"
            detail = error or f"{len(row or ())} fields, expected one of {sorted(FIELD_COUNTS)}"
            raw = lines[first].encode("utf-8", "surrogateescape")
            rejects.add(line_starts[first], where, "malformed_line", detail[:120], raw)
            at = first + 1
            break
    return out, firsts, total

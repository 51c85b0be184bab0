"""Canonical access events from files: Parquet and JSON lines, each plain, gzip or zstd.

:func:`read_events` yields polars frames whose schema is exactly
:data:`detector.schema.EVENT_SCHEMA`. Guarantees:

* Bad records never stop a read. Each is rejected on its own, with a reason from
  :data:`detector.validation.REASONS` and its location (``path:line``, 1-based, for JSON lines;
  ``path:row_group:row``, 0-based, for Parquet), into the :class:`~detector.quarantine.Quarantine`
  given; every good record around it comes through, in file order.
* A file that cannot be read at all (missing, no permission, not Parquet, corrupt compression)
  raises one :class:`~detector.errors.InputError` naming the file and the cause. With
  ``on_error="skip"`` it is quarantined as one ``unreadable_file`` record instead and the next
  file is read; frames already yielded from it stay yielded.
* Each yielded frame holds between 1 and ``batch_rows`` rows and comes from one file; every
  frame of a file but its last holds exactly ``batch_rows``. Empty files yield nothing; blank
  lines are skipped.
* Memory stays bounded whatever the file size: JSON lines are read and decompressed as a stream
  in blocks of about ``batch_rows`` lines (never more than 64 MiB plus one line, and a line
  longer than :data:`MAX_LINE_BYTES` is rejected as ``too_large`` without being held); Parquet
  is read a row group at a time in batches of ``batch_rows``, and a compressed Parquet file is
  spooled to a temporary file.

JSON lines are decoded a block at a time by Arrow's JSON reader against a strict schema. Only a
block that fails is cut into small runs of lines, and only a run that still fails is decoded line
by line, so a bad line costs a little of its neighbours' speed and never their records. The line
by line decoding accepts more than the strict schema (numbers as text, text booleans, numbers in
text fields); the result for a line does not depend on the lines around it.
"""

from __future__ import annotations

import glob
import gzip
import os
import shutil
import tempfile
import zlib
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Final

import numpy as np
import orjson
import polars as pl
import pyarrow as pa
import pyarrow.json as pj
import pyarrow.parquet as pq
import zstandard

from detector import schema
from detector.errors import InputError, Location, UnknownNameError
from detector.quarantine import NullQuarantine, Quarantine
from detector.redact import redact_sql
from detector.validation import LOC, REJECT_SCHEMA, check_zone, empty_rejects, validate

_FORMATS: Final = (".parquet", ".jsonl", ".ndjson")
_COMPRESSIONS: Final = ("", ".gz", ".zst")
#: Every file name ending read_events understands.
SUPPORTED_SUFFIXES: Final = tuple(f + c for f in _FORMATS for c in _COMPRESSIONS)
#: What read_events does with a file it cannot read.
ON_ERROR: Final = ("raise", "skip")
#: A JSON line longer than this is rejected as ``too_large`` without being decoded.
MAX_LINE_BYTES: Final = 16 * 1024 * 1024

_MIN_BLOCK: Final = 64 * 1024
_MAX_BLOCK: Final = 64 * 1024 * 1024
_FIRST_BLOCK: Final = 1024 * 1024
_SPAN_BYTES: Final = 4 * 1024 * 1024
_JSON_SPACE: Final = frozenset(b" \t\r\n")
_RUN_LINES: Final = 1024
_RAW_CHARS: Final = 64 * 1024
_SPOOL_BYTES: Final = 64 * 1024 * 1024
_THREADS: Final = 4
_BOM: Final = b"\xef\xbb\xbf"
_READ_ERRORS: Final = (OSError, EOFError, zlib.error, zstandard.ZstdError)

#: The strict JSON decode: canonical Arrow types, event_time kept as text for validate(),
#: extra left to inference (Arrow's JSON reader has no map type).
_STRICT_JSON: Final = pa.schema(
    [
        pa.field(f.name, pa.string()) if f.name == "event_time" else f
        for f in schema.EVENT_ARROW_SCHEMA
        if f.name != "extra"
    ]
)
_PARSE: Final = pj.ParseOptions(explicit_schema=_STRICT_JSON, unexpected_field_behavior="infer")
_LOOSE: Final[dict[str, pl.DataType]] = {
    col: dtype if col in ("objects", "extra") else pl.String()
    for col, dtype in schema.EVENT_SCHEMA.items()
}


def expand_paths(paths: Sequence[str | Path] | str | Path) -> list[Path]:
    """The files named by ``paths``, in order, each once.

    Each entry is a file (which must have a supported suffix), a directory (every supported file
    under it, recursively, sorted; names starting with ``.`` are skipped), or a glob pattern
    (``**`` allowed; matched directories are expanded as above, other unsupported files are
    skipped). An entry that matches no supported file raises :class:`InputError`.
    """
    entries = [paths] if isinstance(paths, str | Path) else list(paths)
    if not entries:
        raise InputError("no input paths given")
    found: dict[Path, None] = {}
    for entry in entries:
        found.update(dict.fromkeys(_expand_one(str(entry))))
    return list(found)


def read_events(
    paths: Sequence[str | Path] | str | Path,
    *,
    batch_rows: int = 100_000,
    quarantine: Quarantine | None = None,
    default_tz: str | None = None,
    on_error: str = "raise",
) -> Iterator[pl.DataFrame]:
    """Yield canonical event frames from the files named by ``paths`` (see the module
    docstring for what is guaranteed). Rejected records go to ``quarantine`` (when None they are
    dropped); ``default_tz`` is the zone naive timestamps are read in (None rejects them);
    ``on_error`` is ``"raise"`` or ``"skip"`` for files that cannot be read."""
    if on_error not in ON_ERROR:
        raise UnknownNameError("on_error policy", on_error, ON_ERROR)
    if batch_rows < 1:
        raise ValueError(f"batch_rows must be at least 1, got {batch_rows}")
    check_zone(default_tz)
    files = expand_paths(paths)
    with ThreadPoolExecutor(max_workers=min(_THREADS, os.cpu_count() or 1)) as pool:
        context = _Context(batch_rows, quarantine or NullQuarantine(), default_tz, pool)
        for path in files:
            try:
                yield from _read_file(path, context)
            except InputError as exc:
                if on_error == "raise":
                    raise
                context.reject(str(path), "unreadable_file", str(exc), None)


# --- paths ----------------------------------------------------------------------------------


def _supported(path: Path) -> bool:
    return path.name.lower().endswith(SUPPORTED_SUFFIXES)


def _split_suffix(path: Path) -> tuple[str, str]:
    """(format, compression) from the name, e.g. ('.jsonl', '.zst'); InputError if unknown."""
    name = path.name.lower()
    for fmt in _FORMATS:
        for compression in _COMPRESSIONS:
            if name.endswith(fmt + compression):
                return fmt, compression
    raise InputError(f"{path}: unsupported file type; supported: {', '.join(SUPPORTED_SUFFIXES)}")


def _expand_one(entry: str) -> list[Path]:
    path = Path(entry)
    if path.is_dir():
        files = _walk(path)
        if not files:
            raise InputError(
                f"{path}: no supported files in this directory "
                f"(supported: {', '.join(SUPPORTED_SUFFIXES)})"
            )
        return files
    if path.exists():
        _split_suffix(path)
        return [path]
    if glob.has_magic(entry):
        files = _globbed(entry)
        if not files:
            raise InputError(f"{entry}: the pattern matched no supported file")
        return files
    raise InputError(f"{entry}: no such file or directory")


def _walk(root: Path) -> list[Path]:
    return sorted(
        p
        for p in root.rglob("*")
        if p.is_file()
        and _supported(p)
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )


def _globbed(pattern: str) -> list[Path]:
    files: list[Path] = []
    for match in sorted(glob.glob(pattern, recursive=True)):
        path = Path(match)
        if path.is_dir():
            files.extend(_walk(path))
        elif path.is_file() and _supported(path):
            files.append(path)
    return files


# --- shared reading machinery ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Context:
    batch_rows: int
    sink: Quarantine
    default_tz: str | None
    pool: ThreadPoolExecutor

    def reject(self, location: str, reason: str, detail: str, record: str | None) -> None:
        """Quarantine one record (``record`` is JSON text or None)."""
        row = {"location": [location], "reason": [reason], "detail": [detail], "record": [record]}
        self.sink.write(pl.DataFrame(row, schema=REJECT_SCHEMA))

    def validated(self, frame: pl.DataFrame, prefix: str, extra: pl.DataFrame) -> pl.DataFrame:
        """Validate ``frame``; quarantine its rejects and ``extra`` rejects (both located by
        ``_loc`` numbers, sorted, then prefixed); return the good rows."""
        if frame.height:
            good, rejects = validate(frame, default_tz=self.default_tz)
        else:
            good, rejects = schema.empty_events(), empty_rejects()
        rejects = pl.concat([extra, rejects])
        if rejects.height:
            order = rejects.get_column("location").cast(pl.Int64, strict=False)
            rejects = rejects.with_columns(location=pl.lit(prefix) + pl.col("location"))
            self.sink.write(rejects.sort(order, maintain_order=True))
        return good


class _Batcher:
    """Re-cut frames into frames of exactly ``size`` rows (the last may be shorter)."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._parts: list[pl.DataFrame] = []
        self._rows = 0

    def add(self, frame: pl.DataFrame) -> Iterator[pl.DataFrame]:
        if frame.height == 0:
            return
        self._parts.append(frame)
        self._rows += frame.height
        if self._rows < self._size:
            return
        whole = pl.concat(self._parts, rechunk=False)
        full = whole.height - whole.height % self._size
        for offset in range(0, full, self._size):
            yield whole.slice(offset, self._size)
        rest = whole.slice(full)
        self._parts = [rest] if rest.height else []
        self._rows = rest.height

    def flush(self) -> Iterator[pl.DataFrame]:
        if self._rows:
            yield pl.concat(self._parts, rechunk=False)
        self._parts, self._rows = [], 0


def _read_file(path: Path, context: _Context) -> Iterator[pl.DataFrame]:
    fmt, compression = _split_suffix(path)
    batcher = _Batcher(context.batch_rows)
    frames = (
        _parquet(path, compression, context)
        if fmt == ".parquet"
        else _jsonl(path, compression, context)
    )
    try:
        for frame in frames:
            yield from batcher.add(frame)
    except InputError:
        yield from batcher.flush()
        raise
    yield from batcher.flush()


@contextmanager
def _opened(path: Path, compression: str) -> Iterator[IO[bytes]]:
    """The file's bytes, decompressed as a stream; InputError if it cannot be opened."""
    try:
        raw = path.open("rb")
    except OSError as exc:
        raise InputError(f"cannot open {path}: {exc.strerror or exc}") from exc
    with raw:
        if compression == ".gz":
            with gzip.GzipFile(fileobj=raw, mode="rb") as unzipped:
                yield unzipped  # type: ignore[misc]  # GzipFile is a binary stream
        elif compression == ".zst":
            reader = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)
            with reader:
                yield reader
        else:
            yield raw


def _read(stream: IO[bytes], size: int, where: Location) -> bytes:
    """Up to ``size`` bytes (fewer only at the end); InputError on a read or decode failure."""
    buffer = bytearray(size)
    return bytes(buffer[: _read_into(stream, memoryview(buffer), where)])


def _read_into(stream: IO[bytes], view: memoryview, where: Location) -> int:
    """Fill ``view`` (short only at the end of the stream); InputError on a read or decode
    failure. Returns how many bytes were read."""
    done = 0
    try:
        while done < len(view):
            got = stream.readinto(view[done:])  # type: ignore[attr-defined]
            if not got:
                break
            done += got
    except _READ_ERRORS as exc:
        raise InputError(f"cannot read {where.path}: {exc}", location=where) from exc
    return done


# --- JSON lines -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Lines:
    """Complete lines: ``data[:end]`` holds ``count`` lines, the first numbered ``first``.

    ``data`` is the reader's buffer, valid only until the next run is asked for.
    """

    data: bytearray
    end: int
    first: int
    count: int


@dataclass(frozen=True, slots=True)
class _Overlong:
    """Line ``number`` was longer than MAX_LINE_BYTES; ``head`` is its beginning."""

    number: int
    head: bytes


def _jsonl(path: Path, compression: str, context: _Context) -> Iterator[pl.DataFrame]:
    where = str(path)
    with _opened(path, compression) as stream:
        for piece in _LineReader(stream, where, context.batch_rows):
            if isinstance(piece, _Overlong):
                detail = f"line is longer than {MAX_LINE_BYTES} bytes"
                record = _raw_record(piece.head)
                context.reject(f"{where}:{piece.number}", "too_large", detail, record)
                continue
            yield _decode_lines(piece, where, context)


class _LineReader:
    """Cut a byte stream into runs of complete lines, about ``batch_rows`` lines each.

    One buffer is reused for every run, so memory is the run size plus one partial line. A
    leading UTF-8 byte order mark is dropped; the last line needs no newline.
    """

    def __init__(self, stream: IO[bytes], where: str, batch_rows: int) -> None:
        self._stream = stream
        self._where = where
        self._batch_rows = batch_rows
        self._buffer = bytearray(_FIRST_BLOCK)
        self._kept = 0  # bytes of an unfinished line at the start of the buffer
        self._line = 1  # number of the line the buffer starts with
        self._seen_bytes = self._seen_lines = 0

    def __iter__(self) -> Iterator[_Lines | _Overlong]:
        size = _FIRST_BLOCK
        self._drop_bom()
        while True:
            filled, at_end = self._fill(size)
            cut = filled if at_end else self._buffer.rfind(b"\n", 0, filled) + 1
            if cut == 0:
                if at_end:
                    return
                if filled > MAX_LINE_BYTES:
                    yield _Overlong(self._line, bytes(self._buffer[:_RAW_CHARS]))
                    self._skip_rest_of_line()
                else:
                    self._kept, size = filled, max(size, filled)
                continue
            count = _count_lines(self._buffer, 0, cut)
            yield _Lines(self._buffer, cut, self._line, count)
            if at_end:
                return
            self._keep(cut, filled, count)
            size = self._next_size()

    def _location(self) -> Location:
        return Location(self._where, line=self._line)

    def _drop_bom(self) -> None:
        head = _read(self._stream, len(_BOM), self._location())
        if head != _BOM:
            self._buffer[: len(head)] = head
            self._kept = len(head)

    def _fill(self, size: int) -> tuple[int, bool]:
        """Read ``size`` more bytes after the kept ones: (bytes in buffer, stream ended)."""
        if len(self._buffer) < self._kept + size:
            grown = bytearray((self._kept + size) * 5 // 4)  # headroom: sizes drift a little
            grown[: self._kept] = self._buffer[: self._kept]
            self._buffer = grown
        view = memoryview(self._buffer)[self._kept : self._kept + size]
        got = _read_into(self._stream, view, self._location())
        return self._kept + got, got < size

    def _keep(self, cut: int, filled: int, count: int) -> None:
        rest = filled - cut
        self._buffer[:rest] = self._buffer[cut:filled]
        self._kept = rest
        self._line += count
        self._seen_bytes += cut
        self._seen_lines += count

    def _next_size(self) -> int:
        wanted = self._seen_bytes * self._batch_rows // max(self._seen_lines, 1)
        return min(max(wanted, _MIN_BLOCK), _MAX_BLOCK)

    def _skip_rest_of_line(self) -> None:
        """Drop the overlong line up to and including its newline."""
        while True:
            block = _read(self._stream, _MIN_BLOCK, self._location())
            newline = block.find(b"\n")
            if newline >= 0 or len(block) < _MIN_BLOCK:
                rest = block[newline + 1 :] if newline >= 0 else b""
                self._buffer[: len(rest)] = rest
                self._kept = len(rest)
                self._line += 1
                return


def _count_lines(buffer: bytearray, start: int, end: int) -> int:
    """Lines in ``buffer[start:end]``, counting a last line without a newline."""
    if end <= start:
        return 0
    window = np.frombuffer(buffer, dtype=np.uint8, count=end - start, offset=start)
    return int(np.count_nonzero(window == 10)) + (buffer[end - 1] != ord("\n"))


@dataclass(frozen=True, slots=True)
class _Span:
    """``count`` lines at ``data[start:end]`` of a run, the first numbered ``first``."""

    start: int
    end: int
    first: int
    count: int


def _spans(piece: _Lines) -> list[_Span]:
    """Cut a run at line ends into spans of about _SPAN_BYTES (one line may make a span
    longer), each decoded on its own so a bad line costs only its span the fast path."""
    spans: list[_Span] = []
    start, first = 0, piece.first
    while start < piece.end:
        stop = min(start + _SPAN_BYTES, piece.end)
        if stop < piece.end:
            newline = piece.data.rfind(b"\n", start, stop)
            if newline < 0:
                newline = piece.data.find(b"\n", stop, piece.end)
            stop = newline + 1 if newline >= 0 else piece.end
        count = _count_lines(piece.data, start, stop)
        spans.append(_Span(start, stop, first, count))
        start, first = stop, first + count
    return spans


def _decode_lines(piece: _Lines, where: str, context: _Context) -> pl.DataFrame:
    """Good rows of a run of lines, in order; rejects go to the quarantine.

    Spans are decoded strictly in parallel; consecutive clean spans are validated together,
    and a span that fails is decoded carefully on its own.
    """
    spans = _spans(piece)
    buffer = pa.py_buffer(piece.data)
    tables = context.pool.map(lambda s: _arrow_json(buffer.slice(s.start, s.end - s.start)), spans)
    goods: list[pl.DataFrame] = []
    clean: list[tuple[pa.Table, pl.Series]] = []
    for span, table in zip(spans, tables, strict=True):
        numbers = None if table is None else _line_numbers(piece.data, span, table.num_rows)
        if table is not None and numbers is not None:
            clean.append((table, numbers))
            continue
        goods.append(_validated_tables(clean, where, context))
        clean = []
        goods.append(_decode_carefully(piece.data, span, where, context))
    goods.append(_validated_tables(clean, where, context))
    return pl.concat(goods)


def _validated_tables(
    clean: list[tuple[pa.Table, pl.Series]], where: str, context: _Context
) -> pl.DataFrame:
    if not clean:
        return schema.empty_events()
    tables = [table for table, _ in clean]
    numbers = pl.concat([n for _, n in clean])
    try:
        table = pa.concat_tables(tables, promote_options="permissive")
    except pa.ArrowException:  # extra keys typed differently in two spans
        return pl.concat([_validated_tables([part], where, context) for part in clean])
    return context.validated(_frame(table, numbers), f"{where}:", empty_rejects())


def _line_numbers(data: bytearray, span: _Span, rows: int) -> pl.Series | None:
    """The line number of each decoded row, or None if rows and lines cannot be matched."""
    if rows == span.count:
        return pl.int_range(span.first, span.first + rows, eager=True)
    lines = bytes(data[span.start : span.end]).split(b"\n")[: span.count]
    numbers = [span.first + i for i, line in enumerate(lines) if line.strip()]
    return pl.Series(numbers, dtype=pl.Int64) if len(numbers) == rows else None


def _decode_carefully(data: bytearray, span: _Span, where: str, context: _Context) -> pl.DataFrame:
    """Decode a span in runs of _RUN_LINES lines, and a run that fails line by line."""
    lines = bytes(data[span.start : span.end]).split(b"\n")[: span.count]
    goods = [
        _decode_run(lines[start : start + _RUN_LINES], span.first + start, where, context)
        for start in range(0, len(lines), _RUN_LINES)
    ]
    return pl.concat(goods)


def _decode_run(lines: list[bytes], first: int, where: str, context: _Context) -> pl.DataFrame:
    numbered = [(first + i, line) for i, line in enumerate(lines) if line.strip()]
    if not numbered:
        return schema.empty_events()
    table = _arrow_json(pa.py_buffer(b"\n".join(line for _, line in numbered)))
    if table is not None and table.num_rows == len(numbered):
        numbers = pl.Series([number for number, _ in numbered], dtype=pl.Int64)
        return context.validated(_frame(table, numbers), f"{where}:", empty_rejects())
    frame, rejects = _decode_one_by_one(numbered)
    return context.validated(frame, f"{where}:", rejects)


def _arrow_json(buffer: pa.Buffer) -> pa.Table | None:
    """The strict decode of some lines as one block, or None if any line breaks it.

    Text whose first value is not an object never reaches the Arrow reader (a top-level
    ``null`` there crashes some versions of it).
    """
    if not _starts_with_object(buffer):
        return None
    options = pj.ReadOptions(use_threads=False, block_size=buffer.size + 1)
    try:
        table = pj.read_json(pa.BufferReader(buffer), read_options=options, parse_options=_PARSE)
    except pa.ArrowException:
        return None
    return table if _extra_is_flat(table) else None


def _starts_with_object(buffer: pa.Buffer) -> bool:
    for byte in memoryview(buffer):
        if byte not in _JSON_SPACE:
            return bool(byte == ord("{"))
    return False


def _extra_is_flat(table: pa.Table) -> bool:
    """Whether ``extra`` (if any) decoded to a struct the fast path turns into text exactly as
    the line by line path would (text, integer, boolean or null values)."""
    if "extra" not in table.column_names:
        return True
    dtype = table.schema.field("extra").type
    if pa.types.is_null(dtype):
        return True
    if not pa.types.is_struct(dtype):
        return False
    return all(
        pa.types.is_string(f.type)
        or pa.types.is_integer(f.type)
        or pa.types.is_boolean(f.type)
        or pa.types.is_null(f.type)
        for f in dtype
    )


def _frame(table: pa.Table, numbers: pl.Series) -> pl.DataFrame:
    columns = [c for c in table.column_names if c in schema.EVENT_SCHEMA]
    return pl.from_arrow(table.select(columns)).with_columns(numbers.alias(LOC))  # type: ignore[union-attr]


def _decode_one_by_one(numbered: list[tuple[int, bytes]]) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Decode lines one at a time: (loose frame of the decodable ones, rejects)."""
    rows: list[dict[str, Any]] = []
    numbers: list[int] = []
    rejected: list[tuple[str, str, str, str]] = []
    for number, line in numbered:
        outcome = _decode_line(line)
        if isinstance(outcome, dict):
            rows.append(outcome)
            numbers.append(number)
        else:
            rejected.append((str(number), *outcome))
    columns = {col: [row.get(col) for row in rows] for col in _LOOSE}
    frame = pl.DataFrame(columns, schema=_LOOSE).with_columns(pl.Series(LOC, numbers, pl.Int64))
    rejects = pl.DataFrame(rejected, schema=REJECT_SCHEMA, orient="row")
    return frame, rejects


def _decode_line(line: bytes) -> dict[str, Any] | tuple[str, str, str]:
    """A line as loose canonical fields, or (reason, detail, record JSON) if it cannot be."""
    try:
        value = orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        return "malformed_json", f"malformed JSON: {exc}", _raw_record(line)
    if not isinstance(value, dict):
        kind = type(value).__name__ if value is not None else "null"
        return (
            "not_an_object",
            f"line holds a JSON {_JSON_KINDS.get(kind, kind)}",
            _raw_record(line),
        )
    loose: dict[str, Any] = {}
    for col, item in value.items():
        if col not in _LOOSE or item is None:
            continue
        converted = _loosen(col, item)
        if isinstance(converted, _Bad):
            return "bad_type", f"{col}: {converted.why}", _object_record(value)
        loose[col] = converted
    return loose


_JSON_KINDS: Final = {"list": "array", "str": "string", "int": "number", "float": "number"}


@dataclass(frozen=True, slots=True)
class _Bad:
    why: str


def _loosen(col: str, item: object) -> object:
    """One JSON value as the loose column expects it, or _Bad."""
    if col == "objects":
        if isinstance(item, list) and all(x is None or isinstance(x, str) for x in item):
            return item
        return _Bad("expected a list of strings")
    if col == "extra":
        if not isinstance(item, dict):
            return _Bad("expected an object")
        return [
            {"key": key, "value": _as_text(v)} for key, v in sorted(item.items()) if v is not None
        ]
    if isinstance(item, dict | list):
        return _Bad(
            f"expected a single value, got an {'object' if isinstance(item, dict) else 'array'}"
        )
    return _as_text(item)


def _as_text(value: object) -> str:
    return value if isinstance(value, str) else orjson.dumps(value).decode()


def _raw_record(line: bytes) -> str:
    """A line that is not a JSON object, as a JSON string: decoded, cut and redacted."""
    text = line[:_RAW_CHARS].decode("utf-8", errors="replace")
    return orjson.dumps(redact_sql(text)).decode()


def _object_record(value: dict[str, Any]) -> str:
    """The canonical fields of a decoded line as JSON text, ``statement_text`` redacted."""
    fields = {k: v for k, v in value.items() if k in schema.EVENT_SCHEMA}
    text = fields.get("statement_text")
    if text is not None:
        fields["statement_text"] = redact_sql(text) if isinstance(text, str) else None
    return orjson.dumps(fields).decode()


# --- Parquet --------------------------------------------------------------------------------


def _parquet(path: Path, compression: str, context: _Context) -> Iterator[pl.DataFrame]:
    with _parquet_source(path, compression) as source:
        if source is None:
            return
        try:
            parquet = pq.ParquetFile(source)
        except (pa.ArrowException, OSError) as exc:
            raise InputError(f"cannot read {path} as Parquet: {exc}") from exc
        columns = [name for name in parquet.schema_arrow.names if name in schema.EVENT_SCHEMA]
        for group in range(parquet.metadata.num_row_groups):
            yield from _row_group(parquet, group, columns, str(path), context)


def _row_group(
    parquet: pq.ParquetFile, group: int, columns: list[str], where: str, context: _Context
) -> Iterator[pl.DataFrame]:
    row = 0
    batches = parquet.iter_batches(
        batch_size=context.batch_rows, row_groups=[group], columns=columns
    )
    while True:
        try:
            batch = next(batches, None)
        except (pa.ArrowException, OSError) as exc:
            location = Location(where, row_group=group, row=row)
            raise InputError(f"cannot read {where}: {exc}", location=location) from exc
        if batch is None:
            return
        numbers = pl.int_range(row, row + batch.num_rows, eager=True)
        frame = _arrow_frame(pa.Table.from_batches([batch])).with_columns(numbers.alias(LOC))
        yield context.validated(frame, f"{where}:{group}:", empty_rejects())
        row += batch.num_rows


@contextmanager
def _parquet_source(path: Path, compression: str) -> Iterator[str | IO[bytes] | None]:
    """Something Parquet can seek in: the path itself, or the decompressed bytes spooled to a
    temporary file. None for an empty file."""
    if not compression:
        try:
            empty = path.stat().st_size == 0
        except OSError as exc:
            raise InputError(f"cannot open {path}: {exc.strerror or exc}") from exc
        yield None if empty else str(path)
        return
    with _opened(path, compression) as stream, tempfile.SpooledTemporaryFile(_SPOOL_BYTES) as spool:
        try:
            shutil.copyfileobj(stream, spool, _MIN_BLOCK)
        except _READ_ERRORS as exc:
            raise InputError(f"cannot read {path}: {exc}") from exc
        size = spool.tell()
        spool.seek(0)
        yield spool if size else None


def _arrow_frame(table: pa.Table) -> pl.DataFrame:
    """An Arrow table as polars, column by column: zoned timestamps become UTC, dictionaries
    their values, and a column polars cannot hold becomes opaque binary (rejected per row)."""
    series = [_arrow_column(name, table.column(name)) for name in table.column_names]
    return pl.DataFrame(series) if series else pl.DataFrame(height=table.num_rows)


def _arrow_column(name: str, column: pa.ChunkedArray) -> pl.Series:
    dtype = column.type
    if pa.types.is_timestamp(dtype) and dtype.tz is not None:
        column = column.cast(pa.timestamp("us", tz="UTC"), safe=False)
    elif pa.types.is_dictionary(dtype):
        column = column.cast(dtype.value_type)
    try:
        return pl.Series(name, column)
    except (pl.exceptions.PolarsError, pa.ArrowException, TypeError, ValueError):
        opaque = [b"" if valid else None for valid in column.is_valid().to_pylist()]
        return pl.Series(name, opaque, dtype=pl.Binary)

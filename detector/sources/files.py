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
  in runs of about ``batch_rows`` lines (at most 64 MiB plus one line; a line longer than
  :data:`MAX_LINE_BYTES` is rejected as ``too_large`` without being held); Parquet is read one
  row group at a time, and a compressed Parquet file is first decompressed, as a stream, into a
  temporary file that is deleted afterwards.

JSON lines are decoded by Arrow's JSON reader against a strict schema, in spans of a few MiB
on a small thread pool. Only a span that fails is cut into runs of lines, and only a run that
still fails is decoded line by line, so a bad line costs its neighbours a little speed and never
their records. Decoding line by line accepts a little more than the strict schema (numbers as
text, ``"true"``, numbers in text fields), and the outcome for a line never depends on the lines
around it. Parquet columns are mapped by name (others are ignored) and read with polars, or
with Arrow column by column when polars cannot hold a column's type.
"""

from __future__ import annotations

import glob
import gzip
import inspect
import itertools
import os
import re
import shutil
import tempfile
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from dataclasses import field as default_field
from pathlib import Path
from typing import IO, Any, Final, NamedTuple

import numpy as np
import orjson
import polars as pl
import pyarrow as pa
import pyarrow.json as pj
import pyarrow.parquet as pq
import zstandard

from detector import schema
from detector.adapters import ADAPTERS, detect_format, make_adapter
from detector.adapters.base import line_bounds, starts_with_object
from detector.errors import InputError, Location, UnknownNameError
from detector.quarantine import NullQuarantine, Quarantine, redact_text
from detector.redact import redact_sql
from detector.validation import LOC, REJECT_SCHEMA, check_zone, empty_rejects, validate

#: Database audit logs, read through :mod:`detector.adapters` (see :func:`log_format_for`).
LOG_SUFFIXES: Final = (".json", ".csv", ".log")
_FORMATS: Final = (".parquet", ".jsonl", ".ndjson", *LOG_SUFFIXES)
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
_SPAN_BYTES: Final = 1024 * 1024
_SPACE: Final = b" \t\r\n"
_TWO_OBJECTS: Final = re.compile(rb"}[ \t\r]*{")
_ROW_IN_ERROR: Final = re.compile(r"in row (\d+)")
_NON_STANDARD: Final = re.compile(rb"NaN|Inf")  # literals the strict reader takes, orjson not
_LEAF_LINES: Final = 32  # fewer lines decode faster one by one than in an Arrow call
_RAW_CHARS: Final = 64 * 1024
_THREADS: Final = 4
_BOM: Final = b"\xef\xbb\xbf"
_READ_ERRORS: Final = (OSError, EOFError, zlib.error, zstandard.ZstdError)

#: The strict JSON decode: canonical Arrow types, event_time kept as text for validate(),
#: extra left to inference (Arrow's JSON reader has no map type).
#: The strict JSON decode: canonical Arrow types, every field nullable (validate() judges what
#: is missing), event_time as text for validate(), extra left to inference (the JSON reader has
#: no map type).
_STRICT_JSON: Final = pa.schema(
    [
        pa.field(f.name, pa.string() if f.name == "event_time" else f.type)
        for f in schema.EVENT_ARROW_SCHEMA
        if f.name != "extra"
    ]
)
_PARSE: Final = pj.ParseOptions(explicit_schema=_STRICT_JSON, unexpected_field_behavior="infer")
#: Columns of a frame decoded line by line: scalars as text, for validate() to type.
_LOOSE: Final = pa.schema(
    [
        pa.field(f.name, f.type if f.name == "objects" else pa.string())
        for f in schema.EVENT_ARROW_SCHEMA
        if f.name != "extra"
    ]
    + [pa.field("extra", pa.list_(pa.struct([("key", pa.string()), ("value", pa.string())])))]
)


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
    log_format: str = "auto",
    adapter_options: Mapping[str, Any] | None = None,
) -> Iterator[pl.DataFrame]:
    """Yield canonical event frames from the files named by ``paths`` (see the module
    docstring for what is guaranteed). Rejected records go to ``quarantine`` (when None they are
    dropped); ``default_tz`` is the zone naive timestamps are read in (None rejects them);
    ``on_error`` is ``"raise"`` or ``"skip"`` for files that cannot be read.

    Files ending ``.json``, ``.csv`` or ``.log`` (plain, ``.gz`` or ``.zst``) are database audit
    logs: ``log_format`` names their adapter (:data:`detector.adapters.ADAPTERS`), or
    ``"auto"`` picks it per file by :func:`detector.adapters.detect_format`.
    ``adapter_options`` go to the adapter (e.g. ``log_line_prefix``, ``db_instance``); those
    the chosen adapter does not take are ignored; ``default_tz`` is its ``timezone``."""
    if on_error not in ON_ERROR:
        raise UnknownNameError("on_error policy", on_error, ON_ERROR)
    if log_format != "auto" and log_format not in ADAPTERS:
        raise UnknownNameError("log format", log_format, ("auto", *ADAPTERS))
    if batch_rows < 1:
        raise ValueError(f"batch_rows must be at least 1, got {batch_rows}")
    check_zone(default_tz)
    files = expand_paths(paths)
    with ThreadPoolExecutor(max_workers=min(_THREADS, os.cpu_count() or 1)) as pool:
        context = _Context(
            batch_rows,
            quarantine or NullQuarantine(),
            default_tz,
            pool,
            log_format,
            dict(adapter_options or {}),
        )
        for path in files:
            try:
                yield from _read_file(path, context)
            except InputError as exc:
                if on_error == "raise":
                    raise
                context.reject(str(path), "unreadable_file", str(exc), None)


# --- paths ----------------------------------------------------------------------------------


def _supported(path: Path) -> bool:
    if not path.name.lower().endswith(SUPPORTED_SUFFIXES):
        return False
    fmt, compression = _split_suffix(path)
    return fmt not in LOG_SUFFIXES or _looks_like_audit_log(path, compression)


_AUDIT_HEAD: Final = re.compile(
    rb'^(?:\{"timestamp":"\d{4}-\d\d-\d\d |\d{4}-\d\d-\d\d \d\d:\d\d:\d\d|\d{8} \d\d:\d\d:\d\d,'
    rb"|[A-Z][a-z]{2} [ \d]\d \d\d:\d\d:\d\d \S+ \S+: )"
)


def _looks_like_audit_log(path: Path, compression: str) -> bool:
    """Whether a .json/.csv/.log file starts like a database audit log (a PostgreSQL jsonlog,
    csvlog or stderr line, a server_audit line or a syslog line). Other files with these
    suffixes (labels.json, a spreadsheet export) are not event input."""
    try:
        with _opened(path, compression) as stream:
            head = _read(stream, 4096, Location(str(path)))
    except InputError:
        return False
    first = next((line for line in head.split(b"\n") if line.strip()), b"")
    return bool(_AUDIT_HEAD.match(first.lstrip(_BOM)))


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
        fmt, _ = _split_suffix(path)
        if fmt in LOG_SUFFIXES and not _supported(path):
            raise InputError(
                f"{path}: not a database audit log (its first line is not a PostgreSQL or "
                f"MariaDB log line); supported: {', '.join(SUPPORTED_SUFFIXES)}"
            )
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
    log_format: str = "auto"
    adapter_options: dict[str, Any] = default_field(default_factory=dict)

    def reject(self, location: str, reason: str, detail: str, record: str | None) -> None:
        """Quarantine one record (``record`` is JSON text or None)."""
        row = {"location": [location], "reason": [reason], "detail": [detail], "record": [record]}
        self.sink.write(pl.DataFrame(row, schema=REJECT_SCHEMA))

    def validated(
        self, frames: list[pl.DataFrame], prefix: str, extra: pl.DataFrame
    ) -> pl.DataFrame:
        """Validate ``frames`` (whose ``_loc`` are distinct numbers) and return their good rows
        in ``_loc`` order; quarantine their rejects and the ``extra`` ones, sorted by number,
        with ``prefix`` put before each number."""
        goods: list[pl.DataFrame] = []
        rejects = [extra]
        for frame in frames:
            if frame.height == 0:
                continue
            good, rejected = validate(frame, default_tz=self.default_tz)
            numbers = frame.get_column(LOC)
            if rejected.height:
                gone = rejected.get_column("location").cast(pl.Int64)
                numbers = numbers.filter(~numbers.is_in(gone.implode()))
            goods.append(good.with_columns(numbers.alias(LOC)))
            rejects.append(rejected)
        self._quarantine(pl.concat(rejects), prefix)
        if not goods:
            return schema.empty_events()
        merged = pl.concat(goods) if len(goods) == 1 else pl.concat(goods).sort(LOC)
        return merged.drop(LOC)

    def _quarantine(self, rejects: pl.DataFrame, prefix: str) -> None:
        if rejects.height:
            order = rejects.get_column("location").cast(pl.Int64, strict=False)
            rejects = rejects.with_columns(location=pl.lit(prefix) + pl.col("location"))
            self.sink.write(rejects.sort(order, maintain_order=True))


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
        else _audit_log(path, compression, context)
        if fmt in LOG_SUFFIXES
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
    got, error = _read_into(stream, memoryview(buffer), where)
    if error is not None:
        raise error
    return bytes(buffer[:got])


def _read_into(
    stream: IO[bytes], view: memoryview, where: Location
) -> tuple[int, InputError | None]:
    """Fill ``view`` (short only at the end of the stream). Returns how many bytes were read
    and, if reading or decompressing failed part way, the InputError to raise once the bytes
    read before it have been used."""
    done = 0
    try:
        while done < len(view):
            # readinto1: one read underneath per call, so a failing call has taken no bytes
            got = stream.readinto1(view[done:])  # type: ignore[attr-defined]
            if not got:
                break
            done += got
    except _READ_ERRORS as exc:
        return done, InputError(f"cannot read {where.path}: {exc}", location=where)
    return done, None


# --- database audit logs --------------------------------------------------------------------

_LOG_BLOCK: Final = 8 * 1024 * 1024


def _audit_log(path: Path, compression: str, context: _Context) -> Iterator[pl.DataFrame]:
    """Good events of an audit log, parsed by its adapter in blocks of a few MiB."""
    where = Location(str(path))
    with _opened(path, compression) as stream:
        data = _read(stream, _LOG_BLOCK, where)
        name = context.log_format
        if name == "auto":
            name = detect_format(path.name.lower().removesuffix(compression), data)
        accepted = inspect.signature(ADAPTERS[name]).parameters
        options = {k: v for k, v in context.adapter_options.items() if k in accepted}
        options.setdefault("timezone", context.default_tz)
        parser = make_adapter(name, location=str(path), **options)
        rest = b""
        while True:
            at_end = len(data) < _LOG_BLOCK
            buffer = rest + data if rest else data
            parsed = parser.feed(buffer, final=at_end)
            if parsed.rejects.height:
                context.sink.write(parsed.rejects)
            if parsed.events.height:
                yield parsed.events
            if at_end:
                return
            rest = buffer[parsed.consumed :]
            data = _read(stream, _LOG_BLOCK, where)


# --- JSON lines -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Lines:
    """Complete lines: ``data[:end]`` holds ``count`` lines, the first numbered ``first``;
    ``newlines`` are the positions of their line ends.

    ``data`` is the reader's buffer, valid only until the next run is asked for.
    """

    data: bytearray
    end: int
    first: int
    newlines: np.ndarray
    count: int


@dataclass(frozen=True, slots=True)
class _Overlong:
    """Line ``number`` was longer than MAX_LINE_BYTES; ``head`` is its beginning."""

    number: int
    head: bytes


def _jsonl(path: Path, compression: str, context: _Context) -> Iterator[pl.DataFrame]:
    """Good rows of a JSON lines file. While one run of lines is decoded on the pool, the
    run before it is validated. If the file breaks off, the runs read whole still count."""
    where = str(path)
    waiting: _Parts | None = None
    try:
        with _opened(path, compression) as stream:
            for piece in _LineReader(stream, where, context.batch_rows):
                if waiting is not None and isinstance(piece, _Overlong):
                    yield _finish(waiting, where, context)
                    waiting = None
                if isinstance(piece, _Overlong):
                    detail = f"line is longer than {MAX_LINE_BYTES} bytes"
                    record = _raw_record(piece.head)
                    context.reject(f"{where}:{piece.number}", "too_large", detail, record)
                    continue
                spans, attempts = _start(piece, context.pool)
                if waiting is not None:
                    yield _finish(waiting, where, context)
                waiting = _collect(piece, spans, attempts)
    except InputError:
        if waiting is not None:
            yield _finish(waiting, where, context)
        raise
    if waiting is not None:
        yield _finish(waiting, where, context)


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
            filled, at_end, error = self._fill(size)
            if error is not None:  # the lines read whole before the failure still count
                cut = self._buffer.rfind(b"\n", 0, filled) + 1
                if cut:
                    yield self._lines(cut)
                raise error
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
            piece = self._lines(cut)
            yield piece
            if at_end:
                return
            self._keep(cut, filled, piece.count)
            size = self._next_size()

    def _lines(self, cut: int) -> _Lines:
        text = np.frombuffer(self._buffer, dtype=np.uint8, count=cut)
        newlines = np.flatnonzero(text == ord("\n"))
        count = len(newlines) + (self._buffer[cut - 1] != ord("\n"))
        return _Lines(self._buffer, cut, self._line, newlines, count)

    def _location(self) -> Location:
        return Location(self._where, line=self._line)

    def _drop_bom(self) -> None:
        head = _read(self._stream, len(_BOM), self._location())
        if head != _BOM:
            self._buffer[: len(head)] = head
            self._kept = len(head)

    def _fill(self, size: int) -> tuple[int, bool, InputError | None]:
        """Read ``size`` more bytes after the kept ones: (bytes in buffer, stream ended, the
        error that cut reading short)."""
        if len(self._buffer) < self._kept + size:
            grown = bytearray((self._kept + size) * 5 // 4)  # headroom: sizes drift a little
            grown[: self._kept] = self._buffer[: self._kept]
            self._buffer = grown
        view = memoryview(self._buffer)[self._kept : self._kept + size]
        got, error = _read_into(self._stream, view, self._location())
        return self._kept + got, got < size, error

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


@dataclass(frozen=True, slots=True)
class _Span:
    """The lines at ``data[start:stop]`` of a run, the first numbered ``first``;
    ``newlines`` are the positions of their line ends."""

    start: int
    stop: int
    first: int
    newlines: np.ndarray

    def line_bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """Start and end (exclusive, without the newline) of every line."""
        return line_bounds(self.newlines, self.start, self.stop)


def _spans(piece: _Lines) -> list[_Span]:
    """Cut a run at line ends into spans of about _SPAN_BYTES (one line may make a span
    longer), each decoded on its own so a bad line costs only its span the fast path."""
    spans: list[_Span] = []
    newlines = piece.newlines
    start, first, low = 0, piece.first, 0
    while start < piece.end:
        high = int(np.searchsorted(newlines, start + _SPAN_BYTES, side="left"))
        if start + _SPAN_BYTES >= piece.end:
            high = len(newlines)
        elif high == low:  # one line longer than a span
            high = min(low + 1, len(newlines))
        stop = int(newlines[high - 1]) + 1 if high > low else piece.end
        if high == len(newlines):
            stop = piece.end
        span = _Span(start, stop, first, newlines[low:high])
        spans.append(span)
        start, first, low = stop, first + len(span.line_bounds()[0]), high
    return spans


_Decoded = tuple[pa.Table, pl.Series]  # rows decoded strictly, and their line numbers


@dataclass(frozen=True, slots=True)
class _Parts:
    """A run of lines decoded but not yet validated: what decoded strictly, and the lines
    left to decode one by one. Holds no reference to the reader's buffer."""

    decoded: list[_Decoded]
    leftovers: list[tuple[int, bytes]]


def _start(piece: _Lines, pool: ThreadPoolExecutor) -> tuple[list[_Span], list[Future[_Attempt]]]:
    """Cut a run into spans and start decoding each strictly on the pool."""
    spans = _spans(piece)
    buffer = pa.py_buffer(piece.data)
    attempts = [pool.submit(_arrow_json, buffer.slice(s.start, s.stop - s.start)) for s in spans]
    return spans, attempts


def _collect(piece: _Lines, spans: list[_Span], attempts: list[Future[_Attempt]]) -> _Parts:
    """Wait for the strict decodes of a run; take a span that failed apart with
    :func:`_careful` (the only step that reads the buffer after the decodes)."""
    parts = _Parts([], [])
    for span, future in zip(spans, attempts, strict=True):
        table = future.result().table
        numbers = None if table is None else _line_numbers(piece.data, span, table.num_rows)
        if table is not None and numbers is not None:
            parts.decoded.append((table, numbers))
            continue
        for part in _careful(_numbered(piece.data, span)):
            if isinstance(part, list):
                parts.leftovers.extend(part)
            else:
                parts.decoded.append(part)
    return parts


def _finish(parts: _Parts, where: str, context: _Context) -> pl.DataFrame:
    """Validate a decoded run: good rows in line order; rejects to the quarantine."""
    frames = _frames(parts.decoded)
    rejects = empty_rejects()
    if parts.leftovers:
        loose, rejects = _decode_one_by_one(parts.leftovers)
        frames.append(loose)
    return context.validated(frames, f"{where}:", rejects)


def _frames(decoded: list[_Decoded]) -> list[pl.DataFrame]:
    """Strictly decoded parts as loose frames: one if their schemas merge (the usual case)."""
    if not decoded:
        return []
    numbers = pl.concat([n for _, n in decoded])
    try:
        table = pa.concat_tables([t for t, _ in decoded], promote_options="permissive")
    except pa.ArrowException:  # an extra key typed differently in two parts
        return [_frame(t, n) for t, n in decoded]
    return [_frame(table, numbers)]


def _line_numbers(data: bytearray, span: _Span, rows: int) -> pl.Series | None:
    """The line number of each decoded row, or None if rows and lines do not match.

    Each non-blank line gives at least one row when the decode succeeds, so as many rows as
    non-blank lines means exactly one row per line, in order.
    """
    starts, ends = span.line_bounds()
    text = np.frombuffer(data, dtype=np.uint8)
    firsts = text[np.minimum(starts, len(text) - 1)]
    maybe_blank = (ends == starts) | _is_space(firsts)
    if not maybe_blank.any():
        numbers = np.arange(span.first, span.first + len(starts))
    else:
        blank = [not data[starts[i] : ends[i]].strip(_SPACE) for i in range(len(starts))]
        numbers = span.first + np.flatnonzero(~np.array(blank, dtype=bool))
    return pl.Series(numbers, dtype=pl.Int64) if len(numbers) == rows else None


def _is_space(codes: np.ndarray) -> np.ndarray:
    return np.asarray((codes == 32) | (codes == 9) | (codes == 13) | (codes == 10), dtype=bool)


def _numbered(data: bytearray, span: _Span) -> list[tuple[int, bytes]]:
    """The span's non-blank lines with their numbers."""
    starts, ends = span.line_bounds()
    lines = [bytes(data[a:b]) for a, b in zip(starts.tolist(), ends.tolist(), strict=True)]
    return [(span.first + i, line) for i, line in enumerate(lines) if line.strip(_SPACE)]


def _careful(numbered: list[tuple[int, bytes]]) -> Iterator[_Decoded | list[tuple[int, bytes]]]:
    """In order: parts that decode strictly, and lines left for line by line decoding.

    Lines the strict reader must not see (see :func:`_arrow_json`) are set aside first; each
    stretch between them is then decoded with :class:`_Isolator`.
    """
    isolator = _Isolator(numbered)
    start = 0
    for index in isolator.suspicious():
        yield from isolator.parts(start, index)
        yield [numbered[index]]
        start = index + 1
    yield from isolator.parts(start, len(numbered))


class _Isolator:
    """Find the lines of a run that break the strict decode.

    The lines are joined once; every attempt decodes a slice of that. The reader's error names
    the bad row for most faults (and stops reading there), so the rows before it go in one
    piece; otherwise the range is halved, down to groups of _LEAF_LINES lines.
    """

    def __init__(self, numbered: list[tuple[int, bytes]]) -> None:
        self._numbered = numbered
        self._joined = b"\n".join(line for _, line in numbered)
        self._buffer = pa.py_buffer(self._joined)
        self._starts = np.zeros(len(numbered) + 1, dtype=np.int64)
        np.cumsum([len(line) + 1 for _, line in numbered], out=self._starts[1:])

    def suspicious(self) -> list[int]:
        """Indexes of the lines the strict reader must not see, ascending."""
        bad: set[int] = set()
        if self._joined:
            text = np.frombuffer(self._joined, dtype=np.uint8)
            for index in np.flatnonzero(text[self._starts[:-1]] != ord("{")):
                if self._numbered[index][1].lstrip(_SPACE)[:1] != b"{":
                    bad.add(int(index))
        for match in _TWO_OBJECTS.finditer(self._joined):
            bad.add(int(np.searchsorted(self._starts, match.start(), side="right")) - 1)
        if _bad_utf8_row(self._buffer) is not None:
            bad.update(i for i, (_, line) in enumerate(self._numbered) if not _utf8(line))
        return sorted(bad)

    def parts(self, low: int, high: int) -> Iterator[_Decoded | list[tuple[int, bytes]]]:
        while high - low > _LEAF_LINES:
            attempt = self._decode(low, high)
            if attempt.table is not None:
                numbers = [number for number, _ in self._numbered[low:high]]
                yield attempt.table, pl.Series(numbers, dtype=pl.Int64)
                return
            bad = attempt.bad_row
            if bad is None or not 0 <= bad < high - low:
                middle = (low + high) // 2
                yield from self.parts(low, middle)
                yield from self.parts(middle, high)
                return
            if bad:
                yield from self.parts(low, low + bad)
            yield [self._numbered[low + bad]]
            low += bad + 1
        if high > low:
            yield self._numbered[low:high]

    def _decode(self, low: int, high: int) -> _Attempt:
        start, end = int(self._starts[low]), int(self._starts[high]) - 1
        attempt = _arrow_decode(self._buffer.slice(start, end - start))
        if attempt.table is not None and attempt.table.num_rows != high - low:
            return _Attempt(None, None)
        return attempt


def _utf8(line: bytes) -> bool:
    try:
        line.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


class _Attempt(NamedTuple):
    """A strict decode: the table, or None and (when known) the index of the first bad row."""

    table: pa.Table | None
    bad_row: int | None


def _arrow_json(buffer: pa.Buffer) -> _Attempt:
    """The strict decode of some lines as one block.

    Text whose first value is not an object never reaches the Arrow reader (a top-level
    ``null`` there crashes some versions of it), nor text that is not valid UTF-8 (the reader
    passes it through). A row with none of the required fields (a ``null`` line decodes so)
    fails the decode too, so such lines are judged line by line. The reader makes two rows of
    a line holding two objects: callers check the row count.
    """
    view = memoryview(buffer)
    if not starts_with_object(view):
        return _Attempt(None, 0)
    bad_text = _bad_utf8_row(buffer)
    if bad_text is not None:
        return _Attempt(None, bad_text)
    return _arrow_decode(buffer)


def _arrow_decode(buffer: pa.Buffer) -> _Attempt:
    """The strict decode itself, for text already known to pass :func:`_arrow_json`'s checks."""
    options = pj.ReadOptions(use_threads=False, block_size=buffer.size + 1)
    try:
        table = pj.read_json(pa.BufferReader(buffer), read_options=options, parse_options=_PARSE)
    except pa.ArrowException as exc:
        row = _ROW_IN_ERROR.search(str(exc))
        return _Attempt(None, int(row.group(1)) if row else None)
    bad = _first_odd_row(table)
    return _Attempt(table, None) if bad is None else _Attempt(None, bad)


def _bad_utf8_row(buffer: pa.Buffer) -> int | None:
    """None if the text is valid UTF-8 (the JSON reader does not check), else the index of the
    line holding the first invalid byte."""
    offsets = pa.py_buffer(np.array([0, buffer.size], dtype=np.int64).tobytes())
    text = pa.Array.from_buffers(pa.large_string(), 1, [None, offsets, buffer])
    try:
        text.validate(full=True)
    except pa.ArrowInvalid:
        raw: bytes = buffer.to_pybytes()
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            return raw[: exc.start].count(b"\n")
        return 0
    return None


def _first_odd_row(table: pa.Table) -> int | None:
    """The first row the fast path must not take: one with no required field at all (an empty
    object, or a ``null`` line), or whose ``extra`` is not an object of text, integers and
    booleans (the line by line path turns those into text its own way)."""
    masks = [_bools(table.column(name).is_null()) for name in schema.REQUIRED]
    odd = np.logical_and.reduce(masks)
    if "extra" in table.column_names:
        odd |= _odd_extra(table.column("extra"))
    rows = np.flatnonzero(odd)
    return int(rows[0]) if rows.size else None


def _odd_extra(extra: pa.ChunkedArray) -> np.ndarray:
    dtype = extra.type
    if pa.types.is_null(dtype):
        return np.zeros(len(extra), dtype=bool)
    if not pa.types.is_struct(dtype):
        return _bools(extra.is_valid())
    odd = np.zeros(len(extra), dtype=bool)
    combined = extra.combine_chunks()
    for field, child in zip(dtype, combined.flatten(), strict=True):
        flat = (
            pa.types.is_string(field.type)
            or pa.types.is_integer(field.type)
            or pa.types.is_boolean(field.type)
            or pa.types.is_null(field.type)
        )
        if not flat:
            odd |= _bools(child.is_valid())
    return odd


def _bools(array: pa.Array | pa.ChunkedArray) -> np.ndarray:
    return np.asarray(array.to_numpy(zero_copy_only=False), dtype=bool)


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
    columns = [pa.array([row.get(f.name) for row in rows], f.type) for f in _LOOSE]
    table = pa.Table.from_arrays(columns, schema=_LOOSE)  # far faster than polars from objects
    frame = _frame(table, pl.Series(numbers, dtype=pl.Int64))
    rejects = pl.DataFrame(rejected, schema=REJECT_SCHEMA, orient="row")
    return frame, rejects


def _decode_line(line: bytes) -> dict[str, Any] | tuple[str, str, str]:
    """A line as loose canonical fields, or (reason, detail, record JSON) if it cannot be."""
    try:
        value = orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        value = _arrow_line(line) if _NON_STANDARD.search(line) else None
        if value is None:
            return "malformed_json", f"malformed JSON: {exc}", _raw_record(line)
    if not isinstance(value, dict):
        return "not_an_object", f"line holds a JSON {_json_kind(value)}", _raw_record(line)
    loose: dict[str, Any] = {}
    for col, item in value.items():
        if item is None or col not in schema.EVENT_SCHEMA:
            continue
        to_text = _TEXT_OF.get(type(item))
        converted: object
        if col == "objects":
            converted = _objects(item)
        elif col == "extra":
            converted = _pairs(item)
        elif to_text is not None:
            converted = to_text(item)
        else:
            converted = _Bad(f"expected a single value, got an {_json_kind(item)}")
        if isinstance(converted, _Bad):
            return "bad_type", f"{col}: {converted.why}", _object_record(value)
        loose[col] = converted
    return loose


@dataclass(frozen=True, slots=True)
class _Bad:
    why: str


#: JSON scalars as text: numbers and booleans as JSON spells them (non-finite floats, which
#: only the strict reader lets in, as text that validate() reads back and then rejects).
_TEXT_OF: Final[dict[type, Callable[[Any], str]]] = {
    str: str,
    int: str,
    bool: lambda value: "true" if value else "false",
    float: repr,
}


def _json_kind(value: object) -> str:
    if value is None:
        return "null"
    kinds = {dict: "object", list: "array", str: "string", bool: "boolean"}
    return kinds.get(type(value), "number")


def _objects(item: object) -> list[str | None] | _Bad:
    if isinstance(item, list) and all(x is None or type(x) is str for x in item):
        return item
    return _Bad("expected a list of strings")


def _pairs(item: object) -> list[dict[str, str]] | _Bad:
    if not isinstance(item, dict):
        return _Bad("expected an object")
    return [
        {"key": key, "value": _as_text(value)}
        for key, value in sorted(item.items())
        if value is not None
    ]


def _as_text(value: object) -> str:
    to_text = _TEXT_OF.get(type(value))
    return to_text(value) if to_text is not None else orjson.dumps(value).decode()


def _arrow_line(line: bytes) -> dict[str, Any] | None:
    """A line the strict decoder takes although it is not standard JSON (``NaN``, ``Inf``), as
    the strict decoder reads it; None if it does not take it either. So the outcome for such
    a line is the same whether it is decoded with its neighbours or alone."""
    table = _arrow_json(pa.py_buffer(line)).table
    if table is None or table.num_rows != 1:
        return None
    row: dict[str, Any] = table.to_pylist()[0]
    return row


def _raw_record(line: bytes) -> str:
    """A line that is not a JSON object, as a JSON string: decoded, cut and redacted."""
    text = line[:_RAW_CHARS].decode("utf-8", errors="replace")
    return orjson.dumps(redact_text(text)).decode()


def _object_record(value: dict[str, Any]) -> str:
    """The canonical fields of a decoded line as JSON text, ``statement_text`` redacted."""
    fields = {k: v for k, v in value.items() if k in schema.EVENT_SCHEMA}
    text = fields.get("statement_text")
    if text is not None:
        fields["statement_text"] = redact_sql(text) if isinstance(text, str) else None
    return orjson.dumps(fields).decode()


# --- Parquet --------------------------------------------------------------------------------


def _parquet(path: Path, compression: str, context: _Context) -> Iterator[pl.DataFrame]:
    with _parquet_path(path, compression) as local:
        if local is None:
            return
        try:
            parquet = pq.ParquetFile(local)
        except (pa.ArrowException, OSError) as exc:
            raise InputError(f"cannot read {path} as Parquet: {exc}") from exc
        columns = [name for name in parquet.schema_arrow.names if name in schema.EVENT_SCHEMA]
        groups = _RowGroups(parquet, pl.scan_parquet(local).select(columns), columns, str(path))
        for group in range(parquet.metadata.num_row_groups):
            frame = groups.read(group)
            frame = frame.with_columns(pl.int_range(0, frame.height, eager=True).alias(LOC))
            yield context.validated([frame], f"{path}:{group}:", empty_rejects())


class _RowGroups:
    """Reads one row group at a time: polars first (fast), Arrow column by column when polars
    cannot hold a column's type, InputError when the row group cannot be read at all."""

    def __init__(
        self, parquet: pq.ParquetFile, lazy: pl.LazyFrame, columns: list[str], where: str
    ) -> None:
        self._parquet = parquet
        self._lazy = lazy
        self._columns = columns
        self._where = where
        sizes = [parquet.metadata.row_group(g).num_rows for g in range(parquet.num_row_groups)]
        self._offsets = [0, *itertools.accumulate(sizes)]
        self._sizes = sizes

    def read(self, group: int) -> pl.DataFrame:
        size = self._sizes[group]
        if not self._columns:
            return pl.DataFrame(height=size)
        try:
            frame = self._lazy.slice(self._offsets[group], size).collect()
            if frame.height == size:
                return frame
        except (pl.exceptions.PolarsError, OSError):
            pass
        try:
            return _arrow_frame(self._parquet.read_row_group(group, columns=self._columns))
        except (pa.ArrowException, OSError) as exc:
            location = Location(self._where, row_group=group, row=0)
            raise InputError(f"cannot read {self._where}: {exc}", location=location) from exc


@contextmanager
def _parquet_path(path: Path, compression: str) -> Iterator[str | None]:
    """A path Parquet can seek in: the file itself, or its bytes decompressed into a temporary
    file (streamed; deleted afterwards). None for an empty file."""
    if not compression:
        try:
            empty = path.stat().st_size == 0
        except OSError as exc:
            raise InputError(f"cannot open {path}: {exc.strerror or exc}") from exc
        yield None if empty else str(path)
        return
    with _opened(path, compression) as stream, tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / "decompressed.parquet"
        with local.open("wb") as out:
            try:
                shutil.copyfileobj(stream, out, _MIN_BLOCK)
            except _READ_ERRORS as exc:
                raise InputError(f"cannot read {path}: {exc}") from exc
        yield str(local) if local.stat().st_size else None


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


# --- bytes already in memory (tailed files) ---------------------------------------------------

#: One pool for every line parser: a parser is made per tailed file, per HTTP body, per stream
#: fetch; its decode tasks never wait on each other, so they can share threads (made on demand).
_LINE_POOL: Final = ThreadPoolExecutor(
    max_workers=min(_THREADS, os.cpu_count() or 1), thread_name_prefix="jsonl"
)


def line_parser(
    quarantine: Quarantine, default_tz: str | None = None
) -> Callable[[bytes, str, int, int], pl.DataFrame]:
    """A function parsing complete JSON lines held in memory, as :func:`read_events` parses a
    file: ``parse(data, where, first_line, count)`` returns the good events of the ``count``
    lines in ``data`` (numbered from ``first_line`` for rejects' locations, ``where:line``) and
    quarantines the rest. Used by sources that tail growing files."""
    check_zone(default_tz)
    context = _Context(1 << 30, quarantine, default_tz, _LINE_POOL)

    def parse(data: bytes, where: str, first_line: int, count: int) -> pl.DataFrame:
        buffer = bytearray(data)
        if buffer.startswith(_BOM) and first_line == 1:
            buffer[:3] = b"   "
        if not buffer.endswith(b"\n"):
            buffer.extend(b"\n")
        newlines = np.flatnonzero(np.frombuffer(buffer, dtype=np.uint8) == 0x0A)
        piece = _Lines(buffer, len(buffer), first_line, newlines, count)
        spans, attempts = _start(piece, _LINE_POOL)
        return _finish(_collect(piece, spans, attempts), where, context)

    return parse

"""Writing a sample to disk: Parquet, JSON lines (plain, gzip or zstd) and the labels.

Every writer is byte-deterministic (no timestamps in gzip headers, single-threaded zstd) and
writes through a temporary file that is renamed into place, so a crash never leaves a
half-written file under the final name.
"""

from __future__ import annotations

import gzip
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Final, Literal, Protocol

import orjson
import polars as pl
import pyarrow.parquet as pq
import zstandard

from detector.errors import UnknownNameError
from detector.schema import COLUMNS, to_arrow

Compression = Literal[None, "gzip", "zstd"]
JSONL_SUFFIXES: Final[dict[str | None, str]] = {None: "", "gzip": ".gz", "zstd": ".zst"}
ROW_GROUP_SIZE: Final = 100_000
_CHUNK_ROWS: Final = 20_000
_TIME_FORMAT: Final = "%Y-%m-%dT%H:%M:%S%.6fZ"


def jsonl_name(compression: str | None) -> str:
    """``events.jsonl`` with the suffix of ``compression``; unknown names are an error."""
    if compression not in JSONL_SUFFIXES:
        raise UnknownNameError(
            "JSON lines compression", str(compression), [str(k) for k in JSONL_SUFFIXES]
        )
    return "events.jsonl" + JSONL_SUFFIXES[compression]


@contextmanager
def _replacing(path: Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` and move it over ``path`` on success."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_parquet(frame: pl.DataFrame, path: Path) -> None:
    """Canonical Parquet: the Arrow schema from :mod:`detector.schema`, zstd, ~100k-row groups."""
    with _replacing(path) as tmp:
        pq.write_table(to_arrow(frame), tmp, compression="zstd", row_group_size=ROW_GROUP_SIZE)


def jsonl_records(frame: pl.DataFrame) -> Iterator[bytes]:
    """Canonical JSON lines in chunks: one object per event in schema order, ``event_time`` as
    ISO 8601 with microseconds and ``Z``, ``extra`` as an object, null fields left out."""
    for offset in range(0, frame.height, _CHUNK_ROWS):
        chunk = frame.slice(offset, _CHUNK_ROWS)
        names = [c for c in COLUMNS if c != "extra"]
        columns = [chunk[c].to_list() for c in names[1:]]
        columns.insert(0, chunk["event_time"].dt.strftime(_TIME_FORMAT).to_list())
        extras = chunk["extra"].to_list()
        lines = []
        for row, extra in zip(zip(*columns, strict=True), extras, strict=True):
            record = {k: v for k, v in zip(names, row, strict=True) if v is not None}
            if extra:
                record["extra"] = {kv["key"]: kv["value"] for kv in extra}
            lines.append(orjson.dumps(record))
        lines.append(b"")
        yield b"\n".join(lines)


class _Writer(Protocol):
    def write(self, data: bytes, /) -> int: ...

    def close(self) -> None: ...


def _open_compressed(raw: BinaryIO, compression: Compression) -> _Writer:
    """A compressing writer over ``raw`` (``raw`` itself when uncompressed). Closing it
    flushes the compressed stream but leaves ``raw`` open."""
    if compression == "gzip":
        return gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=6, mtime=0)
    if compression == "zstd":
        writer: _Writer = zstandard.ZstdCompressor(level=3).stream_writer(raw, closefd=False)
        return writer
    return raw


def write_jsonl(frame: pl.DataFrame, path: Path, compression: Compression = None) -> None:
    """Write :func:`jsonl_records` to ``path``, compressed as asked."""
    jsonl_name(compression)
    with _replacing(path) as tmp, tmp.open("wb") as raw:
        out = _open_compressed(raw, compression)
        for block in jsonl_records(frame):
            out.write(block)
        if out is not raw:
            out.close()


def write_json(document: object, path: Path) -> None:
    """Pretty-printed JSON (used for the labels)."""
    with _replacing(path) as tmp:
        tmp.write_bytes(orjson.dumps(document, option=orjson.OPT_INDENT_2) + b"\n")

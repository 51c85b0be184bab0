"""The journal: what arrives over HTTP or stdin is on disk before it is acknowledged.

An HTTP body is decoded and validated at once (so the caller learns how many records were
accepted and rejected), then its good events are written as one Parquet file, fsynced and
renamed into the journal directory, which a :class:`~detector.sources.directory.DirectorySource`
reads like any spool directory. Only then does the request get its 202. Lines from stdin are
cut into segments the same way, kept in their own format for the source's feeder. The service
deletes a journal file once a feature-state snapshot covers it.
"""

from __future__ import annotations

import io
import itertools
import os
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Final

import orjson
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from detector import schema
from detector.errors import InputError
from detector.quarantine import Quarantine
from detector.sources.directory import RoutedQuarantine
from detector.sources.feeders import CanonicalLines, Collector
from detector.sources.files import read_events

#: Content types POST /v1/events understands, by body kind.
CONTENT_TYPES: Final = {
    "application/json": "json",
    "application/x-ndjson": "ndjson",
    "application/ndjson": "ndjson",
    "application/jsonl": "ndjson",
    "application/jsonlines": "ndjson",
    "application/vnd.apache.parquet": "parquet",
    "application/x-parquet": "parquet",
    "application/vnd.apache.arrow.stream": "arrow",
    "application/vnd.apache.arrow.file": "arrow",
}
_SHOWN_ERRORS: Final = 5


@dataclass(slots=True)
class Accepted:
    accepted: int
    rejected: int
    errors: list[dict[str, str]] = field(default_factory=list)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Journal:
    """Durable, ordered segments in ``directory`` (names sort in arrival order)."""

    def __init__(self, directory: Path, suffix: str) -> None:
        self.directory = directory
        self.suffix = suffix
        directory.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._seq = itertools.count()
        self._prefix = f"{time.time_ns():020d}"

    def write(self, fill: Callable[[IO[bytes]], None]) -> Path:
        """A new segment whose bytes ``fill`` writes; on disk (fsynced) when this returns."""
        with self._lock:
            name = f"{self._prefix}-{next(self._seq):012d}{self.suffix}"
        final = self.directory / name
        tmp = self.directory / f".{name}.tmp"
        with tmp.open("wb") as fh:
            fill(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, final)
        _fsync_dir(self.directory)
        return final


    def write_bytes(self, data: bytes) -> Path:
        def fill(fh: IO[bytes]) -> None:
            fh.write(data)

        return self.write(fill)


class HttpIngest:
    """Decode, validate and journal request bodies."""

    def __init__(
        self,
        journal: Journal,
        quarantine: Quarantine,
        spool_tmp: Path,
        on_reject: Callable[[pl.DataFrame], None] | None = None,
    ) -> None:
        self.journal = journal
        self.rejects = RoutedQuarantine(quarantine, on_reject)
        self.spool_tmp = spool_tmp
        spool_tmp.mkdir(parents=True, exist_ok=True)

    def ingest(self, body: bytes, kind: str, request_id: str) -> Accepted:
        """Accept ``body`` of ``kind`` (a value of :data:`CONTENT_TYPES`). InputError when the
        body as a whole cannot be read (not JSON, not Parquet...)."""
        collect = Collector()
        where = f"http:{request_id}"
        if kind in ("json", "ndjson"):
            lines = _json_array_lines(body) if kind == "json" else body
            parsed = CanonicalLines(where).feed(lines, final=True)
            events, rejected = parsed.events, parsed.rejects
        elif kind in ("parquet", "arrow"):
            events, rejected = self._tabular(body, kind, where, collect)
        else:
            raise InputError(f"unsupported body kind {kind!r}")
        self.rejects.write(rejected)
        if events.height:
            self.journal.write(lambda fh: events.write_parquet(fh, compression="lz4"))
        errors = [
            {"location": r["location"], "reason": r["reason"], "detail": r["detail"]}
            for r in rejected.head(_SHOWN_ERRORS).iter_rows(named=True)
        ]
        return Accepted(events.height, rejected.height, errors)

    def _tabular(
        self, body: bytes, kind: str, where: str, collect: Collector
    ) -> tuple[pl.DataFrame, pl.DataFrame]:
        tmp = self.spool_tmp / f".upload-{uuid.uuid4().hex}.parquet"
        try:
            if kind == "arrow":
                table = _arrow_table(body)
                pq.write_table(table, tmp, compression="none")
            else:
                tmp.write_bytes(body)
            frames = list(read_events([tmp], batch_rows=1 << 30, quarantine=collect))
        finally:
            tmp.unlink(missing_ok=True)
        events = pl.concat(frames) if frames else schema.empty_events()
        rejected = collect.take()
        name = str(tmp)
        if rejected.height:  # name the request, not the temporary file
            rejected = rejected.with_columns(
                location=pl.col("location").str.replace(name, where, literal=True)
            )
        return events, rejected


def _json_array_lines(body: bytes) -> bytes:
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InputError(f"body is not JSON: {exc}") from None
    if not isinstance(value, list):
        raise InputError("a JSON body must be an array of events (or send NDJSON)")
    return b"\n".join(orjson.dumps(item) for item in value)


def _arrow_table(body: bytes) -> pa.Table:
    for opener in (pa.ipc.open_stream, pa.ipc.open_file):
        try:
            return opener(io.BytesIO(body)).read_all()
        except (pa.ArrowInvalid, OSError):
            continue
    raise InputError("body is not an Arrow IPC stream or file")

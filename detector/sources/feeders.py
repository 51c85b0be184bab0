"""Incremental parsers for tailed files: bytes in, canonical events out, resumable at a byte.

A feeder's :meth:`~Feeder.feed` takes bytes that start at a record boundary and returns the
events of every complete record in them, the rejected records, and ``consumed``: how many bytes
those records span. The caller keeps ``data[consumed:]`` (a partial last line, or lines an
adapter holds back to merge) and feeds it again with what follows, so a position saved at a
consumed offset never splits a record. ``final=True`` says no more bytes will come: the feeder
then consumes everything, a last line without a newline included.

:class:`CanonicalLines` reads JSON lines in the canonical schema; the audit-log adapters
provide feeders of their own (see :mod:`detector.formats`, which names them all).
"""

from __future__ import annotations

from typing import Any, Protocol

import polars as pl

from detector import schema
from detector.adapters.base import Parsed
from detector.quarantine import Quarantine
from detector.sources import files
from detector.validation import REJECT_SCHEMA, empty_rejects


class Feeder(Protocol):
    """What a source feeds bytes to: the audit-log adapters, or :class:`CanonicalLines`."""

    def feed(self, data: bytes, *, final: bool = False, idle: bool = False) -> Parsed: ...


class Collector(Quarantine):
    """A quarantine that keeps what it is given, for the caller to route."""

    def __init__(self) -> None:
        super().__init__(None)
        self.frames: list[pl.DataFrame] = []

    def write(self, rejects: pl.DataFrame) -> None:
        if rejects.height:
            self.frames.append(rejects)

    def write_raw(self, location: str, reason: str, detail: str, text: str | bytes) -> None:
        row = {"location": location, "reason": reason, "detail": detail, "record": None}
        self.frames.append(rejects_frame([row]))

    def take(self) -> pl.DataFrame:
        out = pl.concat(self.frames) if self.frames else empty_rejects()
        self.frames = []
        return out


class CanonicalLines:
    """JSON lines in the canonical schema (the same decoding and validation as batch reads).
    ``line`` is the number of the first line of the next feed, for rejects' locations."""

    def __init__(self, where: str, *, line: int = 1, default_tz: str | None = None) -> None:
        self.where = where
        self.line = line
        self._rejects = Collector()
        self._parse = files.line_parser(self._rejects, default_tz)

    def feed(self, data: bytes, *, final: bool = False, idle: bool = False) -> Parsed:
        """``idle`` changes nothing here: every complete line is emitted at once anyway."""
        end = len(data) if final else data.rfind(b"\n") + 1
        if end <= 0:
            return Parsed(schema.empty_events(), empty_rejects(), 0)
        body = data[:end]
        count = body.count(b"\n") + (0 if body.endswith(b"\n") else 1)
        events = self._parse(body, self.where, self.line, count)
        self.line += count
        return Parsed(events, self._rejects.take(), end)


def rejects_frame(rows: list[dict[str, Any]]) -> pl.DataFrame:
    return pl.DataFrame(rows, schema=REJECT_SCHEMA)

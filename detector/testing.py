"""Test doubles shipped with the package, so a pipeline test is a few lines.

>>> frame = make_events([{"db_user": "ann", "statement_text": "SELECT 1"}])
>>> frame.height, frame["action"][0], str(frame["event_time"].dtype)
(1, 'read', "Datetime(time_unit='us', time_zone='UTC')")
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import polars as pl

from detector.schema import EVENT_SCHEMA, empty_events

_DEFAULTS: dict[str, Any] = {
    "action": "read",
    "source_format": "canonical",
    "db_system": "postgresql",
    "command": "SELECT",
}
_START = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)


def make_events(
    rows: Iterable[Mapping[str, Any]],
    *,
    start: datetime = _START,
    step: timedelta = timedelta(seconds=1),
) -> pl.DataFrame:
    """Canonical events from partial dicts. Missing ``event_time`` values are spaced ``step``
    apart from ``start``; missing ``db_user`` is ``app``; other required fields get defaults."""
    records = []
    for i, row in enumerate(rows):
        rec = {**_DEFAULTS, "db_user": "app", "event_time": start + i * step, **row}
        records.append({col: rec.get(col) for col in EVENT_SCHEMA})
    if not records:
        return empty_events()
    return pl.DataFrame(records, schema=EVENT_SCHEMA)


class ListSource:
    """A source over in-memory frames: ``batches()`` yields them in order."""

    def __init__(self, frames: Iterable[pl.DataFrame]) -> None:
        self._frames = list(frames)

    def batches(self) -> Iterator[pl.DataFrame]:
        yield from self._frames

    def close(self) -> None:
        self._frames = []


class CollectingSink:
    """A sink that keeps what it is given: ``write_batch`` appends, ``rows`` reads back."""

    def __init__(self) -> None:
        self.batches: list[pl.DataFrame] = []
        self.closed = False

    def write_batch(self, batch: pl.DataFrame) -> None:
        self.batches.append(batch)

    def rows(self) -> list[dict[str, Any]]:
        return [row for batch in self.batches for row in batch.iter_rows(named=True)]

    def close(self) -> None:
        self.closed = True

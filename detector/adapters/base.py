"""What every audit-log adapter shares: the :class:`Parsed` result, reject reasons, the
bounded session memory, the bounds on how long a statement is held back and the rule that
decides how much of a chunk is consumed."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from itertools import islice
from typing import Final, Generic, Protocol, TypeVar

import numpy as np
import polars as pl
import pyarrow as pa

from detector import schema
from detector.quarantine import redact_text
from detector.validation import REJECT_SCHEMA

#: Reasons an adapter rejects a record for (besides :data:`detector.validation.REASONS`).
ADAPTER_REASONS: Final[dict[str, str]] = {
    "malformed_line": "a line does not have the shape of the format (prefix, CSV, JSON)",
    "bad_audit_payload": "an AUDIT: payload is not a valid pgaudit CSV record",
    "unknown_class": "a pgaudit CLASS or MariaDB operation that is not known",
    "unknown_session": "the principal is not on the line and the session's start was not seen",
    "invalid_utf8": "a record is not valid UTF-8",
    "duplicate_statement": "a line of a statement that has already ended (sent again by a log "
    "shipper, or logged after the statement was released)",
}

#: A statement whose last line is followed by this many records (none of its own session)
#: counts as complete when neither ``final`` nor ``idle`` is given; so do the next two bounds.
SETTLE_RECORDS: Final = 512
#: ... or by records spanning this many bytes: what an adapter holds back behind a statement
#: stays below this (the directory source reads 8 MiB at a time).
SETTLE_BYTES: Final = 1024 * 1024
#: ... or by a record logged this many seconds after the statement's first line (log time,
#: the wall clock as written, to the second).
SETTLE_SECONDS: Final = 5.0
#: Sessions remembered across feeds (oldest forgotten first).
MAX_SESSIONS: Final = 65_536
#: Emitted statements remembered by session and statement id, so that a line of one that
#: comes again is rejected as ``duplicate_statement`` (oldest forgotten first).
MAX_STATEMENTS: Final = 65_536
#: Longest raw text kept in a reject's ``record``.
RAW_CHARS: Final = 4096


@dataclass(frozen=True, slots=True)
class Parsed:
    """What one :meth:`Adapter.feed` call produced.

    ``events`` has exactly :data:`detector.schema.EVENT_SCHEMA`; ``rejects`` has
    :data:`detector.validation.REJECT_SCHEMA`; ``consumed`` is how many bytes from the start of
    the data fed are fully accounted for (emitted, rejected or skipped); ``skipped`` counts
    records that are not audit records (server chatter), ``skipped_kinds`` by kind.
    """

    events: pl.DataFrame
    rejects: pl.DataFrame
    consumed: int
    skipped: int = 0
    skipped_kinds: dict[str, int] = field(default_factory=dict)


class Adapter(Protocol):
    """The streaming contract (see :mod:`detector.adapters`)."""

    name: str

    def feed(self, data: bytes, *, final: bool = False, idle: bool = False) -> Parsed: ...


K = TypeVar("K")
V = TypeVar("V")


class BoundedMap(Generic[K, V]):
    """A dict that forgets its oldest entries past ``limit`` (a touched key is new again)."""

    def __init__(self, limit: int = MAX_SESSIONS) -> None:
        self._data: OrderedDict[K, V] = OrderedDict()
        self._limit = limit

    def get(self, key: K) -> V | None:
        return self._data.get(key)

    def put(self, key: K, value: V) -> None:
        self._data[key] = value
        self._data.move_to_end(key)
        while len(self._data) > self._limit:
            self._data.popitem(last=False)

    def pop(self, key: K) -> None:
        self._data.pop(key, None)

    def __len__(self) -> int:
        return len(self._data)


class RecentKeys(dict[K, None]):
    """The latest ``limit`` distinct keys added, the oldest forgotten first (a dict, so that
    ``key in keys`` costs a lookup and no call)."""

    def __init__(self, limit: int = MAX_STATEMENTS) -> None:
        super().__init__()
        self.limit = limit

    def add(self, keys: Iterable[K]) -> None:
        self.update(dict.fromkeys(keys))
        excess = len(self) - self.limit
        if excess > 0:
            for key in list(islice(self, excess)):
                del self[key]


class LineCounter:
    """Tracks the 1-based line number of the first byte of the next feed."""

    def __init__(self) -> None:
        self.line = 1

    def advance(self, data: bytes, consumed: int) -> None:
        self.line += data.count(b"\n", 0, consumed)


def newline_positions(data: bytes) -> np.ndarray:
    """Positions of every ``\\n`` in ``data``."""
    return np.flatnonzero(np.frombuffer(data, dtype=np.uint8) == 0x0A)


def line_bounds(newlines: np.ndarray, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
    """Start and end (exclusive, without the newline) of every line of ``[start, stop)``,
    given the positions of its newlines."""
    starts = np.concatenate(([start], newlines + 1))
    ends = np.concatenate((newlines, [stop]))
    if len(newlines) and newlines[-1] == stop - 1:
        starts, ends = starts[:-1], ends[:-1]  # nothing follows the last newline
    return starts, ends


def raw_record(raw: bytes | str) -> str:
    """A raw line as the JSON text of a reject's ``record``: decoded, cut and redacted."""
    import orjson

    if isinstance(raw, str):
        raw = raw[: RAW_CHARS * 2].encode("utf-8", "surrogateescape")
    text = raw[: RAW_CHARS * 2].decode("utf-8", "replace")
    return orjson.dumps(redact_text(text[:RAW_CHARS])).decode()


@dataclass(slots=True)
class RejectList:
    """Rejects gathered while a chunk is read; ``starts`` are byte offsets (for the cut)."""

    starts: list[int] = field(default_factory=list)
    locations: list[str] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)
    details: list[str] = field(default_factory=list)
    records: list[str] = field(default_factory=list)

    def add(self, start: int, location: str, reason: str, detail: str, raw: bytes | str) -> None:
        self.starts.append(start)
        self.locations.append(location)
        self.reasons.append(reason)
        self.details.append(detail)
        self.records.append(raw_record(raw))

    def frame(self, cut: int | None = None) -> pl.DataFrame:
        """Rejects that start before ``cut`` (all when None), with their ``_start``."""
        df = pl.DataFrame(
            {
                "_start": pl.Series(self.starts, dtype=pl.Int64),
                "location": pl.Series(self.locations, dtype=pl.String),
                "reason": pl.Series(self.reasons, dtype=pl.String),
                "detail": pl.Series(self.details, dtype=pl.String),
                "record": pl.Series(self.records, dtype=pl.String),
            }
        )
        return df if cut is None else df.filter(pl.col("_start") < cut)


def log_seconds(times: pl.Series) -> np.ndarray:
    """Each log time's wall clock in seconds (from its ``YYYY-MM-DD HH:MM:SS`` start, a ``T``
    allowed between date and time; the zone is not read: one stream writes one zone), NaN
    where a time is missing or not of that shape."""
    text = times.cast(pl.String)
    stamp = (text.str.slice(0, 10) + " " + text.str.slice(11, 8)).str.strptime(
        pl.Datetime("ms"), "%Y-%m-%d %H:%M:%S", strict=False
    )
    seconds = stamp.dt.epoch("s").cast(pl.Float64).to_numpy()
    return np.asarray(seconds, dtype=np.float64)


def followed_in_time(first: np.ndarray, later: np.ndarray, at: np.ndarray) -> np.ndarray:
    """Which statements are followed by a record logged :data:`SETTLE_SECONDS` or more after
    their first line. ``first`` is the log time of each statement's first line, ``later`` the
    log times of the records that may follow them (in stream order) and ``at[i]`` the first of
    those that comes after statement ``i``'s last line; times in seconds (:func:`log_seconds`),
    NaN where unknown."""
    out = np.zeros(len(first), dtype=bool)
    inside = at < later.size
    if later.size == 0 or not inside.any():
        return out
    latest = np.fmax.accumulate(later[::-1])[::-1]  # the latest time from each record on
    with np.errstate(invalid="ignore"):
        out[inside] = latest[at[inside]] >= first[inside] + SETTLE_SECONDS
    return out


def cut_point(first: np.ndarray, last: np.ndarray, complete: np.ndarray, end: int) -> int:
    """The byte offset before which everything may be emitted.

    ``first``/``last`` are the byte offsets of the first and last record of each group and
    ``complete`` says which groups are known to be whole. The cut starts at ``end`` (the end of
    the last complete record), moves back to the first record of every incomplete group, and
    then to the first record of every group that still has a record at or past the cut, so a
    group is emitted whole or not at all.
    """
    cut = end
    if len(first) == 0:
        return cut
    pending = ~complete
    if pending.any():
        cut = min(cut, int(first[pending].min()))
    while True:
        straddling = last >= cut
        if not straddling.any():
            return cut
        new = min(cut, int(first[straddling].min()))
        if new == cut:
            return cut
        cut = new


def finish_rejects(frames: list[pl.DataFrame]) -> pl.DataFrame:
    """Concatenate reject frames (with ``_start``) in byte order, as REJECT_SCHEMA."""
    frames = [f for f in frames if f.height]
    if not frames:
        return pl.DataFrame(schema=REJECT_SCHEMA)
    merged = pl.concat(frames, how="diagonal_relaxed").sort("_start", maintain_order=True)
    return merged.select(pl.col(c).cast(t) for c, t in REJECT_SCHEMA.items())


def no_events() -> pl.DataFrame:
    return schema.empty_events()


def kv_list(frame: pl.DataFrame, keys: Sequence[str], name: str = "extra") -> pl.Series:
    """The canonical ``extra`` column (a list of key/value structs per row) holding ``keys``
    of ``frame`` as text: built from flat Arrow arrays, several times faster than a list of
    structs assembled expression by expression."""
    width = len(keys)
    values = (
        frame.select(pl.concat_list(pl.col(k).cast(pl.String) for k in keys).alias("v"))
        .to_series()
        .explode()
    )
    names = pl.Series("key", list(keys) * frame.height, dtype=pl.String)
    inner = pl.DataFrame({"key": names, "value": values}).to_struct("kv").to_arrow()
    offsets = pa.array(np.arange(0, width * frame.height + 1, width, dtype=np.int32))
    return pl.Series(name, pa.ListArray.from_arrays(offsets, inner))


_JSON_SPACE: Final = frozenset(b" \t\r\n")


def starts_with_object(view: memoryview | bytes) -> bool:
    """Whether the first JSON value in ``view`` is an object. Arrow's JSON reader (pyarrow
    26) crashes the process on text whose first value is a top-level ``null``, so no text
    that fails this reaches it."""
    for byte in view:
        if byte not in _JSON_SPACE:
            return bool(byte == ord("{"))
    return False

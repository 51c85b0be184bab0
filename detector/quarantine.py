"""Where rejected records go: a JSON lines file plus counts by reason.

Each rejected record becomes one line ``{"time", "location", "reason", "detail", "record"}``.
Guarantees:

* ``record`` never holds an unredacted SQL literal from ``statement_text``: an object record has
  its ``statement_text`` passed through :func:`detector.redact.redact_sql` of unknown dialect
  (whatever PostgreSQL or MySQL would read as a literal goes; again, if the caller
  already did), and a record that is text (a line that was not JSON) goes through
  :func:`redact_text`, which redacts each JSON string in it on its own.
* ``record`` is at most :data:`MAX_RECORD_BYTES` of JSON; a longer one is stored as the first
  ``MAX_RECORD_BYTES`` of its text (redacted first) with ``"truncated": true`` on the line.
* The file is opened lazily in append mode (parents created) on the first record, and each
  :meth:`Quarantine.write` call ends with a flush, so a batch is on disk when it returns.
* :attr:`Quarantine.counts` and :attr:`Quarantine.total` count every record written since the
  object was made; :class:`NullQuarantine` keeps the counts and writes nothing.
"""

from __future__ import annotations

import datetime as dt
import re
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Final

import orjson
import polars as pl

from detector.redact import redact_sql

#: Largest ``record`` kept whole, in bytes of JSON.
MAX_RECORD_BYTES: Final = 16 * 1024

Clock = Callable[[], dt.datetime]


def _utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class Quarantine:
    """Append rejected records to a JSON lines file at ``path`` and count them by reason.

    ``clock`` gives the ``time`` written on each line (timezone-aware; defaults to now in UTC).
    Use as a context manager or call :meth:`close`; writing after close reopens the file.
    """

    def __init__(self, path: str | Path | None, *, clock: Clock = _utc_now) -> None:
        self.path = Path(path) if path is not None else None
        self.counts: dict[str, int] = Counter()
        self._clock = clock
        self._file: IO[bytes] | None = None

    @property
    def total(self) -> int:
        """How many records have been quarantined."""
        return sum(self.counts.values())

    def write(self, rejects: pl.DataFrame) -> None:
        """Quarantine every row of a rejects frame (columns ``location``, ``reason``,
        ``detail``, ``record`` as made by :func:`detector.validation.validate`)."""
        if rejects.height == 0:
            return
        rows = rejects.select("location", "reason", "detail", "record").iter_rows()
        self._emit(
            [
                (loc, reason, detail, _record_from_json(record))
                for loc, reason, detail, record in rows
            ]
        )

    def write_raw(self, location: str, reason: str, detail: str, text: str | bytes) -> None:
        """Quarantine one raw input line or blob that is not a JSON record; it is kept as text,
        redacted and truncated."""
        if isinstance(text, bytes):
            text = text[: MAX_RECORD_BYTES * 4].decode("utf-8", errors="replace")
        self._emit([(location, reason, detail, _record_from_text(text))])

    def close(self) -> None:
        """Close the file (if one was opened). Counts are kept."""
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> Quarantine:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _emit(self, items: list[tuple[str | None, str, str | None, _Record]]) -> None:
        for _, reason, _, _ in items:
            self.counts[reason] += 1
        if self.path is None:
            return
        time = self._clock().astimezone(dt.UTC).isoformat().replace("+00:00", "Z")
        lines = [_line(time, loc, reason, detail, record) for loc, reason, detail, record in items]
        handle = self._open()
        handle.write(b"".join(lines))
        handle.flush()

    def _open(self) -> IO[bytes]:
        if self._file is None:
            assert self.path is not None
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("ab")
        return self._file


class NullQuarantine(Quarantine):
    """Counts rejected records by reason and stores nothing."""

    def __init__(self, *, clock: Clock = _utc_now) -> None:
        super().__init__(None, clock=clock)


class _Record:
    """A record ready for the line: its JSON bytes, and whether it was cut short."""

    __slots__ = ("json", "truncated")

    def __init__(self, json: bytes, *, truncated: bool) -> None:
        self.json = json
        self.truncated = truncated


def _record_from_json(text: str | None) -> _Record:
    """A record given as JSON text; anything that does not parse is treated as raw text."""
    if text is None:
        return _Record(b"null", truncated=False)
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError:
        return _record_from_text(text)
    if isinstance(value, dict) and isinstance(value.get("statement_text"), str):
        value["statement_text"] = redact_sql(value["statement_text"])
    elif isinstance(value, str):
        value = redact_text(value)
    return _fit(orjson.dumps(value))


def _record_from_text(text: str) -> _Record:
    return _fit(orjson.dumps(redact_text(text)))


_JSON_STRING: Final = re.compile(r'"(?:[^"\\]|\\.)*"|"(?:[^"\\]|\\.)*\\?$')


#: What may stand between the strings of a JSON text: structure, numbers and literals.
_JSON_BETWEEN: Final = re.compile(
    r"[\s{}\[\],:0-9eE.+\-]*(?:(?:true|false|null)[\s{}\[\],:0-9eE.+\-]*)*"
)


def redact_text(text: str) -> str:
    """Redact raw text that may be broken JSON. Text that reads as JSON strings with only JSON
    structure between them has each string redacted on its own (unescaped first), so a quote
    in one field can never pair with a quote in another and leave a literal between them bare;
    any other text (a log line, JSON with a stray quote) is redacted whole, as whatever either
    SQL dialect, or a plain reading of single quotes, would call a literal
    (:func:`detector.sqltext.redact_any`)."""
    if not text.lstrip().startswith(("{", "[", '"')):
        return redact_sql(text)
    parts: list[str] = []
    done = 0
    for match in _JSON_STRING.finditer(text):
        between = text[done : match.start()]
        if not _JSON_BETWEEN.fullmatch(between):
            return redact_sql(text)
        parts.append(between)
        parts.append(orjson.dumps(redact_sql(_unquote(match.group()))).decode())
        done = match.end()
    rest = text[done:]
    if not _JSON_BETWEEN.fullmatch(rest):
        return redact_sql(text)
    parts.append(rest)
    return "".join(parts)


def _unquote(token: str) -> str:
    """The text of a JSON string token, which may lack its closing quote."""
    for candidate in (token, token + '"', token[:-1] + '"'):
        try:
            value = orjson.loads(candidate)
        except orjson.JSONDecodeError:
            continue
        if isinstance(value, str):
            return value
    return token[1:].replace("\\u0027", "'")


def _fit(encoded: bytes) -> _Record:
    if len(encoded) <= MAX_RECORD_BYTES:
        return _Record(encoded, truncated=False)
    head = encoded[:MAX_RECORD_BYTES].decode("utf-8", errors="ignore")
    return _Record(orjson.dumps(head), truncated=True)


def _line(
    time: str, location: str | None, reason: str, detail: str | None, record: _Record
) -> bytes:
    fields: dict[str, Any] = {
        "time": time,
        "location": location,
        "reason": reason,
        "detail": detail,
        "record": orjson.Fragment(record.json),
    }
    if record.truncated:
        fields["truncated"] = True
    return orjson.dumps(fields) + b"\n"

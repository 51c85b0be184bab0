"""PostgreSQL ``stderr`` log lines, read with the server's ``log_line_prefix``.

A record is a line that starts with the prefix followed by ``SEVERITY:  message``, plus the
lines after it that start with a tab (PostgreSQL puts a tab after every newline of a message).
The prefix is turned into one regular expression (:func:`prefix_pattern`) and the whole chunk
is matched at once; text between matches is rejected line by line as ``malformed_line``.

What the prefix does not carry is filled per backend pid from the ``connection received``
(client address; the session id is derived as ``%c`` would print it) and ``connection
authorized`` (user, database, application) lines, remembered across feeds in a bounded map.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Final

import polars as pl

from detector.adapters.base import BoundedMap, LineCounter, Parsed, RejectList
from detector.adapters.pgaudit import RECORD_COLUMNS, PgOptions, PgState, empty_records, process
from detector.errors import ConfigError

DEFAULT_PREFIX: Final = "%m [%p] "
_TIME: Final = (
    r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(?:\.\d+)?(?: [A-Za-z][\w/+-]*| [+-]\d\d?(?::?\d\d)?)?"
)
#: A name PostgreSQL cuts to NAMEDATALEN - 1 bytes (user, database, application): the bound
#: keeps a line whose fields do not line up from costing more than a few thousand steps.
_NAME: Final = r"[^\n]{0,63}?"
#: What each escape of log_line_prefix matches; a name makes it a captured field.
_ESCAPES: Final[dict[str, tuple[str | None, str]]] = {
    "m": ("time", _TIME),
    "t": ("time", _TIME),
    "n": ("epoch", r"\d+(?:\.\d+)?"),
    "s": (None, _TIME),
    "p": ("pid", r"\d+"),
    "P": (None, r"\d*"),
    "u": ("user", _NAME),
    "d": ("db", _NAME),
    "a": ("app", _NAME),
    "h": ("host", r"\S{0,255}?"),
    "r": ("host", r"\S{0,255}?(?:\(\d+\))?"),
    "c": ("session", r"[0-9a-f]+\.[0-9a-f]+"),
    "l": (None, r"\d+"),
    "v": (None, r"[^\n]{0,32}?"),
    "x": (None, r"\d*"),
    "e": (None, r"[0-9A-Z]{5}"),
    "i": (None, _NAME),
    "b": (None, _NAME),
    "Q": (None, r"-?\d+"),
}
_RECEIVED: Final = re.compile(r"connection received: host=(\S+)")
_AUTHORIZED: Final = re.compile(
    r"connection authorized: user=(\S+)(?: database=(\S+))?(?: application_name=(.*?))?"
    r"(?: SSL enabled.*| GSS.*)?$"
)


def prefix_pattern(prefix: str) -> str:
    """The regular expression for lines written with ``log_line_prefix = prefix``, followed
    by the severity and message. ConfigError for an escape PostgreSQL does not know."""
    parts: list[str] = []
    optional_from: int | None = None
    seen: set[str] = set()
    i = 0
    while i < len(prefix):
        char = prefix[i]
        if char != "%":
            parts.append(re.escape(char))
            i += 1
            continue
        match = re.match(r"%(-?\d*)(.)", prefix[i:])
        if match is None:
            raise ConfigError(f"log_line_prefix {prefix!r} ends with a lone %")
        padding, escape = match.groups()
        i += match.end()
        if escape == "%":
            parts.append("%")
        elif escape == "q":
            optional_from = len(parts)
        elif escape in _ESCAPES:
            name, pattern = _ESCAPES[escape]
            pad = r" *" if padding else ""
            if name is None or name in seen:
                parts.append(f"{pad}(?:{pattern}){pad}")
            else:
                seen.add(name)
                parts.append(f"{pad}(?P<{name}>{pattern}){pad}")
        else:
            raise ConfigError(f"log_line_prefix {prefix!r}: unknown escape %{escape}")
    if optional_from is not None:
        parts[optional_from:] = ["(?:" + "".join(parts[optional_from:]) + ")?"]
    return (
        "^" + "".join(parts) + r"(?P<severity>[A-Z][A-Z0-9]*):  (?P<message>[^\n]*(?:\n\t[^\n]*)*)"
    )


@dataclass(frozen=True, slots=True)
class _Backend:
    host: str | None = None
    session: str | None = None
    user: str | None = None
    db: str | None = None
    app: str | None = None


class PgStderrParser:
    """Incremental parser of PostgreSQL stderr logs (see :mod:`detector.adapters`)."""

    name = "pgaudit-stderr"

    def __init__(
        self,
        *,
        location: str = "<stream>",
        timezone: str | None = None,
        db_instance: str | None = None,
        log_line_prefix: str = DEFAULT_PREFIX,
    ) -> None:
        self.options = PgOptions(location, timezone, db_instance)
        self.log_line_prefix = log_line_prefix
        self._pattern = re.compile(prefix_pattern(log_line_prefix), re.MULTILINE)
        self.state_ = PgState()
        self.backends_: BoundedMap[str, _Backend] = BoundedMap()
        self._lines = LineCounter()

    def feed(self, data: bytes, *, final: bool = False, idle: bool = False) -> Parsed:
        """Parse ``data`` (the unconsumed rest of the previous call, then new bytes)."""
        stop = len(data) if final else data.rfind(b"\n") + 1
        try:
            text, clean = data[:stop].decode(), True
        except UnicodeDecodeError:
            text, clean = data[:stop].decode("utf-8", "surrogateescape"), False
        rejects = RejectList()
        columns, starts, end_char, updates = self._match(text, final or idle, rejects, clean)
        # character offsets -> byte offsets (they differ only when the text is not ASCII)
        ascii_only = len(text) == stop
        to_byte: Callable[[int], int] = (
            (lambda c: c) if ascii_only else _byte_offsets(text, data[:stop], clean)
        )
        byte_starts = [to_byte(c) for c in starts]
        rejects.starts = [to_byte(c) for c in rejects.starts]
        end = to_byte(end_char)
        frame = (
            pl.DataFrame(
                {"_start": pl.Series(byte_starts, dtype=pl.Int64), **columns},
                schema=empty_records().schema,
            )
            if starts
            else empty_records()
        )
        result = process(
            frame,
            rejects,
            end=end,
            complete_all=final or idle,
            state=self.state_,
            options=self.options,
        )
        for start, pid, backend in updates:
            if to_byte(start) >= result.cut:
                break
            if backend is None:
                self.backends_.pop(pid)
            else:
                self.backends_.put(pid, backend)
        self._lines.advance(data, result.cut)
        return result.parsed()

    def _match(
        self, text: str, complete: bool, rejects: RejectList, clean: bool
    ) -> tuple[dict[str, list[object]], list[int], int, list[tuple[int, str, _Backend | None]]]:
        cols: dict[str, list[object]] = {c: [] for c in RECORD_COLUMNS if c != "_start"}
        starts: list[int] = []
        updates: list[tuple[int, str, _Backend | None]] = []
        overlay: dict[str, _Backend | None] = {}
        line, counted = self._lines.line, 0
        at = 0
        last_start = -1
        for match in self._pattern.finditer(text):
            begin = match.start()
            if begin > at:
                self._reject_gap(text, at, begin, line + text.count("\n", counted, at), rejects)
            line += text.count("\n", counted, begin)
            counted = begin
            if not clean and _not_utf8(match.group()):
                where = f"{self.options.name}:{line}"
                rejects.add(begin, where, "invalid_utf8", "not UTF-8", match.group())
                at = match.end() + 1
                continue
            fields = {k: (None if v == "[unknown]" else v) for k, v in match.groupdict().items()}
            pid = fields.get("pid") or ""
            message = (fields["message"] or "").replace("\n\t", "\n")
            backend = overlay[pid] if pid in overlay else self.backends_.get(pid)
            backend, update = _track(backend, pid, fields, message)
            if update:
                overlay[pid] = backend
                updates.append((begin, pid, backend))
            known = backend or _Backend()
            time = fields.get("time") or _from_epoch(fields.get("epoch"))
            starts.append(begin)
            last_start = begin
            cols["_line"].append(line)
            cols["time"].append(time)
            cols["user"].append(fields.get("user") or known.user)
            cols["db"].append(fields.get("db") or known.db)
            cols["pid"].append(pid or None)
            cols["session"].append(fields.get("session") or known.session)
            host = fields.get("host")
            cols["host"].append(re.sub(r"\(\d+\)$", "", host) if host else known.host)
            cols["app"].append(fields.get("app") or known.app)
            cols["severity"].append(fields["severity"])
            cols["message"].append(message)
            if "disconnection: " in message[:16]:
                overlay[pid] = None
                updates.append((begin, pid, None))
            at = match.end() + 1
        end = len(text)
        if at < len(text):
            if complete:
                self._reject_gap(text, at, len(text), line + text.count("\n", counted, at), rejects)
            else:
                end = at
        if not complete and last_start >= 0 and at >= len(text):
            # the last record may still get continuation lines: it is not consumed, but it
            # stays in the frame, where it shows that its session has moved on
            end = last_start
        return cols, starts, end, updates

    def _reject_gap(self, text: str, begin: int, stop: int, line: int, rejects: RejectList) -> None:
        """Reject every non-blank line of ``text[begin:stop]`` (its first line is ``line``)."""
        for raw in text[begin:stop].split("\n"):
            if raw.strip():
                where = f"{self.options.name}:{line}"
                detail = "does not start with the log_line_prefix and a severity"
                rejects.add(begin, where, "malformed_line", detail, raw)
            begin += len(raw) + 1
            line += 1


def _not_utf8(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return True
    return False


def _track(
    backend: _Backend | None, pid: str, fields: dict[str, str | None], message: str
) -> tuple[_Backend | None, bool]:
    """The backend's details after this record, and whether they changed."""
    if message.startswith("connection received: "):
        received = _RECEIVED.match(message)
        host = received.group(1) if received else None
        return _Backend(host=host, session=_session_id(fields.get("time"), pid)), True
    if message.startswith("connection authorized: ") or message.startswith(
        "replication connection authorized: "
    ):
        authorized = _AUTHORIZED.search(message)
        if authorized is not None:
            user, db, app = authorized.groups()
            return replace(backend or _Backend(), user=user, db=db, app=app or None), True
    return backend, False


def _session_id(time: str | None, pid: str) -> str | None:
    """The session id PostgreSQL prints for ``%c``: backend start (epoch s) and pid in hex."""
    if not time or not pid.isdigit() or not time.endswith(" UTC"):
        return None
    try:
        start = dt.datetime.strptime(time[:19], "%Y-%m-%d %H:%M:%S").replace(tzinfo=dt.UTC)
    except ValueError:
        return None
    return f"{int(start.timestamp()):x}.{int(pid):x}"


def _from_epoch(epoch: str | None) -> str | None:
    if not epoch:
        return None
    instant = dt.datetime.fromtimestamp(float(epoch), dt.UTC)
    return instant.strftime("%Y-%m-%d %H:%M:%S.%f") + " UTC"


def _byte_offsets(text: str, raw: bytes, clean: bool) -> Callable[[int], int]:
    """A function from character offset to byte offset in ``raw``, decoded as ``text``
    (strict UTF-8 when ``clean``, else with surrogateescape)."""
    import numpy as np

    if clean:  # a character starts at every byte that is not a continuation byte
        codes = np.frombuffer(raw, dtype=np.uint8)
        cumulative = np.append(np.flatnonzero((codes & 0xC0) != 0x80), len(raw))
    else:  # an undecodable byte is one character of its own: count each one's size
        sizes = np.fromiter(
            (len(ch.encode("utf-8", "surrogateescape")) for ch in text),
            dtype=np.int64,
            count=len(text),
        )
        cumulative = np.concatenate(([0], np.cumsum(sizes)))
    return lambda c: int(cumulative[c])

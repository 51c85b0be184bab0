"""MariaDB ``server_audit`` plugin logs: the file format and the syslog variant.

File lines are ``TIMESTAMP,SERVERHOST,USERNAME,HOST,CONNECTIONID,QUERYID,OPERATION,DATABASE,
OBJECT,RETCODE`` with TIMESTAMP ``YYYYMMDD HH:MM:SS`` in the server's local time (so a zone
must be configured). Syslog lines carry the same fields without TIMESTAMP after
``<syslog time> <host> <ident>: ``; the syslog time is ``Mmm dd HH:MM:SS`` (year from the
``year`` option, else this year) or ISO 8601.

OBJECT of a QUERY line is the statement in single quotes with ``\\'``, ``\\\\``, ``\\n``,
``\\r`` escapes; the TABLE events (READ, WRITE, CREATE, ALTER, RENAME, DROP) that come before
a QUERY line with the same connection and query id are merged into that event as its objects.
The QUERY line ends a statement (a stored procedure's CALL comes after the statements it ran);
a statement still without one is released as it stands once the hold-back bounds of
:mod:`detector.adapters.base` pass. A line of a statement whose QUERY line was read already
(remembered for :data:`~detector.adapters.base.MAX_STATEMENTS` statements) was sent again: it
is rejected as ``duplicate_statement``.
CONNECT is ``login`` (``login_failed`` when RETCODE is not 0), FAILED_CONNECT ``login_failed``,
DISCONNECT is skipped. The action of a query comes from its first keyword; ``SELECT ... INTO
OUTFILE`` and mysqldump's ``SELECT /*!40001 SQL_NO_CACHE */`` are ``copy``. There are no row
counts: rows are null (unknown).
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np
import polars as pl

from detector.adapters.base import (
    MAX_STATEMENTS,
    SETTLE_BYTES,
    SETTLE_RECORDS,
    LineCounter,
    Parsed,
    RecentKeys,
    RejectList,
    cut_point,
    finish_rejects,
    followed_in_time,
    kv_list,
    log_seconds,
    no_events,
)
from detector.validation import validate

TABLE_OPS: Final = frozenset(("READ", "WRITE", "CREATE", "ALTER", "RENAME", "DROP"))
LOGIN_OPS: Final = frozenset(("CONNECT", "CHANGEUSER", "PROXY_CONNECT"))
SKIPPED_OPS: Final = frozenset(("DISCONNECT",))
_QUERY_OPS: Final = frozenset(
    ("QUERY", "QUERY_DDL", "QUERY_DML", "QUERY_DCL", "QUERY_DML_NO_SELECT")
)
_KEYWORD_ACTIONS: Final[dict[str, str]] = {
    **dict.fromkeys(("SELECT", "WITH", "SHOW", "DESCRIBE", "DESC", "EXPLAIN", "HANDLER"), "read"),
    **dict.fromkeys(("INSERT", "UPDATE", "DELETE", "REPLACE", "LOAD", "MERGE", "CALL"), "write"),
    **dict.fromkeys(("CREATE", "ALTER", "DROP", "RENAME", "TRUNCATE"), "ddl"),
    **dict.fromkeys(("GRANT", "REVOKE", "SET PASSWORD"), "dcl"),
}
_WORD: Final = re.compile(r"[A-Za-z]+")
_DUMP: Final = re.compile(r"/\*!40001 SQL_NO_CACHE \*/|\bINTO\s+(?:OUT|DUMP)FILE\b", re.I)
_DCL_CREATE: Final = re.compile(r"\s*(?:CREATE|ALTER|DROP|RENAME)\s+(?:USER|ROLE)\b", re.I)
_UNESCAPE: Final = re.compile(r"\\(.)")
_UNESCAPES: Final = {"n": "\n", "r": "\r", "t": "\t", "0": "\0"}
_SYSLOG: Final = re.compile(
    r"^(?:<\d+>\d? ?)?(?P<time>[A-Z][a-z]{2} [ \d]\d \d\d:\d\d:\d\d|\d{4}-\d\d-\d\dT\S+) "
    r"(?P<host>\S+) (?P<ident>[^:\[\s]+)(?:\[\d+\])?: (?P<rest>.*)$"
)
_MONTHS: Final = (
    *("Jan", "Feb", "Mar", "Apr", "May", "Jun"),
    *("Jul", "Aug", "Sep", "Oct", "Nov", "Dec"),
)


def statement_action(text: str) -> tuple[str, str | None]:
    """(action, command) of a statement from its first keyword."""
    command = _first_keyword(text)
    if command is None:
        return "other", None
    if _DCL_CREATE.match(text):
        return "dcl", command
    if command in ("SELECT", "WITH") and _DUMP.search(text):
        return "copy", command
    return _KEYWORD_ACTIONS.get(command, "other"), command


def _first_keyword(text: str) -> str | None:
    """The first word of a statement (upper case), past whitespace, opening parentheses and
    comments other than MySQL's executable ``/*! ... */``; None when there is none. Each
    character is looked at once at most (a comment is skipped with one ``find``)."""
    i, n = 0, len(text)
    while i < n:
        if text[i].isspace() or text[i] == "(":
            i += 1
        elif text.startswith("/*", i) and not text.startswith("/*!", i):
            end = text.find("*/", i + 2)
            if end < 0:
                return None
            i = end + 2
        else:
            break
    match = _WORD.match(text, i)
    return match.group(0).upper() if match else None


def _unquote(obj: str) -> str:
    if len(obj) >= 2 and obj[0] == "'" and obj[-1] == "'":
        obj = obj[1:-1]
    elif obj.startswith("'"):
        obj = obj[1:]  # cut short by server_audit_query_log_limit
    return _UNESCAPE.sub(lambda m: _UNESCAPES.get(m.group(1), m.group(1)), obj)


_NO_KEY: Final = ""  # the key of a row that is no statement (a login)


class MariadbAuditParser:
    """Incremental parser of server_audit logs (see :mod:`detector.adapters`)."""

    name = "mariadb-audit"
    syslog = False

    def __init__(
        self,
        *,
        location: str = "<stream>",
        timezone: str | None = None,
        db_instance: str | None = None,
        year: int | None = None,
        clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
    ) -> None:
        self.location = location
        self.timezone = timezone
        self.db_instance = db_instance
        self.year = year
        self._clock = clock
        self._lines = LineCounter()
        #: "connection,query id" of the statements emitted with their QUERY line
        self._closed: RecentKeys[str] = RecentKeys(MAX_STATEMENTS)

    def feed(self, data: bytes, *, final: bool = False, idle: bool = False) -> Parsed:
        """Parse ``data`` (the unconsumed rest of the previous call, then new bytes)."""
        stop = len(data) if final else data.rfind(b"\n") + 1
        rejects = RejectList()
        got = _Gathered()
        pos, line, index = 0, self._lines.line, 0
        while pos < stop:
            newline = data.find(b"\n", pos, stop)
            nxt = stop if newline < 0 else newline + 1
            raw = data[pos:nxt].rstrip(b"\r\n")
            where = f"{self.location}:{line}"
            if raw.strip():
                fields = self._fields(raw, pos, where, rejects)
                if fields is not None:
                    index += 1
                    if not self._add(fields, pos, nxt, where, index, got):
                        detail = (
                            f"query {fields['query']} of connection {fields['conn']} again, "
                            "after its QUERY line"
                        )
                        rejects.add(pos, where, "duplicate_statement", detail, raw)
            pos, line = nxt, line + 1
        complete = (
            np.ones(len(got.rows), dtype=bool)
            if final or idle
            else self._settled(got, data, stop, index)
        )
        cut = cut_point(
            np.array(got.firsts, dtype=np.int64),
            np.array(got.lasts, dtype=np.int64),
            complete,
            stop,
        )
        kept: list[dict[str, Any]] = []
        closed: list[str] = []
        for row, last, key, queried in zip(got.rows, got.lasts, got.keys, got.queried, strict=True):
            if last < cut:
                kept.append(row)
                if queried:
                    closed.append(key)
        self._closed.add(closed)
        events, bad = self._validate(kept)
        self._lines.advance(data, cut)
        skipped: dict[str, int] = {}
        for at, kind in got.skipped:
            if at < cut:
                skipped[kind] = skipped.get(kind, 0) + 1
        return Parsed(
            events, finish_rejects([rejects.frame(cut), bad]), cut, sum(skipped.values()), skipped
        )

    def _settled(self, got: _Gathered, data: bytes, stop: int, count: int) -> np.ndarray:
        """Which rows may be emitted when more data may follow (``count`` records were read,
        up to ``stop``): the ended statements and logins, and those whose latest line is
        followed by SETTLE_RECORDS records, SETTLE_BYTES bytes or a record logged
        SETTLE_SECONDS after their first."""
        done = np.array(got.closed, dtype=bool)
        pending = np.flatnonzero(~done)
        if pending.size == 0:
            return done
        lasts = np.array(got.last_index, dtype=np.int64)[pending]
        after = np.array(got.after, dtype=np.int64)[pending]
        done[pending] = (count - lasts >= SETTLE_RECORDS) | (stop - after >= SETTLE_BYTES)
        keep = ~done[pending]
        pending, after = pending[keep], after[keep]
        if pending.size:  # all within SETTLE_BYTES of the end: read those times again
            starts, times = self._times(data, int(after.min()), stop)
            first = log_seconds(pl.Series([got.rows[i]["event_time"] for i in pending]))
            at = np.searchsorted(np.array(starts, dtype=np.int64), after)
            done[pending] = followed_in_time(first, log_seconds(pl.Series(times)), at)
        return done

    def _times(self, data: bytes, start: int, stop: int) -> tuple[list[int], list[str]]:
        """Where each record of ``data[start:stop]`` starts, and its log time."""
        starts: list[int] = []
        times: list[str] = []
        unused = RejectList()
        pos = start
        while pos < stop:
            newline = data.find(b"\n", pos, stop)
            nxt = stop if newline < 0 else newline + 1
            raw = data[pos:nxt].rstrip(b"\r\n")
            fields = self._fields(raw, pos, "", unused) if raw.strip() else None
            if fields is not None:
                starts.append(pos)
                times.append(fields["time"])
            pos = nxt
        return starts, times

    def _fields(
        self, raw: bytes, pos: int, where: str, rejects: RejectList
    ) -> dict[str, str] | None:
        try:
            text = raw.decode()
        except UnicodeDecodeError:
            rejects.add(pos, where, "invalid_utf8", "not UTF-8", raw)
            return None
        time: str | None
        if self.syslog:
            match = _SYSLOG.match(text)
            if match is None:
                rejects.add(pos, where, "malformed_line", "not a syslog line", raw)
                return None
            time, body = self._syslog_time(match.group("time")), match.group("rest")
            head = body.split(",", 7)
            if len(head) < 8:
                rejects.add(pos, where, "malformed_line", "fewer than 9 fields", raw)
                return None
            server, user, host, conn, query, op, db, rest = head
        else:
            head = text.split(",", 8)
            if len(head) < 9:
                rejects.add(pos, where, "malformed_line", "fewer than 10 fields", raw)
                return None
            stamp, server, user, host, conn, query, op, db, rest = head
            time = _file_time(stamp)
        obj, _, retcode = rest.rpartition(",")
        ret_ok = retcode.isdigit() or (retcode == "" and op in TABLE_OPS)  # no code on TABLE
        if time is None or not conn.isdigit() or not query.isdigit() or not ret_ok:
            rejects.add(pos, where, "malformed_line", "bad time, id or return code", raw)
            return None
        return {
            "time": time,
            "server": server,
            "user": user,
            "host": host,
            "conn": conn,
            "query": query,
            "op": op,
            "db": db,
            "obj": obj,
            "ret": retcode,
        }

    def _add(
        self, f: dict[str, str], pos: int, nxt: int, where: str, index: int, got: _Gathered
    ) -> bool:
        """Take the record ``f``, the ``index``-th of the feed (its line spans ``pos`` to
        ``nxt``); False when it is a line of a statement whose QUERY line was read already."""
        op = f["op"]
        if op in SKIPPED_OPS:
            got.skipped.append((pos, op.lower()))
            return True
        if op in TABLE_OPS or op in _QUERY_OPS:
            key = f"{f['conn']},{f['query']}"  # one small object, kept after the feed
            at = got.open.get(key)
            if at is None:
                if key in self._closed:
                    return False
            elif got.closed[at]:
                return False
            elif index - got.last_index[at] > SETTLE_RECORDS or pos - got.after[at] >= SETTLE_BYTES:
                at = None  # the statement was released before this line came: a new one
            if at is None:
                row = self._row(f, where, index, "other", None)
                at = got.add(row, key, pos, nxt, index, False)
                got.open[key] = at
            else:
                got.lasts[at], got.after[at], got.last_index[at] = pos, nxt, index
            row = got.rows[at]
            if op in TABLE_OPS:
                name = f["obj"] if "." in f["obj"] or not f["db"] else f"{f['db']}.{f['obj']}"
                if name not in row["objects"]:
                    row["objects"].append(name)
            else:
                text = _unquote(f["obj"])
                action, command = statement_action(text)
                row.update(
                    statement_text=text,
                    action=action,
                    command=command,
                    success=f["ret"] == "0",
                    _ret=f["ret"],
                    event_time=f["time"],
                )
                got.closed[at] = got.queried[at] = True
            return True
        if op in LOGIN_OPS or op == "FAILED_CONNECT":
            ok = op != "FAILED_CONNECT" and f["ret"] == "0"
            row = self._row(f, where, index, "login" if ok else "login_failed", "LOGIN")
            row["success"] = ok
        else:
            row = self._row(f, where, index, "other", op)
            row["_unknown"] = True
        got.add(row, _NO_KEY, pos, nxt, index, True)
        return True

    def _row(
        self, f: dict[str, str], where: str, index: int, action: str, command: str | None
    ) -> dict[str, Any]:
        return {
            "_loc": where,
            "_index": index,
            "event_time": f["time"],
            "db_user": f["user"],
            "action": action,
            "command": command,
            "db_name": f["db"] or None,
            "client_ip": f["host"] or None,
            "session_id": f["conn"],
            "statement_id": f["query"],
            "objects": [],
            "statement_text": None,
            "success": None,
            "_ret": f["ret"],
            "_server": f["server"] or None,
            "_op": f["op"],
        }

    def _validate(self, rows: list[dict[str, Any]]) -> tuple[pl.DataFrame, pl.DataFrame]:
        unknown = [r for r in rows if r.get("_unknown")]
        rows = [r for r in rows if not r.get("_unknown")]
        bad = RejectList()
        for r in unknown:
            bad.add(0, r["_loc"], "unknown_class", f"operation {r['_op'][:40]!r}", r["_op"])
        if not rows:
            return no_events(), bad.frame().drop("_start").with_columns(_start=pl.lit(0))
        fields = [k for k in rows[0] if not k.startswith("_") and k != "objects"]
        columns: dict[str, list[Any]] = {k: [r[k] for r in rows] for k in fields}
        columns["_loc"] = [r["_loc"] for r in rows]
        columns["objects"] = [r["objects"] or None for r in rows]
        columns["db_instance"] = [self.db_instance or r["_server"] for r in rows]
        columns["retcode"] = [r["_ret"] for r in rows]
        columns["server_host"] = [r["_server"] for r in rows]
        frame = pl.DataFrame(columns, strict=False)
        frame = frame.with_columns(
            kv_list(frame, ["retcode", "server_host"]),
            source_format=pl.lit("mariadb_audit"),
            db_system=pl.lit("mariadb"),
        ).drop("retcode", "server_host")
        good, rejected = validate(frame, default_tz=self.timezone)
        return good, pl.concat(
            [bad.frame(), rejected.with_columns(_start=pl.lit(0, dtype=pl.Int64))],
            how="diagonal_relaxed",
        )

    def _syslog_time(self, text: str) -> str | None:
        if text[0].isdigit():
            return text
        month = _MONTHS.index(text[:3]) + 1 if text[:3] in _MONTHS else 0
        if not month:
            return None
        now = self._clock()
        year = self.year or (now.year - 1 if month > now.month + 1 else now.year)
        return f"{year}-{month:02d}-{int(text[4:6]):02d} {text[7:15]}"


@dataclass(slots=True)
class _Gathered:
    """What one feed collects: a row per event to be (statements and logins), where its
    lines lie and whether it has ended."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    firsts: list[int] = field(default_factory=list)  # byte offset of a row's first line
    lasts: list[int] = field(default_factory=list)  # ... of its latest line
    after: list[int] = field(default_factory=list)  # ... just past its latest line
    last_index: list[int] = field(default_factory=list)  # record number of its latest line
    closed: list[bool] = field(default_factory=list)  # a login, or a statement's QUERY read
    queried: list[bool] = field(default_factory=list)  # a statement's QUERY read
    keys: list[str] = field(default_factory=list)  # "connection,query id"
    open: dict[str, int] = field(default_factory=dict)  # the open row of each key
    skipped: list[tuple[int, str]] = field(default_factory=list)  # where, what

    def add(
        self,
        row: dict[str, Any],
        key: str,
        pos: int,
        nxt: int,
        index: int,
        closed: bool,
    ) -> int:
        self.rows.append(row)
        self.firsts.append(pos)
        self.lasts.append(pos)
        self.after.append(nxt)
        self.last_index.append(index)
        self.closed.append(closed)
        self.queried.append(False)
        self.keys.append(key)
        return len(self.rows) - 1


class MariadbSyslogParser(MariadbAuditParser):
    """server_audit lines written through syslog (``server_audit_output_type=syslog``)."""

    name = "mariadb-syslog"
    syslog = True


def _file_time(stamp: str) -> str | None:
    if len(stamp) != 17 or not stamp[:8].isdigit():
        return None
    return f"{stamp[:4]}-{stamp[4:6]}-{stamp[6:8]} {stamp[9:]}"

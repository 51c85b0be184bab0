"""MariaDB ``server_audit`` plugin logs: the file format and the syslog variant.

File lines are ``TIMESTAMP,SERVERHOST,USERNAME,HOST,CONNECTIONID,QUERYID,OPERATION,DATABASE,
OBJECT,RETCODE`` with TIMESTAMP ``YYYYMMDD HH:MM:SS`` in the server's local time (so a zone
must be configured). Syslog lines carry the same fields without TIMESTAMP after
``<syslog time> <host> <ident>: ``; the syslog time is ``Mmm dd HH:MM:SS`` (year from the
``year`` option, else this year) or ISO 8601.

OBJECT of a QUERY line is the statement in single quotes with ``\\'``, ``\\\\``, ``\\n``,
``\\r`` escapes; the TABLE events (READ, WRITE, CREATE, ALTER, RENAME, DROP) that come before
a QUERY line with the same connection and query id are merged into that event as its objects.
CONNECT is ``login`` (``login_failed`` when RETCODE is not 0), FAILED_CONNECT ``login_failed``,
DISCONNECT is skipped. The action of a query comes from its first keyword; ``SELECT ... INTO
OUTFILE`` and mysqldump's ``SELECT /*!40001 SQL_NO_CACHE */`` are ``copy``. There are no row
counts: rows are null (unknown).
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable
from typing import Any, Final

import polars as pl

from detector.adapters.base import (
    SETTLE_RECORDS,
    LineCounter,
    Parsed,
    RejectList,
    cut_point,
    finish_rejects,
    kv_list,
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
_KEYWORD: Final = re.compile(r"\s*(?:/\*(?!!)(?:[^*]|\*[^/])*\*/\s*)*\(*\s*([A-Za-z]+)")
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
    match = _KEYWORD.match(text)
    if match is None:
        return "other", None
    command = match.group(1).upper()
    if _DCL_CREATE.match(text):
        return "dcl", command
    if command in ("SELECT", "WITH") and _DUMP.search(text):
        return "copy", command
    return _KEYWORD_ACTIONS.get(command, "other"), command


def _unquote(obj: str) -> str:
    if len(obj) >= 2 and obj[0] == "'" and obj[-1] == "'":
        obj = obj[1:-1]
    elif obj.startswith("'"):
        obj = obj[1:]  # cut short by server_audit_query_log_limit
    return _UNESCAPE.sub(lambda m: _UNESCAPES.get(m.group(1), m.group(1)), obj)


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

    def feed(self, data: bytes, *, final: bool = False, idle: bool = False) -> Parsed:
        """Parse ``data`` (the unconsumed rest of the previous call, then new bytes)."""
        stop = len(data) if final else data.rfind(b"\n") + 1
        rejects = RejectList()
        rows: list[dict[str, Any]] = []
        groups: dict[tuple[str, str], int] = {}
        firsts: list[int] = []
        lasts: list[int] = []
        complete: list[bool] = []
        skipped: dict[str, int] = {}
        last_line_of_conn: dict[str, int] = {}
        pos, line = 0, self._lines.line
        index = 0
        while pos < stop:
            newline = data.find(b"\n", pos, stop)
            nxt = stop if newline < 0 else newline + 1
            raw = data[pos:nxt].rstrip(b"\r\n")
            where = f"{self.location}:{line}"
            if raw.strip():
                fields = self._fields(raw, pos, where, rejects)
                if fields is not None:
                    index += 1
                    last_line_of_conn[fields["conn"]] = index
                    self._add(
                        fields, pos, where, index, rows, groups, firsts, lasts, complete, skipped
                    )
            pos, line = nxt, line + 1
        if not (final or idle):
            for i, row in enumerate(rows):
                if not complete[i]:
                    later = last_line_of_conn.get(row["session_id"] or "", 0) > row["_index"]
                    complete[i] = later or index - row["_index"] >= SETTLE_RECORDS
        import numpy as np

        cut = cut_point(
            np.array(firsts, dtype=np.int64),
            np.array(lasts, dtype=np.int64),
            np.array(complete if not (final or idle) else [True] * len(rows), dtype=bool),
            stop,
        )
        kept = [r for r, last in zip(rows, lasts, strict=True) if last < cut]
        events, bad = self._validate(kept)
        self._lines.advance(data, cut)
        return Parsed(
            events, finish_rejects([rejects.frame(cut), bad]), cut, sum(skipped.values()), skipped
        )

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
        self,
        f: dict[str, str],
        pos: int,
        where: str,
        index: int,
        rows: list[dict[str, Any]],
        groups: dict[tuple[str, str], int],
        firsts: list[int],
        lasts: list[int],
        complete: list[bool],
        skipped: dict[str, int],
    ) -> None:
        op = f["op"]
        key = (f["conn"], f["query"])
        if op in SKIPPED_OPS:
            skipped[op.lower()] = skipped.get(op.lower(), 0) + 1
            return
        if op in TABLE_OPS or op in _QUERY_OPS:
            at = groups.get(key)
            if at is None:
                at = len(rows)
                groups[key] = at
                rows.append(self._row(f, where, index, "other", None))
                firsts.append(pos)
                lasts.append(pos)
                complete.append(False)
            row = rows[at]
            lasts[at] = pos
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
                complete[at] = True
            return
        if op in LOGIN_OPS or op == "FAILED_CONNECT":
            ok = op != "FAILED_CONNECT" and f["ret"] == "0"
            row = self._row(f, where, index, "login" if ok else "login_failed", "LOGIN")
            row["success"] = ok
        else:
            row = self._row(f, where, index, "other", op)
            row["_unknown"] = True
        rows.append(row)
        firsts.append(pos)
        lasts.append(pos)
        complete.append(True)

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


class MariadbSyslogParser(MariadbAuditParser):
    """server_audit lines written through syslog (``server_audit_output_type=syslog``)."""

    name = "mariadb-syslog"
    syslog = True


def _file_time(stamp: str) -> str | None:
    if len(stamp) != 17 or not stamp[:8].isdigit():
        return None
    return f"{stamp[:4]}-{stamp[4:6]}-{stamp[6:8]} {stamp[9:]}"

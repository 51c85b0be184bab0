"""Audit logs written record by record for the hold-back tests: pgaudit statements in the
PostgreSQL jsonlog, csvlog and stderr destinations and MariaDB server_audit lines, each
statement with the session, statement id, tables and text the test chooses.

>>> log = PgLog("jsonlog")
>>> log.statement("65f2ea10.2a", "SELECT * FROM customers", ["public.customers"])
(1, 1)
>>> log.data().count(b"\\n")
1
"""

from __future__ import annotations

import csv
import datetime as dt
import io
from dataclasses import dataclass, field

import orjson

START = dt.datetime(2026, 3, 2, 9, 0, tzinfo=dt.UTC)
#: The stderr prefix the logs are written with (user, database and session on every line).
PREFIX = "%m [%p] %q%u@%d %a %h %c: "
PG_ADAPTERS = {"jsonlog": "pgaudit-jsonlog", "csvlog": "pgaudit-csvlog", "stderr": "pgaudit-stderr"}


def padded(text: str, size: int) -> str:
    """``text`` followed by a comment that makes it ``size`` characters long (at least)."""
    fill = size - len(text) - 6
    return text if fill <= 0 else f"{text} /* {'x' * fill} */"


def _csv(fields: list[str]) -> str:
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerow(fields)
    return out.getvalue()[:-1]


@dataclass
class PgLog:
    """A PostgreSQL log of pgaudit lines in ``destination`` (``jsonlog``, ``csvlog``,
    ``stderr`` with :data:`PREFIX`); every record is one physical line."""

    destination: str
    time: dt.datetime = START
    lines: list[bytes] = field(default_factory=list)
    _next: dict[str, int] = field(default_factory=dict)

    @property
    def adapter(self) -> str:
        return PG_ADAPTERS[self.destination]

    @property
    def options(self) -> dict[str, str]:
        return {"log_line_prefix": PREFIX} if self.destination == "stderr" else {}

    @property
    def timezone(self) -> None:
        return None  # every time says UTC

    def advance(self, seconds: float) -> None:
        self.time += dt.timedelta(seconds=seconds)

    def statement(
        self,
        session: str,
        text: str,
        objects: list[str],
        *,
        cls: str = "READ",
        command: str = "SELECT",
        rows: int = 1,
        text_once: bool = False,
    ) -> tuple[int, int]:
        """One statement of ``session`` (the next statement id): one line per object, each
        with the text unless ``text_once`` (then ``<previously logged>`` after the first).
        Returns the line numbers of its first and last line."""
        stmt = self._next.get(session, 0) + 1
        self._next[session] = stmt
        first = len(self.lines) + 1
        for i, obj in enumerate(objects or [""]):
            shown = "<previously logged>" if text_once and i else _csv([text])
            kind = "TABLE" if obj else ""
            payload = f"SESSION,{stmt},1,{cls},{command},{kind},{obj},{shown},<not logged>,{rows}"
            self.record(session, "AUDIT: " + payload)
        return first, len(self.lines)

    def record(self, session: str, message: str, severity: str = "LOG") -> int:
        """Any record of ``session``; returns its line number."""
        pid = int(session.split(".")[1], 16)
        stamp = (
            self.time.strftime("%Y-%m-%d %H:%M:%S.") + f"{self.time.microsecond // 1000:03d} UTC"
        )
        user, db, app, host = "app_api", "saas", "billing", "10.0.0.7"
        if self.destination == "jsonlog":
            obj = {
                "timestamp": stamp,
                "user": user,
                "dbname": db,
                "pid": pid,
                "remote_host": host,
                "session_id": session,
                "error_severity": severity,
                "message": message,
                "application_name": app,
            }
            line = orjson.dumps(obj).decode()
        elif self.destination == "csvlog":
            fields = [stamp, user, db, str(pid), f"{host}:5544", session, "1", "", stamp, "", "0"]
            fields += [severity, "00000", message, *[""] * 8, app, "client backend", "", "0"]
            line = _csv(fields)
        else:
            line = f"{stamp} [{pid}] {user}@{db} {app} {host} {session}: {severity}:  {message}"
        self.lines.append(line.encode() + b"\n")
        self.time += dt.timedelta(milliseconds=1)
        return len(self.lines)

    def disconnect(self, session: str) -> int:
        return self.record(session, "disconnection: session time: 0:00:09.000 user=app_api")

    def resend(self, line: int) -> int:
        """Line ``line`` (1-based) written again, as a log shipper that retries does."""
        self.lines.append(self.lines[line - 1])
        return len(self.lines)

    def data(self) -> bytes:
        return b"".join(self.lines)


@dataclass
class MariadbLog:
    """A server_audit log (file format): a statement is its TABLE lines then its QUERY line."""

    time: dt.datetime = START
    lines: list[bytes] = field(default_factory=list)
    query: int = 100

    @property
    def adapter(self) -> str:
        return "mariadb-audit"

    @property
    def options(self) -> dict[str, str]:
        return {}

    @property
    def timezone(self) -> str:
        return "UTC"  # server_audit writes local time: the server's zone

    def advance(self, seconds: float) -> None:
        self.time += dt.timedelta(seconds=seconds)

    def statement(
        self, conn: int, text: str, tables: list[str], *, query_line: bool = True
    ) -> tuple[int, int]:
        """TABLE READ lines for ``tables`` (``db.table``) and, with ``query_line``, the QUERY
        line; returns the line numbers of the first and last line."""
        self.query += 1
        first = len(self.lines) + 1
        for table in tables:
            db, name = table.split(".")
            self.line(conn, self.query, "READ", db, name, "")
        if query_line:
            quoted = "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"
            self.line(conn, self.query, "QUERY", "saas", quoted, "0")
        return first, len(self.lines)

    def line(self, conn: int, query: int, op: str, db: str, obj: str, ret: str) -> int:
        """One server_audit line as given; returns its line number."""
        stamp = self.time.strftime("%Y%m%d %H:%M:%S")
        line = f"{stamp},dbhost,app_api,10.0.0.7,{conn},{query},{op},{db},{obj},{ret}\n"
        self.lines.append(line.encode())
        self.time += dt.timedelta(milliseconds=1)
        return len(self.lines)

    def disconnect(self, conn: int) -> int:
        return self.line(conn, 0, "DISCONNECT", "saas", "", "0")

    def resend(self, line: int) -> int:
        self.lines.append(self.lines[line - 1])
        return len(self.lines)

    def data(self) -> bytes:
        return b"".join(self.lines)

"""Realistic synthetic audit logs in every supported format (for tests and benchmarks).

>>> text = pg_log(20, "jsonlog", seed=1)
>>> text.count(b"\\n") >= 20
True
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import random
import re
from typing import Final

import orjson

_START: Final = dt.datetime(2026, 3, 2, 9, 0, tzinfo=dt.UTC)
_STATEMENTS: Final[tuple[tuple[str, str, list[str], str, int], ...]] = (
    ("READ", "SELECT", ["public.clients"], "SELECT name, email FROM clients WHERE id = $1", 1),
    (
        "READ",
        "SELECT",
        ["public.clients", "public.accounts"],
        "SELECT c.name, a.balance FROM clients c JOIN accounts a ON a.client_id = c.id "
        "WHERE c.id = $1",
        3,
    ),
    (
        "WRITE",
        "UPDATE",
        ["public.accounts"],
        "UPDATE accounts SET balance = balance + 1\nWHERE client_id = $1",
        3,
    ),
    (
        "READ",
        "SELECT",
        ["public.search_counts"],
        "SELECT client_id, count(*) FROM search_counts GROUP BY client_id",
        40,
    ),
    ("READ", "COPY", [], "COPY clients TO STDOUT", 0),
)


def _csv(fields: list[str]) -> str:
    out = io.StringIO()
    csv.writer(out, lineterminator="\r\n").writerow(fields)
    return out.getvalue()[:-2]


def pg_log(lines: int, destination: str, *, seed: int = 0, prefix: str = "%m [%p] ") -> bytes:
    """About ``lines`` log records of busy application sessions in ``destination``
    (``jsonlog``, ``csvlog`` or ``stderr`` with ``prefix``: ``%m``, ``%p``, ``%u``, ``%d``,
    ``%a``, ``%h``, ``%c``, ``%q`` are filled)."""
    rng = random.Random(seed)
    out: list[str] = []
    count = 0
    pid = 4000
    time = _START
    while count < lines:
        pid += 1
        host = f"10.0.{rng.randrange(4)}.{rng.randrange(1, 250)}"
        port = rng.randrange(30000, 60000)
        app = rng.choice(["billing api", "web", "DBeaver 23.1.0 - Main"])
        user = rng.choice(["app_api", "app_web", "analyst"])
        session = f"{int(time.timestamp()):x}.{pid:x}"
        records: list[dict[str, str | None]] = []

        def add(
            message: str,
            severity: str = "LOG",
            who: str | None = user,
            ap: str | None = app,
            _s: str = session,
            _h: str = host,
            _p: int = port,
            _r: list[dict[str, str | None]] = records,
        ) -> None:
            _r.append(
                {
                    "message": message,
                    "severity": severity,
                    "user": who,
                    "app": ap,
                    "session": _s,
                    "host": _h,
                    "port": str(_p),
                }
            )

        add(f"connection received: host={host} port={port}", who=None, ap=None)
        if rng.random() < 0.05:
            add(f'password authentication failed for user "{user}"', "FATAL", ap=None)
        else:
            add(f"connection authorized: user={user} database=saas application_name={app}")
            for stmt in range(1, rng.randrange(5, 60)):
                cls, command, objects, text, rows = rng.choice(_STATEMENTS)
                for i, obj in enumerate(objects or [""]):
                    shown = _csv([text]) if i == 0 else "<previously logged>"
                    payload = (
                        f"SESSION,{stmt},1,{cls},{command},{'TABLE' if obj else ''},{obj},"
                        f"{shown},<not logged>,{rows}"
                    )
                    add("AUDIT: " + payload)
            add(
                f"disconnection: session time: 0:00:01.000 user={user} database=saas "
                f"host={host} port={port}"
            )
        for record in records:
            time += dt.timedelta(microseconds=rng.randrange(50, 5000))
            out.append(_format(destination, record, time, pid, prefix))
            count += 1
    return "".join(out).encode()


def _format(
    destination: str, r: dict[str, str | None], time: dt.datetime, pid: int, prefix: str
) -> str:
    stamp = time.strftime("%Y-%m-%d %H:%M:%S.") + f"{time.microsecond // 1000:03d} UTC"
    if destination == "jsonlog":
        obj = {
            "timestamp": stamp,
            "user": r["user"],
            "dbname": "saas" if r["user"] else None,
            "pid": pid,
            "remote_host": r["host"],
            "remote_port": int(r["port"] or 0),
            "session_id": r["session"],
            "line_num": 1,
            "error_severity": r["severity"],
            "message": r["message"],
            "application_name": r["app"],
            "backend_type": "client backend",
            "query_id": 0,
        }
        return orjson.dumps({k: v for k, v in obj.items() if v is not None}).decode() + "\n"
    if destination == "csvlog":
        fields = [
            stamp,
            r["user"] or "",
            "saas" if r["user"] else "",
            str(pid),
            f"{r['host']}:{r['port']}",
            r["session"] or "",
            "1",
            "",
            stamp,
            "",
            "0",
            r["severity"] or "",
            "00000",
            r["message"] or "",
            "",
            "",
            "",
            "",
            "",
            "",
            "",
            "",
            r["app"] or "",
            "client backend",
            "",
            "0",
        ]
        return _csv(fields) + "\n"
    values = {
        "m": stamp,
        "p": str(pid),
        "u": r["user"] or "[unknown]",
        "d": "saas" if r["user"] else "[unknown]",
        "a": r["app"] or "[unknown]",
        "h": r["host"] or "",
        "c": r["session"] or "",
        "q": "",
        "%": "%",
    }
    head = re.sub(r"%(.)", lambda m: values.get(m.group(1), ""), prefix)
    message = (r["message"] or "").replace("\n", "\n\t")
    return f"{head}{r['severity']}:  {message}\n"


def mariadb_log(lines: int, *, seed: int = 0, syslog: bool = False) -> bytes:
    """About ``lines`` server_audit lines (file format, or syslog with ``syslog``)."""
    rng = random.Random(seed)
    out: list[str] = []
    time = _START
    conn = 10
    query = 100
    while len(out) < lines:
        conn += 1
        user = rng.choice(["app_api", "app_web", "analyst"])
        host = f"10.0.{rng.randrange(4)}.{rng.randrange(1, 250)}"
        entries = [("CONNECT", "saas", "", "0", 0)]
        for _ in range(rng.randrange(3, 30)):
            query += 1
            entries.append(("READ", "saas", "clients", "0", query))
            entries.append(
                ("QUERY", "saas", "'SELECT name, email FROM clients WHERE id = 7'", "0", query)
            )
        entries.append(("DISCONNECT", "saas", "", "0", 0))
        for op, db, obj, ret, qid in entries:
            time += dt.timedelta(milliseconds=rng.randrange(1, 50))
            body = (
                f"dbhost,{user},{host},{conn},{qid},{op},{db},{obj},{ret if op != 'READ' else ''}"
            )
            if syslog:
                out.append(f"{time:%b %d %H:%M:%S} dbhost mysql-server_auditing: {body}\n")
            else:
                out.append(f"{time:%Y%m%d %H:%M:%S},{body}\n")
    return "".join(out).encode()

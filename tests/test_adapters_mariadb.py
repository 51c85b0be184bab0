"""MariaDB server_audit adapter against the MariaDB server on 127.0.0.1:3306."""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from detector.adapters import make_adapter

SETTINGS = ("server_audit_file_path", "server_audit_events", "server_audit_logging")


def _connect(**options: Any) -> Any:
    try:
        import pymysql
    except ImportError:
        if os.environ.get("CI") == "true":
            pytest.fail("CI=true but pymysql is not installed")
        pytest.skip("pymysql is not installed")
    base = {"host": "127.0.0.1", "port": 3306, "user": "root", "password": "", "autocommit": True}
    return pymysql.connect(**{**base, **options})


@pytest.fixture(scope="module")
def audit_log() -> Iterator[Path]:
    """Turn server_audit on into a private file, run traffic, restore the settings."""
    try:
        root = _connect()
    except Exception as exc:  # any connection failure means: no server here
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true but MariaDB at 127.0.0.1:3306 is not reachable: {exc}")
        pytest.skip(f"MariaDB at 127.0.0.1:3306 is not reachable: {exc}")
    cur = root.cursor()
    cur.execute(
        "SELECT PLUGIN_STATUS FROM information_schema.PLUGINS WHERE PLUGIN_NAME='SERVER_AUDIT'"
    )
    installed = cur.fetchone() is not None
    if not installed:
        cur.execute("INSTALL SONAME 'server_audit'")
    cur.execute("SHOW GLOBAL VARIABLES LIKE 'server_audit%'")
    before = {k: v for k, v in cur.fetchall() if k in SETTINGS}
    folder = Path(tempfile.mkdtemp(prefix="exfilwatch-audit-"))
    folder.chmod(0o777)  # the server process writes here
    path = folder / "server_audit.log"
    try:
        cur.execute(f"SET GLOBAL server_audit_file_path = '{path}'")
        cur.execute("SET GLOBAL server_audit_events = 'CONNECT,QUERY,TABLE'")
        cur.execute("SET GLOBAL server_audit_logging = ON")
        cur.execute("CREATE DATABASE IF NOT EXISTS exfilwatch_saas")
        cur.execute(
            "CREATE TABLE IF NOT EXISTS exfilwatch_saas.clients (id INT PRIMARY KEY, name TEXT)"
        )
        cur.execute("REPLACE INTO exfilwatch_saas.clients VALUES (1, 'a'), (2, 'b'), (3, 'c')")
        cur.execute("CREATE USER IF NOT EXISTS 'exf_app'@'127.0.0.1' IDENTIFIED BY 'app-secret'")
        cur.execute("GRANT SELECT ON exfilwatch_saas.* TO 'exf_app'@'127.0.0.1'")
        app = _connect(user="exf_app", password="app-secret", database="exfilwatch_saas")
        with app.cursor() as c:
            c.execute("SELECT name FROM clients WHERE id = 2")
            c.execute("SELECT * FROM clients")
            c.execute("SELECT /*!40001 SQL_NO_CACHE */ * FROM `clients`")
        app.close()
        import pymysql

        for _ in range(2):
            with pytest.raises(pymysql.err.OperationalError):
                _connect(user="exf_app", password="wrong")
        deadline = time.monotonic() + 20
        while b"SQL_NO_CACHE" not in (path.read_bytes() if path.exists() else b""):
            assert time.monotonic() < deadline, "the audit log never showed the traffic"
            time.sleep(0.05)
        cur.execute("SET GLOBAL server_audit_logging = OFF")
        yield path
    finally:
        cur.execute("SET GLOBAL server_audit_logging = OFF")
        for key in ("server_audit_events", "server_audit_file_path"):
            if key in before:
                cur.execute(f"SET GLOBAL {key} = %s", (before[key],))
        if before.get("server_audit_logging") == "ON":
            cur.execute("SET GLOBAL server_audit_logging = ON")
        cur.execute("DROP USER IF EXISTS 'exf_app'@'127.0.0.1'")
        cur.execute("DROP DATABASE IF EXISTS exfilwatch_saas")
        if not installed:
            cur.execute("UNINSTALL SONAME 'server_audit'")
        root.close()


def test_server_audit_file(audit_log: Path) -> None:
    parsed = make_adapter("mariadb-audit", location="audit", timezone="UTC").feed(
        audit_log.read_bytes(), final=True
    )
    assert parsed.rejects.height == 0, parsed.rejects.to_dicts()
    events = parsed.events.filter(pl.col("db_user") == "exf_app").to_dicts()
    logins = [e for e in events if e["action"] == "login"]
    failed = [e for e in events if e["action"] == "login_failed"]
    assert len(logins) >= 1 and len(failed) == 2
    assert all(e["client_ip"] == "127.0.0.1" and e["success"] is False for e in failed)
    queries = [e for e in events if e["statement_text"] and "clients" in e["statement_text"]]
    assert [(e["action"], e["command"]) for e in queries] == [
        ("read", "SELECT"),
        ("read", "SELECT"),
        ("copy", "SELECT"),
    ]
    for event in queries:
        assert event["objects"] == ["exfilwatch_saas.clients"]
        assert event["rows_returned"] is None and event["rows_affected"] is None
        assert event["db_name"] == "exfilwatch_saas"
        assert event["source_format"] == "mariadb_audit" and event["db_system"] == "mariadb"
        assert event["success"] is True and event["session_id"] and event["statement_id"]


def test_syslog_variant_of_the_same_lines(audit_log: Path) -> None:
    lines = audit_log.read_text().splitlines()
    syslog = []
    for line in lines:
        stamp, body = line[:17], line[18:]
        month = [
            "Jan",
            "Feb",
            "Mar",
            "Apr",
            "May",
            "Jun",
            "Jul",
            "Aug",
            "Sep",
            "Oct",
            "Nov",
            "Dec",
        ][int(stamp[4:6]) - 1]
        syslog.append(
            f"{month} {int(stamp[6:8]):2d} {stamp[9:]} dbhost mysql-server_auditing: {body}"
        )
    text = ("\n".join(syslog) + "\n").encode()
    year = int(lines[0][:4])
    a = make_adapter("mariadb-audit", timezone="UTC").feed(audit_log.read_bytes(), final=True)
    b = make_adapter("mariadb-syslog", timezone="UTC", year=year).feed(text, final=True)
    cols = [
        "event_time",
        "db_user",
        "action",
        "client_ip",
        "session_id",
        "objects",
        "statement_text",
    ]
    assert b.rejects.height == 0
    assert a.events.select(cols).equals(b.events.select(cols))

"""The lab on MariaDB: a private ``mariadbd`` with the server_audit plugin under the same
accelerated clock, driven by the same simulated SaaS through MySQL-protocol clients.

:class:`MariaServer` makes a datadir with ``mariadb-install-db`` and starts ``mariadbd`` on a
free loopback port under libfaketime (the same clock file and preloads as the PostgreSQL lab),
with ``server_audit`` writing CONNECT, QUERY and TABLE events to a file that never rotates.
It is stopped by signalling the pid it wrote to its pid file.

:class:`MariaSim` is the driver of :mod:`detector.lab.sim` with MySQL clients in place of the
PostgreSQL ones: pymysql for the app, workers, BI, the GUI and console clients (pymysql has no
prepared statements, so every statement carries its literals), the ``mariadb`` command-line
client for the people who use psql on PostgreSQL, ``mariadb-dump`` for the nightly backup and
``pg_dump`` exports. The traffic and attack modules write PostgreSQL; :func:`to_mysql`
rewrites each statement into MariaDB's dialect as it is sent (COPY becomes a SELECT in the
command-line client, or ``SELECT ... INTO OUTFILE`` from the GUI).

The audit log has no client port, so :func:`index_audit` pairs the driver's connections with
the log's CONNECT and FAILED_CONNECT lines per source address in connection-id order (ids are
handed out in accept order, and the driver connects from one address at a time).
"""

# ruff: noqa: S603, S608 - runs the MariaDB programs it found itself; SQL from the lab's integers

from __future__ import annotations

import contextlib
import itertools
import os
import pwd
import re
import shutil
import signal
import subprocess
import time
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

from detector.lab.clock import SimClock
from detector.lab.cluster import free_port, wait_until
from detector.lab.forward import ConnRecord
from detector.lab.labels import EventIndex, LogIndex, Session
from detector.lab.schema import DATABASE, Sizes, password
from detector.lab.sim import Psql, Sim

MARIADBD_CANDIDATES = (
    os.environ.get("EXFILWATCH_MARIADBD", ""),
    "/usr/sbin/mariadbd",
    "/usr/local/mysql/bin/mariadbd",
)
PLUGIN_DIRS = ("/usr/lib/mysql/plugin", "/usr/lib/x86_64-linux-gnu/mariadb19/plugin",
               "/usr/local/mysql/lib/plugin")
AUDIT_LOG = "server_audit.log"


def mariadbd() -> Path | None:
    for candidate in MARIADBD_CANDIDATES:
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    return None


def plugin_dir() -> Path | None:
    for candidate in PLUGIN_DIRS:
        if (Path(candidate) / "server_audit.so").is_file():
            return Path(candidate)
    return None


def mariadb_unavailable_reason() -> str | None:
    """Why the MariaDB lab cannot run here, or None if it can."""
    if mariadbd() is None:
        return "mariadbd not found (apt-get install mariadb-server; or EXFILWATCH_MARIADBD)"
    if plugin_dir() is None:
        return "the server_audit plugin is not installed (server_audit.so)"
    for tool in ("mariadb-install-db", "mariadb", "mariadb-dump"):
        if shutil.which(tool) is None:
            return f"{tool} not found (apt-get install mariadb-server mariadb-client)"
    try:
        _pymysql()
    except ImportError:
        return "pymysql is not installed"
    return None


def _pymysql() -> Any:
    """The pymysql module (imported when the MariaDB lab runs, not before)."""
    import pymysql  # type: ignore[import-untyped]

    return pymysql


# --- the server ---------------------------------------------------------------------------------


@dataclass
class MariaServer:
    """One private mariadbd under ``root``; see the module docstring."""

    root: Path
    port: int
    environment: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = None

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def run_dir(self) -> Path:
        return self.root / "run"

    @property
    def socket(self) -> Path:
        return self.run_dir / "mysqld.sock"

    @property
    def pid_file(self) -> Path:
        return self.run_dir / "mysqld.pid"

    @property
    def audit_log(self) -> Path:
        return self.root / "log" / AUDIT_LOG

    @property
    def error_log(self) -> Path:
        return self.root / "log" / "error.log"

    @property
    def files_dir(self) -> Path:
        """secure_file_priv: where ``SELECT ... INTO OUTFILE`` may write."""
        return self.root / "files"

    @classmethod
    def create(cls, root: Path, environment: dict[str, str]) -> MariaServer:
        """``mariadb-install-db`` a new datadir in ``root`` under ``environment``."""
        root.mkdir(parents=True, exist_ok=True)
        server = cls(root, free_port(), dict(environment))
        account = _maria_account()
        for path in (root, server.run_dir, server.audit_log.parent, server.files_dir):
            path.mkdir(exist_ok=True)
            path.chmod(0o755)
            if account is not None:
                os.chown(path, account.pw_uid, account.pw_gid)
        args = [str(shutil.which("mariadb-install-db")), "--no-defaults",
                f"--datadir={server.data_dir}", "--auth-root-authentication-method=socket",
                "--skip-test-db", "--skip-name-resolve"]
        if account is not None:
            args.append(f"--user={account.pw_name}")
        subprocess.run(args, check=True, capture_output=True, cwd=root,
                       env={**os.environ, "TZ": "UTC", **server.environment})
        return server

    def start(self, *, timeout: float = 60.0) -> None:
        args = [
            str(mariadbd()), "--no-defaults", f"--datadir={self.data_dir}",
            f"--port={self.port}", "--bind-address=127.0.0.1", f"--socket={self.socket}",
            f"--pid-file={self.pid_file}", f"--log-error={self.error_log}",
            "--skip-name-resolve", "--skip-log-bin", "--default-time-zone=+00:00",
            f"--plugin-dir={plugin_dir()}", "--plugin-load-add=server_audit",
            "--server-audit-logging=ON", "--server-audit-events=CONNECT,QUERY,TABLE",
            "--server-audit-output-type=file", f"--server-audit-file-path={self.audit_log}",
            "--server-audit-file-rotations=0", "--server-audit-excl-users=root",
            "--server-audit-query-log-limit=1048576",
            "--query-cache-type=0", "--query-cache-size=0",  # the cache hides table reads
            "--innodb-flush-log-at-trx-commit=0", "--innodb-buffer-pool-size=256M",
            "--max-connections=100", f"--secure-file-priv={self.files_dir}",
        ]
        account = _maria_account()
        if account is not None:
            args.append(f"--user={account.pw_name}")
        self.process = subprocess.Popen(
            args, cwd=self.root, env={**os.environ, "TZ": "UTC", **self.environment},
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        wait_until(self._accepts, timeout=timeout, what="the private MariaDB to start")

    def _accepts(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            raise RuntimeError(f"mariadbd exited with {self.process.returncode}; see"
                               f" {self.error_log}")
        return self.pid_file.exists() and self.socket.exists()

    def root_connection(self) -> Any:
        return _pymysql().connect(unix_socket=str(self.socket), user="root", autocommit=True)

    def pid(self) -> int | None:
        try:
            return int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None

    def stop(self, *, timeout: float = 60.0) -> None:
        """SIGTERM the pid in the pid file, wait for it to go."""
        pid = self.pid()
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        if self.process is not None:
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            self.process = None

    def remove(self) -> None:
        if self.pid() is not None and self.process is not None:
            self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


def _maria_account() -> pwd.struct_passwd | None:
    """The account mariadbd runs as when we are root (None: as ourselves)."""
    if os.geteuid() != 0:
        return None
    for name in ("mysql", "nobody"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    raise RuntimeError("running as root and no mysql/nobody account to run mariadbd as")


# --- the dialect --------------------------------------------------------------------------------

#: The GUI client's session preamble on MariaDB, statement for statement in place of the
#: PostgreSQL one (DBeaver's MySQL driver asks for these).
DBEAVER_MARIADB = {
    "SET application_name = 'DBeaver 23.2.0 - Main'": "SET autocommit=1",
    "SELECT current_schema(), session_user": "SELECT DATABASE(), CURRENT_USER()",
    "SHOW search_path": "SHOW VARIABLES LIKE 'lower_case_table_names'",
    "SET search_path = public": f"USE {DATABASE}",
    "SELECT t.oid, t.typname FROM pg_catalog.pg_type t WHERE t.typname = 'hstore'":
        "SELECT @@GLOBAL.time_zone, @@SESSION.time_zone",
}
_REWRITES: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"interval '(\d+) (\w+?)s?'", re.I), r"INTERVAL \1 \2"),
    (re.compile(r"(\w+(?:\.\w+)?)::date"), r"DATE(\1)"),
    (re.compile(r"ON CONFLICT \(client_id, day\) DO UPDATE SET searches ="
                r" client_daily_search_counts\.searches \+ 1"),
     "ON DUPLICATE KEY UPDATE searches = searches + 1"),
    (re.compile(r"ON CONFLICT \([^)]*\) DO UPDATE SET (\w+) = EXCLUDED\.(\w+)"),
     r"ON DUPLICATE KEY UPDATE \1 = VALUES(\2)"),
    (re.compile(r"timestamp with time zone '([^']*?)Z'"), r"TIMESTAMP '\1'"),
    (re.compile(r"CAST\(date_trunc\('day', ([^)]+)\) AS date\)"), r"DATE(\1)"),
    (re.compile(r'"public"\.'), f"`{DATABASE}`."),
    (re.compile(r'"(\w+)"'), r"`\1`"),
    (re.compile(r"^ANALYZE (\w+)", re.M), r"ANALYZE TABLE \1"),
    (re.compile(r"\bhost text\b"), "host varchar(64)"),
]
_COPY_TABLE = re.compile(r"^\s*\\?copy\s+(\w+)\s+TO\s+\S+.*$", re.I | re.S)
_COPY_QUERY = re.compile(r"^\s*COPY\s+\((.*)\)\s+TO\s+STDOUT.*$", re.I | re.S)


def to_mysql(sql: str) -> str:
    """A statement of the lab's PostgreSQL traffic in MariaDB's dialect. COPY of a table (and
    psql's ``\\copy``) becomes ``SELECT * FROM`` it, COPY of a query the query."""
    sql = sql.strip().rstrip(";")
    if sql in DBEAVER_MARIADB:
        return DBEAVER_MARIADB[sql]
    m = _COPY_TABLE.match(sql)
    if m:
        return f"SELECT * FROM {m.group(1)}"
    m = _COPY_QUERY.match(sql)
    if m:
        return m.group(1)
    for pattern, replacement in _REWRITES:
        sql = pattern.sub(replacement, sql)
    return sql


def _u(expr: str, salt: str, seed: int) -> str:
    """A uniform number in [0, 1) hashed from ``expr`` (the same for a seed every run)."""
    return f"(CONV(SUBSTR(MD5(CONCAT({expr}, '-{salt}-{seed}')), 1, 8), 16, 10) / 4294967296)"


def _pick(expr: str, salt: str, seed: int, items: list[str]) -> str:
    quoted = ", ".join(f"'{i}'" for i in items)
    return f"ELT(1 + FLOOR({_u(expr, salt, seed)} * {len(items)}), {quoted})"


def schema_mysql(sizes: Sizes, start: date, seed: int) -> list[str]:
    """The tables and data of :func:`detector.lab.schema.schema_sql` in MariaDB (InnoDB, the
    SEQUENCE engine's ``seq_1_to_N`` for generate_series, hashes for random())."""
    n = sizes.clients
    first_day = start - timedelta(days=sizes.search_days)
    oldest = date(start.year, start.month, 1)
    for _ in range(sizes.invoice_months - 1):
        prev = oldest - timedelta(days=1)
        oldest = date(prev.year, prev.month, 1)
    countries = ["US", "DE", "FR", "GB", "NL", "SE", "JP", "BR"]
    week_ago = (start - timedelta(days=7)).isoformat()
    return [
        "CREATE TABLE plans (id INT PRIMARY KEY, name VARCHAR(32) NOT NULL,"
        " monthly_fee DECIMAL(10,2) NOT NULL)",
        "INSERT INTO plans VALUES (1, 'free', 0), (2, 'starter', 49), (3, 'team', 199),"
        " (4, 'business', 799), (5, 'enterprise', 2999)",
        "CREATE TABLE feature_flags (id INT PRIMARY KEY, name VARCHAR(64) UNIQUE NOT NULL,"
        " enabled BOOLEAN NOT NULL)",
        "INSERT INTO feature_flags SELECT seq, CONCAT('flag_', seq), seq % 3 <> 0"
        " FROM seq_1_to_30",
        "CREATE TABLE clients (id INT PRIMARY KEY, name VARCHAR(128) NOT NULL,"
        " email VARCHAR(128) NOT NULL, country CHAR(2) NOT NULL, plan_id INT NOT NULL,"
        " anniversary_day INT NOT NULL, created_at DATETIME(6) NOT NULL)",
        f"INSERT INTO clients SELECT seq, CONCAT('Client ', seq, ' ', MD5(CONCAT(seq, '{seed}'))),"
        " CONCAT('billing@client', seq, '.example.com'),"
        f" {_pick('seq', 'country', seed, countries)},"
        f" 1 + FLOOR({_u('seq', 'plan', seed)} * 5), 1 + FLOOR({_u('seq', 'ann', seed)} * 28),"
        f" TIMESTAMP '{oldest.isoformat()} 00:00:00'"
        f" - INTERVAL FLOOR({_u('seq', 'created', seed)} * 900) DAY FROM seq_1_to_{n}",
        "CREATE TABLE accounts (id INT PRIMARY KEY, client_id INT NOT NULL,"
        " name VARCHAR(64) NOT NULL, email VARCHAR(128) NOT NULL,"
        " balance DECIMAL(12,2) NOT NULL, status VARCHAR(16) NOT NULL,"
        " updated_at DATETIME(6) NOT NULL, KEY accounts_client_idx (client_id))",
        f"INSERT INTO accounts SELECT seq, 1 + (seq - 1) % {n}, CONCAT('Account ', seq),"
        " CONCAT('person', seq, '@mail.example.org'),"
        f" ROUND({_u('seq', 'balance', seed)} * 10000, 2),"
        f" {_pick('seq', 'status', seed, ['active', 'active', 'active', 'suspended', 'closed'])},"
        f" TIMESTAMP '{first_day.isoformat()} 00:00:00'"
        f" + INTERVAL FLOOR({_u('seq', 'upd', seed)} * 5184000) SECOND"
        f" FROM seq_1_to_{sizes.accounts}",
        "CREATE TABLE users (id INT PRIMARY KEY, client_id INT NOT NULL,"
        " name VARCHAR(64) NOT NULL, email VARCHAR(128) NOT NULL, role VARCHAR(16) NOT NULL,"
        " last_login DATETIME(6), KEY users_client_name_idx (client_id, name))",
        f"INSERT INTO users SELECT seq, 1 + (seq - 1) % {n}, CONCAT('User ', MD5(seq)),"
        " CONCAT('member', seq, '@team.example.net'),"
        f" {_pick('seq', 'role', seed, ['owner', 'admin', 'member', 'member', 'viewer'])},"
        f" TIMESTAMP '{first_day.isoformat()} 00:00:00'"
        f" + INTERVAL FLOOR({_u('seq', 'login', seed)} * 5184000) SECOND"
        f" FROM seq_1_to_{sizes.users}",
        "CREATE TABLE api_keys (id INT PRIMARY KEY, client_id INT NOT NULL,"
        " key_hash CHAR(32) UNIQUE NOT NULL, scopes VARCHAR(64) NOT NULL,"
        " created_at DATETIME(6) NOT NULL)",
        f"INSERT INTO api_keys SELECT seq, 1 + (seq - 1) % {n}, MD5(CONCAT('key', seq, '{seed}')),"
        f" 'read,write', TIMESTAMP '{start.isoformat()} 00:00:00'"
        f" - INTERVAL FLOOR({_u('seq', 'key', seed)} * 400) DAY FROM seq_1_to_{2 * n}",
        "CREATE TABLE client_daily_search_counts (client_id INT NOT NULL, day DATE NOT NULL,"
        " searches INT NOT NULL, PRIMARY KEY (client_id, day))",
        "INSERT INTO client_daily_search_counts SELECT c.seq,"
        f" DATE '{first_day.isoformat()}' + INTERVAL d.seq DAY,"
        f" FLOOR({_u('c.seq * 1000 + d.seq', 'searches', seed)} * 400)"
        f" FROM seq_1_to_{n} c JOIN seq_0_to_{sizes.search_days - 1} d",
        "CREATE TABLE search_events (id BIGINT AUTO_INCREMENT PRIMARY KEY,"
        " client_id INT NOT NULL, query_hash CHAR(32) NOT NULL, created_at DATETIME(6) NOT NULL,"
        " KEY search_events_created_idx (created_at))",
        "INSERT INTO search_events (client_id, query_hash, created_at)"
        f" SELECT 1 + FLOOR({_u('seq', 'client', seed)} * {n}), MD5(seq),"
        f" TIMESTAMP '{week_ago} 00:00:00' + INTERVAL FLOOR({_u('seq', 'at', seed)} * 604800)"
        f" SECOND FROM seq_1_to_{n * sizes.search_events_per_client}",
        "CREATE TABLE invoices (id INT AUTO_INCREMENT PRIMARY KEY, client_id INT NOT NULL,"
        " month DATE NOT NULL, amount DECIMAL(12,2) NOT NULL,"
        " KEY invoices_client_month_idx (client_id, month))",
        "INSERT INTO invoices (client_id, month, amount) SELECT c.seq,"
        f" DATE '{oldest.isoformat()}' + INTERVAL m.seq MONTH,"
        f" ROUND({_u('c.seq * 100 + m.seq', 'amount', seed)} * 3000, 2)"
        f" FROM seq_1_to_{n} c JOIN seq_0_to_{sizes.invoice_months - 2} m",
        "CREATE TABLE job_runs (id INT AUTO_INCREMENT PRIMARY KEY, job VARCHAR(64) NOT NULL,"
        " started_at DATETIME(6) NOT NULL, finished_at DATETIME(6), status VARCHAR(64) NOT NULL)",
        "ANALYZE TABLE plans, feature_flags, clients, accounts, users, api_keys,"
        " client_daily_search_counts, search_events, invoices, job_runs",
    ]


#: What each lab role may do on MariaDB (the PostgreSQL grants of detector.lab.schema).
MARIADB_GRANTS: dict[str, list[str]] = {
    "app_api": ["SELECT, INSERT, UPDATE ON saas.*"],
    "worker": ["SELECT, INSERT, UPDATE, DELETE ON saas.*"],
    "bi": ["SELECT ON saas.*"],
    **{f"analyst_{i}": ["SELECT, SHOW VIEW, LOCK TABLES ON saas.*", "FILE ON *.*"]
       for i in range(1, 7)},
    **{f"support_{i}": ["SELECT, SHOW VIEW ON saas.*"] for i in range(1, 9)},
    "backup": ["SELECT, SHOW VIEW, LOCK TABLES, EVENT, TRIGGER ON saas.*"],
    "billing": ["SELECT, INSERT, UPDATE ON saas.*"],
    "dba": ["ALL PRIVILEGES ON *.*"],
}


def roles_mysql(seed: int) -> list[str]:
    out = []
    for role, grants in MARIADB_GRANTS.items():
        out.append(f"CREATE USER '{role}'@'127.%' IDENTIFIED BY '{password(role, seed)}'")
        out += [f"GRANT {g} TO '{role}'@'127.%'" for g in grants]
    return out


# --- the driver ---------------------------------------------------------------------------------


class MariaSim(Sim):
    """:class:`detector.lab.sim.Sim` with MySQL clients; the same methods, so the traffic and
    attack modules run unchanged."""

    def __init__(self, server: MariaServer, clock: SimClock, work_dir: Path) -> None:
        super().__init__(server.port, clock, work_dir)
        self.server = server
        self._exports = itertools.count()
        self._audit_offset = 0
        self._failed_seen = 0
        self._failed_expected = 0
        self._cli = str(shutil.which("mariadb"))
        self._dump = str(shutil.which("mariadb-dump"))

    def connect(self, address: str, user: str, password: str, app: str, tag: str = "", *,
                literal: bool) -> Any:
        """A pymysql connection from ``address`` (autocommit; ``literal`` is moot: pymysql
        always sends literals). ``app`` goes into the connection attributes, which the audit
        log does not show."""
        pymysql = _pymysql()

        self.forwarder(address).tag = tag
        return pymysql.connect(
            host="127.0.0.1", port=self.forwarder(address).port, user=user, password=password,
            database=DATABASE, autocommit=True, connect_timeout=10,
            program_name=app or None,
        )

    def try_login(self, address: str, user: str, password: str, app: str, tag: str) -> bool:
        """One login attempt; False when the server refused it. mariadbd writes the
        FAILED_CONNECT line after it has sent the error, so a refused attempt waits for its
        line before the clock may move on (else the line carries the next action's time)."""
        pymysql = _pymysql()

        try:
            conn = self.connect(address, user, password, app, tag, literal=True)
        except pymysql.err.OperationalError:
            self._failed_expected += 1
            self._await_failed_lines()
            return False
        conn.close()
        return True

    def _await_failed_lines(self, timeout: float = 5.0) -> None:
        """Read the audit log on from where it was last read until it holds as many
        FAILED_CONNECT lines as refused attempts were made."""
        deadline = time.monotonic() + timeout
        while self._failed_seen < self._failed_expected and time.monotonic() < deadline:
            try:
                with self.server.audit_log.open("rb") as handle:
                    handle.seek(self._audit_offset)
                    data = handle.read()
            except OSError:
                data = b""
            complete = data.rfind(b"\n") + 1
            self._failed_seen += data[:complete].count(b",FAILED_CONNECT,")
            self._audit_offset += complete
            if self._failed_seen < self._failed_expected:
                time.sleep(0.001)

    def query(self, conn: Any, sql: str, params: Any = None) -> int:
        return len(self.fetch(conn, sql, params))

    def fetch(self, conn: Any, sql: str, params: Any = None) -> list[Any]:
        pymysql = _pymysql()

        try:
            with conn.cursor() as cur:
                cur.execute(to_mysql(sql), params)
                return list(cur.fetchall()) if cur.description is not None else []
        except pymysql.err.Error:
            self.client_errors += 1
            return []

    def copy_out(self, conn: Any, sql: str) -> None:
        """A GUI client's export of a COPY: the query ``INTO OUTFILE`` a server-side file."""
        target = self.server.files_dir / f"export-{next(self._exports)}.csv"
        self.query(conn, f"{to_mysql(sql)} INTO OUTFILE '{target}' FIELDS TERMINATED BY ','"
                         " OPTIONALLY ENCLOSED BY '\"'")

    def psql(self, address: str, user: str, password: str, tag: str = "") -> MariaCli:
        """The ``mariadb`` command-line client where PostgreSQL users run psql."""
        self.forwarder(address).tag = tag
        return MariaCli(self, self._client_args(self._cli, address, user, password))

    def _client_args(self, program: str, address: str, user: str, password: str) -> list[str]:
        return [program, "--no-defaults", "-h", "127.0.0.1", "-P",
                str(self.forwarder(address).port), "-u", user, f"--password={password}",
                "--protocol=TCP", "--skip-ssl"]

    def pg_dump(self, address: str, user: str, password: str, tag: str,
                tables: tuple[str, ...] = ()) -> None:
        """``mariadb-dump --single-transaction`` of the database (or ``tables``) to nowhere."""
        self.forwarder(address).tag = tag
        args = [*self._client_args(self._dump, address, user, password),
                "--single-transaction", "--skip-lock-tables", "--no-tablespaces", DATABASE,
                *tables]
        result = subprocess.run(args, stdout=subprocess.DEVNULL, stderr=self._stderr,
                                check=False)
        if result.returncode != 0:
            raise RuntimeError(f"mariadb-dump as {user} exited with {result.returncode}")


class MariaCli(Psql):
    """One real ``mariadb`` client in batch mode; :meth:`run` sends a statement and waits for
    a marker echoed after it (``\\! echo``, which the server never sees)."""

    def __init__(self, sim: MariaSim, args: list[str]) -> None:
        # not Psql's: the same interface over another program
        self._marks = itertools.count()
        self._proc = subprocess.Popen(
            [*args, "--batch", "--skip-column-names", "--skip-reconnect", "--force", DATABASE],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=sim._stderr, text=True,
            bufsize=1,
        )
        self.run("")

    def run(self, sql: str) -> None:
        assert self._proc.stdin is not None and self._proc.stdout is not None
        mark = f"__lab_{next(self._marks)}__"
        statement = f"{to_mysql(sql)};\n" if sql.strip() else ""
        self._proc.stdin.write(f"{statement}\\! echo {mark}\n")
        self._proc.stdin.flush()
        while True:
            line = self._proc.stdout.readline()
            if not line:
                raise RuntimeError(f"mariadb exited with {self._proc.wait()} (see"
                                   " clients.stderr)")
            # results are block-buffered by the client: the marker (written by echo) can
            # follow the unflushed part of a row on the same line
            if line.rstrip("\n").endswith(mark):
                return

    def close(self) -> None:
        assert self._proc.stdin is not None and self._proc.stdout is not None
        self._proc.stdin.write("quit\n")
        self._proc.stdin.close()
        self._proc.stdout.read()
        self._proc.wait(timeout=60)


# --- the log --------------------------------------------------------------------------------------


def _audit_time(stamp: str) -> datetime:
    return datetime.strptime(stamp, "%Y%m%d %H:%M:%S").replace(tzinfo=UTC)


def index_audit(path: Path) -> LogIndex:
    """server_audit.log read once: sessions by connection id, and the CONNECT and
    FAILED_CONNECT lines per source address in connection-id order (keyed ``(host, 0)``: the
    log has no client port)."""
    sessions: dict[str, Session] = {}
    connects: dict[str, list[tuple[int, datetime]]] = defaultdict(list)
    records = 0
    first: datetime | None = None
    last: datetime | None = None
    with path.open(encoding="utf-8", errors="replace") as handle:
        for line in handle:
            head = line.split(",", 8)
            if len(head) < 9 or not head[4].isdigit():
                continue
            records += 1
            when = _audit_time(head[0])
            first = when if first is None or when < first else first
            last = when if last is None or when > last else last
            user, host, conn, op = head[2], head[3], head[4], head[6]
            s = sessions.get(conn)
            if s is None:
                s = sessions[conn] = Session(conn, when, when)
            s.first, s.last = min(s.first, when), max(s.last, when)
            s.times.append(when)
            s.user = s.user or user or None
            s.host = s.host or host or None
            if op in ("CONNECT", "FAILED_CONNECT"):
                connects[host].append((int(conn), when))
    received = {(host, 0): [(str(c), t) for c, t in sorted(lines)]
                for host, lines in connects.items()}
    return LogIndex(sessions, received, records, first, last)


def index_audit_events(path: Path) -> EventIndex:
    """Per connection: the project's mariadb-audit adapter's events and tables."""
    from detector.adapters import make_adapter

    parser = make_adapter("mariadb-audit", location=path.name, timezone="UTC")
    parsed = parser.feed(path.read_bytes(), final=True)
    events = parsed.events.select("session_id", "db_user", "objects")
    counts = {r["session_id"]: r["len"]
              for r in events.group_by("session_id").len().iter_rows(named=True)}
    tables: dict[str, set[str]] = defaultdict(set)
    pairs = events.select("session_id", "objects").explode("objects").drop_nulls().unique()
    for r in pairs.iter_rows(named=True):
        tables[r["session_id"]].add(r["objects"])
    by_user = {r["db_user"]: r["len"]
               for r in events.group_by("db_user").len().sort("db_user").iter_rows(named=True)}
    return EventIndex(counts, dict(tables), by_user, parsed.rejects.height, events.height)


def portless(records: list[ConnRecord]) -> list[ConnRecord]:
    """The driver's connections keyed like :func:`index_audit` (port 0), in connect order."""
    return [ConnRecord(r.tag, r.address, 0, r.sim_time) for r in records]


def outside_audit_span(path: Path, low: float, high: float) -> int:
    """server_audit lines whose timestamp is outside ``low``..``high`` (whole seconds)."""
    n = 0
    with path.open(encoding="utf-8", errors="replace") as handle:
        for line in handle:
            stamp = line.split(",", 1)[0]
            if len(stamp) == 17:
                t = _audit_time(stamp).timestamp()
                n += not low - 1 <= t <= high + 1
    return n

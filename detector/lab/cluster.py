"""A private PostgreSQL 15 cluster with pgaudit, for the lab and for tests that need a real
server.

>>> cluster = PgCluster.create(tmp_path, log_line_prefix="%m [%p] ")   # doctest: +SKIP
>>> cluster.start()                                                    # doctest: +SKIP
>>> with cluster.connect("app_api", password="app-secret") as conn: ...  # doctest: +SKIP
>>> cluster.stop()                                                     # doctest: +SKIP
>>> cluster.log_file("jsonlog")                                        # doctest: +SKIP

The cluster lives in one temporary directory (data, unix socket, logs), listens on a free
loopback port, and is stopped by signalling the postmaster pid it wrote to ``postmaster.pid``
(never by name). When the tests run as root the server runs as the ``postgres`` account (or
``nobody``), since PostgreSQL refuses to run as root. :func:`unavailable_reason` tells why a
cluster cannot be made here (no binaries, no pgaudit), for a skip message; with
``lab=True`` it also asks for libfaketime, ``psql`` and ``pg_dump``. ``environment`` is added to
the environment of ``initdb`` and the postmaster (the lab preloads libfaketime through it).
"""

# ruff: noqa: S603 - runs the PostgreSQL programs it found itself, with its own arguments

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PG_BIN_CANDIDATES = (
    os.environ.get("EXFILWATCH_PG_BIN", ""),
    "/usr/lib/postgresql/15/bin",
    "/usr/local/pgsql/bin",
)
SUFFIX = {"jsonlog": ".json", "csvlog": ".csv", "stderr": ".log"}
FAKETIME_CANDIDATES = (
    os.environ.get("EXFILWATCH_LIBFAKETIME", ""),
    "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1",
    "/usr/lib/aarch64-linux-gnu/faketime/libfaketime.so.1",
    "/usr/lib/faketime/libfaketime.so.1",
)
#: A preload placed before libfaketime: the waits it wraps (select, poll, epoll) go straight to
#: the C library. libfaketime 0.9.10 runs them with its thread-local ``dont_fake`` flag set, so
#: a signal handler that runs during the wait reads the real clock; PostgreSQL 15's postmaster
#: logs from its signal handlers while it waits in select() ("database system is ready to
#: accept connections", the shutdown lines). Timeouts are unchanged (no rate is faked).
WAIT_SHIM_SOURCE = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <poll.h>
#include <signal.h>
#include <sys/epoll.h>
#include <sys/select.h>
#include <time.h>

static void *libc_symbol(const char *name) {
    static void *libc;
    if (!libc) libc = dlopen("libc.so.6", RTLD_LAZY | RTLD_NOLOAD);
    if (!libc) libc = dlopen("libc.so.6", RTLD_LAZY);
    return libc ? dlsym(libc, name) : 0;
}

int select(int n, fd_set *r, fd_set *w, fd_set *e, struct timeval *t) {
    static int (*real)(int, fd_set *, fd_set *, fd_set *, struct timeval *);
    if (!real) real = libc_symbol("select");
    return real(n, r, w, e, t);
}

int pselect(int n, fd_set *r, fd_set *w, fd_set *e, const struct timespec *t,
            const sigset_t *m) {
    static int (*real)(int, fd_set *, fd_set *, fd_set *, const struct timespec *,
                       const sigset_t *);
    if (!real) real = libc_symbol("pselect");
    return real(n, r, w, e, t, m);
}

int poll(struct pollfd *f, nfds_t n, int t) {
    static int (*real)(struct pollfd *, nfds_t, int);
    if (!real) real = libc_symbol("poll");
    return real(f, n, t);
}

int ppoll(struct pollfd *f, nfds_t n, const struct timespec *t, const sigset_t *m) {
    static int (*real)(struct pollfd *, nfds_t, const struct timespec *, const sigset_t *);
    if (!real) real = libc_symbol("ppoll");
    return real(f, n, t, m);
}

int epoll_wait(int fd, struct epoll_event *ev, int n, int t) {
    static int (*real)(int, struct epoll_event *, int, int);
    if (!real) real = libc_symbol("epoll_wait");
    return real(fd, ev, n, t);
}

int epoll_pwait(int fd, struct epoll_event *ev, int n, int t, const sigset_t *m) {
    static int (*real)(int, struct epoll_event *, int, int, const sigset_t *);
    if (!real) real = libc_symbol("epoll_pwait");
    return real(fd, ev, n, t, m);
}
"""

#: Settings of the audited test cluster (see docs/formats.md for what each one does).
AUDIT_SETTINGS: dict[str, str] = {
    "shared_preload_libraries": "'pgaudit'",
    "pgaudit.log": "'read,write,ddl,role,misc'",
    "pgaudit.log_relation": "on",
    "pgaudit.log_rows": "on",
    "pgaudit.log_catalog": "off",
    "log_connections": "on",
    "log_disconnections": "on",
    "log_destination": "'jsonlog,csvlog,stderr'",
    "logging_collector": "on",
    "log_directory": "'log'",
    "log_filename": "'postgresql.log'",
    "log_rotation_age": "0",
    "log_rotation_size": "0",
    "log_timezone": "'UTC'",
    "listen_addresses": "'127.0.0.1'",
    "password_encryption": "'scram-sha-256'",
    "fsync": "off",
    "max_connections": "30",
}


def pg_bin() -> Path | None:
    """The directory holding ``initdb`` and ``postgres`` for PostgreSQL 15, if found."""
    for candidate in PG_BIN_CANDIDATES:
        if candidate and (Path(candidate) / "initdb").is_file():
            return Path(candidate)
    return None


def libfaketime() -> Path | None:
    """The libfaketime preload library (Debian's ``libfaketime`` package), if found."""
    for candidate in FAKETIME_CANDIDATES:
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    return None


def wait_shim(directory: Path) -> Path | None:
    """Compile :data:`WAIT_SHIM_SOURCE` into ``directory`` (a C compiler is needed); the shared
    library, or None when no compiler is found or it fails."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return None
    source = directory / "waitshim.c"
    library = directory / "waitshim.so"
    source.write_text(WAIT_SHIM_SOURCE)
    result = subprocess.run(
        [compiler, "-shared", "-fPIC", "-O2", "-o", str(library), str(source), "-ldl"],
        capture_output=True,
        check=False,
    )
    if result.returncode != 0 or not library.is_file():
        return None
    library.chmod(0o755)
    return library


def client_tool(name: str) -> Path | None:
    """A PostgreSQL client program (``psql``, ``pg_dump``): the server's own, else on PATH."""
    bin_dir = pg_bin()
    if bin_dir is not None and (bin_dir / name).is_file():
        return bin_dir / name
    found = shutil.which(name)
    return Path(found) if found else None


def unavailable_reason(*, lab: bool = False) -> str | None:
    """Why a private audited cluster cannot run here, or None if it can; ``lab`` also needs
    libfaketime, psql and pg_dump."""
    bin_dir = pg_bin()
    if bin_dir is None:
        return "PostgreSQL 15 binaries not found (set EXFILWATCH_PG_BIN)"
    libdir = subprocess.run(
        [str(bin_dir / "pg_config"), "--pkglibdir"], capture_output=True, text=True, check=False
    ).stdout.strip() or str(bin_dir.parent / "lib")
    if not (Path(libdir) / "pgaudit.so").exists():
        return f"pgaudit is not installed in {libdir} (apt-get install postgresql-15-pgaudit)"
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "psycopg is not installed"
    if lab:
        if libfaketime() is None:
            return "libfaketime is not installed (apt-get install libfaketime)"
        for tool in ("psql", "pg_dump"):
            if client_tool(tool) is None:
                return f"{tool} not found (apt-get install postgresql-client-15)"
    return None


def require_cluster(*, lab: bool = False) -> None:
    """Skip the calling test, saying why, when no cluster (``lab``: and no lab) can be made
    here; under CI=true that is a failure instead."""
    import pytest

    reason = unavailable_reason(lab=lab)
    if reason is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true but no PostgreSQL with pgaudit: {reason}")
        pytest.skip(reason)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _server_account() -> pwd.struct_passwd | None:
    """The account the server runs as when we are root (None: run as ourselves)."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    raise RuntimeError("running as root and no postgres/nobody account to run the server as")


def _reachable(path: Path) -> bool:
    """Whether every directory down to ``path`` lets others pass (o+x)."""
    path = path.resolve()
    return all(p.stat().st_mode & 0o001 for p in (path, *path.parents) if p.exists())


def wait_until(check: Callable[[], bool], *, timeout: float, what: str) -> None:
    """Poll ``check`` until it is true; RuntimeError naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


@dataclass
class PgCluster:
    """One private cluster under ``root``; see the module docstring."""

    root: Path
    bin_dir: Path
    port: int
    log_line_prefix: str
    settings: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = None
    superuser: str = "postgres"
    environment: dict[str, str] = field(default_factory=dict)

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def socket_dir(self) -> Path:
        return self.root / "sock"

    @property
    def log_dir(self) -> Path:
        return self.data_dir / "log"

    def log_file(self, destination: str) -> Path:
        """The log file of ``destination`` (``jsonlog``, ``csvlog`` or ``stderr``)."""
        return self.log_dir / f"postgresql{SUFFIX[destination]}"

    @classmethod
    def create(
        cls,
        root: Path,
        *,
        log_line_prefix: str = "%m [%p] ",
        settings: dict[str, str] | None = None,
        environment: dict[str, str] | None = None,
    ) -> PgCluster:
        """initdb a new cluster in ``root`` (which must be empty or absent); ``environment``
        is added to initdb's and later the postmaster's environment."""
        bin_dir = pg_bin()
        if bin_dir is None:
            raise RuntimeError(unavailable_reason() or "no PostgreSQL")
        account = _server_account()
        if account is not None and not _reachable(root.parent):
            # the server account cannot enter pytest's private temp dirs: use one in /tmp
            root = Path(tempfile.mkdtemp(prefix="exfilwatch-pg-"))
        root.mkdir(parents=True, exist_ok=True)
        cluster = cls(root, bin_dir, free_port(), log_line_prefix, settings or {},
                      environment=dict(environment or {}))
        cluster.socket_dir.mkdir(exist_ok=True)
        if account is not None:
            os.chmod(root, 0o755)  # noqa: S103 - the server account must enter it
            for path in (root, cluster.socket_dir):
                os.chown(path, account.pw_uid, account.pw_gid)
        cluster._run(
            [
                str(bin_dir / "initdb"),
                "-D",
                str(cluster.data_dir),
                "-U",
                cluster.superuser,
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                "--encoding=UTF8",
                "--locale=C",
            ]
        )
        conf = {
            **AUDIT_SETTINGS,
            "port": str(cluster.port),
            "unix_socket_directories": f"'{cluster.socket_dir}'",
            "log_line_prefix": "'" + log_line_prefix.replace("'", "''") + "'",
            **cluster.settings,
        }
        with (cluster.data_dir / "postgresql.conf").open("a") as handle:
            handle.writelines(f"{key} = {value}\n" for key, value in conf.items())
        return cluster

    def _run(self, command: list[str]) -> None:
        account = _server_account()
        extra: dict[str, Any] = {}
        if account is not None:
            extra = {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []}
        env = {**os.environ, **self.environment} if self.environment else None
        subprocess.run(command, check=True, capture_output=True, cwd=self.root, env=env, **extra)

    def start(self, *, timeout: float = 30.0) -> None:
        """Start the postmaster and wait until it accepts connections."""
        account = _server_account()
        extra: dict[str, Any] = {}
        if account is not None:
            extra = {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []}
        self.process = subprocess.Popen(
            [str(self.bin_dir / "postgres"), "-D", str(self.data_dir)],
            cwd=self.root,
            env={**os.environ, **self.environment} if self.environment else None,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            **extra,
        )
        wait_until(self._accepts, timeout=timeout, what="the private PostgreSQL to start")

    def _accepts(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            raise RuntimeError(
                f"postgres exited with {self.process.returncode}; see {self.log_dir}"
            )
        result = subprocess.run(
            [
                str(self.bin_dir / "pg_isready"),
                *("-h", str(self.socket_dir), "-p", str(self.port)),
                *("-U", self.superuser, "-d", "postgres"),
            ],
            capture_output=True,
            check=False,
        )
        return result.returncode == 0

    def postmaster_pid(self) -> int | None:
        """The pid in ``postmaster.pid`` (None when the server is not running)."""
        try:
            return int((self.data_dir / "postmaster.pid").read_text().split("\n", 1)[0])
        except (OSError, ValueError):
            return None

    def stop(self, *, timeout: float = 30.0) -> None:
        """Fast shutdown: SIGINT the postmaster pid read from ``postmaster.pid``, then wait
        for it (and the log files) to be complete."""
        pid = self.postmaster_pid()
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGINT)
        if self.process is not None:
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            self.process = None
        wait_until(
            lambda: not (self.data_dir / "postmaster.pid").exists(),
            timeout=timeout,
            what="postmaster.pid to go",
        )

    def dsn(
        self,
        user: str | None = None,
        *,
        password: str | None = None,
        tcp: bool = False,
        dbname: str = "postgres",
        application_name: str = "",
    ) -> str:
        """A libpq connection string: unix socket (trusted) unless ``tcp`` (password auth)."""
        host = "127.0.0.1" if tcp or password is not None else str(self.socket_dir)
        parts = {
            "host": host,
            "port": str(self.port),
            "user": user or self.superuser,
            "dbname": dbname,
            "application_name": application_name,
            "connect_timeout": "10",
        }
        if password is not None:
            parts["password"] = password
        return " ".join(f"{k}='{v}'" for k, v in parts.items())

    def connect(self, user: str | None = None, **options: Any) -> Any:
        """A psycopg connection (autocommit); options as for :meth:`dsn`."""
        import psycopg

        return psycopg.connect(self.dsn(user, **options), autocommit=True)

    def wait_for_log(self, destination: str, needle: str, *, timeout: float = 20.0) -> None:
        """Poll until the log of ``destination`` contains ``needle``."""
        path = self.log_file(destination)

        def found() -> bool:
            try:
                return needle.encode() in path.read_bytes()
            except OSError:
                return False

        wait_until(found, timeout=timeout, what=f"{needle!r} in {path}")

    def remove(self) -> None:
        """Stop (if running) and delete everything under ``root``."""
        if self.postmaster_pid() is not None:
            self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

"""The discrete-event driver: a heap of (sim time, actor) items and the real clients.

An actor is a generator: each ``next()`` performs one client action at the simulated time the
driver has just set on the server's clock, and yields how many simulated seconds to wait before
its next action (counted from when the action finished). Nothing sleeps: after an action the
driver pops the next item and moves the clock straight to it.

Clients are real: psycopg 3 (the app's statements are server-side bound, so the log shows
``$1``; GUI and console clients use client-side binding, i.e. literals), ``psql`` driven through
its standard input (each statement is followed by an ``\\echo`` marker the driver waits for),
and ``pg_dump``. Every connection goes through the forwarder of its source address.
"""

from __future__ import annotations

import heapq
import itertools
import os
import subprocess
import threading
from collections.abc import Callable, Generator
from pathlib import Path
from typing import Any

import psycopg

from detector.lab.clock import SimClock
from detector.lab.cluster import client_tool
from detector.lab.forward import ConnRecord, Forwarder
from detector.lab.schema import DATABASE

Actor = Generator[float, None, None]


class Sim:
    """The driver; see the module docstring."""

    def __init__(self, port: int, clock: SimClock, work_dir: Path) -> None:
        self.port = port
        self.clock = clock
        self.records: list[ConnRecord] = []
        self.sim_times: dict[str, float] = {}
        self.client_errors = 0
        self.actions = 0
        self._lock = threading.Lock()
        self._forwarders: dict[str, Forwarder] = {}
        self._heap: list[tuple[float, int, Actor]] = []
        self._seq = itertools.count()
        self._stderr = (work_dir / "clients.stderr").open("ab")
        self._psql = str(client_tool("psql") or "psql")
        self._pg_dump = str(client_tool("pg_dump") or "pg_dump")

    # --- scheduling ---------------------------------------------------------------------------

    def spawn(self, at: float, actor: Actor) -> None:
        heapq.heappush(self._heap, (at, next(self._seq), actor))

    def run(self, until: float, progress: Callable[[float], None]) -> None:
        """Run every actor due before ``until``; ``progress`` gets the sim time now and then."""
        last = 0.0
        while self._heap and self._heap[0][0] < until:
            at, _, actor = heapq.heappop(self._heap)
            self.clock.advance_to(at)
            try:
                wait = next(actor)
            except StopIteration:
                continue
            self.actions += 1
            self.spawn(self.clock.now() + max(0.0, wait), actor)
            if at - last > 60:
                progress(at)
                last = at
        for _, _, actor in self._heap:
            actor.close()
        self._heap.clear()
        progress(until)

    def close(self) -> None:
        for fwd in self._forwarders.values():
            fwd.close()
        self._stderr.close()

    # --- connections --------------------------------------------------------------------------

    def forwarder(self, address: str) -> Forwarder:
        if address not in self._forwarders:
            self._forwarders[address] = Forwarder(
                address, ("127.0.0.1", self.port), self.records, self._lock, self.clock.now
            )
        return self._forwarders[address]

    def _dsn(self, address: str, user: str, password: str, app: str) -> str:
        parts = {
            "host": "127.0.0.1",
            "port": str(self.forwarder(address).port),
            "user": user,
            "password": password,
            "dbname": DATABASE,
            "sslmode": "disable",
            "gssencmode": "disable",
            "connect_timeout": "10",
        }
        if app:
            parts["application_name"] = app
        return " ".join(f"{k}='{v}'" for k, v in parts.items())

    def connect(
        self, address: str, user: str, password: str, app: str, tag: str = "", *, literal: bool
    ) -> psycopg.Connection[Any]:
        """A psycopg connection from ``address`` (autocommit). ``literal``: client-side binding
        and the simple protocol (values appear in the log), else server-side binding."""
        self.forwarder(address).tag = tag
        factory: Any = psycopg.ClientCursor if literal else psycopg.Cursor
        conn: psycopg.Connection[Any] = psycopg.connect(
            self._dsn(address, user, password, app), autocommit=True, cursor_factory=factory
        )
        return conn

    def try_login(self, address: str, user: str, password: str, app: str, tag: str) -> bool:
        """One login attempt; False when the server refused it."""
        try:
            conn = self.connect(address, user, password, app, tag, literal=True)
        except psycopg.OperationalError:
            return False
        conn.close()
        return True

    def query(self, conn: psycopg.Connection[Any], sql: str, params: Any = None) -> int:
        """Run one statement and fetch its result; the number of rows fetched."""
        return len(self.fetch(conn, sql, params))

    def fetch(self, conn: psycopg.Connection[Any], sql: str, params: Any = None) -> list[Any]:
        """Run one statement; its rows (none when it failed: counted as a client error)."""
        try:
            cur = conn.execute(sql, params)
            return cur.fetchall() if cur.description is not None else []
        except psycopg.Error:
            self.client_errors += 1
            return []

    def copy_out(self, conn: psycopg.Connection[Any], sql: str) -> None:
        with conn.cursor().copy(sql) as copy:
            for _ in copy:
                pass

    def psql(self, address: str, user: str, password: str, tag: str = "") -> Psql:
        """A ``psql`` session (application_name psql) reading statements from the driver."""
        self.forwarder(address).tag = tag
        return Psql(self, self._dsn(address, user, password, ""))

    def pg_dump(
        self, address: str, user: str, password: str, tag: str, tables: tuple[str, ...] = ()
    ) -> None:
        """Run ``pg_dump`` (custom format, to /dev/null) to completion."""
        self.forwarder(address).tag = tag
        args = [self._pg_dump, "-Fc", "--no-sync", "-f", os.devnull]
        for table in tables:
            args += ["-t", table]
        args.append(self._dsn(address, user, password, ""))
        result = subprocess.run(args, stdout=subprocess.DEVNULL, stderr=self._stderr, check=False)  # noqa: S603
        if result.returncode != 0:
            raise RuntimeError(f"pg_dump as {user} exited with {result.returncode}")


class Psql:
    """One real ``psql`` process; :meth:`run` sends a statement and waits until it is done."""

    def __init__(self, sim: Sim, dsn: str) -> None:
        self._sim = sim
        self._marks = itertools.count()
        self._proc = subprocess.Popen(  # noqa: S603
            [sim._psql, "-X", "-q", "-o", os.devnull, "-v", "ON_ERROR_STOP=0", dsn],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=sim._stderr,
            text=True,
            bufsize=1,
        )
        self.run("")  # connected once the first marker comes back

    def run(self, sql: str) -> None:
        assert self._proc.stdin is not None and self._proc.stdout is not None
        mark = f"__lab_{next(self._marks)}__"
        self._proc.stdin.write(f"{sql}\n\\echo {mark}\n" if sql else f"\\echo {mark}\n")
        self._proc.stdin.flush()
        while True:
            line = self._proc.stdout.readline()
            if not line:
                raise RuntimeError(f"psql exited with {self._proc.wait()} (see clients.stderr)")
            if line.strip() == mark:
                return

    def close(self) -> None:
        assert self._proc.stdin is not None
        self._proc.stdin.write("\\q\n")
        self._proc.stdin.close()
        self._proc.wait(timeout=60)

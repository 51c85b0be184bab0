"""A columnar buffer of simulated events and the session helper that fills it.

Sessions are numbered in the order they are opened; their public ``session_id`` strings are
assigned only after the events are sorted (see :func:`assign_session_ids`), in the shape
PostgreSQL logs them: ``<hex start second>.<hex backend pid>``.
"""

from __future__ import annotations

import random
from typing import Final, NamedTuple

import numpy as np
import polars as pl

from detector.samples.world import DB_INSTANCE, DB_NAME, DB_SYSTEM, SOURCE_FORMAT, US_PER_S
from detector.schema import COLUMNS, EVENT_SCHEMA

Extra = list[dict[str, str]]

#: Fraction of ordinary statements that fail (rows become null).
FAILURE_RATE: Final = 0.001
_FAILURES: Final = {
    "SELECT": ("57014", "canceling statement due to statement timeout", 30_000.0),
    "INSERT": ("23505", "duplicate key value violates unique constraint", 1.2),
    "UPDATE": ("40P01", "deadlock detected", 1_000.0),
    "DELETE": ("40P01", "deadlock detected", 1_000.0),
}
_DEFAULT_FAILURE: Final = ("57014", "canceling statement due to user request", 500.0)


class Query(NamedTuple):
    """One statement to run. ``rows`` is returned (read, copy) or affected (write) rows;
    ``scanned`` is how many rows the server had to visit, which drives the duration."""

    text: str
    objects: list[str] | None
    rows: int = 0
    command: str = "SELECT"
    action: str = "read"
    tenant: str | None = None
    width: int = 60
    scanned: int = 0


def duration_ms(rng: random.Random, rows: int, scanned: int) -> float:
    """Statement duration: a base cost, a per-row cost and heavy-tailed noise (lock waits,
    cold cache) so that equal statements never take exactly equal time."""
    base = 0.18 + 0.0035 * rows + 0.00022 * scanned
    value = base * rng.lognormvariate(0.0, 0.45)
    if rng.random() < 0.01:
        value *= 1.0 + rng.paretovariate(1.6)
    return round(value, 3)


class EventLog:
    """Events in generation order, one Python list per column (cheap to append to).
    Object lists are interned: each event stores the index of its distinct tuple."""

    def __init__(self) -> None:
        self.time_us: list[int] = []
        self.session: list[int] = []
        self.seq: list[int | None] = []
        self.action: list[str] = []
        self.command: list[str | None] = []
        self.objects: list[int | None] = []
        self._object_ids: dict[tuple[str, ...], int] = {}
        self.text: list[str | None] = []
        self.tenant: list[str | None] = []
        self.rows_returned: list[int | None] = []
        self.rows_affected: list[int | None] = []
        self.bytes_sent: list[int | None] = []
        self.duration: list[float | None] = []
        self.success: list[bool] = []
        self.extra: list[Extra | None] = []
        self.session_user: list[str] = []
        self.session_ip: list[str] = []
        self.session_app: list[str | None] = []

    def __len__(self) -> int:
        return len(self.time_us)

    @property
    def sessions(self) -> int:
        """Sessions opened so far (including failed logins)."""
        return len(self.session_user)

    def open(
        self,
        user: str,
        ip: str,
        app: str | None,
        t_us: int,
        rng: random.Random,
        *,
        may_fail: bool = True,
    ) -> Session:
        """Log a successful login at ``t_us`` and return the session. Statements of a session
        that ``may_fail`` fail at :data:`FAILURE_RATE` (attacks and scheduled jobs do not)."""
        key = self._new_session(user, ip, app)
        self._login(key, t_us, "login", success=True, extra=None)
        return Session(self, key, t_us, rng, may_fail=may_fail)

    def failed_login(self, user: str, ip: str, app: str | None, t_us: int) -> int:
        """Log a rejected password at ``t_us``; returns the session key of the attempt."""
        key = self._new_session(user, ip, app)
        error = f'password authentication failed for user "{user}"'
        extra = [{"key": "sqlstate", "value": "28P01"}, {"key": "error", "value": error}]
        self._login(key, t_us, "login_failed", success=False, extra=extra)
        return key

    def _new_session(self, user: str, ip: str, app: str | None) -> int:
        self.session_user.append(user)
        self.session_ip.append(ip)
        self.session_app.append(app)
        return len(self.session_user) - 1

    def _login(
        self, key: int, t_us: int, action: str, *, success: bool, extra: Extra | None
    ) -> None:
        self.append(
            key, t_us, None, action, None, None, None, None, None, None, None, None, success, extra
        )

    def append(
        self,
        key: int,
        t_us: int,
        seq: int | None,
        action: str,
        command: str | None,
        objects: list[str] | None,
        text: str | None,
        tenant: str | None,
        rows_returned: int | None,
        rows_affected: int | None,
        bytes_sent: int | None,
        duration: float | None,
        success: bool,
        extra: Extra | None,
    ) -> None:
        """Append one event (all columns positionally, for speed)."""
        self.time_us.append(t_us)
        self.session.append(key)
        self.seq.append(seq)
        self.action.append(action)
        self.command.append(command)
        self.objects.append(
            None
            if objects is None
            else self._object_ids.setdefault(tuple(objects), len(self._object_ids))
        )
        self.text.append(text)
        self.tenant.append(tenant)
        self.rows_returned.append(rows_returned)
        self.rows_affected.append(rows_affected)
        self.bytes_sent.append(bytes_sent)
        self.duration.append(duration)
        self.success.append(success)
        self.extra.append(extra)

    def to_frame(self) -> pl.DataFrame:
        """The events as a canonical frame (unsorted) plus an internal ``session_key`` column;
        ``session_id`` is left null for :func:`assign_session_ids`."""
        keys = pl.Series("session_key", self.session, dtype=pl.Int64)
        seq = pl.Series("statement_id", self.seq, dtype=pl.Int64).cast(pl.String)
        n = len(self)
        frame = pl.DataFrame(
            {
                "event_time": pl.Series(self.time_us, dtype=pl.Int64).cast(
                    EVENT_SCHEMA["event_time"]
                ),
                "db_user": pl.Series(self.session_user, dtype=pl.String).gather(keys),
                "action": pl.Series(self.action, dtype=pl.String),
                "source_format": pl.repeat(SOURCE_FORMAT, n, eager=True, dtype=pl.String),
                "db_system": pl.repeat(DB_SYSTEM, n, eager=True, dtype=pl.String),
                "tenant_id": pl.Series(self.tenant, dtype=pl.String),
                "db_instance": pl.repeat(DB_INSTANCE, n, eager=True, dtype=pl.String),
                "db_name": pl.repeat(DB_NAME, n, eager=True, dtype=pl.String),
                "client_ip": pl.Series(self.session_ip, dtype=pl.String).gather(keys),
                "client_app": pl.Series(self.session_app, dtype=pl.String).gather(keys),
                "session_id": pl.Series([None] * n, dtype=pl.String),
                "statement_id": seq,
                "command": pl.Series(self.command, dtype=pl.String),
                "objects": pl.Series(
                    [list(k) for k in self._object_ids], dtype=EVENT_SCHEMA["objects"]
                ).gather(pl.Series(self.objects, dtype=pl.UInt32)),
                "statement_text": pl.Series(self.text, dtype=pl.String),
                "rows_returned": pl.Series(self.rows_returned, dtype=pl.Int64),
                "rows_affected": pl.Series(self.rows_affected, dtype=pl.Int64),
                "bytes_scanned": pl.Series([None] * n, dtype=pl.Int64),
                "bytes_sent": pl.Series(self.bytes_sent, dtype=pl.Int64),
                "duration_ms": pl.Series(self.duration, dtype=pl.Float64),
                "success": pl.Series(self.success, dtype=pl.Boolean),
                "extra": pl.Series(self.extra, dtype=EVENT_SCHEMA["extra"]),
            },
        )
        return frame.select(COLUMNS).with_columns(keys)


class Session:
    """An open database session with its own clock (``now``, microseconds)."""

    __slots__ = ("key", "log", "may_fail", "now", "rng", "seq")

    def __init__(
        self, log: EventLog, key: int, t_us: int, rng: random.Random, *, may_fail: bool = True
    ) -> None:
        self.log = log
        self.key = key
        self.now = t_us
        self.rng = rng
        self.seq = 0
        self.may_fail = may_fail

    def advance(self, seconds: float) -> int:
        """Move the clock on by ``seconds`` of think time; returns the new time."""
        self.now += int(seconds * US_PER_S)
        return self.now

    def run(self, q: Query, gap_s: float = 0.0, duration: float | None = None) -> float:
        """Run ``q`` ``gap_s`` seconds after the previous statement finished. The clock ends at
        the statement's completion. Returns the duration in milliseconds."""
        rng = self.rng
        t = self.advance(gap_s)
        self.seq += 1
        if self.may_fail and rng.random() < FAILURE_RATE:
            return self._fail(q, t)
        if duration is None:
            duration = duration_ms(rng, q.rows, q.scanned)
        returned = affected = sent = None
        if q.action in ("read", "copy"):
            returned = q.rows
            sent = int(q.rows * q.width * rng.uniform(0.88, 1.12)) + 64
        elif q.action == "write":
            affected = q.rows
            sent = 16 + rng.randrange(8)
        else:
            sent = 12 + rng.randrange(8)
        self.log.append(
            self.key,
            t,
            self.seq,
            q.action,
            q.command,
            q.objects,
            q.text,
            q.tenant,
            returned,
            affected,
            sent,
            duration,
            True,
            None,
        )
        self.now = t + int(duration * 1000)
        return duration

    def _fail(self, q: Query, t: int) -> float:
        """Log ``q`` as failed: no row counts or bytes, SQLSTATE and message in ``extra``."""
        sqlstate, message, spent = _FAILURES.get(q.command, _DEFAULT_FAILURE)
        extra = [{"key": "sqlstate", "value": sqlstate}, {"key": "error", "value": message}]
        self.log.append(
            self.key,
            t,
            self.seq,
            q.action,
            q.command,
            q.objects,
            q.text,
            q.tenant,
            None,
            None,
            None,
            spent,
            False,
            extra,
        )
        self.now = t + int(spent * 1000)
        return spent


def assign_session_ids(frame: pl.DataFrame, rng: np.random.Generator) -> pl.DataFrame:
    """Fill ``session_id`` of a time-sorted frame from its ``session_key`` column.

    Backend pids grow (with small random steps) in order of session start, the way a busy
    server hands them out; ``(start second, pid)`` is unique, so the ids are too.
    """
    firsts = frame.select("session_key", "event_time").unique(
        "session_key", keep="first", maintain_order=True
    )
    keys = firsts["session_key"].to_numpy()
    seconds = (firsts["event_time"].dt.epoch("us") // US_PER_S).to_list()
    pids = (4000 + np.cumsum(rng.integers(1, 40, len(keys)))) % 4_190_000 + 300
    ids: list[str | None] = [None] * (int(keys.max()) + 1 if len(keys) else 0)
    for key, second, pid in zip(keys.tolist(), seconds, pids.tolist(), strict=True):
        ids[key] = f"{second:x}.{pid:x}"
    mapped = pl.Series("session_id", ids, dtype=pl.String).gather(frame["session_key"])
    return frame.with_columns(mapped)

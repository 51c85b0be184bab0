"""Labels resolved from the server's own jsonlog after the run.

The driver only knows which forwarded connection (source address, outgoing port) carried which
tag. The log's ``connection received: host=H port=P`` lines name each connection's session id;
pairing the driver's connections and the log's lines per (H, P) in order resolves every tagged
connection. Sessions, addresses, apps, start and end then come from the log records of those
sessions, events and tables from the project's jsonlog adapter. A tagged connection missing
from the log is an error, never a silent gap.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import polars as pl

from detector.adapters import make_adapter
from detector.lab.forward import ConnRecord

RECEIVED = re.compile(r"connection received: host=(\S+) port=(\d+)")
HEAVY_GAP_S = 15 * 60.0


def log_time(text: str) -> datetime:
    """A jsonlog ``timestamp`` ("2026-03-30 00:01:00.123 UTC") as an aware datetime."""
    stamp, _, zone = text.rpartition(" ")
    if zone not in ("UTC", "GMT"):
        raise ValueError(f"log timestamp not in UTC: {text!r} (log_timezone must be UTC)")
    return datetime.fromisoformat(stamp).replace(tzinfo=UTC)


def iso(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass
class Session:
    """What the log says about one PG session (one connection)."""

    session_id: str
    first: datetime
    last: datetime
    user: str | None = None
    host: str | None = None
    apps: set[str] = field(default_factory=set)
    times: list[datetime] = field(default_factory=list)


@dataclass
class LogIndex:
    """The jsonlog read once: sessions, and connection lines by (host, port) in order."""

    sessions: dict[str, Session]
    received: dict[tuple[str, int], list[tuple[str, datetime]]]
    records: int
    first: datetime | None
    last: datetime | None


def index_jsonlog(path: Path) -> LogIndex:
    sessions: dict[str, Session] = {}
    received: dict[tuple[str, int], list[tuple[str, datetime]]] = defaultdict(list)
    records = 0
    first: datetime | None = None
    last: datetime | None = None
    with path.open("rb") as handle:
        for line in handle:
            if not line.strip():
                continue
            rec: dict[str, Any] = orjson.loads(line)
            records += 1
            when = log_time(rec["timestamp"])
            first = when if first is None or when < first else first
            last = when if last is None or when > last else last
            sid = rec.get("session_id")
            if not sid:
                continue
            s = sessions.get(sid)
            if s is None:
                s = sessions[sid] = Session(sid, when, when)
            s.first, s.last = min(s.first, when), max(s.last, when)
            s.times.append(when)
            if rec.get("user"):
                s.user = rec["user"]
            if rec.get("remote_host"):
                s.host = rec["remote_host"]
            if rec.get("application_name"):
                s.apps.add(rec["application_name"])
            m = RECEIVED.match(rec.get("message", ""))
            if m:
                received[(m.group(1), int(m.group(2)))].append((sid, when))
    return LogIndex(sessions, dict(received), records, first, last)


def resolve(
    records: Iterable[ConnRecord], index: LogIndex, worst: dict[str, str] | None = None
) -> tuple[dict[str, list[str]], float]:
    """Session ids of every tag, and the largest gap between a connection's simulated time
    and its ``connection received`` timestamp in the log (that connection described in
    ``worst``). Raises when a connection the driver made is not in the log."""
    worst = {} if worst is None else worst
    by_key: dict[tuple[str, int], list[ConnRecord]] = defaultdict(list)
    for rec in records:
        by_key[(rec.address, rec.port)].append(rec)
    tags: dict[str, list[str]] = defaultdict(list)
    drift = 0.0
    for key, recs in by_key.items():
        lines = index.received.get(key, [])
        if len(lines) < len(recs):
            raise RuntimeError(
                f"{len(recs)} connections from {key[0]} port {key[1]} but {len(lines)}"
                " 'connection received' lines in the log"
            )
        for rec, (sid, when) in zip(recs, lines, strict=False):
            gap = abs(when.timestamp() - rec.sim_time)
            if gap > drift:
                drift = gap
                worst.clear()
                worst.update(address=rec.address, tag=rec.tag, session=sid, log=iso(when),
                             simulated=iso(datetime.fromtimestamp(rec.sim_time, UTC)))
            if rec.tag:
                tags[rec.tag].append(sid)
    return dict(tags), drift


@dataclass
class EventIndex:
    """Per session: canonical event count and tables; per principal: event counts."""

    events: dict[str, int]
    tables: dict[str, set[str]]
    by_user: dict[str, int]
    rejects: int
    total: int


def index_events(path: Path) -> EventIndex:
    parser = make_adapter("pgaudit-jsonlog", location=path.name)
    frames: list[pl.DataFrame] = []
    rejects = 0
    rest = b""
    with path.open("rb") as handle:
        while True:
            chunk = handle.read(1 << 24)
            data = rest + chunk
            parsed = parser.feed(data, final=not chunk)
            rest = data[parsed.consumed :]
            rejects += parsed.rejects.height
            frames.append(parsed.events.select("session_id", "db_user", "objects"))
            if not chunk:
                break
    events = pl.concat(frames)
    counts = {
        r["session_id"]: r["len"]
        for r in events.group_by("session_id").len().iter_rows(named=True)
    }
    tables: dict[str, set[str]] = defaultdict(set)
    pairs = events.select("session_id", "objects").explode("objects").drop_nulls().unique()
    for r in pairs.iter_rows(named=True):
        tables[r["session_id"]].add(r["objects"])
    by_user = {
        r["db_user"]: r["len"]
        for r in events.group_by("db_user").len().sort("db_user").iter_rows(named=True)
    }
    return EventIndex(counts, dict(tables), by_user, rejects, events.height)


def windows(sessions: list[Session]) -> list[list[str]]:
    """The stretches of activity of some sessions: records closer than HEAVY_GAP_S merge."""
    times = sorted(t for s in sessions for t in s.times)
    out: list[list[datetime]] = []
    for t in times:
        if out and (t - out[-1][1]).total_seconds() <= HEAVY_GAP_S:
            out[-1][1] = t
        else:
            out.append([t, t])
    return [[iso(a), iso(b)] for a, b in out]


def scenario_label(
    attack: Any, sids: list[str], index: LogIndex, events: EventIndex
) -> dict[str, Any]:
    sessions = [index.sessions[s] for s in sids]
    tables: set[str] = set()
    for s in sids:
        tables |= events.tables.get(s, set())
    principals = sorted({s.user for s in sessions if s.user} | set(attack.principals))
    return {
        "scenario": attack.scenario,
        "variant": attack.variant,
        "principal": attack.principal,
        "principals": principals,
        "sessions": sids,
        "addresses": sorted({s.host for s in sessions if s.host}),
        "client_apps": sorted({a for s in sessions for a in s.apps}),
        "start": iso(min(s.first for s in sessions)),
        "end": iso(max(s.last for s in sessions)),
        "tables": sorted(tables),
        "events": sum(events.events.get(s, 0) for s in sids),
        "description": attack.description,
    }


_STDERR_TIME = re.compile(rb"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(?:\.\d+)?) (UTC|GMT)\b")


def outside_span(files: dict[str, Path], low: float, high: float) -> dict[str, int]:
    """Per log (``jsonlog``, ``csvlog``, ``stderr``): how many records carry a timestamp
    outside ``low``..``high`` (epoch seconds), i.e. not the simulated clock."""
    import csv

    def bad(text: str) -> bool:
        return not low <= log_time(text).timestamp() <= high

    out: dict[str, int] = {}
    for kind, path in files.items():
        if not path.exists():
            continue
        n = 0
        if kind == "jsonlog":
            with path.open("rb") as handle:
                n = sum(bad(orjson.loads(line)["timestamp"]) for line in handle if line.strip())
        elif kind == "csvlog":
            with path.open(newline="") as text:
                n = sum(bad(row[0]) for row in csv.reader(text) if row)
        else:
            with path.open("rb") as handle:
                for line in handle:
                    m = _STDERR_TIME.match(line)
                    if m is not None:
                        n += bad(f"{m.group(1).decode()} {m.group(2).decode()}")
        out[kind] = n
    return out

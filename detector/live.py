"""The live pipeline: sources -> micro-batches -> features and model -> incidents and alerts.

Like :mod:`detector.pipeline` for batch work, this is the one place that knows the order of
the live stages. Two threads do the work: a reader scans the sources and puts :class:`Read`
units on a queue bounded in events; the scorer takes them, forms a micro-batch (flushed at
``batch_events`` events or when its oldest read has waited ``batch_delay_s``), scores it with
the same :class:`~detector.pipeline.Scorer` as ``exfilwatch score`` and commits, in ONE store
transaction, the incident updates, the alerts they raise (to the outbox), the new source
positions and the batch's entry in the read log.

Restart is exact: feature state is snapshotted every ``snapshot_every_s`` (files first, then
the row naming them); on start the latest snapshot is loaded and the reads logged after it are
read again and fed to the features only, which rebuilds the state the last commit had, because
the feature engine gives the same rows however a stream is cut into batches. Processing then
continues from the committed positions, so a kill -9 at any point neither loses an event nor
counts one twice, and alert ids are derived, so no alert is raised twice.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

import polars as pl
import structlog

from detector import formats, schema
from detector.config import JetStreamSource as JetStreamSettings
from detector.config import Settings
from detector.errors import ModelError
from detector.features.engine import StateCopy
from detector.features.settings import StateBounds
from detector.incidents import grouping, merge
from detector.pipeline import Scorer, warmup_until
from detector.quarantine import Quarantine
from detector.schema import SEVERITY_RANK
from detector.scoring import artefact as store_models
from detector.sinks import delivery, tables
from detector.sinks.metrics import Metrics
from detector.sinks.store import Route, Snapshot, Store, Tx
from detector.sources.directory import DirectorySource, Read
from detector.sources.jetstream import JetStreamSource
from detector.sources.journal import HttpIngest, Journal

log = structlog.get_logger("exfilwatch.live")

_SERVICE = "_service"  # the positions row holding the service's own settings
_RESOLVE_EVERY_S = 5.0
#: Incidents resolved per transaction (memory stays bounded after an incident storm).
_RESOLVE_CHUNK = 1_000
_MODEL_CHECK_S = 2.0


class Busy(Exception):
    """The ingest backlog is full; try again after ``retry_after`` seconds."""

    def __init__(self, retry_after: float) -> None:
        super().__init__(f"ingest backlog full; retry after {retry_after:.0f} s")
        self.retry_after = retry_after


class ReadQueue:
    """Reads waiting to be scored, bounded by the number of events they hold."""

    def __init__(self, capacity: int, metrics: Metrics) -> None:
        self.capacity = capacity
        self._items: deque[tuple[float, Read]] = deque()
        self._events = 0
        self._cond = threading.Condition()
        self._metrics = metrics
        self.holding = 0  # events taken and not yet committed

    def put(self, read: Read, stop: threading.Event) -> bool:
        with self._cond:
            while self._events and self._events + read.events.height > self.capacity:
                if stop.is_set():
                    return False
                self._cond.wait(0.1)
            self._items.append((time.monotonic(), read))
            self._events += read.events.height
            self._metrics.queue_depth.labels("scoring").set(self._events)
            self._cond.notify_all()
            return True

    def take(
        self, max_events: int, max_delay: float, stop: threading.Event, idle: float = 1.0
    ) -> list[Read]:
        """Reads forming the next micro-batch; empty when nothing came for ``idle`` seconds
        or when stopping with nothing queued."""
        give_up = time.monotonic() + idle
        with self._cond:
            while not self._items:
                if stop.is_set() or time.monotonic() >= give_up:
                    return []
                self._cond.wait(0.1)
            oldest = self._items[0][0]
            while self._events < max_events and not stop.is_set():
                left = oldest + max_delay - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(min(left, 0.1))  # wake up to notice a stop
            out: list[Read] = []
            size = 0
            while self._items and (not out or size + self._items[0][1].events.height <= max_events):
                _, read = self._items.popleft()
                out.append(read)
                size += read.events.height
            self._events -= size
            self.holding = size
            self._metrics.queue_depth.labels("scoring").set(self._events)
            self._cond.notify_all()
            return out

    def clear(self) -> None:
        with self._cond:
            self._items.clear()
            self._events = 0
            self._cond.notify_all()

    @property
    def events(self) -> int:
        return self._events


class Source(Protocol):
    """What the service needs of a source (a directory or a JetStream stream)."""

    name: str

    def scan(self) -> Iterator[Read]: ...

    def positions(self) -> dict[str, dict[str, Any]]: ...

    def replay(self, entry: dict[str, Any]) -> Iterator[pl.DataFrame]: ...

    def forget(self, keys: set[str]) -> None: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class _SnapshotJob:
    """A snapshot taken and not yet written: the batch it follows, the feature state's copy,
    the model, the committed source positions, the events seen, and when it was taken."""

    seq: int
    state: StateCopy
    model: str
    positions: dict[str, dict[str, dict[str, Any]]]
    events_seen: int
    started: float


@dataclass
class Health:
    model_loaded: bool = False
    store_ok: bool = False
    sources_running: bool = False
    stopping: bool = False
    problems: list[str] = field(default_factory=list)


class Service:
    """One running exfilwatch: construct, :meth:`start`, feed, :meth:`stop`."""

    def __init__(
        self,
        settings: Settings,
        *,
        metrics: Metrics | None = None,
        stdin_format: str | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.clock = clock
        self.stdin_format = stdin_format
        self.health = Health()
        self.state_dir = settings.state_dir
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._workers: list[Any] = []
        self._sources: dict[str, Source] = {}
        self._formats: dict[str, str] = {}
        self._journal_backlog = 0
        self._backlog_lock = threading.Lock()
        self._idle_passes = 0
        #: background writes (snapshot, prune): one thread each at a time
        self._chores: dict[str, threading.Thread] = {}
        #: one snapshot written at a time; the batch the last recorded one follows
        self._snapshot_lock = threading.Lock()
        self._snapshot_seq: int | None = None
        #: the newest event time scored (drives resolution of incidents by event time)
        self.watermark: datetime | None = None

    # ================================================================== start
    def start(self) -> None:
        s = self.settings
        for sub in ("journal/http", "journal/stdin", "snapshots", "quarantine", "tmp"):
            (self.state_dir / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(self.state_dir, 0o700)
        self.quarantine = Quarantine(self.state_dir / "quarantine" / "rejected.jsonl")
        engine = tables.create_engine(s.store_url)
        routes = [
            Route(k.name, tuple(k.kinds), SEVERITY_RANK[k.min_severity])
            for k in s.sinks
            if k.kind != "alertmanager"
        ]
        self.store = Store(engine, routes, clock=self.clock)
        self.store.ping()
        self.health.store_ok = True
        self._load_model()
        self._make_sources()
        self._restore()
        self._start_delivery()
        self.queue = ReadQueue(s.pipeline.queue_events, self.metrics)
        for name in ("scoring", "http_journal"):
            self.metrics.queue_capacity.labels(name).set(s.pipeline.queue_events)
        self._spawn("reader", self._read_loop)
        self._spawn("scorer", self._score_loop)
        self.health.sources_running = True
        log.info(
            "service_started",
            model=self.scorer.artefact.ref,
            store=engine.dialect.name,
            sources=sorted(self._sources),
            batch=self.seq,
        )

    def _spawn(self, name: str, target: Callable[[], None]) -> None:
        thread = threading.Thread(target=self._guard(name, target), name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def _guard(self, name: str, target: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                target()
            except Exception as exc:  # a dead stage must show in /readyz, not vanish
                log.exception("stage_failed", stage=name, error=str(exc))
                self.health.problems.append(f"{name} stopped: {exc}")
                self.health.sources_running = False

        return run

    # ------------------------------------------------------------------ model
    def _model_dir(self) -> Path:
        return self.settings.models_dir / self.settings.model

    def _load_model(self) -> None:
        self._model_keys = self.settings.model_signing_keys()
        try:
            art = store_models.load(self._model_dir(), keys=self._model_keys)
        except store_models.Refused as exc:
            self._model_refused(exc)
            raise
        # _restore picks the state to start from
        self.scorer = Scorer(art, continue_state=False, bounds=self._state_bounds())
        self._model_version = art.path.name
        self._model_checked = time.monotonic()
        self._publish_model()
        self.health.model_loaded = True

    def _publish_model(self) -> None:
        art = self.scorer.artefact
        self.metrics.model_info.clear()
        self.metrics.model_info.labels(
            self.settings.model, art.path.name, art.metadata["feature_spec_hash"][:12]
        ).set(1)
        created = art.metadata.get("created_at")
        if created:
            self.metrics.model_trained.set(datetime.fromisoformat(created).timestamp())

    def _maybe_reload_model(self) -> None:
        if time.monotonic() - self._model_checked < _MODEL_CHECK_S:
            return
        self._model_checked = time.monotonic()
        try:
            version = store_models.resolve(self._model_dir()).name
        except ModelError as exc:
            log.warning("model_alias_unreadable", error=str(exc))
            return
        if version == self._model_version:
            return
        self.metrics.model_promotions.inc()
        log.info(
            "model_promoted",
            model=self.settings.model,
            version=version,
            previous=self._model_version,
            checksum=store_models.checksum(self._model_dir() / version),
        )
        try:
            art = store_models.load(self._model_dir() / version, keys=self._model_keys)
            fresh = Scorer(art, continue_state=False, bounds=self._state_bounds())
            if fresh.engine.spec_hash == self.scorer.engine.spec_hash:
                fresh.engine = self.scorer.engine  # same features: keep what was learnt live
            else:
                fresh.engine.load_state(art.path)
                log.warning("model_feature_spec_changed", version=version)
        except (ModelError, ValueError) as exc:  # ValueError: settings the engine refuses
            if isinstance(exc, store_models.Refused):
                self._model_refused(exc)
            self.metrics.model_reloads.labels("failed").inc()
            log.error("model_reload_failed", version=version, error=str(exc))
            self._model_version = version  # do not retry a broken version every pass
            return
        self.scorer, self._model_version = fresh, version
        self._publish_model()
        self.metrics.model_reloads.labels("success").inc()
        log.info("model_reloaded", model=art.ref, checksum=art.checksum)

    def _model_refused(self, exc: store_models.Refused) -> None:
        """Count and log a refused version: which one, why, and the checksum of its files."""
        self.metrics.model_loads_refused.labels(exc.reason).inc()
        log.error(
            "model_load_refused",
            model=self.settings.model,
            version=exc.version_dir.name,
            reason=exc.reason,
            checksum=exc.checksum,
            error=str(exc),
        )

    # ------------------------------------------------------------------ sources
    def _make_sources(self) -> None:
        saved: dict[str, dict[str, dict[str, Any]]] = {}
        for (source, key), pos in self.store.positions().items():
            saved.setdefault(source, {})[key] = pos
        self._service_pos = saved.get(_SERVICE, {})
        read = self.settings.pipeline.read_events

        def feeder(fmt: str, tz: str | None, options: dict[str, str]) -> Callable[[str, int], Any]:
            make_feeder = formats.factory(fmt)
            return lambda where, line: make_feeder(where, line, tz, options)

        def make(
            name: str, path: Path, fmt: str, pattern: str, tz: str | None, options: dict[str, str]
        ) -> None:
            self._formats[name] = fmt
            self._sources[name] = DirectorySource(
                name,
                path,
                pattern=pattern,
                default_tz=tz,
                read_events=read,
                make_feeder=feeder(fmt, tz, options),
                positions=saved.get(name),
                quarantine=self.quarantine,
                on_reject=self._rejected(name),
            )
            self.metrics.source_up.labels(name).set(1)

        for src in self.settings.sources:
            if isinstance(src, JetStreamSettings):
                self._formats[src.name] = src.format
                self._sources[src.name] = JetStreamSource(
                    src.name,
                    url=src.url,
                    stream=src.stream,
                    subject=src.subject,
                    start=src.start,
                    make_feeder=feeder(src.format, src.default_tz, src.options),
                    fetch_messages=src.fetch_messages,
                    fetch_wait_s=max(0.05, self.settings.pipeline.poll_s),
                    credentials_file=src.credentials_file,
                    positions=saved.get(src.name),
                    quarantine=self.quarantine,
                    on_reject=self._rejected(src.name),
                    on_status=self.metrics.source_up.labels(src.name).set,
                )
                continue
            src.path.mkdir(parents=True, exist_ok=True)
            make(src.name, src.path, src.format, src.pattern, src.default_tz, src.options)
        make("http", self.state_dir / "journal/http", "canonical", "*", None, {})
        self.http = HttpIngest(
            Journal(self.state_dir / "journal/http", ".parquet"),
            self.quarantine,
            self.state_dir / "tmp",
            on_reject=self._rejected("http"),
        )
        if self.stdin_format is not None:
            make("stdin", self.state_dir / "journal/stdin", self.stdin_format, "*", None, {})
            self.stdin_journal = Journal(self.state_dir / "journal/stdin", ".log")

    def _rejected(self, source: str) -> Callable[[pl.DataFrame], None]:
        def count(rejects: pl.DataFrame) -> None:
            for reason, n in rejects.group_by("reason").len().iter_rows():
                self.metrics.events_rejected.labels(source, reason).inc(n)

        return count

    # ------------------------------------------------------------------ restore
    def _restore(self) -> None:
        """Load the latest snapshot and replay the read log after it (features only)."""
        self.seq = self.store.last_batch()
        warm = self._service_pos.get("warmup", {}).get("until")
        self.warm_until = datetime.fromisoformat(warm) if warm else None
        self._decided_warmup = "warmup" in self._service_pos
        snap = self.store.latest_snapshot()
        after, loaded = 0, False
        if snap is not None:
            try:
                self.scorer.engine.load_state(Path(snap.path))
                after, loaded = snap.seq, True
                self._snapshot_seq = snap.seq
            except ModelError as exc:
                log.warning("snapshot_unusable", path=snap.path, error=str(exc))
        fresh = snap is None and self._decided_warmup and self.warm_until is not None
        if not loaded and not fresh:  # no usable snapshot: continue the model's own state
            self.scorer.engine.load_state(self.scorer.artefact.path)
        replayed, missing = 0, 0
        entries = (entry for _seq, reads in self.store.reads_after(after) for entry in reads)
        for entry in _joined_whole_file_reads(entries):
            source = self._sources.get(entry["source"])
            try:
                if source is None:
                    raise FileNotFoundError(entry["source"])
                for frame in source.replay(entry):
                    if frame.height:
                        self.scorer.engine.update(frame)
                        replayed += frame.height
            except OSError:
                missing += 1
        if missing:
            log.warning("replay_incomplete", reads_missing=missing)
        log.info("state_restored", snapshot=snap.seq if snap else None, replayed_events=replayed)
        self._last_snapshot = time.monotonic()
        self._last_resolve = 0.0
        self._last_prune = -math.inf  # pruning is due at the first pass

    # ------------------------------------------------------------------ reading
    def _read_loop(self) -> None:
        poll = self.settings.pipeline.poll_s
        while not self._stop.is_set():
            got = False
            for source in list(self._sources.values()):
                for read in source.scan():
                    if read.events.height:
                        got = True
                        if source.name != "http":  # counted when the request was accepted
                            self.metrics.events_ingested.labels(
                                source.name, self._formats[source.name]
                            ).inc(read.events.height)
                    if not self.queue.put(read, self._stop):
                        return
                    if self._stop.is_set():
                        return
            self._idle_passes = 0 if got else self._idle_passes + 1
            if not got:
                self._stop.wait(poll)

    # ------------------------------------------------------------------ scoring
    def _score_loop(self) -> None:
        p = self.settings.pipeline
        while True:
            reads = self.queue.take(p.batch_events, p.batch_delay_s, self._stop)
            if not reads:
                if self._stop.is_set():
                    return
                self._housekeeping()
                continue
            try:
                self.process(reads)
                self._housekeeping()
            finally:
                self.queue.holding = 0

    def process(self, reads: list[Read]) -> None:
        """Score one micro-batch and commit everything it changes."""
        started = time.perf_counter()
        frames = [r.events for r in reads if r.events.height]
        events = pl.concat(frames) if frames else schema.empty_events()
        anomalies = schema.empty_events()
        if events.height:
            self._decide_warmup(events)
            anomalies = self.scorer.anomalies(events, self.warm_until)
            self.metrics.anomalies.inc(anomalies.height)
            last = events["event_time"].max()
            if isinstance(last, datetime):
                self.watermark = last if self.watermark is None else max(self.watermark, last)
        positions = {(r.source, r.key): r.end for r in reads}
        logged = [r.log_entry() for r in reads if r.events.height]
        self.seq += 1
        opened: list[dict[str, Any]] = []
        with self.store.transaction() as tx:
            opened = self._apply(tx, anomalies)
            tx.set_positions(positions)
            if logged:
                tx.add_batch(self.seq, logged, events.height)
        self._after_commit(reads, events, opened, started)

    def _decide_warmup(self, events: pl.DataFrame) -> None:
        """Once, on the first events ever: logs older than the model's training window (a
        replay of history) start from empty state and raise nothing for their first day."""
        if self._decided_warmup:
            return
        first = events["event_time"].min()
        warm = warmup_until(self.scorer.artefact, first if isinstance(first, datetime) else None)
        if warm is not None:
            self.scorer = Scorer(
                self.scorer.artefact, continue_state=False, bounds=self._state_bounds()
            )
            self.warm_until = warm
            log.info("history_replay_warmup", until=warm.isoformat())
        until = self.warm_until.isoformat() if self.warm_until else None
        self._service_pos = {"warmup": {"until": until}}
        with self.store.transaction() as tx:
            tx.set_positions({(_SERVICE, "warmup"): {"until": until}})
        self._decided_warmup = True

    def _apply(self, tx: Tx, anomalies: pl.DataFrame) -> list[dict[str, Any]]:
        """Fold a batch's anomalous events into the store's incidents and queue the alerts
        they raise; returns the incidents opened, as announced."""
        folded = fold_anomalies(tx, self.scorer, anomalies)
        if folded.suppressed:
            self.metrics.alerts_suppressed.inc(folded.suppressed)
        return [doc for kind, doc, _ in folded.alerts if kind == "incident.opened"]

    def _after_commit(
        self, reads: list[Read], events: pl.DataFrame, opened: list[dict[str, Any]], started: float
    ) -> None:
        m = self.metrics
        m.batches.inc()
        m.batch_events.observe(events.height)
        m.events_scored.inc(events.height)
        m.events_time_held.set(self.scorer.engine.events_time_held_)
        m.statements_cut.inc(self.scorer.engine.batch_statements_cut_)
        m.batch_duration.observe(time.perf_counter() - started)
        now = self.clock()
        for doc in opened:
            m.incidents_opened.labels(doc["severity"]).inc()
            log.info(
                "incident_opened",
                incident=doc["id"],
                severity=doc["severity"],
                principal=doc["principal"],
                rows_read=doc["rows_read"],
            )
        if events.height:
            oldest = events["event_time"].min()
            if isinstance(oldest, datetime):
                m.lag.observe(max(0.0, (now - oldest).total_seconds()))
            per_source: dict[str, float] = {}
            for r in reads:
                if r.events.height:
                    newest = r.events["event_time"].max()
                    if isinstance(newest, datetime):
                        ts = newest.timestamp()
                        per_source[r.source] = max(per_source.get(r.source, ts), ts)
            for name, ts in per_source.items():
                m.last_event.labels(name).set(ts)
        journal = sum(r.events.height for r in reads if r.source == "http")
        if journal:
            with self._backlog_lock:
                self._journal_backlog = max(0, self._journal_backlog - journal)
                self.metrics.queue_depth.labels("http_journal").set(self._journal_backlog)
        if opened:
            self._wake_delivery()

    def _housekeeping(self) -> None:
        now = time.monotonic()
        if now - self._last_resolve >= _RESOLVE_EVERY_S:
            self._last_resolve = now
            self.resolve_idle()
        if now - self._last_snapshot >= self.settings.pipeline.snapshot_every_s:
            self._snapshot_in_background()
        if now - self._last_prune >= self.settings.retention.every_s:
            self._prune_in_background()
        self._maybe_reload_model()

    def resolve_idle(self) -> int:
        """Resolve incidents quiet for ``resolve_after_s`` (event time or wall time)."""
        quiet = timedelta(seconds=self.settings.incidents.resolve_after_s)
        watermark = self.watermark
        resolved = 0
        while True:
            with self.store.transaction() as tx:
                docs = tx.resolve_idle(
                    watermark - quiet if watermark else None,
                    tx.now - quiet,
                    "quiet for the resolve period",
                    _RESOLVE_CHUNK,
                )
                tx.add_alerts([("incident.resolved", doc, "") for doc in docs])
            resolved += len(docs)
            if len(docs) < _RESOLVE_CHUNK:
                break
        if resolved:
            self._wake_delivery()
        self._count_open()
        return resolved

    def _resolve(self, tx: Any, incident_id: str, comment: str | None, by: str | None) -> None:
        tx.add_alert("incident.resolved", tx.set_status(incident_id, "resolved", comment, by))

    def _count_open(self) -> None:
        counts = self.store.counts()
        self.metrics.incidents_open.set(counts.get("open", 0) + counts.get("acknowledged", 0))

    # ------------------------------------------------------------------ snapshots
    def _state_bounds(self) -> StateBounds:
        """The feature state's bounds (``features`` settings)."""
        return StateBounds(**self.settings.features.model_dump())

    def snapshot(self) -> None:
        """Take a snapshot and wait until it is recorded (after any still being written)."""
        self._chores_done()
        self._write_snapshot(self._take_snapshot())

    def _snapshot_in_background(self) -> None:
        """Copy the feature state and leave writing it to a thread of its own, so scoring goes
        on while it is compressed, written and recorded; while the last snapshot is still
        being written, the next housekeeping pass tries again."""
        if self.seq == self._snapshot_seq:  # no batch since the last one: nothing to add
            self._last_snapshot = time.monotonic()
        elif not self._chore_running("snapshot"):
            job = self._take_snapshot()
            self._chore("snapshot", lambda: self._write_snapshot(job))

    def prune(self) -> tuple[int, int]:
        """Delete the delivered alerts and closed incidents past their retention now
        (``retention`` settings; 0 keeps them), a chunk per transaction; returns the outbox
        rows and incidents deleted."""
        keep = self.settings.retention
        now = self.clock()

        def before(days: float) -> datetime | None:
            return now - timedelta(days=days) if days > 0 else None

        alerts, incidents = self.store.prune(
            delivered_before=before(keep.delivered_alerts_days),
            closed_before=before(keep.closed_incidents_days),
        )
        if alerts or incidents:
            log.info("store_pruned", alerts=alerts, incidents=incidents)
        return alerts, incidents

    def _prune_in_background(self) -> None:
        self._last_prune = time.monotonic()
        self._chore("prune", self.prune)

    def _chore(self, name: str, work: Callable[[], object]) -> None:
        """Run ``work`` in a thread named ``name`` unless the last one is still at it. A
        failure is logged and shown in /readyz's problems; the next pass tries again."""
        if self._chore_running(name):
            return

        def run() -> None:
            try:
                work()
            except Exception as exc:  # a snapshot's failure leaves the previous one in force
                log.exception(f"{name}_failed", error=str(exc))
                self.health.problems.append(f"{name} failed: {exc}")

        thread = threading.Thread(target=run, name=name, daemon=True)
        self._chores[name] = thread
        thread.start()

    def _chore_running(self, name: str) -> bool:
        thread = self._chores.get(name)
        return thread is not None and thread.is_alive()

    def _chores_done(self, timeout: float | None = None) -> None:
        """Wait for the background writes (snapshot, pruning) under way, if any."""
        for thread in list(self._chores.values()):
            thread.join(timeout)

    def _take_snapshot(self) -> _SnapshotJob:
        """What a snapshot of the last committed batch holds: a copy of the feature state and
        the committed source positions (the reader's own may be ahead of the commits)."""
        self._last_snapshot = time.monotonic()
        started = time.perf_counter()
        positions: dict[str, dict[str, dict[str, Any]]] = {}
        for (source, key), pos in self.store.positions().items():
            positions.setdefault(source, {})[key] = pos
        return _SnapshotJob(
            self.seq,
            self.scorer.engine.snapshot_state(),
            self.scorer.artefact.ref,
            positions,
            self.scorer.engine.events_seen_,
            started,
        )

    def _write_snapshot(self, job: _SnapshotJob) -> None:
        """Write the state's files and fsync them under a temporary name, rename them into
        place and fsync the directory, then record the snapshot; older snapshots and covered
        journal files go. A crash at any point leaves the previous snapshot and the read log
        after it, which restore the same state. The state after a batch is the same however it
        was reached, so a batch already snapshotted is not written again (its recorded files
        are never replaced)."""
        with self._snapshot_lock:
            if job.seq == self._snapshot_seq:
                return
            root = self.state_dir / "snapshots"
            tmp = Path(tempfile.mkdtemp(prefix=".snap-", dir=root))
            job.state.write(tmp)
            for f in tmp.iterdir():
                with f.open("rb") as fh:
                    os.fsync(fh.fileno())
            final = root / f"{job.seq:012d}"
            if final.exists():  # files of an attempt that was never recorded
                shutil.rmtree(final)
            os.replace(tmp, final)
            dir_fd = os.open(root, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
            snap = Snapshot(job.seq, str(final), job.model, job.positions, job.events_seen)
            for old in self.store.add_snapshot(snap):
                shutil.rmtree(old, ignore_errors=True)
            self._snapshot_seq = job.seq
            self._drop_covered_journal(job.positions)
            self.metrics.snapshots.inc()
            self.metrics.snapshot_duration.observe(time.perf_counter() - job.started)

    def _drop_covered_journal(self, positions: dict[str, dict[str, dict[str, Any]]]) -> None:
        for name in ("http", "stdin"):
            src = self._sources.get(name)
            if src is None:
                continue
            done = {key for key, pos in positions.get(name, {}).items() if _consumed(pos)}
            for key in done:
                with contextlib.suppress(OSError):
                    Path(positions[name][key]["path"]).unlink()
            src.forget(done)
            self.store.forget_positions(name, sorted(done))

    # ------------------------------------------------------------------ delivery
    def _start_delivery(self) -> None:
        self._workers = delivery.start_workers(
            self.settings,
            self.store.engine,
            self.metrics,
            external_url=self.settings.api.external_url,
        )

    def _wake_delivery(self) -> None:
        for worker in self._workers:
            worker.wake()

    # ------------------------------------------------------------------ API hooks
    def ingest(self, body: bytes, kind: str, request_id: str) -> Any:
        """Journal an HTTP body; Busy when the backlog is full."""
        cap = self.settings.pipeline.queue_events
        with self._backlog_lock:
            if self._journal_backlog >= cap:
                self.metrics.http_requests.labels("throttled").inc()
                raise Busy(retry_after=max(1.0, self.settings.pipeline.batch_delay_s * 4))
        result = self.http.ingest(body, kind, request_id)
        with self._backlog_lock:
            self._journal_backlog += result.accepted
            self.metrics.queue_depth.labels("http_journal").set(self._journal_backlog)
        self.metrics.events_ingested.labels("http", kind).inc(result.accepted)
        self.metrics.http_requests.labels("accepted").inc()
        return result

    def set_status(
        self, incident_id: str, status: str, comment: str | None, by: str | None
    ) -> dict[str, Any] | None:
        """Acknowledge, mark false positive or resolve an incident (None if unknown)."""
        doc = self.store.incident(incident_id)
        if doc is None:
            return None
        suppress = self.settings.incidents.suppress_false_positive_s
        with self.store.transaction() as tx:
            if status == "resolved":
                self._resolve(tx, incident_id, comment, by)
            else:
                tx.set_status(incident_id, status, comment, by)
            if status == "false_positive":
                until = tx.now + timedelta(seconds=suppress) if suppress else None
                tx.add_feedback(
                    incident_id,
                    status,
                    merge.pattern(doc),
                    doc.get("tables", []),
                    comment,
                    by,
                    until,
                )
                tx.add_alert("incident.resolved", {**doc, "status": status})
        self._wake_delivery()
        self._count_open()
        return self.store.incident(incident_id)

    def ready(self) -> tuple[bool, dict[str, Any]]:
        try:
            self.store.ping()
            self.health.store_ok = True
        except Exception as exc:  # the store being down is what readiness reports
            self.health.store_ok = False
            self.health.problems.append(f"store: {exc}")
        alive = all(t.is_alive() for t in self._threads)
        checks = {
            "model_loaded": self.health.model_loaded,
            "store_reachable": self.health.store_ok,
            "sources_running": self.health.sources_running and alive and not self._stop.is_set(),
        }
        return all(checks.values()), {**checks, "problems": self.health.problems[-5:]}

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until every source is read to its end and everything read is committed."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._stop.is_set():
            self._idle_passes = 0
            while self._idle_passes < 2 and not self._stop.is_set():
                if deadline is not None and time.monotonic() > deadline:
                    return False
                time.sleep(0.05)
            if self.queue.events == 0 and self.queue.holding == 0 and self._idle_passes >= 2:
                return True
        return False

    def crash_for_tests(self) -> None:
        """Stop the threads with no drain, final commit or snapshot: what a kill leaves."""
        self.health.stopping = True
        self._stop.set()
        self.queue.clear()
        for thread in self._threads:
            thread.join(10)
        self._chores_done(10)
        for worker in self._workers:
            worker.stop(1)
        self._close_sources()
        self.store.engine.dispose()

    def _close_sources(self) -> None:
        for source in self._sources.values():
            with contextlib.suppress(Exception):
                source.close()

    # ================================================================== stop
    def stop(self, timeout: float = 30.0) -> None:
        """Drain: stop reading, score and commit what is queued, snapshot, stop delivery."""
        self.health.stopping = True
        self._stop.set()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.1, deadline - time.monotonic()))
        with contextlib.suppress(Exception):
            self.snapshot()
        self._close_sources()
        for worker in self._workers:
            worker.stop(max(0.1, deadline - time.monotonic()))
        self.quarantine.close()
        self.store.engine.dispose()
        log.info("service_stopped", batch=self.seq)


def fold_anomalies(tx: Tx, scorer: Scorer, anomalies: pl.DataFrame) -> grouping.Grouping:
    """Fold one micro-batch's anomalous events into the stored incidents within ``tx``: load
    the active incidents its events can join (by group key, and the principals' places,
    sprays and lone failed logins), fold the events in arrival order exactly as batch scoring
    groups them, write the incidents opened and changed, and queue the alerts raised."""
    if anomalies.height == 0:
        return scorer.incident_grouping()
    keys = grouping.candidate_keys(anomalies)
    first = anomalies["event_time"].min()
    if not isinstance(first, datetime):
        raise TypeError("anomalies without event times")
    since = first - timedelta(seconds=scorer.gap_s)
    principals = sorted(set(anomalies["db_user"].to_list()))
    stored = {doc["id"]: doc for doc in tx.active_incidents(keys).values()}
    stored |= {doc["id"]: doc for doc in tx.incidents_of(principals, since)}
    folded = scorer.incident_grouping(
        list(stored.values()), grouping.verdicts(tx.suppressions(keys))
    )
    folded.add(anomalies)
    opened, updated = folded.changed()
    tx.save_incidents(opened, new=True)
    tx.save_incidents(updated, new=False)
    tx.add_alerts(folded.alerts)
    return folded


def _joined_whole_file_reads(entries: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """The read log in order, adjacent reads of consecutive frames of one whole file joined
    into one entry (a file is then read once for them all). Only adjacent ones: the features
    must see the events in the order they were scored."""
    held: dict[str, Any] | None = None
    for entry in entries:
        if (
            held is not None
            and "frames" in entry["end"]
            and (held["source"], held["key"]) == (entry["source"], entry["key"])
            and held["end"] == entry["start"]
        ):
            held = {**held, "end": entry["end"]}
            continue
        if held is not None:
            yield held
        held = entry
    if held is not None:
        yield held


def _consumed(pos: dict[str, Any]) -> bool:
    """Whether a journal file has been read to its end: a whole file marked done, or a tailed
    segment whose offset has reached its size."""
    if pos.get("done"):
        return True
    try:
        return "offset" in pos and Path(pos["path"]).stat().st_size == pos["offset"]
    except OSError:
        return False

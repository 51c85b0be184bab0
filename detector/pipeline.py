"""The one place that knows the order of stages.

    read (sources) -> features (FeatureEngine) -> score (Forest) -> incidents -> output

Training is the same pipeline with a different end: it replays history through the same reader
and the same FeatureEngine, then fits, calibrates and writes an artefact.
"""

from __future__ import annotations

import json
import platform
import queue
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from importlib import metadata as importlib_metadata
from itertools import chain
from pathlib import Path
from typing import Any, Final, Protocol, TypeVar

import numpy as np
import orjson
import polars as pl

from detector import __version__
from detector.errors import InputError, ModelError
from detector.features.engine import (
    MODEL_FEATURES,
    PLAUSIBLE,
    FeatureBatch,
    FeatureEngine,
)
from detector.features.settings import FeatureSettings, StateBounds
from detector.incidents import grouping
from detector.quarantine import Quarantine
from detector.schema import MAX_STATEMENT_CHARS
from detector.scoring import artefact as store
from detector.scoring.ensemble import GROUPS, Ensemble, fit_ensemble
from detector.scoring.explain import explain, feature_stats
from detector.scoring.threshold import calibrate_regimes, regime_days, severity
from detector.sources.files import expand_paths, read_events
from detector.sqltext import ANALYSED_CHARS

#: Columns kept from each feature batch while training (features + what grouping needs).
#: Calibration scores every training day with a model fitted without it, in this many folds.
CALIBRATION_FOLDS: Final = 4
_TRAIN_COLUMNS = (
    "event_time",
    "db_user",
    "action",
    "client_ip",
    "client_app",
    "session_id",
    "fingerprint",
    *MODEL_FEATURES,
)


class Progress(Protocol):
    """What the pipeline reports while it works (the CLI draws bars with it)."""

    def start(self, description: str, total: int | None) -> None: ...

    def advance(self, n: int) -> None: ...

    def finish(self) -> None: ...


class _Silent:
    def start(self, description: str, total: int | None) -> None:
        pass

    def advance(self, n: int) -> None:
        pass

    def finish(self) -> None:
        pass


@dataclass(frozen=True)
class Reading:
    """How input files are read: the audit-log format of ``.json``/``.csv``/``.log`` files
    (``auto`` guesses from name and first line), adapter options such as
    ``log_line_prefix``, and the zone of timestamps that carry none."""

    log_format: str = "auto"
    adapter_options: dict[str, Any] = field(default_factory=dict)
    default_tz: str | None = None


@dataclass(frozen=True)
class TrainOptions:
    n_trees: int = 100
    max_samples: int = 256
    seed: int = 0
    warmup_hours: float = 24.0
    false_alerts_per_day: float = 1.0
    gap_s: float = grouping.DEFAULT_GAP_S
    batch_rows: int = 100_000
    exclude_labels: Path | None = None
    until: datetime | None = None  # train on events before this time only
    promote: bool = False
    settings: FeatureSettings = field(default_factory=lambda: FeatureSettings())
    max_statement_chars: int = ANALYSED_CHARS  # leading characters of a statement read
    reading: Reading = field(default_factory=Reading)


@dataclass
class TrainReport:
    version_dir: Path
    promoted: bool
    events: int
    excluded: int
    rejected: int
    fit_rows: int
    heldback_rows: int
    heldback_days: float
    heldback_incidents: int
    threshold: float
    window: tuple[str, str]
    seconds: dict[str, float]


@dataclass
class ScoreReport:
    model: str
    events: int
    rejected: int
    anomalies: int
    incidents: list[dict[str, Any]]
    continued_state: bool
    warmup_until: str | None
    seconds: float

    @property
    def by_severity(self) -> Counter[str]:
        return Counter(i["severity"] for i in self.incidents)


# ---------------------------------------------------------------------------- reading
def total_rows(paths: Sequence[str | Path]) -> int | None:
    """Rows to expect when every input is plain Parquet (for a progress total), else None."""
    import pyarrow.parquet as pq

    total = 0
    for path in expand_paths(paths):
        if not path.name.endswith(".parquet"):
            return None
        total += pq.ParquetFile(path).metadata.num_rows
    return total


def exclusion_filter(labels_path: Path) -> pl.Expr:
    """True for events belonging to a labelled scenario (kept out of training)."""
    try:
        labels = json.loads(labels_path.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read labels {labels_path}: {exc}") from exc
    expr = pl.lit(False)
    for sc in labels.get("scenarios", []):
        start = datetime.fromisoformat(sc["start"].replace("Z", "+00:00"))
        end = datetime.fromisoformat(sc["end"].replace("Z", "+00:00"))
        principals = sc.get("principals") or [sc["principal"]]
        in_window = pl.col("event_time").is_between(start, end)
        by_address = (
            pl.col("client_ip").is_in(sc.get("addresses", []))
            & in_window
            & (pl.col("db_user").is_in(principals) | (pl.col("action") == "login_failed"))
        )
        expr = (
            expr
            | pl.col("session_id").is_in(sc.get("sessions", [])).fill_null(False)
            | (by_address.fill_null(False))
        )
    return expr


_T = TypeVar("_T")


def prefetched(items: Iterator[_T], depth: int = 2) -> Iterator[_T]:
    """``items`` read ahead by up to ``depth`` in a thread, so reading the next batch overlaps
    work on this one (the readers spend their time in Arrow and polars, outside the GIL). Order
    is kept; an exception in the reader is raised here, where the item would have come."""
    slots: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: tuple[str, Any]) -> bool:
        while not stop.is_set():
            try:
                slots.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put(("item", item)):
                    return
            put(("end", None))
        except BaseException as exc:  # handed to the consumer, raised there
            put(("error", exc))

    thread = threading.Thread(target=produce, name="read-ahead", daemon=True)
    thread.start()
    try:
        while True:
            kind, value = slots.get()
            if kind == "end":
                return
            if kind == "error":
                raise value
            yield value
    finally:
        stop.set()
        thread.join()
        close = getattr(items, "close", None)
        if close is not None:  # a generator source (itself read ahead, perhaps) stops too
            close()


def _events(
    paths: Sequence[str | Path],
    quarantine: Quarantine,
    batch_rows: int,
    exclude: pl.Expr | None,
    counts: Counter[str],
    reading: Reading | None = None,
) -> Iterator[pl.DataFrame]:
    how = reading or Reading()
    batches = read_events(
        paths,
        batch_rows=batch_rows,
        quarantine=quarantine,
        default_tz=how.default_tz,
        log_format=how.log_format,
        adapter_options=how.adapter_options,
    )
    for batch in batches:
        if exclude is not None:
            mask = batch.select(exclude).to_series()
            dropped = int(mask.sum())
            if dropped:
                counts["excluded"] += dropped
                batch = batch.filter(~mask)
        counts["events"] += batch.height
        if batch.height:
            yield batch


# ---------------------------------------------------------------------------- training
def train(
    paths: Sequence[str | Path],
    model_dir: Path,
    options: TrainOptions | None = None,
    *,
    quarantine: Quarantine | None = None,
    progress: Progress | None = None,
) -> TrainReport:
    """Replay history, fit, calibrate to the alert budget, write a new model version."""
    opts = options or TrainOptions()
    prog = progress or _Silent()
    quarantine = quarantine or Quarantine(None)
    engine = FeatureEngine(opts.settings, max_statement_chars=opts.max_statement_chars)
    exclude = exclusion_filter(opts.exclude_labels) if opts.exclude_labels else None
    if opts.until is not None:
        late = pl.col("event_time") >= opts.until
        exclude = late if exclude is None else exclude | late
    counts: Counter[str] = Counter()
    t_start = time.perf_counter()
    prog.start("replaying history", total_rows(paths))
    frames = []
    events = _events(paths, quarantine, opts.batch_rows, exclude, counts, opts.reading)
    for prepared in prefetched(engine.prepare(batch) for batch in events):
        frames.append(engine.frame(engine.advance(prepared)).select(_TRAIN_COLUMNS))
        prog.advance(prepared.events.height)
    prog.finish()
    if not frames:
        raise InputError("no valid events to train on")
    feats = pl.concat(frames)
    t_replay = time.perf_counter() - t_start

    t0, t1 = feats["event_time"].min(), feats["event_time"].max()
    if not isinstance(t0, datetime) or not isinstance(t1, datetime):
        raise InputError("no event times to train on")
    warm_end = t0 + timedelta(hours=opts.warmup_hours)
    span = (t1 - warm_end).total_seconds()
    if span < 2 * 3600:
        raise InputError(
            f"training needs more history: {t1 - t0} given, warm-up alone is "
            f"{opts.warmup_hours} h (lower --warmup-hours or add days)"
        )
    fit = feats.filter(pl.col("event_time") >= warm_end)
    X_fit = fit.select(MODEL_FEATURES).to_numpy()
    plausible = np.asarray(PLAUSIBLE)

    prog.start("fitting isolation forests", None)
    t_fit0 = time.perf_counter()
    model, padded = fit_ensemble(
        X_fit,
        MODEL_FEATURES,
        plausible,
        n_trees=opts.n_trees,
        max_samples=opts.max_samples,
        seed=opts.seed,
    )
    t_fit = time.perf_counter() - t_fit0
    prog.finish()

    # Calibration on every day after the warm-up, each scored by a model fitted without it
    # (days dealt into at most CALIBRATION_FOLDS folds), so no single held-back day, a quiet
    # weekend or a busy Monday, sets the threshold for the week.
    prog.start("calibrating threshold", None)
    day = fit["event_time"].dt.date()
    day_ids = day.rank("dense").cast(pl.Int64).to_numpy() - 1
    folds = day_ids % min(CALIBRATION_FOLDS, int(day_ids.max()) + 1)
    oof = np.zeros(fit.height)
    for k in np.unique(folds):
        held_k = folds == k
        if held_k.all():  # one day only: nothing to fit without it; score it in sample
            oof[:] = model.score(X_fit)
            break
        fold_model, _ = fit_ensemble(
            X_fit[~held_k],
            MODEL_FEATURES,
            plausible,
            n_trees=opts.n_trees,
            max_samples=opts.max_samples,
            seed=opts.seed,
        )
        oof[held_k] = fold_model.score(X_fit[held_k])
    scored = fit.select("event_time", "action", "client_ip", "session_id", "db_user").with_columns(
        anomaly_score=oof
    )
    regimes = regime_days(fit["event_time"])
    cal = calibrate_regimes(
        oof,
        fit["event_time"],
        lambda rows, threshold: grouping.count(
            scored.filter(pl.Series(rows) & (pl.col("anomaly_score") >= threshold)), opts.gap_s
        ),
        regimes=regimes,
        budget_per_day=opts.false_alerts_per_day,
    )
    prog.finish()
    hb_scores = oof
    days = cal.heldback_days
    habitual = habitual_work(fit.filter(pl.Series(oof >= cal.value)))

    quantiles = {
        f"p{q:g}": float(np.quantile(hb_scores, q / 100)) for q in (50, 90, 99, 99.9, 99.99)
    } | {"max": float(hb_scores.max())}
    metadata = {
        "created_at": datetime.now(UTC).isoformat(),
        "feature_spec": engine.spec,
        "feature_spec_hash": engine.spec_hash,
        "max_statement_chars": engine.max_statement_chars,
        "features": list(MODEL_FEATURES),
        "libraries": _libraries(),
        "training": {
            "inputs": [str(p) for p in paths],
            "window": {"start": t0.isoformat(), "end": t1.isoformat()},
            "warmup_until": warm_end.isoformat(),
            "calibration": "every day after the warm-up, scored out of fold",
            "calibration_days": regimes,
            "events": counts["events"],
            "excluded_events": counts["excluded"],
            "rejected_records": quarantine.total,
            "fit_rows": fit.height,
            "heldback_rows": fit.height,
            "exclude_labels": str(opts.exclude_labels) if opts.exclude_labels else None,
        },
        "forest": {
            "kind": "grouped isolation forests, scores as summed surprise (log10)",
            "groups": {name: list(cols) for name, cols in GROUPS.items()},
            "trees": opts.n_trees,
            "max_samples": opts.max_samples,
            "seed": opts.seed,
            "padded_features": padded,
        },
        "score_quantiles_heldback": quantiles,
        "threshold": cal.to_dict(),
        "grouping": {"gap_s": opts.gap_s},
        "habitual": habitual,
        "feature_stats": feature_stats(X_fit, MODEL_FEATURES),
    }
    version_dir = store.write_version(model_dir, model, metadata, engine.save_state)
    promoted = opts.promote or "current" not in store.aliases(model_dir)
    if promoted:
        store.promote(model_dir, version_dir.name)
    return TrainReport(
        version_dir=version_dir,
        promoted=promoted,
        events=counts["events"],
        excluded=counts["excluded"],
        rejected=quarantine.total,
        fit_rows=fit.height,
        heldback_rows=fit.height,
        heldback_days=days,
        heldback_incidents=cal.heldback_incidents,
        threshold=cal.value,
        window=(t0.isoformat(), t1.isoformat()),
        seconds={"replay": t_replay, "fit": t_fit, "total": time.perf_counter() - t_start},
    )


#: At most this many habitual (principal, address, client, statement shape) tuples are kept.
MAX_HABITUAL: Final = 5000
_HABIT_KEY: Final = ("db_user", "client_ip", "client_app", "fingerprint")


def habitual_work(calibration_hits: pl.DataFrame) -> list[list[str]]:
    """What the history did above the threshold, as (principal, address, client app,
    statement shape) tuples: the training window is clean by definition, so work that scored
    as an incident there (the month-end billing run of a week's history) is habitual, and the
    same principal doing the same statement from the same address with the same client does
    not raise an incident again. Anything else about an incident (a new address, another
    client, another statement) still does."""
    keys = (
        calibration_hits.select(
            *(pl.col(c).cast(pl.String).fill_null("") for c in _HABIT_KEY),
        )
        .unique(maintain_order=True)
        .head(MAX_HABITUAL)
    )
    return [list(row) for row in keys.iter_rows()]


def _libraries() -> dict[str, str]:
    libs = {"python": platform.python_version(), "exfilwatch": __version__}
    for dist in ("scikit-learn", "numpy", "polars", "pyarrow", "numba", "sqlglot"):
        try:
            libs[dist] = importlib_metadata.version(dist)
        except importlib_metadata.PackageNotFoundError:
            libs[dist] = "unknown"
    return libs


# ---------------------------------------------------------------------------- scoring
class Scorer:
    """Features + forest + threshold of one model version, fed batch after batch."""

    def __init__(
        self,
        art: store.Artefact,
        *,
        continue_state: bool = True,
        bounds: StateBounds | None = None,
    ) -> None:
        meta = art.metadata
        self.artefact = art
        self.engine = FeatureEngine(
            FeatureSettings(**meta["feature_spec"]["settings"]),
            bounds=bounds,
            max_statement_chars=analysed_chars(meta),
        )
        if self.engine.spec_hash != meta["feature_spec_hash"]:
            raise ModelError(
                f"{art.path} was trained with another feature spec than this "
                "exfilwatch computes; retrain it with this version"
            )
        if continue_state:
            self.engine.load_state(art.path)
        self.forest: Ensemble = art.forest
        self.threshold = art.threshold
        self.bands: dict[str, float] = meta["threshold"]["bands"]
        self.stats: dict[str, dict[str, float]] = meta["feature_stats"]
        self.gap_s = float(meta["grouping"]["gap_s"])
        habitual = meta.get("habitual") or []
        self.habitual = pl.DataFrame(
            [tuple(h) for h in habitual], schema=dict.fromkeys(_HABIT_KEY, pl.String), orient="row"
        )
        #: Events above the threshold left out as habitual work (see habitual_work).
        self.habitual_hits_ = 0

    def score(self, events: pl.DataFrame) -> pl.DataFrame:
        """Feature rows of ``events`` with ``anomaly_score`` (higher = more anomalous)."""
        batch = self.engine.update(events)
        scores = self.forest.score(batch.model)
        return self.engine.frame(batch).with_columns(anomaly_score=pl.Series(scores))

    def anomalies(self, events: pl.DataFrame, since: datetime | None = None) -> pl.DataFrame:
        """Feature rows, with ``anomaly_score``, of the events at or above the threshold (and at
        or after ``since``); the state advances over every event."""
        return self.found(self.engine.update(events), since)

    def found(self, batch: FeatureBatch, since: datetime | None = None) -> pl.DataFrame:
        """The anomalies of a batch whose features are computed: the stateless end of
        :meth:`anomalies` (the forest, the threshold, habitual work), which may run in another
        thread while the engine goes on to the next batch."""
        events = batch.events
        scores = self.forest.score(batch.model)
        hit = scores >= self.threshold
        if since is not None and events.height:
            hit &= (events["event_time"] >= since).to_numpy()
        found = self.engine.frame(batch, hit).with_columns(
            anomaly_score=pl.Series(scores[hit], dtype=pl.Float64)
        )
        if self.habitual.height and found.height:
            key = [pl.col(c).cast(pl.String).fill_null("").alias(c) for c in _HABIT_KEY]
            known = (
                found.select(key)
                .join(
                    self.habitual.with_columns(_known=pl.lit(True)),
                    on=list(_HABIT_KEY),
                    how="left",
                    maintain_order="left",
                )["_known"]
                .fill_null(False)
            )
            self.habitual_hits_ += int(known.sum())
            found = found.filter(~known)
        return found

    def explain(self, row: Any) -> dict[str, Any]:
        return explain(row, self.stats)

    def severity(self, score: float, heavy: bool) -> str:
        return severity(score, self.bands, heavy=heavy)

    def incidents(self, anomalies: pl.DataFrame) -> list[dict[str, Any]]:
        """The incidents ``anomalies`` form on their own (batch scoring)."""
        return grouping.build(
            anomalies, explain=self.explain, severity=self.severity, gap_s=self.gap_s
        )

    def incident_grouping(
        self,
        stored: Sequence[dict[str, Any]] = (),
        suppress: grouping.Suppress | None = None,
    ) -> grouping.Grouping:
        """A :class:`~detector.incidents.grouping.Grouping` that continues ``stored`` incidents
        with this model's explanations, severity and gap (the live service, batch by batch)."""
        return grouping.Grouping(
            explain=self.explain,
            severity=self.severity,
            gap_s=self.gap_s,
            stored=stored,
            suppress=suppress,
        )


def analysed_chars(meta: dict[str, Any]) -> int:
    """How many leading characters of a statement the model's features were computed from
    (models without the field read the default)."""
    value = meta.get("max_statement_chars", ANALYSED_CHARS)
    if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_STATEMENT_CHARS:
        return value
    raise ModelError(f"max_statement_chars {value!r} in the model's metadata is not a length")


def state_end(art: store.Artefact) -> datetime | None:
    last = json.loads((art.path / "state.json").read_text()).get("last_event_time")
    return datetime.fromtimestamp(last, UTC) if last is not None else None


#: How far back of the model's last event a stream may start and still continue its state.
_CONTINUE_SLACK: Final = timedelta(minutes=5)


def warmup_until(
    art: store.Artefact, first_time: datetime | None, warmup_hours: float = 24.0
) -> datetime | None:
    """None when events starting at ``first_time`` continue the model's feature state; else
    (a replay of history overlapping its training window) the end of the warm-up, during which
    the state is learnt again from empty and nothing is raised."""
    ended = state_end(art)
    if first_time is None or ended is None or first_time >= ended - _CONTINUE_SLACK:
        return None
    return first_time + timedelta(hours=warmup_hours)


def score(
    model_ref: str | Path,
    paths: Sequence[str | Path],
    out: Path | None,
    *,
    batch_rows: int = 100_000,
    warmup_hours: float = 24.0,
    quarantine: Quarantine | None = None,
    progress: Progress | None = None,
    on_anomalies: Callable[[pl.DataFrame], None] | None = None,
    reading: Reading | None = None,
) -> ScoreReport:
    """Score logs in batch and write incidents as JSON lines.

    When the logs start after the model's training window, scoring continues from the feature
    state saved with the model. When they overlap it (e.g. scoring the training sample itself),
    the engine starts fresh and no incident is raised during the first ``warmup_hours``, while
    the principals' habits are learnt again.
    """
    prog = progress or _Silent()
    quarantine = quarantine or Quarantine(None)
    art = store.load(model_ref)
    counts: Counter[str] = Counter()
    t_start = time.perf_counter()
    batches = prefetched(_events(paths, quarantine, batch_rows, None, counts, reading))
    first = next(batches, None)
    first_time = first["event_time"].min() if first is not None else None
    if first_time is not None and not isinstance(first_time, datetime):
        raise InputError("event_time is not a timestamp")
    warm_until = warmup_until(art, first_time, warmup_hours)
    continued = warm_until is None
    scorer = Scorer(art, continue_state=continued)
    prog.start("scoring", total_rows(paths))
    kept: list[pl.DataFrame] = []

    def keep(found: pl.DataFrame, rows: int) -> None:
        if on_anomalies is not None and found.height:
            on_anomalies(found)
        kept.append(found)
        prog.advance(rows)

    # Four stages overlap: the next batches are read and prepared ahead (a thread each), the
    # kernel runs here, in order, and the forest scores each batch in a thread of its own
    # while the kernel goes on to the next; results are taken in order.
    ordered = chain([first] if first is not None else [], batches)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="forest") as forest:
        pending: deque[tuple[Future[pl.DataFrame], int]] = deque()
        for prepared in prefetched(scorer.engine.prepare(batch) for batch in ordered):
            batch = scorer.engine.advance(prepared)
            pending.append((forest.submit(scorer.found, batch, warm_until), batch.events.height))
            if len(pending) > 1:
                done, rows = pending.popleft()
                keep(done.result(), rows)
        while pending:
            done, rows = pending.popleft()
            keep(done.result(), rows)
    prog.finish()
    anomalies = pl.concat(kept) if kept else None
    incidents = scorer.incidents(anomalies) if anomalies is not None else []
    if out is not None:
        write_jsonl(out, incidents)
    return ScoreReport(
        model=art.ref,
        events=counts["events"],
        rejected=quarantine.total,
        anomalies=anomalies.height if anomalies is not None else 0,
        incidents=incidents,
        continued_state=continued,
        warmup_until=warm_until.isoformat() if warm_until is not None else None,
        seconds=time.perf_counter() - t_start,
    )


def write_jsonl(path: Path, records: Sequence[dict[str, Any]]) -> None:
    """Write records as JSON lines, atomically (temp file, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("wb") as fh:
        for rec in records:
            fh.write(orjson.dumps(rec) + b"\n")
    tmp.replace(path)

"""The child-process side of the benchmarks: every measured phase runs in a fresh interpreter.

``run_phase`` starts ``python bench/_util.py PHASE SPEC_JSON RESULT_PATH``. The child imports
exfilwatch, warms the compiled kernels in-process on a tiny sample (so neither numba compilation
nor loading its on-disk cache is timed), runs the phase once under a wall clock and a CPU clock,
and writes what it measured to ``RESULT_PATH`` as JSON, with the process's peak resident memory
(``VmHWM``) read at the very end.

Phases: ``generate`` (the labelled sample), ``warm`` (one small run that fills numba's on-disk
cache), ``train``, ``read`` (``read_events`` only), ``score`` (``detector.pipeline.score``:
read + features + score + incidents) and ``profile`` (``score`` under cProfile).
"""

from __future__ import annotations

import cProfile
import json
import logging
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any, Final

Spec = dict[str, Any]
Result = dict[str, Any]

#: Fewer days would leave training too little history after its 24 h warm-up.
MIN_DAYS: Final = 3
#: The tiny sample every child warms up on (its own seed, so it shares no statement with the
#: measured sample beyond what the simulated company always runs).
WARM_DAYS: Final = 2
WARM_EVENTS_PER_DAY: Final = 2_000
WARM_SEED: Final = 97
WARM_ROWS: Final = 2_000


class PhaseError(RuntimeError):
    """A child process failed; the message ends with the tail of its stderr."""


def run_phase(phase: str, spec: Spec, *, timeout_s: float = 3600.0) -> Result:
    """Run ``phase`` in a fresh interpreter and return what it measured.

    ``process_seconds`` (added here) is the child's whole life: interpreter start, imports,
    warm-up and the phase.
    """
    with tempfile.TemporaryDirectory(prefix="exfilwatch-bench-") as tmp:
        result_path = Path(tmp) / "result.json"
        command = [sys.executable, str(Path(__file__).resolve()), phase, json.dumps(spec)]
        started = time.perf_counter()
        proc = subprocess.run(
            [*command, str(result_path)],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
        elapsed = time.perf_counter() - started
        if proc.returncode != 0 or not result_path.exists():
            tail = "\n".join(proc.stderr.strip().splitlines()[-25:])
            raise PhaseError(f"phase {phase!r} failed (exit {proc.returncode}):\n{tail}")
        result: Result = json.loads(result_path.read_text())
    result["process_seconds"] = elapsed
    return result


# ---------------------------------------------------------------------------- measuring
@dataclass
class Clock:
    wall: float = 0.0
    cpu: float = 0.0


@contextmanager
def clocked() -> Iterator[Clock]:
    """Wall time and CPU time (all threads of this process) of the ``with`` body."""
    clock = Clock()
    wall0, cpu0 = time.perf_counter(), time.process_time()
    try:
        yield clock
    finally:
        clock.wall = time.perf_counter() - wall0
        clock.cpu = time.process_time() - cpu0


def peak_rss_mib() -> float:
    """This process's peak resident set size so far, in MiB (``VmHWM``)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def _timed(clock: Clock, **fields: Any) -> Result:
    return {"seconds": clock.wall, "cpu_seconds": clock.cpu, "loadavg": os.getloadavg(), **fields}


# ---------------------------------------------------------------------------- warm-up
def ensure_warm_sample(warm_dir: Path) -> float:
    """Write the tiny warm-up sample unless it is there; seconds spent."""
    from detector.samples import write_sample

    if (warm_dir / "events.parquet").exists() and (warm_dir / "events.jsonl").exists():
        return 0.0
    with clocked() as clock:
        write_sample(
            warm_dir,
            days=WARM_DAYS,
            seed=WARM_SEED,
            start=date(2025, 12, 1),
            events_per_day=WARM_EVENTS_PER_DAY,
            attack_days=0,
        )
    return clock.wall


def warm_in_process(warm_dir: Path) -> float:
    """Load (compiling if the on-disk cache is stale) every compiled kernel of the feature
    engine and the forest, and touch both readers, on the tiny sample. Seconds spent."""
    from detector.features.engine import MODEL_FEATURES, FeatureEngine
    from detector.scoring.forest import fit_forest
    from detector.sources.files import read_events

    with clocked() as clock:
        engine = FeatureEngine()
        for name in ("events.jsonl", "events.parquet"):
            batches = list(read_events(warm_dir / name, batch_rows=WARM_ROWS))
        feats = [engine.transform(batch) for batch in batches]
        X = feats[0].select(MODEL_FEATURES).to_numpy()
        forest, _ = fit_forest(X, n_trees=2, max_samples=64, seed=0)
        forest.score(X)
        with tempfile.TemporaryDirectory(prefix="exfilwatch-bench-") as tmp:
            engine.save_state(Path(tmp))
    return clock.wall


# ---------------------------------------------------------------------------- phases
def _generate(spec: Spec) -> Result:
    """The labelled sample: at least ``events`` events, more days until it is reached."""
    from detector.samples import write_sample

    target, per_day = int(spec["events"]), int(spec["events_per_day"])
    days = max(MIN_DAYS, math.ceil(target / per_day))
    with clocked() as clock:
        while True:
            summary = write_sample(
                Path(spec["out"]),
                days=days,
                seed=int(spec["seed"]),
                start=date.fromisoformat(spec["start"]),
                events_per_day=per_day,
            )
            if summary.events >= target:
                break
            days += math.ceil((target - summary.events) / per_day)
    return _timed(clock, events=summary.events, days=days, scenarios=summary.scenarios)


def _warm(spec: Spec) -> Result:
    """One small run: fills numba's on-disk cache so later processes only load it."""
    warm_dir = Path(spec["warm_dir"])
    generated = ensure_warm_sample(warm_dir)
    with clocked() as clock:
        warm_in_process(warm_dir)
    return _timed(clock, events=0, warm_sample_seconds=generated)


def _train(spec: Spec) -> Result:
    from detector.pipeline import TrainOptions, train

    options = TrainOptions(
        batch_rows=int(spec["batch_rows"]),
        exclude_labels=Path(spec["labels"]),
        false_alerts_per_day=float(spec["false_alerts_per_day"]),
        promote=True,
    )
    with clocked() as clock:
        report = train([spec["path"]], Path(spec["model_dir"]), options)
    return _timed(
        clock,
        events=report.events + report.excluded,
        trained_events=report.events,
        excluded=report.excluded,
        fit_rows=report.fit_rows,
        heldback_rows=report.heldback_rows,
        threshold=report.threshold,
        version=report.version_dir.name,
        replay_seconds=report.seconds["replay"],
        fit_seconds=report.seconds["fit"],
        total_seconds=report.seconds["total"],
    )


def _read(spec: Spec) -> Result:
    from detector.sources.files import read_events

    events = 0
    with clocked() as clock:
        for batch in read_events(spec["path"], batch_rows=int(spec["batch_rows"])):
            events += batch.height
    return _timed(clock, events=events)


def _score(spec: Spec) -> Result:
    from detector.pipeline import score

    with clocked() as clock:
        report = score(
            Path(spec["model"]), [spec["path"]], None, batch_rows=int(spec["batch_rows"])
        )
    return _timed(
        clock,
        events=report.events,
        rejected=report.rejected,
        anomalies=report.anomalies,
        incidents=len(report.incidents),
        continued_state=report.continued_state,
        model=report.model,
    )


def _profile(spec: Spec) -> Result:
    profiler = cProfile.Profile()
    profiler.enable()
    try:
        result = _score(spec)
    finally:
        profiler.disable()
    profiler.dump_stats(spec["profile_out"])
    return result


PHASES: Final[dict[str, Callable[[Spec], Result]]] = {
    "generate": _generate,
    "warm": _warm,
    "train": _train,
    "read": _read,
    "score": _score,
    "profile": _profile,
}


def main(argv: list[str]) -> int:
    """Child entry point: ``PHASE SPEC_JSON RESULT_PATH``."""
    phase, spec_text, result_path = argv
    if phase not in PHASES:
        print(f"unknown phase {phase!r}; phases: {', '.join(PHASES)}", file=sys.stderr)
        return 2
    spec: Spec = json.loads(spec_text)
    # the SQL parser warns once per statement it only half understands; noise here
    logging.getLogger("sqlglot").setLevel(logging.ERROR)
    with clocked() as imports:
        import detector.pipeline  # noqa: F401 - imported before any clock starts
    warm_seconds = 0.0
    if phase not in ("generate", "warm"):
        warm_seconds = warm_in_process(Path(spec["warm_dir"]))
    result = PHASES[phase](spec)
    result |= {
        "phase": phase,
        "imports_seconds": imports.wall,
        "in_process_warm_seconds": warm_seconds,
        "peak_rss_mib": peak_rss_mib(),
    }
    Path(result_path).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

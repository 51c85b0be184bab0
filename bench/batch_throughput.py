"""Batch benchmark: training time, and batch scoring throughput for Parquet and JSON lines.

    python bench/batch_throughput.py [--events 1000000] [--workdir bench/out] [--repeats 3]
    python bench/batch_throughput.py --profile      # the Parquet score phase under cProfile

Every measured run is a fresh process (see ``_util.py``); the table reports the median time of
``--repeats`` runs and the highest peak resident memory among them. bench/README.md says what
each phase covers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import pstats
import shlex
import shutil
import statistics
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any, Final

from _util import PhaseError, Result, Spec, run_phase
from rich.console import Console
from rich.table import Table

#: Events a second that batch scoring must reach, per input format.
TARGETS: Final = {"parquet": 250_000.0, "jsonl": 100_000.0}
FILES: Final = {"parquet": "events.parquet", "jsonl": "events.jsonl"}
FORMAT_NAMES: Final = {"parquet": "Parquet", "jsonl": "JSON lines"}

SEED: Final = 11
START: Final = "2025-12-31"
EVENTS_PER_DAY: Final = 40_000
#: The training recipe of the bundled default model (models/README.md).
FALSE_ALERTS_PER_DAY: Final = 0.5
BATCH_ROWS: Final = 100_000
PROFILE_TOP: Final = 25
LIBRARIES: Final = ("exfilwatch", "numpy", "polars", "pyarrow", "numba", "scikit-learn", "sqlglot")

BENCH_DIR: Final = Path(__file__).resolve().parent
REPO: Final = BENCH_DIR.parent


@dataclass(frozen=True)
class Row:
    """One line of the table (and of the JSON report)."""

    phase: str
    input: str
    events: int
    seconds: float
    seconds_runs: list[float]
    cpu_seconds: float | None
    events_per_s: float | None
    peak_rss_mib: float
    target_events_per_s: float | None

    @property
    def met(self) -> bool | None:
        if self.target_events_per_s is None or self.events_per_s is None:
            return None
        return self.events_per_s >= self.target_events_per_s


# ---------------------------------------------------------------------------- preparation
def ensure_sample(workdir: Path, events: int, console: Console) -> dict[str, Any]:
    """The labelled sample for ``events``, generated once and reused while its recipe holds."""
    out = workdir / f"sample-{events}"
    meta_path = out / "sample.json"
    recipe = {
        "seed": SEED,
        "start": START,
        "events_per_day": EVENTS_PER_DAY,
        "requested_events": events,
    }
    files = [out / name for name in (*FILES.values(), "labels.json")]
    if meta_path.exists() and all(f.exists() for f in files):
        cached: dict[str, Any] = json.loads(meta_path.read_text())
        if all(cached.get(k) == v for k, v in recipe.items()):
            console.print(f"sample: {cached['events']:,} events in {out} (cached)")
            return {**cached, "dir": str(out), "generated_now": False}
    console.print(f"sample: generating at least {events:,} events into {out} ...")
    spec = {"out": str(out), "events": events} | {
        k: recipe[k] for k in recipe if k != "requested_events"
    }
    result = run_phase("generate", spec)
    sample = recipe | {
        "events": result["events"],
        "days": result["days"],
        "generate_seconds": result["seconds"],
        "generate_peak_rss_mib": result["peak_rss_mib"],
        "bytes": {fmt: (out / name).stat().st_size for fmt, name in FILES.items()},
    }
    meta_path.write_text(json.dumps(sample, indent=1) + "\n")
    console.print(
        f"sample: {sample['events']:,} events over {sample['days']} days "
        f"in {result['seconds']:.1f} s"
    )
    return {**sample, "dir": str(out), "generated_now": True}


def warm_jit(common: Spec, console: Console) -> Result:
    """One small run in its own process, so numba's on-disk cache is filled before measuring."""
    result = run_phase("warm", common)
    console.print(
        f"JIT warm-up (one small run, fills numba's on-disk cache): "
        f"{result['seconds']:.1f} s in a process of {result['process_seconds']:.1f} s"
    )
    return result


def trained_on(model_dir: Path, parquet: Path, events: int) -> bool:
    """Whether the promoted version under ``model_dir`` was trained on exactly this sample."""
    try:
        version = (model_dir / "current").read_text().strip()
        training = json.loads((model_dir / version / "metadata.json").read_text())["training"]
    except (OSError, ValueError, KeyError):
        return False
    seen = int(training.get("events", -1)) + int(training.get("excluded_events", 0))
    return bool(training.get("inputs") == [str(parquet)] and seen == events)


# ---------------------------------------------------------------------------- measuring
def measure(
    plan: Sequence[tuple[str, str, Spec]], repeats: int, console: Console
) -> dict[str, list[Result]]:
    """Run each ``(key, phase, spec)`` of the plan ``repeats`` times, interleaved (run 1 of
    every item, then run 2, ...) so a change in background load spreads over all of them."""
    runs: dict[str, list[Result]] = {key: [] for key, _, _ in plan}
    for n in range(1, repeats + 1):
        for key, phase, spec in plan:
            result = run_phase(phase, spec)
            runs[key].append(result)
            rate = result["events"] / result["seconds"]
            console.print(
                f"  {key:<15} run {n}/{repeats}: {result['seconds']:7.2f} s  "
                f"{rate:>11,.0f} events/s  peak {result['peak_rss_mib']:6.0f} MiB  "
                f"load {result['loadavg'][0]:.2f}"
            )
    return runs


def _median(runs: list[Result], field: str) -> float:
    return statistics.median(float(r[field]) for r in runs)


def _row(
    phase: str,
    fmt: str,
    runs: list[Result],
    *,
    seconds_field: str = "seconds",
    events_field: str = "events",
    with_rate: bool = True,
    with_cpu: bool = True,
    target: float | None = None,
) -> Row:
    seconds = _median(runs, seconds_field)
    events = int(runs[0][events_field])
    return Row(
        phase=phase,
        input=FORMAT_NAMES[fmt],
        events=events,
        seconds=seconds,
        seconds_runs=[float(r[seconds_field]) for r in runs],
        cpu_seconds=_median(runs, "cpu_seconds") if with_cpu else None,
        events_per_s=events / seconds if with_rate else None,
        peak_rss_mib=max(float(r["peak_rss_mib"]) for r in runs),
        target_events_per_s=target,
    )


def build_rows(runs: dict[str, list[Result]]) -> list[Row]:
    train = runs["train"]
    rows = [
        _row(
            "train: replay",
            "parquet",
            train,
            seconds_field="replay_seconds",
            with_cpu=False,
        ),
        _row(
            "train: fit",
            "parquet",
            train,
            seconds_field="fit_seconds",
            events_field="fit_rows",
            with_rate=False,
            with_cpu=False,
        ),
        _row("train: total", "parquet", train, seconds_field="total_seconds"),
    ]
    rows += [_row("read only", fmt, runs[f"read {fmt}"]) for fmt in FILES]
    rows += [_row("score", fmt, runs[f"score {fmt}"], target=TARGETS[fmt]) for fmt in FILES]
    return rows


# ---------------------------------------------------------------------------- reporting
def render(rows: list[Row], title: str, notes: list[str], console: Console) -> None:
    table = Table(title=title, title_justify="left")
    table.add_column("phase")
    table.add_column("input")
    table.add_column("events", justify="right")
    table.add_column("seconds (median)", justify="right")
    table.add_column("CPU s (median)", justify="right")
    table.add_column("events/s", justify="right")
    table.add_column("peak RSS MiB", justify="right")
    table.add_column("target events/s", justify="right")
    table.add_column("target")
    for row in rows:
        met = {None: "", True: "[green]met[/green]", False: "[red]not met[/red]"}[row.met]
        table.add_row(
            row.phase,
            row.input,
            f"{row.events:,}",
            f"{row.seconds:.2f}",
            f"{row.cpu_seconds:.2f}" if row.cpu_seconds is not None else "–",
            f"{row.events_per_s:,.0f}" if row.events_per_s is not None else "–",
            f"{row.peak_rss_mib:,.0f}",
            f">= {row.target_events_per_s:,.0f}" if row.target_events_per_s else "",
            met,
        )
    console.print(table)
    for note in notes:
        console.print(f"  {note}", highlight=False, markup=False)


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
    }
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                info["memory_mib"] = int(line.split()[1]) // 1024
                break
    except OSError:
        pass
    info["libraries"] = {}
    for dist in LIBRARIES:
        try:
            info["libraries"][dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            info["libraries"][dist] = None
    return info


def code_state() -> dict[str, Any]:
    """The commit measured and any uncommitted change under detector/ (figures depend on both)."""

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(
                ["git", *args], cwd=REPO, capture_output=True, text=True, check=True
            )
        except (OSError, subprocess.CalledProcessError):
            return None
        return done.stdout.rstrip()

    changed = git("status", "--porcelain", "--", "detector")
    return {
        "commit": git("rev-parse", "HEAD"),
        "detector_uncommitted": changed.splitlines() if changed else [],
    }


def notes_for(runs: dict[str, list[Result]], warm: Result, repeats: int) -> tuple[list[str], Any]:
    measured = [r for key, rs in runs.items() if key != "train" for r in rs] + runs["train"]
    overhead = {
        "imports_s_median": _median(measured, "imports_seconds"),
        "in_process_warm_s_median": _median(measured, "in_process_warm_seconds"),
        "process_minus_phase_s_median": statistics.median(
            r["process_seconds"] - r["seconds"] for r in measured
        ),
        "jit_warm_run_s": warm["seconds"],
        "jit_warm_process_s": warm["process_seconds"],
    }
    loads = [float(r["loadavg"][0]) for r in measured]
    load = {"min": min(loads), "median": statistics.median(loads), "max": max(loads)}
    notes = [
        f"{repeats} runs per phase, each in a fresh process, interleaved; seconds are the "
        "median, peak RSS the highest VmHWM among the runs.",
        f"Not timed: interpreter start, imports (median {overhead['imports_s_median']:.1f} s) "
        f"and an in-process warm-up of the compiled kernels on a tiny sample (median "
        f"{overhead['in_process_warm_s_median']:.2f} s); numba's on-disk cache was filled first "
        f"by one small run ({warm['seconds']:.1f} s), so no compilation is counted.",
        "train = detector.pipeline.train on the Parquet file, labelled attacks excluded: replay "
        "is read + features of every event, fit the isolation forest (events column: rows "
        "fitted), total adds calibration on the held-back days and writing the model.",
        "read only = detector.sources.files.read_events alone (a breakdown, no target).",
        "score = detector.pipeline.score(model, [file], out=None): read + validate + features "
        "+ forest + incident grouping, one process, model trained on the same sample.",
        "CPU s counts every thread of the process (polars and Arrow use several).",
        f"1-minute load average at the end of the runs: min {load['min']:.2f}, median "
        f"{load['median']:.2f}, max {load['max']:.2f} on {os.cpu_count()} CPUs "
        "(other work shares the machine when it is above ~1).",
    ]
    return notes, {"overhead": overhead, "loadavg_1m": load}


# ---------------------------------------------------------------------------- modes
def run_benchmark(
    sample: dict[str, Any], common: Spec, model_dir: Path, repeats: int, console: Console
) -> dict[str, Any]:
    sample_dir = Path(sample["dir"])
    warm = warm_jit(common, console)
    if model_dir.exists():
        shutil.rmtree(model_dir)
    train_spec = common | {
        "path": str(sample_dir / FILES["parquet"]),
        "labels": str(sample_dir / "labels.json"),
        "model_dir": str(model_dir),
        "false_alerts_per_day": FALSE_ALERTS_PER_DAY,
    }
    console.print(f"train ({repeats} runs) ...")
    runs = measure([("train", "train", train_spec)], repeats, console)
    console.print(f"read only ({repeats} runs per format) ...")
    runs |= measure(
        [
            (f"read {fmt}", "read", common | {"path": str(sample_dir / name)})
            for fmt, name in FILES.items()
        ],
        repeats,
        console,
    )
    console.print(f"score ({repeats} runs per format) ...")
    runs |= measure(
        [
            (
                f"score {fmt}",
                "score",
                common | {"path": str(sample_dir / name), "model": str(model_dir)},
            )
            for fmt, name in FILES.items()
        ],
        repeats,
        console,
    )
    rows = build_rows(runs)
    notes, context = notes_for(runs, warm, repeats)
    title = (
        f"exfilwatch batch throughput: {sample['events']:,} events "
        f"({sample['days']} days from {START}, seed {SEED}), median of {repeats} runs"
    )
    render(rows, title, notes, console)
    return {
        "benchmark": "batch_throughput",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": shlex.join(["python", *sys.argv]),
        "machine": machine(),
        "code": code_state(),
        "sample": {k: v for k, v in sample.items() if k != "generated_now"},
        "settings": {
            "repeats": repeats,
            "batch_rows": common["batch_rows"],
            "train": {
                "exclude_labels": True,
                "false_alerts_per_day": FALSE_ALERTS_PER_DAY,
                "other_options": "TrainOptions defaults",
            },
        },
        "targets_events_per_s": TARGETS,
        "rows": [asdict(row) | {"met": row.met} for row in rows],
        "notes": notes,
        **context,
        "jit_warm_run": warm,
        "runs": runs,
    }


def run_profile(
    sample: dict[str, Any], common: Spec, model_dir: Path, workdir: Path, console: Console
) -> None:
    sample_dir = Path(sample["dir"])
    parquet = sample_dir / FILES["parquet"]
    warm_jit(common, console)
    if not trained_on(model_dir, parquet, int(sample["events"])):
        console.print("training a model on the sample first (not profiled) ...")
        if model_dir.exists():
            shutil.rmtree(model_dir)
        run_phase(
            "train",
            common
            | {
                "path": str(parquet),
                "labels": str(sample_dir / "labels.json"),
                "model_dir": str(model_dir),
                "false_alerts_per_day": FALSE_ALERTS_PER_DAY,
            },
        )
    out = workdir / "score_parquet.prof"
    result = run_phase(
        "profile", common | {"path": str(parquet), "model": str(model_dir), "profile_out": str(out)}
    )
    console.print(
        f"score, Parquet, under cProfile: {result['events']:,} events in "
        f"{result['seconds']:.2f} s ({result['events'] / result['seconds']:,.0f} events/s with "
        f"profiling overhead); stats saved to {out}"
    )
    sys.stdout.flush()
    pstats.Stats(str(out), stream=sys.stdout).sort_stats("cumulative").print_stats(PROFILE_TOP)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Batch benchmark of exfilwatch: training time and score throughput "
        "(Parquet and JSON lines), each run in a fresh process."
    )
    parser.add_argument(
        "--events", type=int, default=1_000_000, help="least events in the sample (1,000,000)"
    )
    parser.add_argument(
        "--workdir", type=Path, default=BENCH_DIR / "out", help="sample, models and report"
    )
    parser.add_argument("--repeats", type=int, default=3, help="runs per phase (3)")
    parser.add_argument(
        "--batch-rows", type=int, default=BATCH_ROWS, help="rows per batch (the pipeline default)"
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help=f"only run the Parquet score phase under cProfile and print the top {PROFILE_TOP} "
        "entries by cumulative time",
    )
    args = parser.parse_args(argv)
    if args.events < 1 or args.repeats < 1 or args.batch_rows < 1:
        parser.error("--events, --repeats and --batch-rows must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    console = Console(highlight=False, width=None if sys.stdout.isatty() else 150)
    workdir: Path = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    model_dir = workdir / "models" / "bench"
    common: Spec = {"warm_dir": str(workdir / "warmup"), "batch_rows": args.batch_rows}
    try:
        sample = ensure_sample(workdir, args.events, console)
        if args.profile:
            run_profile(sample, common, model_dir, workdir, console)
            return 0
        report = run_benchmark(sample, common, model_dir, args.repeats, console)
    except PhaseError as exc:
        console.print(str(exc), style="red", markup=False)
        return 1
    out = workdir / "batch_throughput.json"
    out.write_text(json.dumps(report, indent=1) + "\n")
    console.print(f"  figures written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

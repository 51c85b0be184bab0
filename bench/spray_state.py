"""Feature state under password spraying: memory, state size and the snapshot pause.

    python bench/spray_state.py [--names 1000000] [--batch 10000] [--rate 1000] [--addresses 16]

Starts a feature engine the way the service does (the shipped model's feature settings and
state), then feeds it ``--names`` failed logins, each for a user name never seen before, from
``--addresses`` addresses at ``--rate`` attempts a second of event time, in micro-batches of
``--batch`` events (the service's default batch), every attempt on a connection of its own (a
session id each, as PostgreSQL's ``%c`` gives a failed authentication). It prints, before and
after the spray: the process's resident memory (``VmRSS``, and the peak ``VmHWM``), the state's
principal rows and pair-table entries with the bytes they hold, the snapshot's size on disk,
and how long a snapshot keeps the scorer from scoring: the whole write where the engine has no
off-thread capture, else only the capture (the write's own time is printed beside it). The
share of sprayed attempts whose failed-login features carry the spray (the per-address count
over 10 an hour, or the per-principal count over 5) says whether a spray still shows.

Figures are printed; nothing is asserted. One run of the default size takes a few minutes on
two cores.
"""

from __future__ import annotations

import argparse
import gc
import math
import shutil
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final

import numpy as np
import polars as pl

REPO: Final = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from detector import schema  # noqa: E402 - the repository's own package, after its path
from detector.features.engine import MODEL_FEATURES, FeatureEngine  # noqa: E402
from detector.features.settings import FeatureSettings  # noqa: E402
from detector.scoring import artefact  # noqa: E402
from detector.testing import make_events  # noqa: E402

MODEL: Final = REPO / "models" / "default"
ADDRESS_COL: Final = MODEL_FEATURES.index("failed_logins_address_1h")
PRINCIPAL_COL: Final = MODEL_FEATURES.index("failed_logins_principal_1h")


def proc_status(field: str) -> float:
    """A memory figure of this process from /proc/self/status, in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024.0
    return math.nan


def state_figures(engine: FeatureEngine) -> dict[str, float]:
    """Principal rows, live pair entries and the bytes the state's arrays hold."""
    arrays = [engine.state_, engine.highs_, engine.keys_, engine.kinds_, engine.ta_, engine.va_]
    return {
        "principals": float(len(engine.principals_)),
        "pair_entries": float(engine.size_),
        "pair_slots": float(engine.keys_.shape[0]),
        "state_mib": sum(a.nbytes for a in arrays) / 2**20,
    }


def snapshot_figures(engine: FeatureEngine) -> dict[str, float]:
    """Seconds the scorer waits for a snapshot, the write's own seconds, and its MiB on disk."""
    root = Path(tempfile.mkdtemp(prefix="spray-snapshot-"))
    try:
        capture = getattr(engine, "snapshot_state", None)
        if capture is None:  # the whole write happens where scoring waits
            started = time.perf_counter()
            engine.save_state(root)
            pause = time.perf_counter() - started
            write = pause
        else:
            started = time.perf_counter()
            copy = capture()
            pause = time.perf_counter() - started
            started = time.perf_counter()
            copy.write(root)
            write = time.perf_counter() - started
        size = sum(f.stat().st_size for f in root.iterdir()) / 2**20
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return {"pause_s": pause, "write_s": write, "disk_mib": size}


def spray_batch(start: int, n: int, t0: datetime, rate: float, addresses: int) -> pl.DataFrame:
    """Failed logins ``start`` .. ``start + n`` of the spray, one new user name each."""
    i = pl.int_range(start, start + n, eager=True).alias("i")
    frame = pl.DataFrame(i).select(
        event_time=(
            (pl.col("i").cast(pl.Float64) * (1e6 / rate)).cast(pl.Int64) + int(t0.timestamp() * 1e6)
        ).cast(pl.Datetime("us", "UTC")),
        db_user=pl.format("sprayed{}", pl.col("i").cast(pl.String).str.zfill(7)),
        action=pl.lit("login_failed"),
        source_format=pl.lit("pgaudit-stderr"),
        db_system=pl.lit("postgresql"),
        client_ip=pl.format("198.51.100.{}", pl.col("i") % addresses),
        session_id=pl.format("6570a1b2.{}", pl.col("i")),
        success=pl.lit(False),
    )
    return _canonical(frame)


def _canonical(frame: pl.DataFrame) -> pl.DataFrame:
    return frame.select(
        pl.col(c).cast(dtype) if c in frame.columns else pl.lit(None, dtype).alias(c)
        for c, dtype in schema.EVENT_SCHEMA.items()
    )


def new_engine(**bounds: Any) -> FeatureEngine:
    """An engine as the service starts one: the model's settings, continuing its state."""
    art = artefact.load(MODEL)
    settings = FeatureSettings(**art.metadata["feature_spec"]["settings"])
    engine = FeatureEngine(settings, **bounds)
    engine.load_state(art.path)
    return engine


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--names", type=int, default=1_000_000)
    parser.add_argument("--batch", type=int, default=10_000)
    parser.add_argument("--rate", type=float, default=1_000.0, help="attempts per second")
    parser.add_argument("--addresses", type=int, default=16)
    args = parser.parse_args(argv)

    warm = FeatureEngine()  # compile (or load) the kernels before anything is measured
    warm.update(make_events([{"db_user": "warm-up", "rows_returned": 1}]))
    del warm
    engine = new_engine()
    assert engine.last_event_time_ is not None
    t0 = datetime.fromtimestamp(engine.last_event_time_, UTC) + timedelta(minutes=5)
    gc.collect()
    before = {"rss_mib": proc_status("VmRSS"), **state_figures(engine), **snapshot_figures(engine)}

    flagged_addr = flagged_principal = 0
    started = time.perf_counter()
    for start in range(0, args.names, args.batch):
        n = min(args.batch, args.names - start)
        batch = engine.update(spray_batch(start, n, t0, args.rate, args.addresses))
        flagged_addr += int(np.count_nonzero(batch.model[:, ADDRESS_COL] > np.log1p(10)))
        flagged_principal += int(np.count_nonzero(batch.model[:, PRINCIPAL_COL] > np.log1p(5)))
    spray_s = time.perf_counter() - started
    gc.collect()
    after = {"rss_mib": proc_status("VmRSS"), **state_figures(engine), **snapshot_figures(engine)}

    print(
        f"{args.names:,} sprayed names from {args.addresses} addresses, {args.rate:,.0f}/s "
        f"of event time, batches of {args.batch:,}; fed in {spray_s:.1f} s "
        f"({args.names / spray_s:,.0f} events/s)"
    )
    print(f"{'':24} {'before spray':>14} {'after spray':>14}")
    for key, label, fmt in (
        ("rss_mib", "RSS MiB", "{:,.0f}"),
        ("principals", "principal rows", "{:,.0f}"),
        ("pair_entries", "pair entries", "{:,.0f}"),
        ("pair_slots", "pair table slots", "{:,.0f}"),
        ("state_mib", "state arrays MiB", "{:,.1f}"),
        ("disk_mib", "snapshot on disk MiB", "{:,.2f}"),
        ("pause_s", "scorer pause s", "{:.3f}"),
        ("write_s", "snapshot write s", "{:.3f}"),
    ):
        print(f"{label:24} {fmt.format(before[key]):>14} {fmt.format(after[key]):>14}")
    print(f"peak RSS (VmHWM) MiB: {proc_status('VmHWM'):,.0f}")
    growth = (after["rss_mib"] - before["rss_mib"]) * 1024 / max(args.names, 1)
    print(f"RSS growth per sprayed name: {growth:,.3f} KiB")
    print(
        f"sprayed attempts with failed_logins_address_1h > log1p(10): "
        f"{flagged_addr / args.names:.1%}; failed_logins_principal_1h > log1p(5): "
        f"{flagged_principal / args.names:.1%}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""One lab run: a private audited PostgreSQL 15 under an accelerated clock, days of simulated
SaaS traffic with attacks in the last days, the server's logs and labels resolved from them."""

from __future__ import annotations

import json
import random
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import psycopg

from detector.lab.attacks import schedule_attacks
from detector.lab.clock import SimClock
from detector.lab.cluster import PgCluster, libfaketime, unavailable_reason
from detector.lab.labels import (
    index_events,
    index_jsonlog,
    iso,
    resolve,
    scenario_label,
    windows,
)
from detector.lab.schema import DATABASE, Sizes, roles_sql, schema_sql
from detector.lab.sim import Sim
from detector.lab.traffic import DAY, World, schedule_benign

DEFAULT_START = date(2026, 3, 30)  # a Monday; April 1st (the monthly invoice run) is day 3
DEFAULT_PREFIX = "%m [%p] %q%u@%d %r %a "
HEAVY_PRINCIPAL = {
    "nightly_backup": "backup",
    "billing_run": "billing",
    "bi_refresh": "bi",
    "nightly_aggregation": "worker",
    "deploy_login_failures": "app_api",
    "dba_changes": "dba",
}
#: Settings on top of the cluster's audit settings (docs/lab.md says why).
LAB_SETTINGS: dict[str, str] = {
    "pgaudit.log_parameter": "off",
    "max_connections": "60",
    "shared_buffers": "'128MB'",
    "checkpoint_timeout": "'30min'",
}
SETUP_LEAD_S = 600.0
OUTPUTS = {"jsonlog": "postgresql.json", "csvlog": "postgresql.csv", "stderr": "postgresql.log"}


@dataclass(frozen=True)
class LabConfig:
    seed: int = 1
    days: int = 7
    start: date = DEFAULT_START
    attack_days: int = 2
    scale: float = 1.0
    log_line_prefix: str = DEFAULT_PREFIX

    def check(self) -> None:
        if self.days < 2:
            raise ValueError("--days must be at least 2 (a day of history before the attacks)")
        if not 1 <= self.attack_days < self.days:
            raise ValueError("--attack-days must be at least 1 and less than --days")
        if not 0.01 <= self.scale <= 20:
            raise ValueError("--scale must be between 0.01 and 20")


def _setup(cluster: PgCluster, sizes: Sizes, config: LabConfig) -> None:
    """Create and fill the database as the superuser over the socket, unaudited."""
    with psycopg.connect(cluster.dsn(), autocommit=True) as conn:
        conn.execute("SET pgaudit.log = 'none'")
        conn.execute(f"CREATE DATABASE {DATABASE}")
    with psycopg.connect(cluster.dsn(dbname=DATABASE), autocommit=True) as conn:
        conn.execute("SET pgaudit.log = 'none'")
        for sql in schema_sql(sizes, config.start, config.seed) + roles_sql(config.seed):
            conn.execute(sql)


def run_lab(
    config: LabConfig,
    out: Path,
    *,
    command: str = "",
    progress: Callable[[float, float], None] | None = None,
) -> dict[str, Any]:
    """Run the lab into ``out``; the run's summary (also written as ``out/lab.json``).
    ``progress(done, total)`` is called with simulated seconds."""
    config.check()
    reason = unavailable_reason(lab=True)
    library = libfaketime()
    if reason is not None or library is None:
        raise RuntimeError(f"the lab cannot run here: {reason}")
    wall0 = time.monotonic()
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(config.seed)
    sizes = Sizes.at(config.scale, jitter=rng.uniform(0.85, 1.15))
    start = datetime(config.start.year, config.start.month, config.start.day, tzinfo=UTC)
    t0 = start.timestamp()
    end = t0 + config.days * DAY
    root = Path(tempfile.mkdtemp(prefix="exfilwatch-lab-"))
    root.chmod(0o755)  # the server account must reach its cluster below it
    cluster = PgCluster.create(
        root / "cluster", log_line_prefix=config.log_line_prefix, settings=LAB_SETTINGS
    )
    try:
        with (cluster.data_dir / "pg_hba.conf").open("a") as hba:
            # every 127.x source address of the simulated roles, with passwords
            hba.write("host all all 127.0.0.0/8 scram-sha-256\n")
        clock = SimClock(cluster.root / "faketime", t0 - SETUP_LEAD_S)
        cluster.environment = clock.environment(library)
        sim = Sim(cluster, clock, cluster.root)
        try:
            cluster.start()
            _setup(cluster, sizes, config)
            world = World(sim, rng, config.seed, sizes, t0, config.days, config.scale,
                          config.attack_days)
            schedule_benign(world)
            attacks = schedule_attacks(world)
            sim.run(end, lambda t: progress(max(0.0, t - t0), end - t0) if progress else None)
        finally:
            sim.close()
            cluster.stop()
            # the logs are kept even when the run failed, to see why
            for destination, name in OUTPUTS.items():
                if cluster.log_file(destination).exists():
                    shutil.copyfile(cluster.log_file(destination), out / name)
            shutil.copyfile(cluster.root / "clients.stderr", out / "clients.stderr")
    finally:
        cluster.remove()
        shutil.rmtree(root, ignore_errors=True)

    index = index_jsonlog(out / OUTPUTS["jsonlog"])
    events = index_events(out / OUTPUTS["jsonlog"])
    tags, drift = resolve(sim.records, index)
    if drift > 1.0:
        raise RuntimeError(f"log timestamps are up to {drift:.3f} s away from the simulated times")
    scenarios = []
    for attack in attacks:
        sids = tags.get(attack.tag)
        if not sids:
            raise RuntimeError(f"no session of {attack.scenario} ({attack.tag}) in the log")
        scenarios.append(scenario_label(attack, sids, index, events))
    heavy = []
    for activity, principal in HEAVY_PRINCIPAL.items():
        sids = tags.get(f"heavy:{activity}", [])
        if sids:
            found = [index.sessions[s] for s in sids]
            heavy.append({"activity": activity, "principal": principal,
                          "windows": windows(found)})
    labels = {
        "seed": config.seed,
        "days": config.days,
        "start": iso(start),
        "end": iso(datetime.fromtimestamp(end, UTC)),
        "source": "lab",
        "events": events.total,
        "scenarios": scenarios,
        "benign_heavy": heavy,
    }
    (out / "labels.json").write_text(json.dumps(labels, indent=2) + "\n")
    connections = Counter(r.address for r in sim.records)
    summary = {
        "seed": config.seed,
        "days": config.days,
        "start": iso(start),
        "end": labels["end"],
        "attack_days": config.attack_days,
        "scale": config.scale,
        "log_line_prefix": config.log_line_prefix,
        "sizes": {"clients": sizes.clients, "accounts": sizes.accounts, "users": sizes.users},
        "counts": {
            "log_records": index.records,
            "events": events.total,
            "adapter_rejects": events.rejects,
            "events_by_role": events.by_user,
            "connections_by_address": dict(sorted(connections.items())),
            "connections": len(sim.records),
            "driver_actions": sim.actions,
            "client_errors": sim.client_errors,
            "clock_writes": clock.writes,
            "scenarios": len(scenarios),
        },
        "log_first": iso(index.first) if index.first else None,
        "log_last": iso(index.last) if index.last else None,
        "max_clock_drift_s": round(drift, 3),
        "deploy_failure_days": [
            world.date_of(d).isoformat() for d in world.deploy_failure_days
        ],
        "wall_seconds": round(time.monotonic() - wall0, 1),
        "command": command,
    }
    (out / "lab.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary

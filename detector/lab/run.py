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
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg

from detector.lab.attacks import Attack, schedule_attacks
from detector.lab.clock import SimClock
from detector.lab.cluster import PgCluster, libfaketime, unavailable_reason, wait_shim
from detector.lab.labels import (
    index_events,
    index_jsonlog,
    iso,
    outside_span,
    resolve,
    scenario_label,
    windows,
)
from detector.lab.mariadb import (
    AUDIT_LOG,
    MariaServer,
    MariaSim,
    index_audit,
    index_audit_events,
    mariadb_unavailable_reason,
    outside_audit_span,
    portless,
    roles_mysql,
    schema_mysql,
)
from detector.lab.schema import DATABASE, Sizes, roles_sql, schema_sql
from detector.lab.sim import Sim
from detector.lab.traffic import DAY, World, schedule_benign

START_YEARS = (2026, 2027)
ENGINES = ("postgresql", "mariadb")
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
    start: date | None = None
    attack_days: int = 2
    scale: float = 1.0
    log_line_prefix: str = DEFAULT_PREFIX
    engine: str = "postgresql"

    def check(self) -> None:
        if self.engine not in ENGINES:
            raise ValueError(f"--engine must be one of {', '.join(ENGINES)}")
        if self.days < 2:
            raise ValueError("--days must be at least 2 (a day of history before the attacks)")
        if not 1 <= self.attack_days < self.days:
            raise ValueError("--attack-days must be at least 1 and less than --days")
        if not 0.01 <= self.scale <= 20:
            raise ValueError("--scale must be between 0.01 and 20")

    def first_day(self) -> date:
        """``start``, else the seed's: :func:`seeded_start`."""
        return self.start or seeded_start(self.seed, self.days, self.attack_days)


def seeded_start(seed: int, days: int, attack_days: int) -> date:
    """A first day chosen by the seed: its weekday is ``seed % 7`` (Monday 0; the next one
    when that weekday cannot meet the rest), so consecutive seeds start on different weekdays;
    the 1st of a month (the monthly invoice run) falls in
    the training days; for runs of 7 days or more the attack days are not all weekend days.
    Among the starts in :data:`START_YEARS` that satisfy this, the seed picks one."""
    training = days - attack_days
    for shift in range(7):  # the next weekday when none fits (a Monday start of a 7-day run
        weekday = (seed + shift) % 7  # with 2 attack days has a weekend for attack days)
        candidates: set[date] = set()
        for year in START_YEARS:
            for month in range(1, 13):
                for before in range(training):
                    start = date(year, month, 1) - timedelta(days=before)
                    if start.weekday() != weekday:
                        continue
                    attack = [start + timedelta(days=d) for d in range(training, days)]
                    if days >= 7 and all(d.weekday() >= 5 for d in attack):
                        continue
                    candidates.add(start)
        if candidates:
            return random.Random(f"start:{seed}").choice(sorted(candidates))
    raise ValueError(f"no start date fits {days} days with {attack_days} attack days")


def _setup(cluster: PgCluster, sizes: Sizes, config: LabConfig) -> None:
    """Create and fill the database as the superuser over the socket, unaudited."""
    with psycopg.connect(cluster.dsn(), autocommit=True) as conn:
        conn.execute("SET pgaudit.log = 'none'")
        conn.execute(f"CREATE DATABASE {DATABASE}")
    with psycopg.connect(cluster.dsn(dbname=DATABASE), autocommit=True) as conn:
        conn.execute("SET pgaudit.log = 'none'")
        for sql in schema_sql(sizes, config.first_day(), config.seed) + roles_sql(config.seed):
            conn.execute(sql)


def _run_postgres(
    root: Path,
    clock: SimClock,
    environment: dict[str, str],
    sizes: Sizes,
    config: LabConfig,
    out: Path,
    drive: Callable[[Sim], tuple[World, list[Attack]]],
) -> tuple[Sim, World, list[Attack]]:
    cluster = PgCluster.create(
        root / "cluster", log_line_prefix=config.log_line_prefix, settings=LAB_SETTINGS,
        environment=environment,
    )
    try:
        with (cluster.data_dir / "pg_hba.conf").open("a") as hba:
            # every 127.x source address of the simulated roles, with passwords
            hba.write("host all all 127.0.0.0/8 scram-sha-256\n")
        sim = Sim(cluster.port, clock, cluster.root)
        try:
            cluster.start()
            _setup(cluster, sizes, config)
            world, attacks = drive(sim)
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
    return sim, world, attacks


def _run_mariadb(
    root: Path,
    clock: SimClock,
    environment: dict[str, str],
    sizes: Sizes,
    config: LabConfig,
    first_day: date,
    out: Path,
    drive: Callable[[Sim], tuple[World, list[Attack]]],
) -> tuple[Sim, World, list[Attack]]:
    server = MariaServer.create(root / "mariadb", environment)
    try:
        sim = MariaSim(server, clock, server.root)
        try:
            server.start()
            conn = server.root_connection()
            try:
                with conn.cursor() as cur:
                    cur.execute(f"CREATE DATABASE {DATABASE}")
                    cur.execute(f"USE {DATABASE}")
                    for sql in schema_mysql(sizes, first_day, config.seed) + roles_mysql(
                        config.seed
                    ):
                        cur.execute(sql)
            finally:
                conn.close()
            world, attacks = drive(sim)
        finally:
            sim.close()
            server.stop()
            for path in (server.audit_log, server.error_log):
                if path.exists():
                    shutil.copyfile(path, out / path.name.replace("error", "mariadb-error"))
            shutil.copyfile(server.root / "clients.stderr", out / "clients.stderr")
    finally:
        server.remove()
    return sim, world, attacks


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
    if config.engine == "mariadb":
        reason = reason or mariadb_unavailable_reason()
    library = libfaketime()
    if reason is not None or library is None:
        raise RuntimeError(f"the lab cannot run here: {reason}")
    wall0 = time.monotonic()
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(config.seed)
    sizes = Sizes.at(config.scale, jitter=rng.uniform(0.85, 1.15))
    first_day = config.first_day()
    start = datetime(first_day.year, first_day.month, first_day.day, tzinfo=UTC)
    t0 = start.timestamp()
    end = t0 + config.days * DAY
    root = Path(tempfile.mkdtemp(prefix="exfilwatch-lab-"))
    root.chmod(0o755)  # the server account must reach its cluster below it
    # the clock runs from before initdb, so every time the server writes is simulated
    clock = SimClock(root / "faketime", t0 - SETUP_LEAD_S)
    shim = wait_shim(root)
    environment = clock.environment(library, shim)

    def drive(sim: Sim) -> tuple[World, list[Attack]]:
        world = World(sim, rng, config.seed, sizes, t0, config.days, config.scale,
                      config.attack_days)
        schedule_benign(world)
        attacks = schedule_attacks(world)
        sim.run(end, lambda t: progress(max(0.0, t - t0), end - t0) if progress else None)
        return world, attacks

    try:
        if config.engine == "mariadb":
            sim, world, attacks = _run_mariadb(root, clock, environment, sizes, config,
                                               first_day, out, drive)
        else:
            sim, world, attacks = _run_postgres(root, clock, environment, sizes, config, out,
                                                drive)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    stopped = clock.now()
    low, high = t0 - SETUP_LEAD_S - 60, stopped + 60
    if config.engine == "mariadb":
        outside = {"server_audit": outside_audit_span(out / AUDIT_LOG, low, high)}
        index = index_audit(out / AUDIT_LOG)
        events = index_audit_events(out / AUDIT_LOG)
        records = portless(sim.records)
        drift_limit = 2.0  # the audit log has whole seconds
    else:
        outside = outside_span({k: out / v for k, v in OUTPUTS.items()}, low, high)
        index = index_jsonlog(out / OUTPUTS["jsonlog"])
        events = index_events(out / OUTPUTS["jsonlog"])
        records = sim.records
        drift_limit = 1.0
    # the driver's side of every connection, to check the resolution against
    with (out / "connections.csv").open("w") as handle:
        handle.write("sim_time,address,port,tag\n")
        handle.writelines(f"{iso(datetime.fromtimestamp(r.sim_time, UTC))},{r.address},"
                          f"{r.port},{r.tag}\n" for r in sim.records)
    worst: dict[str, str] = {}
    tags, drift = resolve(records, index, worst)
    if drift > drift_limit:
        raise RuntimeError(f"log timestamps are up to {drift:.3f} s away from the simulated"
                           f" times: {worst}")
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
        "engine": config.engine,
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
        "start_weekday": first_day.strftime("%A"),
        "start_from": "--start" if config.start else "seed",
        "end": labels["end"],
        "engine": config.engine,
        "attack_days": config.attack_days,
        "attack_dates": [world.date_of(d).isoformat()
                         for d in range(config.days - config.attack_days, config.days)],
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
        "wait_shim": shim is not None,
        "log_outside_simulated_span": outside,
        "attack_min_gap_s": round(world.attack_gap_s, 1),
        "deploy_failure_days": [
            world.date_of(d).isoformat() for d in world.deploy_failure_days
        ],
        "dba_change_days": [world.date_of(d).isoformat() for d in world.dba_change_days],
        "wall_seconds": round(time.monotonic() - wall0, 1),
        "command": command,
    }
    (out / "lab.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary

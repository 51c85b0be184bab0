"""``exfilwatch lab``: run the real-server evaluation lab (see docs/lab.md)."""

from __future__ import annotations

import shlex
import sys
from datetime import date
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from detector.lab.run import DEFAULT_PREFIX, LabConfig, run_lab

lab_app = typer.Typer(
    help="A private PostgreSQL 15 + pgaudit under an accelerated clock, driven by real clients "
    "with labelled attacks.",
    no_args_is_help=True,
)


@lab_app.callback()
def lab() -> None:
    """The real-server evaluation lab (see docs/lab.md)."""


@lab_app.command("run")
def run(
    out: Annotated[Path, typer.Option("--out", help="directory for the logs and labels")],
    seed: Annotated[int, typer.Option(help="seed of everything simulated")] = 1,
    days: Annotated[int, typer.Option(help="simulated days")] = 7,
    start: Annotated[
        str | None,
        typer.Option(help="first simulated day (UTC), YYYY-MM-DD; default: chosen by the seed"),
    ] = None,
    attack_days: Annotated[int, typer.Option(help="the last N days carry the attacks")] = 2,
    scale: Annotated[float, typer.Option(help="size of the tenants and traffic (1 = full)")] = 1.0,
    log_line_prefix: Annotated[
        str, typer.Option(help="log_line_prefix of the stderr log")
    ] = DEFAULT_PREFIX,
    engine: Annotated[
        str, typer.Option(help="the server: postgresql (pgaudit) or mariadb (server_audit)")
    ] = "postgresql",
) -> None:
    """Simulate DAYS of SaaS traffic against a real audited server; write its logs
    (OUT/postgresql.json, .csv and .log, or OUT/server_audit.log), OUT/labels.json and
    OUT/lab.json."""
    console = Console(stderr=True)
    try:
        config = LabConfig(seed, days, date.fromisoformat(start) if start else None,
                           attack_days, scale, log_line_prefix, engine)
        config.check()
    except ValueError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from exc
    command = shlex.join(["exfilwatch", "lab", "run", *sys.argv[sys.argv.index("run") + 1 :]]
                         if "run" in sys.argv else ["exfilwatch", "lab", "run"])
    with Progress(
        TextColumn("simulated"),
        BarColumn(),
        TextColumn("{task.fields[when]}"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    ) as bar:
        task = bar.add_task("lab", total=days * 86400.0, when="setting up")

        def progress(done: float, total: float) -> None:
            bar.update(task, completed=done, when=f"day {done / 86400:.2f} of {total / 86400:g}")

        try:
            summary = run_lab(config, out, command=command, progress=progress)
        except RuntimeError as exc:
            console.print(f"[red]error:[/red] {exc}")
            raise typer.Exit(1) from exc
    counts = summary["counts"]
    table = Table(title=f"lab run: {out}")
    table.add_column("role")
    table.add_column("events", justify="right")
    for role, n in counts["events_by_role"].items():
        table.add_row(str(role), f"{n:,}")
    table.add_row("[bold]total", f"[bold]{counts['events']:,}")
    console.print(table)
    scen = Table(title="labelled scenarios")
    for col in ("scenario", "variant", "principal", "sessions", "start", "events"):
        scen.add_column(col)
    import json

    labels = json.loads((out / "labels.json").read_text())
    for s in labels["scenarios"]:
        scen.add_row(s["scenario"], s["variant"], s["principal"], str(len(s["sessions"])),
                     s["start"], str(s["events"]))
    console.print(scen)
    console.print(
        f"{counts['connections']:,} connections, {counts['log_records']:,} log records,"
        f" {counts['adapter_rejects']} rejects, clock within {summary['max_clock_drift_s']} s,"
        f" {summary['wall_seconds']} s wall"
    )

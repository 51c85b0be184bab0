"""The ``exfilwatch`` command line: samples, train, score, eval, models."""

from __future__ import annotations

import os
import sys
from datetime import UTC, date, datetime
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal

import orjson
import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from detector import pipeline
from detector.errors import ExfilwatchError
from detector.lab.cli import lab_app
from detector.quarantine import Quarantine
from detector.schema import MAX_STATEMENT_CHARS
from detector.sqltext import ANALYSED_CHARS

app = typer.Typer(
    help="Catch bulk theft of customer data in database access logs.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
samples_app = typer.Typer(help="Labelled sample logs.", no_args_is_help=True)
models_app = typer.Typer(help="Model versions and aliases.", no_args_is_help=True)
app.add_typer(samples_app, name="samples")
app.add_typer(models_app, name="models")
app.add_typer(lab_app, name="lab")
console = Console(stderr=True)
out = Console()


class RichProgress:
    """The pipeline's Progress protocol drawn with rich on stderr."""

    def __init__(self) -> None:
        self._bar: Progress | None = None
        self._task: Any = None

    def start(self, description: str, total: int | None) -> None:
        self.finish()
        self._bar = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("events"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
            transient=False,
            disable=not console.is_terminal and total is None,
        )
        self._bar.start()
        self._task = self._bar.add_task(description, total=total)

    def advance(self, n: int) -> None:
        if self._bar is not None:
            self._bar.advance(self._task, n)

    def finish(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


def _rate(n: int, seconds: float) -> str:
    return f"{n / seconds:,.0f}/s" if seconds > 0 else "-"


def _kv_table(title: str, rows: list[tuple[str, Any]]) -> Table:
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    for k, v in rows:
        table.add_row(k, str(v))
    return table


# ------------------------------------------------------------------------------------ samples
class Compression(StrEnum):
    none = "none"
    gzip = "gzip"
    zstd = "zstd"


_COMPRESSION: dict[Compression, Literal["gzip", "zstd"] | None] = {
    Compression.none: None,
    Compression.gzip: "gzip",
    Compression.zstd: "zstd",
}


@samples_app.command("generate")
def samples_generate(
    out_dir: Annotated[Path, typer.Option("--out", help="Directory to write the sample to.")],
    days: Annotated[int, typer.Option(min=1, help="Simulated days.")] = 7,
    seed: Annotated[int, typer.Option(help="Random seed; same seed, same bytes.")] = 0,
    start: Annotated[
        str, typer.Option(help="First simulated day (YYYY-MM-DD, UTC).")
    ] = "2026-01-26",
    events_per_day: Annotated[int, typer.Option(min=100)] = 40_000,
    attack_days: Annotated[int, typer.Option(min=0, help="Final days that get the attacks.")] = 2,
    jsonl_compression: Annotated[Compression, typer.Option()] = Compression.none,
) -> None:
    """Simulate a multi-tenant SaaS database's access log with labelled attacks."""
    from detector.samples import write_sample

    bar = RichProgress()
    bar.start("simulating days", days)
    done = 0

    def step(d: int, _total: int) -> None:
        nonlocal done
        bar.advance(d - done)
        done = d

    summary = write_sample(
        out_dir,
        days=days,
        seed=seed,
        start=date.fromisoformat(start),
        events_per_day=events_per_day,
        attack_days=attack_days,
        jsonl_compression=_COMPRESSION[jsonl_compression],
        progress=step,
    )
    bar.finish()
    out.print(
        _kv_table(
            "sample written",
            [
                ("directory", out_dir),
                ("days", days),
                ("events", f"{summary.events:,}"),
                ("scenarios", summary.scenarios),
                *(
                    (p.name, f"{p.stat().st_size / 1e6:.1f} MB")
                    for p in (summary.parquet, summary.jsonl, summary.labels)
                ),
            ],
        )
    )


# ------------------------------------------------------------------------------------ train
LogFormat = Annotated[
    str,
    typer.Option(
        "--log-format",
        help="Format of .json/.csv/.log audit logs: auto, pgaudit-jsonlog, pgaudit-csvlog, "
        "pgaudit-stderr, mariadb-audit or mariadb-syslog.",
    ),
]
LogLinePrefix = Annotated[
    str | None,
    typer.Option("--log-line-prefix", help="PostgreSQL log_line_prefix of stderr logs."),
]
TimeZone = Annotated[
    str | None,
    typer.Option("--timezone", help="Zone of timestamps that carry none (e.g. MariaDB's)."),
]
SigningKeyFile = Annotated[
    Path | None,
    typer.Option(
        "--signing-key-file",
        envvar="EXFILWATCH_MODEL_SIGNING_KEY_FILE",
        help="File holding the model-signing key (or set EXFILWATCH_MODEL_SIGNING_KEY): the "
        "version is signed, and promotion needs its signature to verify.",
    ),
]


def _signing_keys(key_file: Path | None) -> tuple[bytes, ...]:
    """Model-signing keys from --signing-key-file or the environment, as the service reads
    them; a key never comes from the command line itself."""
    from detector import config as cfg

    inline = os.environ.get(f"{cfg.ENV_PREFIX}MODEL_SIGNING_KEY") if key_file is None else None
    return cfg.model_signing_keys(inline, key_file)


def _reading(log_format: str, prefix: str | None, tz: str | None) -> pipeline.Reading:
    from detector.adapters import ADAPTERS
    from detector.errors import UnknownNameError

    if log_format != "auto" and log_format not in ADAPTERS:
        raise UnknownNameError("log format", log_format, ("auto", *ADAPTERS))
    options = {"log_line_prefix": prefix} if prefix else {}
    return pipeline.Reading(log_format, options, tz)


@app.command()
def train(
    inputs: Annotated[list[str], typer.Option("--input", help="Log files, directories or globs.")],
    model_dir: Annotated[Path, typer.Option("--out", help="Model directory, e.g. models/NAME.")],
    false_alerts_per_day: Annotated[float, typer.Option(min=0.0, help="Alert budget.")] = 1.0,
    exclude_labels: Annotated[
        Path | None, typer.Option(help="labels.json whose scenarios are kept out of training.")
    ] = None,
    trees: Annotated[int, typer.Option(min=10, max=2000)] = 100,
    max_samples: Annotated[int, typer.Option(min=16)] = 256,
    seed: Annotated[int, typer.Option()] = 0,
    warmup_hours: Annotated[
        float, typer.Option(min=0.0, help="History that only builds state.")
    ] = 24.0,
    until: Annotated[
        datetime | None,
        typer.Option(
            help="Train on events before this time only (ISO 8601; UTC unless it says), e.g. "
            "the first five days of a week of logs.",
            formats=["%Y-%m-%d", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%dT%H:%M:%S%z"],
        ),
    ] = None,
    promote: Annotated[
        bool, typer.Option(help="Point the 'current' alias at the new version.")
    ] = False,
    quarantine: Annotated[Path | None, typer.Option(help="Where rejected records go.")] = None,
    log_format: LogFormat = "auto",
    log_line_prefix: LogLinePrefix = None,
    timezone: TimeZone = None,
    signing_key_file: SigningKeyFile = None,
    max_statement_chars: Annotated[
        int,
        typer.Option(
            min=256,
            max=MAX_STATEMENT_CHARS,
            help="Leading characters of a statement read for its shape (a longer one is "
            "judged by that much of it); kept with the model.",
        ),
    ] = ANALYSED_CHARS,
) -> None:
    """Replay history through the feature engine, fit, calibrate and write a model version."""
    keys = _signing_keys(signing_key_file)
    opts = pipeline.TrainOptions(
        reading=_reading(log_format, log_line_prefix, timezone),
        n_trees=trees,
        max_samples=max_samples,
        seed=seed,
        warmup_hours=warmup_hours,
        false_alerts_per_day=false_alerts_per_day,
        exclude_labels=exclude_labels,
        until=until if until is None or until.tzinfo else until.replace(tzinfo=UTC),
        promote=promote and not keys,  # a signed version is promoted once it is signed
        max_statement_chars=max_statement_chars,
    )
    with Quarantine(quarantine) as q:
        report = pipeline.train(inputs, model_dir, opts, quarantine=q, progress=RichProgress())
    promoted, signature = report.promoted, "none (unsigned)"
    if keys:
        from detector.scoring import artefact as store

        digest = store.sign(report.version_dir, keys)
        signature = f"signed (SHA256SUMS {digest})"
        if promote:
            store.promote(model_dir, report.version_dir.name, keys=keys)
            promoted = True
    out.print(
        _kv_table(
            f"trained {model_dir.name}@{report.version_dir.name}",
            [
                ("artefact", report.version_dir),
                ("signature", signature),
                (
                    "current alias",
                    "moved here" if promoted else "unchanged (use models promote)",
                ),
                ("window", f"{report.window[0]} .. {report.window[1]}"),
                (
                    "events",
                    f"{report.events:,} ({report.excluded:,} excluded by labels, "
                    f"{report.rejected:,} rejected)",
                ),
                ("fit rows", f"{report.fit_rows:,}"),
                (
                    "held back",
                    f"{report.heldback_rows:,} rows over {report.heldback_days:.1f} days",
                ),
                (
                    "threshold",
                    f"{report.threshold:.4f} ({report.heldback_incidents} incidents held back, "
                    f"budget {false_alerts_per_day:g}/day)",
                ),
                (
                    "replay",
                    f"{report.seconds['replay']:.1f} s "
                    f"({_rate(report.events, report.seconds['replay'])})",
                ),
                ("fit", f"{report.seconds['fit']:.1f} s"),
            ],
        )
    )


# ------------------------------------------------------------------------------------ score
@app.command()
def score(
    model: Annotated[
        str, typer.Option(help="models/NAME (its 'current'), models/NAME/vN or NAME@ALIAS.")
    ],
    inputs: Annotated[list[str], typer.Option("--input", help="Log files, directories or globs.")],
    out_path: Annotated[Path, typer.Option("--out", help="Incidents as JSON lines.")],
    warmup_hours: Annotated[float, typer.Option(min=0.0)] = 24.0,
    batch_rows: Annotated[int, typer.Option(min=1)] = 100_000,
    quarantine: Annotated[Path | None, typer.Option(help="Where rejected records go.")] = None,
    log_format: LogFormat = "auto",
    log_line_prefix: LogLinePrefix = None,
    timezone: TimeZone = None,
) -> None:
    """Score logs in batch and write incidents."""
    reading = _reading(log_format, log_line_prefix, timezone)
    with Quarantine(quarantine) as q:
        report = pipeline.score(
            model,
            inputs,
            out_path,
            batch_rows=batch_rows,
            warmup_hours=warmup_hours,
            quarantine=q,
            progress=RichProgress(),
            reading=reading,
        )
    _print_score(report, out_path)


def _print_score(report: pipeline.ScoreReport, out_path: Path) -> None:
    state = (
        "continued from the model's training state"
        if report.continued_state
        else f"fresh; no incidents before {report.warmup_until} (warm-up)"
    )
    out.print(
        _kv_table(
            f"scored with {report.model}",
            [
                ("events", f"{report.events:,} ({report.rejected:,} rejected)"),
                ("throughput", _rate(report.events, report.seconds)),
                ("feature state", state),
                ("anomalous events", f"{report.anomalies:,}"),
                ("incidents", f"{len(report.incidents)} -> {out_path}"),
                *((f"  {sev}", n) for sev, n in sorted(report.by_severity.items())),
            ],
        )
    )
    if report.incidents:
        table = Table(title="incidents", title_justify="left")
        for col in ("first seen", "severity", "principal", "address", "events", "rows", "reason"):
            table.add_column(col, overflow="fold")
        for inc in sorted(report.incidents, key=lambda i: -i["anomaly_score"])[:20]:
            table.add_row(
                inc["first_seen"][:19],
                inc["severity"],
                inc["principal"],
                ", ".join(inc["addresses"][:2]),
                str(inc["events"]),
                f"{inc['rows_read']:,}",
                inc["reason"],
            )
        out.print(table)


# ------------------------------------------------------------------------------------ eval
@app.command("eval")
def evaluate_cmd(
    models: Annotated[list[str], typer.Option("--model", help="One or more models to compare.")],
    inputs: Annotated[list[str], typer.Option("--input", help="Labelled log files.")],
    labels: Annotated[Path, typer.Option(help="labels.json of the input.")],
    min_recall: Annotated[float | None, typer.Option(min=0.0, max=1.0)] = None,
    max_false_per_day: Annotated[float | None, typer.Option(min=0.0)] = None,
    warmup_hours: Annotated[float, typer.Option(min=0.0)] = 24.0,
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the report.")] = None,
    log_format: LogFormat = "auto",
    log_line_prefix: LogLinePrefix = None,
    timezone: TimeZone = None,
    baselines: Annotated[
        bool,
        typer.Option(
            "--baselines", help="Also run the published baseline rules and compare with them."
        ),
    ] = False,
    baseline_train_until: Annotated[
        str | None,
        typer.Option(
            "--baseline-train-until",
            help="End of the rules' training window (ISO 8601 with zone; default: the first "
            "model's training window end). Implies --baselines.",
        ),
    ] = None,
) -> None:
    """Per scenario caught/missed and time to detect; false incidents per day. Exits 1 when a
    gate (--min-recall, --max-false-per-day) is not met. With --baselines, also the published
    rules (detector.baselines) beside the models, all scored on the events after the rules'
    training window."""
    from detector.evaluation import evaluate, load_labels

    label_data = load_labels(labels)
    reading = _reading(log_format, log_line_prefix, timezone)
    reports = {}
    for ref in models:
        scored = pipeline.score(
            ref, inputs, None, warmup_hours=warmup_hours, progress=RichProgress(), reading=reading
        )
        reports[scored.model] = (evaluate(scored.incidents, label_data), scored)
    names = list(reports)
    table = Table(title="scenarios", title_justify="left")
    table.add_column("scenario")
    table.add_column("principal")
    for name in names:
        table.add_column(f"{name}\ncaught / time to detect", justify="right")
    first = reports[names[0]][0]
    for k, sc in enumerate(first.scenarios):
        cells = []
        for name in names:
            r = reports[name][0].scenarios[k]
            cells.append(
                f"[green]caught[/] {r.time_to_detect_s:,.0f} s ({r.severity})"
                if r.caught
                else "[red]missed[/]"
            )
        table.add_row(sc.scenario, sc.principal, *cells)
    out.print(table)
    summary = Table(title="overall", title_justify="left")
    summary.add_column("measure")
    for name in names:
        summary.add_column(name, justify="right")
    rows: list[tuple[str, list[str]]] = [
        (
            "scenarios caught",
            [
                f"{sum(s.caught for s in reports[n][0].scenarios)}/{len(reports[n][0].scenarios)}"
                for n in names
            ],
        ),
        ("incidents", [str(reports[n][0].incidents) for n in names]),
        ("false incidents", [str(len(reports[n][0].false_incidents)) for n in names]),
        ("false incidents per day", [f"{reports[n][0].false_per_day:.2f}" for n in names]),
        ("incident precision", [f"{reports[n][0].precision:.2f}" for n in names]),
        *(
            (f"false on {act}", [str(reports[n][0].benign_heavy.get(act, 0)) for n in names])
            for act in first.benign_heavy
        ),
        ("events scored", [f"{reports[n][1].events:,}" for n in names]),
    ]
    for label, cells in rows:
        summary.add_row(label, *cells)
    out.print(summary)
    document: dict[str, Any] = {n: r[0].to_dict() for n, r in reports.items()}
    if baselines or baseline_train_until is not None:
        from detector import baselines as rules

        cutoff = (
            rules.parse_time(baseline_train_until)
            if baseline_train_until is not None
            else rules.training_end(models[0])
        )
        events = rules.read(inputs, reading)
        learnt = rules.history_size(events, cutoff)
        window = rules.scored_labels(label_data, cutoff)
        if learnt == 0:
            console.print(
                f"[yellow]warning[/]: no event before the baseline cutoff {cutoff.isoformat()}: "
                "the rules learn from nothing (set --baseline-train-until)"
            )
        if not window["scenarios"]:
            console.print(
                f"[yellow]warning[/]: no labelled scenario ends after the baseline cutoff "
                f"{cutoff.isoformat()}: nothing to compare (set --baseline-train-until)"
            )
        methods = {n: reports[n][1].incidents for n in names} | rules.run(events, cutoff)
        lines = rules.compare(methods, label_data, cutoff)
        compared = Table(
            title=f"baselines: rules learnt from {learnt:,} events before {cutoff.isoformat()}; "
            f"every method scored on {window['start']} .. {window['end']}",
            title_justify="left",
        )
        compared.add_column("method")
        for col in (
            "variants caught",
            "shapes caught",
            "false alert groups per day",
            "alert groups on benign heavy work",
        ):
            compared.add_column(col, justify="right")
        for method in lines:
            (v, nv), (sh, nsh) = method.variants, method.shapes
            compared.add_row(
                method.method,
                f"{v}/{nv}",
                f"{sh}/{nsh}",
                f"{method.report.false_per_day:.2f}",
                str(method.benign_heavy),
            )
        out.print(compared)
        document["baselines"] = {
            "train_until": cutoff.isoformat(),
            "training_events": learnt,
            "scored_window": {"start": window["start"], "end": window["end"]},
            "methods": {m.method: m.to_dict() for m in lines},
        }
    if json_out is not None:
        json_out.write_bytes(orjson.dumps(document, option=orjson.OPT_INDENT_2))
    failed = []
    for name, (rep, _) in reports.items():
        if min_recall is not None and rep.recall < min_recall:
            failed.append(f"{name}: recall {rep.recall:.2f} < {min_recall:.2f}")
        if max_false_per_day is not None and rep.false_per_day > max_false_per_day:
            failed.append(
                f"{name}: {rep.false_per_day:.2f} false incidents/day > {max_false_per_day:.2f}"
            )
    if failed:
        for line in failed:
            console.print(f"[red]gate not met[/]: {line}")
        raise typer.Exit(1)


# ------------------------------------------------------------------------------------ models
@models_app.command("list")
def models_list(
    root: Annotated[Path, typer.Argument(help="Models root.")] = Path("models"),
) -> None:
    """Every model, its versions, aliases, thresholds and training windows."""
    import json

    from detector.scoring import artefact as store

    table = Table(title=f"models in {root}", title_justify="left")
    for col in ("model", "version", "aliases", "created", "trained on", "threshold", "signed"):
        table.add_column(col)
    for model_dir in sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []:
        alias_map = store.aliases(model_dir)
        for version in store.versions(model_dir):
            meta = json.loads((model_dir / version / "metadata.json").read_text())
            window = meta["training"]["window"]
            table.add_row(
                model_dir.name,
                version,
                ", ".join(a for a, v in alias_map.items() if v == version),
                meta["created_at"][:19],
                f"{window['start'][:10]}..{window['end'][:10]}",
                f"{meta['threshold']['value']:.4f}",
                "yes" if store.signed(model_dir / version) else "no",
            )
    out.print(table)


@models_app.command("promote")
def models_promote(
    name: Annotated[str, typer.Argument(help="Model name (directory under --root).")],
    version: Annotated[str, typer.Argument(help="Version to serve, e.g. v2.")],
    alias: Annotated[str, typer.Option(help="Alias to move.")] = "current",
    root: Annotated[Path, typer.Option(help="Models root.")] = Path("models"),
    signing_key_file: SigningKeyFile = None,
) -> None:
    """Point an alias at a version, atomically, once it loads as the service would load it
    (checksums and every value checked). With a signing key, an unsigned version is signed
    first and the signature must verify."""
    from detector.scoring import artefact as store

    keys = _signing_keys(signing_key_file)
    digest = store.promote(root / name, version, alias, keys=keys, sign_unsigned=True)
    state = "signed" if keys else "signature not checked"
    out.print(f"{name}@{alias} -> {version} (SHA256SUMS {digest}, {state})")


# ------------------------------------------------------------------------------------ serve
config_app = typer.Typer(help="Service configuration.", no_args_is_help=True)
app.add_typer(config_app, name="config")


@app.command()
def serve(
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="TOML config (default: built-in).")
    ] = None,
    stdin: Annotated[
        bool, typer.Option("--stdin", help="Also read events from stdin; exit when it ends.")
    ] = False,
    stdin_format: Annotated[
        str, typer.Option(help="Format of stdin lines: canonical or an audit-log adapter name.")
    ] = "canonical",
) -> None:
    """Watch the sources, score events as they arrive, keep incidents, deliver alerts.

    With no config: reads ./spool, model models/default (its `current` version), state in
    ./var (SQLite), API on 127.0.0.1:8080. Beyond loopback the API needs a write token
    (api.token_file or api.token): without one, serve refuses to start.
    """
    from detector import config as cfg
    from detector import logs
    from detector import serve as server

    settings = cfg.load(config)
    logs.configure(settings.log_level)
    _preflight(settings, stdin_format if stdin else None)
    raise typer.Exit(server.run(settings, stdin_format=stdin_format if stdin else None))


def _preflight(settings: Any, stdin_format: str | None) -> None:
    """Problems that stop the service before it starts, all at once (ConfigError)."""
    from detector import formats
    from detector.errors import ConfigError
    from detector.scoring import artefact as store

    problems = []
    names = [src.format for src in settings.sources] + ([stdin_format] if stdin_format else [])
    for i, name in enumerate(names):
        if name not in formats.FORMATS:
            where = f"sources.{i}.format" if i < len(settings.sources) else "--stdin-format"
            problems.append(
                f"{where}: unknown format {name!r}; valid: {', '.join(formats.FORMATS)}"
            )
    for i, src in enumerate(settings.sources):
        creds = getattr(src, "credentials_file", None)
        if creds is not None and not os.access(creds, os.R_OK):
            problems.append(f"sources.{i}.credentials_file: cannot read {creds}")
    if not settings.store_url.startswith(("sqlite", "postgresql")):
        problems.append("store.url: only sqlite:/// and postgresql+psycopg:// URLs are supported")
    try:
        store.resolve(settings.models_dir / settings.model)
    except ExfilwatchError as exc:
        problems.append(f"model: {exc}")
    if problems:
        raise ConfigError("\n".join([f"{len(problems)} problem(s):", *problems]))


@config_app.command("check")
def config_check(
    file: Annotated[Path, typer.Argument(help="The TOML config file to check.")],
) -> None:
    """Validate a config file and name every error; exit 0 when it is good."""
    from detector import config as cfg

    settings = cfg.load(file)
    _preflight(settings, None)
    table = Table(title=f"{file}: OK")
    table.add_column("setting")
    table.add_column("value")
    table.add_row(
        "api",
        f"{settings.api.host}:{settings.api.port}"
        + (" (token required for writes)" if settings.api.token else ""),
    )
    table.add_row("store", settings.store_url.split("@")[-1])
    table.add_row("model", f"{settings.models_dir / settings.model}")
    for src in settings.sources:
        if isinstance(src, cfg.JetStreamSource):
            where = f"{src.url.split('@')[-1]} stream {src.stream}"
            table.add_row(f"source {src.name}", f"{where} {src.subject or ''} ({src.format})")
        else:
            table.add_row(f"source {src.name}", f"{src.path} ({src.format}, {src.pattern})")
    for sink in settings.sinks:
        table.add_row(f"sink {sink.name}", f"{sink.kind} {sink.url}")
    out.print(table)


def main() -> None:
    """Console entry point: errors print one line and exit 2, never a traceback."""
    try:
        code = app(standalone_mode=False)
        if isinstance(code, int) and code:
            sys.exit(code)
    except ExfilwatchError as exc:
        console.print(f"[red]error:[/] {exc}")
        sys.exit(2)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        console.print("aborted")
        sys.exit(130)
    except Exception as exc:
        # usage errors (unknown option, bad value) know how to show themselves
        show, code = getattr(exc, "show", None), getattr(exc, "exit_code", None)
        if callable(show) and isinstance(code, int):
            show()
            sys.exit(code)
        raise

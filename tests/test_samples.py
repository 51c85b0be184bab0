"""The sample generator: deterministic, canonical, and labelled truthfully."""

from __future__ import annotations

import gzip
import ipaddress
import itertools
import re
from datetime import UTC, date, datetime
from pathlib import Path

import orjson
import polars as pl
import pyarrow.parquet as pq
import pytest
import zstandard

from detector.errors import ConfigError, UnknownNameError
from detector.samples import BENIGN_ACTIVITIES, SCENARIO_NAMES, Labels, generate, write_sample
from detector.schema import EVENT_ARROW_SCHEMA, EVENT_SCHEMA, REQUIRED

Sample = tuple[pl.DataFrame, Labels]
SMALL = 3000  # events per day: fast, yet every habit and scenario appears
DOC_NETS = [ipaddress.ip_network(n) for n in ("203.0.113.0/24", "198.51.100.0/24", "192.0.2.0/24")]


def _ts(text: str) -> datetime:
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)


@pytest.fixture(scope="module")
def weekday_sample() -> Sample:
    """Mon-Wed: the attacks fall on Tuesday and Wednesday."""
    return generate(days=3, seed=11, events_per_day=SMALL)


@pytest.fixture(scope="module")
def weekend_sample() -> Sample:
    """Fri-Sun with 1 February: a billing run, and attacks that must make do with a weekend."""
    return generate(days=3, seed=5, start=date(2026, 1, 30), events_per_day=SMALL)


@pytest.fixture(scope="module", params=["weekday_sample", "weekend_sample"])
def sample(request: pytest.FixtureRequest) -> Sample:
    result: Sample = request.getfixturevalue(request.param)
    return result


def test_same_seed_gives_identical_output_and_another_seed_does_not(
    weekday_sample: Sample,
) -> None:
    frame, labels = weekday_sample
    again, labels_again = generate(days=3, seed=11, events_per_day=SMALL)
    assert frame.equals(again)
    assert labels == labels_again
    other, other_labels = generate(days=3, seed=12, events_per_day=SMALL)
    assert not frame.equals(other)
    assert other_labels["scenarios"][0]["start"] != labels["scenarios"][0]["start"]


def test_written_files_are_byte_identical_for_the_same_seed(tmp_path: Path) -> None:
    def files(out: Path) -> dict[str, bytes]:
        summary = write_sample(
            out, days=1, seed=3, events_per_day=1000, attack_days=1, jsonl_compression="zstd"
        )
        assert summary.events > 0
        assert summary.scenarios == len(SCENARIO_NAMES)
        assert sum(summary.per_principal.values()) == summary.events
        return {p.name: p.read_bytes() for p in (summary.parquet, summary.jsonl, summary.labels)}

    first, second = files(tmp_path / "a"), files(tmp_path / "b")
    assert first == second
    assert set(first) == {"events.parquet", "events.jsonl.zst", "labels.json"}


def test_frame_is_canonical_and_sorted(sample: Sample) -> None:
    frame, labels = sample
    assert frame.schema == EVENT_SCHEMA
    assert frame["event_time"].is_sorted()
    assert labels["events"] == frame.height
    for column in REQUIRED:
        assert frame[column].null_count() == 0, column
    constants = frame.select("source_format", "db_system", "db_instance", "db_name").unique()
    assert constants.rows() == [("canonical", "postgresql", "prod-main", "saas")]
    assert frame["event_time"].min() >= _ts(labels["start"])  # type: ignore[operator]
    assert frame["event_time"].max() < _ts(labels["end"])  # type: ignore[operator]


def test_sessions_start_with_one_login_and_have_unique_ids(sample: Sample) -> None:
    frame, _ = sample
    sessions = frame.group_by("session_id", maintain_order=True).agg(
        pl.col("action").first().alias("first"),
        pl.col("action").is_in(["login", "login_failed"]).sum().alias("logins"),
        pl.col("db_user").n_unique().alias("users"),
        pl.col("client_ip").n_unique().alias("ips"),
    )
    assert frame["session_id"].null_count() == 0
    assert sessions["first"].is_in(["login", "login_failed"]).all()
    assert sessions["logins"].eq(1).all()
    assert sessions["users"].eq(1).all()
    assert sessions["ips"].eq(1).all()
    logins = frame.filter(pl.col("action").is_in(["login", "login_failed"]))
    assert logins["command"].null_count() == logins.height
    assert logins["objects"].null_count() == logins.height


def test_statements_carry_counts_and_failures_carry_none(sample: Sample) -> None:
    frame, _ = sample
    ok = frame.filter(pl.col("success"))
    reads = ok.filter(pl.col("action").is_in(["read", "copy"]))
    writes = ok.filter(pl.col("action") == "write")
    assert reads["rows_returned"].null_count() == 0
    assert reads["rows_affected"].null_count() == reads.height
    assert writes["rows_affected"].null_count() == 0
    assert writes["rows_returned"].null_count() == writes.height
    statements = frame.filter(~pl.col("action").is_in(["login", "login_failed"]))
    assert statements["statement_id"].null_count() == 0
    assert statements["duration_ms"].min() > 0  # type: ignore[operator]
    failed = statements.filter(~pl.col("success"))
    assert failed.height < 0.01 * statements.height
    assert failed["rows_returned"].null_count() == failed.height
    # Literals survive in the text: the redaction downstream has something to do.
    assert frame["statement_text"].str.contains(r"email = '[a-z.0-9]+@[a-z0-9-]+\.example'").any()


def test_every_scenario_is_labelled_once_inside_the_attack_days(sample: Sample) -> None:
    _, labels = sample
    names = [s["scenario"] for s in labels["scenarios"]]
    assert names == list(SCENARIO_NAMES)
    attack_start = _ts(labels["end"]).timestamp() - 2 * 86400
    spans = sorted((_ts(s["start"]), _ts(s["end"])) for s in labels["scenarios"])
    for scenario in labels["scenarios"]:
        assert _ts(scenario["start"]).timestamp() >= attack_start, scenario["scenario"]
        assert _ts(scenario["end"]) < _ts(labels["end"])
    for (_, end), (start, _) in itertools.pairwise(spans):
        assert end < start, "scenarios overlap"


def test_scenario_sessions_occur_with_their_principals_and_addresses(sample: Sample) -> None:
    frame, labels = sample
    for scenario in labels["scenarios"]:
        events = frame.filter(pl.col("session_id").is_in(scenario["sessions"]))
        assert events.height == scenario["events"] > 0
        assert set(events["db_user"]) <= set(scenario["principals"])
        assert scenario["principal"] == scenario["principals"][0]
        logged_in = events.filter(pl.col("action") == "login")
        assert set(logged_in["db_user"]) == {scenario["principal"]}
        assert sorted(set(events["client_ip"])) == scenario["addresses"]
        assert sorted(set(events["client_app"].drop_nulls())) == scenario["client_apps"]
        times = events["event_time"]
        assert times.min() == _ts(scenario["start"])
        assert times.max() == _ts(scenario["end"])
        inside = frame.filter(
            pl.col("event_time").is_between(_ts(scenario["start"]), _ts(scenario["end"])),
            pl.col("session_id").is_in(scenario["sessions"]),
        )
        assert inside.height == scenario["events"]


def test_only_labelled_events_come_from_attacker_addresses(sample: Sample) -> None:
    frame, labels = sample
    labelled = {s for scenario in labels["scenarios"] for s in scenario["sessions"]}
    from_doc_nets = frame.filter(
        pl.col("client_ip").map_elements(
            lambda ip: any(ipaddress.ip_address(ip) in net for net in DOC_NETS),
            return_dtype=pl.Boolean,
        )
    )
    assert from_doc_nets.height > 150
    assert set(from_doc_nets["session_id"]) <= labelled


def test_scenarios_have_the_shapes_described(weekday_sample: Sample) -> None:
    frame, labels = weekday_sample
    by_name = {s["scenario"]: s for s in labels["scenarios"]}

    def events(name: str) -> pl.DataFrame:
        return frame.filter(pl.col("session_id").is_in(by_name[name]["sessions"]))

    dump = events("stolen_app_credentials_dump")
    assert dump["client_app"].unique().to_list() == ["DBeaver 23.2.0"]
    clients_read = dump.filter(pl.col("statement_text") == "SELECT * FROM public.clients")
    clients_total = clients_read["rows_returned"].item()
    assert clients_total >= 600
    theft = events("aggregate_theft").filter(pl.col("action") == "read")
    assert theft.height == 3
    assert theft["rows_returned"].n_unique() == 1
    assert theft["rows_returned"][0] == pytest.approx(clients_total, rel=0.01)  # a day's growth
    assert events("aggregate_theft")["client_app"].unique().to_list() == ["psql"]
    pages = events("slow_pagination").filter(pl.col("action") == "read")
    offsets = pages["statement_text"].str.extract(r"OFFSET (\d+)").cast(pl.Int64)
    assert offsets.to_list() == list(range(0, 200 * pages.height, 200))
    gaps = pages["event_time"].diff().drop_nulls().dt.total_seconds()
    assert (gaps[1:] >= 15).all()
    assert pages["tenant_id"].null_count() == pages.height
    fanout = events("cross_tenant_fanout").filter(pl.col("action") == "read")
    assert 300 <= fanout["tenant_id"].n_unique() == fanout.height <= 500
    spray = events("brute_force_then_login")
    failed = spray.filter(pl.col("action") == "login_failed")
    assert 150 <= failed.height <= 300
    assert failed["db_user"].n_unique() >= 10
    assert failed["client_ip"].n_unique() == 1
    assert str(failed["client_ip"][0]).startswith("192.0.2.")
    copies = events("copy_export").filter(pl.col("action") == "copy")
    assert copies.height == 2
    assert copies["command"].unique().to_list() == ["COPY"]
    night = events("off_hours_insider").filter(
        pl.col("statement_text").str.contains("client_id IN \\(")
    )
    assert 20 <= night.height <= 40
    assert night["rows_returned"].is_between(500, 3000).all()
    assert night["event_time"].dt.hour().is_between(1, 3).all()


def test_benign_heavy_windows_contain_their_principals_events(sample: Sample) -> None:
    frame, labels = sample
    owners = {
        "nightly_backup": "backup",
        "billing_run": "batch_worker",
        "bi_refresh": "bi_service",
        "nightly_aggregation": "batch_worker",
    }
    windows: dict[str, list[tuple[datetime, datetime]]] = {}
    for entry in labels["benign_heavy"]:
        assert entry["activity"] in BENIGN_ACTIVITIES
        assert entry["principal"] == owners[entry["activity"]]
        spans = [(_ts(a), _ts(b)) for a, b in entry["windows"]]
        windows.setdefault(entry["principal"], []).extend(spans)
    for principal, spans in windows.items():
        times = frame.filter(pl.col("db_user") == principal)["event_time"].to_list()
        assert times
        assert all(any(a <= t <= b for a, b in spans) for t in times), principal
    activities = {e["activity"] for e in labels["benign_heavy"]}
    has_first_of_month = frame["event_time"].dt.day().eq(1).any()
    assert ("billing_run" in activities) == has_first_of_month
    assert activities | {"billing_run"} == set(BENIGN_ACTIVITIES)


def test_no_attacks_when_attack_days_is_zero() -> None:
    frame, labels = generate(days=2, seed=11, events_per_day=SMALL, attack_days=0)
    assert labels["scenarios"] == []
    assert frame["client_ip"].str.starts_with("10.").all()
    assert not frame["client_app"].is_in(["DBeaver 23.2.0", "pg_dump"]).any() or set(
        frame.filter(pl.col("client_app") == "pg_dump")["db_user"]
    ) == {"backup"}


def test_app_api_volume_follows_the_day(weekday_sample: Sample) -> None:
    frame, _ = weekday_sample
    hours = frame.filter(pl.col("db_user") == "app_api")["event_time"].dt.hour()
    assert (hours == 14).sum() > 2 * (hours == 3).sum()
    per_user = frame["db_user"].value_counts().sort("count", descending=True)
    assert per_user["db_user"][0] == "app_api"


@pytest.mark.parametrize("compression", [None, "gzip", "zstd"])
def test_jsonl_round_trips_with_the_parquet(tmp_path: Path, compression: str | None) -> None:
    summary = write_sample(
        tmp_path, days=1, seed=2, events_per_day=1000, attack_days=1, jsonl_compression=compression
    )  # type: ignore[arg-type]
    raw = summary.jsonl.read_bytes()
    if compression == "gzip":
        raw = gzip.decompress(raw)
    elif compression == "zstd":
        raw = zstandard.ZstdDecompressor().stream_reader(raw).read()
    records = [orjson.loads(line) for line in raw.splitlines()]
    table = pq.read_table(summary.parquet)
    assert table.schema.equals(EVENT_ARROW_SCHEMA)
    assert len(records) == table.num_rows == summary.events
    parquet = pl.from_arrow(table)
    assert isinstance(parquet, pl.DataFrame)
    first = records[0]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", first["event_time"])
    assert all(value is not None for record in records for value in record.values())
    assert [_ts(r["event_time"]) for r in records] == parquet["event_time"].to_list()
    assert [r.get("session_id") for r in records] == parquet["session_id"].to_list()
    assert [r.get("objects") for r in records] == parquet["objects"].to_list()
    extras = [r["extra"] for r in records if "extra" in r]
    assert extras
    assert all(isinstance(e, dict) and "sqlstate" in e for e in extras)
    labels = orjson.loads(summary.labels.read_bytes())
    assert labels["events"] == len(records)


def test_progress_is_reported_per_day() -> None:
    calls: list[tuple[int, int]] = []
    generate(
        days=2,
        seed=1,
        events_per_day=1000,
        attack_days=0,
        progress=lambda done, total: calls.append((done, total)),
    )
    assert calls == [(1, 2), (2, 2)]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"days": 0},
        {"days": 2, "attack_days": 3},
        {"days": 1, "events_per_day": 10},
        {"days": 1, "start": datetime(2026, 1, 26, tzinfo=UTC)},
    ],
)
def test_bad_arguments_are_rejected(kwargs: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        generate(seed=1, **kwargs)  # type: ignore[arg-type]


def test_unknown_compression_lists_the_valid_ones(tmp_path: Path) -> None:
    with pytest.raises(UnknownNameError, match="gzip"):
        write_sample(tmp_path, days=1, seed=1, jsonl_compression="brotli")  # type: ignore[arg-type]

"""The live service in-process: sources, micro-batches, incidents, restart, model reload."""

from __future__ import annotations

import os
import shutil
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest
import sqlalchemy as sa

from detector import live, pipeline
from detector.features.engine import FeatureEngine
from detector.scoring import artefact
from detector.sinks import store
from detector.sinks import tables as t
from detector.sources.files import read_events
from tests.service_support import (
    all_incidents,
    api,
    metric,
    models_copy,
    running,
    settings_for,
)
from tests.test_delivery_support import add_incident, incident_doc


def _batch_ids(models: Path, events: Path) -> set[str]:
    report = pipeline.score(models / "default", [events], None)
    return {inc["id"] for inc in report.incidents}


def test_spool_parquet_gives_the_incidents_of_batch_scoring(tmp_path: Path, live_sample: Path) -> None:
    models = models_copy(tmp_path)
    settings = settings_for(tmp_path, models)
    with running(settings) as service:
        shutil.copy(live_sample / "events.parquet", tmp_path / "spool" / ".events.parquet.tmp")
        os.replace(tmp_path / "spool" / ".events.parquet.tmp", tmp_path / "spool" / "events.parquet")
        assert service.wait_idle(timeout=120)
        ids = {inc["id"] for inc in all_incidents(service)}
        scored = metric(service, "exfilwatch_events_scored_total")
        outbox = service.store.outbox_rows()
    expected = _batch_ids(models, live_sample / "events.parquet")
    assert scored == pl.read_parquet(live_sample / "events.parquet").height
    assert ids == expected and len(ids) >= 7
    assert outbox == []  # no sink configured: nothing queued


def _lines(sample: Path) -> list[bytes]:
    return (sample / "events.jsonl").read_bytes().splitlines(keepends=True)


def test_tailed_jsonl_survives_partial_lines_rename_rotation_and_copytruncate(
    tmp_path: Path, live_sample: Path
) -> None:
    lines = _lines(live_sample)[:9000]
    models = models_copy(tmp_path)
    settings = settings_for(
        tmp_path, models,
        sources=[{"name": "app", "kind": "directory", "path": str(tmp_path / "logs"),
                  "pattern": "app.jsonl"}],
    )
    logs = tmp_path / "logs"
    logs.mkdir()
    live = logs / "app.jsonl"
    with running(settings) as service:
        # 1: 3000 lines and half of the next one
        with live.open("wb") as fh:
            fh.writelines(lines[:3000])
            fh.write(lines[3000][:40])
        assert service.wait_idle(timeout=60)
        assert metric(service, "exfilwatch_events_scored_total") == 3000
        # 2: the rest of that line and more, then rename rotation: the old file gets a last
        # write after the rename and a new file takes the name (the pattern no longer matches
        # the old one, it is followed by inode)
        with live.open("ab") as fh:
            fh.write(lines[3000][40:])
            fh.writelines(lines[3001:5000])
        live.rename(logs / "app.jsonl.1")
        with (logs / "app.jsonl.1").open("ab") as fh:
            fh.writelines(lines[5000:5500])
        with live.open("wb") as fh:
            fh.writelines(lines[5500:7000])
        assert service.wait_idle(timeout=60)
        assert metric(service, "exfilwatch_events_scored_total") == 7000
        # 3: copytruncate: the file is emptied in place and written again from the start
        with live.open("r+b") as fh:
            fh.truncate(0)
        assert service.wait_idle(timeout=60)
        with live.open("ab") as fh:
            fh.writelines(lines[7000:9000])
        assert service.wait_idle(timeout=60)
        assert metric(service, "exfilwatch_events_scored_total") == 9000
        assert metric(service, "exfilwatch_events_ingested_total",
                      {"source": "app", "format": "canonical"}) == 9000


def test_bad_lines_are_quarantined_and_counted_and_good_ones_kept(tmp_path: Path, live_sample: Path) -> None:
    lines = _lines(live_sample)[:200]
    bad = [b"not json\n", b'{"event_time": "2026-01-14T00:00:00", "db_user": "x", "action": "read"}\n',
           b"\xff\xfe garbage\n", b'{"db_user": "x"}\n']
    body = b"".join(lines[:100] + bad + lines[100:])
    models = models_copy(tmp_path)
    settings = settings_for(tmp_path, models)
    (tmp_path / "spool").mkdir()
    (tmp_path / "spool" / "mixed.jsonl").write_bytes(body)
    with running(settings) as service:
        assert service.wait_idle(timeout=60)
        assert metric(service, "exfilwatch_events_scored_total") == 200
        rejected = sum(
            s.value for m in service.metrics.registry.collect() for s in m.samples
            if s.name == "exfilwatch_events_rejected_total"
        )
        assert rejected == 4
    quarantined = (tmp_path / "var" / "quarantine" / "rejected.jsonl").read_text().splitlines()
    assert len(quarantined) == 4
    assert all("mixed.jsonl:" in q for q in quarantined)


def test_restart_after_a_crash_replays_state_and_continues_exactly(
    tmp_path: Path, live_sample: Path
) -> None:
    """Crash (threads stopped with no final snapshot or drain) mid-stream, restart on the same
    state: the incidents equal batch scoring over the whole stream."""
    lines = _lines(live_sample)
    models = models_copy(tmp_path)
    logs = tmp_path / "spool"
    logs.mkdir()
    (logs / "a.jsonl").write_bytes(b"".join(lines[:12000]))
    settings = settings_for(tmp_path, models)
    with running(settings) as service:
        assert service.wait_idle(timeout=60)
        service.snapshot()  # a snapshot in the middle: restore = snapshot + read-log replay
        (logs / "b.jsonl").write_bytes(b"".join(lines[12000:16000]))
        assert service.wait_idle(timeout=60)
        service.crash_for_tests()
    (logs / "c.jsonl").write_bytes(b"".join(lines[16000:]))
    with running(settings) as service:
        assert service.wait_idle(timeout=60)
        ids = {inc["id"] for inc in all_incidents(service)}
        assert metric(service, "exfilwatch_events_scored_total") == len(lines) - 16000
        live_state = _principal_state(service.scorer.engine)
        live_seen = service.scorer.engine.events_seen_
    whole = tmp_path / "whole.jsonl"
    whole.write_bytes(b"".join(lines))
    assert ids == _batch_ids(models, whole)
    batch = pipeline.Scorer(artefact.load(models / "default"), continue_state=True)
    batch.score(pl.concat(read_events([whole])))
    assert live_seen == batch.engine.events_seen_
    expected = _principal_state(batch.engine)
    assert live_state.keys() == expected.keys()
    for name, row in expected.items():
        np.testing.assert_allclose(live_state[name], row, rtol=1e-9, atol=1e-9, err_msg=name)


def _principal_state(engine: FeatureEngine) -> dict[str, np.ndarray]:
    return {
        name: np.concatenate([engine.state_[i], engine.highs_[i]])
        for name, i in engine.principals_.items()
    }


def test_promoting_a_model_switches_the_running_service(tmp_path: Path) -> None:
    models = models_copy(tmp_path)
    shutil.copytree(models / "default" / "v1", models / "default" / "v2")
    settings = settings_for(tmp_path, models)
    with running(settings) as service, api(service) as client:
        assert client.get("/v1/model").json()["version"] == "v1"
        assert client.post("/v1/model/promote", json={"version": "v2"}).status_code == 200
        deadline = time.monotonic() + 30
        while client.get("/v1/model").json()["version"] != "v2":
            assert time.monotonic() < deadline, "the service did not pick up the promotion"
            time.sleep(0.1)
        assert metric(service, "exfilwatch_model_reloads_total", {"outcome": "success"}) == 1
        assert metric(service, "exfilwatch_model_info",
                      {"name": "default", "version": "v2",
                       "feature_spec": service.scorer.artefact.metadata["feature_spec_hash"][:12]}) == 1
        assert artefact.aliases(models / "default") == {"current": "v2"}
        assert client.post("/v1/model/promote", json={"version": "v9"}).status_code == 400


def test_promotion_through_the_api_needs_a_signature_when_the_service_has_a_key(
    tmp_path: Path,
) -> None:
    key = "k" * 40
    models = models_copy(tmp_path)
    artefact.sign(models / "default" / "v1", [key.encode()])
    shutil.copytree(models / "default" / "v1", models / "default" / "v2")
    (models / "default" / "v2" / "SHA256SUMS.sig").unlink()  # a version nobody signed
    settings = settings_for(tmp_path, models, model_signing_key=key)
    with running(settings) as service, api(service) as client:
        refused = client.post("/v1/model/promote", json={"version": "v2"})
        assert refused.status_code == 400 and "v2" in refused.json()["detail"]
        assert artefact.aliases(models / "default") == {"current": "v1"}
        artefact.sign(models / "default" / "v2", [key.encode()])
        done = client.post("/v1/model/promote", json={"version": "v2"})
        assert done.status_code == 200
        assert done.json()["checksum"] == artefact.checksum(models / "default" / "v2")
        assert artefact.aliases(models / "default") == {"current": "v2"}


def test_postgresql_store_gives_the_same_incidents_and_survives_restart(
    tmp_path: Path, live_sample: Path
) -> None:
    from tests.test_delivery_support import postgres_database

    models = models_copy(tmp_path)
    lines = _lines(live_sample)
    (tmp_path / "spool").mkdir()
    (tmp_path / "spool" / "a.jsonl").write_bytes(b"".join(lines[:15000]))
    with postgres_database() as url:
        settings = settings_for(tmp_path, models, store={"url": url})
        with running(settings) as service:
            assert service.store.engine.dialect.name == "postgresql"
            assert service.wait_idle(timeout=120)
            service.crash_for_tests()
        (tmp_path / "spool" / "b.jsonl").write_bytes(b"".join(lines[15000:]))
        with running(settings) as service:
            assert service.wait_idle(timeout=120)
            ids = {inc["id"] for inc in all_incidents(service)}
            assert metric(service, "exfilwatch_events_scored_total") == len(lines) - 15000
    whole = tmp_path / "whole.jsonl"
    whole.write_bytes(b"".join(lines))
    assert ids == _batch_ids(models, whole)


def test_config_check_names_every_error(tmp_path: Path) -> None:
    from tests.conftest import exfilwatch

    good = tmp_path / "good.toml"
    good.write_text(
        '[api]\nport = 8081\ntoken = "t"\n\n[[sources]]\nname = "pg"\nkind = "directory"\n'
        'path = "/var/log/postgresql"\nformat = "pgaudit-csvlog"\npattern = "*.csv"\n\n'
        '[[sinks]]\nname = "soc"\nkind = "webhook"\nurl = "https://soc.example/hook"\n'
        'secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"\n'
    )
    ok = exfilwatch("config", "check", str(good), cwd=Path(__file__).resolve().parents[1])
    assert ok.returncode == 0, ok.stderr
    assert "OK" in ok.stdout and "pgaudit-csvlog" in ok.stdout
    bad = tmp_path / "bad.toml"
    bad.write_text(
        '[api]\nport = 99999\ncolour = "red"\n\n[[sinks]]\nname = "soc"\nkind = "webhook"\n'
        'url = "https://soc.example/hook"\n\n[[sinks]]\nname = "x"\nkind = "pager"\nurl = "u"\n'
    )
    run = exfilwatch("config", "check", str(bad))
    assert run.returncode == 2
    for needle in ("api.port", "api.colour", "sinks.0.webhook: Value error, a webhook sink needs secret", "sinks.1", "4 error(s)"):
        assert needle in run.stderr, (needle, run.stderr)
    fmt = tmp_path / "fmt.toml"
    fmt.write_text('[[sources]]\nname = "pg"\nkind = "directory"\npath = "x"\nformat = "oracle"\n')
    run = exfilwatch("config", "check", str(fmt), cwd=tmp_path)
    assert run.returncode == 2
    assert "sources.0.format: unknown format 'oracle'" in run.stderr
    assert "model:" in run.stderr  # and no models/ under the working directory
    broken = tmp_path / "broken.toml"
    broken.write_text("[api\n")
    run = exfilwatch("config", "check", str(broken))
    assert run.returncode == 2 and "not valid TOML" in run.stderr and "Traceback" not in run.stderr


def test_environment_overrides_the_config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from detector import config

    path = tmp_path / "c.toml"
    path.write_text('[api]\nport = 8081\ntoken = "from-file"\n')
    monkeypatch.setenv("EXFILWATCH_API__TOKEN", "from-env")
    monkeypatch.setenv("EXFILWATCH_PIPELINE__BATCH_EVENTS", "123")
    loaded = config.load(path)
    assert (loaded.api.port, loaded.api.token, loaded.pipeline.batch_events) == (8081, "from-env", 123)
    monkeypatch.setenv("EXFILWATCH_PIPELINE__BATCH_EVENTS", "zero")
    with pytest.raises(config.ConfigError, match=r"pipeline\.batch_events"):
        config.load(path)


def test_webhook_secrets_come_from_a_file(tmp_path: Path) -> None:
    from detector import config

    secret = tmp_path / "secret"
    secret.write_text("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw whsec_c2VjcmV0LW9mLWEtcm90YXRlZC1lbmRwb2ludC0x\n")
    sink = {"name": "soc", "kind": "webhook", "url": "http://127.0.0.1:9/h", "secret_file": str(secret)}
    loaded = config.Settings(sinks=[sink])
    assert loaded.sinks[0].secrets() == secret.read_text().split()  # type: ignore[union-attr]
    with pytest.raises(ValueError, match="secret or secret_file"):
        config.Settings(sinks=[{k: v for k, v in sink.items() if k != "secret_file"}])
    missing = config.Settings(sinks=[{**sink, "secret_file": str(tmp_path / "nope")}])
    with pytest.raises(config.ConfigError, match="cannot read secret file"):
        missing.sinks[0].secrets()  # type: ignore[union-attr]


def test_idle_incidents_resolve_in_bounded_chunks_each_with_one_alert(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After an incident storm the quiet incidents resolve a chunk per transaction until none
    is left; each gets exactly one incident.resolved alert; a busy one stays open."""

    monkeypatch.setattr(live, "_RESOLVE_CHUNK", 3)
    monkeypatch.setattr(live, "_RESOLVE_EVERY_S", float("inf"))  # only this test resolves
    chunks: list[int] = []
    resolve = store.Tx.resolve_idle

    def counted(self: store.Tx, *args: Any) -> list[dict[str, Any]]:
        docs = resolve(self, *args)
        chunks.append(len(docs))
        return docs

    monkeypatch.setattr(store.Tx, "resolve_idle", counted)
    settings = settings_for(
        tmp_path,
        models_copy(tmp_path),
        incidents={"resolve_after_s": 600},
        sinks=[{"name": "soc", "kind": "webhook", "url": "http://127.0.0.1:9/hook",
                "secret": "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"}],
    )
    with running(settings) as service:
        _resolve_storm(service, chunks)


def _resolve_storm(service: Any, chunks: list[int]) -> None:
    engine = service.store.engine
    quiet_since = datetime.now(UTC) - timedelta(hours=2)
    quiet = [f"inc_q{i}" for i in range(8)]  # two full chunks and a partial one
    for n, incident_id in enumerate(quiet):
        add_incident(engine, incident_doc(incident_id, principal=f"p{n}"), first_seen=quiet_since)
    add_incident(engine, incident_doc("inc_busy", principal="busy"), first_seen=quiet_since)
    with engine.begin() as conn:
        conn.execute(
            t.incidents.update().where(t.incidents.c.id.in_(quiet)).values(updated_at=quiet_since)
        )

    assert service.resolve_idle() == len(quiet)
    assert chunks == [3, 3, 2]
    assert service.resolve_idle() == 0
    with engine.connect() as conn:
        status = dict(conn.execute(sa.select(t.incidents.c.id, t.incidents.c.status)).all())
        kinds = conn.execute(sa.select(t.outbox.c.incident_id, t.outbox.c.kind)).all()
    assert {i for i, s in status.items() if s == "resolved"} == set(quiet)
    assert status["inc_busy"] == "open"
    assert sorted(i for i, kind in kinds if kind == "incident.resolved") == sorted(quiet)


def test_restart_replays_a_whole_file_read_in_many_frames_with_one_pass_over_it(
    tmp_path: Path, live_sample: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Parquet file scored in many small reads, then a crash with no snapshot: the restart
    replays the logged frames in one pass over the file, and the feature state equals batch
    scoring of the file."""
    from detector.sources import directory

    models = models_copy(tmp_path)
    settings = settings_for(tmp_path, models, pipeline={"read_events": 2000})
    sample = live_sample / "events.parquet"
    with running(settings) as service:
        shutil.copy(sample, tmp_path / "spool" / ".events.parquet.tmp")
        os.replace(tmp_path / "spool" / ".events.parquet.tmp", tmp_path / "spool" / "e.parquet")
        assert service.wait_idle(timeout=120)
        service.crash_for_tests()
    passes: list[Path] = []
    read = directory.read_events

    def counted(paths: list[Path], **kwargs: Any) -> Any:
        passes.extend(paths)
        return read(paths, **kwargs)

    monkeypatch.setattr(directory, "read_events", counted)
    with running(settings) as service:
        replayed = service.scorer.engine
        live_state, live_seen = _principal_state(replayed), replayed.events_seen_
    assert [p.name for p in passes] == ["e.parquet"]  # 13 logged reads, one pass
    batch = pipeline.Scorer(artefact.load(models / "default"), continue_state=True)
    batch.score(pl.read_parquet(sample))
    assert live_seen == batch.engine.events_seen_
    expected = _principal_state(batch.engine)
    assert live_state.keys() == expected.keys()
    for name, row in expected.items():
        np.testing.assert_allclose(live_state[name], row, rtol=1e-9, atol=1e-9, err_msg=name)


def _sprays(n_names: int, n_addresses: int, n_places: int) -> pl.DataFrame:
    """Three sprays interleaved, a few minutes after the default model's training window: a
    name spray from three addresses, one principal guessed from many addresses, and one
    principal reading from many addresses."""
    import random

    from detector.testing import make_events

    rows: list[dict[str, Any]] = [
        {"db_user": f"guess{i}", "action": "login_failed", "command": None,
         "client_ip": f"198.51.100.{i % 3 + 1}", "session_id": f"n{i}"}
        for i in range(n_names)
    ]
    rows += [
        {"db_user": "support_3", "action": "login_failed", "command": None,
         "client_ip": f"10.77.{i >> 8}.{i & 255}", "session_id": f"g{i}"}
        for i in range(n_addresses)
    ]
    rows += [
        {"db_user": "support_4", "statement_text": "SELECT * FROM public.clients WHERE id = $1",
         "rows_returned": 1, "client_ip": f"10.88.{i >> 8}.{i & 255}", "session_id": f"r{i}",
         "client_app": "psql"}
        for i in range(n_places)
    ]
    random.Random(5).shuffle(rows)
    return make_events(rows, start=datetime(2026, 1, 14, 10, 0, tzinfo=UTC),
                       step=timedelta(milliseconds=200))


def test_sprays_through_the_service_are_one_incident_each_as_in_batch(tmp_path: Path) -> None:
    """3,000 failed logins with new names from three addresses, 1,000 for one account from
    1,000 addresses and 300 reads of another account from 300 addresses, in micro-batches of
    200: five incidents for the failed logins, the reads' first places apart and the rest in
    one, and one opened alert per incident; batch scoring makes the same incidents."""
    models = models_copy(tmp_path)
    settings = settings_for(
        tmp_path, models, pipeline={"batch_events": 200, "read_events": 200},
        sinks=[{"name": "soc", "kind": "webhook", "url": "http://127.0.0.1:9/hook",
                "secret": "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"}],
    )
    events = _sprays(3_000, 1_000, 300)
    spool = tmp_path / "spool"
    spool.mkdir()
    events.write_parquet(spool / ".sprays.parquet.tmp")
    with running(settings) as service:
        os.replace(spool / ".sprays.parquet.tmp", spool / "sprays.parquet")
        assert service.wait_idle(timeout=120)
        live_docs = all_incidents(service)
        alerts = service.store.outbox_rows("soc")
        batches = metric(service, "exfilwatch_batches_total")
    assert batches >= events.height / 200
    docs = {d["group_key"]: d for d in live_docs}
    for address in ("198.51.100.1", "198.51.100.2", "198.51.100.3"):
        names = docs[f"address:{address}"]
        assert names["events"] == names["principals_count"] == 1_000
        assert len(names["principals"]) == 50 and names["principals"][0].startswith("guess")
    guessed = docs["principal:support_3@*"]
    assert guessed["events"] == guessed["addresses_count"] == 1_000
    assert guessed["principals"] == ["support_3"] and len(guessed["addresses"]) == 50
    places = [k for k in docs if k.startswith("principal:support_4@10.88.")]
    assert len(places) == live.grouping.SPRAY_PLACES
    assert docs["principal:support_4@*"]["addresses_count"] == 300 - live.grouping.SPRAY_PLACES
    assert len(docs) == 4 + live.grouping.SPRAY_PLACES + 1
    opened = sorted(a["incident_id"] for a in alerts if a["kind"] == "incident.opened")
    assert opened == sorted(d["id"] for d in live_docs)
    assert len(alerts) <= 4 * len(live_docs)  # opened, and at most one per severity above
    batch = pipeline.score(models / "default", [spool / "sprays.parquet"], None).incidents
    shown = [{k: v for k, v in d.items() if k not in ("status_changed_at", "status_comment",
                                                       "status_by", "updated_at")}
             for d in live_docs]
    assert sorted(shown, key=lambda d: d["id"]) == sorted(batch, key=lambda d: d["id"])

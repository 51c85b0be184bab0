"""The JetStream source against the NATS server on 127.0.0.1:4222: sequence order, rejects,
positions and replay, subject filters, an unreachable server, and the service resuming exactly
after a crash."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nats
import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from detector.quarantine import Quarantine
from detector.sources.feeders import CanonicalLines
from detector.sources.files import read_events
from detector.sources.jetstream import JetStreamSource, SourceUnavailable, message_events
from tests.pgcluster import free_port
from tests.service_support import all_incidents, metric, models_copy, running, settings_for
from tests.test_deploy_support import wait_for

URL = "nats://127.0.0.1:4222"
COMPARED = ["event_time", "db_user", "client_ip", "action", "statement_text", "rows_returned"]


class Stream:
    """A private stream on the local server, removed afterwards."""

    def __init__(self) -> None:
        self.name = f"EXFILWATCH_TEST_{uuid.uuid4().hex[:10].upper()}"
        self.prefix = self.name.lower()
        self._run(self._create())

    @staticmethod
    def _run(coro: Any) -> Any:
        return asyncio.run(coro)

    async def _js(self) -> tuple[Any, Any]:
        nc = await nats.connect(URL, connect_timeout=2, max_reconnect_attempts=0)
        return nc, nc.jetstream()

    async def _create(self) -> None:
        nc, js = await self._js()
        try:
            await js.add_stream(name=self.name, subjects=[f"{self.prefix}.>"])
        finally:
            await nc.close()

    def publish(self, payloads: list[bytes], subject: str = "a") -> list[int]:
        async def go() -> list[int]:
            nc, js = await self._js()
            try:
                return [
                    (await js.publish(f"{self.prefix}.{subject}", p)).seq for p in payloads
                ]
            finally:
                await nc.close()

        result: list[int] = self._run(go())
        return result

    def _admin(self, call: Any) -> Any:
        async def go() -> Any:
            nc, js = await self._js()
            try:
                return await call(js)
            finally:
                await nc.close()

        return self._run(go())

    def purge(self, keep_from: int | None = None) -> None:
        """Remove every message, or those before sequence ``keep_from``."""
        self._admin(lambda js: js.purge_stream(self.name, seq=keep_from))

    def delete_message(self, seq: int) -> None:
        self._admin(lambda js: js.delete_msg(self.name, seq))

    def delete_consumer(self, name: str) -> None:
        self._admin(lambda js: js.delete_consumer(self.name, name))

    def delete(self) -> None:
        async def go() -> None:
            nc, js = await self._js()
            try:
                await js.delete_stream(self.name)
            finally:
                await nc.close()

        self._run(go())


@pytest.fixture
def stream() -> Iterator[Stream]:
    try:
        made = Stream()
    except Exception as exc:  # no server, or no JetStream on it
        reason = f"no NATS JetStream server at {URL}: {type(exc).__name__}: {exc}"
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true but {reason}")
        pytest.skip(reason)
    try:
        yield made
    finally:
        made.delete()


def connected(name: str, stream: Stream, **kwargs: Any) -> JetStreamSource:
    source = JetStreamSource(name, url=URL, stream=stream.name, **kwargs)
    assert source.wait_connected(10), "cannot connect to the local NATS server"
    return source


def events_of(source: JetStreamSource) -> pl.DataFrame:
    return pl.concat([r.events for r in source.scan()]).select(COMPARED)


def assert_resumes(
    stream: Stream, positions: dict[str, Any], lines: list[bytes], tmp: Path, **kwargs: Any
) -> None:
    """``lines`` published now are exactly what a source resuming at ``positions`` reads."""
    stream.publish(messages(lines, [4]))
    resumed = connected("bus", stream, positions=positions, **kwargs)
    try:
        assert events_of(resumed).equals(expected(lines, tmp))
    finally:
        resumed.close()


def messages(lines: list[bytes], sizes: list[int]) -> list[bytes]:
    """``lines`` cut into messages of the given sizes in turn (cycled)."""
    out, i, k = [], 0, 0
    while i < len(lines):
        n = sizes[k % len(sizes)]
        out.append(b"".join(lines[i : i + n]))
        i, k = i + n, k + 1
    return out


def sample_lines(live_sample: Path, n: int, offset: int = 0) -> list[bytes]:
    return (live_sample / "events.jsonl").read_bytes().splitlines(keepends=True)[offset : offset + n]


def expected(lines: list[bytes], tmp: Path) -> pl.DataFrame:
    path = tmp / f"expected-{uuid.uuid4().hex[:6]}.jsonl"
    path.write_bytes(b"".join(lines))
    return pl.concat(read_events([path])).select(COMPARED)


def test_messages_become_events_in_order_with_rejects_kept_and_positions_resumable(
    stream: Stream, live_sample: Path, tmp_path: Path
) -> None:
    lines = sample_lines(live_sample, 400)
    payloads = messages(lines, [1, 7, 3, 20])
    payloads.insert(5, b"{not json at all\n")  # one bad record between good ones
    seqs = stream.publish(payloads)
    quarantine = Quarantine(tmp_path / "rejected.jsonl")
    rejected: list[int] = []
    source = connected(
        "bus", stream, fetch_messages=16, quarantine=quarantine,
        on_reject=lambda frame: rejected.append(frame.height),
    )
    try:
        reads = list(source.scan())
        assert [r.start["seq"] for r in reads] == [0, *[r.end["seq"] for r in reads[:-1]]]
        assert reads[-1].end["seq"] == seqs[-1]
        got = pl.concat([r.events for r in reads]).select(COMPARED)
        assert got.equals(expected(lines, tmp_path))
        assert sum(rejected) == 1 and sum(r.rejected for r in reads) == 1
        quarantine.close()
        assert "not json" in (tmp_path / "rejected.jsonl").read_text()
        for read in reads:  # the restart replay reads the same events again
            assert source.reread(read.log_entry()).equals(read.events)
        (position,) = source.positions().values()
        assert position["seq"] == seqs[-1] and position["created"]
        assert list(source.scan()) == []
    finally:
        source.close()

    more = sample_lines(live_sample, 50, offset=400)
    assert_resumes(stream, source.positions(), more, tmp_path)


def test_subject_filter_and_starting_at_new_messages(
    stream: Stream, live_sample: Path, tmp_path: Path
) -> None:
    lines = sample_lines(live_sample, 60)
    stream.publish(messages(lines[:20], [1]), subject="db1")
    only_new = connected("bus", stream, start="new")
    filtered = connected("one", stream, subject=f"{stream.prefix}.db2")
    try:
        # what was there before it first connected is skipped; the position is handed over at
        # once, in an empty read, so that a restart before the next message keeps it
        (handed,) = list(only_new.scan())
        assert handed.events.height == 0 and handed.end["seq"] == 20
        stream.publish(messages(lines[20:40], [2]), subject="db2")
        stream.publish(messages(lines[40:], [4]), subject="db1")
        assert events_of(only_new).equals(expected(lines[20:], tmp_path))
        assert events_of(filtered).equals(expected(lines[20:40], tmp_path))
    finally:
        only_new.close()
        filtered.close()


def test_replaying_a_range_the_stream_no_longer_holds_is_reported(
    stream: Stream, live_sample: Path
) -> None:
    stream.publish(messages(sample_lines(live_sample, 30), [3]))
    source = connected("bus", stream)
    try:
        reads = list(source.scan())
        stream.purge()
        with pytest.raises(SourceUnavailable, match="gone"):
            source.reread(reads[0].log_entry())
    finally:
        source.close()


def test_an_unreachable_server_yields_nothing_and_is_reported() -> None:
    status: list[bool] = []
    source = JetStreamSource(
        "bus", url=f"nats://127.0.0.1:{free_port()}", stream="NOPE", on_status=status.append
    )
    try:
        assert not source.wait_connected(5)
        assert status == [False]
        assert list(source.scan()) == []  # never blocks the reader; no second report
        assert status == [False]
    finally:
        source.close()


@settings(max_examples=60, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 9), min_size=1, max_size=6),
    strip=st.lists(st.booleans(), min_size=1, max_size=6),
    start=st.integers(0, 200),
)
def test_any_cut_into_messages_gives_the_events_of_the_whole(
    live_sample: Path, tmp_path_factory: pytest.TempPathFactory, sizes: list[int],
    strip: list[bool], start: int,
) -> None:
    """Records cut into messages in any way, each message's last newline kept or not, parse
    to the events of the same lines read as one file."""
    lines = sample_lines(live_sample, 40, offset=start)
    payloads = messages(lines, sizes)
    payloads = [p.rstrip(b"\n") if strip[i % len(strip)] else p for i, p in enumerate(payloads)]
    parsed = message_events(payloads, CanonicalLines("nats:S:1"))
    assert parsed.rejects.height == 0
    whole = expected(lines, tmp_path_factory.mktemp("cut"))
    assert parsed.events.select(COMPARED).equals(whole)


def test_service_reads_a_stream_and_resumes_exactly_after_a_crash(
    stream: Stream, live_sample: Path, tmp_path: Path
) -> None:
    """Scored from the stream, crashed (no drain, no final snapshot), restarted: every event
    scored once and the incidents those of batch scoring over the whole sample."""
    from detector import pipeline

    lines = (live_sample / "events.jsonl").read_bytes().splitlines(keepends=True)
    models = models_copy(tmp_path)
    source = {"name": "bus", "kind": "nats", "url": URL, "stream": stream.name}
    config = settings_for(tmp_path, models, sources=[source])
    stream.publish(messages(lines[:15000], [50, 13, 200]))
    with running(config) as service:
        assert service.wait_idle(timeout=120)
        assert metric(service, "exfilwatch_source_up", {"source": "bus"}) == 1
        first = metric(service, "exfilwatch_events_scored_total")
        service.crash_for_tests()
    assert first == 15000
    stream.publish(messages(lines[15000:], [50, 13, 200]))
    with running(config) as service:
        assert service.wait_idle(timeout=120)
        assert metric(service, "exfilwatch_events_scored_total") == len(lines) - 15000
        ids = {inc["id"] for inc in all_incidents(service)}
    whole = tmp_path / "whole.jsonl"
    whole.write_bytes(b"".join(lines))
    report = pipeline.score(models / "default", [whole], None)
    assert ids == {inc["id"] for inc in report.incidents} and len(ids) >= 7


def test_config_check_shows_a_stream_source_and_names_its_errors(tmp_path: Path) -> None:
    from tests.conftest import exfilwatch

    repo = Path(__file__).resolve().parents[1]
    good = tmp_path / "good.toml"
    good.write_text(
        '[[sources]]\nname = "bus"\nkind = "nats"\nurl = "nats://app:s3cret@127.0.0.1:4222"\n'
        'stream = "DB_AUDIT"\nsubject = "db.audit.>"\nformat = "pgaudit-jsonlog"\n'
    )
    ok = exfilwatch("config", "check", str(good), cwd=repo)
    assert ok.returncode == 0, ok.stderr
    assert "stream DB_AUDIT" in ok.stdout and "s3cret" not in ok.stdout
    bad = tmp_path / "bad.toml"
    bad.write_text(
        '[[sources]]\nname = "bus"\nkind = "nats"\nstream = "db.audit"\nstart = "middle"\n'
    )
    run = exfilwatch("config", "check", str(bad), cwd=repo)
    assert run.returncode == 2
    assert "sources.0.nats.stream" in run.stderr and "sources.0.nats.start" in run.stderr
    creds = tmp_path / "creds.toml"
    creds.write_text(
        '[[sources]]\nname = "bus"\nkind = "nats"\nstream = "S"\n'
        f'credentials_file = "{tmp_path / "missing.creds"}"\n'
    )
    run = exfilwatch("config", "check", str(creds), cwd=repo)
    assert run.returncode == 2 and "sources.0.credentials_file: cannot read" in run.stderr


def test_replay_of_a_whole_range_after_older_messages_went(
    stream: Stream, live_sample: Path, tmp_path: Path
) -> None:
    """The stream's limits removed messages before a read's first one: its replay still works;
    a message removed from inside a logged range makes the replay fail, never shrink."""
    lines = sample_lines(live_sample, 40)
    stream.publish(messages(lines, [2]))  # sequences 1..20
    stream.purge(keep_from=6)  # 1..5 gone before the source starts
    source = connected("bus", stream, fetch_messages=5)
    try:
        reads = list(source.scan())
        assert reads[0].end["first"] == 6 and len(reads) == 3
        for read in reads:
            assert source.reread(read.log_entry()).equals(read.events)
        stream.delete_message(13)
        with pytest.raises(SourceUnavailable, match="4 messages between 11 and 15, 5 were read"):
            source.reread(reads[1].log_entry())
    finally:
        source.close()


def test_a_consumer_removed_on_the_server_is_replaced_without_losing_messages(
    stream: Stream, live_sample: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from detector.sources import jetstream

    monkeypatch.setattr(jetstream, "_CHECK_S", 0.0)  # check on every idle fetch
    lines = sample_lines(live_sample, 60)
    stream.publish(messages(lines[:30], [3]))
    source = connected("bus", stream)
    try:
        first = events_of(source)
        consumer = source._cname
        assert consumer is not None
        stream.delete_consumer(consumer)
        stream.publish(messages(lines[30:], [3]))
        got = [first]
        for _ in range(5):  # the idle check notices, the next fetch starts a new consumer
            got.extend(r.events.select(COMPARED) for r in source.scan())
        assert pl.concat(got).equals(expected(lines, tmp_path))
        assert source._cname not in (None, consumer)
    finally:
        source.close()


@pytest.fixture
def private_server(tmp_path: Path) -> Iterator[PrivateServer]:
    binary = shutil.which("nats-server") or "/usr/sbin/nats-server"
    if not Path(binary).exists():
        reason = "nats-server is not installed (apt-get install nats-server)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true but {reason}")
        pytest.skip(reason)
    server = PrivateServer(binary, free_port(), tmp_path / "jetstream")
    try:
        server.start()
        yield server
    finally:
        server.stop()


class PrivateServer:
    """A NATS server with JetStream of this test's own, stopped by its own process id."""

    def __init__(self, binary: str, port: int, store: Path) -> None:
        self.binary, self.port, self.store = binary, port, store
        self.url = f"nats://127.0.0.1:{port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [self.binary, "-a", "127.0.0.1", "-p", str(self.port), "-js", "-sd", str(self.store)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for(self._answers, 20, "the private NATS server to answer")

    def _answers(self) -> bool:
        async def probe() -> bool:
            try:
                nc = await nats.connect(self.url, connect_timeout=1, max_reconnect_attempts=1,
                                        reconnect_time_wait=0.1, allow_reconnect=True)
            except Exception:
                return False
            await nc.close()
            return True

        return bool(asyncio.run(probe()))

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        self.proc = None

    def publish(self, stream: str, payloads: list[bytes]) -> None:
        async def go() -> None:
            nc = await nats.connect(self.url, connect_timeout=2)
            js = nc.jetstream()
            try:
                with contextlib.suppress(Exception):
                    await js.add_stream(name=stream, subjects=[f"{stream.lower()}.>"])
                for p in payloads:
                    await js.publish(f"{stream.lower()}.a", p)
            finally:
                await nc.close()

        asyncio.run(go())


def test_a_server_restart_mid_stream_loses_and_repeats_nothing(
    private_server: PrivateServer, live_sample: Path, tmp_path: Path
) -> None:
    """The server is killed while the source is part-way through the stream and started again
    on the same store: the source reconnects by itself, makes a new consumer after the last
    sequence it read, and every event arrives exactly once."""
    lines = sample_lines(live_sample, 300)
    private_server.publish("AUDIT", messages(lines[:200], [2]))
    status: list[bool] = []
    source = JetStreamSource(
        "bus", url=private_server.url, stream="AUDIT", fetch_messages=10, on_status=status.append
    )
    got: list[pl.DataFrame] = []
    try:
        assert source.wait_connected(10)
        reads = source.scan()
        got.extend(next(reads).events.select(COMPARED) for _ in range(3))  # 30 of 100 messages
        reads.close()
        private_server.stop()
        assert list(source.scan()) == []  # the loss is noticed, not waited on
        private_server.start()
        private_server.publish("AUDIT", messages(lines[200:], [2]))

        def caught_up() -> bool:
            got.extend(r.events.select(COMPARED) for r in source.scan())
            return sum(g.height for g in got) >= len(lines)

        wait_for(caught_up, 30, "the source to read the rest after the restart")
        assert pl.concat(got).equals(expected(lines, tmp_path))
        assert status[0] is True and False in status and status[-1] is True
    finally:
        source.close()


def test_start_new_on_an_empty_stream_keeps_its_place_across_a_restart(
    stream: Stream, live_sample: Path, tmp_path: Path
) -> None:
    """start = "new" on an empty stream hands over position 0 at once; committed, it makes a
    restart read what was published while the service was down."""
    lines = sample_lines(live_sample, 20)
    source = connected("bus", stream, start="new")
    try:
        (handed,) = list(source.scan())
        assert handed.events.height == 0 and handed.end["seq"] == 0
    finally:
        source.close()
    # published while "down"
    assert_resumes(stream, {stream.name: handed.end}, lines, tmp_path, start="new")


def test_a_stream_made_again_is_read_from_its_start_and_old_reads_are_not_replayed(
    stream: Stream, live_sample: Path, tmp_path: Path
) -> None:
    lines = sample_lines(live_sample, 40)
    stream.publish(messages(lines[:20], [2]))
    source = connected("bus", stream)
    try:
        reads = list(source.scan())
        saved = source.positions()
    finally:
        source.close()
    stream.delete()
    stream._run(stream._create())  # the same name, made again: sequences start at 1 again
    stream.publish(messages(lines[20:], [2]))
    again = connected("bus", stream, positions=saved)
    try:
        with pytest.raises(SourceUnavailable, match="made again"):
            again.reread(reads[0].log_entry())
        assert events_of(again).equals(expected(lines[20:], tmp_path))
    finally:
        again.close()

"""A NATS JetStream stream as a source: messages read in stream-sequence order.

Each message holds whole records: canonical JSON lines, or lines of an audit-log format (the
same feeders a tailed file uses; a record never spans two messages). The position is the stream
sequence of the last message read, so it commits with the batch that scored it, like a file
offset: a restart resumes after the last committed message, and the restart replay reads the
logged sequence ranges again. Nothing is acknowledged to the server and no durable consumer is
left behind: each connection reads through an ephemeral pull consumer with no acks, starting at
the sequence the service asks for, and the server removes it when the service goes away.

The stream itself (subjects, retention, replicas) is the operator's: this source only reads it.
If a logged range is no longer in the stream when the service replays it (removed by the
stream's limits while the service was down), the replay counts it as missing, as it does a
deleted file.

nats-py is asyncio; the service is threads. The source runs its own event loop in one daemon
thread and the calling thread waits on each call, with a timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable, Coroutine, Iterable, Iterator
from pathlib import Path
from typing import Any, Final, TypeVar

import nats
import polars as pl
import structlog
from nats.errors import Error as NatsError
from nats.errors import TimeoutError as NatsTimeout
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import Error as JetStreamError

from detector import schema
from detector.quarantine import NullQuarantine, Quarantine
from detector.sources import feeders
from detector.sources.directory import Read

log = structlog.get_logger(__name__)

T = TypeVar("T")

#: How long an ephemeral consumer outlives its reader (the server then deletes it).
_INACTIVE_S: Final = 120.0
#: How long one call into the client may take before the source reports the server as away.
_CALL_S: Final = 30.0
#: Between two reconnection attempts when the server cannot be reached.
_RETRY_S: Final = 2.0


def message_events(payloads: Iterable[bytes], feeder: feeders.Feeder) -> feeders.Parsed:
    """The events of a run of messages, each holding whole records: their payloads as one
    block of lines (a payload's last newline may be missing)."""
    body = b"".join(p if p.endswith(b"\n") else p + b"\n" for p in payloads)
    return feeder.feed(body, final=True)


class SourceUnavailable(OSError):
    """The server, the stream or a logged range of it cannot be read."""


class JetStreamSource:
    """Messages of ``stream`` (optionally only those on ``subject``); see the module docstring.

    ``start`` is where a source with no saved position begins: ``all`` (the stream's first
    message) or ``new`` (after the last message when the source first connects).
    """

    def __init__(
        self,
        name: str,
        *,
        url: str,
        stream: str,
        subject: str | None = None,
        start: str = "all",
        make_feeder: Callable[[str, int], feeders.Feeder] | None = None,
        fetch_messages: int = 1000,
        fetch_wait_s: float = 0.1,
        credentials_file: Path | None = None,
        positions: dict[str, dict[str, Any]] | None = None,
        quarantine: Quarantine | None = None,
        on_reject: Callable[[pl.DataFrame], None] | None = None,
        on_status: Callable[[bool], None] | None = None,
    ) -> None:
        if start not in ("all", "new"):
            raise ValueError(f"start must be 'all' or 'new', not {start!r}")
        self.name = name
        self.url = url
        self.stream = stream
        self.subject = subject
        self.start = start
        self.make_feeder = make_feeder or (lambda where, line: feeders.CanonicalLines(where))
        self.fetch_messages = fetch_messages
        self.fetch_wait_s = fetch_wait_s
        self.credentials_file = credentials_file
        self.quarantine = quarantine or NullQuarantine()
        self.on_reject = on_reject
        self.on_status = on_status
        saved = (positions or {}).get(stream)
        self._seq: int | None = int(saved["seq"]) if saved and "seq" in saved else None
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name=f"nats-{name}", daemon=True
        )
        self._thread.start()
        self._nc: Any = None
        self._js: JetStreamContext | None = None
        self._sub: Any = None
        self._sub_next: int | None = None  # the sequence the open consumer delivers next
        self._up: bool | None = None
        self._retry_at = 0.0

    # ------------------------------------------------------------------ plumbing
    def _call(self, coro: Coroutine[Any, Any, T], timeout: float = _CALL_S) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    async def _connect(self) -> JetStreamContext:
        if self._js is not None and self._nc is not None and self._nc.is_connected:
            return self._js
        await self._drop()
        options: dict[str, Any] = {
            "name": f"exfilwatch-{self.name}",
            "connect_timeout": 5,
            "allow_reconnect": True,
            "max_reconnect_attempts": -1,
        }
        if self.credentials_file is not None:
            options["user_credentials"] = str(self.credentials_file)
        self._nc = await nats.connect(self.url, **options)
        self._js = self._nc.jetstream()
        return self._js

    async def _drop(self) -> None:
        sub, nc = self._sub, self._nc
        self._sub, self._sub_next, self._nc, self._js = None, None, None, None
        if sub is not None:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        if nc is not None:
            with contextlib.suppress(Exception):
                await nc.close()

    async def _consumer(self, js: JetStreamContext, first: int) -> Any:
        """An ephemeral pull consumer delivering from sequence ``first``, no acks."""
        config = ConsumerConfig(
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=max(1, first),
            ack_policy=AckPolicy.NONE,
            inactive_threshold=_INACTIVE_S,
            mem_storage=True,
            num_replicas=1,
        )
        subject = self.subject or ""
        return await js.pull_subscribe(subject, stream=self.stream, config=config)

    def _status(self, up: bool, error: str = "") -> None:
        if up != self._up:
            if up:
                log.info("source_connected", source=self.name, stream=self.stream)
            else:
                log.warning("source_unavailable", source=self.name, stream=self.stream, error=error)
            self._up = up
            if self.on_status is not None:
                self.on_status(up)

    # ------------------------------------------------------------------ reading
    async def _fetch(self) -> list[Any]:
        js = await self._connect()
        if self._seq is None:  # first start, nothing saved
            info = await js.stream_info(self.stream)
            self._seq = int(info.state.last_seq) if self.start == "new" else 0
        nxt = self._seq + 1
        if self._sub is None or self._sub_next != nxt:
            if self._sub is not None:
                with contextlib.suppress(Exception):
                    await self._sub.unsubscribe()
            self._sub = await self._consumer(js, nxt)
            self._sub_next = nxt
        try:
            msgs = await self._sub.fetch(self.fetch_messages, timeout=self.fetch_wait_s)
        except (NatsTimeout, TimeoutError):  # nothing new within the wait
            return []
        if msgs:
            self._sub_next = int(msgs[-1].metadata.sequence.stream) + 1
        return list(msgs)

    def scan(self) -> Iterator[Read]:
        """The messages published since the last scan, as one Read per fetch."""
        if time.monotonic() < self._retry_at:
            return
        while True:
            with self._lock:
                try:
                    msgs = self._call(self._fetch())
                except (NatsError, JetStreamError, OSError, TimeoutError) as exc:
                    self._status(False, f"{type(exc).__name__}: {exc}")
                    self._retry_at = time.monotonic() + _RETRY_S
                    with contextlib.suppress(Exception):
                        self._call(self._drop(), timeout=5)
                    return
                self._status(True)
                if not msgs:
                    return
                first = int(msgs[0].metadata.sequence.stream)
                last = int(msgs[-1].metadata.sequence.stream)
                start = {"seq": self._seq}
                events, rejects = self._parse(msgs, first)
                self._seq = last
            if rejects.height:
                self.quarantine.write(rejects)
                if self.on_reject is not None:
                    self.on_reject(rejects)
            yield Read(self.name, self.stream, events, start, {"seq": last}, rejects.height)
            if len(msgs) < self.fetch_messages:
                return

    def _parse(self, msgs: list[Any], first: int) -> tuple[pl.DataFrame, pl.DataFrame]:
        feeder = self.make_feeder(f"nats:{self.stream}:{first}", 1)
        parsed = message_events([m.data for m in msgs], feeder)
        return parsed.events, parsed.rejects

    # ------------------------------------------------------------------ state
    def positions(self) -> dict[str, dict[str, Any]]:
        return {} if self._seq is None else {self.stream: {"seq": self._seq}}

    def forget(self, keys: set[str]) -> None:
        """Nothing to forget: the stream's own limits decide what it keeps."""

    def reread(self, entry: dict[str, Any]) -> pl.DataFrame:
        """The events of a logged read: the messages after ``start`` up to ``end``, parsed as
        they were. Raises :class:`SourceUnavailable` when they are no longer all there."""
        after, last = int(entry["start"]["seq"] or 0), int(entry["end"]["seq"])
        with self._lock:
            try:
                msgs = self._call(self._range(after + 1, last))
            except (NatsError, JetStreamError, OSError, TimeoutError) as exc:
                raise SourceUnavailable(f"{self.stream} {after + 1}..{last}: {exc}") from exc
        if not msgs:
            return schema.empty_events()
        events, _ = self._parse(msgs, int(msgs[0].metadata.sequence.stream))
        return events

    async def _range(self, first: int, last: int) -> list[Any]:
        js = await self._connect()
        info = await js.stream_info(self.stream)
        if int(info.state.first_seq) > first:
            raise SourceUnavailable(
                f"messages from {first} are gone (the stream starts at {info.state.first_seq})"
            )
        sub = await self._consumer(js, first)
        out: list[Any] = []
        try:
            while not out or int(out[-1].metadata.sequence.stream) < last:
                want = min(self.fetch_messages, last - first + 1)
                try:
                    got = await sub.fetch(want, timeout=2.0)
                except NatsTimeout as exc:
                    raise SourceUnavailable(f"messages up to {last} did not come") from exc
                out.extend(m for m in got if int(m.metadata.sequence.stream) <= last)
                if got and int(got[-1].metadata.sequence.stream) >= last:
                    break
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        return out

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._call(self._drop(), timeout=5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

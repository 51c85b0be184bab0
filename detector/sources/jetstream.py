"""A NATS JetStream stream as a source: messages read in stream-sequence order.

Each message holds whole records: canonical JSON lines, or lines of an audit-log format (the
same feeders a tailed file uses; a record never spans two messages). The position is the stream
sequence of the last message read, so it commits with the batch that scored it, like a file
offset: a restart resumes after the last committed message, and the restart replay reads the
logged sequence ranges again. Nothing is acknowledged to the server and no durable consumer is
left behind: the source reads through a pull consumer of its own with no acks, starting at the
sequence after the last one it read, and deletes it when it is done with it (a consumer left
by a crash expires on the server after two idle minutes).

Every doubt is settled by starting over from the last sequence read: a new consumer is made
after any reconnection, after a pause long enough for the server to expire the old one, when the
server no longer knows it, and when its delivery counter skips (a message sent but never
received). A read records its first sequence and its message count, so a replay can tell a
range that is whole from one the stream's limits have cut.

The stream itself (subjects, retention, replicas) is the operator's: this source only reads it.
If a logged range is no longer in the stream when the service replays it (removed by the
stream's limits while the service was down), the replay counts it as missing, as it does a
deleted file.

nats-py is asyncio; the service is threads. The source runs its own event loop in one daemon
thread. Connecting happens in the background, so a server that is away never holds up the
reader thread (and the other sources it serves); reads wait on the loop with a timeout.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import math
import threading
import time
import uuid
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
from nats.js.errors import NotFoundError

from detector import schema
from detector.adapters.base import Parsed
from detector.quarantine import Quarantine
from detector.sources import feeders
from detector.sources.directory import MAX_CHUNK, Read, RoutedQuarantine

log = structlog.get_logger(__name__)

T = TypeVar("T")

#: How long a consumer outlives its reader (the server then deletes it).
_INACTIVE_S: Final = 120.0
#: A consumer idle this long is replaced rather than trusted to still exist.
_STALE_S: Final = _INACTIVE_S / 2
#: How often an idle source asks the server whether its consumer still exists.
_CHECK_S: Final = 10.0
#: How long one call into the client may take.
_CALL_S: Final = 30.0
#: How long one request to the server may take (a silent network must not hold the reader).
_REQUEST_S: Final = 2.0
#: Between two connection attempts when the server cannot be reached.
_RETRY_S: Final = 2.0
_ERRORS: Final = (NatsError, JetStreamError, OSError, TimeoutError)


def message_events(payloads: Iterable[bytes], feeder: feeders.Feeder) -> Parsed:
    """The events of a run of messages, each holding whole records: their payloads as one
    block of lines (a payload's last newline may be missing)."""
    body = b"".join(p if p.endswith(b"\n") else p + b"\n" for p in payloads)
    return feeder.feed(body, final=True)


class SourceUnavailable(OSError):
    """The server, the stream or a logged range of it cannot be read."""


class JetStreamSource:
    """Messages of ``stream`` (optionally only those on ``subject``); see the module docstring.

    ``start`` is where a source with no saved position begins: ``all`` (the stream's first
    message) or ``new`` (after the last message when the source first connects; that position
    is handed over at once as an empty read, so it is committed before anything arrives).
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
        self.servers = [u.strip() for u in url.split(",") if u.strip()]
        self.stream = stream
        self.subject = subject
        self.start = start
        self.make_feeder = make_feeder or (lambda where, line: feeders.CanonicalLines(where))
        self.fetch_messages = fetch_messages
        #: messages asked for per fetch: fetch_messages, fewer when messages are large, so a
        #: read holds about MAX_CHUNK bytes like a stretch of a tailed file
        self._batch = fetch_messages
        self.fetch_wait_s = fetch_wait_s
        self.credentials_file = credentials_file
        self.rejects = RoutedQuarantine(quarantine, on_reject)
        self.on_status = on_status
        saved = (positions or {}).get(stream) or {}
        self._seq: int | None = int(saved["seq"]) if "seq" in saved else None
        #: when the stream was created: sequence numbers of a stream deleted and made again
        #: name other messages, so positions and logged reads carry it
        self._created: str | None = saved.get("created")
        self._closed = False
        self._orphans: list[str] = []  # consumers of dropped connections, deleted later
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name=f"nats-{name}", daemon=True
        )
        self._thread.start()
        self._nc: Any = None
        self._lost = False
        self._js: JetStreamContext | None = None
        self._connecting: concurrent.futures.Future[None] | None = None
        self._connect_lock: asyncio.Lock | None = None  # made on the loop
        self._retry_at = 0.0
        self._up: bool | None = None
        # the live consumer: its name, subscription, the stream sequence it delivers next, the
        # last delivery counter seen, when it last fetched and when it was last checked
        self._cname: str | None = None
        self._sub: Any = None
        self._sub_next = 0
        self._cseq = 0
        self._fetched_at = 0.0
        self._checked_at = 0.0

    # ------------------------------------------------------------------ plumbing
    def _call(self, coro: Coroutine[Any, Any, T], timeout: float = _CALL_S) -> T:
        if self._closed:
            coro.close()
            raise SourceUnavailable(f"source {self.name} is closed")
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise

    def _connected(self) -> bool:
        return self._nc is not None and bool(self._nc.is_connected) and not self._lost

    async def _connect(self) -> None:
        """One short attempt. A connection that drops is never reused (the client's own
        reconnection could carry on a consumer whose deliveries were lost in between): the
        next scan closes it, connects again and starts a new consumer after the last sequence
        read."""
        if self._connect_lock is None:
            self._connect_lock = asyncio.Lock()
        async with self._connect_lock:  # one connection at a time, whoever asks
            if not self._connected():
                await self._open()

    async def _open(self) -> None:
        await self._drop()

        async def lost() -> None:
            self._lost = True

        async def quiet(error: Exception) -> None:  # reported through _status, not printed
            log.debug("nats_client_error", source=self.name, error=str(error))

        options: dict[str, Any] = {
            "name": f"exfilwatch-{self.name}",
            "connect_timeout": 2,
            # one attempt per server: without reconnection allowed the client retries forever
            "allow_reconnect": True,
            "max_reconnect_attempts": 1,
            "reconnect_time_wait": 0.2,
            "disconnected_cb": lost,
            "error_cb": quiet,
        }
        if self.credentials_file is not None:
            options["user_credentials"] = str(self.credentials_file)
        nc = await asyncio.wait_for(nats.connect(self.servers, **options), _CALL_S / 2)
        self._nc, self._js, self._lost = nc, nc.jetstream(), False
        info = await self._stream_info()
        created = getattr(info, "created", None)
        self._check_created(str(created) if created else None)
        orphans, self._orphans = self._orphans, []
        for name in orphans:
            with contextlib.suppress(Exception):
                await self._js.delete_consumer(self.stream, name)

    async def _stream_info(self) -> Any:
        assert self._js is not None
        return await asyncio.wait_for(self._js.stream_info(self.stream), _REQUEST_S)

    def _check_created(self, created: str | None) -> None:
        """A stream made again since the position was saved starts over at its beginning."""
        if created is None:
            return
        if self._created is not None and self._created != created and self._seq is not None:
            log.error(
                "source_stream_recreated",
                source=self.name,
                stream=self.stream,
                was=self._created,
                now=created,
                position=self._seq,
            )
            self._seq = None  # read the new stream as a first start would
        self._created = created

    async def _drop(self) -> None:
        nc = self._nc
        await self._drop_consumer()
        self._nc, self._js = None, None
        if nc is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(nc.close(), _REQUEST_S)

    async def _new_consumer(self, first: int) -> tuple[str, Any]:
        """A pull consumer of our own delivering from sequence ``first``, no acks."""
        assert self._js is not None
        name = f"exfilwatch-{self.name}-{uuid.uuid4().hex[:12]}"
        config = ConsumerConfig(
            name=name,
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=max(1, first),
            ack_policy=AckPolicy.NONE,
            inactive_threshold=_INACTIVE_S,
            mem_storage=True,
            num_replicas=1,
            filter_subject=self.subject,
        )
        await self._js.add_consumer(self.stream, config)
        sub = await self._js.pull_subscribe_bind(consumer=name, stream=self.stream)
        return name, sub

    async def _delete_consumer(self, name: str | None, sub: Any) -> None:
        if sub is not None:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        if name is None:
            return
        if self._js is not None and self._connected():
            try:
                await asyncio.wait_for(self._js.delete_consumer(self.stream, name), _REQUEST_S)
                return
            except Exception as exc:
                log.debug("consumer_not_deleted", source=self.name, consumer=name, error=str(exc))
        self._orphans.append(name)  # over the next connection

    async def _drop_consumer(self) -> None:
        name, sub = self._cname, self._sub
        self._cname, self._sub = None, None
        await self._delete_consumer(name, sub)

    def _status(self, up: bool, error: str = "") -> None:
        if up != self._up:
            if up:
                log.info("source_connected", source=self.name, stream=self.stream)
            else:
                log.warning("source_unavailable", source=self.name, stream=self.stream, error=error)
            self._up = up
            if self.on_status is not None:
                self.on_status(up)

    def _ready(self) -> bool:
        """Whether reading can go ahead now; else start (or check on) a background connect."""
        if self._connected():
            return True
        pending = self._connecting
        if pending is not None:
            if not pending.done():
                return False
            self._connecting = None
            error = pending.exception()
            if error is None:
                return self._connected()
            self._status(False, f"{type(error).__name__}: {error}")
            self._retry_at = time.monotonic() + _RETRY_S
            return False
        if self._up is not None and self._up:
            self._status(False, "connection lost")
        if time.monotonic() >= self._retry_at:
            self._connecting = asyncio.run_coroutine_threadsafe(self._connect(), self._loop)
        return False

    def wait_connected(self, timeout: float) -> bool:
        """Connect now (the reader otherwise connects in the background); whether it worked."""
        deadline = time.monotonic() + timeout
        while not self._ready():
            if time.monotonic() > deadline:
                return False
            pending = self._connecting
            if pending is not None:
                with contextlib.suppress(Exception):
                    pending.result(max(0.0, deadline - time.monotonic()))
            else:
                time.sleep(min(_RETRY_S, max(0.0, deadline - time.monotonic())))
        return True

    # ------------------------------------------------------------------ reading
    async def _first_position(self) -> int:
        assert self._js is not None
        if self.start == "new":
            info = await self._stream_info()
            return int(info.state.last_seq)
        return 0

    async def _fetch(self, after: int) -> list[Any]:
        """Messages after stream sequence ``after``, in order, with none missing."""
        now = time.monotonic()
        stale = self._sub is not None and now - self._fetched_at > _STALE_S
        if self._sub is None or self._sub_next != after + 1 or stale:
            await self._drop_consumer()
            self._cname, self._sub = await self._new_consumer(after + 1)
            self._sub_next, self._cseq, self._checked_at = after + 1, 0, now
        self._fetched_at = now
        try:
            msgs = list(await self._sub.fetch(self._batch, timeout=self.fetch_wait_s))
        except (NatsTimeout, TimeoutError):  # nothing new within the wait
            msgs = []
        if not msgs:
            if now - self._checked_at > _CHECK_S:
                self._checked_at = now
                assert self._js is not None
                try:
                    await self._js.consumer_info(
                        self.stream, self._cname or "", timeout=_REQUEST_S
                    )
                except NotFoundError:  # expired or removed on the server: start again
                    await self._drop_consumer()
            return []
        whole = []
        for m in msgs:  # keep what came in an unbroken run of deliveries
            if int(m.metadata.sequence.consumer) != self._cseq + 1:
                log.warning(
                    "source_delivery_gap",
                    source=self.name,
                    expected=self._cseq + 1,
                    got=int(m.metadata.sequence.consumer),
                )
                await self._drop_consumer()
                break
            self._cseq += 1
            whole.append(m)
        if whole:
            self._sub_next = int(whole[-1].metadata.sequence.stream) + 1
            size = sum(len(m.data) for m in msgs) / len(msgs)
            self._batch = max(1, min(self.fetch_messages, int(MAX_CHUNK / max(size, 1.0))))
        return whole

    def scan(self) -> Iterator[Read]:
        """The messages published since the last scan, one Read per fetch."""
        if self._closed or not self._ready():
            return
        while True:
            with self._lock:
                try:
                    fresh = None
                    if self._seq is None:  # first start, nothing saved
                        self._seq = self._call(self._first_position())
                        if self.start == "new":  # commit where "new" begins, even at 0
                            at = self._position()
                            fresh = Read(self.name, self.stream, schema.empty_events(), at, at)
                    want = self._batch
                    msgs = [] if fresh is not None else self._call(self._fetch(self._seq))
                except _ERRORS as exc:
                    self._status(False, f"{type(exc).__name__}: {exc}")
                    self._retry_at = time.monotonic() + _RETRY_S
                    self._lost = True  # no more requests over this connection
                    with contextlib.suppress(Exception):
                        self._call(self._drop(), timeout=_REQUEST_S * 2)
                    return
                self._status(True)
                if fresh is not None:
                    read = fresh
                elif not msgs:
                    return
                else:
                    read = self._read(msgs)
            yield read
            if fresh is None and len(msgs) < want:
                return

    def _read(self, msgs: list[Any]) -> Read:
        first = int(msgs[0].metadata.sequence.stream)
        last = int(msgs[-1].metadata.sequence.stream)
        events, rejects = self._parse(msgs, first)
        self.rejects.write(rejects)
        start = self._position()
        self._seq = last
        end = {**self._position(), "first": first, "messages": len(msgs)}
        return Read(self.name, self.stream, events, start, end, rejects.height)

    def _parse(self, msgs: list[Any], first: int) -> tuple[pl.DataFrame, pl.DataFrame]:
        feeder = self.make_feeder(f"nats:{self.stream}:{first}", 1)
        parsed = message_events([m.data for m in msgs], feeder)
        return parsed.events, parsed.rejects

    # ------------------------------------------------------------------ state
    def _position(self) -> dict[str, Any]:
        pos: dict[str, Any] = {"seq": self._seq}
        if self._created is not None:
            pos["created"] = self._created
        return pos

    def positions(self) -> dict[str, dict[str, Any]]:
        return {} if self._seq is None else {self.stream: self._position()}

    def forget(self, keys: set[str]) -> None:
        """Nothing to forget: the stream's own limits decide what it keeps."""

    def reread(self, entry: dict[str, Any]) -> pl.DataFrame:
        """The events of a logged read: the same messages, parsed as they were. Raises
        :class:`SourceUnavailable` when they are no longer all in the stream."""
        start, end = entry["start"], entry["end"]
        if "first" not in end:
            if start.get("seq") == end.get("seq"):  # a position handed over, no messages
                return schema.empty_events()
            raise SourceUnavailable(f"{self.stream}: a read logged without its message count")
        first, last, count = int(end["first"]), int(end["seq"]), int(end["messages"])
        if not self._connected() and time.monotonic() < self._retry_at:
            raise SourceUnavailable(f"{self.stream} {first}..{last}: the server is away")
        fetches = math.ceil(count / self.fetch_messages)
        with self._lock:
            try:
                msgs = self._call(
                    self._range(first, last, count, end.get("created")), _CALL_S + 2.0 * fetches
                )
            except _ERRORS as exc:
                if not self._connected():
                    self._retry_at = time.monotonic() + _RETRY_S
                raise SourceUnavailable(f"{self.stream} {first}..{last}: {exc}") from exc
        return self._parse(msgs, first)[0]

    def replay(self, entry: dict[str, Any]) -> Iterator[pl.DataFrame]:
        """:meth:`reread` as the service's restart replay takes it."""
        yield self.reread(entry)

    async def _range(
        self, first: int, last: int, count: int, created: str | None
    ) -> list[Any]:
        await self._connect()
        assert self._js is not None
        info = await self._stream_info()
        if created is not None and self._created is not None and created != self._created:
            raise SourceUnavailable(
                f"the stream was made again since (created {self._created}, logged {created})"
            )
        if int(info.state.first_seq) > first:
            raise SourceUnavailable(
                f"messages from {first} are gone (the stream starts at {info.state.first_seq})"
            )
        name, sub = await self._new_consumer(first)
        out: list[Any] = []
        try:
            while len(out) < count:
                try:
                    got = await sub.fetch(min(self.fetch_messages, count - len(out)), timeout=2.0)
                except NatsTimeout as exc:
                    raise SourceUnavailable(f"messages up to {last} did not come") from exc
                if not got:
                    raise SourceUnavailable(f"messages up to {last} did not come")
                out.extend(m for m in got if int(m.metadata.sequence.stream) <= last)
                if int(got[-1].metadata.sequence.stream) >= last:
                    break
        finally:
            await self._delete_consumer(name, sub)
        seqs = [int(m.metadata.sequence.stream) for m in out]
        if len(out) != count or seqs[0] != first or seqs[-1] != last:
            raise SourceUnavailable(
                f"{len(out)} messages between {first} and {last}, {count} were read then"
            )
        return out

    def close(self) -> None:
        if self._closed:
            return
        with contextlib.suppress(Exception):
            self._call(self._drop(), timeout=_REQUEST_S * 2)

        async def cancel_all() -> None:
            current = asyncio.current_task()
            for task in asyncio.all_tasks():
                if task is not current:
                    task.cancel()

        with contextlib.suppress(Exception):
            self._call(cancel_all(), timeout=5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._closed = True
        self._thread.join(5)
        if not self._thread.is_alive():
            self._loop.close()

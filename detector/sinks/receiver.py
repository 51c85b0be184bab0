"""A real HTTP receiver on loopback for delivery tests: scriptable failures, delays and outages.

It listens on ``127.0.0.1`` on a free port (kept across :meth:`WebhookReceiver.go_down` and
:meth:`WebhookReceiver.come_up`), answers every request with ``Connection: close``, and records
each request with the status it answered (None when it hung up without answering). It runs in
threads of the test process, so it serves a service started as a subprocess just as well.

>>> import httpx
>>> with WebhookReceiver() as rx:
...     rx.fail_next(1, 503, retry_after="7")
...     first = httpx.post(rx.url + "/hook", content=b"{}")
...     second = httpx.post(rx.url + "/hook", content=b"{}")
>>> first.status_code, first.headers["retry-after"], second.status_code
(503, '7', 200)
>>> [r.status for r in rx.requests()]
[503, 200]
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, Self

from detector.sinks.webhook import SignatureError, decode_secret, verify


@dataclass(frozen=True, slots=True)
class Reply:
    """One scripted answer. ``abort`` hangs up without answering (after ``delay``)."""

    status: int = 200
    headers: Mapping[str, str] = field(default_factory=dict)
    body: bytes = b""
    delay: float = 0.0
    abort: bool = False


@dataclass(frozen=True, slots=True)
class ReceivedRequest:
    """One request as received; ``headers`` have lower-case names."""

    method: str
    path: str
    headers: Mapping[str, str]
    body: bytes
    received_at: datetime
    status: int | None
    verified: bool | None

    @property
    def webhook_id(self) -> str | None:
        return self.headers.get("webhook-id")

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300

    def json(self) -> Any:
        return json.loads(self.body)


Responder = Callable[[str, str, Mapping[str, str], bytes], Reply | None]


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], owner: WebhookReceiver) -> None:
        self.owner = owner
        super().__init__(address, _Handler)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        return  # the receiver records requests itself

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("transfer-encoding", "").lower():
            chunks: list[bytes] = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("content-length") or 0))

    def _handle(self) -> None:
        self.close_connection = True
        body = self._read_body()
        owner = self.server.owner
        received_at = datetime.now(UTC)
        headers = {k.lower(): v for k, v in self.headers.items()}
        verified = owner._verify(body, headers)
        if verified is False:
            reply = Reply(401, body=b"bad signature")
        else:
            reply = owner._next_reply(self.command, self.path, headers, body)
        owner._arrive(1)
        try:
            interrupted = reply.delay > 0 and owner._interrupt.wait(reply.delay)
        finally:
            owner._arrive(-1)
        status = None if (reply.abort or interrupted) else reply.status
        owner._record(ReceivedRequest(self.command, self.path, headers, body, received_at,
                                      status, verified))
        if status is None:
            return
        self.send_response(status)
        for name, value in reply.headers.items():
            self.send_header(name, value)
        self.send_header("content-length", str(len(reply.body)))
        self.send_header("connection", "close")
        self.end_headers()
        self.wfile.write(reply.body)

    do_POST = do_PUT = do_GET = _handle  # the stdlib dispatches on do_<METHOD>


class WebhookReceiver:
    """A scriptable loopback HTTP server that records what it receives.

    ``secrets`` (``whsec_...``): when given, each request's Standard Webhooks signature is
    checked; a bad one is answered 401 and recorded with ``verified=False``."""

    def __init__(
        self,
        *,
        secrets: Sequence[str | bytes] = (),
        host: str = "127.0.0.1",
        port: int = 0,
        tolerance: float = 300.0,
    ) -> None:
        self.host = host
        self.port = port
        self.keys = [decode_secret(s) for s in secrets]
        self.tolerance = tolerance
        self.default = Reply()
        self._script: list[Reply] = []
        self._responder: Responder | None = None
        self._in_flight = 0
        self._records: list[ReceivedRequest] = []
        self._changed = threading.Condition()
        self._interrupt = threading.Event()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:40123``; any path is accepted."""
        return f"http://{self.host}:{self.port}"

    @property
    def is_up(self) -> bool:
        return self._server is not None

    def start(self) -> Self:
        """Listen (on the same port as before when coming back up)."""
        if self._server is None:
            self._interrupt.clear()
            self._server = _Server((self.host, self.port), self)
            self.port = self._server.server_address[1]
            self._thread = threading.Thread(
                target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                name=f"receiver-{self.port}", daemon=True)
            self._thread.start()
        return self

    def go_down(self) -> None:
        """Stop listening: new connections are refused, delayed answers are hung up."""
        server, self._server = self._server, None
        self._interrupt.set()
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._thread is not None:
            self._thread.join(5)

    def come_up(self) -> None:
        """Listen again on the same port."""
        self.start()

    def stop(self) -> None:
        self.go_down()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    # -- script ----------------------------------------------------------------------------

    def reply_next(self, *replies: Reply) -> None:
        """Answer the next requests with ``replies``, in order, then with :attr:`default`."""
        with self._changed:
            self._script.extend(replies)

    def fail_next(self, n: int, status: int = 500, *, retry_after: str | float | None = None,
                  delay: float = 0.0) -> None:
        """Answer the next ``n`` requests with ``status`` (and a Retry-After when given)."""
        headers = {} if retry_after is None else {"retry-after": str(retry_after)}
        self.reply_next(*[Reply(status, headers, delay=delay)] * n)

    def delay_next(self, n: int, seconds: float, status: int = 200) -> None:
        """Answer the next ``n`` requests with ``status`` after ``seconds``."""
        self.reply_next(*[Reply(status, delay=seconds)] * n)

    def set_responder(self, responder: Responder | None) -> None:
        """Decide replies by request: ``responder(method, path, headers, body)`` returns a
        :class:`Reply`, or None to fall through to the script and the default."""
        with self._changed:
            self._responder = responder

    def _next_reply(self, method: str, path: str, headers: Mapping[str, str],
                    body: bytes) -> Reply:
        with self._changed:
            responder = self._responder
        if responder is not None:
            reply = responder(method, path, headers, body)
            if reply is not None:
                return reply
        with self._changed:
            return self._script.pop(0) if self._script else self.default

    def _arrive(self, delta: int) -> None:
        with self._changed:
            self._in_flight += delta
            self._changed.notify_all()

    def in_flight(self) -> int:
        """Requests received but not yet answered (held by a delay)."""
        with self._changed:
            return self._in_flight

    def _verify(self, body: bytes, headers: Mapping[str, str]) -> bool | None:
        if not self.keys:
            return None
        try:
            verify(body, headers, self.keys, now=time.time(), tolerance=self.tolerance)
        except SignatureError:
            return False
        return True

    # -- records ---------------------------------------------------------------------------

    def _record(self, request: ReceivedRequest) -> None:
        with self._changed:
            self._records.append(request)
            self._changed.notify_all()

    def requests(self) -> list[ReceivedRequest]:
        """Every request so far, in arrival order."""
        with self._changed:
            return list(self._records)

    def successes(self) -> list[ReceivedRequest]:
        """Requests answered 2xx."""
        return [r for r in self.requests() if r.ok]

    def deliveries_by_id(self) -> dict[str, list[ReceivedRequest]]:
        """Requests grouped by webhook-id (every attempt, whatever it was answered)."""
        out: dict[str, list[ReceivedRequest]] = {}
        for r in self.requests():
            if r.webhook_id is not None:
                out.setdefault(r.webhook_id, []).append(r)
        return out

    def success_counts(self) -> dict[str, int]:
        """How many times each webhook-id was answered 2xx."""
        counts: dict[str, int] = {}
        for r in self.successes():
            if r.webhook_id is not None:
                counts[r.webhook_id] = counts.get(r.webhook_id, 0) + 1
        return counts

    def clear(self) -> None:
        """Forget the records and the script."""
        with self._changed:
            self._records.clear()
            self._script.clear()

    def wait_for(self, condition: Callable[[WebhookReceiver], bool], timeout: float = 10.0) -> bool:
        """Block until ``condition(self)`` holds (re-checked on every request), or the timeout."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while not condition(self):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._changed.wait(min(left, 0.1))
        return True

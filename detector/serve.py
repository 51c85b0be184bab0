"""Run the service: the live pipeline, the API server and the stdin reader, until a signal."""

from __future__ import annotations

import ipaddress
import queue
import signal
import socket
import sys
import threading
import time
from typing import IO, Any

import structlog
import uvicorn

from detector.api.app import create_app
from detector.config import Settings
from detector.errors import ConfigError
from detector.live import Service

log = structlog.get_logger("exfilwatch.serve")

_STDIN_SEGMENT_LINES = 10_000
_STDIN_SEGMENT_S = 0.2


def run(settings: Settings, *, stdin_format: str | None = None) -> int:
    """Serve until SIGTERM/SIGINT (or, with stdin, until stdin ends and all of it is scored).
    Returns the exit code. ConfigError, before anything starts, when the API would listen beyond
    loopback with no write token."""
    check_exposure(settings)
    service = Service(settings, stdin_format=stdin_format)
    service.start()
    sock = socket.socket(socket.AF_INET6 if ":" in settings.api.host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((settings.api.host, settings.api.port))
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        create_app(service),
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=10,
    )
    server = uvicorn.Server(config)
    sock.listen(config.backlog)  # connections wait in the backlog until the server accepts
    if stdin_format is not None:
        threading.Thread(
            target=_pump_stdin, args=(service, sys.stdin.buffer, server), name="stdin", daemon=True
        ).start()
    log.info("api_listening", host=settings.api.host, port=port)
    # The server handles SIGTERM/SIGINT while it runs and re-raises them to the handlers it
    # found when it stops; these make that re-raise a log line instead of an abrupt exit, so
    # the drain below always runs.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _note_signal)
    try:
        server.run(sockets=[sock])
    finally:
        log.info("draining")
        service.stop()
    return 0


def check_exposure(settings: Settings) -> None:
    """Refuse to serve writes to the network unguarded: ConfigError when ``api.host`` is not a
    loopback address and no write token is set. Logs a warning for what stays open otherwise:
    writes on loopback without a token, incident reads beyond loopback without a read token."""
    host = settings.api.host
    write, read = settings.api_token(), settings.api_read_token()
    if not is_loopback(host):
        if write is None:
            raise ConfigError(f"refusing to listen on {host} with no api.token or api.token_file")
        if read is None:
            log.warning(
                "api_reads_open",
                host=host,
                hint="anyone who reaches the port can read incidents: set api.read_token_file",
            )
    elif write is None:
        log.warning(
            "api_writes_open",
            host=host,
            hint="any local process can ingest, give verdicts and promote: set api.token_file",
        )


def is_loopback(host: str) -> bool:
    """Whether ``host`` names only this machine: a loopback address or ``localhost``. Anything
    else (a wildcard such as 0.0.0.0 or ::, an interface address, another name) is not."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _note_signal(signum: int, _frame: Any) -> None:
    log.info("signal_received", signal=signal.Signals(signum).name)


def _pump_stdin(service: Service, stream: IO[bytes], server: Any) -> None:
    """Copy stdin into journal segments (on disk before anything is scored); at the end of
    stdin, wait until everything is committed, then ask the server to stop."""
    incoming: queue.Queue[bytes | None] = queue.Queue(maxsize=_STDIN_SEGMENT_LINES * 4)

    def read() -> None:  # blocking reads in their own thread, so a quiet pipe still flushes
        for line in stream:
            incoming.put(line if line.endswith(b"\n") else line + b"\n")
        incoming.put(None)

    threading.Thread(target=read, name="stdin-read", daemon=True).start()
    lines: list[bytes] = []
    deadline = time.monotonic() + _STDIN_SEGMENT_S
    ended = False
    while not ended:
        try:
            item = incoming.get(timeout=max(0.0, deadline - time.monotonic()))
            if item is None:
                ended = True
            else:
                lines.append(item)
        except queue.Empty:
            pass
        if lines and (ended or len(lines) >= _STDIN_SEGMENT_LINES or time.monotonic() >= deadline):
            service.stdin_journal.write_bytes(b"".join(lines))
            lines = []
        if time.monotonic() >= deadline:
            deadline = time.monotonic() + _STDIN_SEGMENT_S
    service.wait_idle()
    log.info("stdin_finished")
    server.should_exit = True

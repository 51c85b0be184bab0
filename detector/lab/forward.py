"""Per-address TCP forwarders: each simulated role connects from its own 127.x.y.z.

libpq cannot choose its source address, so every address gets a forwarder listening on
127.0.0.1:<free port>; each accepted connection is relayed to the server over a socket bound
to the role's address first (bind, then connect). Every relayed connection is recorded with
its outgoing local port and the tag the driver set before connecting, so the server's
``connection received: host=... port=...`` lines resolve it to its session id afterwards.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class ConnRecord:
    """One relayed connection: who (tag), from where (address, port), when (sim time)."""

    tag: str
    address: str
    port: int
    sim_time: float


class Forwarder:
    """Relays 127.0.0.1:``port`` to ``target`` from ``address``; see the module docstring."""

    def __init__(
        self,
        address: str,
        target: tuple[str, int],
        records: list[ConnRecord],
        lock: threading.Lock,
        clock: Callable[[], float],
    ) -> None:
        self.address = address
        self.target = target
        self.tag = ""
        self._records = records
        self._lock = lock
        self._clock = clock
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self.port: int = self._listener.getsockname()[1]
        self._closed = False
        self._thread = threading.Thread(target=self._accept, name=f"fwd-{address}", daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                inbound, _ = self._listener.accept()
            except OSError:
                return
            try:
                outbound = socket.create_connection(
                    self.target, timeout=10, source_address=(self.address, 0)
                )
            except OSError:
                inbound.close()
                continue
            outbound.settimeout(None)
            port: int = outbound.getsockname()[1]
            with self._lock:
                self._records.append(ConnRecord(self.tag, self.address, port, self._clock()))
            threading.Thread(target=_relay, args=(inbound, outbound), daemon=True).start()

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        self._thread.join(timeout=5)


def _relay(a: socket.socket, b: socket.socket) -> None:
    """Copy bytes both ways until either side closes."""
    peer = {a: b, b: a}
    with selectors.DefaultSelector() as sel:
        sel.register(a, selectors.EVENT_READ)
        sel.register(b, selectors.EVENT_READ)
        try:
            while True:
                for key, _ in sel.select():
                    src: socket.socket = key.fileobj  # type: ignore[assignment]
                    data = src.recv(262144)
                    if not data:
                        return
                    peer[src].sendall(data)
        except OSError:
            return
        finally:
            for sock in (a, b):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()

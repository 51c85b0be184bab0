"""The accelerated clock: libfaketime in the postmaster reads the simulated time from a file.

The server runs with ``LD_PRELOAD`` of libfaketime, ``FAKETIME_TIMESTAMP_FILE`` naming the
file this class rewrites, ``FAKETIME_NO_CACHE=1`` (the file is read on every clock call) and
``FAKETIME_DONT_FAKE_MONOTONIC=1`` (timeouts and latches keep real time). The file holds an
offset from real time in seconds with a fraction (``"-21449627.930182"``), which libfaketime
0.9.10 reads exactly; the server's wall clock then runs on from the simulated instant at real
speed until the next rewrite. :meth:`SimClock.advance_to` only ever moves the clock forward, so
the log's timestamps never go backwards, and idle stretches cost nothing.
"""

from __future__ import annotations

import os
import time
from pathlib import Path


class SimClock:
    """The simulated wall clock shared by the driver and the server."""

    def __init__(self, path: Path, start: float) -> None:
        self.path = path
        self.offset = 0.0
        self.writes = 0
        self._write(start - time.time())

    def now(self) -> float:
        """The simulated time now (epoch seconds), as the server sees it."""
        return time.time() + self.offset

    def advance_to(self, when: float) -> float:
        """Move the clock to ``when`` unless it is already past it; the time now."""
        now = self.now()
        if when <= now:
            return now
        self._write(when - time.time())
        return when

    def environment(self, library: Path, shim: Path | None = None) -> dict[str, str]:
        """The server's environment for this clock; ``shim`` (preloaded first) keeps the
        waits libfaketime wraps from hiding the fake clock from signal handlers (see
        :data:`detector.lab.cluster.WAIT_SHIM_SOURCE`)."""
        return {
            "LD_PRELOAD": f"{shim} {library}" if shim is not None else str(library),
            "FAKETIME_TIMESTAMP_FILE": str(self.path),
            "FAKETIME_NO_CACHE": "1",
            "FAKETIME_DONT_FAKE_MONOTONIC": "1",
        }

    def _write(self, offset: float) -> None:
        # written aside and renamed over: a reader sees the old offset or the new, never half
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(f"{offset:+.6f}\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, self.path)
        self.offset = offset
        self.writes += 1

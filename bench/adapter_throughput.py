"""Parse throughput of every audit-log adapter on one core.

    python bench/adapter_throughput.py [--lines 1000000] [--workdir bench/out]

Writes a synthetic log of ``--lines`` realistic lines per format (detector.adapters.synthetic,
kept in WORKDIR and reused), then times one process feeding it to its adapter in 8 MiB blocks
as read_events does, and prints lines/s. Target: >= 200,000 lines/s for jsonlog and csvlog.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from detector.adapters import make_adapter
from detector.adapters.synthetic import mariadb_log, pg_log

BLOCK = 8 * 1024 * 1024
FORMATS = {
    "pgaudit-jsonlog": (lambda n: pg_log(n, "jsonlog"), {}),
    "pgaudit-csvlog": (lambda n: pg_log(n, "csvlog"), {}),
    "pgaudit-stderr": (lambda n: pg_log(n, "stderr"), {}),
    "mariadb-audit": (lambda n: mariadb_log(n), {"timezone": "UTC"}),
    "mariadb-syslog": (lambda n: mariadb_log(n, syslog=True), {"timezone": "UTC", "year": 2026}),
}


def main() -> None:
    args = argparse.ArgumentParser()
    args.add_argument("--lines", type=int, default=1_000_000)
    args.add_argument("--workdir", default="bench/out")
    opts = args.parse_args()
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # one core
    work = Path(opts.workdir)
    work.mkdir(parents=True, exist_ok=True)
    print(f"{'format':<18}{'lines':>10}{'MiB':>8}{'events':>10}{'seconds':>9}{'lines/s':>11}")
    for name, (make, options) in FORMATS.items():
        path = work / f"adapter-{name}-{opts.lines}.log"
        if not path.exists():
            path.write_bytes(make(opts.lines))
        data = path.read_bytes()
        lines = data.count(b"\n")
        parser = make_adapter(name, location=str(path), **options)
        events = 0
        started = time.perf_counter()
        rest, pos = b"", 0
        while True:
            block = data[pos : pos + BLOCK]
            pos += len(block)
            final = pos >= len(data)
            buffer = rest + block
            parsed = parser.feed(buffer, final=final)
            events += parsed.events.height
            rest = buffer[parsed.consumed :]
            if final:
                break
        seconds = time.perf_counter() - started
        print(
            f"{name:<18}{lines:>10,}{len(data) / 2**20:>8.0f}{events:>10,}"
            f"{seconds:>9.2f}{lines / seconds:>11,.0f}"
        )


if __name__ == "__main__":
    main()

"""A directory of event files: read once, tailed while they grow, followed through rotation.

Each scan stats the directory and hands over :class:`Read` units, each the events of one
contiguous stretch of one file plus the position after it:

* Parquet and compressed JSON lines (``.gz``, ``.zst``) are read whole, in frames of
  ``read_events`` rows; the position counts frames. A file that cannot be read yet (still being
  written) is retried while it changes; once it has been still for ``settle_s`` it is
  quarantined as unreadable. Write such files under a name starting with ``.`` or ending in
  ``.tmp``/``.part`` and rename them into place; those names are never read.
* Everything else is tailed by byte offset through a :mod:`feeder <detector.sources.feeders>`
  (canonical JSON lines or an audit-log adapter), :data:`MAX_CHUNK` bytes at a time. A partial
  last line waits for its newline (or for the file to be still for ``settle_s``); an adapter
  holding back lines it may still merge (within the bounds of :mod:`detector.adapters.base`)
  emits them once the file has been still for a second, or at once when a full read would
  otherwise consume nothing. Only a record longer than a read is skipped, quarantined as
  ``too_large`` at its line. A file is known by device and inode, so a file renamed by
  rotation keeps its position and is read to its end even when its new name no longer matches
  the pattern; a file that shrinks below its position was truncated (copytruncate) and is read
  again from the start; an inode reused for a new file is told apart by the hash of its first
  bytes.

:meth:`DirectorySource.reread` reads a recorded stretch again, for the restart replay.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import polars as pl
import structlog

from detector import schema
from detector.adapters.base import Parsed
from detector.quarantine import NullQuarantine, Quarantine
from detector.sources import feeders
from detector.sources.files import SUPPORTED_SUFFIXES, read_events

log = structlog.get_logger(__name__)

_WHOLE: Final = tuple(s for s in SUPPORTED_SUFFIXES if s.endswith((".gz", ".zst", ".parquet")))
_IGNORED: Final = (".tmp", ".part", ".partial", ".swp")
MAX_CHUNK: Final = 8 * 1024 * 1024
_HEAD: Final = 1024
_IDLE_S: Final = 1.0  # a file this long unchanged: its writer has paused


@dataclass(slots=True)
class Read:
    """Events read from one stretch of one file, and where the source stands after them."""

    source: str
    key: str
    events: pl.DataFrame
    start: dict[str, Any]
    end: dict[str, Any]
    rejected: int = 0

    def log_entry(self) -> dict[str, Any]:
        """What the read log keeps to read the same stretch again."""
        return {"source": self.source, "key": self.key, "start": self.start, "end": self.end}


@dataclass(slots=True)
class _File:
    key: str
    path: Path
    size: int
    mtime: float
    pos: dict[str, Any] = field(default_factory=dict)
    feeder: feeders.Feeder | None = None
    still_since: float | None = None


def _whole(path: Path) -> bool:
    return path.name.endswith(_WHOLE)


def _head_hash(path: Path, length: int) -> str:
    """Hash of the first ``length`` bytes: with the inode, what tells a file from a new one
    that reuses the inode."""
    with path.open("rb") as fh:
        return hashlib.sha256(fh.read(length)).hexdigest()[:16]


def _with_head(pos: dict[str, Any], path: Path, size: int) -> dict[str, Any]:
    """``pos`` with the head taken over as many bytes as there are now (up to _HEAD)."""
    if int(pos.get("head_len", 0)) >= min(size, _HEAD):
        return pos
    length = min(size, _HEAD)
    return {**pos, "head": _head_hash(path, length), "head_len": length}


class DirectorySource:
    """Files under ``path`` matching ``pattern`` (see the module docstring)."""

    def __init__(
        self,
        name: str,
        path: Path,
        *,
        pattern: str = "*",
        make_feeder: Callable[[str, int], feeders.Feeder] | None = None,
        default_tz: str | None = None,
        read_events: int = 10_000,
        settle_s: float = 5.0,
        positions: dict[str, dict[str, Any]] | None = None,
        quarantine: Quarantine | None = None,
        on_reject: Callable[[pl.DataFrame], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self.path = path
        self.pattern = pattern
        self.default_tz = default_tz
        self.make_feeder = make_feeder or (
            lambda where, line: feeders.CanonicalLines(where, line=line, default_tz=default_tz)
        )
        self.read_events = read_events
        self.settle_s = settle_s
        self.rejects = RoutedQuarantine(quarantine, on_reject)
        self.clock = clock
        self._files: dict[str, _File] = {}
        self._saved = dict(positions or {})

    # ------------------------------------------------------------------ scanning
    def scan(self) -> Iterator[Read]:
        """One pass over the directory: every stretch of new data, oldest file first."""
        for f in self._stat_all():
            if f.pos.get("done"):
                continue
            if _whole(f.path):
                yield from self._read_whole(f)
            else:
                yield from self._tail(f)

    def _stat_all(self) -> list[_File]:
        try:
            entries = list(os.scandir(self.path))
        except FileNotFoundError:
            return []
        seen: dict[str, _File] = {}
        for entry in entries:
            name = entry.name
            if name.startswith(".") or name.endswith(_IGNORED) or not entry.is_file():
                continue
            try:
                st = entry.stat()
            except FileNotFoundError:
                continue
            key = f"{st.st_dev}:{st.st_ino}"
            known = self._files.get(key)
            matches = fnmatch.fnmatch(name, self.pattern)
            if not matches and (known is None or known.pos.get("done")):
                continue
            path = Path(entry.path)
            if known is None:
                known = self._adopt(key, path, st.st_size, st.st_mtime)
                if known is None:
                    continue
            known.path, known.size = path, st.st_size
            if st.st_mtime != known.mtime:
                known.mtime, known.still_since = st.st_mtime, None
            seen[key] = known
        self._files = seen
        return sorted(seen.values(), key=lambda f: (f.mtime, f.path.name))

    def _adopt(self, key: str, path: Path, size: int, mtime: float) -> _File | None:
        """A file seen for the first time in this process: resume its saved position when the
        saved head bytes still match (else the inode was reused: start over)."""
        f = _File(key, path, size, mtime)
        saved = self._saved.pop(key, None)
        if saved is not None:
            length = int(saved.get("head_len", 0))
            try:
                same = length <= size and _head_hash(path, length) == saved.get("head")
            except OSError:
                return None
            if same:
                f.pos = saved
                return f
        f.pos = {"path": str(path), "head": _head_hash(path, 0), "head_len": 0}
        f.pos.update({"frames": 0} if _whole(path) else {"offset": 0, "line": 1})
        return f

    # ------------------------------------------------------------------ whole files
    def _read_whole(self, f: _File) -> Iterator[Read]:
        if f.still_since is None:
            f.still_since = self.clock()
        f.pos = _with_head(f.pos, f.path, f.size)
        start_frames = int(f.pos.get("frames", 0))
        frames = read_events(
            [f.path],
            batch_rows=self.read_events,
            quarantine=self.rejects,
            default_tz=self.default_tz,
            on_error="raise",
        )
        k = 0
        try:
            for frame in frames:
                k += 1
                if k <= start_frames:
                    continue
                yield self._read(f, frame, {**f.pos, "frames": k})
        except Exception as exc:
            if self.clock() - f.still_since < self.settle_s:
                return  # probably still being written: try again on a later scan
            log.warning("file_unreadable", source=self.name, path=str(f.path), error=str(exc))
            self.rejects.write_raw(str(f.path), "unreadable_file", str(exc), b"")
        yield self._read(
            f, schema.empty_events(), {**f.pos, "frames": max(k, start_frames), "done": True}
        )

    # ------------------------------------------------------------------ tailing
    def _tail(self, f: _File) -> Iterator[Read]:
        offset = int(f.pos.get("offset", 0))
        if f.size < offset:
            log.warning(
                "file_truncated", source=self.name, path=str(f.path), offset=offset, size=f.size
            )
            f.pos = {**f.pos, "offset": 0, "line": 1, "head": _head_hash(f.path, 0), "head_len": 0}
            f.feeder, offset = None, 0
        if f.size == offset:
            return
        f.pos = _with_head(f.pos, f.path, f.size)
        while offset < f.size:
            now = self.clock()
            if f.still_since is None:
                f.still_since = now
            quiet = now - f.still_since
            data = self._bytes(f.path, offset, min(f.size - offset, MAX_CHUNK))
            if not data:
                return
            last = offset + len(data) >= f.size
            idle = last and quiet >= _IDLE_S
            feeder = self._feeder(f)
            parsed = feeder.feed(data, final=last and quiet >= self.settle_s, idle=idle)
            lines = data.count(b"\n", 0, parsed.consumed)
            if parsed.consumed == 0:
                if len(data) < MAX_CHUNK:
                    return  # a partial last record: wait for the rest
                if not idle:  # the window is full: release what the feeder holds back
                    parsed = feeder.feed(data, idle=True)
                    lines = data.count(b"\n", 0, parsed.consumed)
                if parsed.consumed == 0:  # no record ends in a whole chunk: skip the one
                    parsed, lines = self._skip_overlong(f, data)
            offset += parsed.consumed
            end = {**f.pos, "offset": offset, "line": int(f.pos.get("line", 1)) + lines}
            yield self._read(f, parsed.events, end, parsed.rejects)

    def _skip_overlong(self, f: _File, data: bytes) -> tuple[Parsed, int]:
        """Skip the record that starts the chunk ``data`` and is longer than it: through the
        end of the line it ends on. Returns the skip (one ``too_large`` reject) and how many
        lines it spans."""
        offset = int(f.pos.get("offset", 0))
        skip = len(data)
        lines = data.count(b"\n")
        with f.path.open("rb") as fh:
            fh.seek(offset + skip)
            while True:
                block = fh.read(1 << 20)
                if not block:
                    break
                nl = block.find(b"\n")
                if nl >= 0:
                    skip += nl + 1
                    lines += 1
                    break
                skip += len(block)
        where = f"{f.path}:{f.pos.get('line', 1)}"
        rejects = feeders.rejects_frame(
            [
                {
                    "location": where,
                    "reason": "too_large",
                    "detail": f"record longer than {MAX_CHUNK} bytes",
                    "record": None,
                }
            ]
        )
        f.feeder = None
        return Parsed(schema.empty_events(), rejects, skip), lines

    def _feeder(self, f: _File) -> feeders.Feeder:
        if f.feeder is None:
            f.feeder = self.make_feeder(str(f.path), int(f.pos.get("line", 1)))
        return f.feeder

    @staticmethod
    def _bytes(path: Path, offset: int, size: int) -> bytes:
        """Up to ``size`` bytes at ``offset``; none when the file went away since it was
        listed (renamed by a rotation, deleted): the next scan sees where it went."""
        try:
            with path.open("rb") as fh:
                fh.seek(offset)
                return fh.read(size)
        except FileNotFoundError:
            return b""

    # ------------------------------------------------------------------ common
    def _read(
        self,
        f: _File,
        events: pl.DataFrame,
        end: dict[str, Any],
        rejects: pl.DataFrame | None = None,
    ) -> Read:
        rejected = 0
        if rejects is not None:
            self.rejects.write(rejects)
            rejected = rejects.height
        start, f.pos = f.pos, end
        return Read(self.name, f.key, events, start, end, rejected)

    def positions(self) -> dict[str, dict[str, Any]]:
        """The current position of every file known, by key."""
        out = dict(self._saved)
        out.update({k: f.pos for k, f in self._files.items()})
        return out

    # ------------------------------------------------------------------ replay
    def reread(self, entry: dict[str, Any]) -> pl.DataFrame:
        """The events of a logged read, read again (rejects are not quarantined twice). A file
        that is gone raises FileNotFoundError; the caller counts that."""
        frames = list(self.replay(entry))
        return pl.concat(frames) if frames else schema.empty_events()

    def replay(self, entry: dict[str, Any]) -> Iterator[pl.DataFrame]:
        """:meth:`reread` frame by frame. One pass over a whole file serves a logged stretch
        of many frames (the service joins the adjacent reads of one file), where a read per
        frame would parse the file from its start each time."""
        start, end = entry["start"], entry["end"]
        path = self._locate(entry["key"], Path(end.get("path", start.get("path", ""))))
        if path is None:
            raise FileNotFoundError(end.get("path"))
        if "frames" in end:
            frames = read_events(
                [path], batch_rows=self.read_events, default_tz=self.default_tz, on_error="skip"
            )
            for k, frame in enumerate(frames, start=1):
                if k > int(end["frames"]):
                    break
                if k > int(start.get("frames", 0)):
                    yield frame
            return
        lo, hi = int(start.get("offset", 0)), int(end["offset"])
        if hi < lo:  # the read restarted after a truncation
            lo = 0
        data = self._bytes(path, lo, hi - lo)
        parser = self.make_feeder(str(path), int(start.get("line", 1)))
        yield parser.feed(data, final=True).events

    def _locate(self, key: str, hint: Path) -> Path | None:
        known = self._files.get(key)
        if known is not None:
            return known.path
        try:
            st = hint.stat()
            if f"{st.st_dev}:{st.st_ino}" == key:
                return hint
        except OSError:
            pass
        try:
            for entry in os.scandir(self.path):
                st = entry.stat()
                if f"{st.st_dev}:{st.st_ino}" == key:
                    return Path(entry.path)
        except OSError:
            return None
        return None

    def forget(self, keys: set[str]) -> None:
        for key in keys:
            self._files.pop(key, None)
            self._saved.pop(key, None)

    def close(self) -> None:
        """Nothing is held open between scans."""


class RoutedQuarantine(Quarantine):
    """Quarantine to ``inner`` and report each batch of rejects to ``on_reject`` (the metrics):
    what every source does with the records it cannot take."""

    def __init__(
        self, inner: Quarantine | None, on_reject: Callable[[pl.DataFrame], None] | None
    ) -> None:
        super().__init__(None)
        self._inner = inner or NullQuarantine()
        self._on_reject = on_reject

    def write(self, rejects: pl.DataFrame) -> None:
        if rejects.height == 0:
            return
        self._inner.write(rejects)
        if self._on_reject is not None:
            self._on_reject(rejects)

    def write_raw(self, location: str, reason: str, detail: str, text: str | bytes) -> None:
        self._inner.write_raw(location, reason, detail, text)
        if self._on_reject is not None:
            self._on_reject(
                feeders.rejects_frame(
                    [{"location": location, "reason": reason, "detail": detail, "record": None}]
                )
            )

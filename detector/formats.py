"""Log formats by name: what a tailed file or stdin is parsed with.

``canonical`` is JSON lines in the canonical schema; each audit-log adapter adds its own names.
An unknown name is an error listing the valid ones.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Final

from detector.errors import UnknownNameError
from detector.sources.feeders import CanonicalLines, Feeder

#: make(where, line, default_tz, options) -> Feeder
FeederFactory = Callable[[str, int, str | None, Mapping[str, str]], Feeder]


def _canonical(where: str, line: int, default_tz: str | None, options: Mapping[str, str]) -> Feeder:
    return CanonicalLines(where, line=line, default_tz=default_tz)


def _registry() -> dict[str, FeederFactory]:
    out: dict[str, FeederFactory] = {"canonical": _canonical}
    try:
        from detector import adapters
    except ImportError:
        return out
    registry: Mapping[str, Any] = getattr(adapters, "ADAPTERS", {})
    for name, factory in registry.items():
        out[name] = _adapter(factory)
    return out


def _adapter(factory: Any) -> FeederFactory:
    def make(where: str, line: int, default_tz: str | None, options: Mapping[str, str]) -> Feeder:
        # adapters number lines from 1 in each stream they are given; a resumed stream says so
        location = where if line <= 1 else f"{where} (resumed at line {line})"
        feeder: Feeder = factory(location=location, timezone=default_tz, **dict(options))
        return feeder

    return make


FORMATS: Final[dict[str, FeederFactory]] = _registry()


def factory(name: str) -> FeederFactory:
    """The feeder factory of format ``name``; UnknownNameError lists the valid names."""
    if name not in FORMATS:
        raise UnknownNameError("log format", name, tuple(FORMATS))
    return FORMATS[name]

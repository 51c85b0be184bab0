"""The error hierarchy. One root, a few typed children; imports nothing from the package.

Errors say where and what next: a :class:`Location` renders as ``path:line`` (or
``path:row-group:row`` for Parquet) so a message reads ``... in sample_logs/a.jsonl:1042``.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Location:
    """Where a record came from. ``line`` is 1-based; ``row_group``/``row`` are 0-based."""

    path: str
    line: int | None = None
    row_group: int | None = None
    row: int | None = None

    def __str__(self) -> str:
        if self.line is not None:
            return f"{self.path}:{self.line}"
        if self.row_group is not None and self.row is not None:
            return f"{self.path}:{self.row_group}:{self.row}"
        if self.row is not None:
            return f"{self.path}:row {self.row}"
        return self.path


class ExfilwatchError(Exception):
    """Root of every error exfilwatch raises on purpose."""

    def __init__(self, message: str, *, location: Location | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.location = location

    def __str__(self) -> str:
        if self.location is None:
            return self.message
        return f"{self.message} in {self.location}"


class ConfigError(ExfilwatchError):
    """A setting is missing, malformed or names something unknown."""


class InputError(ExfilwatchError):
    """An input file or stream cannot be read at all (not a single bad record)."""


class ParseError(ExfilwatchError):
    """One record could not be mapped onto the canonical schema."""


class ModelError(ExfilwatchError):
    """A model artefact is missing, corrupt, tampered with or built for other features."""


class UnknownNameError(ConfigError):
    """A name chosen from a registry does not exist; the message lists the valid ones."""

    def __init__(self, kind: str, name: str, valid: list[str] | tuple[str, ...]) -> None:
        super().__init__(f"unknown {kind} {name!r}; valid: {', '.join(sorted(valid))}")
        self.kind = kind
        self.name = name
        self.valid = tuple(valid)

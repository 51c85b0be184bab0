"""Versioned model artefacts: ``models/<name>/<version>/`` plus an alias file per name.

A version directory holds ``model.npz`` (the grouped forests as flat arrays and their
training score distributions, no pickled objects),
``metadata.json`` (feature spec and hash, library versions, training window, score quantiles,
threshold), the feature state at the end of training (``state.npz``, ``state.json``) and
``SHA256SUMS``. Every file is checked against ``SHA256SUMS`` before anything is loaded.
An alias (``current``) is a one-line file naming a version; promotion replaces it atomically.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from detector.errors import ModelError
from detector.scoring.ensemble import Ensemble

FORMAT: Final = "exfilwatch-model/3"
FILES: Final = ("model.npz", "metadata.json", "state.npz", "state.json")
SUMS: Final = "SHA256SUMS"
_VERSION_RE: Final = re.compile(r"^v(\d+)$")
_ALIAS_RE: Final = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")


@dataclass(frozen=True)
class Artefact:
    """A loaded, verified model version."""

    path: Path
    forest: Ensemble
    metadata: dict[str, Any]

    @property
    def threshold(self) -> float:
        return float(self.metadata["threshold"]["value"])

    @property
    def ref(self) -> str:
        return f"{self.metadata['name']}@{self.metadata['version']}"


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def versions(model_dir: Path) -> list[str]:
    """Version names under ``model_dir``, oldest first."""
    if not model_dir.is_dir():
        return []
    found = [
        (int(m.group(1)), p.name)
        for p in model_dir.iterdir()
        if p.is_dir() and (m := _VERSION_RE.match(p.name))
    ]
    return [name for _, name in sorted(found)]


def next_version(model_dir: Path) -> str:
    existing = versions(model_dir)
    last = int(existing[-1][1:]) if existing else 0
    return f"v{last + 1}"


def write_version(
    model_dir: Path, forest: Ensemble, metadata: dict[str, Any], state_writer: Any
) -> Path:
    """Write a new version directory atomically (built aside, then renamed into place)."""
    model_dir.mkdir(parents=True, exist_ok=True)
    version = next_version(model_dir)
    metadata = {**metadata, "format": FORMAT, "name": model_dir.name, "version": version}
    staging = Path(tempfile.mkdtemp(prefix=f".{version}-", dir=model_dir))
    forest.save(staging / "model.npz")
    (staging / "metadata.json").write_text(json.dumps(metadata, indent=2, sort_keys=True) + "\n")
    state_writer(staging)
    lines = [f"{sha256(staging / f)}  {f}\n" for f in FILES]
    (staging / SUMS).write_text("".join(lines))
    target = model_dir / version
    staging.rename(target)
    return target


def verify(version_dir: Path) -> None:
    """Check every file against SHA256SUMS; raise ModelError naming the first mismatch."""
    sums_path = version_dir / SUMS
    try:
        lines = sums_path.read_text().splitlines()
    except OSError as exc:
        raise ModelError(f"no checksums in {version_dir}: {exc}") from exc
    listed: dict[str, str] = {}
    for line in lines:
        digest, sep, name = line.partition("  ")
        if sep:
            listed[name] = digest
    for name in FILES:
        expected = listed.get(name)
        path = version_dir / name
        if expected is None or not path.is_file():
            raise ModelError(f"{path} is missing or not listed in {SUMS}")
        if sha256(path) != expected:
            raise ModelError(
                f"checksum mismatch for {path}: the artefact is corrupt or was "
                "modified; retrain or restore it"
            )


def resolve(ref: str | Path) -> Path:
    """A version directory from ``models/NAME`` (its ``current`` alias), ``models/NAME/vN``,
    or ``models/NAME@ALIAS_OR_VERSION``."""
    text = str(ref)
    base, _, pick = text.partition("@")
    path = Path(base)
    if (path / "metadata.json").is_file() and not pick:
        return path
    if not path.is_dir():
        raise ModelError(f"no model at {path}")
    pick = pick or "current"
    if _VERSION_RE.match(pick):
        if not (path / pick).is_dir():
            raise ModelError(
                f"{path} has no version {pick}; versions: {', '.join(versions(path)) or 'none'}"
            )
        return path / pick
    alias = path / pick
    if not alias.is_file():
        raise ModelError(
            f"{path} has no alias {pick!r}; versions: "
            f"{', '.join(versions(path)) or 'none'} (promote one first)"
        )
    version = alias.read_text().strip()
    if not _VERSION_RE.match(version) or not (path / version).is_dir():
        raise ModelError(f"alias {alias} names {version!r}, which is not a version here")
    return path / version


def load(ref: str | Path) -> Artefact:
    """Resolve, verify checksums, then load. Never unpickles anything."""
    version_dir = resolve(ref)
    verify(version_dir)
    try:
        metadata = json.loads((version_dir / "metadata.json").read_text())
    except ValueError as exc:
        raise ModelError(f"bad metadata in {version_dir}: {exc}") from exc
    if metadata.get("format") != FORMAT:
        raise ModelError(f"{version_dir} is not an {FORMAT} artefact")
    return Artefact(version_dir, Ensemble.load(version_dir / "model.npz"), metadata)


def promote(model_dir: Path, version: str, alias: str = "current") -> Path:
    """Point ``alias`` at ``version`` atomically (write aside, fsync, rename)."""
    if not _ALIAS_RE.match(alias) or _VERSION_RE.match(alias):
        raise ModelError(f"bad alias name {alias!r}")
    target = model_dir / version
    if not _VERSION_RE.match(version) or not target.is_dir():
        raise ModelError(
            f"{model_dir} has no version {version!r}; versions: "
            f"{', '.join(versions(model_dir)) or 'none'}"
        )
    verify(target)
    fd, tmp = tempfile.mkstemp(prefix=f".{alias}-", dir=model_dir)
    with os.fdopen(fd, "w") as fh:
        fh.write(version + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, model_dir / alias)
    return model_dir / alias


def aliases(model_dir: Path) -> dict[str, str]:
    """alias -> version for every alias file in ``model_dir``."""
    out: dict[str, str] = {}
    if model_dir.is_dir():
        for p in model_dir.iterdir():
            if p.is_file() and _ALIAS_RE.match(p.name) and not p.name.startswith("."):
                text = p.read_text().strip()
                if _VERSION_RE.match(text):
                    out[p.name] = text
    return out

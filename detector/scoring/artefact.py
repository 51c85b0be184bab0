"""Versioned model artefacts: ``models/<name>/<version>/`` plus an alias file per name.

A version directory holds ``model.npz`` (the grouped forests as flat arrays and their
training score distributions, no pickled objects),
``metadata.json`` (feature spec and hash, library versions, training window, score quantiles,
threshold), the feature state at the end of training (``state.npz``, ``state.json``) and
``SHA256SUMS``, and, when the version is signed, ``SHA256SUMS.sig`` (see
:mod:`detector.scoring.signing`).

Loading trusts nothing it reads. With signing keys configured the signature must verify first;
then every file is checked against ``SHA256SUMS`` (the model and metadata are parsed from the
very bytes that were hashed), and every value is range-checked: the forests' arrays
(:meth:`Forest.check`), the ensemble's distributions (:meth:`Ensemble.problem`), the threshold
and bands (:meth:`Calibration.from_dict`) and the rest of the metadata the scorer reads; and a
row with every feature at twice its full strength must reach the threshold (a model that
could never alert is refused). A refusal is a :class:`Refused` with a reason from
:data:`REASONS` and the checksum of the version's ``SHA256SUMS``.

An alias (``current``) is a one-line file naming a version; promotion validates the version
as loading does, then replaces the alias atomically.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Final, TypeGuard

import numpy as np

from detector.errors import ModelError
from detector.scoring import signing
from detector.scoring.ensemble import Ensemble
from detector.scoring.threshold import FLOOR, Calibration

FORMAT: Final = "exfilwatch-model/3"
FILES: Final = ("model.npz", "metadata.json", "state.npz", "state.json")
SUMS: Final = "SHA256SUMS"
SIGNATURE: Final = "SHA256SUMS.sig"
#: Why a version is refused: a file does not match SHA256SUMS (or it is missing), no
#: signature while signing keys are configured, a signature that does not verify, a value out
#: of range. The ``reason`` label of ``exfilwatch_model_loads_refused_total``.
REASONS: Final = ("checksum", "unsigned", "signature", "invalid")
#: Files read whole are refused beyond these sizes (the bundled model's are 115 KiB and 12 KiB).
_MAX_BYTES: Final = {
    "model.npz": 256 << 20,
    "metadata.json": 64 << 20,
    SUMS: 64 << 10,
    SIGNATURE: signing.MAX_SIGNATURE_BYTES,
}
#: A row with every feature at this many times its full strength (every signal well past the
#: value at which it is convincing alone) must reach the threshold, or the model could never
#: alert.
CANARY_STRENGTH: Final = 2.0
#: The longest quiet gap an incident may span (grouping.gap_s), one day.
MAX_GAP_S: Final = 86400.0
_VERSION_RE: Final = re.compile(r"^v(\d+)$")
_ALIAS_RE: Final = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")


class Refused(ModelError):
    """A model version that failed verification and was not loaded.

    ``reason`` is one of :data:`REASONS`; ``checksum`` is the SHA-256 of the version's
    ``SHA256SUMS`` (None when it has none), which names exactly which files were refused.
    """

    def __init__(self, message: str, *, version_dir: Path, reason: str, checksum: str | None):
        super().__init__(message)
        self.version_dir = version_dir
        self.reason = reason
        self.checksum = checksum


@dataclass(frozen=True)
class Artefact:
    """A loaded, verified model version; ``checksum`` is the SHA-256 of its SHA256SUMS."""

    path: Path
    forest: Ensemble
    metadata: dict[str, Any]
    checksum: str

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


def checksum(version_dir: Path) -> str | None:
    """SHA-256 of the version's SHA256SUMS (which names every file's), None without one."""
    try:
        return sha256(version_dir / SUMS)
    except OSError:
        return None


def signed(version_dir: Path) -> bool:
    """Whether the version carries a signature (verified only by :func:`load` with keys)."""
    return (version_dir / SIGNATURE).is_file()


def verify(version_dir: Path, *, keys: Sequence[bytes] = ()) -> str:
    """Check the signature (when ``keys`` are given) and every file against SHA256SUMS;
    return the SHA256SUMS checksum. Raises :class:`Refused` naming the first problem."""
    sums = _read_sums(version_dir)
    _verified(version_dir, sums, keys, ())
    return hashlib.sha256(sums).hexdigest()


def _read_sums(version_dir: Path) -> bytes:
    try:
        return _read(version_dir / SUMS)
    except (OSError, ValueError) as exc:
        raise Refused(
            f"no checksums in {version_dir}: {exc}",
            version_dir=version_dir,
            reason="checksum",
            checksum=None,
        ) from exc


def _read(path: Path) -> bytes:
    limit = _MAX_BYTES[path.name]
    with path.open("rb") as fh:
        data = fh.read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"{path} is larger than {limit:,} bytes")
    return data


def _verified(
    version_dir: Path, sums: bytes, keys: Sequence[bytes], parse: Sequence[str]
) -> dict[str, bytes]:
    """Signature, then checksums; the content of the files named in ``parse``, read once, so
    what is parsed is exactly what was hashed."""
    digest = hashlib.sha256(sums).hexdigest()

    def refuse(reason: str, message: str) -> Refused:
        return Refused(message, version_dir=version_dir, reason=reason, checksum=digest)

    if keys:
        sig = version_dir / SIGNATURE
        try:
            text = _read(sig).decode("utf-8", "replace")
        except FileNotFoundError:
            raise refuse(
                "unsigned",
                f"{sig} is missing: model signing is configured, so every version must be "
                "signed (exfilwatch models promote NAME VERSION --signing-key-file FILE)",
            ) from None
        except (OSError, ValueError) as exc:
            raise refuse("signature", f"{sig} cannot be read: {exc}") from exc
        if not signing.matches(text, sums, keys):
            raise refuse(
                "signature",
                f"{sig} does not match {SUMS} under the configured key (signed with another "
                "key, or the files changed after signing)",
            )
    listed: dict[str, str] = {}
    for line in sums.decode("utf-8", "replace").splitlines():
        hexdigest, sep, name = line.partition("  ")
        if sep:
            listed[name] = hexdigest
    contents: dict[str, bytes] = {}
    for name in FILES:
        expected = listed.get(name)
        path = version_dir / name
        if expected is None or not path.is_file():
            raise refuse("checksum", f"{path} is missing or not listed in {SUMS}")
        try:
            if name in parse:
                contents[name] = _read(path)
                actual = hashlib.sha256(contents[name]).hexdigest()
            else:
                actual = sha256(path)
        except (OSError, ValueError) as exc:
            raise refuse("invalid", f"cannot read {path}: {exc}") from exc
        if actual != expected:
            raise refuse(
                "checksum",
                f"checksum mismatch for {path}: the artefact is corrupt or was "
                "modified; retrain or restore it",
            )
    return contents


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


def load(ref: str | Path, *, keys: Sequence[bytes] = ()) -> Artefact:
    """Resolve, verify (the signature when ``keys`` are given, then checksums), load and
    range-check. Never unpickles anything. Raises :class:`Refused`, or ModelError when
    ``ref`` names no version."""
    version_dir = resolve(ref)
    sums = _read_sums(version_dir)
    digest = hashlib.sha256(sums).hexdigest()
    contents = _verified(version_dir, sums, keys, ("model.npz", "metadata.json"))
    where = version_dir / "metadata.json"
    try:
        try:
            metadata = json.loads(contents["metadata.json"])
        except (ValueError, RecursionError) as exc:
            raise ModelError(f"bad metadata in {version_dir}: {exc}") from exc
        if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
            raise ModelError(f"{version_dir} is not an {FORMAT} artefact")
        forest = Ensemble.load(version_dir / "model.npz", contents["model.npz"])
        try:
            check_metadata(metadata, forest)
        except (ValueError, TypeError, KeyError, IndexError) as exc:
            raise ModelError(f"{where}: {exc} (corrupt or tampered artefact)") from exc
    except ModelError as exc:
        raise Refused(str(exc), version_dir=version_dir, reason="invalid", checksum=digest) from exc
    return Artefact(version_dir, forest, metadata, digest)


def check_metadata(metadata: dict[str, Any], forest: Ensemble) -> None:
    """Refuse (ValueError naming the field) metadata the scorer could not use safely, or that
    disagrees with the forests it describes, or a threshold the model could never reach."""
    for key in ("name", "version", "feature_spec_hash"):
        if not isinstance(metadata.get(key), str) or not metadata[key]:
            raise ValueError(f"{key} is not a name")
    created = metadata.get("created_at")
    if not isinstance(created, str) or datetime.fromisoformat(created).tzinfo is None:
        raise ValueError(f"created_at {created!r} is not a timestamp with a time zone")
    if not isinstance(_table(metadata, "feature_spec").get("settings"), dict):
        raise ValueError("feature_spec.settings is not a table")
    features = metadata.get("features")
    if (
        not isinstance(features, list)
        or not all(isinstance(f, str) for f in features)
        or len(set(features)) != len(features)
        or len(features) != forest.n_features
    ):
        raise ValueError(f"features must be {forest.n_features} distinct names, one per column")
    fitted = {
        name: [features[c] for c in cols]
        for name, cols in zip(forest.names, forest.columns, strict=True)
    }
    if _table(metadata, "forest", "groups") != fitted:
        raise ValueError("forest.groups does not name the columns the forests were fitted on")
    stats = _table(metadata, "feature_stats")
    if set(stats) != set(features):
        raise ValueError("feature_stats must describe every feature and nothing else")
    for name, st in stats.items():
        median, p99, spread = (st.get(k) if isinstance(st, dict) else None for k in _STATS)
        if not (_finite(median) and _finite(p99) and _finite(spread) and spread > 0):
            raise ValueError(f"feature_stats.{name} needs a finite median and p99, spread > 0")
    gap = _table(metadata, "grouping").get("gap_s")
    if not _finite(gap) or not 0 < gap <= MAX_GAP_S:
        raise ValueError(f"grouping.gap_s is {gap!r}; it must lie in (0, {MAX_GAP_S:g}] seconds")
    habitual = metadata.get("habitual") or []
    if not isinstance(habitual, list) or not all(
        isinstance(h, list) and len(h) == 4 and all(isinstance(v, str) for v in h) for h in habitual
    ):
        raise ValueError("habitual must be a list of (principal, address, client, shape)")
    cal = Calibration.from_dict(metadata.get("threshold"))
    heldback = _table(metadata, "score_quantiles_heldback")
    if "max" not in heldback or not all(_finite(v) and v >= 0 for v in heldback.values()):
        raise ValueError("score_quantiles_heldback must hold finite scores, max among them")
    top = float(heldback["max"])
    if any(v > top for v in heldback.values()):
        raise ValueError("score_quantiles_heldback has a quantile above its max")
    if cal.value > np.nextafter(max(FLOOR, top), np.inf):
        raise ValueError(
            f"threshold.value {cal.value} is above every held-back score (at most {top}), "
            "where calibration never puts it"
        )
    strongest = float(forest.score(CANARY_STRENGTH * forest.full[None, :])[0])
    if not strongest >= cal.value:
        raise ValueError(
            f"a row with every feature at {CANARY_STRENGTH:g} times full strength scores "
            f"{strongest:.3f}, below the threshold {cal.value:.3f}: this model could never alert"
        )


def _table(metadata: dict[str, Any], *path: str) -> dict[str, Any]:
    value: Any = metadata
    for key in path:
        value = value.get(key) if isinstance(value, dict) else None
    if not isinstance(value, dict):
        raise ValueError(f"{'.'.join(path)} is not a table")
    return value


_STATS: Final = ("median", "p99", "spread")


def _finite(value: Any) -> TypeGuard[float]:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def sign(version_dir: Path, keys: Sequence[bytes]) -> str:
    """Sign the version with ``keys[0]`` once it validates as :func:`load` validates; a
    version already signed under one of ``keys`` is left as it is, and one signed under
    another key is refused (delete its SHA256SUMS.sig to sign it afresh). Returns the
    SHA256SUMS checksum."""
    if not keys:
        raise ModelError("signing needs a key")
    if signed(version_dir):
        return load(version_dir, keys=keys).checksum
    art = load(version_dir)
    sums = _read_sums(version_dir)
    if hashlib.sha256(sums).hexdigest() != art.checksum:
        raise ModelError(f"{version_dir / SUMS} changed while it was being signed")
    _write_atomically(version_dir, SIGNATURE, signing.signature(sums, keys[0]))
    return art.checksum


def promote(
    model_dir: Path,
    version: str,
    alias: str = "current",
    *,
    keys: Sequence[bytes] = (),
    sign_unsigned: bool = False,
) -> str:
    """Point ``alias`` at ``version`` atomically (write aside, fsync, rename), once the
    version loads as the service would load it: signed under one of ``keys`` when they are
    given (with ``sign_unsigned``, an unsigned version is signed first, see :func:`sign`).
    Returns the version's SHA256SUMS checksum."""
    if not _ALIAS_RE.match(alias) or _VERSION_RE.match(alias):
        raise ModelError(f"bad alias name {alias!r}")
    target = model_dir / version
    if not _VERSION_RE.match(version) or not target.is_dir():
        raise ModelError(
            f"{model_dir} has no version {version!r}; versions: "
            f"{', '.join(versions(model_dir)) or 'none'}"
        )
    if keys and sign_unsigned:
        sign(target, keys)
    art = load(target, keys=keys)
    _write_atomically(model_dir, alias, version + "\n")
    return art.checksum


def _write_atomically(directory: Path, name: str, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{name}-", dir=directory)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, directory / name)


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

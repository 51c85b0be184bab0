"""The repository holds nothing that runs code when loaded: no numba cache (its index is a
pickle), no pickle by name or by content, and every committed array archive loads with
pickling disabled."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
#: numba's cache index and compiled code, pickles, and what Python caches beside the sources.
SERIALISED_SUFFIXES = (".nbi", ".nbc", ".pkl", ".pickle", ".joblib", ".pyc")
#: How a pickle of protocol 2 to 5 begins (PROTO opcode, then the protocol number).
PICKLE_HEADS = tuple(bytes([0x80, proto]) for proto in (2, 3, 4, 5))


def tracked() -> list[Path]:
    git = shutil.which("git")
    if git is None:
        pytest.skip("git is not installed")
    run = subprocess.run([git, "ls-files", "-z"], cwd=ROOT, capture_output=True, check=False)
    if run.returncode != 0:
        pytest.skip("not a git checkout")
    return [ROOT / name for name in run.stdout.decode().split("\0") if name]


def serialised(paths: list[Path]) -> list[Path]:
    """The paths that are caches or pickles, by name or by their first bytes."""
    found = []
    for path in paths:
        head = path.open("rb").read(2) if path.is_file() else b""
        if (
            path.suffix in SERIALISED_SUFFIXES
            or "__pycache__" in path.parts
            or head in PICKLE_HEADS
        ):
            found.append(path)
    return found


def test_the_check_finds_numba_caches_and_pickles(tmp_path: Path) -> None:
    cache = tmp_path / "detector" / "__pycache__" / "kernel.run-554.py311.nbi"
    cache.parent.mkdir(parents=True)
    cache.write_bytes(b"\x80\x04K\x01.")
    disguised = tmp_path / "state.bin"
    disguised.write_bytes(b"\x80\x05\x95\x00.")  # a pickle under another name
    plain = tmp_path / "labels.json"
    plain.write_text("{}")
    assert serialised([cache, disguised, plain]) == [cache, disguised]


def test_no_tracked_file_is_a_numba_cache_or_a_pickle() -> None:
    files = tracked()
    assert any(p.name == "model.npz" for p in files)  # the listing is the real one
    assert serialised(files) == []


def test_every_tracked_array_archive_loads_with_pickling_disabled() -> None:
    archives = [p for p in tracked() if p.suffix == ".npz" and p.is_file()]
    assert archives
    for path in archives:
        with np.load(path, allow_pickle=False) as z:
            for name in z.files:
                assert z[name].dtype != object, f"{path}:{name}"

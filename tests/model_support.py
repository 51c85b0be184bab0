"""What the model tests share: a private copy of the shipped model, a forger that edits a
version and recomputes its SHA256SUMS (as anyone who can write the model directory could),
and complete metadata for a freshly fitted ensemble."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from detector.features.engine import MODEL_FEATURES
from detector.scoring import artefact as store
from detector.scoring.ensemble import Ensemble
from detector.scoring.threshold import Calibration

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "models" / "default" / "v1"

Metadata = dict[str, Any]
Arrays = dict[str, np.ndarray]


def shipped_copy(tmp: Path, versions: int = 1) -> Path:
    """``tmp/models/default`` holding the shipped v1 as v1..vN, ``current`` naming v1."""
    model_dir = tmp / "models" / "default"
    model_dir.mkdir(parents=True)
    for n in range(1, versions + 1):
        shutil.copytree(SHIPPED, model_dir / f"v{n}")
    (model_dir / "current").write_text("v1\n")
    return model_dir


def forge(
    version_dir: Path,
    *,
    metadata: Callable[[Metadata], None] | None = None,
    arrays: Callable[[Arrays], None] | None = None,
) -> str:
    """Edit the version's metadata and/or model arrays in place, then write a SHA256SUMS that
    matches the edited files; returns the checksum of that SHA256SUMS."""
    if metadata is not None:
        meta = json.loads((version_dir / "metadata.json").read_text())
        metadata(meta)
        (version_dir / "metadata.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
    if arrays is not None:
        with np.load(version_dir / "model.npz", allow_pickle=False) as z:
            data = {k: z[k].copy() for k in z.files}
        arrays(data)
        with (version_dir / "model.npz").open("wb") as fh:
            np.savez_compressed(fh, **data)  # type: ignore[arg-type]
    sums = "".join(f"{store.sha256(version_dir / f)}  {f}\n" for f in store.FILES)
    (version_dir / store.SUMS).write_text(sums)
    return hashlib.sha256(sums.encode()).hexdigest()


def metadata_for(model: Ensemble, threshold: float = 2.5) -> Metadata:
    """Metadata that passes every check for ``model`` (fitted on MODEL_FEATURES)."""
    features = list(MODEL_FEATURES)
    bands = {"low": threshold, "medium": threshold + 1.0, "high": threshold + 2.0}
    return {
        "created_at": datetime(2026, 1, 1, tzinfo=UTC).isoformat(),
        "feature_spec": {"settings": {}},
        "feature_spec_hash": "0" * 64,
        "features": features,
        "forest": {
            "groups": {
                name: [features[c] for c in cols]
                for name, cols in zip(model.names, model.columns, strict=True)
            }
        },
        "feature_stats": {f: {"median": 0.0, "p99": 0.1, "spread": 0.1} for f in features},
        "grouping": {"gap_s": 1800.0},
        "habitual": [],
        "threshold": Calibration(threshold, 1.0, 7.0, 3, bands, {"all": threshold}).to_dict(),
        "score_quantiles_heldback": {"p50": 0.0, "p99": threshold, "max": threshold + 3.0},
    }

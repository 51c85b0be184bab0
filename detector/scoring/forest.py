"""Isolation forest: fit with scikit-learn, score with a compiled kernel over flat arrays.

scikit-learn fits the trees. They are then flattened into plain arrays (children, split
feature, threshold, per-leaf path length), which are both the safe on-disk format (an ``.npz``
loaded with ``allow_pickle=False``) and the input of a compiled scorer that reproduces
``IsolationForest.score_samples`` exactly (tests/test_scoring.py checks equality) at several
times its speed on small and large batches alike.

Score direction is converted here, once: ``anomaly_score`` is higher = more anomalous, in (0, 1]
(``-score_samples``).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cached_property, lru_cache
from itertools import pairwise
from pathlib import Path
from typing import Final

import numpy as np
from numba import njit
from sklearn.ensemble import IsolationForest

from detector.errors import ModelError

ARRAYS: Final = ("roots", "child", "feature", "threshold", "value")


@dataclass(frozen=True)
class Forest:
    """A fitted isolation forest as flat arrays. ``score`` is the one verb."""

    roots: np.ndarray  # int64 [n_trees]: index of each tree's root node
    child: np.ndarray  # int64 [n_nodes]: left child (right = left + 1); a leaf points to itself
    feature: np.ndarray  # int64 [n_nodes]: column of X tested at the node (0 at a leaf)
    threshold: np.ndarray  # float64 [n_nodes]: go left when x <= threshold (+inf at a leaf)
    value: np.ndarray  # float64 [n_nodes]: at a leaf, depth + c(n_leaf) - 1
    depth: int  # every root-to-leaf walk ends within this many steps
    denominator: float  # n_trees * c(max_samples)
    n_features: int

    def score(self, X: np.ndarray) -> np.ndarray:
        """anomaly_score for each row of X (n x n_features), higher = more anomalous.

        Rows whose features are all zero (most of a day's habitual work: nothing in excess of
        the principal's own past) share one score, computed once.
        """
        if X.ndim != 2 or X.shape[1] != self.n_features:
            raise ModelError(f"expected {self.n_features} feature columns, got {X.shape}")
        x32 = np.ascontiguousarray(X, dtype=np.float32)
        busy = x32.any(axis=1)
        if busy.all():
            return self._score(x32)
        out = np.empty(x32.shape[0], dtype=np.float64)
        out[~busy] = self._score(np.zeros((1, self.n_features), dtype=np.float32))[0]
        if busy.any():
            out[busy] = self._score(np.ascontiguousarray(x32[busy]))
        return out

    def _score(self, x32: np.ndarray) -> np.ndarray:
        child, feature, threshold = self._compact
        args = (self.roots, child, feature, threshold, self.value, self.depth)
        parts = _WORKERS if x32.shape[0] >= _PARALLEL_ROWS else 1
        if parts == 1:
            depths = _depths(x32, *args)
        else:  # the compiled walk releases the GIL: one slice of rows per core
            bounds = np.linspace(0, x32.shape[0], parts + 1).astype(int)
            slices = [x32[a:b] for a, b in pairwise(bounds)]
            depths = np.concatenate(list(_pool().map(lambda x: _depths(x, *args), slices)))
        # the same float operations as scikit-learn, so scores are bit-identical
        return np.asarray(2 ** (-np.divide(depths, self.denominator)), dtype=np.float64)

    def save(self, path: Path) -> None:
        with path.open("wb") as fh:
            np.savez_compressed(
                fh,
                **{name: getattr(self, name) for name in ARRAYS},
                denominator=np.array(self.denominator),
                n_features=np.array(self.n_features),
                depth=np.array(self.depth),
            )

    @classmethod
    def load(cls, path: Path) -> Forest:
        try:
            with np.load(path, allow_pickle=False) as z:
                arrays = {name: np.ascontiguousarray(z[name]) for name in ARRAYS}
                denominator = float(z["denominator"])
                n_features = int(z["n_features"])
                depth = int(z["depth"])
        except (OSError, ValueError, KeyError) as exc:
            raise ModelError(f"cannot read forest {path}: {exc}") from exc
        forest = cls(**arrays, depth=depth, denominator=denominator, n_features=n_features)
        forest.check()
        return forest

    def check(self) -> None:
        """Refuse arrays that would send the scorer out of bounds."""
        n = self.child.shape[0]
        same = all(getattr(self, a).shape == (n,) for a in ARRAYS[1:])
        node = np.arange(n)
        leaf = self.child == node
        ok = (
            same
            and n > 0
            and self.roots.ndim == 1
            and self.roots.size > 0
            and bool(np.all((self.roots >= 0) & (self.roots < n)))
            and bool(np.all((self.child[~leaf] > node[~leaf]) & (self.child[~leaf] + 1 < n)))
            and bool(np.all((self.feature >= 0) & (self.feature < self.n_features)))
            and bool(np.all(np.isposinf(self.threshold[leaf])))
            and 0 < self.depth <= 64
            and self.denominator > 0
        )
        if not ok:
            raise ModelError("forest arrays are inconsistent (corrupt or tampered artefact)")

    @cached_property
    def _compact(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """32-bit copies of the node arrays: half the cache footprint, the same decisions.

        X is float32, so ``x <= t`` for a float64 ``t`` is exactly ``x <= t32`` where ``t32``
        is ``t`` rounded down to the nearest float32.
        """
        t32 = self.threshold.astype(np.float32)
        t32 = np.where(
            t32.astype(np.float64) > self.threshold, np.nextafter(t32, np.float32(-np.inf)), t32
        ).astype(np.float32)
        return self.child.astype(np.int32), self.feature.astype(np.int32), t32

    @property
    def n_trees(self) -> int:
        return int(self.roots.shape[0])


def fit_forest(
    X: np.ndarray, *, n_trees: int = 100, max_samples: int = 256, seed: int = 0
) -> tuple[Forest, IsolationForest]:
    """Fit scikit-learn's IsolationForest on X and flatten it."""
    model = IsolationForest(
        n_estimators=n_trees, max_samples=min(max_samples, X.shape[0]), random_state=seed, n_jobs=1
    )
    model.fit(np.asarray(X, dtype=np.float32))
    return flatten(model), model


def pad_quiet_dimensions(
    X: np.ndarray, plausible: np.ndarray, *, share: float = 0.01, seed: int = 0
) -> tuple[np.ndarray, list[int]]:
    """Give the forest a chance to split on features that never varied in training.

    An isolation tree can only split on a feature whose values differ in its sample; a signal
    that history never showed (a new address after warm-up, a burst of failed logins) would be
    ignored however extreme it is at scoring time. For each feature whose 99.9th percentile
    equals its median, ``share`` of the rows are appended as copies of random real rows with
    only that feature raised to its ``plausible`` value. Returns the padded matrix and the
    indices of the padded features.
    """
    rng = np.random.default_rng(seed)
    quiet = [
        j
        for j in range(X.shape[1])
        if np.quantile(X[:, j], 0.999) <= np.median(X[:, j]) and plausible[j] > 0
    ]
    n = max(1, int(share * X.shape[0]))
    extra = []
    for j in quiet:
        rows = X[rng.integers(0, X.shape[0], size=n)].copy()
        rows[:, j] = plausible[j]
        extra.append(rows)
    return (np.vstack([X, *extra]) if extra else X), quiet


def flatten(model: IsolationForest) -> Forest:
    """The trees of a fitted IsolationForest as one set of flat, breadth-first arrays."""
    n_features = int(model.n_features_in_)
    subsample = int(model._max_features) != n_features
    parts: dict[str, list[np.ndarray]] = {name: [] for name in ARRAYS[1:]}
    roots, offset, max_depth = [], 0, 1
    for tree, feats, depth, avg in zip(
        model.estimators_,
        model.estimators_features_,
        model._decision_path_lengths,
        model._average_path_length_per_tree,
        strict=True,
    ):
        t = tree.tree_
        feature = t.feature.astype(np.int64)
        if subsample:
            mapped = np.asarray(feats, dtype=np.int64)[np.maximum(feature, 0)]
            feature = np.where(feature >= 0, mapped, 0)
        order = _breadth_first(t.children_left, t.children_right)
        new_id = np.empty(t.node_count, dtype=np.int64)
        new_id[order] = np.arange(t.node_count) + offset
        leaf = t.children_left[order] == -1
        parts["child"].append(np.where(leaf, new_id[order], new_id[t.children_left[order]]))
        parts["feature"].append(np.where(leaf, 0, feature[order]))
        parts["threshold"].append(np.where(leaf, np.inf, t.threshold[order]).astype(np.float64))
        parts["value"].append((depth + avg - 1.0)[order].astype(np.float64))
        roots.append(offset)
        offset += t.node_count
        max_depth = max(max_depth, int(np.max(depth)))
    denominator = len(model.estimators_) * _average_path_length(int(model.max_samples_))
    return Forest(
        np.asarray(roots, dtype=np.int64),
        **{k: np.concatenate(v) for k, v in parts.items()},
        depth=max_depth,
        denominator=float(denominator),
        n_features=n_features,
    )


def _breadth_first(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Node order in which the two children of every node are adjacent (left, then right)."""
    order = [0]
    for node in order:  # the list grows while it is walked
        if left[node] != -1:
            order.extend((int(left[node]), int(right[node])))
    return np.asarray(order, dtype=np.int64)


def _average_path_length(n: int) -> float:
    """c(n): average path length of an unsuccessful search in a binary search tree."""
    if n <= 1:
        return 0.0
    if n == 2:
        return 1.0
    return float(2.0 * (np.log(n - 1.0) + np.euler_gamma) - 2.0 * (n - 1.0) / n)


def sklearn_anomaly_score(model: IsolationForest, X: np.ndarray) -> np.ndarray:
    """The reference: scikit-learn's own score in our direction (higher = more anomalous)."""
    return -np.asarray(model.score_samples(np.asarray(X, dtype=np.float32)), dtype=np.float64)


_BLOCK: Final = 32
_WORKERS: Final = max(1, min(4, os.cpu_count() or 1))
_PARALLEL_ROWS: Final = 20_000  # below this a second thread costs more than it gives


@lru_cache(maxsize=1)
def _pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=_WORKERS, thread_name_prefix="forest")


@njit(cache=True, nogil=True)
def _depths(
    X: np.ndarray,
    roots: np.ndarray,
    child: np.ndarray,
    feature: np.ndarray,
    threshold: np.ndarray,
    value: np.ndarray,
    depth: int,
) -> np.ndarray:  # pragma: no cover
    """Summed path lengths, tree by tree as scikit-learn sums them.

    Every tree is walked a fixed ``depth`` steps with no data-dependent branch (a leaf is
    absorbing), for a block of rows in lockstep so the CPU overlaps their independent loads.
    """
    n = X.shape[0]
    depths = np.zeros(n, dtype=np.float64)
    nodes = np.empty(_BLOCK, dtype=np.int32)
    for r in range(roots.shape[0]):
        root = roots[r]
        for start in range(0, n, _BLOCK):
            m = min(_BLOCK, n - start)
            for k in range(m):
                nodes[k] = root
            for _ in range(depth):
                for k in range(m):
                    node = nodes[k]
                    nodes[k] = child[node] + np.int32(X[start + k, feature[node]] > threshold[node])
            for k in range(m):
                depths[start + k] += value[nodes[k]]
    return depths

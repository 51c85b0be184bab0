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

import io
import os
import zipfile
import zlib
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
#: Bounds a loaded forest must keep: trees per forest (what ``exfilwatch train`` offers), the
#: walk's depth and nodes in all (the compiled scorer indexes nodes with 32 bits).
MAX_TREES: Final = 2000
MAX_DEPTH: Final = 64
MAX_NODES: Final = 2**31 - 2
#: The most a model file may hold once decompressed (the bundled one holds under 2 MiB).
MAX_ARRAY_BYTES: Final = 1 << 30
_KINDS: Final = {"iu": "integer", "f": "float"}
_FLOAT32_MAX: Final = float(np.finfo(np.float32).max)


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
        z = read_arrays(path)
        try:
            arrays = {name: z[name] for name in ARRAYS}
            denominator = float(z["denominator"])
            n_features = int(z["n_features"])
            depth = int(z["depth"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelError(f"cannot read forest {path}: {exc}") from exc
        forest = cls(**arrays, depth=depth, denominator=denominator, n_features=n_features)
        forest.check()
        return forest

    def check(self) -> None:
        """Refuse arrays the scorer cannot walk safely, or trees that cannot isolate anything:
        ModelError naming the first problem."""
        problem = self.problem()
        if problem is not None:
            raise ModelError(
                f"forest arrays are inconsistent (corrupt or tampered artefact): {problem}"
            )

    def problem(self) -> str | None:
        """The first inconsistency of the arrays, or None.

        What holds for every forest :func:`flatten` makes: integer node arrays of one length,
        trees stored one after the other from node 0, each internal node's children adjacent
        (left, left + 1) after it in its own tree and every other node the child of exactly
        one (so the trees are trees: no cycle, no shared or unreachable node), every leaf
        within ``depth`` steps of its root, split features among the ``n_features`` columns,
        finite split thresholds, +inf at leaves, a leaf's value between its depth and its
        depth plus c(max_samples), and at least one split.
        """
        for name, kind in zip(ARRAYS, ("iu", "iu", "iu", "f", "f"), strict=True):
            a = getattr(self, name)
            if not isinstance(a, np.ndarray) or a.ndim != 1 or a.dtype.kind not in kind:
                return f"{name} is not a one-dimensional {_KINDS[kind]} array"
        n = self.child.shape[0]
        if n == 0 or any(getattr(self, a).shape != (n,) for a in ARRAYS[2:]):
            return "node arrays are empty or of different lengths"
        if n > MAX_NODES:
            return f"{n} nodes, more than {MAX_NODES}"
        if not 0 < self.roots.size <= MAX_TREES:
            return f"{self.roots.size} trees; a forest has 1 to {MAX_TREES}"
        if not (self.n_features > 0 and 0 < self.depth <= MAX_DEPTH):
            return f"n_features {self.n_features} or depth {self.depth} out of range"
        if not (np.isfinite(self.denominator) and self.denominator > 0):
            return f"denominator {self.denominator} is not a positive number"
        roots = self.roots.astype(np.int64)
        if roots[0] != 0 or np.any(np.diff(roots) <= 0) or roots[-1] >= n:
            return "tree roots must start at node 0 and increase within the node arrays"
        node = np.arange(n, dtype=np.int64)
        child = self.child.astype(np.int64)
        end = np.append(roots[1:], n)[np.searchsorted(roots, node, side="right") - 1]
        leaf = child == node
        inner = ~leaf
        if np.any(inner & ~((child > node) & (child + 1 < end))):
            return "a child index points outside its tree or back to an earlier node"
        parents = np.bincount(np.concatenate([child[inner], child[inner] + 1]), minlength=n)
        expected = np.ones(n, dtype=np.int64)
        expected[roots] = 0  # a root has no parent; every other node has exactly one
        if np.any(parents != expected):
            return "a node is shared by two parents, or reached by none"
        if not inner.any():
            return "no tree splits: every row would score the same"
        level, depths = roots, np.zeros(n, dtype=np.int64)
        for steps in range(self.depth + 1):
            depths[level] = steps
            split = level[inner[level]]
            level = np.concatenate([child[split], child[split] + 1])
        if level.size:
            return f"a leaf lies deeper than the scorer's walk of {self.depth} steps"
        feature = self.feature.astype(np.int64)
        if np.any((feature < 0) | (feature >= self.n_features)):
            return f"a split feature lies outside the {self.n_features} columns"
        split_at = np.abs(self.threshold[inner])
        if not (np.all(np.isposinf(self.threshold[leaf])) and np.all(split_at <= _FLOAT32_MAX)):
            return "a split threshold is not a finite float32 value (or a leaf's is not +inf)"
        c_max = self.denominator / self.roots.size
        value, at = self.value[leaf], depths[leaf]
        slack = 1e-9 * (1.0 + c_max + at)
        if not (
            np.all(np.isfinite(self.value))
            and np.all(value >= at - slack)
            and np.all(value <= at + c_max + slack)
        ):
            return "a leaf's path length is not between its depth and its depth + c(max_samples)"
        return None

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


def read_arrays(path: Path, data: bytes | None = None) -> dict[str, np.ndarray]:
    """Every array of the ``.npz`` at ``path`` (or in ``data``, its content already read),
    never unpickling anything and refusing more than MAX_ARRAY_BYTES once decompressed."""
    try:
        source = io.BytesIO(data) if data is not None else path.open("rb")
        with source as fh, np.load(fh, allow_pickle=False) as z:
            size = sum(info.file_size for info in z.zip.infolist())
            if size > MAX_ARRAY_BYTES:
                raise ModelError(
                    f"{path} holds {size:,} bytes of arrays, more than {MAX_ARRAY_BYTES:,}"
                )
            return {name: z[name] for name in z.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        raise ModelError(f"cannot read model arrays {path}: {exc}") from exc


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

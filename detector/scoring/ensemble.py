"""The model: one isolation forest per group of evidence, each score turned into surprise.

One forest over every feature dilutes a single strong signal: an isolation tree splits on a
random feature, so a row that is extreme in one of 30 dimensions and usual in the rest is
isolated no sooner than a row mildly unusual in several, and the strongest anomalies all reach
the same shallow-path ceiling. Here the features are split into groups that carry one kind of
evidence each (who and from where, how much, how wide, what kind of statement, when);
each group gets its own forest, fitted on that group's columns of the same rows, and each
feature keeps its own training distribution too (the explicit evidence weight of a signal
alone: a first COPY is as rare as the history says, whatever the forest makes of it).

A forest's score is then turned into **surprise**: -log10 of the share of training rows that
scored at least as high (with +1 smoothing), so a group's value says "one training row in
10^s looked like this"; a group's surprise is the larger of its forest's and that of its
rarest feature alone, weighted by the group's **strength**: its strongest feature's value
over the value at which that signal is at full strength (``plausible``: an excess of e-fold
over the principal's previous high, a habit never done, ten failed logins), at most 1. A
feature that is rarely above zero is rare at any value, so rarity alone would make a 1%
excess as alarming as a whole-table read; rarity times strength does not. A row that is
usual in a group (all its features zero: nothing in excess of the principal's own past) has
surprise 0 there. Past the training range, where every forest score saturates, a feature's
rarity follows an exponential tail fitted to its top training values, so it keeps growing with
the value and the strongest anomalies do not share one ceiling.

``anomaly_score`` is the strongest group's surprise plus, from each other group, what its
surprise has beyond :data:`NOISE` (one row in ten): independent kinds of evidence add up
(a new address *and* a whole-table read), while rarities that one row in ten shows add
nothing, so one group at full strength (one in the whole history) outranks a mix of mild ones.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import numpy as np

from detector.errors import ModelError
from detector.scoring.forest import ARRAYS, Forest, fit_forest, pad_quiet_dimensions, read_arrays

#: Evidence groups over the model features (names as in detector.features.MODEL_FEATURES).
GROUPS: Final[dict[str, tuple[str, ...]]] = {
    # who, from where, with what: new address, client or principal, failed logins
    "access": (
        "new_address_excess",
        "new_client_app_excess",
        "new_principal",
        "failed_logins_address_1h",
        "failed_logins_principal_1h",
    ),
    # how much: rows and statements, per event, per window and per session (one kind of
    # evidence: a bigger run of the usual is one fact, however many counters show it)
    "amount": (
        "rows_excess",
        "sensitive_rows_1h_excess",
        "sensitive_rows_24h_excess",
        "table_coverage_excess",
        "session_sensitive_rows_excess",
        "rate_5m_excess",
        "fingerprint_repeats_1h_excess",
        "session_statements_excess",
        "offset_excess",
    ),
    # how wide: tenants, tables and shapes
    "breadth": (
        "tenants_10m_excess",
        "tables_1h_excess",
        "session_shapes_excess",
        "session_sensitive_tables_excess",
        "new_sensitive_table_excess",
    ),
    # what kind of statement: aggregates over all tenants, bulk reads, exports, new shapes
    "statement": (
        "aggregate_all_tenants_excess",
        "bulk_sensitive_read_excess",
        "copy_out_excess",
        "new_shape_runs_1h_excess",
        "new_shape_excess",
        "new_shape_sensitive_excess",
        "new_shape_anyone_excess",
    ),
    # when: an hour the principal rarely works, and what it reads then
    "hour": ("off_hours", "off_hours_sensitive_rows_excess"),
}

#: Features whose values lie in [0, 1] (habits' surprise, novelty, off hours): their whole
#: range is the step from "does it every day" to "never did it", so the exponential tail past
#: their training values reaches, at 1, ten times rarer than anything in training (one in
#: 10 N): a first COPY by someone whose peers' rows hold only habitual ones (0.1) is as rare as
#: a signal never seen, and a value a hair past the highest seen is about as rare as it.
#: The unbounded log-scale counts take a scale of half an e-fold at least.
BOUNDED: Final = frozenset(
    {
        "new_address_excess",
        "new_client_app_excess",
        "new_principal",
        "aggregate_all_tenants_excess",
        "bulk_sensitive_read_excess",
        "copy_out_excess",
        "new_shape_excess",
        "new_shape_sensitive_excess",
        "new_shape_anyone_excess",
        "new_sensitive_table_excess",
        "off_hours",
    }
)
COUNT_SCALE: Final = 0.5

#: Surprise (log10) that one row in ten reaches: a second group adds only what it has beyond.
NOISE: Final = 1.0

#: Each group keeps its training scores as this many quantiles, plus the highest ones exactly.
QUANTILE_POINTS: Final = 1025
TOP_POINTS: Final = 4096


@dataclass(frozen=True)
class Ensemble:
    """Grouped forests and their training score distributions. ``score`` is the one verb."""

    names: tuple[str, ...]  # group names
    columns: tuple[np.ndarray, ...]  # per group: indices into the feature matrix
    forests: tuple[Forest, ...]
    quantiles: tuple[np.ndarray, ...]  # per group: training score quantiles (ascending)
    tops: tuple[np.ndarray, ...]  # per group: the highest training scores, exactly (ascending)
    rows: int  # training rows the distributions stand for
    marginal_quantiles: np.ndarray  # features x QUANTILE_POINTS: each feature's quantiles
    marginal_tops: np.ndarray  # features x k: each feature's highest training values
    full: np.ndarray  # per feature: the value at which a signal is at full strength
    tail: np.ndarray  # features x 3: threshold u, scale and share of rows above u
    n_features: int
    score_tails: np.ndarray  # groups x 3: the same for each group's forest scores

    def score(self, X: np.ndarray) -> np.ndarray:
        """anomaly_score per row (0 = usual everywhere); see the module docstring."""
        return combine(self.surprises(X))

    def surprises(self, X: np.ndarray) -> np.ndarray:
        """Surprise per row and group (n x groups), in log10 units."""
        if X.ndim != 2 or X.shape[1] != self.n_features:
            raise ModelError(f"expected {self.n_features} feature columns, got {X.shape}")
        out = np.zeros((X.shape[0], len(self.names)))
        marginal = np.zeros_like(X, dtype=np.float64)
        for f in range(self.n_features):
            x = X[:, f]
            on = x > 0
            if on.any():
                count = _count_at_least(
                    x[on], self.marginal_quantiles[f], self.marginal_tops[f], self.rows
                )
                marginal[on, f] = _rarity(x[on], count, self.rows, self.tail[f])
        for g, (cols, forest) in enumerate(zip(self.columns, self.forests, strict=True)):
            Xg = X[:, cols]
            busy = Xg.any(axis=1)
            if not busy.any():
                continue
            s = forest.score(np.ascontiguousarray(Xg[busy]))
            count = _count_at_least(s, self.quantiles[g], self.tops[g], self.rows)
            joint = _rarity(s, count, self.rows, self.score_tails[g])
            alone = marginal[busy][:, cols].max(axis=1)
            strength = np.minimum(1.0, (Xg[busy] / self.full[cols]).max(axis=1))
            out[busy, g] = strength * np.maximum(joint, alone)
        return out

    def save(self, path: Path) -> None:
        arrays: dict[str, np.ndarray] = {
            "names": np.array(self.names),
            "rows": np.array(self.rows),
            "marginal_quantiles": self.marginal_quantiles,
            "marginal_tops": self.marginal_tops,
            "full": self.full,
            "tail": self.tail,
            "n_features": np.array(self.n_features),
            "score_tails": self.score_tails,
        }
        for g, (cols, forest) in enumerate(zip(self.columns, self.forests, strict=True)):
            arrays[f"g{g}_columns"] = cols
            arrays[f"g{g}_quantiles"] = self.quantiles[g]
            arrays[f"g{g}_top"] = self.tops[g]
            for name in ARRAYS:
                arrays[f"g{g}_{name}"] = getattr(forest, name)
            arrays[f"g{g}_meta"] = np.array(
                [forest.depth, forest.denominator, forest.n_features], dtype=np.float64
            )
        with path.open("wb") as fh:
            np.savez_compressed(fh, **arrays)  # type: ignore[arg-type]

    @classmethod
    def load(cls, path: Path, data: bytes | None = None) -> Ensemble:
        """The ensemble saved at ``path`` (or in ``data``, its content already read and
        checked), refused with a ModelError when any array is out of range."""
        z = read_arrays(path, data)
        try:
            names = tuple(str(n) for n in z["names"])
            n_features = int(z["n_features"])
            columns, forests, quantiles, tops = [], [], [], []
            for g in range(len(names)):
                depth, denominator, nf = z[f"g{g}_meta"]
                forest = Forest(
                    **{name: z[f"g{g}_{name}"] for name in ARRAYS},
                    depth=int(depth),
                    denominator=float(denominator),
                    n_features=int(nf),
                )
                problem = forest.problem()
                if problem is not None:
                    raise ModelError(
                        f"model {path} is inconsistent (corrupt or tampered artefact): "
                        f"group {names[g]}'s forest: {problem}"
                    )
                cols = z[f"g{g}_columns"]
                if cols.dtype.kind not in "iu":
                    raise ValueError(f"group {names[g]} columns are not integers")
                columns.append(np.ascontiguousarray(cols, dtype=np.int64))
                forests.append(forest)
                quantiles.append(np.asarray(z[f"g{g}_quantiles"], dtype=np.float64))
                tops.append(np.asarray(z[f"g{g}_top"], dtype=np.float64))
            ensemble = cls(
                names,
                tuple(columns),
                tuple(forests),
                tuple(quantiles),
                tuple(tops),
                int(z["rows"]),
                np.asarray(z["marginal_quantiles"], dtype=np.float64),
                np.asarray(z["marginal_tops"], dtype=np.float64),
                np.asarray(z["full"], dtype=np.float64),
                np.asarray(z["tail"], dtype=np.float64),
                n_features,
                np.asarray(z["score_tails"], dtype=np.float64),
            )
        except (ValueError, KeyError, TypeError, OverflowError) as exc:
            raise ModelError(f"cannot read model {path}: {exc}") from exc
        problem = ensemble.problem()
        if problem is not None:
            raise ModelError(
                f"model {path} is inconsistent (corrupt or tampered artefact): {problem}"
            )
        return ensemble

    def problem(self) -> str | None:
        """The first value out of range, or None (each forest is checked on its own by
        :meth:`Forest.check`).

        What holds for every ensemble :func:`fit_ensemble` makes: unique group names, each
        group's columns distinct and together every feature once, each forest over as many
        columns as its group names; sorted, finite training distributions (forest scores in
        (0, 1]) with no more top values than training rows; positive full strengths; tails
        with a positive scale and a share in (0, 1]; and every split threshold within its
        feature's training range (a split beyond it isolates nothing).
        """
        f, groups = self.n_features, len(self.names)
        if not (0 < groups == len(set(self.names)) and f > 0 and self.rows > 0):
            return "group names must be unique and features and rows positive"
        every = np.concatenate(self.columns) if self.columns else np.zeros(0, dtype=np.int64)
        if every.size != f or not np.array_equal(np.sort(every), np.arange(f)):
            return f"the groups' columns do not cover each of the {f} features once"
        for g, (cols, forest) in enumerate(zip(self.columns, self.forests, strict=True)):
            if cols.ndim != 1 or cols.size != forest.n_features:
                return (
                    f"group {self.names[g]} has {cols.size} columns, its forest {forest.n_features}"
                )
            if not (_sorted(self.quantiles[g], 2) and _sorted(self.tops[g], 1)):
                return f"group {self.names[g]}'s training scores are not sorted finite values"
            scores = np.concatenate([self.quantiles[g], self.tops[g]])
            if np.any(scores <= 0) or np.any(scores > 1) or self.tops[g].size > self.rows:
                return f"group {self.names[g]}'s training scores lie outside (0, 1]"
        marginal = (self.marginal_quantiles, self.marginal_tops)
        if any(a.ndim != 2 or a.shape[0] != f or not _sorted(a, 1) for a in marginal):
            return "per-feature training values are not sorted finite rows, one per feature"
        if self.marginal_quantiles.shape[1] < 2 or self.marginal_tops.shape[1] > self.rows:
            return "per-feature training distributions are of the wrong size"
        if self.full.shape != (f,) or not np.all(np.isfinite(self.full) & (self.full > 0)):
            return "full strengths must be positive and finite, one per feature"
        for name, tail, n in (("feature", self.tail, f), ("score", self.score_tails, groups)):
            if tail.shape != (n, 3) or not np.all(np.isfinite(tail)):
                return f"{name} tails must be finite, three values per {name}"
            if not (np.all(tail[:, 1] > 0) and np.all((tail[:, 2] > 0) & (tail[:, 2] <= 1))):
                return f"{name} tails need a positive scale and a share in (0, 1]"
        low, high = (
            self.marginal_quantiles[:, 0],
            np.maximum(self.marginal_quantiles[:, -1], self.full),
        )
        for g, (cols, forest) in enumerate(zip(self.columns, self.forests, strict=True)):
            inner = forest.child != np.arange(forest.child.size)
            at = cols[forest.feature[inner]]
            t = forest.threshold[inner]
            slack = 1e-6 * (1.0 + np.abs(t))
            if np.any(t < low[at] - slack) or np.any(t > high[at] + slack):
                return f"group {self.names[g]} splits outside its features' training range"
        return None

    @property
    def n_trees(self) -> int:
        return sum(f.n_trees for f in self.forests)


def combine(surprises: np.ndarray) -> np.ndarray:
    """The strongest group's surprise plus every other group's surprise beyond NOISE.

    >>> combine(np.array([[3.0, 0.5, 1.5], [0.0, 0.0, 0.0]]))
    array([3.5, 0. ])
    """
    if surprises.shape[1] == 0:
        return np.zeros(surprises.shape[0])
    strongest = surprises.max(axis=1)
    extra = np.maximum(0.0, surprises - NOISE).sum(axis=1) - np.maximum(0.0, strongest - NOISE)
    return np.asarray(strongest + extra)


def _sorted(a: np.ndarray, least: int) -> bool:
    """Finite and ascending along its last axis, with at least ``least`` values."""
    return bool(
        a.ndim >= 1
        and a.shape[-1] >= least
        and np.all(np.isfinite(a))
        and np.all(np.diff(a, axis=-1) >= 0)
    )


def _count_at_least(
    scores: np.ndarray, quantiles: np.ndarray, top: np.ndarray, rows: int
) -> np.ndarray:
    """How many of the ``rows`` training rows scored at least each of ``scores``: exact among
    the highest (``top``), from the quantiles below them."""
    exact = top.size - np.searchsorted(top, scores, side="left")
    if top.size == 0 or quantiles.size < 2:
        return exact.astype(np.float64)
    probs = np.linspace(0.0, 1.0, quantiles.size)
    below = np.interp(scores, quantiles, probs, left=0.0, right=1.0)
    approx = np.maximum(rows * (1.0 - below), float(top.size))
    return np.where(scores > top[0], exact, approx).astype(np.float64)


def fit_ensemble(
    X: np.ndarray,
    features: Sequence[str],
    plausible: np.ndarray,
    *,
    n_trees: int = 100,
    max_samples: int = 256,
    seed: int = 0,
) -> tuple[Ensemble, list[str]]:
    """Fit one forest per group of :data:`GROUPS` on the columns of ``X`` named by
    ``features``; returns the ensemble and the names of the padded quiet features."""
    index = {name: j for j, name in enumerate(features)}
    missing = [f for cols in GROUPS.values() for f in cols if f not in index]
    grouped = {f for cols in GROUPS.values() for f in cols}
    ungrouped = [f for f in features if f not in grouped]
    if missing or ungrouped:
        raise ModelError(f"feature groups do not match the features: {missing or ungrouped}")
    columns, forests, quantiles, tops, score_tails = [], [], [], [], []
    padded: list[str] = []
    for g, cols in enumerate(GROUPS.values()):
        idx = np.array([index[c] for c in cols], dtype=np.int64)
        Xg = np.ascontiguousarray(X[:, idx])
        Xp, quiet = pad_quiet_dimensions(Xg, plausible[idx], seed=seed + g)
        forest, _ = fit_forest(Xp, n_trees=n_trees, max_samples=max_samples, seed=seed + g)
        s = np.sort(forest.score(Xg))  # every training row, idle ones included
        columns.append(idx)
        forests.append(forest)
        quantiles.append(np.quantile(s, np.linspace(0.0, 1.0, QUANTILE_POINTS)))
        tops.append(s[-TOP_POINTS:].astype(np.float64))
        score_tails.append(_tails(s[:, None], np.array([SCORE_SCALE_FLOOR]))[0])
        padded.extend(cols[j] for j in quiet)
    ordered = np.sort(X, axis=0)
    full = np.maximum(plausible, 1e-6)
    bounded = np.array([f in BOUNDED for f in features])
    floors = np.where(bounded, 0.0, COUNT_SCALE * full)
    ensemble = Ensemble(
        tuple(GROUPS),
        tuple(columns),
        tuple(forests),
        tuple(quantiles),
        tuple(tops),
        int(X.shape[0]),
        np.quantile(ordered, np.linspace(0.0, 1.0, QUANTILE_POINTS), axis=0).T.copy(),
        ordered[-TOP_POINTS:].T.copy(),
        full,
        _tails(ordered, floors, bounded=bounded),
        X.shape[1],
        np.array(score_tails),
    )
    return ensemble, padded


#: The exponential tail of a feature is fitted to its top 1% of training rows (10 at least).
TAIL_SHARE: Final = 0.01
#: The smallest scale of a forest score's tail: forest scores lie in (0, 1), and one level of
#: isolation depth more or less moves a score by about 0.06.
SCORE_SCALE_FLOOR: Final = 0.05


def _rarity(x: np.ndarray, count: np.ndarray, rows: int, tail: np.ndarray) -> np.ndarray:
    """-log10 of the share of training rows at least ``x`` (``count`` of ``rows``, +1
    smoothed) up to the tail's threshold u; above it, the exponential tail fitted to the
    training values there (peaks over a threshold): continuous at u and growing with the value,
    so a value just past the highest one seen is about as rare as the highest ones, not one in
    all N at once, and the strongest anomalies do not share one ceiling either."""
    u, scale, share = tail
    empirical = -np.log10((count + 1.0) / (rows + 1.0))
    beyond = -np.log10(share) + (x - u) / (scale * np.log(10.0))
    return np.asarray(np.where(x > u, beyond, empirical))


def _tails(
    ordered: np.ndarray, floors: np.ndarray, bounded: np.ndarray | None = None
) -> np.ndarray:
    """Per feature (column of the column-sorted ``ordered``): the threshold u above which the
    top TAIL_SHARE of rows lie, the mean excess of those rows over u (the scale of an
    exponential tail, at least ``floors``: half a count's full strength, so one full-strength
    step past the top adds ~0.9 to the surprise however tight the top of the training values;
    for a ``bounded`` feature at least what takes the tail to one in 10 (N + 1) at 1) and
    their share of rows."""
    n = ordered.shape[0]
    out = np.zeros((ordered.shape[1], 3))
    for f in range(ordered.shape[1]):
        col = ordered[:, f]
        nonzero = int(np.count_nonzero(col))
        k = min(nonzero, max(10, int(TAIL_SHARE * n)), TOP_POINTS)
        floor = float(floors[f])
        if k == 0:  # never above zero in training: every value is beyond the top
            u, spread, share = 0.0, 0.0, 1.0 / (n + 1.0)
        else:
            top = col[n - k :]
            u, share = float(top[0]), k / (n + 1.0)
            spread = float(np.mean(top - u))
        if bounded is not None and bounded[f] and u < 1.0:
            # from -log10(share) at u up to log10(10 (n + 1)) at 1
            rise = np.log10(10.0 * (n + 1.0)) + np.log10(share)
            floor = max(floor, (1.0 - u) / (max(rise, 1e-6) * np.log(10.0)))
        out[f] = (u, max(spread, floor, 1e-6), share)
    return out

"""The FeatureEngine: canonical events in, one feature row per event out.

The same engine serves training and scoring (there is one feature code path). It is stateful
per principal and incremental over micro-batches: feeding one stream in batches of any size
yields the same rows (tests/test_features.py proves it with hypothesis).

Per batch it does, in order:
1. vectorised per-event columns (polars): times, effective row count, action code;
2. statement shape: one normalise-and-hash pass per row, one SQL parse per new shape;
3. stable 63-bit ids for principals, addresses, client apps, tenants and tables, computed on
   the batch's distinct values only;
4. the compiled sequential pass (:mod:`detector.features.kernel`) over per-principal state;
5. model features: each tracked quantity's excess over the principal's own baseline.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np
import polars as pl

from detector.errors import ModelError
from detector.features import kernel as K
from detector.features.settings import FeatureSettings
from detector.features.sqlshape import (
    KIND_CODES,
    ShapeCache,
    dialect_expr,
    row_fingerprint_expr,
    stable_hash,
)
from detector.schema import ACTIONS

ENGINE_VERSION: Final = 7

#: Columns of the model's input, in order. Every one is >= 0 and 0 means "as usual".
MODEL_FEATURES: Final = (
    *(f"{q}_excess" for q in K.QUANTITIES),
    "off_hours",
    "failed_logins_address_1h",
    "failed_logins_principal_1h",
    "new_principal",
)

#: A value each model feature plausibly takes when its signal is present (for features that
#: history never showed; see detector.scoring.forest.pad_quiet_dimensions).
PLAUSIBLE: Final = (
    *(1.0 for _ in K.QUANTITIES),
    0.5,  # off_hours
    float(np.log1p(10)),  # failed logins from one address in an hour
    float(np.log1p(5)),  # failed logins for one principal in an hour
    1.0,  # new principal
)

#: Names of the state rows of peer groups (no principal name starts with a NUL).
PEER_PREFIX: Final = "\x00peer:"

#: Columns carried from the event into the feature frame (for incidents and explanations).
CONTEXT_COLUMNS: Final = (
    "event_time",
    "db_user",
    "action",
    "command",
    "session_id",
    "statement_id",
    "client_ip",
    "client_app",
    "tenant_id",
    "statement_text",
    "fingerprint",
)

#: An event stamped more than this past the latest time the stream has reached is held at
#: that time, unless the next event agrees with it (a day: longer than any quiet night).
MAX_AHEAD_S: Final = 86400.0

#: Growth that is still usual: up to 1.5x a count's previous high is no excess (a growing
#: customer base grows every habitual job); habits (0/1 shares) get no allowance.
GROWTH: Final = 1.5
_ALLOWANCE: Final = np.array(
    [
        float(np.log10(GROWTH)) if q == "table_coverage" else float(np.log(GROWTH))
        for q in K.QUANTITIES[: K.NC]
    ]
)

#: The previous high of a count rises by at most this factor a day (log units per quantity).
GROWTH_CAP: Final = 4.0
_CAP: Final = np.array(
    [
        float(np.log10(GROWTH_CAP)) if q == "table_coverage" else float(np.log(GROWTH_CAP))
        for q in K.QUANTITIES[: K.NC]
    ]
)

_CODE: Final = {a: i for i, a in enumerate(ACTIONS)}
_OFFSET_RE: Final = r"(?i)\boffset\s+([0-9]+)"
#: ``id = <literal>`` on a tenant table names a tenant (a bound ``$1`` does not match).
_TENANT_ID_RES: Final = (
    r"(?i)(?:^|[^a-z0-9_])id\s*=\s*'([^']{1,64})'",
    r"(?i)(?:^|[^a-z0-9_])id\s*=\s*([0-9]+)\b",
)
_KIND_SELECT: Final = KIND_CODES.index("select")
_KIND_COPY_TO: Final = KIND_CODES.index("copy_to")
_KIND_COPY_FROM: Final = KIND_CODES.index("copy_from")


def _params(settings: FeatureSettings) -> np.ndarray:
    p = np.zeros(K.N_PARAMS)
    p[K.P_TAU_RATE] = 300.0
    p[K.P_TAU_1H] = 3600.0
    p[K.P_TAU_24H] = 86400.0
    p[K.P_TAU_TEN] = 600.0
    p[K.P_W_TEN] = 600.0
    p[K.P_W_TAB] = 3600.0
    p[K.P_TAU_COV] = 3 * 3600.0
    p[K.P_TAU_FP] = 3600.0
    p[K.P_TAU_FAIL] = 3600.0
    p[K.P_TAU_BASE] = settings.baseline_days * 86400.0
    p[K.P_TAU_HOUR] = 14 * 86400.0
    p[K.P_PAIR_EXPIRY] = settings.new_pair_expiry_days * 86400.0
    p[K.P_WINDOW] = 3600.0
    p[K.P_NOVELTY] = 86400.0
    p[K.P_TAU_SESSION] = 3600.0
    p[K.P_SESSION_EXPIRY] = 8 * 3600.0
    p[K.P_OFF_HOURS_SHARE] = 0.1
    p[K.P_SETTLED] = 100.0
    p[K.P_THIN] = 500.0
    p[K.P_HOUR_PRIOR] = 1.0
    p[K.P_DAY_PRIOR] = 1.0
    p[K.P_OFF_DAY_RATIO] = 0.5
    p[K.P_GROWTH] = float(np.log(GROWTH))
    return p


def feature_spec(settings: FeatureSettings) -> dict[str, Any]:
    """Everything that determines what a feature column means."""
    return {
        "engine_version": ENGINE_VERSION,
        "model_features": list(MODEL_FEATURES),
        "outputs": list(K.OUT_COLUMNS),
        "settings": settings.model_dump(mode="json"),
        "params": _params(settings).tolist(),
        "growth_cap": GROWTH_CAP,
    }


def spec_hash(spec: dict[str, Any]) -> str:
    blob = json.dumps(spec, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()


@dataclass(frozen=True)
class FeatureBatch:
    """One batch's features before they become a frame: the events, the kernel's outputs
    (n x len(OUT_COLUMNS)), the model matrix (n x len(MODEL_FEATURES)) and the tables touched."""

    events: pl.DataFrame
    out: np.ndarray
    model: np.ndarray
    tables: pl.Series


def _model_matrix(out: np.ndarray) -> np.ndarray:
    """Model features from kernel outputs: each count's excess over the principal's previous
    high (beyond the growth allowance), each habit's surprise, then the novelty and failure
    columns."""
    values = out[:, 0 : 2 * K.NC : 2]
    typical = out[:, 1 : 2 * K.NC : 2]
    # no past value: a count is compared with zero; a table's coverage with nothing (its
    # size was unknown until now, so the principal's past coverage is unknown too)
    typical_or_none = np.where(np.isnan(typical), 0.0, typical)
    excess = np.maximum(0.0, np.nan_to_num(values - typical_or_none - _ALLOWANCE, nan=0.0))
    excess[:, K.Q_COV] = np.where(np.isnan(typical[:, K.Q_COV]), 0.0, excess[:, K.Q_COV])
    excess[:, _SESSION_QS] *= session_evidence(out[:, K.O_SESSIONS])[:, None]
    return np.column_stack(
        [
            excess,
            habit_surprise(out[:, 2 * K.NC : 2 * K.NB : 2], out[:, 2 * K.NC + 1 : 2 * K.NB : 2]),
            out[:, K.O_OFF_HOURS],
            out[:, K.O_FAIL_ADDR],
            out[:, K.O_FAIL_PRINCIPAL],
            out[:, K.O_NEW_PRINCIPAL],
        ]
    )


#: Session counts compared with the principal's usual sessions weigh by how many sessions
#: that bar stands for: exceeding the largest of n sessions happens one time in n + 1 by
#: chance, so the excess counts in full from SESSIONS_FULL sessions (an application's few
#: hours) and in proportion to log(1 + n) below (a monthly job's one run a day, an analyst's
#: few sessions a week).
SESSIONS_FULL: Final = 1000.0
_SESSION_QS: Final = [K.Q_SESS, K.Q_SESS_SHAPES, K.Q_SESS_ROWS, K.Q_SESS_TABLES]


def session_evidence(sessions: np.ndarray) -> np.ndarray:
    """Weight in [0, 1] of a session excess over a bar set by ``sessions`` sessions.

    >>> session_evidence(np.array([0.0, 9.0, 999.0, 5000.0])).round(3)
    array([0.   , 0.333, 1.   , 1.   ])
    """
    n = np.nan_to_num(np.maximum(sessions, 0.0), nan=0.0)
    return np.asarray(np.minimum(1.0, np.log10(1.0 + n) / np.log10(1.0 + SESSIONS_FULL)))


#: A habit done at most this often (share of the principal's events) is fully surprising.
RARE_SHARE: Final = 1e-3


def habit_surprise(value: np.ndarray, share: np.ndarray) -> np.ndarray:
    """How surprising doing a habit is for the principal: ``value`` (0/1) weighted by the
    information of its share, -log10(share), scaled to [0, 1] at :data:`RARE_SHARE`.

    A service account that never ran a new statement shape (share ~0) scores 1 for one; an
    analyst who does it one query in ten scores 1/3; a nightly job's COPY scores 0.

    >>> habit_surprise(np.array([1.0, 1.0, 1.0, 0.0]), np.array([0.0, 0.1, 1.0, 0.0]))
    array([1.        , 0.33333333, 0.        , 0.        ])
    """
    floor = np.log10(1.0 / RARE_SHARE)
    safe = np.clip(np.nan_to_num(share, nan=0.0), RARE_SHARE, 1.0)
    return np.asarray(value * np.minimum(1.0, -np.log10(safe) / floor) + 0.0)


def _grown(array: np.ndarray, extra: int) -> np.ndarray:
    """``array`` with ``extra`` zeroed rows added, in place: the allocator can extend it
    without holding two copies. The state arrays always own their memory (made by np.zeros,
    np.array or here), which resize needs."""
    array.resize((array.shape[0] + extra, *array.shape[1:]), refcheck=False)
    return array


class FeatureEngine:
    """Stateful, incremental feature computation. ``transform`` is the one verb."""

    def __init__(self, settings: FeatureSettings | None = None) -> None:
        self.settings = settings or FeatureSettings()
        self.params = _params(self.settings)
        self.expiry = K.default_expiry(self.params)
        self.spec = feature_spec(self.settings)
        self.spec_hash = spec_hash(self.spec)
        self._shapes = ShapeCache(self.settings)
        self._hash_cache: dict[str, int] = {}
        self._table_cache: dict[str, tuple[bool, int, float, bool]] = {}
        keys = "|".join(re.escape(k) for k in self.settings.tenant_keys)
        self._tenant_key_res = (
            rf"(?i)\b(?:{keys})\s*=\s*'([^']{{1,64}})'",
            rf"(?i)\b(?:{keys})\s*=\s*([0-9]+)\b",
        )
        self.principals_: dict[str, int] = {}
        self.state_ = np.zeros((0, K.N_STATE))
        self.highs_ = np.zeros((0, K.N_HIGH), dtype=K.HIGH_DTYPE)
        self.keys_ = np.full(1024, K.EMPTY, dtype=np.int64)
        self.kinds_ = np.zeros(1024, dtype=np.int8)
        self.ta_ = np.zeros(1024)
        self.va_ = np.zeros(1024)
        self.size_ = 0
        self.events_seen_ = 0
        self.last_event_time_: float | None = None
        #: Time of an event held at the watermark for being far ahead of it (NaN: none), and
        #: how many events were held (see detector.features.kernel.hold_times).
        self.time_pending_ = math.nan
        self.events_time_held_ = 0
        #: The first event time the engine saw: principals there from the first day are not
        #: "new principals", only unknown ones.
        self.first_event_time_: float | None = None
        #: The model features of the last transformed batch as one float matrix (n x F).
        self.model_matrix_ = np.empty((0, len(MODEL_FEATURES)))

    # ------------------------------------------------------------------ transform
    def transform(self, events: pl.DataFrame) -> pl.DataFrame:
        """Feature rows for ``events`` (canonical schema), in the same order; updates state."""
        return self.frame(self.update(events))

    def update(self, events: pl.DataFrame) -> FeatureBatch:
        """Advance the state over ``events`` and compute their features, without building the
        feature frame (see :meth:`frame`): a scorer materialises only the rows it keeps."""
        n = events.height
        if n == 0:
            return FeatureBatch(
                events,
                np.empty((0, K.N_OUT)),
                np.empty((0, len(MODEL_FEATURES))),
                pl.Series("tables", [], pl.List(pl.String)),
            )
        prep = self._prepare(events)
        if self.first_event_time_ is None:  # the first event in arrival order
            self.first_event_time_ = float(prep["t"][0])
        events = events.with_columns(
            tenant_id=self._tenants(events, prep), fingerprint=prep["fp"].cast(pl.Int64)
        )
        cols = {c: prep[c].to_numpy() for c in prep.columns if c != "tables"}
        watermark = math.nan if self.last_event_time_ is None else self.last_event_time_
        times, watermark, self.time_pending_, held = K.hold_times(
            cols["t"], watermark, self.time_pending_, MAX_AHEAD_S
        )
        self.events_time_held_ += held
        pidx, peer = self._principal_index(events["db_user"])
        out, self.keys_, self.kinds_, self.ta_, self.va_, self.size_ = K.run(
            times,
            pidx,
            peer,
            self._ids(events["client_ip"]),
            self._ids(events["client_app"]),
            self._ids(events["tenant_id"]),
            self._ids(events["session_id"]),
            cols["table_id"],
            cols["fp"],
            cols["action_code"],
            cols["rows"],
            cols["sensitive"],
            cols["agg_all"],
            cols["bulk"],
            cols["copy_out"],
            cols["whole_read"],
            self._offsets(events, prep),
            cols["hour"],
            cols["known_size"],
            self.state_,
            self.highs_,
            self.keys_,
            self.kinds_,
            self.ta_,
            self.va_,
            self.size_,
            self.params,
            self.expiry,
            self.first_event_time_,
            _CAP,
        )
        self.events_seen_ += n
        self.last_event_time_ = watermark
        batch = FeatureBatch(events, out, _model_matrix(out), prep["tables"])
        self.model_matrix_ = batch.model
        return batch

    def _prepare(self, events: pl.DataFrame) -> pl.DataFrame:
        reading = pl.col("action").is_in(["read", "copy"])
        base = events.select(
            t=pl.col("event_time").dt.epoch("us").cast(pl.Float64) / 1e6,
            hour=pl.col("event_time").dt.hour().cast(pl.Int64),
            action_code=pl.col("action").replace_strict(
                _CODE, default=_CODE["other"], return_dtype=pl.Int64
            ),
            rows=pl.when(pl.col("action") == "write")
            .then(pl.coalesce("rows_affected", "rows_returned"))
            .otherwise(pl.coalesce("rows_returned", "rows_affected"))
            .cast(pl.Float64)
            .fill_null(float("nan")),
            h=row_fingerprint_expr("statement_text", dialect_expr("db_system")),
            dialect=dialect_expr("db_system"),
            objects=pl.col("objects"),
            reading=reading,
        )
        shapes = self._shapes.shapes(base["h"], events["statement_text"], base["dialect"])
        base = base.join(shapes, on="h", how="left", maintain_order="left")
        base = base.with_columns(
            tables=pl.when(pl.col("objects").list.len() > 0)
            .then(pl.col("objects"))
            .otherwise(pl.col("tables")),
        ).with_columns(table_key=pl.col("tables").list.join(",").fill_null(""))
        base = base.join(
            self._table_info(base["table_key"]), on="table_key", how="left", maintain_order="left"
        )
        kind = pl.col("kind").fill_null(0)
        no_tenant_filter = ~pl.col("tenant_filter").fill_null(False)
        no_point_filter = ~pl.col("point_filter").fill_null(False)
        aggregate = pl.col("aggregate").fill_null(False)
        copy_out = (kind == _KIND_COPY_TO) | (
            (pl.col("action_code") == _CODE["copy"]) & (kind != _KIND_COPY_FROM)
        )
        return base.select(
            "t",
            "hour",
            "action_code",
            "rows",
            "tables",
            fp=pl.col("fingerprint").fill_null(0),
            table_id=pl.col("table_id").fill_null(0),
            known_size=pl.col("known_size").fill_null(float("nan")),
            sensitive=pl.col("sensitive").fill_null(False),
            # one figure per tenant for every tenant: the client list's usage counts (a
            # top-20 report has a LIMIT; a count over a sensitive table is one figure)
            agg_all=pl.col("reading")
            & aggregate
            & no_tenant_filter
            & pl.col("group_by_tenant").fill_null(False)
            & ~pl.col("has_limit").fill_null(False),
            bulk=pl.col("reading")
            & (kind == _KIND_SELECT)
            & pl.col("sensitive").fill_null(False)
            & no_tenant_filter
            & no_point_filter
            & ~aggregate,
            copy_out=copy_out,
            whole_read=(pl.col("tables").list.len().fill_null(0) == 1)
            & ~pl.col("has_where").fill_null(True)
            & ~pl.col("has_limit").fill_null(True)
            & ~aggregate
            & ((kind == _KIND_SELECT) | copy_out),
            has_offset=pl.col("has_offset").fill_null(False),
            tenant_filter=pl.col("tenant_filter").fill_null(False),
            tenant_table=pl.col("tenant_table").fill_null(False),
        )

    def _tenants(self, events: pl.DataFrame, prep: pl.DataFrame) -> pl.Series:
        """The tenant of each event: the source's, else the literal (a number or a quoted
        string) its statement filters a tenant key by (``client_id = 42``, or ``id = 42`` on a
        tenant table); a bound parameter (``client_id = $1``) or a join names none. Only rows
        whose shape has a tenant filter are read."""
        mask = prep["tenant_filter"].to_numpy() & events["tenant_id"].is_null().to_numpy()
        if not mask.any():
            return events["tenant_id"]
        rows = pl.DataFrame(
            {
                "text": events["statement_text"].filter(pl.Series(mask)),
                "tenant_table": prep["tenant_table"].filter(pl.Series(mask)),
            }
        )
        found = rows.select(
            pl.coalesce(
                *(pl.col("text").str.extract(r, 1) for r in self._tenant_key_res),
                *(
                    pl.when(pl.col("tenant_table")).then(pl.col("text").str.extract(r, 1))
                    for r in _TENANT_ID_RES
                ),
            )
        ).to_series()
        index = pl.Series(np.flatnonzero(mask)).cast(pl.Int64)
        derived = (
            pl.Series("tenant_id", [], pl.String)
            .extend_constant(None, events.height)
            .scatter(index, found)
        )
        return events["tenant_id"].fill_null(derived)

    def _table_info(self, keys: pl.Series) -> pl.DataFrame:
        """sensitive flag, primary table id and configured size per distinct table list."""
        uniq = keys.unique().to_list()
        info = [self._table_entry(k) for k in uniq]
        return pl.DataFrame(
            {
                "table_key": uniq,
                "sensitive": [i[0] for i in info],
                "table_id": [i[1] for i in info],
                "known_size": [i[2] for i in info],
                "tenant_table": [i[3] for i in info],
            },
            schema={
                "table_key": pl.String,
                "sensitive": pl.Boolean,
                "table_id": pl.Int64,
                "known_size": pl.Float64,
                "tenant_table": pl.Boolean,
            },
        )

    def _table_entry(self, key: str) -> tuple[bool, int, float, bool]:
        hit = self._table_cache.get(key)
        if hit is not None:
            return hit
        tables = [t for t in key.lower().split(",") if t]
        sensitive = [t for t in tables if self.settings.table_class(t)]
        primary = (sensitive or tables or [""])[0]
        size = self.settings.table_rows.get(primary, float("nan"))
        entry = (
            bool(sensitive),
            stable_hash(primary) if primary else 0,
            float(size),
            any(self.settings.is_tenant_table(t) for t in tables),
        )
        self._table_cache[key] = entry
        return entry

    def _offsets(self, events: pl.DataFrame, prep: pl.DataFrame) -> np.ndarray:
        mask = prep["has_offset"].to_numpy()
        offsets = np.full(events.height, np.nan)
        if mask.any():
            found = events.filter(pl.Series(mask)).select(
                pl.col("statement_text").str.extract(_OFFSET_RE, 1).cast(pl.Float64, strict=False)
            )
            offsets[mask] = found.to_series().fill_null(float("nan")).to_numpy()
        return offsets

    def _ids(self, column: pl.Series) -> np.ndarray:
        """Stable 63-bit ids for a string column (null -> 0), hashing distinct values only."""
        uniq = column.drop_nulls().unique().to_list()
        cache = self._hash_cache
        if len(cache) > 1_000_000:
            cache.clear()
        ids = [cache.get(u) or cache.setdefault(u, stable_hash(u) or 1) for u in uniq]
        mapped = column.replace_strict(uniq, ids, default=0, return_dtype=pl.Int64)
        return np.ascontiguousarray(mapped.to_numpy())

    def _principal_index(self, users: pl.Series) -> tuple[np.ndarray, np.ndarray]:
        """Per event: the state row of its principal and of the principal's peer group (-1:
        none). A peer group has a state row of its own, named ``PEER_PREFIX + group``."""
        batch = users.unique(maintain_order=True).to_list()
        for name in batch:
            if name not in self.principals_:
                self.principals_[name] = len(self.principals_)
                group = self.settings.peer_group(name)
                if group is not None and PEER_PREFIX + group not in self.principals_:
                    self.principals_[PEER_PREFIX + group] = len(self.principals_)
        grow = len(self.principals_) - self.state_.shape[0]
        if grow > 0:
            self._grow(max(grow, self.state_.shape[0] // 2, 64))
        # map only this batch's principals: the cost follows the batch, not the population
        rows = [self.principals_[name] for name in batch]
        peers = []
        for name in batch:
            group = self.settings.peer_group(name)
            peers.append(self.principals_[PEER_PREFIX + group] if group is not None else -1)
        idx = users.replace_strict(batch, rows, return_dtype=pl.Int64)
        peer = users.replace_strict(batch, peers, return_dtype=pl.Int64)
        return np.ascontiguousarray(idx.to_numpy()), np.ascontiguousarray(peer.to_numpy())

    def _grow(self, extra: int) -> None:
        """Add ``extra`` zeroed principal rows to the state and the daily highs."""
        self.state_ = _grown(self.state_, extra)
        self.highs_ = _grown(self.highs_, extra)

    # ------------------------------------------------------------------ output
    def frame(self, batch: FeatureBatch, mask: np.ndarray | None = None) -> pl.DataFrame:
        """The feature frame of a batch: context columns, every output, the model features;
        only the rows where ``mask`` is true when one is given."""
        events, out, model, tables = batch.events, batch.out, batch.model, batch.tables
        if mask is not None:
            keep = pl.Series(mask)
            events, out, model, tables = (
                events.filter(keep),
                out[mask],
                model[mask],
                tables.filter(keep),
            )
        context = events.select(
            *CONTEXT_COLUMNS, row_count=pl.coalesce("rows_returned", "rows_affected")
        ).with_columns(tables=tables)
        feats = pl.DataFrame(
            {name: out[:, i] for i, name in enumerate(K.OUT_COLUMNS)}
            | {name: model[:, i] for i, name in enumerate(MODEL_FEATURES)},
            schema={
                **dict.fromkeys(K.OUT_COLUMNS, pl.Float64),
                **dict.fromkeys(MODEL_FEATURES, pl.Float64),
            },
        )
        return pl.concat([context, feats], how="horizontal")

    # ------------------------------------------------------------------ state
    def save_state(self, directory: Path) -> list[Path]:
        """Write the state as ``state.npz`` (no pickled objects) and ``state.json``."""
        directory.mkdir(parents=True, exist_ok=True)
        # The pair table goes as it is: an expired entry reads exactly like an absent one, and
        # compacting it first would hold a second copy of the table while the service runs.
        npz = directory / "state.npz"
        with npz.open("wb") as fh:
            np.savez_compressed(
                fh,
                principal_state=self.state_[: len(self.principals_)],
                principal_highs=self.highs_[: len(self.principals_)],
                keys=self.keys_,
                kinds=self.kinds_,
                ta=self.ta_,
                va=self.va_,
            )
        meta = {
            "engine_version": ENGINE_VERSION,
            "spec_hash": self.spec_hash,
            "principals": list(self.principals_),
            "table_size": self.size_,
            "events_seen": self.events_seen_,
            "last_event_time": self.last_event_time_,
            "first_event_time": self.first_event_time_,
            "time_pending": None if math.isnan(self.time_pending_) else self.time_pending_,
            "events_time_held": self.events_time_held_,
        }
        js = directory / "state.json"
        js.write_text(json.dumps(meta, indent=1))
        return [npz, js]

    def load_state(self, directory: Path) -> None:
        """Restore state written by :meth:`save_state`; refuses another feature spec."""
        try:
            meta = json.loads((directory / "state.json").read_text())
            with np.load(directory / "state.npz", allow_pickle=False) as z:
                arrays = {k: z[k] for k in ("principal_state", "keys", "kinds", "ta", "va")}
                highs = z["principal_highs"] if "principal_highs" in z.files else None
        except (OSError, ValueError, KeyError) as exc:
            raise ModelError(f"cannot read feature state in {directory}: {exc}") from exc
        if meta.get("spec_hash") != self.spec_hash:
            raise ModelError(
                f"feature state in {directory} was built for another feature spec "
                f"({meta.get('spec_hash')!s:.12} != {self.spec_hash:.12})"
            )
        names: list[str] = meta["principals"]
        state = arrays["principal_state"]
        if (
            highs is None
            or state.shape != (len(names), K.N_STATE)
            or highs.shape != (len(names), K.N_HIGH)
        ):
            raise ModelError(f"feature state in {directory} is inconsistent")
        self.principals_ = {name: i for i, name in enumerate(names)}
        self.state_ = np.array(state, dtype=np.float64, order="C")
        self.highs_ = np.array(highs, dtype=K.HIGH_DTYPE, order="C")
        self.keys_ = np.ascontiguousarray(arrays["keys"], dtype=np.int64)
        self.kinds_ = np.ascontiguousarray(arrays["kinds"], dtype=np.int8)
        self.ta_ = np.ascontiguousarray(arrays["ta"], dtype=np.float64)
        self.va_ = np.ascontiguousarray(arrays["va"], dtype=np.float64)
        self.size_ = int(meta["table_size"])
        self.events_seen_ = int(meta["events_seen"])
        self.last_event_time_ = meta["last_event_time"]
        self.first_event_time_ = meta.get("first_event_time")
        pending = meta.get("time_pending")
        self.time_pending_ = math.nan if pending is None else float(pending)
        self.events_time_held_ = int(meta.get("events_time_held", 0))

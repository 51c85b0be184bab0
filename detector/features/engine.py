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
5. model features: each tracked quantity's excess over the principal's own baseline;
6. rows that read as new at the stream's clock (unused past their horizon) are dropped.

The state stays bounded whatever the input (:class:`StateBounds`): names that never logged in
hold at most ``max_unproven`` rows, later ones share the ``UNKNOWN_PRINCIPAL`` row, and none of
them changes a feature of a principal that did log in (tests/test_state_bounds.py).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Final

import numpy as np
import polars as pl

from detector.errors import ModelError
from detector.features import kernel as K
from detector.features.settings import FeatureSettings, StateBounds
from detector.features.sqlshape import (
    KIND_CODES,
    ShapeCache,
    dialect_expr,
    row_fingerprint_expr,
    stable_hash,
)
from detector.schema import ACTIONS
from detector.sqltext import ANALYSED_CHARS

ENGINE_VERSION: Final = 8
#: Layout of the saved state (state.npz + state.json); version 1 files still load.
STATE_VERSION: Final = 2

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
#: The state row shared by the failed logins of new names once StateBounds.max_unproven
#: names that never got in hold rows of their own.
UNKNOWN_PRINCIPAL: Final = "\x00unknown"

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
    (n x len(OUT_COLUMNS)) and the tables touched; the model matrix (n x len(MODEL_FEATURES))
    is made from the outputs when first asked for, so that work can happen in the thread that
    scores the batch while the kernel goes on to the next."""

    events: pl.DataFrame
    out: np.ndarray
    tables: pl.Series

    @cached_property
    def model(self) -> np.ndarray:
        return _model_matrix(self.out) if self.out.shape[0] else np.empty((0, len(MODEL_FEATURES)))


@dataclass(frozen=True)
class Prepared:
    """One batch made ready for the kernel by :meth:`FeatureEngine.prepare`: the events (with
    their derived tenant and fingerprint), the per-event columns, the hashed ids (address,
    client, tenant, session), OFFSET values, tables touched and how many statements were cut
    to the analysed length."""

    events: pl.DataFrame
    cols: dict[str, np.ndarray]
    ids: tuple[np.ndarray, ...]
    offsets: np.ndarray
    tables: pl.Series
    cut: int


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

    def __init__(
        self,
        settings: FeatureSettings | None = None,
        *,
        max_statement_chars: int = ANALYSED_CHARS,
        bounds: StateBounds | None = None,
    ) -> None:
        self.settings = settings or FeatureSettings()
        self.bounds = bounds or StateBounds()
        self._bounds = np.zeros(K.N_BOUNDS)
        self._bounds[K.B_IDLE_DAYS] = self.bounds.idle_days
        self._bounds[K.B_UNPROVEN_S] = self.bounds.unproven_idle_s
        #: Only this many leading characters of a statement are read for its shape.
        self.max_statement_chars = max_statement_chars
        #: How many statements were longer than that (their shape is of the first part), in
        #: all and in the last batch.
        self.statements_cut_ = 0
        self.batch_statements_cut_ = 0
        self.params = _params(self.settings)
        self.expiry = K.default_expiry(self.params)
        self.spec = feature_spec(self.settings)
        self.spec_hash = spec_hash(self.spec)
        self._shapes = ShapeCache(self.settings, max_chars=max_statement_chars)
        self._hash_cache: dict[str, int] = {}
        self._table_cache: dict[str, tuple[bool, int, float, bool]] = {}
        keys = "|".join(re.escape(k) for k in self.settings.tenant_keys)
        self._tenant_key_res = (
            rf"(?i)\b(?:{keys})\s*=\s*'([^']{{1,64}})'",
            rf"(?i)\b(?:{keys})\s*=\s*([0-9]+)\b",
        )
        #: principal (or peer group) name -> state row, and back (None: a free row)
        self.principals_: dict[str, int] = {}
        self.row_names_: list[str | None] = []
        self.free_rows_: list[int] = []
        self.state_ = np.zeros((0, K.N_STATE))
        self.highs_ = np.zeros((0, K.N_HIGH), dtype=K.HIGH_DTYPE)
        self.in_use_ = np.zeros(0, dtype=np.bool_)
        #: the stream's clock and day count, and the next pair-entry id (kernel.C_*)
        self.clock_ = _new_clock()
        #: events of new names folded into the UNKNOWN_PRINCIPAL row, and rows dropped
        self.events_folded_ = 0
        self.rows_dropped_ = 0
        self.keys_ = np.full(1024, K.EMPTY, dtype=np.int64)
        self.kinds_ = np.zeros(1024, dtype=np.int8)
        self.ta_ = np.zeros(1024)
        self.va_ = np.zeros(1024)
        #: per entry of the pair table: a volume counter's recent high (kernel WAKE_S)
        self.pa_ = np.zeros(1024)
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

    # ------------------------------------------------------------------ transform
    def transform(self, events: pl.DataFrame) -> pl.DataFrame:
        """Feature rows for ``events`` (canonical schema), in the same order; updates state."""
        return self.frame(self.update(events))

    def update(self, events: pl.DataFrame) -> FeatureBatch:
        """Advance the state over ``events`` and compute their features, without building the
        feature frame (see :meth:`frame`): a scorer materialises only the rows it keeps."""
        return self.advance(self.prepare(events))

    def prepare(self, events: pl.DataFrame) -> Prepared:
        """The stateless half of :meth:`update`: each event's statement shape, tables, flags and
        ids, which depend on the events and the settings alone (the caches it fills change no
        result). It may run ahead on the next batch, in another thread, while :meth:`advance`
        runs the kernel over this one (as ``pipeline.score`` and ``pipeline.train`` do)."""
        n = events.height
        if n == 0:
            return Prepared(
                events, {}, (), np.empty(0), pl.Series("tables", [], pl.List(pl.String)), 0
            )
        prep = self._prepare(events)
        events = events.with_columns(
            tenant_id=self._tenants(events, prep), fingerprint=prep["fp"].cast(pl.Int64)
        )
        return Prepared(
            events,
            {c: prep[c].to_numpy() for c in prep.columns if c not in ("tables", "cut")},
            tuple(
                self._ids(events[c]) for c in ("client_ip", "client_app", "tenant_id", "session_id")
            ),
            self._offsets(events, prep),
            prep["tables"],
            int(prep["cut"].sum()),
        )

    def advance(self, prepared: Prepared) -> FeatureBatch:
        """The stateful half of :meth:`update`: the kernel over one prepared batch, in order."""
        events, cols = prepared.events, prepared.cols
        n = events.height
        self.batch_statements_cut_ = prepared.cut
        self.statements_cut_ += prepared.cut
        if n == 0:
            return FeatureBatch(events, np.empty((0, K.N_OUT)), prepared.tables)
        if self.first_event_time_ is None:  # the first event in arrival order
            self.first_event_time_ = float(cols["t"][0])
        watermark = math.nan if self.last_event_time_ is None else self.last_event_time_
        times, watermark, self.time_pending_, held = K.hold_times(
            cols["t"], watermark, self.time_pending_, MAX_AHEAD_S
        )
        self.events_time_held_ += held
        pidx, peer = self._principal_index(events["db_user"], cols["action_code"])
        ip, app, tenant, session = prepared.ids
        out, self.keys_, self.kinds_, self.ta_, self.va_, self.pa_, self.size_ = K.run(
            times,
            pidx,
            peer,
            ip,
            app,
            tenant,
            session,
            cols["table_id"],
            cols["fp"],
            cols["action_code"],
            cols["rows"],
            cols["sensitive"],
            cols["agg_all"],
            cols["bulk"],
            cols["copy_out"],
            cols["whole_read"],
            prepared.offsets,
            cols["hour"],
            cols["known_size"],
            self.state_,
            self.highs_,
            self.keys_,
            self.kinds_,
            self.ta_,
            self.va_,
            self.pa_,
            self.size_,
            self.params,
            self.expiry,
            self.first_event_time_,
            _CAP,
            self.clock_,
            self._bounds,
        )
        self._drop_stale_rows()
        self.events_seen_ += n
        self.last_event_time_ = watermark
        return FeatureBatch(events, out, prepared.tables)

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
            h=row_fingerprint_expr(
                "statement_text", dialect_expr("db_system"), self.max_statement_chars
            ),
            cut=pl.col("statement_text").str.len_chars() > self.max_statement_chars,
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
            "cut",
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
        if len(cache) > _HASH_CACHE_MAX:
            cache.clear()
        ids = [cache.get(u) or cache.setdefault(u, stable_hash(u) or 1) for u in uniq]
        mapped = column.replace_strict(uniq, ids, default=0, return_dtype=pl.Int64)
        return np.ascontiguousarray(mapped.to_numpy())

    def _principal_index(
        self, users: pl.Series, action_code: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Per event: the state row of its principal and of the principal's peer group (-1:
        none). A peer group has a state row of its own, named ``PEER_PREFIX + group``, made
        once a member that got in needs it. A new name with failed logins only in this batch
        gets a row of its own while fewer than ``bounds.max_unproven`` names that never got in
        hold one; past that its events share the ``UNKNOWN_PRINCIPAL`` row."""
        batch = users.unique(maintain_order=True).to_list()
        got_in = set(
            users.filter(pl.Series(action_code != _CODE["login_failed"])).unique().to_list()
        )
        unproven = self._unproven_rows()
        unknown = -1
        rows, peers = [], []
        for name in batch:
            row = self.principals_.get(name)
            ok = name in got_in
            if row is None and not ok and unproven >= self.bounds.max_unproven:
                unknown = self._row(UNKNOWN_PRINCIPAL)
                rows.append(unknown)
                peers.append(-1)
                continue
            if row is None:
                row = self._row(name)
                unproven += not ok
            rows.append(row)
            group = self.settings.peer_group(name)
            # the kernel reads and writes a group only for the work of members that got in
            if group is not None and (ok or self.state_[row, K.S_PROVEN] > 0.0):
                peers.append(self._row(PEER_PREFIX + group))
            else:
                peers.append(-1)
        # map only this batch's principals: the cost follows the batch, not the population
        idx = users.replace_strict(batch, rows, return_dtype=pl.Int64).to_numpy()
        peer = users.replace_strict(batch, peers, return_dtype=pl.Int64).to_numpy()
        if unknown >= 0:
            self.events_folded_ += int(np.count_nonzero(idx == unknown))
        return np.ascontiguousarray(idx), np.ascontiguousarray(peer)

    def _row(self, name: str) -> int:
        """The state row of ``name``, taken (a free one first) when it has none."""
        row = self.principals_.get(name)
        if row is not None:
            return row
        if self.free_rows_:
            row = self.free_rows_.pop()
            self.row_names_[row] = name
        else:
            row = len(self.row_names_)
            self.row_names_.append(name)
            if row >= self.state_.shape[0]:
                self._grow(max(self.state_.shape[0] // 2, 64))
        self.principals_[name] = row
        self.in_use_[row] = True
        return row

    def _unproven_rows(self) -> int:
        """Rows held by names that never got in (the shared row not counted)."""
        used = self.state_[: len(self.row_names_)]
        held = int(np.count_nonzero((used[:, K.S_SEEN] > 0.0) & (used[:, K.S_PROVEN] == 0.0)))
        shared = self.principals_.get(UNKNOWN_PRINCIPAL)
        if shared is not None and used[shared, K.S_SEEN] > 0.0 and used[shared, K.S_PROVEN] == 0:
            held -= 1
        return held

    def _drop_stale_rows(self) -> None:
        """Free the rows that read like absent ones at the stream's clock (see
        kernel.stale_rows): the kernel would clear each at its next event, so dropping them
        changes no result."""
        stale = K.stale_rows(self.state_, self.in_use_, self.clock_, self._bounds)
        if not stale.shape[0]:
            return
        for row in stale.tolist():
            name = self.row_names_[row]
            assert name is not None
            del self.principals_[name]
            self.row_names_[row] = None
            self.free_rows_.append(row)
        self.in_use_[stale] = False
        self.state_[stale] = 0.0
        self.highs_[stale] = 0.0
        self.rows_dropped_ += int(stale.shape[0])

    def _grow(self, extra: int) -> None:
        """Add ``extra`` zeroed principal rows to the state and the daily highs."""
        self.state_ = _grown(self.state_, extra)
        self.highs_ = _grown(self.highs_, extra)
        self.in_use_ = _grown(self.in_use_, extra)

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
        return self.snapshot_state().write(directory)

    def snapshot_state(self) -> StateCopy:
        """A copy of the state as it stands, for writing while the engine goes on: copying
        takes a fraction of the time compressing and writing it does (see StateCopy.write).
        Only rows in use are copied; the pair table goes as it is (an expired entry reads
        exactly like an absent one)."""
        rows = np.flatnonzero(self.in_use_)
        arrays: dict[str, np.ndarray] = {
            "principal_state": self.state_[rows],
            "principal_highs": self.highs_[rows],
            "keys": self.keys_.copy(),
            "kinds": self.kinds_.copy(),
            "ta": self.ta_.copy(),
            "va": self.va_.copy(),
            "peaks": self.pa_.copy(),
        }
        clock = self.clock_
        meta: dict[str, Any] = {
            "engine_version": ENGINE_VERSION,
            "state_version": STATE_VERSION,
            "spec_hash": self.spec_hash,
            "principals": [self.row_names_[r] for r in rows.tolist()],
            "table_size": self.size_,
            "events_seen": self.events_seen_,
            "last_event_time": self.last_event_time_,
            "first_event_time": self.first_event_time_,
            "time_pending": None if math.isnan(self.time_pending_) else self.time_pending_,
            "events_time_held": self.events_time_held_,
            "events_folded": self.events_folded_,
            "rows_dropped": self.rows_dropped_,
            "clock": {
                "time": None if math.isnan(clock[K.C_CLOCK]) else float(clock[K.C_CLOCK]),
                "day": None if math.isinf(clock[K.C_DAY]) else float(clock[K.C_DAY]),
                "days": float(clock[K.C_DAYS]),
                "next_key": float(clock[K.C_NEXT_KEY]),
            },
        }
        return StateCopy(arrays, meta)

    def load_state(self, directory: Path) -> None:
        """Restore state written by :meth:`save_state` (this state version or the one before);
        refuses another feature spec."""
        try:
            meta = json.loads((directory / "state.json").read_text())
            with np.load(directory / "state.npz", allow_pickle=False) as z:
                arrays = {k: z[k] for k in ("principal_state", "keys", "kinds", "ta", "va")}
                highs = z["principal_highs"] if "principal_highs" in z.files else None
                # a state written before the wake test holds no highs: none known yet
                peaks = z["peaks"] if "peaks" in z.files else np.zeros(arrays["va"].shape)
        except (OSError, ValueError, KeyError) as exc:
            raise ModelError(f"cannot read feature state in {directory}: {exc}") from exc
        if meta.get("spec_hash") != self.spec_hash:
            raise ModelError(
                f"feature state in {directory} was built for another feature spec "
                f"({meta.get('spec_hash')!s:.12} != {self.spec_hash:.12})"
            )
        version = meta.get("state_version", 1)
        if version not in (1, STATE_VERSION):
            raise ModelError(
                f"feature state in {directory} has state version {version}; this exfilwatch "
                f"reads versions 1 and {STATE_VERSION}"
            )
        names: list[str] = meta["principals"]
        state = arrays["principal_state"]
        width = K.N_STATE_V1 if version == 1 else K.N_STATE
        if (
            highs is None
            or state.shape != (len(names), width)
            or highs.shape != (len(names), K.N_HIGH)
            or not (arrays["keys"].shape == arrays["va"].shape == peaks.shape)
        ):
            raise ModelError(f"feature state in {directory} is inconsistent")
        if version == 1:
            state, clock = _upgraded_v1(state, meta.get("last_event_time"))
        else:
            saved = meta["clock"]
            clock = _new_clock()
            clock[K.C_CLOCK] = math.nan if saved["time"] is None else saved["time"]
            clock[K.C_DAY] = -math.inf if saved["day"] is None else saved["day"]
            clock[K.C_DAYS] = saved["days"]
            clock[K.C_NEXT_KEY] = saved["next_key"]
        self.principals_ = {name: i for i, name in enumerate(names)}
        self.row_names_ = list(names)
        self.free_rows_ = []
        self.state_ = np.array(state, dtype=np.float64, order="C")
        self.highs_ = np.array(highs, dtype=K.HIGH_DTYPE, order="C")
        self.in_use_ = np.ones(len(names), dtype=np.bool_)
        self.clock_ = clock
        self.keys_ = np.ascontiguousarray(arrays["keys"], dtype=np.int64)
        self.kinds_ = np.ascontiguousarray(arrays["kinds"], dtype=np.int8)
        self.ta_ = np.ascontiguousarray(arrays["ta"], dtype=np.float64)
        self.va_ = np.ascontiguousarray(arrays["va"], dtype=np.float64)
        self.pa_ = np.ascontiguousarray(peaks, dtype=np.float64)
        self.size_ = int(meta["table_size"])
        self.events_seen_ = int(meta["events_seen"])
        self.last_event_time_ = meta["last_event_time"]
        self.first_event_time_ = meta.get("first_event_time")
        pending = meta.get("time_pending")
        self.time_pending_ = math.nan if pending is None else float(pending)
        self.events_time_held_ = int(meta.get("events_time_held", 0))
        self.events_folded_ = int(meta.get("events_folded", 0))
        self.rows_dropped_ = int(meta.get("rows_dropped", 0))


@dataclass(frozen=True)
class StateCopy:
    """The feature state at one moment (see FeatureEngine.snapshot_state), owning its arrays:
    writing it needs nothing of the engine, so it can happen in another thread."""

    arrays: dict[str, np.ndarray]
    meta: dict[str, Any]

    def write(self, directory: Path) -> list[Path]:
        """Write ``state.npz`` (no pickled objects) and ``state.json`` into ``directory``."""
        directory.mkdir(parents=True, exist_ok=True)
        npz = directory / "state.npz"
        with npz.open("wb") as fh:
            a = self.arrays
            np.savez_compressed(
                fh,
                principal_state=a["principal_state"],
                principal_highs=a["principal_highs"],
                keys=a["keys"],
                kinds=a["kinds"],
                ta=a["ta"],
                va=a["va"],
                peaks=a["peaks"],
            )
        js = directory / "state.json"
        js.write_text(json.dumps(self.meta, indent=1))
        return [npz, js]


#: Distinct strings whose stable ids are cached (addresses, client apps, tenants, sessions);
#: the cache starts again past it, so a flood of new session ids cannot grow it without end.
_HASH_CACHE_MAX: Final = 200_000


def _new_clock() -> np.ndarray:
    """The clock of a stream that has not begun (see kernel.C_*)."""
    clock = np.zeros(K.N_CLOCK)
    clock[K.C_CLOCK] = math.nan
    clock[K.C_DAY] = -math.inf
    return clock


def _upgraded_v1(state: np.ndarray, last_event_time: float | None) -> tuple[np.ndarray, np.ndarray]:
    """State rows and clock of a version-1 file in this layout. Every row counts as one that
    got in (version 1 did not record it), keeps its row number as the id of its pair entries
    (what version 1 keyed them by), and was last seen on the stream's day count 0."""
    n = state.shape[0]
    rows = np.zeros((n, K.N_STATE))
    rows[:, : K.N_STATE_V1] = state
    rows[:, K.S_PROVEN] = 1.0
    rows[:, K.S_KEY] = np.arange(n, dtype=np.float64)
    clock = _new_clock()
    if last_event_time is not None:
        clock[K.C_CLOCK] = float(last_event_time)
        clock[K.C_DAY] = math.floor(float(last_event_time) / 86400.0)
    clock[K.C_NEXT_KEY] = float(n)
    return rows, clock

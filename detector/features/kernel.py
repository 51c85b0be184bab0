"""The stateful part of the feature engine: one sequential pass over a batch, compiled.

Events are processed in arrival order. Per-principal state lives in a dense float matrix (one
row per principal); pair state ((principal, address), (principal, tenant), ...) lives in one
open-addressing hash table of four parallel arrays. Every pair kind has an expiry and a lookup
treats an entry older than its expiry exactly like an absent one, so dropping expired entries
when the table is rebuilt cannot change any result: cutting one stream into different batches
yields the same features.

Counters are exponentially decayed (value * exp(-dt / tau)). A principal's past is kept two
ways: for counts and volumes, the previous high (the maximum over its last 35 active days of
closed one-hour windows, so monthly jobs stay known); for habits (aggregating over all
tenants, bulk reads, COPY, new addresses and clients), the decayed share of its events that
did it.
"""

from __future__ import annotations

import math
from typing import Final

import numpy as np
from numba import njit

# --- pair kinds in the hash table ---------------------------------------------------------
K_ADDR_PAIR: Final = 1
K_APP_PAIR: Final = 2
K_TENANT_PAIR: Final = 3
K_TABLE_PAIR: Final = 4
K_FP_PAIR: Final = 5
K_ADDR: Final = 6
K_TABLE_SIZE: Final = 7
K_SESSION: Final = 8  # (principal, session): decayed statements of the session
K_SESSION_ROWS: Final = 9  # (principal, session): decayed sensitive rows of the session
K_SESSION_SHAPES: Final = 10  # (principal, session): distinct statement shapes so far
K_SESSION_FP: Final = 11  # (session, shape): the session ran this shape
K_SESSION_TABLES: Final = 12  # (principal, session): distinct sensitive tables so far
K_SESSION_TABLE: Final = 13  # (session, table): the session read this sensitive table
K_SHAPE_SEEN: Final = 14  # (principal, shape): first seen (va) and last seen (ta)
K_SHAPE_ANY: Final = 15  # (0, shape): first seen by any principal
K_ADDR_SENS1H: Final = 16  # (principal, address): decayed sensitive rows, tau 1 h
K_ADDR_SENS24H: Final = 17  # (principal, address): decayed sensitive rows, tau 24 h
K_ADDR_NEW_RUNS: Final = 18  # (principal, address): decayed runs of new shapes, tau 1 h
K_TABLE_SEEN: Final = 19  # (principal, table): first read (va) and last read (ta)
K_COV_HIGH: Final = 20  # (principal, table): highest coverage of the table before today
K_COV_TODAY: Final = 21  # (principal, table): highest coverage today (ta: when)
K_TABLE_COV: Final = 22  # (principal, (address, table)): decayed rows read, tau P_TAU_COV
K_ADDR_OK: Final = 23  # (principal, address): first (va) and last (ta) success from it
K_FAIL_USUAL: Final = 24  # (principal, 0): decayed failed logins from its established addresses
K_FAIL_HIGH: Final = 25  # (principal, 0): highest such burst before today (log1p)
K_FAIL_TODAY: Final = 26  # (principal, 0): highest such burst today (ta: when)
N_KINDS: Final = 27

EMPTY: Final = np.int64(-(2**63))

# --- action codes (index into detector.schema.ACTIONS) -------------------------------------
A_READ: Final = 0
A_COPY: Final = 4
A_LOGIN: Final = 5
A_LOGIN_FAILED: Final = 6

# --- parameters (indices into the params vector) --------------------------------------------
P_TAU_RATE, P_TAU_1H, P_TAU_24H, P_TAU_TEN, P_W_TEN, P_W_TAB = 0, 1, 2, 3, 4, 5
P_TAU_COV, P_TAU_FP, P_TAU_FAIL, P_TAU_BASE, P_TAU_HOUR, P_PAIR_EXPIRY = 6, 7, 8, 9, 10, 11
P_WINDOW: Final = 12
P_NOVELTY: Final = 13
P_TAU_SESSION: Final = 14
P_SESSION_EXPIRY: Final = 15
P_OFF_HOURS_SHARE: Final = 16
P_SETTLED: Final = 17  # events of its own history at which a principal's hours weigh half
P_THIN: Final = 18  # below this decayed event count a principal is compared with its peers too
P_HOUR_PRIOR: Final = 19  # pseudo-events per hour of the day before any hour is known
P_DAY_PRIOR: Final = 20  # pseudo-days (weekdays and weekend days in proportion) before any is known
P_OFF_DAY_RATIO: Final = 21  # a day type worked at most this share of its due is a rare one
P_GROWTH: Final = 22  # log of the growth over a previous high that is still usual
N_PARAMS: Final = 23

# --- tracked quantities: each yields (value, typical) output columns ------------------------
QUANTITIES: Final = (
    # counts and volumes, compared with the principal's previous high
    "rows",  # log1p(rows of this event); unknown rows -> NaN
    "sensitive_rows_1h",  # log1p(decayed rows read from sensitive tables, tau 1 h)
    "sensitive_rows_24h",  # same, tau 24 h
    "tenants_10m",  # log1p(distinct tenants touched in ~10 min)
    "tables_1h",  # log1p(distinct tables touched in ~1 h)
    "rate_5m",  # log1p(statements in ~5 min)
    "fingerprint_repeats_1h",  # log1p(repetitions of this statement shape in ~1 h)
    "table_coverage",  # log10(1 + 1e4 * rows read from this table in ~3 h / table size)
    "offset",  # log1p(OFFSET value)
    "session_statements",  # log1p(decayed statements of this session, tau 1 h)
    "session_shapes",  # log1p(distinct statement shapes this session ran)
    "session_sensitive_rows",  # log1p(decayed rows this session read from sensitive tables)
    "session_sensitive_tables",  # log1p(distinct sensitive tables this session read)
    "off_hours_sensitive_rows",  # session_sensitive_rows, in an hour the principal rarely works
    "new_shape_runs_1h",  # log1p(decayed statements of shapes new to the principal, tau 1 h)
    # habits, compared with how often the principal does them
    "aggregate_all_tenants",  # 0/1: aggregate per tenant over all of them (no filter, no LIMIT)
    "bulk_sensitive_read",  # 0/1: sensitive table read without a tenant filter
    "copy_out",  # 0/1: COPY ... TO / dump
    "new_address",  # 0/1: address first seen for this principal within the last day
    "new_client_app",  # 0/1: client app first seen for this principal within the last day
    "new_shape",  # 0/1: statement shape first run by this principal within the last day
    "new_shape_sensitive",  # 0/1: the same, on a sensitive table
    "new_shape_anyone",  # 0/1: statement shape first run by any principal within the last day
    "new_sensitive_table",  # 0/1: sensitive table first read by this principal within the last day
)
NB: Final = len(QUANTITIES)
(
    Q_ROWS,
    Q_SENS1H,
    Q_SENS24H,
    Q_TEN,
    Q_TAB,
    Q_RATE,
    Q_FP,
    Q_COV,
    Q_OFF,
    Q_SESS,
    Q_SESS_SHAPES,
    Q_SESS_ROWS,
    Q_SESS_TABLES,
    Q_OFF_ROWS,
    Q_NEW_RUNS,
    Q_AGG,
    Q_BULK,
    Q_COPY,
    Q_NADDR,
    Q_NAPP,
    Q_NSHAPE,
    Q_NSHAPE_SENS,
    Q_NSHAPE_ANY,
    Q_NTABLE,
) = range(NB)
NC: Final = Q_AGG  # quantities before this index are counts/volumes, the rest are habits

# --- per-principal state columns ------------------------------------------------------------
# column 4 is free (sensitive volumes are kept per principal and address, in pairs)
S_LAST_T, S_SEEN, S_RATE, S_TEN, S_TAB, S_FAIL = 0, 1, 2, 5, 6, 7
S_SESS_W: Final = 3  # sessions, decayed like the habits' event weight
S_BASE_W, S_WIN_START, S_FIRST_T = 8, 9, 10
HIGH_DAYS: Final = 35  # the previous high spans this many active days (monthly jobs too)
S_LAST_DAY, S_SLOT = 11, 12  # day number of the current ring slot (-1: none yet), its index
S_WHIGH0: Final = 13  # NC highs within the current window
S_RATE0: Final = S_WHIGH0 + NC  # NB - NC habit sums
S_HIST0: Final = S_RATE0 + (NB - NC)  # 24 hour-of-day bins
S_SNAP_DAY: Final = S_HIST0 + 24  # day number of the habit snapshot (0: none yet)
S_SNAP0: Final = S_SNAP_DAY + 1  # NB - NC habit shares as they stood when that day began
S_HSNAP0: Final = S_SNAP0 + (NB - NC)  # 24 hour-of-day bins as they stood when it began
# active days, decayed like the hours: weekend days, weekdays, and the last day counted (+1)
S_DAYS_WE: Final = S_HSNAP0 + 24
S_DAYS_WD: Final = S_DAYS_WE + 1
S_ACTIVE_DAY: Final = S_DAYS_WE + 2
#: Columns of the first state layout (files of state version 1 hold only these).
N_STATE_V1: Final = S_DAYS_WE + 3
# the row's bookkeeping: whether the principal ever got in (any event but a failed login; a
# peer group's row once a member's work reached it), the id its pair entries are keyed by (a
# row made afresh gets a new one, so what its former occupant left in the pair table is never
# read again), and the stream day count at its last event (see ``run``)
S_PROVEN: Final = N_STATE_V1
S_KEY: Final = N_STATE_V1 + 1
S_LAST_SDAY: Final = N_STATE_V1 + 2
N_STATE: Final = N_STATE_V1 + 3

# --- the stream's clock, kept between batches (a float vector of its own) -------------------
C_CLOCK: Final = 0  # the latest event time reached (NaN: none yet)
C_DAY: Final = 1  # the day number of the clock when the day count last moved
C_DAYS: Final = 2  # days of the stream with events: a count that skips the gaps
C_NEXT_KEY: Final = 3  # the next pair-entry id a row gets
N_CLOCK: Final = 4

# --- state bounds (a float vector of their own: not part of the feature spec) ---------------
B_IDLE_DAYS: Final = 0  # a row unused for this many days of the stream reads as new
B_UNPROVEN_S: Final = 1  # a principal that never got in, idle this long, reads as new
N_BOUNDS: Final = 2

# --- per-principal daily highs, an array of their own ---------------------------------------
#: HIGH_DAYS x NC daily highs (closed windows only), a ring of active days: six in seven of
#: the state's values. They are log-scale values compared with a 1.5x growth allowance, so
#: they are kept as float32 (7 significant digits): half the memory of a principal. Every
#: value is rounded once, when its window closes, so batching still cannot change a result.
N_HIGH: Final = HIGH_DAYS * NC
HIGH_DTYPE: Final = np.float32


# --- extra output columns after the 2 * NB (value, typical) pairs ---------------------------
O_OFF_HOURS, O_HOUR_SHARE, O_FAIL_ADDR, O_FAIL_PRINCIPAL, O_NEW_PRINCIPAL = (
    2 * NB,
    2 * NB + 1,
    2 * NB + 2,
    2 * NB + 3,
    2 * NB + 4,
)
O_COVERAGE, O_TABLE_ROWS, O_DAY_RATIO = 2 * NB + 5, 2 * NB + 6, 2 * NB + 7
O_SESSIONS: Final = 2 * NB + 8
O_FAIL_USUAL, O_FAIL_USUAL_HIGH = 2 * NB + 9, 2 * NB + 10
N_OUT: Final = 2 * NB + 11
EXTRA_OUTPUTS: Final = (
    "off_hours",
    "hour_share",
    "failed_logins_address_1h",
    "failed_logins_principal_1h",
    "new_principal",
    "coverage_ratio",
    "table_rows",
    "day_type_ratio",
    "sessions_seen",
    "failed_logins_usual_1h",
    "failed_logins_usual_high",
)
OUT_COLUMNS: Final = tuple(
    [name for q in QUANTITIES for name in (q, f"{q}_typical")] + list(EXTRA_OUTPUTS)
)
COV_SCALE: Final = 1e4
#: A volume over a window is an event's evidence while the event sustains it, by two tests.
#: Replenish: the event adds at least REPLENISH of what the counter lost to decay since its
#: last event (measured over SUSTAIN_SPAN of the window at least, so many tiny events in a row
#: do not each sustain a day's volume read an hour ago). Wake: the volume stands no lower than
#: where WAKE_S of decay from its recent high would have left it (that high decays PEAK_SLOWER
#: times slower than the counter, so a week-old high does not outweigh today's volume). A
#: growing volume passes both, and so does a steady stream at any pace (a slow scraper's page
#: brings back what decayed since the last, and the volume to its high). A burst that stopped
#: fails them once WAKE_S has passed: the events that follow at a person's pace (an agent's
#: lookups after her own scrape, from the same address) only trail it, and for them the volume
#: is reported unknown, no excess. Within WAKE_S of the burst's last event (the default
#: incident gap) they join the burst's incident anyway. The replenish test alone lets lookups
#: a minute apart carry a 3-hour coverage (each replaces the minute's decay of a few hundred
#: rows) and a 20-row lookup carry a day's volume of thousands (five minutes of its decay).
REPLENISH: Final = 0.5
SUSTAIN_SPAN: Final = 1.0 / 288.0
WAKE_S: Final = 1800.0
PEAK_SLOWER: Final = 4.0
#: A window high or daily high that holds no known value yet (every known value is >= 0).
UNKNOWN: Final = -1.0


@njit(cache=True, inline="always")
def _mix(x: np.uint64) -> np.uint64:  # pragma: no cover - compiled
    x ^= x >> np.uint64(30)
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(27)
    x *= np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    return x


@njit(cache=True, inline="always")
def pair_key(kind: int, a: int, b: int) -> np.int64:  # pragma: no cover - compiled
    """A well-mixed 64-bit key for (kind, a, b); never EMPTY."""
    h = _mix(np.uint64(b) + np.uint64(kind) * np.uint64(0x9E3779B97F4A7C15))
    k = np.int64(_mix(np.uint64(a) ^ h))
    if k == EMPTY:
        k = np.int64(k + 1)
    return k


@njit(cache=True)
def _find(keys: np.ndarray, key: np.int64) -> int:  # pragma: no cover - compiled
    mask = keys.shape[0] - 1
    i = key & mask
    while True:
        k = keys[i]
        if k == key or k == EMPTY:  # noqa: SIM109 - the form numba compiles to two compares
            return int(i)
        i = (i + 1) & mask


@njit(cache=True, inline="always")
def _decayed(
    keys: np.ndarray, ta: np.ndarray, va: np.ndarray, j: int, now: float, tau: float, expiry: float
) -> float:  # pragma: no cover - compiled
    """The decayed value of entry ``j`` at ``now`` (0 when absent or expired)."""
    if keys[j] == EMPTY or now - ta[j] > expiry:
        return 0.0
    return float(va[j] * math.exp(-max(0.0, now - ta[j]) / tau))


@njit(cache=True, inline="always")
def _accumulate(
    keys: np.ndarray,
    kinds: np.ndarray,
    ta: np.ndarray,
    va: np.ndarray,
    pa: np.ndarray,
    kind: int,
    a: int,
    b: int,
    now: float,
    tau: float,
    add: float,
    peak: bool = False,
) -> tuple[float, int, bool, bool]:  # pragma: no cover - compiled
    """Decay the (kind, a, b) counter to ``now``, add ``add``; (new value, entries added,
    whether this event sustains it, whether the counter starts afresh: it was absent or unused
    for 8 ``tau``). Sustaining: the replenish test (see REPLENISH), and with ``peak`` the peak
    test too (see WAKE_S), against the counter's recent high, ``pa`` of its entry (it moves with
    the counter: updated at the counter's time, it decays from there)."""
    k = pair_key(kind, a, b)
    j = _find(keys, k)
    added = 0
    fresh = keys[j] == EMPTY or now - ta[j] > 8.0 * tau
    value = 0.0
    lost = 0.0
    high = 0.0
    if not fresh:
        since = max(0.0, now - ta[j])
        value = va[j] * math.exp(-since / tau)
        lost = va[j] * (1.0 - math.exp(-max(now - ta[j], tau * SUSTAIN_SPAN) / tau))
        high = pa[j] * math.exp(-since / (PEAK_SLOWER * tau))
    if keys[j] == EMPTY:
        keys[j] = k
        kinds[j] = kind
        added = 1
    value += add
    va[j] = value
    ta[j] = max(ta[j], now) if value > add else now
    sustains = add >= REPLENISH * lost
    if peak:
        wake = math.exp(-(WAKE_S / tau) * (1.0 - 1.0 / PEAK_SLOWER))
        sustains = sustains and value >= wake * high
        pa[j] = max(high, value)
    return value, added, sustains, fresh


@njit(cache=True, inline="always")
def _distinct(
    keys: np.ndarray,
    kinds: np.ndarray,
    ta: np.ndarray,
    va: np.ndarray,
    count_kind: int,
    member_kind: int,
    p: int,
    owner: int,
    owner_key: int,
    member: int,
    counts: bool,
    now: float,
    expiry: float,
) -> tuple[float, int]:  # pragma: no cover - compiled
    """The number of distinct members (shapes, tables) of a session so far, counting
    ``member`` when ``counts``; (new count, entries added)."""
    added = 0
    k = pair_key(count_kind, p, owner)
    j = _find(keys, k)
    n = va[j] if _live(keys, ta, j, now, expiry) else 0.0
    if counts:
        km = pair_key(member_kind, owner_key, member)
        jm = _find(keys, km)
        if not _live(keys, ta, jm, now, expiry):
            n += 1.0
        if keys[jm] == EMPTY:
            keys[jm] = km
            kinds[jm] = member_kind
            added += 1
        ta[jm] = max(ta[jm], now)
        j = _find(keys, k)  # the insert may have taken the slot the probe ended on
    if keys[j] == EMPTY:
        keys[j] = k
        kinds[j] = count_kind
        added += 1
    va[j] = n
    ta[j] = now if not _live(keys, ta, j, now, expiry) else max(ta[j], now)
    return n, added


@njit(cache=True, inline="always")
def _first_seen(
    keys: np.ndarray,
    kinds: np.ndarray,
    ta: np.ndarray,
    va: np.ndarray,
    kind: int,
    a: int,
    b: int,
    now: float,
    expiry: float,
) -> tuple[float, int]:  # pragma: no cover - compiled
    """Record (kind, a, b) as seen at ``now``; (when it was first seen, entries added). An
    entry unseen for ``expiry`` is first seen again."""
    k = pair_key(kind, a, b)
    j = _find(keys, k)
    added = 0
    if not _live(keys, ta, j, now, expiry):
        va[j] = now
    if keys[j] == EMPTY:
        keys[j] = k
        kinds[j] = kind
        added = 1
    ta[j] = max(ta[j], now)
    return float(va[j]), added


@njit(cache=True, inline="always")
def _slot(
    keys: np.ndarray,
    kinds: np.ndarray,
    ta: np.ndarray,
    va: np.ndarray,
    kind: int,
    a: int,
    b: int,
    now: float,
) -> tuple[int, int]:  # pragma: no cover - compiled
    """The entry of (kind, a, b), made (value UNKNOWN, time ``now``) if absent; (its index,
    entries added)."""
    k = pair_key(kind, a, b)
    j = _find(keys, k)
    if keys[j] != EMPTY:
        return j, 0
    keys[j] = k
    kinds[j] = kind
    va[j] = UNKNOWN
    ta[j] = now
    return j, 1


@njit(cache=True, inline="always")
def _pair_high(
    keys: np.ndarray,
    kinds: np.ndarray,
    ta: np.ndarray,
    va: np.ndarray,
    a: int,
    b: int,
    now: float,
    value: float,
    cap: float,
    expiry: float,
    kind_high: int,
    kind_today: int,
) -> tuple[float, int]:  # pragma: no cover - compiled
    """The highest ``value`` of (a, b) on earlier days (UNKNOWN if none), then record
    ``value`` for today; (that high, entries added). The earlier days' high and today's are
    entries of kinds ``kind_high`` and ``kind_today``. Today's high joins the earlier ones when
    a later day begins, rising by at most ``cap`` over them (like the principal's highs).
    Entries unused for ``expiry`` are forgotten."""
    jh, added_h = _slot(keys, kinds, ta, va, kind_high, a, b, now)
    jt, added_t = _slot(keys, kinds, ta, va, kind_today, a, b, now)
    added = added_h + added_t
    if now - ta[jt] > expiry or now - ta[jh] > expiry:  # forgotten: nothing known
        va[jh] = UNKNOWN
        va[jt] = UNKNOWN
    today = math.floor(now / 86400.0)
    if va[jt] >= 0.0 and math.floor(ta[jt] / 86400.0) < today:  # an earlier day closed
        high = va[jh]
        va[jh] = va[jt] if high < 0.0 else max(high, min(va[jt], high + cap))
        va[jt] = UNKNOWN
    previous = va[jh]
    if math.floor(ta[jt] / 86400.0) <= today:
        va[jt] = max(va[jt], value)
    ta[jt] = max(ta[jt], now)
    ta[jh] = max(ta[jh], now)
    return previous, added


@njit(cache=True, inline="always")
def _day_ratio(
    ps: np.ndarray,
    p: int,
    day_now: float,
    weekend: bool,
    elapsed_we: float,
    elapsed_wd: float,
    params: np.ndarray,
) -> float:  # pragma: no cover - compiled
    """Count today as an active day of row ``p`` (decaying the earlier ones) and return how
    often, before today, it was active on days of today's kind (weekend or weekday) against
    how often on the other kind: the share of such days of the stream (``elapsed_*``, decayed
    alike) it was active on, each shrunk to its overall share by P_DAY_PRIOR pseudo-days. 1
    (or more, capped) is as often, 0 never; with no such day elapsed yet, 1."""
    mark = day_now + 1.0  # 0: no day counted yet
    counted = ps[p, S_ACTIVE_DAY]
    if mark > counted:
        if counted > 0.0:
            f = math.exp(-(mark - counted) * 86400.0 / params[P_TAU_HOUR])
            ps[p, S_DAYS_WE] *= f
            ps[p, S_DAYS_WD] *= f
        ps[p, S_DAYS_WE if weekend else S_DAYS_WD] += 1.0
        ps[p, S_ACTIVE_DAY] = mark
    we, wd = ps[p, S_DAYS_WE], ps[p, S_DAYS_WD]
    if ps[p, S_ACTIVE_DAY] == mark:  # judged by the days before today
        if weekend:
            we -= 1.0
        else:
            wd -= 1.0
    we, wd = max(0.0, we), max(0.0, wd)
    elapsed = elapsed_we + elapsed_wd
    if elapsed <= 0.0:
        return 1.0
    overall = min(1.0, (we + wd) / elapsed)
    prior = params[P_DAY_PRIOR]
    rate_we = (min(we, elapsed_we) + prior * overall) / (elapsed_we + prior)
    rate_wd = (min(wd, elapsed_wd) + prior * overall) / (elapsed_wd + prior)
    mine, other = (rate_we, rate_wd) if weekend else (rate_wd, rate_we)
    return min(1.0, mine / other) if other > 0.0 else 1.0


@njit(cache=True)
def hold_times(
    t: np.ndarray, watermark: float, pending: float, max_ahead: float
) -> tuple[np.ndarray, float, float, int]:  # pragma: no cover - compiled
    """The times the state advances by: an event more than ``max_ahead`` seconds past the
    ``watermark`` (the latest time the stream has reached; NaN: none yet) is held at the
    watermark unless the event before it was ahead too and this one agrees with it (a stream
    that resumes after a long gap moves on at its second event); a lone record stamped months
    ahead by a clock glitch does not carry the state into the future, where every later
    event would be in its past and no count would ever decay. Returns (times, watermark,
    pending time of a held event or NaN, events held)."""
    out = t.copy()
    held = 0
    for i in range(t.shape[0]):
        x = t[i]
        if math.isnan(watermark) or x <= watermark + max_ahead:
            watermark = x if math.isnan(watermark) else max(watermark, x)
            pending = math.nan
        elif not math.isnan(pending) and x >= pending - max_ahead:
            watermark = x  # the stream has moved on
            pending = math.nan
        else:
            pending = x
            out[i] = watermark
            held += 1
    return out, watermark, pending, held


@njit(cache=True)
def _elapsed_days(stream_start: float, day_now: float, tau: float) -> tuple[float, float]:
    """Weekend days and weekdays of the stream before ``day_now``, each weighted by its decay
    to ``day_now`` (time constant ``tau`` seconds), as the active days are, and the first by
    the share of it after ``stream_start``."""  # pragma: no cover
    first = math.floor(stream_start / 86400.0)
    we, wd = 0.0, 0.0
    d = day_now - 1.0
    while d >= first and (day_now - d) * 86400.0 <= 8.0 * tau:
        w = math.exp(-(day_now - d) * 86400.0 / tau)
        if d == first:  # the stream's first day counts for the part of it the stream covers
            w *= min(1.0, ((first + 1.0) * 86400.0 - stream_start) / 86400.0)
        if (d + 3) % 7 >= 5:
            we += w
        else:
            wd += w
        d -= 1.0
    return we, wd


@njit(cache=True, inline="always")
def _novel(first_seen: float, now: float, principal_first: float, novelty: float) -> float:
    """1 when a thing was first seen within ``novelty`` of ``now`` and after the principal's
    own first ``novelty`` (everything is new to a new principal: none of it counts)."""
    fresh = now - first_seen < novelty and first_seen - principal_first >= novelty
    return 1.0 if fresh else 0.0  # pragma: no cover - compiled


@njit(cache=True, inline="always")
def _live(keys: np.ndarray, ta: np.ndarray, j: int, now: float, expiry: float) -> bool:
    """Whether entry ``j`` is present and not expired at ``now``."""  # pragma: no cover
    return bool(keys[j] != EMPTY and now - ta[j] <= expiry)


@njit(cache=True, inline="always")
def _clear(ps: np.ndarray, highs: np.ndarray, r: int) -> None:  # pragma: no cover - compiled
    """Row ``r`` as a row never used: every value 0."""
    for c in range(ps.shape[1]):
        ps[r, c] = 0.0
    for c in range(highs.shape[1]):
        highs[r, c] = 0.0


@njit(cache=True, inline="always")
def _claim(ps: np.ndarray, r: int, clock: np.ndarray) -> None:  # pragma: no cover - compiled
    """Give row ``r`` a pair-entry id of its own if it is unused (a new or cleared row)."""
    if ps[r, S_SEEN] == 0.0:
        ps[r, S_KEY] = clock[C_NEXT_KEY]
        clock[C_NEXT_KEY] += 1.0


@njit(cache=True, inline="always")
def expired(
    ps: np.ndarray, r: int, now: float, days: float, bounds: np.ndarray
) -> bool:  # pragma: no cover - compiled
    """Whether row ``r``, used before, reads as new at stream time ``now`` and day count
    ``days``: a principal that got in (or a peer group) unused for ``B_IDLE_DAYS`` days of the
    stream, one that never got in idle for ``B_UNPROVEN_S`` seconds."""
    if ps[r, S_SEEN] == 0.0:
        return False
    if ps[r, S_PROVEN] > 0.0:
        return bool(days - ps[r, S_LAST_SDAY] > bounds[B_IDLE_DAYS])
    return bool(now - ps[r, S_LAST_T] > bounds[B_UNPROVEN_S])


@njit(cache=True)
def stale_rows(
    ps: np.ndarray, used: np.ndarray, clock: np.ndarray, bounds: np.ndarray
) -> np.ndarray:  # pragma: no cover - compiled
    """The rows in ``used`` that read exactly like absent ones at the stream's ``clock``:
    never used, or :func:`expired` (every later event is at that clock or past it, so such a
    row would be cleared at its next event anyway)."""
    out = np.empty(used.shape[0], dtype=np.int64)
    n = 0
    for r in range(used.shape[0]):
        if used[r] and (
            ps[r, S_SEEN] == 0.0 or expired(ps, r, clock[C_CLOCK], clock[C_DAYS], bounds)
        ):
            out[n] = r
            n += 1
    return out[:n]


@njit(cache=True)
def rebuild(
    keys: np.ndarray,
    kinds: np.ndarray,
    ta: np.ndarray,
    va: np.ndarray,
    pa: np.ndarray,
    expiry: np.ndarray,
    now: float,
    min_capacity: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:  # pragma: no cover
    """Drop expired entries and re-insert the live ones into a table of a fitting size."""
    live = 0
    for i in range(keys.shape[0]):
        if keys[i] != EMPTY and now - ta[i] <= expiry[kinds[i]]:
            live += 1
    cap = 1024
    while cap < 2 * (live + 1) or cap < min_capacity:
        cap *= 2
    nk = np.full(cap, EMPTY, dtype=np.int64)
    nkind = np.zeros(cap, dtype=np.int8)
    nta = np.zeros(cap, dtype=np.float64)
    nva = np.zeros(cap, dtype=np.float64)
    npa = np.zeros(cap, dtype=np.float64)
    for i in range(keys.shape[0]):
        if keys[i] != EMPTY and now - ta[i] <= expiry[kinds[i]]:
            j = _find(nk, keys[i])
            nk[j] = keys[i]
            nkind[j] = kinds[i]
            nta[j] = ta[i]
            nva[j] = va[i]
            npa[j] = pa[i]
    return nk, nkind, nta, nva, npa, live


@njit(cache=True, nogil=True)
def run(
    t: np.ndarray,
    pidx: np.ndarray,
    peer: np.ndarray,
    addr: np.ndarray,
    app: np.ndarray,
    tenant: np.ndarray,
    session: np.ndarray,
    table: np.ndarray,
    fp: np.ndarray,
    action: np.ndarray,
    rows: np.ndarray,
    sensitive: np.ndarray,
    agg_all: np.ndarray,
    bulk: np.ndarray,
    copy_out: np.ndarray,
    whole_read: np.ndarray,
    offset: np.ndarray,
    hour: np.ndarray,
    known_size: np.ndarray,
    ps: np.ndarray,
    highs: np.ndarray,
    keys: np.ndarray,
    kinds: np.ndarray,
    ta: np.ndarray,
    va: np.ndarray,
    pa: np.ndarray,
    size: int,
    params: np.ndarray,
    expiry: np.ndarray,
    stream_start: float,
    cap: np.ndarray,
    clock: np.ndarray,
    bounds: np.ndarray,
) -> tuple[
    np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, int
]:  # pragma: no cover
    """Compute the stateful features of one batch, updating the state in place.

    Rows and their lifetime: a row unused for its horizon (:func:`expired`, by the stream's
    ``clock``) is cleared at its next event and reads as new, so dropping it between batches
    changes nothing. A principal's history starts when it first gets in: until then (failed
    logins only) its events reach neither its peer group nor session or volume state, and its
    first success clears the row but for the failed logins before it. Those events therefore
    write nothing another principal reads, beyond the per-address failure counts.

    Returns (out, keys, kinds, ta, va, pa, size): the feature matrix (n x N_OUT) and the
    possibly rebuilt hash table (``pa``: the recent high of a volume counter's entry).
    ``clock`` is updated in place.
    """
    n = t.shape[0]
    out = np.empty((n, N_OUT), dtype=np.float64)
    vals = np.empty(NB, dtype=np.float64)
    rising = np.ones(NB, dtype=np.bool_)
    learn = np.zeros(NB - NC, dtype=np.float64)
    elapsed_day, elapsed_we, elapsed_wd = -1.0, 0.0, 0.0
    for i in range(n):
        if 2 * (size + 28) > keys.shape[0]:  # an event adds at most 24 entries
            keys, kinds, ta, va, pa, size = rebuild(keys, kinds, ta, va, pa, expiry, t[i], 0)
        p = pidx[i]
        g = peer[i]  # the row of the principal's peer group, or -1
        now = t[i]
        if math.isnan(clock[C_CLOCK]) or now > clock[C_CLOCK]:
            clock[C_CLOCK] = now
        if math.floor(clock[C_CLOCK] / 86400.0) > clock[C_DAY]:
            clock[C_DAY] = math.floor(clock[C_CLOCK] / 86400.0)
            clock[C_DAYS] += 1.0
        failed = action[i] == A_LOGIN_FAILED
        if expired(ps, p, clock[C_CLOCK], clock[C_DAYS], bounds):
            _clear(ps, highs, p)
        elif ps[p, S_SEEN] > 0.0 and ps[p, S_PROVEN] == 0.0 and not failed:
            # the first success: the principal's history starts now, with the failed logins
            # that came before it
            kept = ps[p, S_FAIL] * math.exp(-max(0.0, now - ps[p, S_LAST_T]) / params[P_TAU_FAIL])
            _clear(ps, highs, p)
            ps[p, S_FAIL] = kept
        _claim(ps, p, clock)
        if not failed:
            ps[p, S_PROVEN] = 1.0
        ps[p, S_LAST_SDAY] = clock[C_DAYS]
        # a principal that never got in has no peers: guessing names cannot move a group
        unproven = ps[p, S_PROVEN] == 0.0
        if unproven:
            g = -1
        if g >= 0:
            if expired(ps, g, clock[C_CLOCK], clock[C_DAYS], bounds):
                _clear(ps, highs, g)
            _claim(ps, g, clock)
            ps[g, S_PROVEN] = 1.0
            ps[g, S_LAST_SDAY] = clock[C_DAYS]
        pk = int(ps[p, S_KEY])  # what the principal's pair entries are keyed by
        new_principal = ps[p, S_SEEN] == 0.0
        dt = 0.0 if new_principal else max(0.0, now - ps[p, S_LAST_T])
        ps[p, S_LAST_T] = now if new_principal else max(ps[p, S_LAST_T], now)
        ps[p, S_SEEN] += 1.0
        ps[p, S_RATE] *= math.exp(-dt / params[P_TAU_RATE])
        ps[p, S_TEN] *= math.exp(-dt / params[P_TAU_TEN])
        ps[p, S_TAB] *= math.exp(-dt / params[P_TAU_1H])
        ps[p, S_FAIL] *= math.exp(-dt / params[P_TAU_FAIL])
        r = rows[i]
        known_rows = not math.isnan(r)
        reading = action[i] == A_READ or action[i] == A_COPY

        # novelty of address and client app for this principal (and whether each thing is seen
        # for the first time now, which the habits learn from while the principal is young)
        fresh_addr = fresh_app = fresh_shape = fresh_any = fresh_table = False
        new_addr = 0.0
        if addr[i] != 0:
            k = pair_key(K_ADDR_PAIR, pk, addr[i])
            j = _find(keys, k)
            if keys[j] == EMPTY or now - ta[j] > params[P_PAIR_EXPIRY]:
                va[j] = now  # first seen (again)
            if keys[j] == EMPTY:
                keys[j] = k
                kinds[j] = K_ADDR_PAIR
                size += 1
            ta[j] = max(ta[j], now)
            new_addr = _novel(va[j], now, ps[p, S_FIRST_T], params[P_NOVELTY])
            fresh_addr = va[j] == now
        new_app = 0.0
        if app[i] != 0:
            k = pair_key(K_APP_PAIR, pk, app[i])
            j = _find(keys, k)
            if keys[j] == EMPTY or now - ta[j] > params[P_PAIR_EXPIRY]:
                va[j] = now  # first seen (again)
            if keys[j] == EMPTY:
                keys[j] = k
                kinds[j] = K_APP_PAIR
                size += 1
            ta[j] = max(ta[j], now)
            new_app = _novel(va[j], now, ps[p, S_FIRST_T], params[P_NOVELTY])
            fresh_app = va[j] == now

        # distinct tenants in a short window
        if tenant[i] != 0:
            k = pair_key(K_TENANT_PAIR, pk, tenant[i])
            j = _find(keys, k)
            if keys[j] == EMPTY or now - ta[j] > params[P_W_TEN]:
                ps[p, S_TEN] += 1.0
            if keys[j] == EMPTY:
                keys[j] = k
                kinds[j] = K_TENANT_PAIR
                size += 1
            ta[j] = max(ta[j], now)

        # distinct tables, coverage of this table, learned table size
        coverage = 0.0
        tsize = math.nan
        cov_rising = True
        if table[i] != 0:
            k = pair_key(K_TABLE_SIZE, 0, table[i])
            j = _find(keys, k)
            if keys[j] == EMPTY:
                keys[j] = k
                kinds[j] = K_TABLE_SIZE
                va[j] = 0.0
                size += 1
            ta[j] = max(ta[j], now)
            if whole_read[i] and known_rows and r > va[j]:
                va[j] = r
            tsize = known_size[i] if not math.isnan(known_size[i]) else va[j]
            k = pair_key(K_TABLE_PAIR, pk, table[i])
            j = _find(keys, k)
            fresh = keys[j] == EMPTY or now - ta[j] > expiry[K_TABLE_PAIR]
            if fresh or now - ta[j] > params[P_W_TAB]:
                ps[p, S_TAB] += 1.0
            if keys[j] == EMPTY:
                keys[j] = k
                kinds[j] = K_TABLE_PAIR
                size += 1
            ta[j] = max(ta[j], now) if not fresh else now
            # the rows read of it are kept per (principal, address), like the sensitive
            # volumes: a dump from a stolen credential's new address does not make the
            # application's own servers look as if they read the whole table too
            cov, added, cov_rising, _ = _accumulate(
                keys,
                kinds,
                ta,
                va,
                pa,
                K_TABLE_COV,
                pk,
                int(pair_key(K_TABLE_COV, addr[i], table[i])),
                now,
                params[P_TAU_COV],
                r if known_rows and reading else 0.0,
                True,
            )
            size += added
            if tsize > 0.0:
                coverage = cov / tsize

        # repetitions of this statement shape
        repeats = 0.0
        repeats_rising = True
        if fp[i] != 0:
            repeats, added, repeats_rising, _ = _accumulate(
                keys, kinds, ta, va, pa, K_FP_PAIR, pk, fp[i], now, params[P_TAU_FP], 1.0, True
            )
            size += added

        # the session: statements, shapes, sensitive rows and tables, against the principal's
        # usual sessions (decayed counts follow a pooled connection's recent hour; the distinct
        # counts last while the session does)
        statement = action[i] != A_LOGIN and action[i] != A_LOGIN_FAILED
        sess_n = 0.0
        sess_shapes = 0.0
        sess_rows = 0.0
        sess_tables = 0.0
        new_session = False
        # (a failed login of a principal that never got in opened no session of it)
        if session[i] != 0 and not unproven:
            sexp = params[P_SESSION_EXPIRY]
            tau_s = params[P_TAU_SESSION]  # sexp is 8 tau_s, the expiry _accumulate applies
            skey = pair_key(K_SESSION, pk, session[i])
            sess_n, added, _, new_session = _accumulate(
                keys,
                kinds,
                ta,
                va,
                pa,
                K_SESSION,
                pk,
                session[i],
                now,
                tau_s,
                1.0 if statement else 0.0,
            )
            size += added
            sens_r = r if known_rows and reading and sensitive[i] else 0.0
            sess_rows, added, _, _ = _accumulate(
                keys, kinds, ta, va, pa, K_SESSION_ROWS, pk, session[i], now, tau_s, sens_r
            )
            size += added
            sess_shapes, added = _distinct(
                keys,
                kinds,
                ta,
                va,
                K_SESSION_SHAPES,
                K_SESSION_FP,
                pk,
                session[i],
                int(skey),
                fp[i],
                statement and fp[i] != 0,
                now,
                sexp,
            )
            size += added
            sess_tables, added = _distinct(
                keys,
                kinds,
                ta,
                va,
                K_SESSION_TABLES,
                K_SESSION_TABLE,
                pk,
                session[i],
                int(skey),
                table[i],
                reading and sensitive[i] and table[i] != 0,
                now,
                sexp,
            )
            size += added

        # statement-shape vocabulary: a read's shape this principal (or anyone) first ran within
        # the last day (a DBA's new CREATE INDEX or ANALYZE moves no data out; a new SELECT can)
        new_shape = 0.0
        new_shape_any = 0.0
        if fp[i] != 0 and statement and reading:
            first, added = _first_seen(
                keys, kinds, ta, va, K_SHAPE_SEEN, pk, fp[i], now, params[P_PAIR_EXPIRY]
            )
            size += added
            new_shape = _novel(first, now, ps[p, S_FIRST_T], params[P_NOVELTY])
            fresh_shape = first == now
            first, added = _first_seen(
                keys, kinds, ta, va, K_SHAPE_ANY, 0, fp[i], now, params[P_PAIR_EXPIRY]
            )
            size += added
            new_shape_any = _novel(first, now, ps[p, S_FIRST_T], params[P_NOVELTY])
            fresh_any = first == now

        # a sensitive table this principal first read within the last day
        new_table = 0.0
        if table[i] != 0 and reading and sensitive[i]:
            first, added = _first_seen(
                keys, kinds, ta, va, K_TABLE_SEEN, pk, table[i], now, params[P_PAIR_EXPIRY]
            )
            size += added
            new_table = _novel(first, now, ps[p, S_FIRST_T], params[P_NOVELTY])
            fresh_table = first == now

        # everything is new to a principal in its first day: novelty of addresses, clients
        # and shapes counts from then on (the principal's own youth is a feature of its own)
        young = new_principal or now - ps[p, S_FIRST_T] < params[P_NOVELTY]
        first_t = now if new_principal else ps[p, S_FIRST_T]
        # a principal there from the stream's first day is not new, only not known yet
        newcomer = young and first_t - stream_start >= params[P_NOVELTY]
        # what the novelty habits learn: the novelty as judged, or in the principal's first
        # day (judged as nothing) each thing's first time: an analyst's first day of thirty
        # new queries says its vocabulary is open, an application's day of a dozen shapes run
        # thousands of times that its vocabulary is closed
        # (the principal's very first event is the first of everything: it teaches nothing)
        later = not new_principal
        learn[Q_NADDR - NC] = 1.0 if fresh_addr and later else 0.0
        learn[Q_NAPP - NC] = 1.0 if fresh_app and later else 0.0
        learn[Q_NSHAPE - NC] = 1.0 if fresh_shape and later else 0.0
        learn[Q_NSHAPE_SENS - NC] = 1.0 if fresh_shape and sensitive[i] and later else 0.0
        learn[Q_NSHAPE_ANY - NC] = 1.0 if fresh_any and later else 0.0
        learn[Q_NTABLE - NC] = 1.0 if fresh_table and later else 0.0
        if young:
            new_addr = 0.0
            new_app = 0.0
            new_shape = 0.0
            new_shape_any = 0.0
            new_table = 0.0

        # failed logins per address and per principal. A failure from an address the principal
        # has worked from for a day or more is its own host's (a deploy with a stale
        # password): it is compared with the principal's earlier bursts from such addresses,
        # not counted as a guess against it
        fails_addr = 0.0
        established = False
        if addr[i] != 0:
            if failed:
                jok = _find(keys, pair_key(K_ADDR_OK, pk, addr[i]))
                established = (
                    _live(keys, ta, jok, now, params[P_PAIR_EXPIRY])
                    and now - va[jok] >= params[P_NOVELTY]
                )
            else:  # a success from it: when the first was
                _, added = _first_seen(
                    keys, kinds, ta, va, K_ADDR_OK, pk, addr[i], now, params[P_PAIR_EXPIRY]
                )
                size += added
        usual_fails = 0.0
        usual_high = UNKNOWN
        if failed and established:
            burst, added, _, _ = _accumulate(
                keys, kinds, ta, va, pa, K_FAIL_USUAL, pk, 0, now, params[P_TAU_FAIL], 1.0
            )
            size += added
            usual_fails = math.log1p(burst)
            usual_high, added = _pair_high(
                keys,
                kinds,
                ta,
                va,
                pk,
                0,
                now,
                usual_fails,
                cap[Q_RATE],
                params[P_PAIR_EXPIRY],
                K_FAIL_HIGH,
                K_FAIL_TODAY,
            )
            size += added
        if addr[i] != 0:
            k = pair_key(K_ADDR, 0, addr[i])
            j = _find(keys, k)
            if keys[j] == EMPTY or now - ta[j] > expiry[K_ADDR]:
                prev = 0.0
            else:
                prev = va[j] * math.exp(-max(0.0, now - ta[j]) / params[P_TAU_FAIL])
            if keys[j] == EMPTY:
                keys[j] = k
                kinds[j] = K_ADDR
                size += 1
            fails_addr = prev + (1.0 if failed and not established else 0.0)
            va[j] = fails_addr
            ta[j] = max(ta[j], now) if prev > 0.0 else now
        if failed and not established:
            ps[p, S_FAIL] += 1.0
        ps[p, S_RATE] += 1.0
        # volumes over hours are kept per (principal, address): a dump from a stolen
        # credential's new address does not lend its volume to the application's own servers
        # (a principal that never got in read nothing: its volumes are 0 and keep no entry)
        sens_add = r if known_rows and reading and sensitive[i] else 0.0
        sens1h = (0.0, 0, True, True)
        sens24h = (0.0, 0, True, True)
        if not unproven:
            sens1h = _accumulate(
                keys,
                kinds,
                ta,
                va,
                pa,
                K_ADDR_SENS1H,
                pk,
                addr[i],
                now,
                params[P_TAU_1H],
                sens_add,
                True,
            )
            sens24h = _accumulate(
                keys,
                kinds,
                ta,
                va,
                pa,
                K_ADDR_SENS24H,
                pk,
                addr[i],
                now,
                params[P_TAU_24H],
                sens_add,
                True,
            )
        size += sens1h[1] + sens24h[1]
        # and a volume that has stopped growing is no evidence against this event
        rising[Q_SENS1H] = sens1h[2]
        rising[Q_SENS24H] = sens24h[2]

        # hour-of-day habit, judged by the bins as they stood when the day began (a night's
        # session cannot make its own hour usual)
        hdecay = math.exp(-dt / params[P_TAU_HOUR])
        for h in range(24):
            ps[p, S_HIST0 + h] *= hdecay
        today = math.floor(now / 86400.0) + 1.0
        if ps[p, S_SNAP_DAY] != today:
            for h in range(24):
                ps[p, S_HSNAP0 + h] = ps[p, S_HIST0 + h]
        total = 0.0
        for h in range(24):
            total += ps[p, S_HSNAP0 + h]
        # the share of the principal's activity in this hour and its two neighbours (a lunch
        # hour inside a working day is not off-hours), per hour
        near = (
            ps[p, S_HSNAP0 + (hour[i] + 23) % 24]
            + ps[p, S_HSNAP0 + hour[i]]
            + ps[p, S_HSNAP0 + (hour[i] + 1) % 24]
        )
        share = near / (3.0 * total) if total > 0.0 else 1.0 / 24.0
        ps[p, S_HIST0 + hour[i]] += 1.0
        # the peer group's hours weigh in for a thin own history (below); their share is
        # prior (with prior_total events behind it) to the principal's own
        prior = 1.0 / 24.0
        prior_total = 0.0
        # the peer group's hours count too, more the thinner the principal's own history
        # (as they stood when the day began, like the principal's own)
        if g >= 0:
            g_dt = max(0.0, now - ps[g, S_LAST_T]) if ps[g, S_SEEN] > 0.0 else 0.0
            g_hdecay = math.exp(-g_dt / params[P_TAU_HOUR])
            for h in range(24):
                ps[g, S_HIST0 + h] *= g_hdecay
            if ps[g, S_SNAP_DAY] != today:
                ps[g, S_SNAP_DAY] = today
                for h in range(24):
                    ps[g, S_HSNAP0 + h] = ps[g, S_HIST0 + h]
            g_total = 0.0
            for h in range(24):
                g_total += ps[g, S_HSNAP0 + h]
            if g_total > 0.0:
                g_near = (
                    ps[g, S_HSNAP0 + (hour[i] + 23) % 24]
                    + ps[g, S_HSNAP0 + hour[i]]
                    + ps[g, S_HSNAP0 + (hour[i] + 1) % 24]
                )
                prior = g_near / (3.0 * g_total)
                prior_total = g_total
            ps[g, S_HIST0 + hour[i]] += 1.0
        own_weight = total / (total + params[P_SETTLED])
        share = own_weight * share + (1.0 - own_weight) * prior
        total = max(total, prior_total)
        # and no hour is rare before enough hours are known: a pseudo-count of P_HOUR_PRIOR
        # events in every hour (a day or two of a few statements, the first weekday of a
        # log that began on a weekend, does not make the next evening a rare hour)
        share = (total * share + params[P_HOUR_PRIOR]) / (total + 24.0 * params[P_HOUR_PRIOR])
        # the day of the week: how much of its due share of active days (2 in 7 for weekend
        # days) the principal works this kind of day, as it stood when the day began (a
        # Saturday afternoon is off hours for staff who only ever work on weekdays)
        day_now = math.floor(now / 86400.0)
        weekend = (day_now + 3) % 7 >= 5  # day 0, 1970-01-01, was a Thursday
        if day_now != elapsed_day:  # the stream's days before today, decayed, by kind
            elapsed_day = day_now
            elapsed_we, elapsed_wd = _elapsed_days(stream_start, day_now, params[P_TAU_HOUR])
        day_ratio = _day_ratio(ps, p, day_now, weekend, elapsed_we, elapsed_wd, params)
        if g >= 0:  # the peers' days weigh in for a short own history, when they have any
            g_ratio = _day_ratio(ps, g, day_now, weekend, elapsed_we, elapsed_wd, params)
            g_days = ps[g, S_DAYS_WE] + ps[g, S_DAYS_WD] - 1.0  # before today
            if g_days > 0.0:
                own_days = max(0.0, ps[p, S_DAYS_WE] + ps[p, S_DAYS_WD] - 1.0)
                w_own = own_days / (own_days + params[P_DAY_PRIOR])
                day_ratio = w_own * day_ratio + (1.0 - w_own) * g_ratio

        # tracked quantities against the principal's own past (read before this event counts)
        vals[Q_ROWS] = math.log1p(r) if known_rows else math.nan
        vals[Q_SENS1H] = math.log1p(sens1h[0])
        vals[Q_SENS24H] = math.log1p(sens24h[0])
        vals[Q_TEN] = math.log1p(ps[p, S_TEN])
        vals[Q_TAB] = math.log1p(ps[p, S_TAB])
        vals[Q_RATE] = math.log1p(ps[p, S_RATE])
        vals[Q_FP] = math.log1p(repeats)
        # coverage of a table whose size is not known yet is unknown, not zero
        vals[Q_COV] = math.log10(1.0 + COV_SCALE * coverage) if tsize > 0.0 else math.nan
        vals[Q_OFF] = math.log1p(offset[i]) if not math.isnan(offset[i]) else 0.0
        vals[Q_SESS] = math.log1p(sess_n)
        vals[Q_SESS_SHAPES] = math.log1p(sess_shapes)
        vals[Q_SESS_ROWS] = math.log1p(sess_rows)
        vals[Q_SESS_TABLES] = math.log1p(sess_tables)
        rare_hour = total > 0.0 and 24.0 * share < params[P_OFF_HOURS_SHARE]
        rare_hour = rare_hour or day_ratio < params[P_OFF_DAY_RATIO]
        vals[Q_OFF_ROWS] = math.log1p(sess_rows) if rare_hour else 0.0
        # many runs of shapes the principal never ran before: a scraper with a session per
        # page, each page a new shape's run (an analyst's new queries are a few an hour)
        runs = (0.0, 0, True, True)
        if not unproven:
            runs = _accumulate(
                keys,
                kinds,
                ta,
                va,
                pa,
                K_ADDR_NEW_RUNS,
                pk,
                addr[i],
                now,
                params[P_TAU_1H],
                new_shape,
                True,
            )
        size += runs[1]
        vals[Q_NEW_RUNS] = math.log1p(runs[0])
        rising[Q_NEW_RUNS] = runs[2]
        rising[Q_COV] = cov_rising
        rising[Q_FP] = repeats_rising
        vals[Q_AGG] = 1.0 if agg_all[i] else 0.0
        vals[Q_BULK] = 1.0 if bulk[i] else 0.0
        vals[Q_COPY] = 1.0 if copy_out[i] else 0.0
        vals[Q_NADDR] = new_addr
        vals[Q_NAPP] = new_app
        vals[Q_NSHAPE] = new_shape
        vals[Q_NSHAPE_SENS] = new_shape if sensitive[i] else 0.0
        vals[Q_NSHAPE_ANY] = new_shape_any
        vals[Q_NTABLE] = new_table
        bdecay = math.exp(-dt / params[P_TAU_BASE])
        # Counts and volumes: the previous high, the maximum over the principal's last
        # HIGH_DAYS active days of windows that have closed (a quiet fortnight does not erase
        # it). The current window's high joins only when the window closes, so a burst cannot
        # raise its own bar while it happens.
        if new_principal:
            ps[p, S_WIN_START] = now
            ps[p, S_FIRST_T] = now
            ps[p, S_LAST_DAY] = -1.0
            for q in range(NC):  # nothing known yet (a value is never below 0)
                ps[p, S_WHIGH0 + q] = UNKNOWN
                for d in range(HIGH_DAYS):
                    highs[p, d * NC + q] = UNKNOWN
        elif now - ps[p, S_WIN_START] > params[P_WINDOW]:
            day = math.floor(ps[p, S_WIN_START] / 86400.0)
            fresh_day = ps[p, S_LAST_DAY] != day
            if fresh_day:
                ps[p, S_SLOT] = (ps[p, S_SLOT] + 1.0) % HIGH_DAYS
                ps[p, S_LAST_DAY] = day
            base = int(ps[p, S_SLOT]) * NC
            # the peer group's ring takes the highs of all its members' closed windows
            g_fresh = g >= 0 and day > ps[g, S_LAST_DAY]
            if g >= 0 and ps[g, S_FIRST_T] == 0.0:
                ps[g, S_FIRST_T] = day + 1.0  # the group's first day (+1: 0 is unset)
            if g_fresh:
                ps[g, S_SLOT] = (ps[g, S_SLOT] + 1.0) % HIGH_DAYS
                ps[g, S_LAST_DAY] = day
            gbase = int(ps[g, S_SLOT]) * NC if g >= 0 else 0
            for q in range(NC):
                whigh = ps[p, S_WHIGH0 + q]
                # the bar rises by at most GROWTH_CAP a day: a dump or a scraper's hour is
                # remembered as a bounded rise, so it cannot lift the bar for the next attack
                # (a job that really grows reaches its new size in a few days)
                ring_max = UNKNOWN
                for d in range(HIGH_DAYS):
                    if d != int(ps[p, S_SLOT]):  # previous days only: today's slot is filling
                        ring_max = max(ring_max, float(highs[p, d * NC + q]))
                if ring_max >= 0.0:
                    whigh = min(whigh, ring_max + cap[q])
                if fresh_day or whigh > highs[p, base + q]:
                    highs[p, base + q] = whigh
                if g >= 0 and (g_fresh or whigh > highs[g, gbase + q]):
                    highs[g, gbase + q] = whigh
                ps[p, S_WHIGH0 + q] = UNKNOWN
            ps[p, S_WIN_START] = now
        history = ps[p, S_LAST_DAY] >= 0.0
        # a principal in its first day is compared with its peers as well (the highest of
        # their closed windows, their habits), when it has peers with a history
        # ... and so is a principal with a thin history (a few statements a day, in bursts:
        # an analyst's ad-hoc query is judged by what analysts do)
        thin = ps[p, S_BASE_W] < params[P_THIN]
        # peers with a day of history before today (a group whose members all start today,
        # staff back on a Monday of a log that began on Saturday, has nothing to go by)
        peers = (
            (young or thin)
            and g >= 0
            and ps[g, S_FIRST_T] > 0.0
            and math.floor(now / 86400.0) + 1.0 > ps[g, S_FIRST_T]
        )
        # a principal in its first day with no peers to go by is judged by nothing but its
        # newness (the new_principal feature): everything it does is its first of a kind
        unjudged = young and not peers
        # the previous high comes from earlier days only: today's slot would let an attack
        # longer than a window (a scraper's second hour) raise its own bar
        this_day = math.floor(now / 86400.0)
        own_today = int(ps[p, S_SLOT]) if ps[p, S_LAST_DAY] == this_day else -1
        peer_today = int(ps[g, S_SLOT]) if peers and ps[g, S_LAST_DAY] == this_day else -1
        for q in range(NC):
            high = UNKNOWN
            high_today = UNKNOWN  # today's closed windows: the bar only when nothing else is
            for d in range(HIGH_DAYS):
                if d != own_today:
                    high = max(high, float(highs[p, d * NC + q]))
                else:
                    high_today = float(highs[p, d * NC + q])
            if peers:
                for d in range(HIGH_DAYS):
                    if d != peer_today:
                        high = max(high, float(highs[g, d * NC + q]))
            if high < 0.0:
                high = high_today
            out[i, 2 * q] = vals[q]
            # no known value in the past (rows of COPYs only, a table of unknown size): NaN
            out[i, 2 * q + 1] = high if (history or peers) and high >= 0.0 else math.nan
            if unjudged:  # a first day with nothing to compare with sets the bar, no more
                out[i, 2 * q + 1] = vals[q]
            if not math.isnan(vals[q]):
                ps[p, S_WHIGH0 + q] = max(ps[p, S_WHIGH0 + q], vals[q])
        # a table's coverage is compared with the principal's own past coverage of that table
        # (its peers' too, when they count): an analyst who reads a report of twenty clients
        # a day has not read the client list because it once read a tenth of the accounts.
        # A table whose size was unknown until now has no past coverage: unknown, no excess.
        if table[i] != 0 and not math.isnan(vals[Q_COV]):
            cov_high = UNKNOWN
            for row in (p, g):  # the group's record is kept whether or not it counts now
                if row < 0:
                    continue
                high, added = _pair_high(
                    keys,
                    kinds,
                    ta,
                    va,
                    int(ps[row, S_KEY]),
                    table[i],
                    now,
                    vals[Q_COV],
                    cap[Q_COV],
                    expiry[K_COV_HIGH],
                    K_COV_HIGH,
                    K_COV_TODAY,
                )
                size += added
                if row == p or peers:
                    cov_high = max(cov_high, high)
            out[i, 2 * Q_COV + 1] = cov_high if cov_high >= 0.0 else math.nan
        else:
            out[i, 2 * Q_COV + 1] = math.nan
        for q in (Q_SENS1H, Q_SENS24H, Q_COV, Q_NEW_RUNS, Q_FP):
            if not rising[q]:
                out[i, 2 * q] = math.nan
        # Habits: how often the principal does this, a decayed event-weighted share, as it
        # stood when the day began (so a burst today cannot make itself habitual today).
        ps[p, S_BASE_W] *= bdecay
        ps[p, S_SESS_W] *= bdecay
        # how many sessions the principal's usual sessions stand for (its peers' too when they
        # count): the higher, the tighter the bar its session counts are compared with
        sessions_seen = ps[p, S_SESS_W]
        if ps[p, S_SNAP_DAY] != today:
            ps[p, S_SNAP_DAY] = today
            for q in range(NC, NB):
                weight = ps[p, S_BASE_W]
                rate = ps[p, S_RATE0 + q - NC] * bdecay
                ps[p, S_SNAP0 + q - NC] = rate / weight if weight > 0.0 else math.nan
        if g >= 0:
            gdt = max(0.0, now - ps[g, S_LAST_T]) if ps[g, S_SEEN] > 0.0 else 0.0
            ps[g, S_LAST_T] = max(ps[g, S_LAST_T], now)
            ps[g, S_SEEN] += 1.0
            gdecay = math.exp(-gdt / params[P_TAU_BASE])
            ps[g, S_BASE_W] *= gdecay
            ps[g, S_SESS_W] *= gdecay
            if peers:
                sessions_seen = max(sessions_seen, ps[g, S_SESS_W])
            if new_session:
                ps[g, S_SESS_W] += 1.0
        if new_session:
            ps[p, S_SESS_W] += 1.0
        for q in range(NC, NB):
            ps[p, S_RATE0 + q - NC] *= bdecay
            weight = ps[p, S_BASE_W]
            typical = ps[p, S_SNAP0 + q - NC]
            if math.isnan(typical) and weight > 0.0:
                typical = ps[p, S_RATE0 + q - NC] / weight
            if g >= 0:
                ps[g, S_RATE0 + q - NC] *= gdecay
                if peers and ps[g, S_BASE_W] > 0.0:
                    peer_share = ps[g, S_RATE0 + q - NC] / ps[g, S_BASE_W]
                    typical = peer_share if math.isnan(typical) else max(typical, peer_share)
            seen = learn[q - NC] if young and q >= Q_NADDR else vals[q]
            if g >= 0:
                ps[g, S_RATE0 + q - NC] += seen
            out[i, 2 * q] = vals[q]
            out[i, 2 * q + 1] = 1.0 if unjudged else typical
            ps[p, S_RATE0 + q - NC] += seen
        ps[p, S_BASE_W] += 1.0
        if g >= 0:
            ps[g, S_BASE_W] += 1.0

        out[i, O_OFF_HOURS] = max(
            1.0 - min(1.0, 24.0 * share) if total > 0.0 else 0.0, 1.0 - min(1.0, day_ratio)
        )
        out[i, O_DAY_RATIO] = day_ratio
        out[i, O_SESSIONS] = sessions_seen
        out[i, O_HOUR_SHARE] = share
        out[i, O_FAIL_ADDR] = math.log1p(fails_addr)
        # failed logins for the principal weigh on failed attempts and on what comes from a new
        # address (or for a principal too young to have usual addresses); the user's own next
        # login from its usual place is the user
        counts = failed or new_addr > 0.0 or young
        out[i, O_FAIL_PRINCIPAL] = math.log1p(ps[p, S_FAIL]) if counts else 0.0
        if failed and established:  # its own host's burst, beyond its bursts before
            beyond = usual_fails - max(usual_high, 0.0) - params[P_GROWTH]
            out[i, O_FAIL_PRINCIPAL] = max(out[i, O_FAIL_PRINCIPAL], beyond)
        out[i, O_FAIL_USUAL] = usual_fails
        out[i, O_FAIL_USUAL_HIGH] = usual_high if usual_high >= 0.0 else math.nan
        out[i, O_NEW_PRINCIPAL] = 1.0 if newcomer else 0.0
        out[i, O_COVERAGE] = coverage
        out[i, O_TABLE_ROWS] = tsize
    return out, keys, kinds, ta, va, pa, size


def default_expiry(params: np.ndarray) -> np.ndarray:
    """Per-kind expiry (seconds): past it an entry is equivalent to an absent one."""
    exp_ = np.full(N_KINDS, np.inf)
    exp_[K_ADDR_PAIR] = params[P_PAIR_EXPIRY]
    exp_[K_APP_PAIR] = params[P_PAIR_EXPIRY]
    exp_[K_TENANT_PAIR] = params[P_W_TEN]
    exp_[K_TABLE_PAIR] = 8.0 * params[P_TAU_COV]
    exp_[K_TABLE_COV] = 8.0 * params[P_TAU_COV]
    exp_[K_ADDR_OK] = params[P_PAIR_EXPIRY]
    exp_[K_FAIL_USUAL] = 8.0 * params[P_TAU_FAIL]
    exp_[K_FAIL_HIGH] = params[P_PAIR_EXPIRY]
    exp_[K_FAIL_TODAY] = params[P_PAIR_EXPIRY]
    exp_[K_FP_PAIR] = 8.0 * params[P_TAU_FP]
    exp_[K_ADDR] = 8.0 * params[P_TAU_FAIL]
    exp_[K_TABLE_SIZE] = np.inf
    for kind in (
        K_SESSION,
        K_SESSION_ROWS,
        K_SESSION_SHAPES,
        K_SESSION_FP,
        K_SESSION_TABLES,
        K_SESSION_TABLE,
    ):
        exp_[kind] = params[P_SESSION_EXPIRY]
    exp_[K_SHAPE_SEEN] = params[P_PAIR_EXPIRY]
    exp_[K_TABLE_SEEN] = params[P_PAIR_EXPIRY]
    exp_[K_ADDR_SENS1H] = 8.0 * params[P_TAU_1H]
    exp_[K_ADDR_SENS24H] = 8.0 * params[P_TAU_24H]
    exp_[K_ADDR_NEW_RUNS] = 8.0 * params[P_TAU_1H]
    exp_[K_SHAPE_ANY] = params[P_PAIR_EXPIRY]
    exp_[K_COV_HIGH] = params[P_PAIR_EXPIRY]
    exp_[K_COV_TODAY] = params[P_PAIR_EXPIRY]
    return exp_

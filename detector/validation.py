"""Vectorised validation of loosely typed access events against the canonical schema.

:func:`validate` takes a frame whose columns carry canonical names but loose types (numbers as
text, timestamps as text or datetimes, optional columns missing) plus a ``_loc`` column naming
where each row came from, and splits it into

* good rows, cast exactly to :data:`detector.schema.EVENT_SCHEMA` in its column order, and
* rejected rows with the columns of :data:`REJECT_SCHEMA`: ``location`` (``_loc`` as text),
  ``reason`` (one code of :data:`REASONS`), ``detail`` (a sentence for a human) and ``record``
  (the row's canonical fields as JSON text, ``statement_text`` redacted).

Every input row ends in exactly one of the two frames, each in input order. Good rows cost only
polars expressions (plus a few whole-column Arrow kernels); detail and record are built for
rejected rows alone. When a row breaks several rules, the first in column order is reported.

What is accepted (anything else is rejected):

* ``event_time``: ISO 8601 text ``YYYY-MM-DD[T ]HH:MM[:SS[.fraction]]`` ending in ``Z`` or an
  offset (``+HH``, ``+HHMM``, ``+HH:MM``), or a timezone-aware datetime. Naive values are
  rejected unless ``default_tz`` names a zone; they are then wall time there (an ambiguous time
  takes the earlier instant; a time that does not exist is rejected). Every value becomes UTC
  microseconds (further fraction digits are truncated).
* required text columns: present and not blank; ``action`` in ``ACTIONS``, ``source_format`` in
  ``SOURCE_FORMATS`` (exact spelling).
* text columns: text as is; numbers and booleans as their text.
* integer columns: integers, integral floats, or text holding an integer; ``0 <= v <= bound``.
* ``duration_ms``: a finite number or numeric text; ``0 <= v <= MAX_DURATION_MS``.
* ``success``: a boolean or the text ``true``/``false`` (any case).
* ``statement_text``: kept to its first ``MAX_STATEMENT_CHARS`` characters (a longer one is
  cut, never rejected: the event is scored all the same).
* ``objects``: a list of strings without nulls.
* ``extra``: a map, a list of ``{key, value}`` structs, or a struct of scalars. Values that are
  numbers or booleans become their text, pairs whose value is null are dropped, and pairs are
  sorted by key, so equal objects give equal lists whatever order their keys came in.

Columns that are neither canonical nor ``_loc`` are ignored.
"""

from __future__ import annotations

import zoneinfo
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from detector import schema
from detector.errors import ConfigError
from detector.redact import redact_expr

#: Every reason a record can be rejected for, with what it means.
REASONS: Final[dict[str, str]] = {
    "missing_field": "a required field is absent, null or blank",
    "bad_type": "a value has the wrong type or cannot be read as the field's type",
    "naive_timestamp": "event_time has no offset and no default time zone was given",
    "bad_timestamp": "event_time is not an ISO 8601 timestamp or names no real instant",
    "unknown_action": "action is not one of schema.ACTIONS",
    "unknown_source_format": "source_format is not one of schema.SOURCE_FORMATS",
    "negative_value": "a count, size or duration is negative",
    "absurd_value": "a count, size or duration is past its schema bound",
    "too_large": "a statement or a whole line is longer than allowed",
    "malformed_json": "a line is not valid JSON (or not valid UTF-8)",
    "not_an_object": "a line is valid JSON but not an object",
    "unreadable_file": "a whole file could not be read",
}

#: Columns of the rejected-rows frame. ``record`` holds JSON text (an object, or a string for
#: a line that was not JSON).
REJECT_SCHEMA: Final[dict[str, pl.DataType]] = {
    "location": pl.String(),
    "reason": pl.String(),
    "detail": pl.String(),
    "record": pl.String(),
}

#: Name of the input column holding each row's location (any type that casts to text).
LOC: Final = "_loc"

_SHOW_CHARS: Final = 80
_BOUNDS: Final[dict[str, tuple[float, str]]] = {
    "rows_returned": (schema.MAX_ROWS, "MAX_ROWS"),
    "rows_affected": (schema.MAX_ROWS, "MAX_ROWS"),
    "bytes_scanned": (schema.MAX_BYTES, "MAX_BYTES"),
    "bytes_sent": (schema.MAX_BYTES, "MAX_BYTES"),
    "duration_ms": (schema.MAX_DURATION_MS, "MAX_DURATION_MS"),
}

_DATE: Final = r"(?P<date>\d{4}-\d{2}-\d{2})[T ]"
_TIME: Final = r"(?P<hm>\d{2}:\d{2})(?::(?P<sec>\d{2})(?:[.,](?P<frac>\d{1,9}))?)?"
_ZONE: Final = r"(?P<zone>[Zz]|(?P<sign>[+-])(?P<oh>[01]\d|2[0-3])(?::?(?P<om>[0-5]\d))?)"
#: The timestamp text accepted; the zone is optional here (naive values are judged apart).
TIMESTAMP_PATTERN: Final = f"^{_DATE}{_TIME}{_ZONE}?$"
_ZONED_PATTERN: Final = f"^{_DATE}{_TIME}{_ZONE}$"

_UTC: Final = pl.Datetime("us", "UTC")

#: Why event_time failed (the ``__et_why`` codes) -> (reason, what the detail says).
_TIME_FAILURES: Final[dict[str, tuple[str, str]]] = {
    "not_iso": ("bad_timestamp", "is not an ISO 8601 timestamp"),
    "not_real": ("bad_timestamp", "is not a real date and time"),
    "naive": ("naive_timestamp", "has no offset and no default time zone was given"),
    "not_in_zone": ("bad_timestamp", "does not exist in the default time zone"),
}


@dataclass(frozen=True, slots=True)
class _Problem:
    """Rows where ``mask`` is true are rejected with ``reason`` and ``detail``."""

    mask: pl.Expr
    reason: str
    detail: pl.Expr


@dataclass(frozen=True, slots=True)
class _Rule:
    """How one column becomes its canonical value, what makes a row bad, and which helper
    columns (computed eagerly, whole column at a time) the expressions read."""

    value: pl.Expr
    problems: tuple[_Problem, ...] = ()
    helpers: tuple[pl.Series, ...] = ()


_Builder = Callable[[str, pl.Series, str | None], _Rule]


def validate(
    df: pl.DataFrame, *, default_tz: str | None = None
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Split ``df`` into canonical good rows and rejected rows (see the module docstring).

    Raises :class:`ConfigError` if ``default_tz`` is not a known IANA zone and ``ValueError``
    if ``df`` has no ``_loc`` column; never because of the values in ``df``.
    """
    check_zone(default_tz)
    if LOC not in df.columns:
        raise ValueError(f"validate() needs a {LOC!r} column naming each row's location")
    if df.height == 0:
        return schema.empty_events(), empty_rejects()
    rules = _rules(df, default_tz)
    helpers = [h for rule in rules.values() for h in rule.helpers]
    values = [rule.value.alias(f"__v_{col}") for col, rule in rules.items()]
    masks = [p.mask.fill_null(False) for rule in rules.values() for p in rule.problems]
    work = df.with_columns(helpers).with_columns(values)
    if not masks:
        return _good(work, rules), empty_rejects()
    bad = work.select(pl.any_horizontal(masks)).to_series()
    if not bad.any():
        return _good(work, rules), empty_rejects()
    return _good(work.filter(~bad), rules), _rejects(work.filter(bad), rules)


def empty_rejects() -> pl.DataFrame:
    """An empty rejected-rows frame."""
    return pl.DataFrame(schema=REJECT_SCHEMA)


def check_zone(name: str | None) -> None:
    """Raise :class:`ConfigError` unless ``name`` is None or a known IANA time zone."""
    if name is None:
        return
    try:
        zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError) as exc:
        raise ConfigError(f"default time zone {name!r} is not a known IANA zone") from exc


def _rules(df: pl.DataFrame, default_tz: str | None) -> dict[str, _Rule]:
    rules: dict[str, _Rule] = {}
    for col in schema.COLUMNS:
        if col in df.columns and col not in schema.REQUIRED and _all_null(df.get_column(col)):
            rules[col] = _Rule(pl.lit(None))  # nothing to check: every value is unknown
        elif col in df.columns:
            rules[col] = _builder(col)(col, df.get_column(col), default_tz)
        elif col in schema.REQUIRED:
            problem = _Problem(pl.lit(True), "missing_field", _msg(col, "missing"))
            rules[col] = _Rule(pl.lit(None), (problem,))
    return rules


def _good(work: pl.DataFrame, rules: dict[str, _Rule]) -> pl.DataFrame:
    return work.select(
        (pl.col(f"__v_{col}") if col in rules else pl.lit(None)).cast(dtype).alias(col)
        for col, dtype in schema.EVENT_SCHEMA.items()
    )


def _rejects(work: pl.DataFrame, rules: dict[str, _Rule]) -> pl.DataFrame:
    problems = [p for rule in rules.values() for p in rule.problems]
    reason = pl.coalesce([pl.when(p.mask).then(pl.lit(p.reason)) for p in problems])
    detail = pl.coalesce([pl.when(p.mask).then(p.detail) for p in problems])
    return work.select(
        pl.col(LOC).cast(pl.String).alias("location"),
        reason.alias("reason"),
        detail.alias("detail"),
        _record_json(work).alias("record"),
    )


def _record_json(work: pl.DataFrame) -> pl.Expr:
    """A row's original canonical fields as JSON text with ``statement_text`` redacted (or
    left out when it is not text, so no SQL ever reaches the record unredacted)."""
    fields: list[pl.Expr] = []
    for col in schema.COLUMNS:
        if col not in work.columns:
            continue
        dtype = work.schema[col]
        if _has_binary(dtype):  # not JSON-encodable and not text: keep only that it was there
            fields.append(pl.when(pl.col(col).is_not_null()).then(pl.lit(f"<{dtype}>")).alias(col))
        elif col != "statement_text":
            fields.append(pl.col(col))
        elif _is_scalar(dtype):
            fields.append(redact_expr(pl.col(col).cast(pl.String)).alias(col))
    if not fields:
        return pl.lit("{}")
    return pl.struct(fields).struct.json_encode()


# --- shared helpers -------------------------------------------------------------------------


def _show(expr: pl.Expr) -> pl.Expr:
    """A value quoted and shortened for a detail message."""
    text = expr.cast(pl.String)
    cut = text.str.slice(0, _SHOW_CHARS) + pl.lit("…")
    shown = pl.when(text.str.len_chars() > _SHOW_CHARS).then(cut).otherwise(text)
    return pl.concat_str([pl.lit("'"), shown, pl.lit("'")])


def _msg(col: str, text: str) -> pl.Expr:
    return pl.lit(f"{col}: {text}")


def _fmt(col: str, text: str, value: pl.Expr) -> pl.Expr:
    """``"{col}: '{value}' {text}"``."""
    return pl.concat_str([pl.lit(f"{col}: "), _show(value), pl.lit(f" {text}")])


def _is_scalar(dtype: pl.DataType) -> bool:
    """Numbers, booleans and text (including categoricals): values with a plain text form."""
    if isinstance(dtype, pl.Categorical | pl.Enum):
        return True
    return dtype.is_numeric() or dtype in (pl.String(), pl.Boolean())


def _has_binary(dtype: pl.DataType) -> bool:
    if dtype in (pl.Binary(), pl.Object()):
        return True
    if isinstance(dtype, pl.List | pl.Array):
        return _has_binary(_instance(dtype.inner))
    if isinstance(dtype, pl.Struct):
        return any(_has_binary(_instance(f.dtype)) for f in dtype.fields)
    return False


def _bad_dtype(col: str, dtype: pl.DataType, expected: str) -> _Rule:
    """Every non-null value of a column of an unusable type is ``bad_type``."""
    detail = _msg(col, f"expected {expected}, got {dtype}")
    return _Rule(pl.lit(None), (_Problem(pl.col(col).is_not_null(), "bad_type", detail),))


def _blank(value: pl.Expr) -> pl.Expr:
    return value.is_null() | ~value.str.contains(r"\S")


def _all_null(s: pl.Series) -> bool:
    return s.null_count() == s.len()


def _within(s: pl.Series, limit: float) -> bool:
    """Whether every non-null number of ``s`` is in ``[0, limit]`` (one cheap pass each)."""
    low, high = s.min(), s.max()
    if low is None or high is None:
        return True
    return bool(float(low) >= 0 and float(high) <= limit)  # type: ignore[arg-type]


def _none(n: int, dtype: pl.DataType) -> pl.Series:
    return pl.Series(values=[None] * n, dtype=dtype)


# --- event_time -----------------------------------------------------------------------------


def _event_time_rule(col: str, s: pl.Series, default_tz: str | None) -> _Rule:
    value, why = _event_time(s, default_tz)
    problems = [
        _Problem(
            _blank(pl.col(col)) if s.dtype == pl.String() else pl.col(col).is_null(),
            "missing_field",
            _msg(col, "missing or blank"),
        ),
        _Problem(
            pl.col("__et_why") == "bad_type",
            "bad_type",
            _msg(col, f"expected ISO 8601 text or a timestamp, got {s.dtype}"),
        ),
    ]
    if s.dtype == pl.String() or isinstance(s.dtype, pl.Datetime):
        problems += [
            _Problem(pl.col("__et_why") == code, reason, _fmt(col, text, pl.col(col)))
            for code, (reason, text) in _TIME_FAILURES.items()
        ]
    helpers = (value.cast(_UTC).alias("__et"), why.cast(pl.String).alias("__et_why"))
    return _Rule(pl.col("__et"), tuple(problems), helpers)


def _event_time(s: pl.Series, default_tz: str | None) -> tuple[pl.Series, pl.Series]:
    """The UTC instant (or null) and why it is null (a ``_TIME_FAILURES`` code, or null)."""
    n = s.len()
    if isinstance(s.dtype, pl.Datetime):
        return _from_datetime(s, default_tz)
    if s.dtype == pl.String():
        fast = _fast_iso(s)
        if fast is not None:
            return fast, _none(n, pl.String())
        return _from_text(s, default_tz)
    why = pl.select(pl.when(pl.lit(s).is_not_null()).then(pl.lit("bad_type"))).to_series()
    return _none(n, _UTC), why


def _from_datetime(s: pl.Series, default_tz: str | None) -> tuple[pl.Series, pl.Series]:
    n = s.len()
    if s.dtype.time_zone is not None:  # type: ignore[attr-defined]
        zoned = s.dt.convert_time_zone("UTC").dt.cast_time_unit("us")
        return zoned, _none(n, pl.String())
    if default_tz is None:
        why = pl.select(pl.when(pl.lit(s).is_not_null()).then(pl.lit("naive"))).to_series()
        return _none(n, _UTC), why
    local = pl.lit(s.dt.cast_time_unit("us"))
    value = _localise(local, default_tz)
    out = pl.select(
        value, pl.when(local.is_not_null() & value.is_null()).then(pl.lit("not_in_zone"))
    )
    return out.to_series(0), out.to_series(1)


def _localise(local: pl.Expr, zone: str) -> pl.Expr:
    """Wall time in ``zone`` to UTC: ambiguous -> the earlier instant, non-existent -> null."""
    return local.dt.replace_time_zone(
        zone, ambiguous="earliest", non_existent="null"
    ).dt.convert_time_zone("UTC")


def _fast_iso(s: pl.Series) -> pl.Series | None:
    """Parse a column whose every value is zoned ISO text with one Arrow cast, or give None.

    The pattern check keeps the fast path inside the language :func:`_from_text` accepts, so
    both paths give the same instant for every value they both accept.
    """
    if not s.str.contains(_ZONED_PATTERN).all():
        return None
    try:
        parsed = pc.cast(s.to_arrow(), pa.timestamp("us", tz="UTC"))
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return None
    return pl.Series(s.name, parsed)


def _from_text(s: pl.Series, default_tz: str | None) -> tuple[pl.Series, pl.Series]:
    """Parse ISO 8601 text value by value with polars expressions (every case)."""
    parts = (
        pl.DataFrame({"t": s})
        .with_columns(g=pl.col("t").str.strip_chars().str.extract_groups(TIMESTAMP_PATTERN))
        .unnest("g")
        .with_columns(local=_wall_time())
    )
    offset = pl.when(pl.col("sign") == "-").then(-1).otherwise(1) * (
        pl.col("oh").cast(pl.Int64) * 60 + pl.col("om").fill_null("0").cast(pl.Int64)
    )
    utc = (
        pl.when(pl.col("zone").str.to_lowercase() == "z")
        .then(pl.col("local"))
        .otherwise(pl.col("local") - pl.duration(minutes=offset))
        .dt.replace_time_zone("UTC")
    )
    zoned = pl.col("zone").is_not_null()
    naive = (
        pl.lit(None, dtype=_UTC) if default_tz is None else _localise(pl.col("local"), default_tz)
    )
    value = pl.when(zoned).then(utc).otherwise(naive)
    why = (
        pl.when(pl.col("t").is_null())
        .then(None)
        .when(pl.col("date").is_null())
        .then(pl.lit("not_iso"))
        .when(pl.col("local").is_null())
        .then(pl.lit("not_real"))
        .when(~zoned & (default_tz is None))
        .then(pl.lit("naive"))
        .when(value.is_null())
        .then(pl.lit("not_in_zone"))
    )
    out = parts.select(value, why)
    return out.to_series(0), out.to_series(1)


def _wall_time() -> pl.Expr:
    text = pl.concat_str(
        [pl.col("date"), pl.lit("T"), pl.col("hm"), pl.lit(":"), pl.col("sec").fill_null("00")]
    )
    whole = text.str.strptime(pl.Datetime("us"), "%Y-%m-%dT%H:%M:%S", strict=False)
    frac = pl.col("frac").str.slice(0, 6).str.pad_end(6, "0").cast(pl.Int64).fill_null(0)
    return whole + pl.duration(microseconds=frac)


# --- text -----------------------------------------------------------------------------------


def _text(col: str, dtype: pl.DataType) -> pl.Expr | None:
    if dtype == pl.String():
        return pl.col(col)
    if dtype == pl.Null() or _is_scalar(dtype):
        return pl.col(col).cast(pl.String)
    return None


def _required_text_rule(col: str, s: pl.Series, _tz: str | None) -> _Rule:
    value = _text(col, s.dtype)
    if value is None:
        return _bad_dtype(col, s.dtype, "text")
    problems = [_Problem(_blank(value), "missing_field", _msg(col, "missing or blank"))]
    allowed = {"action": schema.ACTIONS, "source_format": schema.SOURCE_FORMATS}.get(col)
    if allowed is not None:
        if s.dtype == pl.String() and s.null_count() == 0 and s.is_in(list(allowed)).all():
            return _Rule(value)  # every value is allowed, so none is blank either
        reason = "unknown_action" if col == "action" else "unknown_source_format"
        text = f"is not one of {', '.join(allowed)}"
        problems.append(_Problem(~value.is_in(list(allowed)), reason, _fmt(col, text, value)))
    return _Rule(value, tuple(problems))


def _optional_text_rule(col: str, s: pl.Series, _tz: str | None) -> _Rule:
    value = _text(col, s.dtype)
    if value is None:
        return _bad_dtype(col, s.dtype, "text")
    if col != "statement_text":
        return _Rule(value)
    # cut, not rejected: padding a bulk read past the limit must not keep it from being scored
    return _Rule(value.str.slice(0, schema.MAX_STATEMENT_CHARS))


# --- numbers --------------------------------------------------------------------------------


def _bounds(col: str, value: pl.Expr) -> tuple[_Problem, ...]:
    limit, name = _BOUNDS[col]
    return (
        _Problem(value < 0, "negative_value", _fmt(col, "is negative", value)),
        _Problem(value > limit, "absurd_value", _fmt(col, f"is past {name} ({limit:g})", value)),
    )


def _int_rule(col: str, s: pl.Series, _tz: str | None) -> _Rule:
    source, dtype = pl.col(col), s.dtype
    if dtype == pl.Null():
        return _Rule(source.cast(pl.Int64))
    if dtype == pl.Int64() and _within(s, _BOUNDS[col][0]):
        return _Rule(source)
    if dtype.is_integer():
        value = source.cast(pl.Int64, strict=False)
        big = _Problem(
            value.is_null() & source.is_not_null(),
            "absurd_value",
            _fmt(col, "does not fit in 64 bits", source),
        )
        return _Rule(value, (big, *_bounds(col, value)))
    if dtype.is_float() or dtype.is_decimal():
        number = source.cast(pl.Float64)
        whole = pl.when(number.is_finite() & (number == number.floor())).then(number)
        value = whole.cast(pl.Int64, strict=False)
    elif dtype == pl.String():
        value = source.str.strip_chars().cast(pl.Int64, strict=False)
    else:
        return _bad_dtype(col, dtype, "an integer")
    bad = _Problem(
        value.is_null() & source.is_not_null(), "bad_type", _fmt(col, "is not an integer", source)
    )
    return _Rule(value, (bad, *_bounds(col, value)))


def _duration_rule(col: str, s: pl.Series, _tz: str | None) -> _Rule:
    source, dtype = pl.col(col), s.dtype
    if dtype == pl.Null():
        return _Rule(source.cast(pl.Float64))
    if dtype == pl.Float64() and s.is_finite().all() and _within(s, _BOUNDS[col][0]):
        return _Rule(source)
    if dtype.is_numeric():
        number = source.cast(pl.Float64)
    elif dtype == pl.String():
        number = source.str.strip_chars().cast(pl.Float64, strict=False)
    else:
        return _bad_dtype(col, dtype, "a number")
    value = pl.when(number.is_finite()).then(number)
    bad = _Problem(
        value.is_null() & source.is_not_null(),
        "bad_type",
        _fmt(col, "is not a finite number", source),
    )
    return _Rule(value, (bad, *_bounds(col, value)))


def _success_rule(col: str, s: pl.Series, _tz: str | None) -> _Rule:
    source, dtype = pl.col(col), s.dtype
    if dtype in (pl.Boolean(), pl.Null()):
        return _Rule(source.cast(pl.Boolean))
    if dtype != pl.String():
        return _bad_dtype(col, dtype, "a boolean")
    word = source.str.strip_chars().str.to_lowercase()
    value = pl.when(word == "true").then(True).when(word == "false").then(False)
    bad = _Problem(
        value.is_null() & source.is_not_null(),
        "bad_type",
        _fmt(col, "is not true or false", source),
    )
    return _Rule(value, (bad,))


# --- objects and extra ----------------------------------------------------------------------


def _objects_rule(col: str, s: pl.Series, _tz: str | None) -> _Rule:
    source, dtype = pl.col(col), s.dtype
    if dtype == pl.Null():
        return _Rule(source)
    if not isinstance(dtype, pl.List) or dtype.inner not in (pl.String(), pl.Null()):
        return _bad_dtype(col, dtype, "a list of strings")
    if _flat(s.to_arrow()).null_count == 0:
        return _Rule(source)
    has_null = source.list.eval(pl.element().is_null().any()).list.first()
    return _Rule(source, (_Problem(has_null, "bad_type", _msg(col, "holds a null name")),))


def _extra_rule(col: str, s: pl.Series, _tz: str | None) -> _Rule:
    dtype = s.dtype
    if dtype == pl.Null():
        return _Rule(pl.col(col))
    if isinstance(dtype, pl.Map):
        s = s.cast(pl.List(pl.Struct({"key": dtype.key, "value": dtype.value})))
    if isinstance(s.dtype, pl.Struct):
        return _extra_from_struct(col, s)
    if _is_pair_list(s.dtype):
        pairs, null_key = _sorted_pairs(s.to_arrow())
        if null_key is None:
            return _Rule(pl.col("__extra"), (), (pairs.alias("__extra"),))
        problem = _Problem(pl.col("__extra_null_key"), "bad_type", _msg(col, "has a null key"))
        helpers = (pairs.alias("__extra"), null_key.alias("__extra_null_key"))
        return _Rule(pl.col("__extra"), (problem,), helpers)
    return _bad_dtype(col, dtype, "an object of string to string")


def _is_pair_list(dtype: pl.DataType) -> bool:
    if not (isinstance(dtype, pl.List) and isinstance(dtype.inner, pl.Struct)):
        return False
    fields = {f.name: _instance(f.dtype) for f in dtype.inner.fields}
    return set(fields) == {"key", "value"} and all(
        _is_scalar(t) or t == pl.Null() for t in fields.values()
    )


def _instance(dtype: Any) -> pl.DataType:
    """A dtype instance (polars sometimes hands out dtype classes)."""
    return dtype() if isinstance(dtype, type) else dtype  # type: ignore[no-any-return]


def _extra_from_struct(col: str, s: pl.Series) -> _Rule:
    array = _combined(s.to_arrow())
    assert isinstance(array, pa.StructArray)
    children = dict(zip((f.name for f in array.type), array.flatten(), strict=True))
    nested = [name for name, child in children.items() if not _arrow_scalar(child.type)]
    scalar = {name: child for name, child in children.items() if name not in nested}
    pairs = _struct_to_pairs(scalar, array.is_valid())
    problems = tuple(
        _Problem(
            pl.col(col).struct.field(name).is_not_null(),
            "bad_type",
            _msg(col, f"value of {name!r} is not text, a number or a boolean"),
        )
        for name in nested
    )
    return _Rule(pl.col("__extra"), problems, (pairs.alias("__extra"),))


def _struct_to_pairs(children: dict[str, pa.Array], valid: pa.Array) -> pl.Series:
    """Key/value lists from struct children, pairs in key order, null values dropped."""
    names = sorted(children)
    n = len(valid)
    present = np.zeros((n, len(names)), dtype=bool)
    for j, name in enumerate(names):
        present[:, j] = _bools(children[name].is_valid())
    present &= _bools(valid)[:, None]
    rows, cols = np.nonzero(present)
    texts = [pc.cast(children[name], pa.large_string()) for name in names]
    values = (
        pa.concat_arrays(texts).take(pa.array(cols * n + rows))
        if names
        else pa.array([], pa.large_string())
    )
    keys = pa.array(names, pa.large_string()).take(pa.array(cols))
    counts = present.sum(axis=1)
    return _pairs_series(keys, values, counts, valid)


def _sorted_pairs(array: pa.Array) -> tuple[pl.Series, pl.Series | None]:
    """Normalise a list of key/value structs: text, null values dropped, sorted by key.

    Returns the lists and, when some key is null, a mask of the rows holding one.
    """
    array = _combined(array)
    entries = array.flatten()
    keys, values = (pc.cast(child, pa.large_string()) for child in entries.flatten())
    parents = pc.list_parent_indices(array).to_numpy(zero_copy_only=False)
    n = len(array)
    null_key = None
    if keys.null_count:
        null_key = pl.Series(np.bincount(parents[~_bools(keys.is_valid())], minlength=n) > 0)
    keep = _bools(values.is_valid()) & _bools(keys.is_valid())
    if not keep.all() or not _in_key_order(keys, parents):
        order = np.flatnonzero(keep)
        table = pa.table({"p": parents[order], "k": keys.take(pa.array(order))})
        order = order[pc.sort_indices(table, [("p", "ascending"), ("k", "ascending")]).to_numpy()]
        keys, values, parents = (
            keys.take(pa.array(order)),
            values.take(pa.array(order)),
            parents[order],
        )
    counts = np.bincount(parents, minlength=n)
    return _pairs_series(keys, values, counts, array.is_valid()), null_key


def _in_key_order(keys: pa.Array, parents: np.ndarray) -> bool:
    if len(keys) < 2:
        return True
    same_row = parents[1:] == parents[:-1]
    ascending = pc.greater_equal(keys.slice(1), keys.slice(0, len(keys) - 1))
    return bool(np.all(~same_row | _bools(ascending.fill_null(True))))


def _pairs_series(
    keys: pa.Array, values: pa.Array, counts: np.ndarray, valid: pa.Array
) -> pl.Series:
    offsets = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    entries = pa.StructArray.from_arrays([keys, values], names=["key", "value"])
    mask = pa.array(~_bools(valid))
    lists = pa.LargeListArray.from_arrays(pa.array(offsets), entries, mask=mask)
    return pl.Series(lists).cast(schema.EXTRA_POLARS)


def _arrow_scalar(dtype: pa.DataType) -> bool:
    return bool(
        pa.types.is_string(dtype)
        or pa.types.is_large_string(dtype)
        or pa.types.is_string_view(dtype)
        or pa.types.is_integer(dtype)
        or pa.types.is_floating(dtype)
        or pa.types.is_boolean(dtype)
        or pa.types.is_null(dtype)
    )


def _combined(array: pa.Array | pa.ChunkedArray) -> pa.Array:
    return array.combine_chunks() if isinstance(array, pa.ChunkedArray) else array


def _flat(array: pa.Array | pa.ChunkedArray) -> pa.Array:
    return _combined(array).flatten()


def _bools(array: pa.Array) -> np.ndarray:
    return np.asarray(array.to_numpy(zero_copy_only=False), dtype=bool)


def _builder(col: str) -> _Builder:
    special = _BUILDERS.get(col)
    if special is not None:
        return special
    if col in schema.REQUIRED:
        return _required_text_rule
    if col in schema.INT_COLUMNS:
        return _int_rule
    return _optional_text_rule


_BUILDERS: Final[dict[str, _Builder]] = {
    "event_time": _event_time_rule,
    "duration_ms": _duration_rule,
    "success": _success_rule,
    "objects": _objects_rule,
    "extra": _extra_rule,
}

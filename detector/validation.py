"""Vectorised validation of loosely typed access events against the canonical schema.

:func:`validate` takes a frame whose columns carry canonical names but loose types (numbers as
strings, timestamps as text or datetimes, optional columns missing) plus a ``_loc`` column naming
where each row came from, and splits it into

* good rows, cast exactly to :data:`detector.schema.EVENT_SCHEMA` in its column order, and
* rejected rows, one per bad input row, with columns :data:`REJECT_SCHEMA`: ``location``,
  ``reason`` (one code of :data:`REASONS`), ``detail`` (a sentence for a human) and ``record``
  (the row as JSON text, ``statement_text`` redacted).

Every row ends in exactly one of the two frames, in input order. The good path is polars
expressions only; details and records are built for rejected rows alone.

Coercions (anything else is rejected):

* ``event_time``: ISO 8601 text ``YYYY-MM-DD[T ]HH:MM[:SS[.fraction]]`` followed by ``Z`` or an
  offset (``+HH``, ``+HHMM``, ``+HH:MM``), or a timezone-aware datetime. Naive values are
  rejected unless ``default_tz`` names a zone; they are then read as wall time there (an
  ambiguous time takes the earlier instant, a time that does not exist is rejected). All values
  become UTC microseconds (extra fraction digits are truncated).
* string columns: text as is; numbers and booleans as their text.
* integer columns: integers, integral floats, or text holding an integer.
* ``duration_ms``: numbers or numeric text, finite.
* ``success``: booleans or the text ``true``/``false`` (any case).
* ``objects``: a list of strings without nulls.
* ``extra``: a map, a list of ``{key, value}`` structs or a struct; values that are numbers or
  booleans become their text, pairs whose value is null are dropped, pairs are sorted by key.

Columns that are not canonical (other than ``_loc``) are ignored.
"""

from __future__ import annotations

import zoneinfo
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from detector import schema
from detector.errors import ConfigError
from detector.redact import redact_expr

#: Every reason a record can be rejected for, with what it means.
REASONS: Final[dict[str, str]] = {
    "missing_field": "a required field is absent, null or empty",
    "bad_type": "a value has the wrong type or cannot be read as the field's type",
    "naive_timestamp": "event_time has no offset and no default time zone was given",
    "bad_timestamp": "event_time is not an ISO 8601 timestamp or names no real instant",
    "unknown_action": "action is not one of schema.ACTIONS",
    "unknown_source_format": "source_format is not one of schema.SOURCE_FORMATS",
    "negative_value": "a count, size or duration is negative",
    "absurd_value": "a count, size or duration is past its schema bound",
    "too_large": "a statement or line is longer than the schema allows",
    "malformed_json": "a line is not valid JSON (or not valid UTF-8)",
    "not_an_object": "a line is valid JSON but not an object",
    "unreadable_file": "a whole file could not be read",
}

#: Columns of the rejected-rows frame.
REJECT_SCHEMA: Final[dict[str, pl.DataType]] = {
    "location": pl.String(),
    "reason": pl.String(),
    "detail": pl.String(),
    "record": pl.String(),
}

#: Name of the input column holding each row's location.
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
_TIME: Final = r"(?P<hm>\d{2}:\d{2})(?P<sec>:\d{2})?(?:[.,](?P<frac>\d{1,9}))?"
_ZONE: Final = r"(?P<zone>[Zz]|(?P<sign>[+-])(?P<oh>[01]\d|2[0-3])(?::?(?P<om>[0-5]\d))?)"
#: Accepted timestamp text; the zone is optional here (naive values are classified later).
TIMESTAMP_PATTERN: Final = f"^{_DATE}{_TIME}{_ZONE}?$"
_AWARE_PATTERN: Final = f"^{_DATE}{_TIME}{_ZONE}$"

_UTC: Final = pl.Datetime("us", "UTC")


@dataclass(frozen=True, slots=True)
class _Problem:
    """One rule: rows where ``mask`` is true are rejected with ``reason`` and ``detail``."""

    mask: pl.Expr
    reason: str
    detail: pl.Expr


@dataclass(frozen=True, slots=True)
class _Rule:
    """How one canonical column becomes its typed value, and what makes a row bad."""

    value: pl.Expr
    problems: tuple[_Problem, ...] = ()


def validate(
    df: pl.DataFrame, *, default_tz: str | None = None
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Split ``df`` into canonical good rows and rejected rows (see the module docstring).

    Raises :class:`ConfigError` if ``default_tz`` is not a known IANA zone and ``ValueError``
    if ``df`` has no ``_loc`` column. Never raises because of the values in ``df``.
    """
    _check_zone(default_tz)
    if LOC not in df.columns:
        raise ValueError(f"validate() needs a {LOC!r} column naming each row's location")
    if df.height == 0:
        return schema.empty_events(), empty_rejects()
    df, rules = _prepare(df, default_tz)
    masks = [p.mask.fill_null(False) for rule in rules.values() for p in rule.problems]
    values = [rule.value.alias(f"__v_{col}") for col, rule in rules.items()]
    if not masks:
        return _good(df.with_columns(values), rules), empty_rejects()
    work = df.with_columns(*values, pl.any_horizontal(masks).alias("__bad"))
    bad = work.get_column("__bad")
    if not bad.any():
        return _good(work, rules), empty_rejects()
    return _good(work.filter(~bad), rules), _rejects(work.filter(bad), rules)


def empty_rejects() -> pl.DataFrame:
    """An empty rejected-rows frame."""
    return pl.DataFrame(schema=REJECT_SCHEMA)


def _check_zone(name: str | None) -> None:
    if name is None:
        return
    try:
        zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError) as exc:
        raise ConfigError(f"default time zone {name!r} is not a known IANA zone") from exc


def _prepare(df: pl.DataFrame, default_tz: str | None) -> tuple[pl.DataFrame, dict[str, _Rule]]:
    """Attach helper columns that need eager work and build a rule per present column."""
    rules: dict[str, _Rule] = {}
    for col in schema.COLUMNS:
        if col not in df.columns:
            if col in schema.REQUIRED:
                rules[col] = _absent_required(col)
            continue
        if col == "event_time":
            df = df.with_columns(_event_time_columns(df.get_column(col), default_tz))
        rules[col] = _RULE_BUILDERS.get(col, _rule_for_kind(col))(col, df.schema[col], default_tz)
    return df, rules


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
    """The original canonical fields of a row as JSON text, ``statement_text`` redacted."""
    fields: list[pl.Expr] = []
    for col in schema.COLUMNS:
        if col not in work.columns:
            continue
        dtype = work.schema[col]
        if col == "statement_text":
            if _is_scalar(dtype):
                fields.append(redact_expr(pl.col(col).cast(pl.String)).alias(col))
            continue
        fields.append(pl.col(col))
    if not fields:
        return pl.lit("{}")
    return pl.struct(fields).struct.json_encode()


# --- helpers shared by the rules ------------------------------------------------------------


def _show(expr: pl.Expr) -> pl.Expr:
    """A value quoted and shortened for a detail message."""
    text = expr.cast(pl.String)
    short = pl.when(text.str.len_chars() > _SHOW_CHARS).then(
        text.str.slice(0, _SHOW_CHARS) + pl.lit("…")
    )
    return pl.concat_str([pl.lit("'"), short.otherwise(text), pl.lit("'")])


def _msg(col: str, text: str) -> pl.Expr:
    return pl.lit(f"{col}: {text}")


def _fmt(col: str, text: str, value: pl.Expr) -> pl.Expr:
    """``"{col}: {value} {text}"`` with the value shown quoted."""
    return pl.concat_str([pl.lit(f"{col}: "), _show(value), pl.lit(f" {text}")])


def _is_scalar(dtype: pl.DataType) -> bool:
    return dtype.is_numeric() or dtype in (pl.String(), pl.Boolean())


def _bad_dtype(col: str, dtype: pl.DataType, expected: str) -> _Rule:
    """Every non-null value of a column with an unusable type is ``bad_type``."""
    detail = _msg(col, f"expected {expected}, got {dtype}")
    return _Rule(pl.lit(None), (_Problem(pl.col(col).is_not_null(), "bad_type", detail),))


def _absent_required(col: str) -> _Rule:
    return _Rule(pl.lit(None), (_Problem(pl.lit(True), "missing_field", _msg(col, "missing")),))


def _missing(col: str) -> pl.Expr:
    return pl.col(col).is_null()


# --- event_time -----------------------------------------------------------------------------


def _event_time_columns(s: pl.Series, default_tz: str | None) -> pl.DataFrame:
    """``__et``: the UTC instant or null; ``__et_why``: null, or the rejection reason."""
    if isinstance(s.dtype, pl.Datetime):
        return _from_datetime(s, default_tz)
    if s.dtype == pl.String():
        fast = _fast_iso(s)
        return fast if fast is not None else _from_text(s, default_tz)
    why = pl.select(pl.when(pl.lit(s).is_not_null()).then(pl.lit("bad_type"))).to_series()
    return _frame(pl.Series([None] * s.len(), dtype=_UTC), why)


def _frame(value: pl.Series, why: pl.Series) -> pl.DataFrame:
    return pl.DataFrame({"__et": value.cast(_UTC), "__et_why": why.cast(pl.String)})


def _from_datetime(s: pl.Series, default_tz: str | None) -> pl.DataFrame:
    dtype = s.dtype
    assert isinstance(dtype, pl.Datetime)
    if dtype.time_zone is not None:
        value = s.dt.convert_time_zone("UTC").dt.cast_time_unit("us")
        return _frame(value, pl.Series([None] * s.len(), dtype=pl.String))
    if default_tz is None:
        why = pl.select(pl.when(pl.lit(s).is_not_null()).then(pl.lit("naive")))
        return _frame(pl.Series([None] * s.len(), dtype=_UTC), why.to_series())
    local = s.dt.cast_time_unit("us")
    value = _localise(pl.lit(local), default_tz)
    out = pl.select(
        value.alias("__et"),
        pl.when(pl.lit(local).is_not_null() & value.is_null()).then(pl.lit("not_in_zone")),
    )
    return _frame(out.to_series(0), out.to_series(1))


def _localise(local: pl.Expr, zone: str) -> pl.Expr:
    """Wall time in ``zone`` to UTC; ambiguous -> earlier instant, non-existent -> null."""
    return local.dt.replace_time_zone(
        zone, ambiguous="earliest", non_existent="null"
    ).dt.convert_time_zone("UTC")


def _fast_iso(s: pl.Series) -> pl.DataFrame | None:
    """Parse a column where every value is zoned ISO text in one Arrow cast, or return None.

    The pattern check first keeps the fast path inside the language the slow path accepts,
    so both paths give the same answer for every value.
    """
    if not s.str.contains(_AWARE_PATTERN).all():
        return None
    try:
        parsed = pc.cast(s.to_arrow(), pa.timestamp("us", tz="UTC"))
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return None
    value = pl.Series(s.name, parsed)
    return _frame(value, pl.Series([None] * s.len(), dtype=pl.String))


def _from_text(s: pl.Series, default_tz: str | None) -> pl.DataFrame:
    """Parse ISO 8601 text value by value with polars expressions (handles every case)."""
    parts = pl.DataFrame({"t": s}).with_columns(
        g=pl.col("t").str.strip_chars().str.extract_groups(TIMESTAMP_PATTERN)
    )
    parts = parts.unnest("g").with_columns(
        local=_wall_time(pl.col("date"), pl.col("hm"), pl.col("sec"), pl.col("frac"))
    )
    offset = pl.when(pl.col("sign") == "-").then(-1).otherwise(1) * (
        pl.col("oh").cast(pl.Int64) * 60 + pl.col("om").fill_null("0").cast(pl.Int64)
    )
    aware = pl.col("zone").is_not_null()
    utc = pl.when(pl.col("zone").str.to_lowercase() == "z").then(pl.col("local")).otherwise(
        pl.col("local") - pl.duration(minutes=offset)
    )
    if default_tz is None:
        naive_value = pl.lit(None, dtype=_UTC)
    else:
        naive_value = _localise(pl.col("local"), default_tz)
    value = pl.when(aware).then(utc.dt.replace_time_zone("UTC")).otherwise(naive_value)
    why = (
        pl.when(pl.col("t").is_null())
        .then(None)
        .when(pl.col("date").is_null())
        .then(pl.lit("not_iso"))
        .when(pl.col("local").is_null())
        .then(pl.lit("not_real"))
        .when(~aware & (default_tz is None))
        .then(pl.lit("naive"))
        .when(value.is_null())
        .then(pl.lit("not_in_zone"))
    )
    out = parts.select(value.alias("__et"), why.alias("__et_why"))
    return _frame(out.to_series(0), out.to_series(1))


def _wall_time(date: pl.Expr, hm: pl.Expr, sec: pl.Expr, frac: pl.Expr) -> pl.Expr:
    text = pl.concat_str([date, pl.lit("T"), hm, sec.fill_null(":00")])
    whole = text.str.strptime(pl.Datetime("us"), "%Y-%m-%dT%H:%M:%S", strict=False)
    micros = frac.str.slice(0, 6).str.pad_end(6, "0").cast(pl.Int64).fill_null(0)
    return whole + pl.duration(microseconds=micros)


#: Why event_time failed (the ``__et_why`` codes) -> (reason, what the detail says).
_TIME_FAILURES: Final[dict[str, tuple[str, str]]] = {
    "not_iso": ("bad_timestamp", "is not an ISO 8601 timestamp"),
    "not_real": ("bad_timestamp", "is not a real date and time"),
    "naive": ("naive_timestamp", "has no offset and no default time zone was given"),
    "not_in_zone": ("bad_timestamp", "does not exist in the default time zone"),
}


def _event_time_rule(col: str, dtype: pl.DataType, _tz: str | None) -> _Rule:
    why = pl.col("__et_why")
    missing = _missing(col)
    if dtype == pl.String():
        missing = missing | (pl.col(col).str.strip_chars() == "")
    scalar = _is_scalar(dtype) or isinstance(dtype, pl.Datetime)
    problems = [
        _Problem(missing, "missing_field", _msg(col, "missing or empty")),
        _Problem(
            why == "bad_type",
            "bad_type",
            _msg(col, f"expected ISO 8601 text or a timestamp, got {dtype}"),
        ),
    ]
    if scalar:
        problems += [
            _Problem(why == code, reason, _fmt(col, text, pl.col(col)))
            for code, (reason, text) in _TIME_FAILURES.items()
        ]
    return _Rule(pl.col("__et"), tuple(problems))


# --- strings --------------------------------------------------------------------------------


def _string_value(col: str, dtype: pl.DataType) -> pl.Expr | None:
    if dtype == pl.String():
        return pl.col(col)
    if dtype == pl.Null() or _is_scalar(dtype):
        return pl.col(col).cast(pl.String)
    return None


def _required_string_rule(col: str, dtype: pl.DataType, _tz: str | None) -> _Rule:
    value = _string_value(col, dtype)
    if value is None:
        return _bad_dtype(col, dtype, "text")
    missing = value.is_null() | (value.str.strip_chars() == "")
    problems = [_Problem(missing, "missing_field", _msg(col, "missing or empty"))]
    allowed = {"action": schema.ACTIONS, "source_format": schema.SOURCE_FORMATS}.get(col)
    if allowed is not None:
        reason = "unknown_action" if col == "action" else "unknown_source_format"
        text = f"is not one of {', '.join(allowed)}"
        problems.append(_Problem(~value.is_in(list(allowed)), reason, _fmt(col, text, value)))
    return _Rule(value, tuple(problems))


def _optional_string_rule(col: str, dtype: pl.DataType, _tz: str | None) -> _Rule:
    value = _string_value(col, dtype)
    if value is None:
        return _bad_dtype(col, dtype, "text")
    if col != "statement_text":
        return _Rule(value)
    limit = schema.MAX_STATEMENT_CHARS
    too_long = value.str.len_chars() > limit
    detail = pl.concat_str(
        [pl.lit(f"{col}: "), value.str.len_chars().cast(pl.String), pl.lit(f" chars > {limit}")]
    )
    return _Rule(value, (_Problem(too_long, "too_large", detail),))


# --- numbers --------------------------------------------------------------------------------


def _bounds(col: str, value: pl.Expr) -> tuple[_Problem, ...]:
    limit, name = _BOUNDS[col]
    return (
        _Problem(value < 0, "negative_value", _fmt(col, "is negative", value)),
        _Problem(value > limit, "absurd_value", _fmt(col, f"is past {name} ({limit:g})", value)),
    )


def _int_rule(col: str, dtype: pl.DataType, _tz: str | None) -> _Rule:
    source = pl.col(col)
    if dtype == pl.Null():
        return _Rule(pl.lit(None, dtype=pl.Int64))
    if dtype.is_integer():
        value = source.cast(pl.Int64, strict=False)
        overflow = _Problem(
            source.is_not_null() & value.is_null(), "absurd_value", _fmt(col, "is too big", source)
        )
        return _Rule(value, (overflow, *_bounds(col, value)))
    if dtype.is_float():
        integral = source.is_finite() & (source == source.floor())
        value = pl.when(integral).then(source).cast(pl.Int64, strict=False)
        not_int = source.is_not_null() & value.is_null()
        bad = _Problem(not_int, "bad_type", _fmt(col, "is not an integer", source))
        return _Rule(value, (bad, *_bounds(col, pl.when(integral).then(source))))
    if dtype == pl.String():
        value = source.str.strip_chars().cast(pl.Int64, strict=False)
        not_int = source.is_not_null() & value.is_null()
        bad = _Problem(not_int, "bad_type", _fmt(col, "is not an integer", source))
        return _Rule(value, (bad, *_bounds(col, value)))
    return _bad_dtype(col, dtype, "an integer")


def _duration_rule(col: str, dtype: pl.DataType, _tz: str | None) -> _Rule:
    source = pl.col(col)
    if dtype == pl.Null():
        return _Rule(pl.lit(None, dtype=pl.Float64))
    if dtype.is_numeric():
        number = source.cast(pl.Float64)
    elif dtype == pl.String():
        number = source.str.strip_chars().cast(pl.Float64, strict=False)
    else:
        return _bad_dtype(col, dtype, "a number")
    finite = number.is_finite()
    value = pl.when(finite).then(number)
    bad = _Problem(
        source.is_not_null() & ~finite.fill_null(False),
        "bad_type",
        _fmt(col, "is not a finite number", source),
    )
    return _Rule(value, (bad, *_bounds(col, value)))


def _success_rule(col: str, dtype: pl.DataType, _tz: str | None) -> _Rule:
    source = pl.col(col)
    if dtype in (pl.Boolean(), pl.Null()):
        return _Rule(source.cast(pl.Boolean))
    if dtype != pl.String():
        return _bad_dtype(col, dtype, "a boolean")
    word = source.str.strip_chars().str.to_lowercase()
    value = pl.when(word == "true").then(True).when(word == "false").then(False)
    bad = _Problem(
        source.is_not_null() & value.is_null(), "bad_type", _fmt(col, "is not true or false", source)
    )
    return _Rule(value, (bad,))


# --- objects and extra ----------------------------------------------------------------------


def _objects_rule(col: str, dtype: pl.DataType, _tz: str | None) -> _Rule:
    source = pl.col(col)
    if dtype == pl.Null():
        return _Rule(source)
    if not (isinstance(dtype, pl.List) and dtype.inner == pl.String()):
        return _bad_dtype(col, dtype, "a list of strings")
    has_null = source.list.eval(pl.element().is_null().any()).list.first()
    bad = _Problem(has_null, "bad_type", _msg(col, "holds a null instead of a name"))
    return _Rule(source, (bad,))


def _extra_rule(col: str, dtype: pl.DataType, _tz: str | None) -> _Rule:
    source = pl.col(col)
    if dtype == pl.Null():
        return _Rule(source)
    if isinstance(dtype, pl.Map):
        source = source.cast(pl.List(pl.Struct({"key": dtype.key, "value": dtype.value})))
        dtype = pl.List(pl.Struct({"key": dtype.key, "value": dtype.value}))
    if isinstance(dtype, pl.Struct):
        return _extra_from_struct(col, dtype)
    if isinstance(dtype, pl.List) and isinstance(dtype.inner, pl.Struct):
        fields = {f.name: f.dtype for f in dtype.inner.fields}
        if set(fields) == {"key", "value"} and all(_is_scalar(t) or t == pl.Null() for t in fields.values()):
            return _Rule(_normalise_pairs(source))
    return _bad_dtype(col, dtype, "an object of string to string")


def _normalise_pairs(pairs: pl.Expr) -> pl.Expr:
    """Cast keys and values to text, drop pairs with a null value, sort by key."""
    element = pl.element()
    kv = pl.struct(
        element.struct.field("key").cast(pl.String).alias("key"),
        element.struct.field("value").cast(pl.String).alias("value"),
    )
    return pairs.list.eval(
        kv.filter(element.struct.field("value").is_not_null()).sort_by(
            element.struct.field("key").cast(pl.String)
        )
    )


def _extra_from_struct(col: str, dtype: pl.Struct) -> _Rule:
    scalar = sorted(f.name for f in dtype.fields if _is_scalar(f.dtype) or f.dtype == pl.Null())
    nested = [f.name for f in dtype.fields if f.name not in scalar]
    source = pl.col(col)
    if scalar:
        pairs = [
            pl.struct(
                pl.lit(name, dtype=pl.String).alias("key"),
                source.struct.field(name).cast(pl.String).alias("value"),
            )
            for name in scalar
        ]
        listed = pl.concat_list(pairs).list.eval(
            pl.element().filter(pl.element().struct.field("value").is_not_null())
        )
    else:
        listed = pl.lit([], dtype=schema.EXTRA_POLARS)
    value = pl.when(source.is_not_null()).then(listed)
    problems = tuple(
        _Problem(
            source.struct.field(name).is_not_null(),
            "bad_type",
            _msg(col, f"value of {name!r} is not a string, number or boolean"),
        )
        for name in nested
    )
    return _Rule(value, problems)


def _rule_for_kind(col: str) -> Callable[[str, pl.DataType, str | None], _Rule]:
    if col in schema.REQUIRED:
        return _required_string_rule
    if col in schema.INT_COLUMNS:
        return _int_rule
    return _optional_string_rule


_RULE_BUILDERS: Final[dict[str, Callable[[str, pl.DataType, str | None], _Rule]]] = {
    "event_time": _event_time_rule,
    "duration_ms": _duration_rule,
    "success": _success_rule,
    "objects": _objects_rule,
    "extra": _extra_rule,
}

"""validate(): every rule, the coercions, and the guarantees on both output frames."""

from __future__ import annotations

import datetime as dt
from typing import Any

import orjson
import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from polars.testing import assert_frame_equal

from detector import schema
from detector.errors import ConfigError
from detector.validation import REASONS, REJECT_SCHEMA, validate

UTC = dt.UTC
GOOD = {
    "event_time": "2024-03-01T12:00:00Z",
    "db_user": "app_api",
    "action": "read",
    "source_format": "canonical",
}


def loose(*rows: dict[str, Any], schema_overrides: dict[str, Any] | None = None) -> pl.DataFrame:
    """A loose input frame from row dicts, ``_loc`` numbered ``f:1``, ``f:2``, ..."""
    frame = pl.DataFrame(list(rows), schema_overrides=schema_overrides, infer_schema_length=None)
    return frame.with_columns(pl.Series("_loc", [f"f:{i + 1}" for i in range(len(rows))]))


def row(**changes: Any) -> dict[str, Any]:
    """A valid loose row with ``changes`` applied (a value of ``...`` drops the field)."""
    out = {**GOOD, **changes}
    return {k: v for k, v in out.items() if v is not ...}


def rejected(frame: pl.DataFrame, default_tz: str | None = None) -> list[tuple[str, str, str]]:
    good, rejects = validate(frame, default_tz=default_tz)
    assert good.height + rejects.height == frame.height
    return [(r["location"], r["reason"], r["detail"]) for r in rejects.iter_rows(named=True)]


def only_reason(frame: pl.DataFrame, default_tz: str | None = None) -> str:
    found = rejected(frame, default_tz)
    assert len(found) == 1, found
    return found[0][1]


# --- output shape ---------------------------------------------------------------------------


def test_good_rows_have_exactly_the_canonical_schema() -> None:
    good, rejects = validate(loose(row(), row(rows_returned="12", junk_column=1)))
    assert good.schema == pl.Schema(schema.EVENT_SCHEMA)
    assert good.columns == list(schema.COLUMNS)
    assert good["rows_returned"].to_list() == [None, 12]
    assert good["event_time"].to_list() == [dt.datetime(2024, 3, 1, 12, tzinfo=UTC)] * 2
    assert rejects.height == 0
    assert rejects.schema == pl.Schema(REJECT_SCHEMA)


def test_empty_input_gives_empty_frames() -> None:
    good, rejects = validate(pl.DataFrame({"_loc": []}, schema={"_loc": pl.String}))
    assert good.schema == pl.Schema(schema.EVENT_SCHEMA)
    assert rejects.schema == pl.Schema(REJECT_SCHEMA)
    assert good.height == rejects.height == 0


def test_every_row_lands_in_exactly_one_frame_in_order() -> None:
    rows = [row(db_user=f"u{i}", rows_returned=-1 if i % 3 == 0 else i) for i in range(10)]
    good, rejects = validate(loose(*rows))
    assert good["db_user"].to_list() == [f"u{i}" for i in range(10) if i % 3]
    assert rejects["location"].to_list() == [f"f:{i + 1}" for i in range(10) if i % 3 == 0]


def test_loc_is_required_and_may_be_any_type() -> None:
    with pytest.raises(ValueError, match="_loc"):
        validate(pl.DataFrame([GOOD]))
    frame = pl.DataFrame([row(rows_returned=-1)]).with_columns(_loc=pl.lit(7))
    assert validate(frame)[1]["location"].to_list() == ["7"]


def test_unknown_default_zone_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="Mars/Olympus"):
        validate(loose(row()), default_tz="Mars/Olympus")


# --- each rule ------------------------------------------------------------------------------


@pytest.mark.parametrize("field", schema.REQUIRED)
@pytest.mark.parametrize("value", [..., None, "", "   "])
def test_missing_required_field(field: str, value: Any) -> None:
    found = rejected(loose(row(**{field: value}), row()))
    assert found == [("f:1", "missing_field", found[0][2])]
    assert field in found[0][2]


def test_unknown_action_and_source_format() -> None:
    assert only_reason(loose(row(action="select"), row())) == "unknown_action"
    assert only_reason(loose(row(source_format="syslog"), row())) == "unknown_source_format"


@pytest.mark.parametrize(
    ("field", "value", "reason"),
    [
        ("rows_returned", "abc", "bad_type"),
        ("rows_returned", "1.5", "bad_type"),
        ("rows_returned", "-3", "negative_value"),
        ("rows_returned", str(schema.MAX_ROWS + 1), "absurd_value"),
        ("rows_affected", "-1", "negative_value"),
        ("bytes_scanned", str(schema.MAX_BYTES + 1), "absurd_value"),
        ("bytes_sent", "true", "bad_type"),
        ("duration_ms", "fast", "bad_type"),
        ("duration_ms", "nan", "bad_type"),
        ("duration_ms", "inf", "bad_type"),
        ("duration_ms", "-0.5", "negative_value"),
        ("duration_ms", str(schema.MAX_DURATION_MS * 2), "absurd_value"),
        ("success", "yes", "bad_type"),
    ],
)
def test_numeric_rules_on_text(field: str, value: str, reason: str) -> None:
    found = rejected(loose(row(**{field: value}), row(**{field: "1"}) | {"success": "true"}))
    assert [(loc, why) for loc, why, _ in found] == [("f:1", reason)]
    assert found[0][2].startswith(f"{field}: ")


def test_detail_names_field_and_value() -> None:
    found = rejected(loose(row(rows_returned="abc")))
    assert found[0][2] == "rows_returned: 'abc' is not an integer"


def test_numbers_of_other_types() -> None:
    frame = loose(
        row(rows_returned=1.0, duration_ms=3, success=True),
        row(rows_returned=2.5, duration_ms=3, success=False),
        row(rows_returned=-2.0, duration_ms=-3, success=None),
    )
    good, rejects = validate(frame)
    assert good["rows_returned"].to_list() == [1]
    assert good["duration_ms"].to_list() == [3.0]
    assert rejects["reason"].to_list() == ["bad_type", "negative_value"]


def test_text_columns_take_numbers_as_text() -> None:
    good, _ = validate(loose(row(db_user=42, tenant_id=7, db_name=True)))
    assert good.select("db_user", "tenant_id", "db_name").row(0) == ("42", "7", "true")


def test_a_statement_past_the_limit_is_cut_and_its_event_kept(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(schema, "MAX_STATEMENT_CHARS", 20)
    padded = "SELECT * FROM customers /*" + "x" * 50 + "*/"
    good, rejects = validate(loose(row(statement_text="SELECT 1"), row(statement_text=padded)))
    assert rejects.height == 0
    assert good["statement_text"].to_list() == ["SELECT 1", padded[:20]]


def test_objects_must_be_a_list_of_strings() -> None:
    frame = loose(row(objects=["public.a", "b"]), row(objects=["x", None]), row(objects=None))
    good, rejects = validate(frame)
    assert good["objects"].to_list() == [["public.a", "b"], None]
    assert rejects["reason"].to_list() == ["bad_type"]
    wrong = loose(row(objects="public.accounts"))
    assert only_reason(wrong) == "bad_type"


def test_unusable_column_types_are_rejected_per_row() -> None:
    frame = loose(row(), row()).with_columns(
        rows_returned=pl.Series([None, [1]], dtype=pl.List(pl.Int64))
    )
    found = rejected(frame)
    assert [(loc, why) for loc, why, _ in found] == [("f:2", "bad_type")]


# --- timestamps -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2024-03-01T12:00:00Z", dt.datetime(2024, 3, 1, 12, tzinfo=UTC)),
        ("2024-03-01 12:00:00z", dt.datetime(2024, 3, 1, 12, tzinfo=UTC)),
        ("2024-03-01T12:00:00.5+02:00", dt.datetime(2024, 3, 1, 10, 0, 0, 500000, tzinfo=UTC)),
        ("2024-03-01T12:00:00,25-0130", dt.datetime(2024, 3, 1, 13, 30, 0, 250000, tzinfo=UTC)),
        ("2024-03-01T12:00:00.1234567+05", dt.datetime(2024, 3, 1, 7, 0, 0, 123456, tzinfo=UTC)),
        ("2024-03-01T12:00Z", dt.datetime(2024, 3, 1, 12, tzinfo=UTC)),
        (" 2024-03-01T12:00:00Z ", dt.datetime(2024, 3, 1, 12, tzinfo=UTC)),
    ],
)
def test_zoned_timestamp_text_becomes_utc(text: str, expected: dt.datetime) -> None:
    good, rejects = validate(loose(row(event_time=text)))
    assert rejects.height == 0
    assert good["event_time"].to_list() == [expected]


@pytest.mark.parametrize(
    "text",
    [
        "yesterday",
        "2024-02-30T00:00:00Z",
        "2024-03-01T25:00:00Z",
        "2024-03-01",
        "2024-03-01T12Z",
        "2024-03-01T12:00.5Z",
        "2024-03-01T12:00:00+24:00",
        "1709294400",
    ],
)
def test_bad_timestamp(text: str) -> None:
    assert only_reason(loose(row(event_time=text), row())) == "bad_timestamp"


def test_naive_timestamp_rejected_unless_default_zone() -> None:
    frame = loose(row(event_time="2024-07-01T12:00:00"), row())
    assert rejected(frame)[0][:2] == ("f:1", "naive_timestamp")
    good, rejects = validate(frame, default_tz="Europe/Berlin")
    assert rejects.height == 0
    assert good["event_time"][0] == dt.datetime(2024, 7, 1, 10, tzinfo=UTC)


def test_default_zone_gaps_and_folds() -> None:
    gap = loose(row(event_time="2024-03-31T02:30:00"))
    assert only_reason(gap, "Europe/Berlin") == "bad_timestamp"
    fold = loose(row(event_time="2024-10-27T02:30:00"))
    good, _ = validate(fold, default_tz="Europe/Berlin")
    assert good["event_time"][0] == dt.datetime(2024, 10, 27, 0, 30, tzinfo=UTC)


def test_datetime_columns() -> None:
    aware = pl.Series([dt.datetime(2024, 1, 1, 9, tzinfo=dt.timezone(dt.timedelta(hours=9)))])
    good, _ = validate(loose(row()).with_columns(event_time=aware))
    assert good["event_time"].to_list() == [dt.datetime(2024, 1, 1, tzinfo=UTC)]
    naive = pl.Series([dt.datetime(2024, 1, 1, 9)], dtype=pl.Datetime("ns"))  # noqa: DTZ001
    frame = loose(row()).with_columns(event_time=naive)
    assert only_reason(frame) == "naive_timestamp"
    good, _ = validate(frame, default_tz="Asia/Tokyo")
    assert good["event_time"].to_list() == [dt.datetime(2024, 1, 1, tzinfo=UTC)]


def test_timestamp_of_wrong_type() -> None:
    assert only_reason(loose(row(event_time=1709294400))) == "bad_type"


_ZONES = st.sampled_from(["Z", "z", "+00:00", "+05:30", "-0800", "+14", "-03:45"])


@st.composite
def timestamp_texts(draw: st.DrawFn) -> tuple[str, dt.datetime]:
    """Zoned ISO 8601 text in the accepted variants, and the UTC instant it names."""
    moment = draw(st.datetimes(dt.datetime(1971, 1, 1), dt.datetime(2099, 12, 31)))  # noqa: DTZ001
    zone = draw(_ZONES)
    sep = draw(st.sampled_from(["T", " "]))
    if draw(st.booleans()):  # minutes only
        moment = moment.replace(second=0, microsecond=0)
        text = moment.strftime(f"%Y-%m-%d{sep}%H:%M") + zone
    else:
        digits = draw(st.integers(0, 9))
        frac = f"{moment.microsecond:06d}{draw(st.integers(0, 999)):03d}"[:digits]
        point = draw(st.sampled_from([".", ","]))
        text = moment.strftime(f"%Y-%m-%d{sep}%H:%M:%S") + (point + frac if digits else "") + zone
        moment = moment.replace(microsecond=int(frac.ljust(6, "0")[:6]) if digits else 0)
    offset = dt.timedelta()
    if zone.lower() != "z":
        sign = -1 if zone[0] == "-" else 1
        hours, minutes = int(zone[1:3]), int(zone[-2:]) if len(zone) > 3 else 0
        offset = sign * dt.timedelta(hours=hours, minutes=minutes)
    return text, moment.replace(tzinfo=UTC) - offset


@settings(max_examples=60, deadline=None)
@given(st.lists(timestamp_texts(), min_size=1, max_size=20))
def test_fast_and_careful_timestamp_paths_agree(items: list[tuple[str, dt.datetime]]) -> None:
    texts = [text for text, _ in items]
    expected = [instant for _, instant in items]
    clean, _ = validate(loose(*(row(event_time=t) for t in texts)))
    dirty, rejects = validate(loose(*(row(event_time=t) for t in [*texts, "garbage"])))
    assert clean["event_time"].to_list() == expected
    assert dirty["event_time"].to_list() == expected
    assert rejects["reason"].to_list() == ["bad_timestamp"]


# --- extra ----------------------------------------------------------------------------------


def pairs(**kv: str) -> list[dict[str, str]]:
    return [{"key": k, "value": v} for k, v in sorted(kv.items())]


def test_extra_from_struct_is_sorted_text_without_nulls() -> None:
    frame = loose(row(extra={"b": 2, "a": "x", "c": True}), row(extra={"a": None}), row())
    good, rejects = validate(frame)
    assert rejects.height == 0
    assert good["extra"].to_list() == [pairs(a="x", b="2", c="true"), [], None]


def test_extra_from_map_and_pair_lists() -> None:
    as_pairs = pl.Series(
        [[{"key": "z", "value": "1"}, {"key": "a", "value": None}, {"key": "b", "value": "2"}]],
        dtype=schema.EXTRA_POLARS,
    )
    good, _ = validate(loose(row()).with_columns(extra=as_pairs))
    assert good["extra"].to_list() == [pairs(b="2", z="1")]
    as_map = as_pairs.cast(pl.Map(pl.String, pl.String))
    good, _ = validate(loose(row()).with_columns(extra=as_map))
    assert good["extra"].to_list() == [pairs(b="2", z="1")]


def test_extra_of_wrong_shape() -> None:
    assert only_reason(loose(row(extra="k=v"))) == "bad_type"
    nested = loose(row(extra={"a": {"deep": 1}}), row(extra={"a": None, "b": "x"}))
    found = rejected(nested)
    assert [(loc, why) for loc, why, _ in found] == [("f:1", "bad_type")]


# --- the record -----------------------------------------------------------------------------


def test_record_is_json_with_statement_redacted() -> None:
    secret = "SELECT * FROM clients WHERE email = 'ann@example.com' AND id = 8675309"
    _, rejects = validate(loose(row(action="nope", statement_text=secret, rows_returned="5")))
    record = orjson.loads(rejects["record"][0])
    assert record["statement_text"] == "SELECT * FROM clients WHERE email = ? AND id = ?"
    assert record["action"] == "nope"
    assert record["rows_returned"] == "5"
    assert "ann@example.com" not in rejects["record"][0]


def test_first_broken_rule_in_column_order_wins() -> None:
    found = rejected(loose(row(event_time="bad", rows_returned="abc")))
    assert found[0][1] == "bad_timestamp"


def test_reasons_are_snake_case_and_documented() -> None:
    reasons = set(REASONS)
    assert all(r.replace("_", "").isalpha() and r.islower() for r in reasons)
    frame = loose(
        row(event_time=...),
        row(event_time="2024-01-01T00:00:00"),
        row(event_time="never"),
        row(action="nope"),
        row(source_format="nope"),
        row(rows_returned="x"),
        row(rows_returned=-1),
        row(rows_returned=10**14),
    )
    found = {reason for _, reason, _ in rejected(frame)}
    assert found <= reasons
    assert len(found) == 8


def test_output_equals_input_for_canonical_frames() -> None:
    canonical = pl.DataFrame(
        [
            {
                **GOOD,
                "event_time": dt.datetime(2024, 3, 1, 12, 0, 0, 123456, tzinfo=UTC),
                "objects": ["a.b"],
                "rows_returned": 3,
                "duration_ms": 1.5,
                "success": True,
                "extra": pairs(a="1"),
            }
        ],
        schema=schema.EVENT_SCHEMA,
    )
    good, rejects = validate(canonical.with_columns(_loc=pl.lit("x")))
    assert rejects.height == 0
    assert_frame_equal(good, canonical)


def test_typed_numbers_out_of_bounds() -> None:
    frame = loose(row(), row(), row(), row()).with_columns(
        rows_returned=pl.Series([5, -1, schema.MAX_ROWS + 1, None], dtype=pl.Int64),
        duration_ms=pl.Series([1.0, 2.0, 3.0, float("nan")]),
    )
    good, rejects = validate(frame)
    assert good["rows_returned"].to_list() == [5]
    assert rejects["reason"].to_list() == ["negative_value", "absurd_value", "bad_type"]
    unsigned = loose(row()).with_columns(rows_returned=pl.Series([2**64 - 1], dtype=pl.UInt64))
    assert only_reason(unsigned) == "absurd_value"

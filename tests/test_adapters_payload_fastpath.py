"""The all-at-once pgaudit payload parse agrees with the record-by-record one, or steps aside."""

from __future__ import annotations

import csv
import io

import polars as pl
from hypothesis import given, settings
from hypothesis import strategies as st

from detector.adapters.pgaudit import _PAYLOAD_FIELDS, _payload_frame, parse_payloads

_TEXT = st.one_of(
    st.text(alphabet=st.sampled_from(list('ab ,"\n\r\t;xé\\')), max_size=12),
    st.just("<not logged>"),
    st.just(""),
)


def _csv_line(fields: list[str]) -> str:
    out = io.StringIO()
    csv.writer(out, lineterminator="").writerow(fields)
    return out.getvalue()


def _careful(payloads: list[str]) -> list[list[str]] | None:
    rows = parse_payloads(payloads)
    if any(r is None or len(r) not in (9, 10) for r in rows):
        return None
    return [[*r, ""] if len(r) == 9 else r for r in rows]  # type: ignore[misc]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.lists(_TEXT, min_size=9, max_size=10), min_size=1, max_size=8))
def test_written_payloads_parse_the_same_both_ways(records: list[list[str]]) -> None:
    payloads = [_csv_line(r) for r in records]
    fast = _payload_frame(pl.Series(payloads, dtype=pl.String))
    if fast is None:
        return  # stepping aside is always allowed
    assert fast.rows() == [tuple(r) for r in _careful(payloads) or []]


@settings(max_examples=300, deadline=None)
@given(st.lists(_TEXT.map(lambda t: "SESSION,1,1,READ,SELECT,TABLE,t," + t), min_size=1, max_size=8))
def test_anything_the_fast_path_accepts_the_careful_path_accepts_identically(payloads: list[str]) -> None:
    fast = _payload_frame(pl.Series(payloads, dtype=pl.String))
    if fast is None:
        return
    careful = _careful(payloads)
    assert careful is not None, payloads
    assert fast.rows() == [tuple(r) for r in careful]
    assert fast.columns == list(_PAYLOAD_FIELDS)


def test_real_payloads_take_the_fast_path_and_agree() -> None:
    import orjson

    from detector.adapters.synthetic import pg_log

    messages = [orjson.loads(line)["message"] for line in pg_log(3000, "jsonlog").splitlines()]
    payloads = [m[7:] for m in messages if m.startswith("AUDIT: ")]
    fast = _payload_frame(pl.Series(payloads, dtype=pl.String))
    assert fast is not None
    assert fast.rows() == [tuple(r) for r in _careful(payloads) or []]

"""The all-at-once pgaudit payload parse agrees with the record-by-record one, or steps aside."""

from __future__ import annotations

import csv
import io

import polars as pl
from hypothesis import example, given, settings
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
@given(
    st.lists(_TEXT.map(lambda t: "SESSION,1,1,READ,SELECT,TABLE,t," + t), min_size=1, max_size=8)
)
def test_anything_the_fast_path_accepts_the_careful_path_accepts_identically(
    payloads: list[str],
) -> None:
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


_FIELD = st.one_of(
    st.text(alphabet=st.sampled_from(list('ab ,"\n\t;xé\\')), max_size=10), st.just("")
)


def _csvlog_line(n: int, statement: str, app: str, cut: bool) -> str:
    audit = _csv_line(
        [
            "SESSION",
            str(n),
            "1",
            "READ",
            "SELECT",
            "TABLE",
            "public.t",
            statement,
            "<not logged>",
            "3",
        ]
    )
    fields = [
        f"2026-01-14 10:00:{n % 60:02d}.000 UTC",
        "app_api",
        "saas",
        "4242",
        "127.0.0.1:5555",
        "65a1.1092",
        str(n),
        "SELECT",
        "2026-01-14 09:00:00 UTC",
        "3/7",
        "0",
        "LOG",
        "00000",
        "AUDIT: " + audit,
        "",
        "",
        "",
        "",
        "",
        "",
        "",
        "",
        app,
        "client backend",
        "",
        "0",
    ]
    line = _csv_line(fields) + "\n"
    return line[: len(line) // 2] if cut else line


@settings(max_examples=150, deadline=None)
@example(records=[("", "\n", False), ("", "", False)], final=False)  # a raw newline splits a record
@given(st.lists(st.tuples(_FIELD, _FIELD, st.booleans()), min_size=1, max_size=12), st.booleans())
def test_csvlog_fast_and_careful_readers_agree(
    records: list[tuple[str, str, bool]], final: bool
) -> None:
    import detector.adapters.pg_csvlog as csvlog

    data = "".join(_csvlog_line(i, s, a, cut) for i, (s, a, cut) in enumerate(records)).encode()
    fast = csvlog.PgCsvlogParser(location="f").feed(data, final=final)
    saved = csvlog._fast_columns
    csvlog._fast_columns = lambda text: None
    try:
        careful = csvlog.PgCsvlogParser(location="f").feed(data, final=final)
    finally:
        csvlog._fast_columns = saved
    assert fast.consumed == careful.consumed
    assert fast.events.equals(careful.events)
    assert fast.rejects.equals(careful.rejects)

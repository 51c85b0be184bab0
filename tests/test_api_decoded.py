"""The decoded-size bound on Parquet and Arrow ingest bodies (detector/api/decoded.py): rows and
bytes are found without building the decoded columns, exactly for rows, never below what the
ingest will hold for bytes, and a malformed body is an InputError, never a crash."""

from __future__ import annotations

import contextlib
import io
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from detector.api import decoded
from detector.errors import InputError

UNBOUNDED = 1 << 62


def parquet(table: pa.Table, **options: Any) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, **options)
    return buf.getvalue()


def arrow(
    table: pa.Table, *, file: bool = False, compression: str | None = None, chunk: int | None = None
) -> bytes:
    sink = pa.BufferOutputStream()
    opener = pa.ipc.new_file if file else pa.ipc.new_stream
    with opener(sink, table.schema, options=pa.ipc.IpcWriteOptions(compression=compression)) as w:
        w.write_table(table, max_chunksize=chunk)
    return sink.getvalue().to_pybytes()


def repeated(value: str, n: int) -> pa.DictionaryArray:
    """``n`` rows of one value, held once: what a dictionary page makes of it."""
    return pa.DictionaryArray.from_arrays(pa.array(np.zeros(n, dtype=np.int32)), pa.array([value]))


def plain(table: pa.Table) -> pa.Table:
    """The table as the ingest holds it: every dictionary replaced by its values."""
    return pa.table(
        {
            name: (col.cast(col.type.value_type) if pa.types.is_dictionary(col.type) else col)
            for name, col in zip(table.column_names, table.columns, strict=True)
        }
    )


def test_rows_past_the_limit_are_refused_from_the_footer_alone() -> None:
    table = pa.table(
        {
            "rows_returned": pa.array(np.zeros(5_001, dtype=np.int64)),
            "db_user": repeated("app", 5_001),
        }
    )
    body = parquet(table, compression="zstd", row_group_size=1_000)
    decoded.check(body, "parquet", decoded.Limits(rows=5_001, bytes=UNBOUNDED))
    with pytest.raises(
        decoded.TooLarge, match=r"5,001 events .* at most 5,000 .*api.max_decoded_rows"
    ):
        decoded.check(body, "parquet", decoded.Limits(rows=5_000, bytes=UNBOUNDED))


def test_a_small_parquet_body_of_repeated_text_is_refused_by_its_decoded_size() -> None:
    # 2,000 copies of one 4 KiB statement: under 32 KiB on the wire, 8 MB once decoded
    table = pa.table({"statement_text": repeated("select " + "x" * 4089, 2_000)})
    body = parquet(table, compression="zstd")
    assert len(body) < 32_768
    assert plain(table).nbytes > 8_000_000
    with pytest.raises(
        decoded.TooLarge, match=r"bytes .* at most 1,048,576 .*api.max_decoded_bytes"
    ):
        decoded.check(body, "parquet", decoded.Limits(rows=UNBOUNDED, bytes=1 << 20))
    decoded.check(body, "parquet", decoded.Limits(rows=UNBOUNDED, bytes=16 << 20))


def test_columns_the_service_does_not_read_do_not_count() -> None:
    table = pa.table(
        {"db_user": repeated("app", 2_000), "not_an_event_column": repeated("x" * 4096, 2_000)}
    )
    decoded.check(parquet(table), "parquet", decoded.Limits(rows=UNBOUNDED, bytes=1 << 20))


@pytest.mark.parametrize("file", [False, True], ids=["stream", "file"])
def test_a_compressed_arrow_buffer_is_judged_by_the_size_it_declares(file: bool) -> None:
    # 4 M int64 zeros: 32 MB inflated, a few KiB compressed
    table = pa.table({"rows_returned": pa.array(np.zeros(4_000_000, dtype=np.int64))})
    body = arrow(table, file=file, compression="zstd")
    assert len(body) < 64_000
    with pytest.raises(decoded.TooLarge, match="bytes"):
        decoded.check(body, "arrow", decoded.Limits(rows=UNBOUNDED, bytes=16 << 20))
    with pytest.raises(decoded.TooLarge, match="4,000,000 events"):
        decoded.check(body, "arrow", decoded.Limits(rows=1_000_000, bytes=UNBOUNDED))
    decoded.check(body, "arrow", decoded.Limits(rows=4_000_000, bytes=40 << 20))


def test_an_arrow_file_is_counted_by_the_blocks_its_footer_lists() -> None:
    """A file reader reads the batches the footer points to; those are the ones counted."""
    table = pa.table({"rows_returned": pa.array(np.arange(250, dtype=np.int64))})
    body = arrow(table, file=True, chunk=100)
    assert pa.ipc.open_file(pa.BufferReader(body)).num_record_batches == 3
    extents = [decoded._batch_extent(m) for m in decoded._file_messages(body)]
    assert [rows for rows, _ in extents] == [100, 100, 50]
    assert all(size >= rows * 8 for rows, size in extents)
    with pytest.raises(decoded.TooLarge, match="events"):
        decoded.check(body, "arrow", decoded.Limits(rows=249, bytes=UNBOUNDED))


def test_dictionary_fields_of_arrow_count_as_their_values() -> None:
    table = pa.table({"statement_text": repeated("x" * 4096, 2_000)})
    body = arrow(table)
    assert len(body) < 32_768
    with pytest.raises(decoded.TooLarge, match="bytes"):
        decoded.check(body, "arrow", decoded.Limits(rows=UNBOUNDED, bytes=1 << 20))


def test_the_bundled_sample_fits_the_default_limits() -> None:
    from detector.config import ApiSettings
    from tests.conftest import SAMPLE

    api = ApiSettings()
    body = (SAMPLE / "events.parquet").read_bytes()
    assert len(body) <= api.max_body_bytes
    decoded.check(body, "parquet", decoded.Limits(api.max_decoded_rows, api.max_decoded_bytes))


def test_a_body_that_is_not_what_it_claims_is_an_input_error() -> None:
    with pytest.raises(InputError, match="cannot read the body as Parquet"):
        decoded.check(b"PAR1garbage", "parquet", decoded.Limits(rows=1, bytes=1))
    decoded.check(b"\x00" * 10, "json", decoded.Limits(rows=1, bytes=1))  # not this module's
    with pytest.raises(InputError, match="not an Arrow IPC"):
        decoded.check(b"ARROW1\x00\x00garbage", "arrow", decoded.Limits(rows=1, bytes=1 << 20))


# --- properties ------------------------------------------------------------------------------

_WORDS = st.text(alphabet="abcdefgh_.", min_size=0, max_size=40)


@st.composite
def tables(draw: st.DrawFn) -> pa.Table:
    n = draw(st.integers(0, 300))
    columns: dict[str, pa.Array] = {}
    if draw(st.booleans()):
        columns["rows_returned"] = pa.array(
            draw(st.lists(st.integers(-(10**12), 10**12) | st.none(), min_size=n, max_size=n)),
            type=pa.int64(),
        )
    if draw(st.booleans()):
        words = pa.array(
            draw(st.lists(_WORDS | st.none(), min_size=n, max_size=n)), type=pa.string()
        )
        columns["db_user"] = words.dictionary_encode() if draw(st.booleans()) else words
    if draw(st.booleans()):
        long = draw(st.sampled_from(["", "x" * 50, "select " + "y" * 2000]))
        columns["statement_text"] = (
            repeated(long, n) if draw(st.booleans()) else pa.array([long] * n)
        )
    if draw(st.booleans()):
        columns["objects"] = pa.array(
            draw(st.lists(st.lists(_WORDS, max_size=3) | st.none(), min_size=n, max_size=n)),
            type=pa.list_(pa.string()),
        )
    if draw(st.booleans()):
        pairs = st.lists(st.tuples(_WORDS, _WORDS), max_size=2)
        columns["extra"] = pa.array(
            draw(st.lists(pairs, min_size=n, max_size=n)), type=pa.map_(pa.string(), pa.string())
        )
    if not columns:
        columns["rows_returned"] = pa.array(np.zeros(n, dtype=np.int64))
    return pa.table(columns)


@st.composite
def bodies(draw: st.DrawFn) -> tuple[pa.Table, str, bytes]:
    table = draw(tables())
    if draw(st.booleans()):
        options: dict[str, Any] = {
            "compression": draw(st.sampled_from(["none", "zstd", "snappy"])),
            "row_group_size": draw(st.integers(1, 400)),
        }
        return table, "parquet", parquet(table, **options)
    body = arrow(
        table,
        file=draw(st.booleans()),
        compression=draw(st.sampled_from([None, "zstd", "lz4"])),
        chunk=draw(st.integers(1, 400)),
    )
    return table, "arrow", body


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=bodies(), limit=st.integers(0, 400))
def test_rows_are_counted_exactly(case: tuple[pa.Table, str, bytes], limit: int) -> None:
    table, kind, body = case
    if table.num_rows > limit:
        with pytest.raises(decoded.TooLarge, match="events"):
            decoded.check(body, kind, decoded.Limits(rows=limit, bytes=UNBOUNDED))
    else:
        decoded.check(body, kind, decoded.Limits(rows=limit, bytes=UNBOUNDED))


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=bodies(), limit=st.integers(1, 2_000_000))
def test_a_body_that_passes_decodes_within_the_byte_limit(
    case: tuple[pa.Table, str, bytes], limit: int
) -> None:
    """Sound: what passes holds at most the limit once decoded. Not over-strict: a body whose
    decoded columns take a quarter of the limit (less headers) passes."""
    table, kind, body = case
    held = plain(table).nbytes
    try:
        decoded.check(body, kind, decoded.Limits(rows=UNBOUNDED, bytes=limit))
    except decoded.TooLarge:
        assert 4 * held + 65_536 > limit
    else:
        assert held <= limit


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=bodies(), data=st.data())
def test_a_damaged_arrow_or_parquet_body_is_refused_cleanly(
    case: tuple[pa.Table, str, bytes], data: st.DataObject
) -> None:
    _table, kind, body = case
    damaged = bytearray(body)
    for _ in range(data.draw(st.integers(1, 8))):
        at = data.draw(st.integers(0, len(damaged) - 1))
        damaged[at] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(damaged)))
    for candidate in (bytes(damaged), bytes(damaged[:cut])):
        # passes, or an InputError (TooLarge included: a damaged length may claim a great deal)
        with contextlib.suppress(InputError):
            decoded.check(candidate, kind, decoded.Limits(rows=10_000, bytes=64 << 20))

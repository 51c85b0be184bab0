"""How much a Parquet or Arrow IPC body decodes to, found without decoding it in full.

A few hundred kilobytes of compressed, dictionary-encoded Parquet can stand for tens of millions
of rows or gigabytes of repeated text, and a compressed Arrow buffer declares the size it
inflates to. :func:`check` refuses such a body (:class:`TooLarge`) before the ingest decodes it:

- **Parquet**: the rows the footer's row groups declare; the uncompressed size of the columns
  the service reads; then those columns read one row group at a time with every string leaf kept
  in dictionary form, so a value repeated a million times is held once while its expansion is
  summed.
- **Arrow IPC** (stream or file): each record batch's row count and the uncompressed size of
  its buffers, from the message metadata (the flatbuffer header every message carries), before
  any buffer is inflated; then the batches are read and fully validated (IPC buffers are taken
  as sent, and an offset or dictionary index out of bounds would crash what reads them next),
  and dictionary-encoded fields are counted at the size of their values, which is what the
  ingest turns them into.

Sizes count what the columns hold in Arrow memory (values, offsets, validity); the service's
copy of the events is of the same order.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Final

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from detector import schema
from detector.errors import InputError

_FILE_MAGIC: Final = b"ARROW1"
_HEADER_DICTIONARY: Final = 2
_HEADER_RECORD_BATCH: Final = 3


class TooLarge(InputError):
    """The body decodes to more rows or bytes than one request may."""


@dataclass(frozen=True, slots=True)
class Limits:
    rows: int
    bytes: int


def check(body: bytes, kind: str, limits: Limits) -> None:
    """TooLarge when ``body`` (``kind`` "parquet" or "arrow") decodes to more than ``limits``
    allow; InputError when it cannot be read as that kind. Other kinds pass."""
    if kind == "parquet":
        _parquet(body, limits)
    elif kind == "arrow":
        _arrow(body, limits)


def _too_many_rows(rows: int, limits: Limits) -> TooLarge:
    return TooLarge(
        f"body decodes to {rows:,} events or more; at most {limits.rows:,} per request "
        "(api.max_decoded_rows): send it in parts"
    )


def _too_many_bytes(size: int, limits: Limits) -> TooLarge:
    return TooLarge(
        f"body decodes to {size:,} bytes or more; at most {limits.bytes:,} per request "
        "(api.max_decoded_bytes): send it in parts"
    )


# --- Parquet --------------------------------------------------------------------------------


def _parquet(body: bytes, limits: Limits) -> None:
    try:
        parquet = pq.ParquetFile(pa.BufferReader(body))
        meta = parquet.metadata
        groups = [meta.row_group(g) for g in range(meta.num_row_groups)]
        rows = max(meta.num_rows, sum(max(group.num_rows, 0) for group in groups))
        if rows > limits.rows:
            raise _too_many_rows(rows, limits)
        # the columns the ingest reads, and their leaves (a list's or a map's values)
        columns = [name for name in parquet.schema_arrow.names if name in schema.EVENT_SCHEMA]
        leaves = [meta.schema.column(i) for i in range(meta.num_columns)]
        read = [i for i, leaf in enumerate(leaves) if _under(leaf.path, columns)]
        stored = sum(max(g.column(i).total_uncompressed_size, 0) for g in groups for i in read)
        if stored > limits.bytes:
            raise _too_many_bytes(stored, limits)
        strings = [leaves[i].path for i in read if leaves[i].physical_type == "BYTE_ARRAY"]
        reader = pq.ParquetFile(pa.BufferReader(body), read_dictionary=strings)
        size = 0
        for g in range(meta.num_row_groups):
            size += decoded_size(reader.read_row_group(g, columns=columns, use_threads=False))
            if size > limits.bytes:
                raise _too_many_bytes(size, limits)
    except (pa.ArrowException, OSError, ValueError, IndexError) as exc:
        raise InputError(f"cannot read the body as Parquet: {exc}") from None


def _under(path: str, columns: list[str]) -> bool:
    return any(path == name or path.startswith(f"{name}.") for name in columns)


# --- Arrow IPC ------------------------------------------------------------------------------


def _arrow(body: bytes, limits: Limits) -> None:
    is_file = body[: len(_FILE_MAGIC)] == _FILE_MAGIC
    try:
        messages = _file_messages(body) if is_file else _stream_messages(body)
        rows = size = 0
        for message in messages:
            batch_rows, batch_bytes = _batch_extent(message)
            rows += batch_rows
            size += batch_bytes
            if rows > limits.rows:
                raise _too_many_rows(rows, limits)
            if size > limits.bytes:
                raise _too_many_bytes(size, limits)
        source = pa.BufferReader(body)
        reader: Any = pa.ipc.open_file(source) if is_file else pa.ipc.open_stream(source)
        table = reader.read_all()
        table.validate(full=True)  # IPC buffers are taken as they come: offsets, indices...
    except (pa.ArrowException, OSError, struct.error, ValueError) as exc:
        raise InputError(f"body is not an Arrow IPC stream or file: {exc}") from None
    if any(_has_dictionary(field.type) for field in table.schema):
        size = decoded_size(table)
        if size > limits.bytes:
            raise _too_many_bytes(size, limits)


def _stream_messages(body: bytes) -> Iterator[pa.ipc.Message]:
    yield from pa.ipc.MessageReader.open_stream(pa.BufferReader(body))


def _file_messages(body: bytes) -> Iterator[pa.ipc.Message]:
    """The dictionary and record batch messages an Arrow file's footer points to (a file
    reader reads these, whatever lies between them)."""
    end = len(body) - len(_FILE_MAGIC)
    if end < 4 or body[end:] != _FILE_MAGIC:
        raise ValueError("no Arrow file footer")
    (footer_len,) = struct.unpack_from("<i", body, end - 4)
    start = end - 4 - footer_len
    if footer_len <= 0 or start < 0:
        raise ValueError("bad Arrow file footer length")
    footer = _Table.root(body[start : end - 4])
    for slot in (2, 3):  # dictionaries, then record batches
        for offset, meta_len, body_len in footer.structs(slot, "<qi4xq"):
            if offset < 0 or meta_len < 0 or body_len < 0 or offset + meta_len > len(body):
                raise ValueError("an Arrow file block lies outside the body")
            chunk = pa.py_buffer(body)[offset : offset + meta_len + body_len]
            yield pa.ipc.read_message(chunk)


def _batch_extent(message: pa.ipc.Message) -> tuple[int, int]:
    """(rows, bytes once inflated) of a record batch message; (0, bytes) for a dictionary
    batch; (0, 0) for anything else."""
    root = _Table.root(message.metadata.to_pybytes())
    kind = root.scalar(1, "<B", 0)
    header = root.table(2)
    if header is None or kind not in (_HEADER_DICTIONARY, _HEADER_RECORD_BATCH):
        return 0, 0
    batch = header if kind == _HEADER_RECORD_BATCH else header.table(1)
    if batch is None:
        return 0, 0
    rows = max(batch.scalar(0, "<q", 0), 0) if kind == _HEADER_RECORD_BATCH else 0
    buffers = batch.structs(2, "<qq")
    if batch.table(3) is None:  # uncompressed: the buffers are the body's own bytes
        return rows, sum(max(length, 0) for _, length in buffers)
    data = memoryview(message.body)
    size = 0
    for offset, length in buffers:  # each compressed buffer starts with its inflated length
        if length < 8:
            continue
        if offset < 0 or offset + 8 > len(data):
            raise ValueError("an Arrow buffer lies outside its message")
        inflated = _unpack("<q", data, offset)
        size += length - 8 if inflated < 0 else inflated
    return rows, size


class _Table:
    """Just enough of a flatbuffers table reader for Arrow's message and footer headers."""

    __slots__ = ("_buf", "_pos", "_vtable", "_vtable_len")

    def __init__(self, buf: bytes, pos: int) -> None:
        self._buf = buf
        self._pos = pos
        self._vtable = pos - _unpack("<i", buf, pos)
        self._vtable_len = _unpack("<H", buf, self._vtable)

    @classmethod
    def root(cls, buf: bytes) -> _Table:
        return cls(buf, _unpack("<I", buf, 0))

    def _field(self, slot: int) -> int:
        entry = 4 + 2 * slot
        if entry >= self._vtable_len:
            return 0
        return _unpack("<H", self._buf, self._vtable + entry)

    def _target(self, slot: int) -> int | None:
        field = self._field(slot)
        if not field:
            return None
        at = self._pos + field
        return at + _unpack("<I", self._buf, at)

    def scalar(self, slot: int, fmt: str, default: int) -> int:
        field = self._field(slot)
        return _unpack(fmt, self._buf, self._pos + field) if field else default

    def table(self, slot: int) -> _Table | None:
        at = self._target(slot)
        return None if at is None else _Table(self._buf, at)

    def structs(self, slot: int, fmt: str) -> list[tuple[int, ...]]:
        at = self._target(slot)
        if at is None:
            return []
        count = _unpack("<I", self._buf, at)
        width = struct.calcsize(fmt)
        if at + 4 + count * width > len(self._buf):
            raise ValueError("a flatbuffer vector runs past its buffer")
        return [struct.unpack_from(fmt, self._buf, at + 4 + i * width) for i in range(count)]


def _unpack(fmt: str, buf: bytes | memoryview, pos: int) -> int:
    if pos < 0:
        raise ValueError("a flatbuffer offset points before its buffer")
    value: int = struct.unpack_from(fmt, buf, pos)[0]
    return value


# --- sizes ----------------------------------------------------------------------------------


def _has_dictionary(dtype: pa.DataType) -> bool:
    if pa.types.is_dictionary(dtype):
        return True
    return any(_has_dictionary(dtype.field(i).type) for i in range(dtype.num_fields))


def decoded_size(data: pa.Table | pa.ChunkedArray | pa.Array) -> int:
    """Bytes the values take once every dictionary is replaced by its values."""
    if isinstance(data, pa.Table):
        return sum(decoded_size(column) for column in data.columns)
    if isinstance(data, pa.ChunkedArray):
        return sum(decoded_size(chunk) for chunk in data.chunks)
    return _array_size(data)


def _array_size(array: pa.Array) -> int:
    dtype = array.type
    validity = (len(array) + 7) // 8
    if pa.types.is_dictionary(dtype):
        return validity + _expanded(array)
    if isinstance(array, pa.MapArray):
        offsets = 8 * (len(array) + 1)
        return validity + offsets + _array_size(array.keys) + _array_size(array.items)
    if isinstance(array, pa.StructArray):
        return validity + sum(_array_size(child) for child in array.flatten())
    if isinstance(array, pa.ListArray | pa.LargeListArray | pa.FixedSizeListArray):
        offsets = 0 if isinstance(array, pa.FixedSizeListArray) else 8 * (len(array) + 1)
        return validity + offsets + _array_size(array.flatten())
    return int(array.nbytes)


def _expanded(array: pa.DictionaryArray) -> int:
    """What a dictionary array takes as plain values, computed from the dictionary's value
    sizes and the indices: the plain values are never built."""
    values, indices = array.dictionary, array.indices
    value_type = values.type
    if _is_binary_like(value_type):
        lengths = pc.take(pc.binary_length(values), indices)
        return 8 * (len(array) + 1) + int(pc.sum(lengths).as_py() or 0)
    width = getattr(value_type, "bit_width", None)
    if isinstance(width, int) and width > 0 and value_type.num_fields == 0:
        return (len(array) * width + 7) // 8
    # nested values: every row counted at the size of the whole dictionary (an upper bound)
    return len(array) * max(_array_size(values), 1)


def _is_binary_like(dtype: pa.DataType) -> bool:
    checks = (
        pa.types.is_string,
        pa.types.is_large_string,
        pa.types.is_binary,
        pa.types.is_large_binary,
    )
    view_checks = [getattr(pa.types, name, None) for name in ("is_string_view", "is_binary_view")]
    return any(c(dtype) for c in checks) or any(c is not None and c(dtype) for c in view_checks)

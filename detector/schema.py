"""The canonical access event, defined once (Arrow) and derived for polars.

One flat row per audited statement or login. Null means unknown, never zero.
"""

from __future__ import annotations

from typing import Final

import polars as pl
import pyarrow as pa

ACTIONS: Final = ("read", "write", "ddl", "dcl", "copy", "login", "login_failed", "other")
SOURCE_FORMATS: Final = ("canonical", "pgaudit", "mariadb_audit")

#: Required columns: a record without any of them is rejected.
REQUIRED: Final = ("event_time", "db_user", "action", "source_format")

_MAP = pa.map_(pa.string(), pa.string())

#: The canonical schema as Arrow (Parquet files are written with it).
EVENT_ARROW_SCHEMA: Final = pa.schema(
    [
        pa.field("event_time", pa.timestamp("us", tz="UTC"), nullable=False),
        pa.field("db_user", pa.string(), nullable=False),
        pa.field("action", pa.string(), nullable=False),
        pa.field("source_format", pa.string(), nullable=False),
        pa.field("db_system", pa.string()),
        pa.field("tenant_id", pa.string()),
        pa.field("db_instance", pa.string()),
        pa.field("db_name", pa.string()),
        pa.field("client_ip", pa.string()),
        pa.field("client_app", pa.string()),
        pa.field("session_id", pa.string()),
        pa.field("statement_id", pa.string()),
        pa.field("command", pa.string()),
        pa.field("objects", pa.list_(pa.string())),
        pa.field("statement_text", pa.string()),
        pa.field("rows_returned", pa.int64()),
        pa.field("rows_affected", pa.int64()),
        pa.field("bytes_scanned", pa.int64()),
        pa.field("bytes_sent", pa.int64()),
        pa.field("duration_ms", pa.float64()),
        pa.field("success", pa.bool_()),
        pa.field("extra", _MAP),
    ]
)

#: polars has no map type: ``extra`` is a list of key/value structs there.
EXTRA_POLARS: Final = pl.List(pl.Struct({"key": pl.String, "value": pl.String}))

#: The canonical schema as polars dtypes, in column order.
EVENT_SCHEMA: Final[dict[str, pl.DataType]] = {
    "event_time": pl.Datetime("us", "UTC"),
    "db_user": pl.String(),
    "action": pl.String(),
    "source_format": pl.String(),
    "db_system": pl.String(),
    "tenant_id": pl.String(),
    "db_instance": pl.String(),
    "db_name": pl.String(),
    "client_ip": pl.String(),
    "client_app": pl.String(),
    "session_id": pl.String(),
    "statement_id": pl.String(),
    "command": pl.String(),
    "objects": pl.List(pl.String),
    "statement_text": pl.String(),
    "rows_returned": pl.Int64(),
    "rows_affected": pl.Int64(),
    "bytes_scanned": pl.Int64(),
    "bytes_sent": pl.Int64(),
    "duration_ms": pl.Float64(),
    "success": pl.Boolean(),
    "extra": EXTRA_POLARS,
}

COLUMNS: Final = tuple(EVENT_SCHEMA)
INT_COLUMNS: Final = ("rows_returned", "rows_affected", "bytes_scanned", "bytes_sent")
STRING_COLUMNS: Final = tuple(c for c, t in EVENT_SCHEMA.items() if t == pl.String())

#: Upper bounds past which a value is absurd rather than large (a record is rejected).
MAX_ROWS: Final = 10**13
MAX_BYTES: Final = 10**16
MAX_DURATION_MS: Final = 30 * 24 * 3600 * 1000.0
MAX_STATEMENT_CHARS: Final = 1_000_000


def empty_events() -> pl.DataFrame:
    """An empty frame with the canonical schema."""
    return pl.DataFrame(schema=EVENT_SCHEMA)


def to_arrow(df: pl.DataFrame) -> pa.Table:
    """Convert a canonical polars frame to an Arrow table with the canonical schema
    (``extra`` becomes a real Arrow map)."""
    table = df.select(COLUMNS).to_arrow()
    extra = table.column("extra")
    as_map = (
        pa.chunked_array(
            [pa.array(chunk.to_pylist(), type=_MAP) for chunk in extra.chunks], type=_MAP
        )
        if extra.num_chunks
        else pa.chunked_array([], type=_MAP)
    )
    table = table.set_column(table.schema.get_field_index("extra"), "extra", as_map)
    return table.cast(EVENT_ARROW_SCHEMA)


#: Incident severities, least to most severe.
SEVERITIES: Final = ("low", "medium", "high", "critical")
#: A severity's rank: comparing ranks compares severities.
SEVERITY_RANK: Final = {name: rank for rank, name in enumerate(SEVERITIES)}

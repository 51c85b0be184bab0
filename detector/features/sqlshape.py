"""Statement shape from a real SQL parse, cached by fingerprint.

A fingerprint is the statement with its literals replaced, so ``... WHERE id = 7`` and
``... WHERE id = 9`` share one. Statements are read through the dialect's tokenizer
(:mod:`detector.sqltext`), the reader redaction uses too, and only their first
``max_statement_chars`` characters are read. Each distinct fingerprint is parsed once (sqlglot)
and its shape kept in a bounded cache; a batch pays one vectorised row key per row, one
tokenizer pass per row key it has not seen before, and one parse per new shape.
"""

from __future__ import annotations

import hashlib
import re
from collections import OrderedDict
from dataclasses import dataclass, fields
from typing import Final

import polars as pl
import sqlglot
from sqlglot import exp

from detector.features.settings import FeatureSettings
from detector.sqltext import ANALYSED_CHARS, DIALECTS, fingerprint_text, row_key_expr

_COPY_TO: Final = re.compile(r"^\s*copy\b.*\bto\b", re.IGNORECASE | re.DOTALL)
_OFFSET: Final = re.compile(r"\boffset\b", re.IGNORECASE)

KIND_CODES: Final = (
    "none",
    "select",
    "insert",
    "update",
    "delete",
    "copy_to",
    "copy_from",
    "ddl",
    "dcl",
    "set",
    "other",
)


@dataclass(frozen=True, slots=True)
class Shape:
    """What a statement does, independent of its literals."""

    fingerprint: int  # stable 63-bit hash of the normalised text
    kind: int  # index into KIND_CODES
    parsed: bool
    tables: tuple[str, ...]
    select_star: bool
    has_where: bool
    tenant_filter: bool
    point_filter: bool  # WHERE pins a column to one value (literal or bound parameter)
    has_limit: bool
    has_offset: bool
    aggregate: bool
    group_by_tenant: bool


SHAPE_COLUMNS: Final = tuple(f.name for f in fields(Shape))


_DIALECT_OF_SYSTEM: Final = {"mariadb": 1, "mysql": 1}
#: Mixed into the row key of statements read as MySQL, so each dialect has its own shapes.
_DIALECT_SALT: Final = 0x5BD1E9955BD1E995


def dialect_expr(column: str = "db_system") -> pl.Expr:
    """Index into :data:`DIALECTS` of each row's SQL dialect (PostgreSQL unless MariaDB or
    MySQL)."""
    return (
        pl.col(column)
        .str.to_lowercase()
        .replace_strict(_DIALECT_OF_SYSTEM, default=0, return_dtype=pl.UInt8)
        .fill_null(0)
    )


def row_fingerprint_expr(
    column: str = "statement_text", dialect: pl.Expr | None = None, limit: int | None = None
) -> pl.Expr:
    """Vectorised per-row key (:func:`detector.sqltext.row_key_expr`) of the first ``limit``
    characters of the text, salted by dialect (null text -> null); rows with one key share one
    fingerprint."""
    text = pl.col(column)
    if limit is not None:
        text = text.str.slice(0, limit)
    h = row_key_expr(text, True if dialect is None else dialect == 0)
    if dialect is not None:
        h = pl.when(dialect == 0).then(h).otherwise(h.xor(pl.lit(_DIALECT_SALT, pl.UInt64)))
    return pl.when(pl.col(column).is_not_null()).then(h)


def normalise(text: str, dialect: str = "postgres") -> str:
    """The canonical fingerprint text of one statement (literals and comments out, lists
    collapsed, lower case)."""
    return fingerprint_text(text, dialect)


def stable_hash(text: str) -> int:
    """A 63-bit hash that does not change across processes or library versions."""
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class ShapeCache:
    """Parses each distinct fingerprint once; bounded LRU keyed by the row-level hash."""

    def __init__(
        self,
        settings: FeatureSettings,
        max_entries: int = 100_000,
        *,
        max_chars: int = ANALYSED_CHARS,
    ) -> None:
        self.settings = settings
        self.max_chars = max_chars
        self.max_entries = max_entries
        self._by_row_hash: OrderedDict[int, Shape] = OrderedDict()
        self._by_fingerprint: dict[int, Shape] = {}
        self.parses = 0

    def shapes(
        self, row_hash: pl.Series, text: pl.Series, dialect: pl.Series | None = None
    ) -> pl.DataFrame:
        """Shape columns for each distinct ``row_hash`` in the batch (one row per hash);
        ``dialect`` indexes :data:`DIALECTS` per row (PostgreSQL when not given)."""
        d = dialect if dialect is not None else pl.Series("d", [0] * len(text), pl.UInt8)
        uniq = pl.DataFrame({"h": row_hash, "t": text, "d": d}).filter(pl.col("t").is_not_null())
        uniq = uniq.unique(subset="h", keep="first", maintain_order=True)
        rows: list[Shape] = []
        for h, t, dia in uniq.iter_rows():
            shape = self._by_row_hash.get(h)
            if shape is None:
                shape = self._shape_of(t, DIALECTS[dia])
                self._by_row_hash[h] = shape
                if len(self._by_row_hash) > self.max_entries:
                    self._by_row_hash.popitem(last=False)
            else:
                self._by_row_hash.move_to_end(h)
            rows.append(shape)
        return pl.DataFrame(
            {
                "h": uniq["h"],
                **{name: [getattr(s, name) for s in rows] for name in SHAPE_COLUMNS},
            },
            schema={"h": pl.UInt64, **SHAPE_SCHEMA},
        )

    def _shape_of(self, text: str, dialect: str = "postgres") -> Shape:
        norm = normalise(text[: self.max_chars], dialect)
        fp = stable_hash(norm if dialect == "postgres" else f"{dialect}:{norm}")
        cached = self._by_fingerprint.get(fp)
        if cached is not None:
            return cached
        self.parses += 1
        shape = analyse(norm, fp, self.settings, dialect)
        if len(self._by_fingerprint) >= self.max_entries:
            self._by_fingerprint.clear()
        self._by_fingerprint[fp] = shape
        return shape


SHAPE_SCHEMA: Final[dict[str, pl.DataType]] = {
    "fingerprint": pl.Int64(),
    "kind": pl.Int8(),
    "parsed": pl.Boolean(),
    "tables": pl.List(pl.String),
    "select_star": pl.Boolean(),
    "has_where": pl.Boolean(),
    "tenant_filter": pl.Boolean(),
    "point_filter": pl.Boolean(),
    "has_limit": pl.Boolean(),
    "has_offset": pl.Boolean(),
    "aggregate": pl.Boolean(),
    "group_by_tenant": pl.Boolean(),
}


def analyse(
    norm: str, fingerprint: int, settings: FeatureSettings, dialect: str = "postgres"
) -> Shape:
    """Shape of one normalised statement, read in ``dialect``. Never raises: unparsable text
    gets a text-only shape."""
    tree = _parse(norm, dialect)
    if tree is None and norm.endswith(" ?"):
        # the text ended in what could not be read (a statement cut inside a comment, say):
        # the statement up to there still says what it read
        tree = _parse(norm[:-2], dialect)
    if tree is None:
        copy_to = bool(_COPY_TO.match(norm))
        return Shape(
            fingerprint,
            KIND_CODES.index("copy_to" if copy_to else "other"),
            False,
            (),
            False,
            False,
            False,
            False,
            False,
            bool(_OFFSET.search(norm)),
            False,
            False,
        )
    tables = _tables(tree)
    keys = {k.lower() for k in settings.tenant_keys}
    tenant_table = any(settings.is_tenant_table(t) for t in tables)
    select = tree if isinstance(tree, exp.Select) else tree.find(exp.Select)
    where = select.args.get("where") if select is not None else None
    group = select.args.get("group") if select is not None else None
    return Shape(
        fingerprint=fingerprint,
        kind=KIND_CODES.index(_kind(tree)),
        parsed=True,
        tables=tables,
        select_star=select is not None and any(isinstance(e, exp.Star) for e in select.expressions),
        has_where=where is not None,
        tenant_filter=where is not None and _mentions_tenant(where, keys, tenant_table),
        point_filter=where is not None and _pins_a_column(where),
        has_limit=select is not None and select.args.get("limit") is not None,
        has_offset=select is not None and select.args.get("offset") is not None,
        aggregate=select is not None and any(e.find(exp.AggFunc) for e in select.expressions),
        group_by_tenant=group is not None and _mentions_tenant(group, keys, tenant_table),
    )


def _parse(norm: str, dialect: str) -> exp.Expr | None:
    try:
        return sqlglot.parse_one(norm.replace("?", "0"), read=dialect)
    except (sqlglot.errors.ParseError, sqlglot.errors.TokenError, ValueError, RecursionError):
        return None


def _kind(tree: exp.Expr) -> str:
    if isinstance(tree, exp.Copy):
        return "copy_from" if tree.args.get("kind") else "copy_to"
    if isinstance(tree, exp.Select | exp.Union | exp.Intersect | exp.Except):
        return "select"
    for cls, name in (
        (exp.Insert, "insert"),
        (exp.Update, "update"),
        (exp.Delete, "delete"),
        (exp.Set, "set"),
        (exp.Grant, "dcl"),
    ):
        if isinstance(tree, cls):
            return name
    if isinstance(tree, exp.Create | exp.Drop | exp.Alter | exp.TruncateTable):
        return "ddl"
    if type(tree).__name__ in {"Revoke"}:
        return "dcl"
    return "other"


def _tables(tree: exp.Expr) -> tuple[str, ...]:
    names: list[str] = []
    for table in tree.find_all(exp.Table):
        if not table.name:
            continue
        name = f"{table.db}.{table.name}" if table.db else table.name
        if name.lower() not in names:
            names.append(name.lower())
    return tuple(names)


def _pins_a_column(where: exp.Expr) -> bool:
    """Whether a WHERE clause holds ``column = value`` or ``column IN (values)``, with the
    value a literal or a bound parameter: a lookup, not a sweep over the table."""
    values = (exp.Literal, exp.Parameter, exp.Placeholder)
    for eq in where.find_all(exp.EQ):
        left, right = eq.left, eq.right
        if (isinstance(left, exp.Column) and isinstance(right, values)) or (
            isinstance(right, exp.Column) and isinstance(left, values)
        ):
            return True
    for member in where.find_all(exp.In):
        if isinstance(member.this, exp.Column) and member.expressions:
            return True
    return False


def _mentions_tenant(node: exp.Expr, keys: set[str], tenant_table: bool) -> bool:
    for column in node.find_all(exp.Column):
        name = column.name.lower()
        if name in keys or (tenant_table and name == "id"):
            return True
    return False

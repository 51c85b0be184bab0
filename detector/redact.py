"""Literal redaction for SQL text. Query text may carry customer data (emails, names, ids):
every literal is replaced by ``?`` and every comment dropped before text is stored, logged or
sent. The statement is read by the dialect's tokenizer (:mod:`detector.sqltext`), the same
reader fingerprints and shapes use, in time linear in its length.

>>> redact_sql("SELECT * FROM accounts WHERE email = 'ann@example.com' AND id = 42")
'SELECT * FROM accounts WHERE email = ? AND id = ?'
>>> redact_sql("select 'it''s', E'x\\\\'y', $$z$$, $1, t1.c2 from t1 -- note 5")
'select ?, ?, ?, $1, t1.c2 from t1 '
>>> redact_sql("SELECT \\"ann\\", 'a\\\\'b' FROM `t` # note", "mariadb")
'SELECT ?, ? FROM `t` '
"""

from __future__ import annotations

from typing import Final

import polars as pl

from detector.sqltext import DIALECTS, redact_any, render

#: Dialect of each canonical ``db_system`` read as anything but PostgreSQL.
_DIALECT_OF_SYSTEM: Final = {"mariadb": "mysql", "mysql": "mysql"}
#: Longest statement shown: a longer one is shown up to here, then says how long it was.
SHOWN_CHARS: Final = 4096

__all__ = ["dialect_of", "redact_any", "redact_expr", "redact_shown", "redact_sql"]


def dialect_of(db_system: str) -> str:
    """The SQL dialect of a canonical ``db_system`` (PostgreSQL unless MariaDB or MySQL); a
    dialect's own name is taken as is."""
    name = db_system.lower()
    return name if name in DIALECTS else _DIALECT_OF_SYSTEM.get(name, "postgres")


def redact_sql(text: str, db_system: str | None = None) -> str:
    """Replace every literal in ``text`` with ``?`` and drop comments, reading it as the SQL of
    ``db_system`` (a canonical ``db_system`` value or a dialect name). With no ``db_system``
    the dialect is unknown: whatever either dialect reads as a literal or comment goes
    (:func:`detector.sqltext.redact_any`)."""
    if db_system is None:
        return redact_any(text)
    return render(text, dialect_of(db_system))


def redact_shown(text: str, db_system: str | None = None, *, limit: int = SHOWN_CHARS) -> str:
    """:func:`redact_sql` of at most the first ``limit`` characters, marked when cut (a
    literal cut in two is unterminated, so the tokenizer redacts it to the cut)."""
    if len(text) <= limit:
        return redact_sql(text, db_system)
    return f"{redact_sql(text[:limit], db_system)} … [statement of {len(text):,} characters, cut]"


def redact_expr(column: str | pl.Expr) -> pl.Expr:
    """:func:`redact_sql` of unknown dialect over a string column (nulls stay null). Runs the
    tokenizer once per row and dialect: meant for rejected records and other small frames."""
    expr = pl.col(column) if isinstance(column, str) else column
    return expr.map_elements(redact_any, return_dtype=pl.String, skip_nulls=True)

"""Literal redaction for SQL text. Query text may carry customer data (emails, names, ids):
every literal is replaced by ``?`` before text is stored, logged or sent.

One pattern serves both the per-string path (:func:`redact_sql`) and the vectorised polars path
(:func:`redact_expr`); it is written in the common subset of Python ``re`` and Rust ``regex``.

>>> redact_sql("SELECT * FROM accounts WHERE email = 'ann@example.com' AND id = 42")
'SELECT * FROM accounts WHERE email = ? AND id = ?'
>>> redact_sql("select 'it''s', E'x\\\\'y', $1, t1.c2 from t1 -- note 5")
'select ?, ?, ?, t1.c2 from t1 '
"""

from __future__ import annotations

import re
from typing import Final

import polars as pl

# Order matters: comments first (they may hold quotes), then quoted strings, then numbers.
_PARTS: Final = (
    r"--[^\n]*",  # line comment
    r"/\*(?:[^*]|\*[^/])*\*/",  # block comment
    r"[eE]'(?:[^'\\]|\\.|'')*'",  # PostgreSQL escape string E'...'
    r"'(?:[^']|'')*'",  # standard string literal
    r"'[^']*$",  # an unterminated string runs to the end: redact what remains
    r"\$\d+",  # bind parameter
    r"\b0[xX][0-9a-fA-F]+\b",  # hex literal
    r"\b\d+(?:\.\d+)?(?:[eE][+-]?\d+)?\b",  # number (not part of an identifier)
)
LITERAL_PATTERN: Final = "|".join(f"(?:{p})" for p in _PARTS)
_LITERAL_RE: Final = re.compile(LITERAL_PATTERN)
_COMMENT_RE: Final = re.compile(r"--[^\n]*|/\*(?:[^*]|\*[^/])*\*/")


def _sub(match: re.Match[str]) -> str:
    return "" if _COMMENT_RE.fullmatch(match.group(0)) else "?"


def redact_sql(text: str) -> str:
    """Replace every literal in ``text`` with ``?`` and drop comments."""
    return _LITERAL_RE.sub(_sub, text)


def redact_expr(column: str | pl.Expr) -> pl.Expr:
    """The polars version of :func:`redact_sql` for a string column.

    Comments are dropped in a first pass, then every remaining literal becomes ``?``.
    """
    expr = pl.col(column) if isinstance(column, str) else column
    return expr.str.replace_all(_COMMENT_RE.pattern, "").str.replace_all(LITERAL_PATTERN, "?")

"""One reader for SQL text: redaction, fingerprints and statement shapes all see a statement
through the same dialect-aware tokenizer (sqlglot's, in the source's dialect), so they cannot
disagree about where a literal or a comment starts and ends.

Guarantees:

* Work is linear in the text: the tokenizer scans each character a bounded number of times,
  and everything here walks its tokens once. Text past ``limit`` characters is not read at all
  (callers pass the configured analysis limit).
* What leaves :func:`render` is only the text of tokens that are neither literals nor
  comments, the whitespace between them, and the marks ``?`` and `` ``. A literal (string of
  any syntax: quoted, ``E'...'``, ``$tag$...$tag$``, national, bit, hex, MySQL double-quoted
  with backslash escapes; or number) becomes ``?``; a comment of any syntax (``--``, ``#`` in
  MySQL, nested ``/* */`` in PostgreSQL) becomes a space. Text the tokenizer cannot read (an
  unterminated string, say) is redacted from the first character it could not read to the end,
  so a literal the tokenizer never finished can never leak.

>>> render("SELECT * FROM t WHERE email = 'ann@example.com' AND id = 42 -- note")
'SELECT * FROM t WHERE email = ? AND id = ? '
>>> render("select $q$it's$q$, E'x\\\\'y' from t /* a /* nested */ note */ where k = $1")
'select ?, ? from t where k = $1'
>>> render('SELECT "ann", \\'a\\\\\\'b\\' FROM `t` # note', "mysql")
'SELECT ?, ? FROM `t` '
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from typing import Final

import polars as pl
from sqlglot.dialects.dialect import Dialect
from sqlglot.errors import TokenError
from sqlglot.tokenizer_core import Token, TokenType
from sqlglot.tokens import Tokenizer

#: Leading characters of a statement read for its fingerprint and shape by default (a longer
#: one is judged by that much of it, and counted as cut).
ANALYSED_CHARS: Final = 32_768

#: SQL dialects statements are read in, by the canonical ``db_system`` (default: postgres).
DIALECTS: Final = ("postgres", "mysql")

#: Token types whose text is a value, never SQL structure.
LITERAL_TYPES: Final = frozenset(
    t for t in TokenType if t.name in ("STRING", "NUMBER") or t.name.endswith("_STRING")
)
_GROUP_OPEN: Final = TokenType.L_PAREN
_GROUP_CLOSE: Final = TokenType.R_PAREN
_COMMA: Final = TokenType.COMMA

#: ``(kind, start, end)``: a stretch ``text[start:end]`` of one kind (see :func:`segments`).
Segment = tuple[str, int, int]

_local = threading.local()


def _tokenizer(dialect: str) -> Tokenizer:
    """One tokenizer per dialect and thread (a tokenizer keeps its scan state while it runs)."""
    cache: dict[str, Tokenizer] | None = getattr(_local, "tokenizers", None)
    if cache is None:
        cache = _local.tokenizers = {}
    tokenizer = cache.get(dialect)
    if tokenizer is None:
        tokenizer = cache[dialect] = Dialect.get_or_raise(dialect).tokenizer_class()
    return tokenizer


#: A PostgreSQL bind parameter's ``$`` (``$1``; not ``a$1``, a name, nor ``$$1``, a quote).
_PG_PARAMETER: Final = re.compile(r"(?<![A-Za-z0-9_$])\$(?=[0-9])")


def tokens(text: str, dialect: str = "postgres") -> tuple[list[Token], int]:
    """The tokens of ``text`` and the offset up to which they account for it: ``len(text)``
    when all of it was read, else where the first token the tokenizer could not finish
    begins (everything from there on is to be treated as one literal).

    In PostgreSQL a bind parameter (``$1``) is read as ``@1`` (the same tokens: a parameter
    mark, then its number), since the tokenizer would take ``$1,$`` for a dollar quote."""
    if dialect not in DIALECTS:
        raise ValueError(f"unknown SQL dialect {dialect!r}; known: {', '.join(DIALECTS)}")
    tokenizer = _tokenizer(dialect)
    scanned = _PG_PARAMETER.sub("@", text) if dialect == "postgres" and "$" in text else text
    try:
        return tokenizer.tokenize(scanned), len(text)
    except TokenError:
        # The tokens finished before the failure; the rest is unread (and may be a literal).
        done: list[Token] = list(getattr(getattr(tokenizer, "_core", None), "tokens", None) or [])
        return done, (done[-1].end + 1 if done else 0)


def _is_literal(token: Token) -> bool:
    return token.token_type in LITERAL_TYPES


def segments(text: str, dialect: str = "postgres", *, params: bool = False) -> Iterator[Segment]:
    """``text`` cut into consecutive :data:`Segment` s ``(kind, start, end)`` covering all of
    it: kind ``"sql"`` (a token that is neither literal nor comment), ``"value"`` (a literal,
    or the unread rest), ``"space"`` (whitespace) or ``"gap"`` (whitespace holding a
    comment). ``params`` says whether the number of a bind parameter (``$1``) is a value."""
    return _segments(text, dialect, params, 0)


def _segments(text: str, dialect: str, params: bool, depth: int) -> Iterator[Segment]:
    toks, read = tokens(text, dialect)
    commands = _tokenizer(dialect).COMMANDS
    at = 0
    previous: Token | None = None
    for token in toks:
        if (
            previous is not None
            and previous.token_type in commands
            and token.token_type == TokenType.STRING
            and _PG_PARAMETER.sub("@", text[at : token.end + 1]).strip()
            == _PG_PARAMETER.sub("@", token.text).strip()
        ):
            # The tokenizer keeps what follows a command word (EXPLAIN, SHOW, VACUUM, ...) as
            # one string: read it once more as SQL; what a second command word keeps is
            # hidden whole, so no character is read more than twice.
            rest = text[at : token.end + 1]
            lead = len(rest) - len(rest.lstrip())
            if lead:
                yield "space", at, at + lead
            if depth:
                yield "value", at + lead, token.end + 1
            else:
                offset = at + lead
                for kind, start, end in _segments(rest[lead:], dialect, params, depth + 1):
                    yield kind, start + offset, end + offset
            at = token.end + 1
            previous = token
            continue
        if token.start > at:
            yield _blank(text, at, token.start)
        value = _is_literal(token)
        if (
            value
            and not params
            and previous is not None
            and previous.token_type == TokenType.PARAMETER
            and previous.end + 1 == token.start
            and text[previous.start] == "$"
        ):
            value = False  # $1: which parameter, not what it held
        yield ("value" if value else "sql"), token.start, token.end + 1
        at = token.end + 1
        previous = token
    if read > at:
        yield _blank(text, at, read)
    if read < len(text):
        lead = len(text) - len(text[read:].lstrip()) if text[read:].strip() else len(text)
        if lead > read:
            yield "space", read, lead
        if lead < len(text):
            yield "value", lead, len(text)


def _blank(text: str, start: int, end: int) -> Segment:
    return ("space" if text[start:end].isspace() else "gap"), start, end


def _pieces(text: str, dialect: str, *, params: bool) -> Iterator[tuple[str, str]]:
    """(kind, shown text) of each segment: a value shows as ``?``, a gap as one space."""
    for kind, start, end in segments(text, dialect, params=params):
        if kind == "value":
            yield kind, "?"
        elif kind == "gap":
            yield kind, " "
        else:
            yield kind, text[start:end]


def render(text: str, dialect: str = "postgres") -> str:
    """``text`` with every literal replaced by ``?`` and every comment by a space."""
    return "".join(piece for _, piece in _pieces(text, dialect, params=False))


#: A single-quoted string, backslash and doubled-quote escapes honoured, to the end of the text
#: if never closed (each alternative starts with its own character: linear).
_SINGLE_QUOTED: Final = re.compile(r"'(?:[^'\\]|\\.|'')*'?", re.DOTALL)


def redact_any(text: str) -> str:
    """``text`` of unknown syntax (a raw log line, say) with every stretch that either dialect
    reads as a literal replaced by ``?`` and every comment by a space: whichever way a server
    would have read it, no literal survives. So does every single-quoted stretch, read as if
    double quotes meant nothing (a statement inside a line that quotes it with ``"``).
    Quoted identifiers of PostgreSQL go too (MySQL reads them as strings), which is the price
    of not knowing."""
    hidden = sorted(
        [
            (start, end, kind == "value")
            for dialect in DIALECTS
            for kind, start, end in segments(text, dialect)
            if kind in ("value", "gap")
        ]
        + [(m.start(), m.end(), True) for m in _SINGLE_QUOTED.finditer(text)]
    )
    out: list[str] = []
    at = 0  # text before ``at`` is shown or hidden already
    i = 0
    while i < len(hidden):
        start, end, value = hidden[i]
        i += 1
        while i < len(hidden) and hidden[i][0] < end:  # overlapping stretches hide as one
            end = max(end, hidden[i][1])
            value = value or hidden[i][2]
            i += 1
        if end <= at:
            continue
        out.append(text[at:start] if start > at else "")
        out.append("?" if value else " ")
        at = end
    out.append(text[at:])
    return "".join(out)


def fingerprint_text(text: str, dialect: str = "postgres") -> str:
    """The canonical text of a statement's shape: literals (bind parameters' numbers too) out,
    comments out, whitespace collapsed, a list of values ``(?, ?)`` and a run of such lists
    ``(?), (?)`` each collapsed to ``(?)``, lower case, without a trailing ``;``. Two
    statements that differ only in their values share it."""
    pieces = list(_pieces(text, dialect, params=True))
    out: list[str] = []
    last_group = -1  # where in ``out`` the last collapsed list stands
    after = 0  # since it: 1 = only spaces, 2 = spaces and one comma, 0 = anything else
    i = 0
    while i < len(pieces):
        kind, piece = pieces[i]
        if kind == "sql" and piece == "(":
            end = _value_list_end(pieces, i)
            if end:
                if after == 2:
                    del out[last_group + 1 :]  # one of a run: the first stands for all
                else:
                    out.append("(?)")
                    last_group = len(out) - 1
                after = 1
                i = end
                continue
        if kind in ("space", "gap"):
            out.append(" ")
        else:
            out.append(piece)
            after = 2 if after == 1 and piece == "," else 0
        i += 1
    return " ".join("".join(out).split()).rstrip(";").lower()


def _value_list_end(pieces: list[tuple[str, str]], i: int) -> int:
    """Given ``pieces[i]`` is ``(``: the index after the ``)`` that closes a list of values
    ``(?, ?, ...)`` starting there, or 0 when none does. Reads only the list's own pieces."""
    j = i + 1
    while True:
        while j < len(pieces) and pieces[j][0] in ("space", "gap"):
            j += 1
        if j == len(pieces) or not (pieces[j][0] == "value" or pieces[j][1] == "?"):
            return 0
        j += 1
        while j < len(pieces) and pieces[j][0] in ("space", "gap"):
            j += 1
        if j == len(pieces):
            return 0
        if pieces[j] == ("sql", ")"):
            return j + 1
        if pieces[j] != ("sql", ","):
            return 0
        j += 1


# --- the vectorised row key -----------------------------------------------------------------

#: Per-row pre-normalisation for the common case: quoted strings, then numbers (not inside
#: identifiers), become a value mark. It only serves as a cache key, on rows where it provably
#: agrees with the tokenizer (see :func:`plain_expr`).
_QUOTED: Final = r"'(?:[^']|'')*'"
_NUMBER: Final = r"\b[0-9]+\.[0-9]*|\b[0-9]+\b"
#: The two in one pattern (for tests: replacing its matches is replacing both in turn).
ROW_NORMALISE: Final = f"{_QUOTED}|{_NUMBER}"
#: What stands for a value in a row key (a row holding it is not plain).
_MARK: Final = "\x01"
#: What a plain row holds none of outside its quoted strings: the quote, comment, escape and
#: placeholder syntaxes on which a regular pattern and a dialect's tokenizer could pair
#: differently (an unpaired quote included).
_NOT_PLAIN: Final = (
    r"['\"`#?]|/\*|--|\$(?:[^0-9]|$)|\$[0-9]+\.|[A-Za-z0-9_]\$|[A-Za-z0-9_&]\x01"
    r"|\b[0-9]+(?:\.[0-9]*)?[A-Za-z_]"
)
#: On pre-normalised plain text: a list of values, and a run of such lists (Rust's regex
#: engine runs these in linear time).
_VALUE_LIST: Final = r"\(\s*\x01(?:\s*,\s*\x01)*\s*\)"
_VALUE_LISTS: Final = rf"{_VALUE_LIST}(?:\s*,\s*{_VALUE_LIST})+"
_RAW_SALT: Final = 0x27D4EB2F165667C5


def _outside(text: pl.Expr) -> pl.Expr:
    return text.str.replace_all(_QUOTED, _MARK)


def _plain(text: pl.Expr, outside: pl.Expr, postgres: pl.Expr | bool) -> pl.Expr:
    plain = ~text.str.contains(r"[\\\x01]") & ~outside.str.contains(_NOT_PLAIN)
    if postgres is True:
        return plain
    # elsewhere a ``$`` is part of a name (MySQL's ``a$1``, ``$1``): the pattern cannot tell
    return plain & (postgres | ~outside.str.contains("$", literal=True))


def plain_expr(text: pl.Expr, postgres: pl.Expr | bool = True) -> pl.Expr:
    """Whether a row's text is plain: no backslash (nor the key's value mark), and outside its
    quoted strings no single quote left unpaired, prefixed string (``E'...'``, ``X'...'``),
    double quote, backtick, ``#``, ``?``, comment opener, ``$`` other than a bind parameter's
    (``a$1`` is a name) or number run into a word (``1e5``). On such text
    the first quote or number is where the tokenizer's first literal starts too, and the
    pattern ends it where the tokenizer does, so :data:`ROW_NORMALISE` replaces exactly the
    tokenizer's literals (a property test holds the two together): rows with one
    pre-normalised text share one fingerprint. ``postgres`` says (per row, or for all) whether
    the text is PostgreSQL's; in other dialects no ``$`` is plain."""
    return _plain(text, _outside(text), postgres)


def row_key_expr(text: pl.Expr, postgres: pl.Expr | bool = True) -> pl.Expr:
    """A per-row cache key (UInt64) such that rows with equal keys have equal fingerprints: the
    hash of the pre-normalised text (values, then lists of values, collapsed) for plain rows,
    of the text itself (salted) otherwise."""
    outside = _outside(text)
    plain = (
        outside.str.replace_all(_NUMBER, _MARK)
        .str.replace_all(_VALUE_LISTS, f"({_MARK})")
        .str.replace_all(_VALUE_LIST, f"({_MARK})")
        .hash(seed=0)
    )
    raw = text.hash(seed=0).xor(pl.lit(_RAW_SALT, pl.UInt64))
    return pl.when(_plain(text, outside, postgres)).then(plain).otherwise(raw)

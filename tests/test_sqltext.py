"""The one SQL reader: literals of every syntax each dialect has never survive redaction or a
fingerprint, the structure does, the vectorised row key agrees with the tokenizer, and the
work on pathological statements grows linearly with their length (counted, not timed)."""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from types import FrameType
from typing import Any

import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from detector.adapters.mariadb import statement_action
from detector.features.engine import FeatureEngine
from detector.features.sqlshape import dialect_expr, row_fingerprint_expr
from detector.redact import redact_expr, redact_shown, redact_sql
from detector.sqltext import (
    ROW_NORMALISE,
    fingerprint_text,
    plain_expr,
    redact_any,
    render,
    segments,
)
from detector.testing import make_events

# --- planted literals -------------------------------------------------------------------------

#: Filler around a canary: quotes, backslashes, dollars, stars and slashes included, so a
#: literal's own escaping is what keeps it whole.
FILLER = st.text(alphabet="ab '\"\\$*/#-;,()\n", max_size=12)


def _pg_quoted(c: str, f: str) -> str:
    return "'" + (f + c + f).replace("'", "''") + "'"


def _pg_escape(c: str, f: str) -> str:
    body = (f + c + f).replace("\\", "\\\\").replace("'", "\\'")
    return "E'" + body + "'"


def _pg_dollar(c: str, f: str) -> str:
    body = (f + c + f).replace("$", "")
    return "$$" + body + "$$"


def _pg_tagged(c: str, f: str) -> str:
    body = (f + c + f).replace("$", "")
    return "$tag_1$" + body + "$tag_1$"


def _pg_unicode(c: str, f: str) -> str:
    return "U&'" + (f + c).replace("'", "''") + "'"


def _block(c: str, f: str) -> str:
    body = (f + c + f).replace("*", "").replace("/", "")
    return "/* " + body + " */"


def _block_stars(c: str, f: str) -> str:
    body = (f + c).replace("*", "").replace("/", "")
    return "/* " + body + " **/"


def _pg_nested(c: str, f: str) -> str:
    body = f.replace("*", "").replace("/", "")
    return f"/* {body} /* {c} */ {c} {body} */"


def _line(c: str, f: str) -> str:
    return "-- " + (f + c + f).replace("\n", "") + "\n"


def _my_single(c: str, f: str) -> str:
    body = (f + c + f).replace("\\", "\\\\").replace("'", "\\'")
    return "'" + body + "'"


def _my_double(c: str, f: str) -> str:
    body = (f + c + f).replace("\\", "\\\\").replace('"', '\\"')
    return '"' + body + '"'


def _my_doubled(c: str, f: str) -> str:
    return "'" + (f + c).replace("\\", "\\\\").replace("'", "''") + "'"


def _my_hash(c: str, f: str) -> str:
    return "# " + (f + c + f).replace("\n", "") + "\n"


def _my_national(c: str, f: str) -> str:
    return "N'" + (f + c).replace("\\", "\\\\").replace("'", "\\'") + "'"


def _my_introducer(c: str, f: str) -> str:
    return "_utf8mb4'" + (c + f).replace("\\", "\\\\").replace("'", "\\'") + "'"


Planter = Callable[[str, str], str]
PG: list[Planter] = [
    _pg_quoted,
    _pg_escape,
    _pg_dollar,
    _pg_tagged,
    _pg_unicode,
    _block,
    _block_stars,
    _pg_nested,
    _line,
]
MYSQL: list[Planter] = [
    _my_single,
    _my_double,
    _my_doubled,
    _my_hash,
    _my_national,
    _my_introducer,
    _block,
    _block_stars,
    _line,
]
CANARY = "cnry7q"


@st.composite
def planted(draw: st.DrawFn, dialect: str) -> str:
    """A statement with canaries planted in literals and comments of ``dialect``."""
    planters = PG if dialect == "postgres" else MYSQL
    parts = draw(st.lists(st.tuples(st.sampled_from(planters), FILLER), min_size=1, max_size=4))
    table = "`customers`" if dialect == "mysql" else '"public"."customers"'
    out = [f"SELECT name, email FROM {table} WHERE id > 7"]
    for i, (plant, filler) in enumerate(parts):
        literal = plant(f"{CANARY}{i}", filler)
        comment = literal.startswith(("/*", "--", "#"))
        out.append(f" {literal}" if comment else f" AND note <> {literal}")
    out.append(" LIMIT 10")
    return "".join(out)


def _survivors(text: str) -> list[str]:
    return re.findall(CANARY, text, re.IGNORECASE)


@pytest.mark.parametrize("dialect", ["postgres", "mysql"])
@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_no_planted_literal_survives_redaction_or_fingerprint(dialect: str, data: Any) -> None:
    statement = data.draw(planted(dialect))
    system = "mariadb" if dialect == "mysql" else "postgresql"
    outputs = {
        "render": render(statement, dialect),
        "redact_sql": redact_sql(statement, system),
        "redact_unknown": redact_sql(statement),
        "redact_any": redact_any(statement),
        "shown": redact_shown(statement, system, limit=40),
        "fingerprint": fingerprint_text(statement, dialect),
    }
    for name, text in outputs.items():
        assert not _survivors(text), (name, statement, text)
    # what is not a literal stays: the statement still says what it read
    assert "customers" in outputs["render"] and "LIMIT" in outputs["render"]
    assert "customers" in outputs["fingerprint"]


@pytest.mark.parametrize(
    ("statement", "dialect", "expected"),
    [
        (
            "SELECT * FROM t WHERE a = $$x'y$$ AND b = 2",
            "postgres",
            "SELECT * FROM t WHERE a = ? AND b = ?",
        ),
        ("SELECT $q$a$$b$q$ FROM t", "postgres", "SELECT ? FROM t"),
        ("SELECT 'a\\'b' FROM t", "mysql", "SELECT ? FROM t"),
        ("SELECT 'a\\' AS x, 'b' FROM t", "postgres", "SELECT ? AS x, ? FROM t"),
        ('SELECT "ann" FROM t', "mysql", "SELECT ? FROM t"),
        ('SELECT "ann" FROM t', "postgres", 'SELECT "ann" FROM t'),  # an identifier there
        ("SELECT 1 /* a /* b */ c */ FROM t", "postgres", "SELECT ? FROM t"),
        ("SELECT 1 /* a **/ FROM t", "postgres", "SELECT ? FROM t"),
        ("SELECT 1 # x\nFROM t", "mysql", "SELECT ? FROM t"),
        ("SELECT x'CAFE', 0xBEEF, b'01' FROM t", "mysql", "SELECT ?, ?, ? FROM t"),
        (
            "SELECT * FROM t WHERE k = $1 LIMIT $2",
            "postgres",
            "SELECT * FROM t WHERE k = $1 LIMIT $2",
        ),
        ("SELECT 'unterminated, secret", "postgres", "SELECT ?"),
        (
            "EXPLAIN SELECT * FROM t WHERE a = 'x'",
            "postgres",
            "EXPLAIN SELECT * FROM t WHERE a = ?",
        ),
        ("EXECUTE plan_1('x', 2)", "postgres", "EXECUTE plan_1(?, ?)"),
    ],
)
def test_each_syntax_redacts_as_its_dialect_reads_it(
    statement: str, dialect: str, expected: str
) -> None:
    assert render(statement, dialect) == expected


def test_text_of_unknown_dialect_loses_whatever_either_dialect_calls_a_literal() -> None:
    # PostgreSQL reads 'a\' as a whole string and "b" as a name; MySQL reads 'a\' b' as one
    # string and "..." as a string: each reading alone would leave a canary bare
    line = """AUDIT: SESSION,1,1,READ,SELECT,,,"SELECT 'a\\' cnry7q0 '",<not logged>"""
    assert "cnry7q0" in render(line, "postgres")
    assert "cnry7q" not in redact_any(line)
    assert redact_any(line).startswith("AUDIT: SESSION,?,?,READ,SELECT")
    assert "cnry7q" not in redact_any(""""x \\" cnry7q1 " """)


def test_a_cut_statement_is_marked_and_its_cut_literal_redacted() -> None:
    statement = "SELECT * FROM t WHERE a = '" + "cnry7q" * 100 + "'"
    shown = redact_shown(statement, "postgresql", limit=60)
    assert shown.startswith("SELECT * FROM t WHERE a = ?")
    assert f"statement of {len(statement):,} characters, cut" in shown
    assert "cnry7q" not in shown


def test_redact_expr_is_redact_any_row_by_row() -> None:
    frame = pl.DataFrame({"s": ["SELECT $$cnry7q$$", None, 'SELECT "cnry7q"']})
    out = frame.select(redact_expr("s")).to_series().to_list()
    assert out == ["SELECT ?", None, "SELECT ?"]


# --- fingerprints ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("statement", "expected"),
    [
        (
            "SELECT * FROM t WHERE id IN (1, 2, 3) AND x = 'a'",
            "select * from t where id in (?) and x = ?",
        ),
        ("insert into t values (1,2),(3,4), (5,6);", "insert into t values (?)"),
        (
            "select * from t where a = $1 and b in ($2, $3)",
            "select * from t where a = $? and b in ($?, $?)",
        ),
        ("/* app=web trace=42 */ SELECT a\n  FROM t -- x", "select a from t"),
        ("select f(1), g(2, 'x') from t", "select f(?), g(?) from t"),
        ("select (1, 2 from t", "select (?, ? from t"),
    ],
)
def test_fingerprints_keep_shape_and_drop_values(statement: str, expected: str) -> None:
    assert fingerprint_text(statement) == expected


PLAIN_SQL = st.text(alphabet="selctfromwh t1_.,=<>()*+'09 \n;eE$-xX&|:", max_size=60)
VALUE = st.one_of(
    st.from_regex(r"[0-9]{1,4}(\.[0-9]{1,3})?", fullmatch=True),
    st.text(alphabet="ab 1.'", max_size=6).map(lambda v: "'" + v.replace("'", "''") + "'"),
)


@settings(max_examples=1000, deadline=None)
@given(PLAIN_SQL, st.data(), st.sampled_from(["postgresql", "mariadb"]))
def test_the_vectorised_row_key_never_joins_statements_the_tokenizer_tells_apart(
    text: str, data: Any, system: str
) -> None:
    """Rows keyed alike (the same text with other values where the pattern saw values, in
    one dialect) have one fingerprint in that dialect."""
    other = re.sub(ROW_NORMALISE, lambda _m: data.draw(VALUE), text)
    frame = pl.DataFrame({"statement_text": [text, other], "db_system": [system, system]})
    keys = frame.select(row_fingerprint_expr(dialect=dialect_expr())).to_series().to_list()
    dialect = "mysql" if system == "mariadb" else "postgres"
    if keys[0] == keys[1]:
        assert fingerprint_text(text, dialect) == fingerprint_text(other, dialect), (text, other)


def test_rows_share_a_key_exactly_when_their_values_alone_differ() -> None:
    frame = pl.DataFrame(
        {
            "statement_text": [
                "SELECT * FROM t WHERE id = 1",
                "SELECT * FROM t WHERE id = 22",
                "SELECT * FROM t WHERE a = $$x$$ /* 1 */",
                "SELECT * FROM t WHERE a = $$y$$ /* 2 */",
                "SELECT * FROM t WHERE id = 1 /* a */",
                "SELECT * FROM t WHERE id = 1 /* b */",
            ]
        }
    )
    keys = frame.select(row_fingerprint_expr()).to_series().to_list()
    fps = [fingerprint_text(t) for t in frame["statement_text"]]
    assert keys[0] == keys[1] and fps[0] == fps[1]
    assert fps[2] == fps[3] and fps[4] == fps[5] == fps[0]
    # non-plain rows are keyed by their own text: never joined by a pattern's guess
    assert len({keys[2], keys[3], keys[4], keys[5]}) == 4


# --- linear work ----------------------------------------------------------------------------


def _lines_executed(fn: Callable[[], Any]) -> int:
    """Python lines executed while ``fn`` runs: the work of a pure-Python scanner, counted."""
    count = 0

    def trace(frame: FrameType, event: str, arg: Any) -> Any:
        nonlocal count
        if event == "line":
            count += 1
        return trace

    old = sys.gettrace()
    sys.settrace(trace)
    try:
        fn()
    finally:
        sys.settrace(old)
    return count


PATHOLOGICAL: dict[str, Callable[[int], str]] = {
    "dollar-quoted with quotes": lambda n: "SELECT $$" + "a'b " * n + "$$",
    "unterminated dollar quote": lambda n: "SELECT $$" + "a'b " * n,
    "stacked comment openers": lambda n: "SELECT 1 " + "/*" * n,
    "nested comments": lambda n: "SELECT 1 " + "/* " * n + "*/ " * n,
    "stars before a slash": lambda n: "SELECT 1 /*" + "*" * (2 * n) + "/",
    "quotes doubled": lambda n: "SELECT '" + "''" * n + "'",
    "unclosed value list": lambda n: "SELECT * FROM t WHERE a IN (" + "1, " * n,
    "value lists": lambda n: "INSERT INTO t VALUES " + "(1, 'a'), " * n + "(2, 'b')",
    "backslashes": lambda n: "SELECT '" + "\\'" * n + "'",
    "command words": lambda n: "EXECUTE " * n + "x",
}


@pytest.mark.parametrize("shape", sorted(PATHOLOGICAL))
def test_redaction_and_fingerprints_work_linearly_in_the_statement(shape: str) -> None:
    make = PATHOLOGICAL[shape]
    for dialect in ("postgres", "mysql"):
        small, large = make(400), make(1600)

        def work(text: str, dialect: str = dialect) -> Callable[[], Any]:
            return lambda: (
                render(text, dialect),
                fingerprint_text(text, dialect),
                redact_any(text),
                list(segments(text, dialect)),
            )

        ratio = _lines_executed(work(large)) / _lines_executed(work(small))
        # four times the text, about four times the work; a quadratic reader does 16 times
        assert ratio < 5.0, (shape, dialect, ratio)


@pytest.mark.parametrize(
    "make",
    [
        lambda n: "/*" * n + " SELECT 1",
        lambda n: "/* a */ " * n + "SELECT 1",
        lambda n: "/*" + "*" * n,
        lambda n: "(" * n + "SELECT 1",
    ],
)
def test_mariadb_first_keyword_works_linearly(make: Callable[[int], str]) -> None:
    small, large = make(2000), make(8000)
    ratio = _lines_executed(lambda: statement_action(large)) / _lines_executed(
        lambda: statement_action(small)
    )
    assert ratio < 5.0


@pytest.mark.parametrize(
    ("statement", "expected"),
    [
        ("/* x */ SELECT 1", ("read", "SELECT")),
        ("/* a **/ ( SELECT 1)", ("read", "SELECT")),
        ("SELECT /*!40001 SQL_NO_CACHE */ * FROM `t`", ("copy", "SELECT")),
        ("/*!40101 SET NAMES utf8 */", ("other", None)),
        ("/* never closed SELECT", ("other", None)),
        ("CREATE USER x", ("dcl", "CREATE")),
    ],
)
def test_mariadb_statement_action(statement: str, expected: tuple[str, str | None]) -> None:
    assert statement_action(statement) == expected


@pytest.mark.parametrize(
    ("text", "postgres", "plain"),
    [
        ("SELECT * FROM t WHERE a = 'x?y' AND b = $1", True, True),
        ("SELECT * FROM t WHERE a = 'x' AND b = $1", False, False),  # MySQL: $1 is a name
        ("SELECT * FROM t WHERE a = 'unpaired", True, False),
        ("SELECT * FROM t WHERE a = E'x'", True, False),
        ("SELECT * FROM t WHERE a = 'x\\y'", True, False),
        ('SELECT "a" FROM t', True, False),
        ("SELECT 1e5 FROM t -- x", True, False),
        ("SELECT a$1 FROM t", True, False),
    ],
)
def test_plain_rows_are_those_the_pattern_reads_as_the_tokenizer_does(
    text: str, postgres: bool, plain: bool
) -> None:
    assert pl.select(plain_expr(pl.lit(text), postgres)).item() is plain


def test_a_bulk_read_padded_past_the_analysed_length_is_judged_by_what_it_read() -> None:
    """A long comment after ``SELECT * FROM customers`` neither hides the read nor costs more
    than the analysed length: the shape is that of the first part, and the cut is counted."""
    engine = FeatureEngine(max_statement_chars=256)
    padded = "SELECT * FROM public.customers /*" + "x" * 50_000 + "*/ WHERE 1 = 1"
    frame = engine.transform(
        make_events(
            [{"statement_text": padded, "rows_returned": 100_000}, {"statement_text": "SELECT 1"}]
        )
    )
    assert frame["tables"].to_list() == [["public.customers"], []]
    assert frame["bulk_sensitive_read"].to_list()[0] == 1.0
    assert (engine.statements_cut_, engine.batch_statements_cut_) == (1, 1)


@pytest.mark.parametrize(
    "prefix", ["%m [%p] %q%u@%d %r %a ", "%t %u %d %a %h %i %b %v: ", "%m %a@%u "]
)
def test_the_stderr_prefix_pattern_bounds_every_field_the_client_names(prefix: str) -> None:
    """User, database and application names (63 bytes at most in PostgreSQL) and hosts are
    matched with bounded repeats, so a line whose fields do not line up costs bounded work
    (Python's ``re`` backtracks: three unbounded lazy fields are cubic in the line)."""
    from detector.adapters.pg_stderr import prefix_pattern

    head = prefix_pattern(prefix).split("(?P<severity>")[0]
    assert not re.search(r"(?:\.|\\S|\[\^\\n\])[*+]", head), head
    assert all(int(n) <= 255 for n in re.findall(r"\{0,(\d+)\}", head))

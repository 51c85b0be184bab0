"""From PostgreSQL log records (any destination) to canonical events: the pgaudit core.

The destination modules (:mod:`.pg_jsonlog`, :mod:`.pg_csvlog`, :mod:`.pg_stderr`) cut a chunk
into records and hand this module one polars frame of them (:data:`RECORD_COLUMNS`). Here:

* ``AUDIT:`` messages are parsed with the csv module (``AUDIT_TYPE, STATEMENT_ID,
  SUBSTATEMENT_ID, CLASS, COMMAND, OBJECT_TYPE, OBJECT_NAME, STATEMENT, PARAMETER[, ROWS]``);
  the lines of one statement (same session, statement id and substatement id: one per
  relation with ``pgaudit.log_relation``) become one event listing every object. pgaudit
  writes them one after the other within their session, so a line of a statement that comes
  after another record of its session, or after the statement was emitted (remembered for
  :data:`~detector.adapters.base.MAX_STATEMENTS` statements), is a line sent again: it is
  rejected as ``duplicate_statement``.
* ``connection authorized`` becomes a ``login`` event and a FATAL ``authentication failed`` /
  ``no pg_hba.conf entry`` / ``role ... does not exist`` a ``login_failed`` event; every other
  record is skipped and counted by kind.
* CLASS maps to ``action`` (READ read, WRITE write, DDL ddl, ROLE dcl, FUNCTION/MISC/MISC_SET
  other); ``COPY ... TO`` (class READ) and any read by ``pg_dump``/``pg_dumpall`` are ``copy``.
  ROWS goes to ``rows_returned`` for reads and ``rows_affected`` for writes; pgaudit logs 0
  for COPY (it is not run by the executor), so COPY's rows are null (unknown). A COPY line has
  no OBJECT_NAME: the table is taken from the statement text as written.
"""

from __future__ import annotations

import abc
import csv
import io
from collections import Counter
from dataclasses import dataclass
from typing import Final

import numpy as np
import polars as pl

from detector.adapters.base import (
    MAX_STATEMENTS,
    SETTLE_BYTES,
    SETTLE_RECORDS,
    SETTLE_SECONDS,
    BoundedMap,
    LineCounter,
    Parsed,
    RejectList,
    cut_point,
    finish_rejects,
    followed_in_time,
    kv_list,
    log_seconds,
    no_events,
)
from detector.validation import validate

#: Columns of the record frame a destination module builds (all text but the first two).
RECORD_COLUMNS: Final = (
    "_start",  # byte offset of the record in the data fed
    "_line",  # 1-based line number of the record's first line
    "time",
    "user",
    "db",
    "pid",
    "session",
    "host",
    "app",
    "severity",
    "message",
)

CLASS_ACTIONS: Final[dict[str, str]] = {
    "READ": "read",
    "WRITE": "write",
    "DDL": "ddl",
    "ROLE": "dcl",
    "FUNCTION": "other",
    "MISC": "other",
    "MISC_SET": "other",
}
DUMP_APPS: Final = ("pg_dump", "pg_dumpall")
_NL: Final = "\ue000"  # stands for a newline while a payload is parsed on its own
_CR: Final = "\ue001"
_NOT_LOGGED: Final = "<not logged>"
_PREVIOUSLY: Final = "<previously logged>"
_UTC_ZONES: Final = ("UTC", "GMT", "UCT", "Z", "Etc/UTC")
_COPY_TABLE: Final = r'(?i)^\s*COPY\s+(?:BINARY\s+)?((?:"[^"]+"|[\w$]+)(?:\.(?:"[^"]+"|[\w$]+))?)'
_COPY_TO: Final = r"(?is)^\s*COPY\b.*\bTO\b"
_FAILED: Final = (
    r'authentication failed for user "|^no pg_hba\.conf entry for |^role "[^"]*" does not exist'
)


@dataclass(frozen=True, slots=True)
class PgOptions:
    """Settings shared by the PostgreSQL adapters."""

    name: str = "<stream>"
    timezone: str | None = None  # zone for timestamps whose zone is an abbreviation
    db_instance: str | None = None


#: What names a statement: session (or pid), statement id, substatement id.
KEY: Final = ("skey", "stmt", "substmt")


class PgState:
    """What is remembered across feeds: the text of each session's latest statement (for
    ``<previously logged>`` lines whose first line was emitted by an earlier feed) and the
    keys of the latest :data:`~detector.adapters.base.MAX_STATEMENTS` statements emitted."""

    def __init__(self) -> None:
        self.texts: BoundedMap[tuple[str, str, str], str] = BoundedMap()
        self.emitted = pl.DataFrame(schema=dict.fromkeys(KEY, pl.String))

    def seen(self, keys: pl.DataFrame) -> pl.Series:
        """Which of ``keys`` (columns :data:`KEY`) name a statement emitted before."""
        if self.emitted.height == 0:
            return pl.Series("seen", [False] * keys.height, dtype=pl.Boolean)
        hits = keys.with_row_index("_row").join(self.emitted, on=list(KEY), how="semi")
        seen = np.zeros(keys.height, dtype=bool)
        seen[hits.get_column("_row").to_numpy()] = True
        return pl.Series("seen", seen)

    def add(self, keys: pl.DataFrame) -> None:
        """Remember ``keys`` as emitted (the oldest past the limit are forgotten)."""
        if keys.height:
            self.emitted = pl.concat([self.emitted, keys.select(KEY)]).tail(MAX_STATEMENTS)


@dataclass(frozen=True, slots=True)
class Result:
    events: pl.DataFrame
    rejects: pl.DataFrame
    cut: int
    skipped: dict[str, int]

    def parsed(self) -> Parsed:
        return Parsed(self.events, self.rejects, self.cut, sum(self.skipped.values()), self.skipped)


def parse_payloads(payloads: list[str]) -> list[list[str] | None]:
    """Each AUDIT: payload as its CSV fields (None where it is not one CSV record)."""
    try:
        reader = csv.reader(payloads, strict=True)
        rows: list[list[str] | None] = list(reader)
        if len(rows) == len(payloads) and reader.line_num == len(payloads):
            return rows
    except csv.Error:
        pass
    return [_parse_one(text) for text in payloads]


def _parse_one(text: str) -> list[str] | None:
    """One payload on its own; a newline outside quotes is taken as part of the field."""
    hidden = "\n" in text or "\r" in text
    if hidden:
        text = text.replace("\n", _NL).replace("\r", _CR)
    try:
        reader = csv.reader([text], strict=True)
        row = next(reader, None)
        if row is None or next(reader, None) is not None:
            return None
    except csv.Error:
        return None
    if hidden:
        row = [f.replace(_NL, "\n").replace(_CR, "\r") for f in row]
    return row


def process(
    rec: pl.DataFrame,
    rejects: RejectList,
    *,
    end: int,
    complete_all: bool,
    state: PgState,
    options: PgOptions,
) -> Result:
    """Events, rejects and the cut (see :func:`detector.adapters.base.cut_point`) for the
    record frame ``rec`` whose complete records end at byte ``end``; ``rejects`` holds what
    the destination module already rejected in the same data."""
    if rec.height == 0:
        return Result(no_events(), finish_rejects([rejects.frame(end)]), end, {})
    rec = rec.with_row_index("_idx").with_columns(
        skey=pl.coalesce("session", "pid").fill_null(""),
        kind=_kind_expr(),
    )
    audit = _audit_lines(rec, rejects, options.name)
    groups = _groups(audit, rec, rejects, end, complete_all, state, options.name)
    cut = cut_point(
        groups.get_column("_start").to_numpy(),
        groups.get_column("_last").to_numpy(),
        groups.get_column("_complete").to_numpy().astype(bool),
        end,
    )
    groups = groups.filter(pl.col("_last") < cut)
    _remember(groups, state)
    state.add(groups.select(KEY))
    done = rec.filter(pl.col("_start") < cut)
    logins = _logins(done.filter(pl.col("kind").is_in(["login", "login_failed"])))
    skipped = Counter(
        done.filter(pl.col("kind").is_in(["other", "received", "disconnect"]))
        .get_column("kind")
        .to_list()
    )
    events = pl.concat([_audit_events(groups), logins], how="vertical_relaxed")
    events = _finish(events.sort("_start"), options)
    good, bad = validate(events.drop("_start"), default_tz=options.timezone)
    starts = events.select(pl.col("_loc").alias("location"), "_start")
    bad_frame = bad.join(starts, on="location", how="left", maintain_order="left")
    return Result(good, finish_rejects([rejects.frame(cut), bad_frame]), cut, dict(skipped))


def _kind_expr() -> pl.Expr:
    msg = pl.col("message").fill_null("")
    fatal = pl.col("severity").fill_null("") == "FATAL"
    return (
        pl.when(msg.str.starts_with("AUDIT: "))
        .then(pl.lit("audit"))
        .when(msg.str.contains(r"^(?:replication )?connection authorized: "))
        .then(pl.lit("login"))
        .when(fatal & msg.str.contains(_FAILED))
        .then(pl.lit("login_failed"))
        .when(msg.str.starts_with("connection received: "))
        .then(pl.lit("received"))
        .when(msg.str.starts_with("disconnection: "))
        .then(pl.lit("disconnect"))
        .otherwise(pl.lit("other"))
    )


_PAYLOAD_FIELDS: Final = (
    "audit_type",
    "stmt",
    "substmt",
    "cls",
    "command",
    "object_type",
    "object_name",
    "statement",
    "parameter",
    "rows",
)


def _audit_lines(rec: pl.DataFrame, rejects: RejectList, name: str) -> pl.DataFrame:
    """One row per well-formed AUDIT: line with its payload fields; bad ones rejected."""
    lines = rec.filter(pl.col("kind") == "audit")
    fast = _payload_frame(lines.get_column("message").str.slice(7))
    if fast is not None:
        return _checked(pl.concat([lines, fast], how="horizontal"), rejects, name)
    payloads = lines.get_column("message").str.slice(7).to_list()
    rows = parse_payloads(payloads)
    sizes = [len(r) if r is not None else 0 for r in rows]
    if all(s == 10 for s in sizes):
        good_rows: list[list[str]] = rows  # type: ignore[assignment]  # no None: size 10
        keep = lines
    else:
        ok = [s in (9, 10) for s in sizes]
        starts, numbers = lines.get_column("_start").to_list(), lines.get_column("_line").to_list()
        for i, fine in enumerate(ok):
            if not fine:
                detail = "not a CSV record" if rows[i] is None else f"{sizes[i]} fields, not 9-10"
                rejects.add(
                    starts[i], f"{name}:{numbers[i]}", "bad_audit_payload", detail, payloads[i]
                )
        good_rows = [
            [*r, ""] if len(r) == 9 else r for r, f in zip(rows, ok, strict=True) if f and r
        ]
        keep = lines.filter(pl.Series(ok, dtype=pl.Boolean))
    # row-oriented construction: about three times faster than transposing in Python
    fields = pl.DataFrame(good_rows, schema={f: pl.String for f in _PAYLOAD_FIELDS}, orient="row")
    return _checked(pl.concat([keep, fields], how="horizontal"), rejects, name)


def _payload_frame(payloads: pl.Series) -> pl.DataFrame | None:
    """All payloads parsed at once by polars' CSV reader, or None when any could be malformed
    (the record-by-record path then decides, line by line). Accepted only when every payload
    became exactly one record with a parameter field, which pgaudit always writes
    (``<not logged>``, ``<none>`` or the values): a missing field or a record running into the
    next payload fails that test."""
    if payloads.len() == 0 or payloads.null_count():
        return None
    if payloads.str.contains("\r", literal=True).any():
        return None  # polars' reader and the csv module differ on carriage returns
    blob = payloads.str.join("\n").item()
    if not isinstance(blob, str):
        return None
    try:
        frame = pl.read_csv(
            io.BytesIO(blob.encode()),
            has_header=False,
            new_columns=list(_PAYLOAD_FIELDS),
            infer_schema=False,
            quote_char='"',
        )
    except (pl.exceptions.PolarsError, ValueError):
        return None
    if frame.height != payloads.len() or frame.width != len(_PAYLOAD_FIELDS):
        return None
    if frame.get_column("parameter").null_count():
        return None
    return frame.with_columns(pl.all().fill_null(""))


def _checked(audit: pl.DataFrame, rejects: RejectList, name: str) -> pl.DataFrame:
    """``audit`` without the lines whose ids or rows are not numbers or whose class is
    unknown; those are rejected."""
    bad = (
        pl.col("stmt").cast(pl.Int64, strict=False).is_null()
        | pl.col("substmt").cast(pl.Int64, strict=False).is_null()
        | ((pl.col("rows") != "") & pl.col("rows").cast(pl.Int64, strict=False).is_null())
    )
    unknown = ~pl.col("cls").is_in(list(CLASS_ACTIONS))
    flagged = audit.filter(bad | unknown)
    if flagged.height:
        for start, line, cls, is_bad, message in flagged.select(
            "_start", "_line", "cls", bad, "message"
        ).iter_rows():
            reason, detail = (
                ("bad_audit_payload", "statement id, substatement id or rows is not a number")
                if is_bad
                else ("unknown_class", f"pgaudit class {cls[:40]!r} is not known")
            )
            rejects.add(start, f"{name}:{line}", reason, detail, message[7:])
        audit = audit.filter(~(bad | unknown))
    return audit


def _groups(
    audit: pl.DataFrame,
    rec: pl.DataFrame,
    rejects: RejectList,
    end: int,
    complete_all: bool,
    state: PgState,
    name: str,
) -> pl.DataFrame:
    """One row per statement: the lines of one (session, statement, substatement) merged.
    Lines sent again are rejected (see the module docstring); ``_complete`` says which
    statements may be emitted now."""
    # a line rejected on its own is no record of its session: it neither ends a statement
    # nor separates two lines of one
    session = rec
    if audit.height < (rec.get_column("kind") == "audit").sum():
        session = rec.filter(
            (pl.col("kind") != "audit") | pl.col("_idx").is_in(audit.get_column("_idx").implode())
        )
    groups = _merged(audit)
    spread = groups.filter(
        (pl.col("_n") > 1) & (pl.col("_last_idx") - pl.col("_idx") >= pl.col("_n"))
    )
    if spread.height:  # other records between a statement's lines: did it end before some?
        again = _later_runs(audit, rec, session, spread.select(KEY))
        if again.height:
            _reject_again(again, rejects, name, "after the statement ended")
            audit = audit.filter(~pl.col("_idx").is_in(again.get_column("_idx").implode()))
            groups = _merged(audit)
    seen = state.seen(groups.select(KEY))
    if seen.any():
        again = audit.join(groups.filter(seen).select(KEY), on=list(KEY), how="semi")
        _reject_again(again, rejects, name, "after the statement was emitted")
        groups = groups.filter(~seen)
    groups = groups.drop("_n")
    if groups.height == 0:
        return groups.with_columns(_complete=pl.lit(True))
    groups = _carried_text(groups, state)
    if complete_all:
        return groups.with_columns(_complete=pl.lit(True))
    return groups.with_columns(_complete=pl.Series(_settled(groups, rec, session, end)))


def _merged(audit: pl.DataFrame) -> pl.DataFrame:
    """The lines of each statement as one row (``_n``: how many)."""
    statement = (
        pl.when(pl.col("statement").is_in([_NOT_LOGGED, _PREVIOUSLY]))
        .then(None)
        .otherwise(pl.col("statement"))
    )
    obj = pl.when(pl.col("object_name") == "").then(None).otherwise(pl.col("object_name"))
    return (
        audit.with_columns(statement=statement, object_name=obj)
        .group_by(*KEY, maintain_order=True)
        .agg(
            pl.col("_start", "_line", "_idx", "time", "user", "db", "pid", "session").first(),
            pl.col("host", "app", "audit_type", "cls", "command", "object_type").first(),
            pl.col("_start").last().alias("_last"),
            pl.col("_idx").last().alias("_last_idx"),
            pl.col("object_name").drop_nulls().unique(maintain_order=True).alias("objects"),
            pl.col("statement").drop_nulls().first(),
            pl.col("rows").cast(pl.Int64, strict=False).max(),
            pl.col("statement").is_null().all().alias("_no_text"),
            pl.len().alias("_n"),
        )
    )


def _later_runs(
    audit: pl.DataFrame, rec: pl.DataFrame, session: pl.DataFrame, keys: pl.DataFrame
) -> pl.DataFrame:
    """The lines of the statements ``keys`` that come after their statement ended: a
    statement is its first run of lines, which ends at a record of its session other than
    its own lines, or once the records after its latest line reach a bound that would have
    released it (SETTLE_RECORDS records, SETTLE_BYTES bytes, a record logged SETTLE_SECONDS
    after its first line). Row ``i`` of ``rec`` has ``_idx`` ``i``; ``session`` is the
    records that count for their session."""
    ordinal = np.full(rec.height, -1, dtype=np.int64)  # place among its session's records
    order = session.select("_idx", pl.int_range(pl.len()).over("skey").alias("_ord"))
    ordinal[order.get_column("_idx").to_numpy()] = order.get_column("_ord").to_numpy()
    lines = (
        audit.join(keys, on=list(KEY), how="semi")
        .select("_idx", "_start", "_line", "message", *KEY)
        .sort(*KEY, "_idx")
    )
    same = np.zeros(lines.height, dtype=bool)  # the line before is of the same statement
    if lines.height > 1:
        same[1:] = (
            lines.select(pl.all_horizontal(pl.col(k) == pl.col(k).shift(1) for k in KEY))
            .to_series()
            .fill_null(False)
            .to_numpy()[1:]
        )
    group = np.cumsum(~same)  # 1, 2, ... per statement
    here = lines.get_column("_idx").to_numpy().astype(np.int64)
    prev = np.where(same, np.roll(here, 1), -1)
    heads = np.flatnonzero(~same)
    first_of = here[heads][group - 1]  # the statement's first line
    starts = rec.get_column("_start").to_numpy()
    pair = same  # a line with an earlier line of its statement before it
    ended = pair & (ordinal[here] - ordinal[np.maximum(prev, 0)] != 1)
    ended |= pair & (here - prev - 1 >= SETTLE_RECORDS)
    ended |= pair & (starts[here] - starts[np.minimum(prev + 1, len(starts) - 1)] >= SETTLE_BYTES)
    # a record logged SETTLE_SECONDS after the statement's first line, between two of its
    # lines: the running latest time finds the candidates, each is then looked at closely
    low = int(first_of.min())
    seconds = log_seconds(rec.get_column("time").slice(low, int(here.max()) - low + 1))
    running = np.fmax.accumulate(seconds)
    first = seconds[first_of - low]
    with np.errstate(invalid="ignore"):
        maybe = pair & ~ended & (running[np.maximum(here - 1 - low, 0)] >= first + SETTLE_SECONDS)
    for k in np.flatnonzero(maybe):
        between = seconds[prev[k] + 1 - low : here[k] - low]
        ended[k] = _latest(between) >= first[k] + SETTLE_SECONDS
    # once a statement has ended, every later line of it was sent again
    after = np.maximum.accumulate(np.where(ended, np.arange(len(ended)), -1))
    again = ended | ((after >= 0) & (group[np.maximum(after, 0)] == group))
    return lines.filter(pl.Series(again)).sort("_idx")


def _latest(seconds: np.ndarray) -> float:
    """The latest of some log times (NaN for none that could be read)."""
    return float(np.fmax.reduce(seconds, initial=np.nan)) if seconds.size else np.nan


def _reject_again(lines: pl.DataFrame, rejects: RejectList, name: str, why: str) -> None:
    for start, line, skey, stmt, substmt, message in lines.select(
        "_start", "_line", *KEY, "message"
    ).iter_rows():
        detail = f"statement {stmt}.{substmt} of {skey[:40]} again, {why}"
        rejects.add(start, f"{name}:{line}", "duplicate_statement", detail, message[7:])


def _settled(
    groups: pl.DataFrame, rec: pl.DataFrame, session: pl.DataFrame, end: int
) -> np.ndarray:
    """Whether each statement is complete: a later record of its session follows (among
    ``session``), or after its last line come SETTLE_RECORDS records, SETTLE_BYTES bytes of
    records or a record logged SETTLE_SECONDS after its first line (among all of ``rec``,
    whose row ``i`` has ``_idx`` ``i``)."""
    last_in_session = session.group_by("skey").agg(pl.col("_idx").max().alias("_session_last"))
    lasts = groups.get_column("_last_idx").to_numpy()
    later = (
        groups.select("skey", "_last_idx")
        .join(last_in_session, on="skey", how="left", maintain_order="left")
        .select(pl.col("_session_last") > pl.col("_last_idx"))
        .to_series()
        .fill_null(False)
        .to_numpy()
    )
    done = np.asarray(later, dtype=bool) | (rec.height - 1 - lasts >= SETTLE_RECORDS)
    pending = np.flatnonzero(~done)
    if pending.size:
        starts = rec.get_column("_start").to_numpy()
        after = np.append(starts[1:], end)[lasts[pending]]  # where the next record starts
        done[pending] = end - after >= SETTLE_BYTES
        pending = pending[~done[pending]]
    if pending.size:  # all within SETTLE_RECORDS records of the end
        times = rec.get_column("time")
        low = int(lasts[pending].min()) + 1
        first = log_seconds(times.gather(groups.get_column("_idx").to_numpy()[pending]))
        tail = log_seconds(times.slice(low))
        done[pending] = followed_in_time(first, tail, lasts[pending] + 1 - low)
    return done


def _carried_text(groups: pl.DataFrame, state: PgState) -> pl.DataFrame:
    """Fill ``<previously logged>`` statements whose first line an earlier feed emitted."""
    missing = groups.filter(pl.col("statement").is_null() & pl.col("_no_text"))
    if missing.height == 0 or len(state.texts) == 0:
        return groups
    keys = missing.select("skey", "stmt", "substmt").iter_rows()
    texts = [state.texts.get((k, s, u)) for k, s, u in keys]
    filler = missing.select("skey", "stmt", "substmt").with_columns(
        _carried=pl.Series(texts, dtype=pl.String)
    )
    return (
        groups.join(filler, on=["skey", "stmt", "substmt"], how="left", maintain_order="left")
        .with_columns(statement=pl.coalesce("statement", "_carried"))
        .drop("_carried")
    )


def _remember(groups: pl.DataFrame, state: PgState) -> None:
    """Keep the last emitted statement text of each session."""
    last = (
        groups.filter(pl.col("statement").is_not_null())
        .group_by("skey")
        .agg(pl.col("stmt", "substmt", "statement").last())
    )
    for skey, stmt, substmt, text in last.iter_rows():
        state.texts.put((skey, stmt, substmt), text)


def _audit_events(groups: pl.DataFrame) -> pl.DataFrame:
    copy = pl.col("command") == "COPY"
    copy_to = copy & (
        (pl.col("cls") == "READ") | pl.col("statement").fill_null("").str.contains(_COPY_TO)
    )
    action = (
        pl.when(copy_to)
        .then(pl.lit("copy"))
        .when((pl.col("cls") == "READ") & pl.col("app").is_in(list(DUMP_APPS)))
        .then(pl.lit("copy"))
        .otherwise(pl.col("cls").replace_strict(CLASS_ACTIONS, default="other"))
    )
    copied = (
        pl.col("statement").str.extract(_COPY_TABLE, 1).str.replace_all('"', "").str.to_lowercase()
    )
    objects = (
        pl.when(pl.col("objects").list.len() > 0)
        .then(pl.col("objects"))
        .when(copy & copied.is_not_null())
        .then(pl.concat_list(copied))
        .otherwise(None)
    )
    rows = pl.when(copy).then(None).otherwise(pl.col("rows"))
    return groups.with_columns(action=action).select(
        "_start",
        "_line",
        "time",
        "user",
        "db",
        "pid",
        "session",
        "host",
        "app",
        "action",
        "command",
        objects.alias("objects"),
        pl.col("statement").alias("statement_text"),
        (pl.col("stmt") + "." + pl.col("substmt")).alias("statement_id"),
        pl.when(pl.col("action").is_in(["read", "copy"])).then(rows).alias("rows_returned"),
        pl.when(pl.col("action") == "write").then(rows).alias("rows_affected"),
        pl.lit(None, dtype=pl.Boolean).alias("success"),
        pl.col("audit_type"),
        pl.col("cls").alias("audit_class"),
        pl.when(pl.col("object_type") != "").then(pl.col("object_type")).alias("object_type"),
        pl.col("substmt").alias("substatement_id"),
    )


def _logins(rows: pl.DataFrame) -> pl.DataFrame:
    msg = pl.col("message")
    ok = pl.col("kind") == "login"
    named = pl.coalesce(
        msg.str.extract(r'for user "([^"]*)"', 1),
        msg.str.extract(r'user "([^"]*)"', 1),
        msg.str.extract(r'^role "([^"]*)"', 1),
    )
    return rows.select(
        "_start",
        "_line",
        "time",
        pl.when(ok)
        .then(pl.coalesce(msg.str.extract(r"user=(\S+)", 1), pl.col("user")))
        .otherwise(pl.coalesce(named, pl.col("user")))
        .alias("user"),
        pl.coalesce(msg.str.extract(r"database=(\S+)", 1), pl.col("db")).alias("db"),
        "pid",
        "session",
        pl.coalesce(pl.col("host"), msg.str.extract(r'host "([^"]*)"', 1)).alias("host"),
        pl.coalesce(
            pl.when(pl.col("app") != "[unknown]").then(pl.col("app")),
            msg.str.extract(r"application_name=(.*?)(?: SSL .*)?$", 1),
        ).alias("app"),
        pl.col("kind").alias("action"),
        pl.lit("LOGIN").alias("command"),
        pl.lit(None, dtype=pl.List(pl.String)).alias("objects"),
        pl.lit(None, dtype=pl.String).alias("statement_text"),
        pl.lit(None, dtype=pl.String).alias("statement_id"),
        pl.lit(None, dtype=pl.Int64).alias("rows_returned"),
        pl.lit(None, dtype=pl.Int64).alias("rows_affected"),
        ok.alias("success"),
        *(pl.lit(None, dtype=pl.String).alias(c) for c in _EXTRA_KEYS[1:]),
    )


_EXTRA_KEYS: Final = ("pid", "audit_type", "audit_class", "object_type", "substatement_id")


def _blank_to_null(col: str, *unknown: str) -> pl.Expr:
    return pl.when(pl.col(col).is_in(["", *unknown])).then(None).otherwise(pl.col(col)).alias(col)


def _finish(events: pl.DataFrame, options: PgOptions) -> pl.DataFrame:
    """Canonical column names, normalised times, extra map, location."""
    stamps = events.get_column("time")
    if stamps.str.ends_with(" UTC").all():  # log_timezone = 'UTC', the common case: no regex
        time = pl.col("time").str.head(-4) + "Z"
    else:
        zone = pl.col("time").str.extract(r" ([A-Za-z][\w/+-]*|[+-]\d{1,2}(?::?\d{2})?)$", 1)
        base = pl.col("time").str.replace(r" \S+$", "")
        time = (
            pl.when(zone.is_in(list(_UTC_ZONES)))
            .then(base + "Z")
            .when(zone.str.starts_with("+") | zone.str.starts_with("-"))
            .then(base + zone)
            .otherwise(base)
        )
    extra = kv_list(events, _EXTRA_KEYS)
    return events.with_columns(
        _blank_to_null("user", "[unknown]"),
        _blank_to_null("db", "[unknown]"),
        _blank_to_null("host", "[local]", "[unknown]"),
        _blank_to_null("app", "[unknown]"),
    ).select(
        "_start",
        (pl.lit(f"{options.name}:") + pl.col("_line").cast(pl.String)).alias("_loc"),
        time.alias("event_time"),
        pl.col("user").alias("db_user"),
        "action",
        pl.lit("pgaudit").alias("source_format"),
        pl.lit("postgresql").alias("db_system"),
        pl.lit(options.db_instance, dtype=pl.String).alias("db_instance"),
        pl.col("db").alias("db_name"),
        pl.col("host").alias("client_ip"),
        pl.col("app").alias("client_app"),
        pl.col("session").alias("session_id"),
        "statement_id",
        "command",
        "objects",
        "statement_text",
        "rows_returned",
        "rows_affected",
        "success",
        pl.lit(extra),
    )


def empty_records() -> pl.DataFrame:
    """A record frame with no rows."""
    return pl.DataFrame(
        schema={c: (pl.Int64 if c in ("_start", "_line") else pl.String) for c in RECORD_COLUMNS}
    )


class RecordParser(abc.ABC):
    """The feed loop shared by the line-record destinations (jsonlog, csvlog): a subclass's
    ``_records`` turns the complete records of a chunk into a record frame (RECORD_COLUMNS)
    and says where they end; :func:`process` does the rest."""

    name = ""

    def __init__(
        self,
        *,
        location: str = "<stream>",
        timezone: str | None = None,
        db_instance: str | None = None,
    ) -> None:
        self.options = PgOptions(location, timezone, db_instance)
        self.state_ = PgState()
        self._lines = LineCounter()

    @property
    def line(self) -> int:
        """Line number of the first byte of the next feed."""
        return self._lines.line

    def feed(self, data: bytes, *, final: bool = False, idle: bool = False) -> Parsed:
        """Parse ``data`` (the unconsumed rest of the previous call, then new bytes)."""
        stop = len(data) if final else data.rfind(b"\n") + 1
        rejects = RejectList()
        records, end = self._records(data, stop, final, rejects)
        result = process(
            records,
            rejects,
            end=end,
            complete_all=final or idle,
            state=self.state_,
            options=self.options,
        )
        self._lines.advance(data, result.cut)
        return result.parsed()

    @abc.abstractmethod
    def _records(
        self, data: bytes, stop: int, final: bool, rejects: RejectList
    ) -> tuple[pl.DataFrame, int]:
        """The record frame of the complete records in ``data[:stop]`` and where they end."""


__all__ = [
    "RECORD_COLUMNS",
    "PgOptions",
    "PgState",
    "RecordParser",
    "Result",
    "empty_records",
    "process",
]

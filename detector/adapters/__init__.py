"""Database audit logs -> canonical access events.

Every adapter is a stateful, incremental parser with one verb::

    parser = make_adapter("pgaudit-jsonlog", location="pg/postgresql.json", timezone=None)
    rest = b""
    for chunk in chunks:
        parsed = parser.feed(rest + chunk)          # final=False: more data may follow
        rest = (rest + chunk)[parsed.consumed:]
        emit(parsed.events); quarantine(parsed.rejects)
    parsed = parser.feed(rest, final=True)           # end of input: flush everything

The contract of ``feed(data, *, final=False, idle=False) -> Parsed``:

* ``data`` is the caller's unconsumed tail from the previous call followed by new bytes. The
  parser keeps no copy of it: the caller keeps ``data[parsed.consumed:]`` and feeds it again,
  first, next time. ``consumed`` only ever ends on a record boundary, and every record before
  it has been emitted (as an event or a reject) or skipped exactly once, so a checkpoint at a
  ``consumed`` offset never loses or repeats a record. What lies past it (a partial last line,
  a stderr message that may get more lines, the first relation line of a statement whose
  other lines may follow) is re-read next time.
* ``parsed.events`` has exactly :data:`detector.schema.EVENT_SCHEMA`; ``parsed.rejects`` has
  :data:`detector.validation.REJECT_SCHEMA` with ``location`` ``<location>:<line>`` (1-based
  physical line in the stream, counted across feeds) and a reason from
  :data:`detector.validation.REASONS` or :data:`detector.adapters.base.ADAPTER_REASONS`;
  ``parsed.skipped`` counts records that are not audit records (server chatter), by kind in
  ``skipped_kinds``. ``feed`` never raises because of the bytes it is given.
* ``final=True``: the data is all there is (end of a file): everything is emitted and
  ``consumed == len(data)``. ``idle=True``: the writer has paused (e.g. the file has not grown
  for a second): every newline-terminated record is emitted, statements still open included;
  only an unterminated last line is kept. Without either, a statement is emitted once a later
  record of its session follows it (MariaDB: its QUERY line), or once the records after it
  reach :data:`~detector.adapters.base.SETTLE_RECORDS` records,
  :data:`~detector.adapters.base.SETTLE_BYTES` bytes or a log time
  :data:`~detector.adapters.base.SETTLE_SECONDS` past its first line; so what a feed holds
  back stays within those bounds. A line of a statement that has ended is rejected as
  ``duplicate_statement``.
* State carried between feeds is small and bounded
  (:data:`~detector.adapters.base.MAX_SESSIONS` sessions,
  :data:`~detector.adapters.base.MAX_STATEMENTS` statements): per-session statement text for
  ``<previously logged>``, the keys of the statements emitted last and, for stderr, the
  client address, session id, user, database and application of each backend pid.

Options (keywords of every constructor): ``location`` (names the stream in rejects),
``timezone`` (IANA zone for timestamps with no usable offset: MariaDB's local times,
PostgreSQL zone abbreviations other than UTC/GMT; None rejects them as ``naive_timestamp``),
``db_instance``; ``log_line_prefix`` for ``pgaudit-stderr``; ``year`` for ``mariadb-syslog``.
Statement text is passed on as logged; it is redacted downstream before it is stored.
"""

from __future__ import annotations

import re
from typing import Any, Final

from detector.adapters.base import ADAPTER_REASONS, Adapter, Parsed
from detector.adapters.mariadb import MariadbAuditParser, MariadbSyslogParser
from detector.adapters.pg_csvlog import PgCsvlogParser
from detector.adapters.pg_jsonlog import PgJsonlogParser
from detector.adapters.pg_stderr import PgStderrParser
from detector.errors import UnknownNameError

#: Every adapter by name.
ADAPTERS: Final[dict[str, type[Any]]] = {
    "pgaudit-jsonlog": PgJsonlogParser,
    "pgaudit-csvlog": PgCsvlogParser,
    "pgaudit-stderr": PgStderrParser,
    "mariadb-audit": MariadbAuditParser,
    "mariadb-syslog": MariadbSyslogParser,
}


_MARIADB_FILE: Final = re.compile(rb"^\d{8} \d\d:\d\d:\d\d,[^,]*,[^,]*,[^,]*,\d+,\d+,[A-Z_]+,")
_MARIADB_SYSLOG: Final = re.compile(rb"^\S.{5,40}? \S+ [^:\s]*(?:server_audit|mysql)[^:\s]*: ")


def detect_format(file_name: str, head: bytes) -> str:
    """The adapter for a log file, from its name and first bytes:

    * ``*.json`` -> ``pgaudit-jsonlog``; ``*.csv`` -> ``pgaudit-csvlog``;
    * ``*.log`` (anything else) -> ``mariadb-audit`` if the first non-blank line looks like
      server_audit's ``YYYYMMDD HH:MM:SS,host,user,host,id,id,OP,`` line, ``mariadb-syslog``
      if it is a syslog line from ``mysql-server_auditing`` (or an ident naming server_audit
      or mysql), else ``pgaudit-stderr`` (give ``log_line_prefix`` when it is not the default
      ``%m [%p] ``).
    """
    name = file_name.lower()
    if name.endswith(".json"):
        return "pgaudit-jsonlog"
    if name.endswith(".csv"):
        return "pgaudit-csvlog"
    first = next((line for line in head.split(b"\n", 64)[:64] if line.strip()), b"")
    if _MARIADB_FILE.match(first):
        return "mariadb-audit"
    if _MARIADB_SYSLOG.match(first):
        return "mariadb-syslog"
    return "pgaudit-stderr"


def make_adapter(name: str, **options: Any) -> Adapter:
    """A new parser of the format ``name`` (UnknownNameError lists the valid names)."""
    if name not in ADAPTERS:
        raise UnknownNameError("log format", name, tuple(ADAPTERS))
    parser: Adapter = ADAPTERS[name](**options)
    return parser


__all__ = [
    "ADAPTERS",
    "ADAPTER_REASONS",
    "Adapter",
    "MariadbAuditParser",
    "MariadbSyslogParser",
    "Parsed",
    "PgCsvlogParser",
    "PgJsonlogParser",
    "PgStderrParser",
    "detect_format",
    "make_adapter",
]

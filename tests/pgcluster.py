"""The private pgaudit cluster for tests (it lives in :mod:`detector.lab.cluster`), and a small
SaaS database for the adapter tests.

>>> cluster = PgCluster.create(tmp_path, log_line_prefix="%m [%p] ")   # doctest: +SKIP
>>> cluster.start()                                                    # doctest: +SKIP
"""

from __future__ import annotations

from detector.lab.cluster import (
    AUDIT_SETTINGS,
    PG_BIN_CANDIDATES,
    SUFFIX,
    PgCluster,
    client_tool,
    free_port,
    libfaketime,
    pg_bin,
    require_cluster,
    unavailable_reason,
    wait_until,
)

__all__ = [
    "AUDIT_SETTINGS",
    "PG_BIN_CANDIDATES",
    "SAAS_SCHEMA",
    "SUFFIX",
    "PgCluster",
    "client_tool",
    "free_port",
    "libfaketime",
    "pg_bin",
    "require_cluster",
    "unavailable_reason",
    "wait_until",
]

# --- a small SaaS database and its traffic ----------------------------------------------------

SAAS_SCHEMA = """
CREATE TABLE clients (id int PRIMARY KEY, name text NOT NULL, email text NOT NULL);
CREATE TABLE accounts (id int PRIMARY KEY, client_id int NOT NULL REFERENCES clients(id),
                       balance numeric NOT NULL);
CREATE TABLE search_counts (client_id int NOT NULL REFERENCES clients(id), day date NOT NULL,
                            searches int NOT NULL);
INSERT INTO clients SELECT g, 'client ' || g, 'c' || g || '@example.com'
  FROM generate_series(1, 40) g;
INSERT INTO accounts SELECT g, 1 + g % 40, g * 10 FROM generate_series(1, 120) g;
INSERT INTO search_counts SELECT 1 + g % 40, DATE '2026-01-01' + g % 7, g
  FROM generate_series(1, 280) g;
CREATE ROLE app_api LOGIN PASSWORD 'app-secret';
GRANT SELECT, INSERT, UPDATE ON clients, accounts, search_counts TO app_api;
"""

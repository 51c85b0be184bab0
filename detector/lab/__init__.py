"""The real-server evaluation lab: a private PostgreSQL 15 with pgaudit under an accelerated
clock, driven by real clients (psycopg, psql, pg_dump) through per-role source addresses, with
labels resolved from the server's own log. See docs/lab.md; ``exfilwatch lab run``."""

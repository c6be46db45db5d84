"""Database plumbing shared by both modes: connecting, classifying errors, migrations.

How this works: the simulator talks to PostgreSQL with psycopg 3 in
autocommit mode and sends BEGIN and COMMIT itself as simple queries, as the
daemons' drivers do. Whatever goes wrong is sorted into three kinds, because
each has a different consequence:

- the connection is gone (`conn.broken`): a real daemon crashes, so the
  simulator stops with DatabaseLost; if it happened during COMMIT, the outcome
  is unknown;
- a serialization failure or deadlock: lnd's driver retries the transaction;
- anything else: a daemon cannot go on either (SimulatorError).

Migrations are a list of statements per version, applied in one transaction
under an advisory lock (two simulators starting at once do not both apply
them) and recorded in a one-row version table, so running them again is a
no-op and a newer schema is refused. Each DDL statement is its own simple
query, so the replicator's DDL capture (current_query()) sees one statement.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import NoReturn

import psycopg
from psycopg import errors as pg_errors
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from haproxy_ln.errors import DatabaseLost, SimulatorError

__all__ = [
    "Conn",
    "Migration",
    "as_bytes",
    "as_int",
    "connect",
    "describe_target",
    "first_line",
    "migrate",
    "raise_for",
    "retryable",
    "rollback_quietly",
    "simple",
]

Conn = psycopg.Connection[tuple[object, ...]]
Migration = tuple[str, ...]  # the statements of one schema version
_MIGRATION_LOCK = 0x68706C6E73696D  # pg_advisory_xact_lock key: "hplnsim"


def describe_target(dsn: str) -> str:
    """`host:port/dbname` of a DSN, for messages (never its password)."""
    try:
        params = conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        return "the database (unparsable DSN)"
    host = params.get("host") or params.get("hostaddr") or "localhost"
    return f"{host}:{params.get('port') or 5432}/{params.get('dbname') or '?'}"


def connect(dsn: str, *, application_name: str, timeout: float, prepare: bool) -> Conn:
    """An autocommit connection; `prepare`: named prepared statements (lnd) or none (cln).

    Raises DatabaseLost if the database cannot be reached.
    """
    try:
        params = conninfo_to_dict(dsn)
    except psycopg.ProgrammingError as e:
        raise SimulatorError(f"the database DSN is not valid: {e}") from None
    params.setdefault("connect_timeout", max(1, round(timeout)))
    params.setdefault("application_name", application_name)
    try:
        conn = psycopg.connect(make_conninfo("", **params), autocommit=True)
    except psycopg.OperationalError as e:
        raise DatabaseLost(f"cannot connect to {describe_target(dsn)}: {first_line(e)}") from None
    # prepare_threshold 0: every parameterized statement is parsed once under a
    # name and then only bound (pgx); None: never prepared, PQexecParams (libpq in CLN).
    conn.prepare_threshold = 0 if prepare else None
    return conn


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def retryable(e: BaseException) -> bool:
    """Whether a failed transaction may simply be run again (lnd's driver does)."""
    return isinstance(e, pg_errors.SerializationFailure | pg_errors.DeadlockDetected)


def raise_for(conn: Conn, e: psycopg.Error, doing: str) -> NoReturn:
    """Raise what a daemon would die of: DatabaseLost when the connection is gone,
    SimulatorError for any other database error while `doing` something."""
    if conn.broken or conn.closed:
        raise DatabaseLost(f"database connection lost while {doing}: {first_line(e)}") from None
    sqlstate = f" (SQLSTATE {e.sqlstate})" if e.sqlstate else ""
    raise SimulatorError(f"database error while {doing}: {first_line(e)}{sqlstate}") from None


def as_int(value: object) -> int:
    """A column that must hold an integer. Raises SimulatorError otherwise."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise SimulatorError(f"expected an integer in the database, found {type(value).__name__}")
    return value


def as_bytes(value: object) -> bytes:
    """A column that must hold bytea. Raises SimulatorError otherwise."""
    if not isinstance(value, bytes):
        raise SimulatorError(f"expected bytea in the database, found {type(value).__name__}")
    return value


def simple(conn: Conn, sql: str) -> None:
    """Run `sql` as a simple query (BEGIN, COMMIT, DDL), never as a prepared statement."""
    conn.execute(sql, prepare=False)


def rollback_quietly(conn: Conn) -> None:
    """End a failed transaction; a broken connection needs nothing."""
    if conn.broken or conn.closed:
        return
    with contextlib.suppress(psycopg.Error):  # the caller reports the error that got us here
        simple(conn, "ROLLBACK")


def migrate(
    conn: Conn,
    version_table: str,
    migrations: Sequence[Migration],
) -> int:
    """Bring the schema to version len(migrations); returns the version found before.

    `version_table` is a trusted identifier from this package. Raises
    SimulatorError if the database has a newer schema than this simulator
    knows, DatabaseLost if the connection goes.
    """
    doing = "running schema migrations"
    try:
        simple(conn, "BEGIN")
        # binary results, as the daemons' drivers ask for (libpq in CLN, pgx in lnd)
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,), binary=True)
        simple(
            conn,
            f"CREATE TABLE IF NOT EXISTS {version_table} "
            "(id INTEGER PRIMARY KEY CHECK (id = 1), version INTEGER NOT NULL)",
        )
        row = conn.execute(
            f"SELECT version FROM {version_table} WHERE id = 1", binary=True
        ).fetchone()
        found = as_int(row[0]) if row else 0
        if found > len(migrations):
            raise SimulatorError(
                f"the database schema is at version {found} but this simulator knows only "
                f"{len(migrations)}: it was written by a newer haproxy-ln"
            )
        for statements in migrations[found:]:
            for statement in statements:
                simple(conn, statement)
        conn.execute(
            f"INSERT INTO {version_table} (id, version) VALUES (1, %s) "
            "ON CONFLICT (id) DO UPDATE SET version = excluded.version",
            (len(migrations),),
            binary=True,
        )
        simple(conn, "COMMIT")
    except psycopg.Error as e:
        rollback_quietly(conn)
        raise_for(conn, e, doing)
    except SimulatorError:
        rollback_quietly(conn)
        raise
    return found

"""The node's own PostgreSQL as the primary: bootstrap, the synchronous barrier, sequences.

How this works (asyncio side of the bridge): `bootstrap` checks the settings
logical replication needs and says what to set when they are wrong, then
creates, idempotently, our schema, the publication, the DDL event trigger
and REPLICA IDENTITY FULL on tables without a primary key. It needs a
superuser (publications FOR ALL TABLES and event triggers do).

`set_sync` makes PostgreSQL itself the barrier: with the replicator's sync
name in `synchronous_standby_names` and `synchronous_commit = on`, every
COMMIT waits until the replicator confirms it durable in the replica store.
`clear_sync` removes the name (degraded: commits no longer wait). Both use
ALTER SYSTEM and a reload, so they survive a restart of PostgreSQL.
`sync_state` reads what pg_stat_replication says about the replicator.
"""

from __future__ import annotations

import asyncio
import time

import asyncpg

from haproxy_ln.errors import ReplicationError, SetupError
from haproxy_ln.pgwire.sql import quote_ident, quote_literal
from haproxy_ln.store import schema

_REQUIRED: dict[str, tuple[str | int, str]] = {
    "wal_level": ("logical", "wal_level = logical (then restart PostgreSQL)"),
    "max_wal_senders": (2, "max_wal_senders = 10 or more (then restart PostgreSQL)"),
    "max_replication_slots": (1, "max_replication_slots = 10 or more (then restart PostgreSQL)"),
}


async def check_settings(conn: asyncpg.Connection) -> None:
    """Raises SetupError listing every setting that prevents logical replication."""
    problems = []
    for name, (need, advice) in _REQUIRED.items():
        value = await conn.fetchval("SELECT current_setting($1)", name)
        ok = value == need if isinstance(need, str) else int(value) >= need
        if not ok:
            problems.append(f"{name} is {value}; set {advice}")
    if not await conn.fetchval("SELECT rolsuper FROM pg_roles WHERE rolname = current_user"):
        problems.append(
            "the replication user must be a superuser to create the publication "
            "and the DDL event trigger"
        )
    if problems:
        raise SetupError("the primary is not ready: " + "; ".join(problems))


async def ensure_store(conn: asyncpg.Connection) -> None:
    """Create our schema and tables if missing (on any node)."""
    await conn.execute(schema.STORE_TABLES)


async def bootstrap(conn: asyncpg.Connection) -> None:
    """Prepare the primary for capture; idempotent. Raises SetupError."""
    await check_settings(conn)
    await ensure_store(conn)
    await conn.execute(schema.DDL_FUNCTION)
    await conn.execute(schema.DDL_TRIGGER_SQL)
    await conn.execute(schema.PUBLICATION_SQL)
    await conn.execute(schema.IDENTITY_FULL_SQL)


async def advance_sequences(conn: asyncpg.Connection) -> None:
    """Move every column-owned sequence past the largest value in its column."""
    await conn.execute(schema.ADVANCE_SEQUENCES_SQL)


async def set_sync(conn: asyncpg.Connection, sync_name: str) -> None:
    """Make every COMMIT wait for the replicator named `sync_name`.

    Then write one WAL record: a logical walsender counts as synchronous only
    once it has read up to the flushed end of WAL, and on an idle primary
    whose WAL ends at a page boundary it would wait for the next record (up
    to 15 s, the background writer's), during which the pair could not name
    the replica in its sync record. The record is a non-transactional
    logical message, which our replicator skips and which waits for nobody.
    """
    await conn.execute("ALTER SYSTEM SET synchronous_commit = on")
    names = quote_literal(quote_ident(sync_name))
    await conn.execute(f"ALTER SYSTEM SET synchronous_standby_names = {names}")
    await conn.execute("SELECT pg_reload_conf()")
    await conn.execute(f"SELECT pg_logical_emit_message(false, '{schema.NUDGE_PREFIX}', '')")


async def clear_sync(conn: asyncpg.Connection) -> None:
    """Stop waiting for any standby: degraded mode, commits acknowledged alone."""
    await conn.execute("ALTER SYSTEM RESET synchronous_standby_names")
    await conn.execute("SELECT pg_reload_conf()")


async def sync_state(conn: asyncpg.Connection, sync_name: str) -> str | None:
    """pg_stat_replication.sync_state of the replicator (`sync`, `async`, ...), None if absent."""
    state: str | None = await conn.fetchval(
        "SELECT sync_state FROM pg_stat_replication WHERE application_name = $1 "
        "ORDER BY sync_state = 'sync' DESC LIMIT 1",
        sync_name,
    )
    return state


async def wait_sync_state(
    conn: asyncpg.Connection, sync_name: str, want: str | None, timeout: float
) -> None:
    """Wait until sync_state is `want`. Raises ReplicationError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while (state := await sync_state(conn, sync_name)) != want:
        if time.monotonic() > deadline:
            raise ReplicationError(
                f"replicator {sync_name!r} is {state or 'not connected'}, not {want}, "
                f"after {timeout} s"
            )
        await asyncio.sleep(0.05)

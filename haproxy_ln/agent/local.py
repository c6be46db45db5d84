"""The agent's control connection to its local PostgreSQL.

How this works: one asyncpg connection (through the store bridge), opened
on first use and again after it breaks, with synchronous_commit = local:
the agent's own writes (the fence, the primary's bootstrap, ALTER SYSTEM)
must never wait for a replicator that may not be running. `facts` reads
what the HA loop needs; when the database cannot be reached the facts say
"unknown" (no fence, not synchronous) and the actions that need it fail,
to be decided again by the next step.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Concatenate, ParamSpec, TypeVar

import asyncpg

from haproxy_ln import ha
from haproxy_ln.config import ReplicationConfig
from haproxy_ln.errors import ReplicationError
from haproxy_ln.store import bridge, primary
from haproxy_ln.store.apply import raise_fence
from haproxy_ln.store.schema import SCHEMA

log = logging.getLogger(__name__)
P = ParamSpec("P")
# How long raising the fence waits for a writer's batch to finish before ending
# the writer's session (see _end_writers); a live batch takes milliseconds.
FENCE_LOCK_TIMEOUT_MS = 1000
T = TypeVar("T")

_FACTS_SQL = f"""
SELECT (SELECT epoch FROM {SCHEMA}.fence) AS epoch,
       (SELECT node FROM {SCHEMA}.fence) AS node
"""


@dataclass(frozen=True, slots=True)
class LocalFacts:
    reachable: bool
    fence: ha.Fence | None
    sync_standby_names_set: bool
    sync_state: ha.SyncState | None
    slot_exists: bool  # our logical replication slot is on this database


UNREACHABLE = LocalFacts(False, None, False, None, False)


class LocalStore:
    """The local PostgreSQL as the HA loop sees and changes it."""

    def __init__(self, config: ReplicationConfig) -> None:
        self.config = config
        self._conn: asyncpg.Connection | None = None
        self._problem: str | None = None

    async def _connection(self) -> asyncpg.Connection:
        """Raises ReplicationError (and logs once) when the database is unreachable."""
        if self._conn is not None and not self._conn.is_closed():
            return self._conn
        try:
            self._conn = await bridge.connect(
                self.config.source_target(),
                timeout=self.config.connect_timeout,
                settings={"synchronous_commit": "local"},
            )
        except ReplicationError as e:
            if str(e) != self._problem:
                log.warning("the local PostgreSQL is unreachable: %s", e)
                self._problem = str(e)
            raise
        if self._problem is not None:
            log.info("the local PostgreSQL is reachable again")
            self._problem = None
        return self._conn

    async def _call(
        self,
        fn: Callable[Concatenate[asyncpg.Connection, P], Awaitable[T]],
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> T:
        conn = await self._connection()
        try:
            return await bridge.call(fn, conn, *args, **kwargs)
        except (OSError, *bridge.CONNECTION_LOST) as e:
            await self.close()
            raise ReplicationError(f"the local PostgreSQL connection broke: {e}") from None
        except asyncpg.PostgresError as e:
            raise ReplicationError(f"the local PostgreSQL refused: {e}") from None

    async def facts(self) -> LocalFacts:
        try:
            return await self._call(_read_facts, self.config.sync_name, self.config.slot)
        except ReplicationError:
            return UNREACHABLE

    async def raise_fence(self, epoch: int, node: str) -> None:
        """Raise the fence to `epoch`. Raises StaleEpoch if it is above already."""
        await self._call(_raise_fence, epoch, node)

    async def advance_sequences(self) -> None:
        """Move every sequence past the largest value in its column. Raises ReplicationError."""
        await self._call(primary.advance_sequences)

    async def bootstrap_primary(self) -> None:
        """Publication, DDL event trigger, slot. Raises SetupError, ReplicationError."""
        await self._call(primary.bootstrap)

    async def drop_slot(self) -> None:
        """Drop our replication slot: on a standby it would only hold WAL back forever.

        Raises ReplicationError (also while a walsender still uses it)."""
        await self._call(_drop_slot, self.config.slot)

    async def set_sync_standby(self, enabled: bool) -> None:
        if enabled:
            await self._call(primary.set_sync, self.config.sync_name)
        else:
            await self._call(primary.clear_sync)

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            await bridge.close(conn)

    def abandon(self) -> None:
        """Drop the connection at once, without a goodbye: its server did not answer in
        time, and a query cut off midway leaves the connection unusable."""
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.terminate()


async def _read_facts(conn: asyncpg.Connection, sync_name: str, slot: str) -> LocalFacts:
    fence = None
    if await conn.fetchval("SELECT to_regclass($1)", f"{SCHEMA}.fence") is not None:
        row = await conn.fetchrow(_FACTS_SQL)
        if row is not None and row["epoch"] is not None:
            fence = ha.Fence(int(row["epoch"]), str(row["node"]))
    names = await conn.fetchval("SELECT current_setting('synchronous_standby_names')")
    state = await primary.sync_state(conn, sync_name)
    slot_exists = await conn.fetchval(
        "SELECT count(*) > 0 FROM pg_replication_slots "
        "WHERE slot_name = $1 AND database = current_database()",
        slot,
    )
    return LocalFacts(
        reachable=True,
        fence=fence,
        sync_standby_names_set=sync_name in _standby_names(names),
        sync_state=None if state is None else ha.SyncState(state),
        slot_exists=bool(slot_exists),
    )


def _standby_names(setting: str) -> set[str]:
    """The names in a synchronous_standby_names value like `"a"` or `FIRST 1 (a, b)`."""
    inner = setting.split("(", 1)[1].rsplit(")", 1)[0] if "(" in setting else setting
    return {name.strip().strip('"') for name in inner.split(",") if name.strip()}


async def _raise_fence(conn: asyncpg.Connection, epoch: int, node: str) -> None:
    await primary.ensure_store(conn)
    while True:
        try:
            async with conn.transaction():
                await conn.execute(f"SET LOCAL lock_timeout = {FENCE_LOCK_TIMEOUT_MS}")
                await raise_fence(conn, epoch, node)
                # This database now takes writes of its own: its position as a replica of
                # the old primary means nothing any more, so a later rejoin copies it
                # afresh instead of streaming on top of writes the other node never saw.
                await conn.execute(f"DELETE FROM {SCHEMA}.replica_state")
            return
        except asyncpg.LockNotAvailableError:
            await _end_writers(conn)


async def _end_writers(conn: asyncpg.Connection) -> None:
    """End the sessions that hold the fence or the replica position mid-batch.

    Only an older epoch's replicator writes here (this node is taking over), and a
    batch locks both rows from its start to its commit. One paused or cut off while
    it sent a batch holds them until its connection dies, which TCP may notice only
    after hours; the fence, and so the takeover, would wait that long. Ending the
    session rolls its batch back: none of it was acknowledged.
    """
    ended = await conn.fetch(
        "SELECT l.pid, pg_terminate_backend(l.pid) FROM pg_locks l "
        "WHERE l.granted AND l.pid <> pg_backend_pid() AND l.relation IN "
        f"('{SCHEMA}.fence'::regclass, '{SCHEMA}.replica_state'::regclass) "
        "AND l.mode IN ('RowShareLock', 'RowExclusiveLock')"
    )
    log.warning(
        "raising the fence: ended %d session(s) holding it mid-batch (pids %s)",
        len(ended),
        ", ".join(str(r["pid"]) for r in ended) or "none left",
    )


async def _drop_slot(conn: asyncpg.Connection, slot: str) -> None:
    await conn.execute(
        "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
        "WHERE slot_name = $1 AND database = current_database()",
        slot,
    )

"""Replication facts for the health server, read from PostgreSQL and cached briefly.

How this works: `StoreProbe.facts(leading)` returns `ReplicationFacts` at
most `max_age` seconds old. A refresh reads two databases, each over its
own read-only connection (opened on first use, again after a failure):

- this node's database as a replica store: `haproxy_ln.replica_state`
  (status, applied position, when it last advanced) and the newest
  `haproxy_ln.txlog` commit time;
- the primary's `pg_stat_replication` row of the replicator (application
  name `[replication] sync_name`): its confirmed flush position, the bytes
  of WAL the primary flushed beyond it, `flush_lag` and `sync_state`. A
  leading node's primary is its own database; a standby's is the active's,
  which is the database its own `[replication] replica` URL names.

Why the primary's view: a standby's store only knows what it has, not what
it lacks, and the replicator lives on the active. PostgreSQL tracks the
replicator's confirmations itself, and they advance on keepalives too, so
an idle pair shows no lag (docs/health.md).

A whole refresh is bounded by `timeout`, so a health check never hangs on
an unreachable database; concurrent requests share one refresh.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import replace
from datetime import datetime
from typing import Any

import asyncpg
import trio

from haproxy_ln.config import ReplicationConfig
from haproxy_ln.errors import ReplicationError
from haproxy_ln.health.model import ReplicationFacts
from haproxy_ln.pgwire.dsn import PgTarget
from haproxy_ln.replication.stream import parse_lsn
from haproxy_ln.store import bridge
from haproxy_ln.store.schema import SCHEMA

__all__ = ["StoreProbe"]

log = logging.getLogger(__name__)

SETTINGS = {
    "application_name": "haproxy_ln_health",
    "default_transaction_read_only": "on",
    "synchronous_commit": "local",
}

_STORE_SQL = f"""
SELECT rs.status, rs.source_lsn::text AS applied_lsn, rs.updated_at,
       (SELECT t.commit_time FROM {SCHEMA}.txlog t ORDER BY t.id DESC LIMIT 1) AS last_commit
  FROM {SCHEMA}.replica_state rs
"""

_PRIMARY_SQL = """
SELECT flush_lsn::text AS flush_lsn,
       pg_wal_lsn_diff(pg_current_wal_flush_lsn(), flush_lsn)::bigint AS lag_bytes,
       extract(epoch FROM flush_lag)::float8 AS lag_seconds,
       sync_state
  FROM pg_stat_replication
 WHERE application_name = $1
 ORDER BY flush_lsn DESC NULLS LAST
 LIMIT 1
"""


class _Link:
    """One lazily opened read-only connection; closed after any failure."""

    def __init__(self, target: PgTarget, timeout: float) -> None:
        self.target = target
        self.timeout = timeout
        self._conn: asyncpg.Connection | None = None
        # How errors name the database: /status is served on an open port, so no URL.
        host = f"[{target.host}]" if ":" in target.host else target.host
        self.where = f"{host}:{target.port}/{target.database}"

    async def fetchrow(self, sql: str, *args: object) -> Any:
        """Raises ReplicationError when the database cannot be reached or refuses."""
        try:
            if self._conn is None or self._conn.is_closed():
                self._conn = await bridge.connect(
                    self.target, timeout=self.timeout, settings=SETTINGS
                )
            return await bridge.call(self._conn.fetchrow, sql, *args)
        except (OSError, asyncpg.PostgresError, *bridge.CONNECTION_LOST) as e:
            await self.close()
            raise ReplicationError(f"{self.where}: {e}") from None
        except ReplicationError as e:  # from connect, naming the URL
            await self.close()
            text = str(e).replace(f"cannot connect to {self.target}: ", "")
            raise ReplicationError(f"{self.where}: {text}") from None

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            await bridge.close(conn)


class StoreProbe:
    """See the module docstring."""

    def __init__(
        self, config: ReplicationConfig, *, max_age: float = 1.0, timeout: float = 1.0
    ) -> None:
        self.config = config
        self.max_age = max_age
        self.timeout = timeout
        self._local = _Link(config.source_target(), timeout)
        replica = config.replica_target()
        self._peer = None if replica is None else _Link(replica, timeout)
        self._lock = trio.Lock()
        self._cached: tuple[float, bool, ReplicationFacts] | None = None

    async def facts(self, leading: bool) -> ReplicationFacts:
        """The facts, refreshed if older than max_age; `leading`: this node is the primary."""
        async with self._lock:
            cached = self._cached
            fresh = cached is not None and time.monotonic() - cached[0] < self.max_age
            if cached is not None and fresh and cached[1] == leading:
                return cached[2]
            facts = ReplicationFacts(problem=f"timed out after {self.timeout:g} s")
            with trio.move_on_after(self.timeout) as scope:
                facts = await self._read(leading)
            if scope.cancelled_caught:
                await self.close()  # a query cut off mid-way leaves its connection unusable
            self._cached = (time.monotonic(), leading, facts)
            return facts

    def cached(self) -> ReplicationFacts:
        """The last facts read, without reading (for synchronous callers like metrics)."""
        return ReplicationFacts() if self._cached is None else self._cached[2]

    async def close(self) -> None:
        with trio.CancelScope(shield=True):
            await self._local.close()
            if self._peer is not None:
                await self._peer.close()

    async def _read(self, leading: bool) -> ReplicationFacts:
        problems: list[str] = []
        facts = ReplicationFacts()
        try:
            facts = await self._store()
        except ReplicationError as e:
            problems.append(f"this node's database: {e}")
        primary = self._local if leading else self._peer
        if primary is None:
            problems.append("no [replication] replica: the active's database is not known here")
        else:
            try:
                facts, problem = await self._primary(primary, facts)
                if problem:
                    problems.append(problem)
            except ReplicationError as e:
                problems.append(f"the primary's database: {e}")
        return replace(facts, problem="; ".join(problems) or None)

    async def _store(self) -> ReplicationFacts:
        exists = await self._local.fetchrow(
            "SELECT to_regclass($1) IS NOT NULL AND to_regclass($2) IS NOT NULL AS ok",
            f"{SCHEMA}.replica_state",
            f"{SCHEMA}.txlog",
        )
        row = await self._local.fetchrow(_STORE_SQL) if exists["ok"] else None
        if row is None:
            return ReplicationFacts(store_reachable=True)
        return ReplicationFacts(
            store_reachable=True,
            store_status=str(row["status"]),
            applied_lsn=parse_lsn(row["applied_lsn"]),
            applied_at=_iso(row["updated_at"]),
            last_commit_time=_iso(row["last_commit"]),
        )

    async def _primary(
        self, link: _Link, facts: ReplicationFacts
    ) -> tuple[ReplicationFacts, str | None]:
        row = await link.fetchrow(_PRIMARY_SQL, self.config.sync_name)
        if row is None:
            name = self.config.sync_name
            return facts, f"the replicator ({name}) is not connected to the primary"
        if row["flush_lsn"] is None:
            return facts, (
                "pg_stat_replication hides the replicator's position from this user "
                "(grant it pg_read_all_stats)"
            )
        lag_bytes = max(0, int(row["lag_bytes"]))
        seconds = row["lag_seconds"]
        # PostgreSQL clears flush_lag once the replica has caught up and no WAL flows.
        lag_seconds = 0.0 if seconds is None or math.isnan(seconds) else float(seconds)
        return replace(
            facts,
            confirmed_lsn=parse_lsn(row["flush_lsn"]),
            lag_bytes=lag_bytes,
            lag_seconds=lag_seconds,
            sync_state=row["sync_state"],
        ), None


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()

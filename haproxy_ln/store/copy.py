"""Initial copy: fill an empty (or diverged) replica store from the primary.

How this works: the replica store is first marked `copying` in its
replica_state, so a copy that dies half-way is redone from scratch next
time (safely restartable); its user schemas are then dropped. On the
replication connection we (re)create the slot with an exported snapshot:
the snapshot shows exactly the commits before the slot's consistent point,
and streaming from that point later delivers exactly the ones after. Under
that snapshot:

1. pg_dump copies the schema before the data (tables, types, functions);
2. every table is copied with binary COPY, `workers` tables at a time,
   each worker reading through its own source connection that imported the
   snapshot, and writing with session_replication_role = replica (no
   triggers, no foreign-key checks: the data is a consistent snapshot);
3. pg_dump copies the rest of the schema (indexes, constraints, triggers);
4. replica_state becomes `streaming` at the consistent point, under the
   writer's epoch.

The replication connection stays idle meanwhile, as the exported snapshot
lives only until its next command. A replica store fenced above the
writer's epoch is never touched (StaleEpoch), and neither is the source
itself, should the two URLs name the same database.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
from pglast import ast
from tqdm import tqdm

from haproxy_ln import metrics
from haproxy_ln.errors import ReplicationError, SetupError
from haproxy_ln.pgwire.dsn import PgTarget
from haproxy_ln.pgwire.sql import quote_ident, quote_literal
from haproxy_ln.replication.stream import parse_lsn
from haproxy_ln.replicator.walsender import WalSenderConnection
from haproxy_ln.store import bridge
from haproxy_ln.store.apply import raise_fence
from haproxy_ln.store.schema import SCHEMA
from haproxy_ln.store.statements import split

log = logging.getLogger(__name__)

SYSTEM_SCHEMAS = ("pg_catalog", "information_schema", "pg_toast", SCHEMA)
_PG_DUMP_DIRS = (Path("/usr/lib/postgresql/15/bin"),)
_QUEUE_CHUNKS = 64


@dataclass(frozen=True, slots=True)
class ReplicaStatus:
    source_system: str
    source_lsn: int
    epoch: int
    copying: bool


async def replica_status(conn: asyncpg.Connection) -> ReplicaStatus | None:
    """What the replica store says about itself; None when it was never seeded."""
    row = await conn.fetchrow(
        f"SELECT source_system, source_lsn::text, epoch, status FROM {SCHEMA}.replica_state"
    )
    if row is None:
        return None
    return ReplicaStatus(row[0], parse_lsn(row[1]), row[2], row[3] == "copying")


@dataclass
class CopyProgress:
    """Tables, rows, bytes, rate and ETA of a copy: on a terminal and in metrics."""

    show: bool | None = None  # None: only when stderr is a terminal
    tables_total: int = 0
    tables_done: int = 0
    rows: int = 0
    bytes: int = 0
    _bar: tqdm | None = field(default=None, repr=False)  # type: ignore[type-arg]

    def begin(self, tables: int, estimated_bytes: int) -> None:
        self.tables_total = tables
        metrics.INITIAL_COPY_TABLES_LEFT.set(tables)
        self._bar = tqdm(
            total=estimated_bytes or None,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc="initial copy",
            disable=None if self.show is None else not self.show,
        )

    def add_bytes(self, n: int) -> None:
        self.bytes += n
        metrics.INITIAL_COPY_BYTES.inc(n)
        if self._bar is not None:
            self._bar.update(n)

    def table_done(self, name: str, rows: int) -> None:
        self.tables_done += 1
        self.rows += rows
        metrics.INITIAL_COPY_TABLES_LEFT.set(self.tables_total - self.tables_done)
        log.info(
            "copied %s: %d rows (%d/%d tables)", name, rows, self.tables_done, self.tables_total
        )
        if self._bar is not None:
            self._bar.set_postfix_str(
                f"tables {self.tables_done}/{self.tables_total}, rows {self.rows}"
            )

    def end(self) -> None:
        if self._bar is not None:
            self._bar.close()


def pg_dump_path() -> str:
    """Raises SetupError when pg_dump (PostgreSQL 15 client) is not installed."""
    for d in _PG_DUMP_DIRS:
        if (d / "pg_dump").exists():
            return str(d / "pg_dump")
    found = shutil.which("pg_dump")
    if found is None:
        raise SetupError("pg_dump not found: install postgresql-client-15")
    return found


def _is_event_trigger(stmt: ast.Node) -> bool:
    if isinstance(stmt, (ast.CreateEventTrigStmt, ast.AlterEventTrigStmt)):
        return True
    kind = getattr(stmt, "objectType", None) or getattr(stmt, "objtype", None)
    return getattr(kind, "name", None) == "OBJECT_EVENT_TRIGGER"


async def _pg_dump(source: PgTarget, snapshot: str, section: str) -> list[str]:
    """One section of the source's schema under `snapshot`, as statements we replay."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    if source.password is not None:
        env["PGPASSWORD"] = source.password
    proc = await asyncio.create_subprocess_exec(
        pg_dump_path(),
        "--schema-only",
        f"--section={section}",
        f"--snapshot={snapshot}",
        "--no-publications",
        "--no-subscriptions",
        f"--exclude-schema={SCHEMA}",
        f"--host={source.host}",
        f"--port={source.port}",
        f"--username={source.user}",
        "--no-password",
        source.database,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    if proc.returncode != 0:
        raise ReplicationError(f"pg_dump of the schema failed: {err.decode(errors='replace')}")
    # pg_dump 15.14 and later wrap the script in psql's \restrict ... \unrestrict.
    text = "\n".join(line for line in out.decode().splitlines() if not line.startswith("\\"))
    # Our DDL trigger's function is in the excluded schema; replicas need no trigger.
    return [sql for stmt, sql in split(text) if not _is_event_trigger(stmt)]


async def _wipe(conn: asyncpg.Connection) -> None:
    """Drop every user schema of the replica store (public is recreated empty)."""
    schemas = await conn.fetch(
        "SELECT nspname FROM pg_namespace WHERE nspname <> ALL($1::text[]) "
        "AND nspname NOT LIKE 'pg\\_%'",
        list(SYSTEM_SCHEMAS),
    )
    for (name,) in schemas:
        await conn.execute(f"DROP SCHEMA {quote_ident(name)} CASCADE")
    await conn.execute("CREATE SCHEMA IF NOT EXISTS public AUTHORIZATION pg_database_owner")
    # As initdb leaves it in PostgreSQL 15: pg_dump writes only changes to this default,
    # so without it every role but the owner would lose `public` on the replica.
    await conn.execute("GRANT USAGE ON SCHEMA public TO PUBLIC")


async def _prepare_replica(
    replica: PgTarget, *, epoch: int, node: str, system_id: str, source_db: str
) -> None:
    conn = await bridge.aio_connect(replica)
    try:
        same_system = await conn.fetchval("SELECT system_identifier::text FROM pg_control_system()")
        if (
            same_system == system_id
            and await conn.fetchval("SELECT current_database()") == source_db
        ):
            raise SetupError("the replica store is the source database itself")
        async with conn.transaction():
            await raise_fence(conn, epoch, node)
            await conn.execute(
                f"INSERT INTO {SCHEMA}.replica_state "
                "(source_system, source_node, source_lsn, epoch, status) "
                "VALUES ($1, $2, '0/0', $3, 'copying') ON CONFLICT (singleton) DO UPDATE SET "
                "source_system = $1, source_node = $2, source_lsn = '0/0', epoch = $3, "
                "status = 'copying', updated_at = now()",
                system_id,
                node,
                epoch,
            )
        async with conn.transaction():
            await _wipe(conn)
    finally:
        await conn.close()


async def _tables(source: PgTarget, snapshot: str) -> list[tuple[str, str, int]]:
    """(schema, table, size in bytes) of every table with data, largest first."""
    conn = await _snapshot_connection(source, snapshot)
    try:
        rows = await conn.fetch(
            "SELECT n.nspname, c.relname, pg_total_relation_size(c.oid) FROM pg_class c "
            "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.relkind = 'r' "
            "AND n.nspname <> ALL($1::text[]) AND n.nspname NOT LIKE 'pg\\_%' "
            "ORDER BY 3 DESC",
            list(SYSTEM_SCHEMAS),
        )
    finally:
        await conn.close()
    return [(r[0], r[1], r[2]) for r in rows]


async def _snapshot_connection(source: PgTarget, snapshot: str) -> asyncpg.Connection:
    conn = await bridge.aio_connect(source)
    await conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
    await conn.execute(f"SET TRANSACTION SNAPSHOT {quote_literal(snapshot)}")
    return conn


async def _copy_table(
    reader: asyncpg.Connection,
    writer: asyncpg.Connection,
    schema: str,
    table: str,
    progress: CopyProgress,
) -> None:
    queue: asyncio.Queue[bytes | None] = asyncio.Queue(_QUEUE_CHUNKS)

    async def produce(chunk: bytes) -> None:
        progress.add_bytes(len(chunk))
        await queue.put(chunk)

    async def chunks() -> AsyncIterator[bytes]:
        while (chunk := await queue.get()) is not None:
            yield chunk

    async def read() -> None:
        try:
            await reader.copy_from_table(table, schema_name=schema, output=produce, format="binary")
        finally:
            await queue.put(None)

    reading = asyncio.ensure_future(read())
    try:
        async with writer.transaction():
            status = await writer.copy_to_table(
                table, schema_name=schema, source=chunks(), format="binary"
            )
        await reading
    finally:
        reading.cancel()
    progress.table_done(f"{schema}.{table}", int(status.rsplit(" ", 1)[-1]))


async def _copy_data(
    source: PgTarget, replica: PgTarget, snapshot: str, workers: int, progress: CopyProgress
) -> None:
    tables = await _tables(source, snapshot)
    progress.begin(len(tables), sum(t[2] for t in tables))
    todo = list(tables)

    async def worker() -> None:
        reader = await _snapshot_connection(source, snapshot)
        writer = await bridge.aio_connect(replica, {"session_replication_role": "replica"})
        try:
            while todo:
                schema, table, _ = todo.pop(0)
                await _copy_table(reader, writer, schema, table, progress)
        finally:
            await reader.close()
            await writer.close()

    await asyncio.gather(*(worker() for _ in range(min(workers, len(tables)) or 1)))


async def _replay(replica: PgTarget, statements: list[str]) -> None:
    conn = await bridge.aio_connect(replica)
    try:
        async with conn.transaction():
            for statement in statements:
                await conn.execute(statement)
    finally:
        await conn.close()


async def _copy(
    source: PgTarget,
    replica: PgTarget,
    snapshot: str,
    consistent_point: str,
    *,
    workers: int,
    epoch: int,
    progress: CopyProgress,
) -> None:
    started = time.monotonic()
    pre, post = await asyncio.gather(
        _pg_dump(source, snapshot, "pre-data"), _pg_dump(source, snapshot, "post-data")
    )
    await _replay(replica, pre)
    await _copy_data(source, replica, snapshot, workers, progress)
    await _replay(replica, post)
    conn = await bridge.aio_connect(replica)
    try:
        await conn.execute(
            f"UPDATE {SCHEMA}.replica_state SET source_lsn = $1::text::pg_lsn, epoch = $2, "
            "status = 'streaming', updated_at = now()",
            consistent_point,
            epoch,
        )
    finally:
        await conn.close()
    progress.end()
    elapsed = time.monotonic() - started
    log.info(
        "initial copy done: %d tables, %d rows, %.1f MB in %.1f s (%.1f MB/s)",
        progress.tables_done,
        progress.rows,
        progress.bytes / 1e6,
        elapsed,
        progress.bytes / 1e6 / max(elapsed, 1e-9),
    )


async def initial_copy(
    wal: WalSenderConnection,
    source: PgTarget,
    replica: PgTarget,
    *,
    slot: str,
    epoch: int,
    node: str,
    system_id: str,
    workers: int,
    progress: CopyProgress | None = None,
) -> int:
    """Seed the replica store from the source; returns the slot's consistent point.

    `wal` must be idle and stay unused until this returns. Raises StaleEpoch
    when the replica store is fenced above `epoch`, ReplicationError otherwise.
    """
    progress = progress or CopyProgress()
    try:
        await bridge.call(
            _prepare_replica,
            replica,
            epoch=epoch,
            node=node,
            system_id=system_id,
            source_db=source.database,
        )
    except (OSError, asyncpg.PostgresError) as e:
        raise ReplicationError(f"cannot prepare the replica store for a copy: {e}") from e
    existing = await wal.query(
        f"SELECT active FROM pg_replication_slots WHERE slot_name = {quote_literal(slot)}"
    )
    if existing:
        if existing[0][0] == "t":
            raise ReplicationError(f"replication slot {slot!r} is in use by another connection")
        await wal.query(f"DROP_REPLICATION_SLOT {quote_ident(slot)}")
    (row,) = await wal.query(
        f"CREATE_REPLICATION_SLOT {quote_ident(slot)} LOGICAL pgoutput (SNAPSHOT 'export')"
    )
    _, consistent_point, snapshot, _ = row
    assert consistent_point is not None and snapshot is not None
    log.info("initial copy under snapshot %s, streaming from %s", snapshot, consistent_point)
    try:
        await bridge.call(
            _copy,
            source,
            replica,
            snapshot,
            consistent_point,
            workers=workers,
            epoch=epoch,
            progress=progress,
        )
    except (OSError, asyncpg.PostgresError) as e:
        raise ReplicationError(f"initial copy failed: {e}") from e
    return parse_lsn(consistent_point)

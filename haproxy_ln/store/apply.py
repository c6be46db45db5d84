"""Applying records to a replica store: one replica transaction per batch.

How this works (asyncio side of the bridge; trio calls `Applier.apply_batch`
through `bridge.call`). A batch becomes one SQL text, sent as one simple
Query, which PostgreSQL runs as one implicit transaction in one round trip:

1. `haproxy_ln.check_fence(epoch)` locks the fence row; a fence above the
   writer's epoch aborts everything with SQLSTATE HL001 (StaleEpoch), a
   lower one is raised to the writer's epoch;
2. each record's changes in order: DDL (each statement as
   `replay_statements` makes it, as the role and under the search_path and
   the date and time settings the client ran it with), rows, truncates;
3. the records appended to `haproxy_ln.txlog`;
4. `haproxy_ln.advance(from, to)` moves the replica position, failing with
   HL003 unless it still is where this writer left it.

Records ending at or below the position were applied before (the slot
resends after a restart) and are skipped. A batch with DDL is sent in an
explicit transaction, one segment per DDL, because the statements after it
are built from the replica's catalog as the DDL leaves it.

Values arrive in PostgreSQL's text format and are written as literals cast
`'…'::text::T`, T being the column's exact type (with typmod) on the
replica: PostgreSQL's own apply parses values the same way, with the
type's input function. Rows are found by their key: by equality when the
key is the table's primary key (or replica identity index), otherwise
(REPLICA IDENTITY FULL) by comparing each old value in its output text and touching
one matching row only, as duplicate rows are allowed there. Every update
and delete must touch exactly one row (HL002), or the replica has diverged;
a delete without a key (a rewritten table, whose rows follow) empties the
table.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import asyncpg

from haproxy_ln.errors import ReplicationError, StaleEpoch
from haproxy_ln.pgwire.sql import quote_ident, quote_literal
from haproxy_ln.replication.record import (
    TEXT_SETTINGS,
    Change,
    Ddl,
    Op,
    Record,
    Row,
    TruncateTables,
)
from haproxy_ln.replication.stream import format_lsn, parse_lsn
from haproxy_ln.store.schema import POSITION_MOVED, SCHEMA, STALE_EPOCH
from haproxy_ln.store.statements import added_if_missing, replay_statements

log = logging.getLogger(__name__)


def _raise_if_stale(error: asyncpg.PostgresError, epoch: int) -> None:
    """Raise StaleEpoch (logged) if `error` is check_fence refusing `epoch`."""
    if error.sqlstate == STALE_EPOCH:
        fence = int(getattr(error, "detail", None) or 0)
        log.error("replica store refused epoch %d: fenced at %d", epoch, fence)
        raise StaleEpoch(epoch, fence) from None


async def raise_fence(conn: asyncpg.Connection, epoch: int, node: str) -> None:
    """In the current transaction: lock the fence, refuse a lower epoch with
    StaleEpoch, raise the fence to `epoch`."""
    try:
        await conn.execute(f"SELECT {SCHEMA}.check_fence($1, $2)", epoch, node)
    except asyncpg.PostgresError as e:
        _raise_if_stale(e, epoch)
        raise


# The client's settings a DDL statement is replayed under: they decide how its
# date, time and interval literals read (a default of '2024-01-01 12:00').
REPLAY_SETTINGS = ("TimeZone", "DateStyle", "IntervalStyle")
# ... and the role it ran as, which owns what it creates: the daemon must own its
# tables on the replica too, or it could not use them after a failover.
ROLE = "role"


@dataclass(frozen=True, slots=True)
class TableShape:
    types: dict[str, str]  # column -> exact type on the replica
    identity_always: frozenset[str]  # GENERATED ALWAYS AS IDENTITY: never in SET
    key: frozenset[str]  # primary key or replica identity index columns


_SHAPE_SQL = """
SELECT a.attname, format_type(a.atttypid, a.atttypmod), a.attidentity = 'a',
       a.attnum = ANY (coalesce((SELECT i.indkey::int2[] FROM pg_index i
                                  WHERE i.indrelid = a.attrelid
                                    AND (i.indisprimary OR i.indisreplident)
                                  ORDER BY i.indisreplident DESC LIMIT 1), '{}'))
  FROM pg_attribute a
 WHERE a.attrelid = $1::regclass AND a.attnum > 0 AND NOT a.attisdropped
"""


class Applier:
    """Applies batches of records to one replica-store connection.

    The connection runs with search_path = pg_catalog, so that the type
    names the catalog gives are qualified and mean the same everywhere.
    """

    def __init__(self, conn: asyncpg.Connection, epoch: int, node: str) -> None:
        self.conn = conn
        self.epoch = epoch
        self.node = node
        self.position: int | None = None
        self._shapes: dict[tuple[str, str], TableShape] = {}

    async def check_fence(self) -> None:
        """Raises StaleEpoch when the store is fenced above our epoch."""
        fence = await self.conn.fetchval(f"SELECT epoch FROM {SCHEMA}.fence")
        if fence is not None and fence > self.epoch:
            log.error("replica store refuses epoch %d: fenced at %d", self.epoch, fence)
            raise StaleEpoch(self.epoch, fence)

    async def load_position(self) -> int:
        """The replica position stored in the replica state.

        Raises ReplicationError when the store has none (it was never seeded).
        """
        text = await self.conn.fetchval(f"SELECT source_lsn::text FROM {SCHEMA}.replica_state")
        if text is None:
            raise ReplicationError("the replica store has no replica_state: seed it first")
        self.position = parse_lsn(text)
        return self.position

    async def apply_batch(self, records: Sequence[Record]) -> int:
        """Apply `records` in one transaction; returns the replica position after it.

        Raises StaleEpoch when the store is fenced above our epoch and
        ReplicationError when a change cannot be applied; either way nothing
        of the batch is applied.
        """
        position = self.position if self.position is not None else await self.load_position()
        fresh = [r for r in records if r.end_lsn > position]
        if not fresh:
            return position
        try:
            if any(r.has_ddl for r in fresh):
                async with self.conn.transaction():
                    await self._apply_segmented(fresh, position)
            else:
                await self.conn.execute(await self._batch_sql(fresh, position))
        except asyncpg.PostgresError as e:
            self._shapes.clear()
            self.position = None
            _raise_if_stale(e, self.epoch)
            if e.sqlstate == POSITION_MOVED:
                raise ReplicationError(f"replica store: {e}") from None
            raise ReplicationError(f"applying to the replica store failed: {e}") from e
        self.position = fresh[-1].end_lsn
        return self.position

    async def _batch_sql(self, records: Sequence[Record], position: int) -> str:
        parts = [self._fence_sql()]
        for record in records:
            for change in record.changes:
                parts.append(await self._change_sql(change))
        parts.extend(self._finish_sql(records, position))
        return ";\n".join(parts)

    async def _apply_segmented(self, records: Sequence[Record], position: int) -> None:
        await self.conn.execute(self._fence_sql())
        pending: list[str] = []
        for record in records:
            for change in record.changes:
                if isinstance(change, Ddl):
                    if pending:
                        await self.conn.execute(";\n".join(pending))
                        pending = []
                    await self._apply_ddl(change)
                else:
                    pending.append(await self._change_sql(change))
        pending.extend(self._finish_sql(records, position))
        await self.conn.execute(";\n".join(pending))

    async def _apply_ddl(self, ddl: Ddl) -> None:
        self._shapes.clear()
        path = ", ".join(quote_ident(s) for s in ddl.search_path) or "pg_catalog"
        client = dict(ddl.settings)
        role = [f"SET LOCAL ROLE {quote_ident(client[ROLE])}"] if ROLE in client else []
        await self.conn.execute(
            ";\n".join(
                [f"SET LOCAL search_path = {path}", *role]
                + [
                    f"SET LOCAL {n} = {quote_literal(client[n])}"
                    for n in REPLAY_SETTINGS
                    if n in client
                ]
            )
        )
        existing = await self._existing_columns(ddl.sql) if ddl.missing else set()
        for statement in replay_statements(ddl.sql, ddl.missing, existing):
            await self.conn.execute(statement)
        await self.conn.execute(
            ";\n".join(
                ["SET LOCAL search_path = pg_catalog", "SET LOCAL ROLE NONE"]
                + [f"SET LOCAL {n} = {quote_literal(TEXT_SETTINGS[n])}" for n in REPLAY_SETTINGS]
            )
        )

    async def _existing_columns(self, sql: str) -> set[tuple[str, str]]:
        """The (relation, column) of ADD COLUMN IF NOT EXISTS in `sql` that exist already."""
        out = set()
        for relation, column in added_if_missing(sql):
            if await self.conn.fetchval(
                "SELECT EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = to_regclass($1) "
                "AND attname = $2 AND attnum > 0 AND NOT attisdropped)",
                relation,
                column,
            ):
                out.add((relation, column))
        return out

    def _fence_sql(self) -> str:
        return f"SELECT {SCHEMA}.check_fence({self.epoch}, {quote_literal(self.node)})"

    def _finish_sql(self, records: Sequence[Record], position: int) -> list[str]:
        rows = [
            "({}, {}, '{}', '{}', {}, timestamptz 'epoch' + {} * interval '1 microsecond', "
            "{}, '\\x{}')".format(
                quote_literal(r.source_node),
                r.epoch,
                format_lsn(r.commit_lsn),
                format_lsn(r.end_lsn),
                r.xid,
                r.commit_time,
                "ARRAY[" + ", ".join(quote_literal(t) for t in r.tables()) + "]::text[]",
                r.pack().hex(),
            )
            for r in records
            if r.changes
        ]
        out = []
        if rows:
            out.append(
                f"INSERT INTO {SCHEMA}.txlog (source_node, epoch, commit_lsn, end_lsn, xid, "
                "commit_time, tables, record) VALUES " + ",\n".join(rows)
            )
        out.append(
            f"SELECT {SCHEMA}.advance('{format_lsn(position)}', "
            f"'{format_lsn(records[-1].end_lsn)}', {self.epoch})"
        )
        return out

    async def _shape(self, schema: str, table: str) -> TableShape:
        shape = self._shapes.get((schema, table))
        if shape is None:
            rows = await self.conn.fetch(_SHAPE_SQL, f"{quote_ident(schema)}.{quote_ident(table)}")
            shape = TableShape(
                {r[0]: r[1] for r in rows},
                frozenset(r[0] for r in rows if r[2]),
                frozenset(r[0] for r in rows if r[3]),
            )
            self._shapes[(schema, table)] = shape
        return shape

    async def _change_sql(self, change: Change) -> str:
        if isinstance(change, TruncateTables):
            names = ", ".join(f"{quote_ident(s)}.{quote_ident(t)}" for s, t in change.tables)
            restart = " RESTART IDENTITY" if change.restart_identity else ""
            cascade = " CASCADE" if change.cascade else ""
            return f"TRUNCATE ONLY {names}{restart}{cascade}"
        assert isinstance(change, Row)
        return await self._row_sql(change)

    async def _row_sql(self, row: Row) -> str:
        shape = await self._shape(row.schema, row.table)
        name = f"{quote_ident(row.schema)}.{quote_ident(row.table)}"
        missing = set(row.columns + row.key_columns) - shape.types.keys()
        if missing:
            raise ReplicationError(f"{name} on the replica lacks columns {sorted(missing)}")

        def typed(column: str, value: str | None) -> str:
            return f"{quote_literal(value)}::text::{shape.types[column]}"

        if row.op is Op.DELETE and not row.key_columns:
            return f"DELETE FROM ONLY {name}"
        if row.op is Op.INSERT:
            cols = ", ".join(quote_ident(c) for c in row.columns)
            vals = ", ".join(typed(c, v) for c, v in zip(row.columns, row.values, strict=True))
            return f"INSERT INTO {name} ({cols}) OVERRIDING SYSTEM VALUE VALUES ({vals})"
        pairs = list(zip(row.key_columns, row.key_values, strict=True))
        if shape.key and shape.key == set(row.key_columns):
            where = " AND ".join(f"{quote_ident(c)} = {typed(c, v)}" for c, v in pairs)
        else:  # no usable key: compare every old value as text, touch one row only
            # format('%s') prints with the type's output function, as pgoutput did.
            same = " AND ".join(
                f"{quote_ident(c)} IS NULL"
                if v is None
                else f"format('%s', {quote_ident(c)}) = {quote_literal(v)}"
                for c, v in pairs
            )
            where = f"ctid = (SELECT ctid FROM {name} WHERE {same} LIMIT 1)"
        if row.op is Op.UPDATE:
            sets = ", ".join(
                f"{quote_ident(c)} = {typed(c, v)}"
                for c, v in zip(row.columns, row.values, strict=True)
                if c not in shape.identity_always
            ) or ", ".join(f"{quote_ident(c)} = {quote_ident(c)}" for c in row.key_columns[:1])
            action = f"UPDATE {name} SET {sets} WHERE {where}"
        else:
            action = f"DELETE FROM {name} WHERE {where}"
        what = quote_literal(f"{row.op.name} on {row.schema}.{row.table}")
        return (
            f"WITH c AS ({action} RETURNING 1) SELECT {SCHEMA}.expect_one(count(*), {what}) FROM c"
        )

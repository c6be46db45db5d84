"""Applying records to a replica store: one replica transaction per batch.

How this works (trio, over our own `PgConnection`: the commit path crosses
no event-loop bridge). A batch becomes one pipeline of extended-protocol
messages and one Sync, which PostgreSQL runs as one implicit transaction in
one round trip:

1. `haproxy_ln.begin_batch(epoch, node, from, to)` runs `check_fence`,
   which locks the fence row: a fence above the writer's epoch aborts
   everything with SQLSTATE HL001 (StaleEpoch), a lower one is raised to the
   writer's epoch. Then it moves the replica position, failing with HL003
   unless it still is where this writer left it;
2. each record's changes in order: DDL (each statement as
   `replay_statements` makes it, as the role and under the search_path and
   the date and time settings the client ran it with), rows, truncates;
3. the records appended to `haproxy_ln.txlog`.

Records ending at or below the position were applied before (the slot
resends after a restart) and are skipped. A batch with DDL runs in an
explicit transaction, one pipeline per stretch between DDL statements,
because the statements after a DDL are built from the replica's catalog as
the DDL leaves it.

Row statements are prepared once per shape (table, operation, columns) and
named, so the server parses and plans each shape once per session; a DDL
or an error forgets them (they are closed at the next batch). Values
arrive in PostgreSQL's text format and are bound as text parameters cast
`$n::T`, T being the column's exact type (with typmod) on the replica:
PostgreSQL's own apply parses values the same way, with the type's input
function. Rows are found by their key: by equality when the key is the
table's primary key (or replica identity index), otherwise (REPLICA
IDENTITY FULL) by comparing each old value in its output text and touching
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

from haproxy_ln.errors import ReplicationError, ServerError, StaleEpoch
from haproxy_ln.pgwire import messages
from haproxy_ln.pgwire.messages import BYTEA_OID, TEXT_OID
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
from haproxy_ln.replicator.pgclient import PgConnection
from haproxy_ln.store.schema import POSITION_MOVED, SCHEMA, STALE_EPOCH
from haproxy_ln.store.statements import added_if_missing, replay_statements

log = logging.getLogger(__name__)


def _raise_if_stale(sqlstate: str | None, detail: str | None, epoch: int) -> None:
    """Raise StaleEpoch (logged) if the error is check_fence refusing `epoch`."""
    if sqlstate == STALE_EPOCH:
        fence = int(detail or 0)
        log.error("replica store refused epoch %d: fenced at %d", epoch, fence)
        raise StaleEpoch(epoch, fence) from None


async def raise_fence(conn: asyncpg.Connection, epoch: int, node: str) -> None:
    """In the current transaction: lock the fence, refuse a lower epoch with
    StaleEpoch, raise the fence to `epoch`."""
    try:
        await conn.execute(f"SELECT {SCHEMA}.check_fence($1, $2)", epoch, node)
    except asyncpg.PostgresError as e:
        _raise_if_stale(e.sqlstate, getattr(e, "detail", None), epoch)
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
 WHERE a.attrelid = :table::regclass AND a.attnum > 0 AND NOT a.attisdropped
"""


MAX_PREPARED = 1000  # statements kept per session; beyond, all are closed and made anew
_BEGIN_SQL = f"SELECT {SCHEMA}.begin_batch($1::bigint, $2, $3::pg_lsn, $4::pg_lsn)"
_TXLOG_SQL = (
    f"INSERT INTO {SCHEMA}.txlog (source_node, epoch, commit_lsn, end_lsn, xid, commit_time, "
    "tables, record) VALUES ($1, $2::bigint, $3::pg_lsn, $4::pg_lsn, $5::bigint, "
    "timestamptz 'epoch' + $6::bigint * interval '1 microsecond', $7::text[], $8)"
)
_TXLOG_BINARY = (False,) * 7 + (True,)  # the record goes as raw bytea


@dataclass(frozen=True, slots=True)
class _RowPlan:
    """How rows of one shape are applied: the statement, and the positions of the
    row's new values, then of its key values, that it binds."""

    sql: str
    values: tuple[int, ...]
    keys: tuple[int, ...]


def _encoded(value: str | None) -> bytes | None:
    return None if value is None else value.encode()


def _text(value: object) -> bytes:
    return str(value).encode()


def _lsn(lsn: int) -> bytes:
    return format_lsn(lsn).encode()


def _text_array(items: Sequence[str]) -> bytes:
    r"""A text[] literal: every element quoted, `\` and `"` escaped."""
    quoted = ('"' + i.replace("\\", "\\\\").replace('"', '\\"') + '"' for i in items)
    return ("{" + ",".join(quoted) + "}").encode()


class Applier:
    """Applies batches of records over one replica-store connection.

    The connection runs with search_path = pg_catalog, so that the type
    names the catalog gives are qualified and mean the same everywhere.
    """

    def __init__(self, conn: PgConnection, epoch: int, node: str) -> None:
        self.conn = conn
        self.epoch = epoch
        self.node = node
        self.position: int | None = None
        self._shapes: dict[tuple[str, str], TableShape] = {}
        self._plans: dict[tuple[object, ...], _RowPlan] = {}
        # statement SQL -> its name on the server; names are never reused, so a
        # statement forgotten here (closed at the next batch) cannot be mistaken.
        self._prepared: dict[str, bytes] = {}
        self._to_close: list[bytes] = []
        self._names = 0

    async def check_fence(self) -> None:
        """Raises StaleEpoch when the store is fenced above our epoch."""
        rows = await self.conn.query(f"SELECT epoch FROM {SCHEMA}.fence")
        fence = int(rows[0][0] or 0) if rows else None
        if fence is not None and fence > self.epoch:
            log.error("replica store refuses epoch %d: fenced at %d", self.epoch, fence)
            raise StaleEpoch(self.epoch, fence)

    async def load_position(self) -> int:
        """The replica position stored in the replica state.

        Raises ReplicationError when the store has none (it was never seeded).
        """
        rows = await self.conn.query(f"SELECT source_lsn::text FROM {SCHEMA}.replica_state")
        if not rows or rows[0][0] is None:
            raise ReplicationError("the replica store has no replica_state: seed it first")
        self.position = parse_lsn(rows[0][0])
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
                await self._apply_segmented(fresh, position)
            else:
                pipeline = self._start(fresh, position)
                for record in fresh:
                    for change in record.changes:
                        pipeline += await self._change(change)
                pipeline += self._txlog(fresh)
                await self.conn.run(pipeline)
        except ServerError as e:
            self._forget()
            _raise_if_stale(e.sqlstate, e.detail, self.epoch)
            if e.sqlstate == POSITION_MOVED:
                raise ReplicationError(f"replica store: {e}") from None
            raise ReplicationError(f"applying to the replica store failed: {e}") from e
        except BaseException:
            self._forget()
            raise
        self.position = fresh[-1].end_lsn
        return self.position

    def _forget(self) -> None:
        """After an error: nothing cached may be trusted, the position included."""
        self._forget_catalog()
        self.position = None

    def _forget_catalog(self) -> None:
        """After DDL: tables may have changed, and the statements made for them."""
        self._shapes.clear()
        self._plans.clear()
        self._forget_statements()

    def _forget_statements(self) -> None:
        self._to_close.extend(self._prepared.values())
        self._prepared.clear()

    def _start(self, records: Sequence[Record], position: int) -> bytearray:
        """A new pipeline: the closing of forgotten statements, then begin_batch, which
        moves the replica position from `position` to the end of `records`."""
        pipeline = bytearray().join(messages.close_statement(n) for n in self._to_close)
        self._to_close.clear()
        params = [_text(self.epoch), self.node.encode(), _lsn(position), _lsn(records[-1].end_lsn)]
        pipeline += self._execute(_BEGIN_SQL, params)
        return pipeline

    def _execute(
        self,
        sql: str,
        params: Sequence[bytes | None] = (),
        binary: Sequence[bool] = (),
    ) -> bytes:
        """Messages that run `sql` with `params`, preparing it on first use."""
        name = self._prepared.get(sql)
        parse = b""
        if name is None:
            if len(self._prepared) >= MAX_PREPARED:
                self._forget_statements()
            self._names += 1
            name = self._prepared[sql] = b"hl%d" % self._names
            types = [BYTEA_OID if b else TEXT_OID for b in binary] or [TEXT_OID] * len(params)
            parse = messages.parse(name, sql, types)
        return parse + messages.bind_execute(name, params, binary)

    async def _apply_segmented(self, records: Sequence[Record], position: int) -> None:
        await self.conn.query("BEGIN")
        try:
            pipeline = self._start(records, position)
            for record in records:
                for change in record.changes:
                    if isinstance(change, Ddl):
                        await self.conn.run(pipeline)
                        pipeline = bytearray()
                        await self._apply_ddl(change)
                    else:
                        pipeline += await self._change(change)
            pipeline += self._txlog(records)
            await self.conn.run(pipeline)
        except ServerError:  # the server is ready for more: end the transaction now
            await self.conn.query("ROLLBACK")
            raise
        await self.conn.query("COMMIT")

    async def _apply_ddl(self, ddl: Ddl) -> None:
        self._forget_catalog()
        path = ", ".join(quote_ident(s) for s in ddl.search_path) or "pg_catalog"
        client = dict(ddl.settings)
        role = [f"SET LOCAL ROLE {quote_ident(client[ROLE])}"] if ROLE in client else []
        await self.conn.query(
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
            await self.conn.query(statement)
        await self.conn.query(
            ";\n".join(
                ["SET LOCAL search_path = pg_catalog", "SET LOCAL ROLE NONE"]
                + [f"SET LOCAL {n} = {quote_literal(TEXT_SETTINGS[n])}" for n in REPLAY_SETTINGS]
            )
        )

    async def _existing_columns(self, sql: str) -> set[tuple[str, str]]:
        """The (relation, column) of ADD COLUMN IF NOT EXISTS in `sql` that exist already."""
        out = set()
        for relation, column in added_if_missing(sql):
            rows = await self.conn.query(
                "SELECT EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = "
                f"to_regclass({quote_literal(relation)}) AND attname = {quote_literal(column)} "
                "AND attnum > 0 AND NOT attisdropped)"
            )
            if rows[0][0] == "t":
                out.add((relation, column))
        return out

    def _txlog(self, records: Sequence[Record]) -> bytes:
        return b"".join(
            self._execute(
                _TXLOG_SQL,
                [
                    r.source_node.encode(),
                    _text(r.epoch),
                    _lsn(r.commit_lsn),
                    _lsn(r.end_lsn),
                    _text(r.xid),
                    _text(r.commit_time),
                    _text_array(r.tables()),
                    r.pack(),
                ],
                _TXLOG_BINARY,
            )
            for r in records
            if r.changes
        )

    async def _shape(self, schema: str, table: str) -> TableShape:
        shape = self._shapes.get((schema, table))
        if shape is None:
            name = quote_literal(f"{quote_ident(schema)}.{quote_ident(table)}")
            rows = await self.conn.query(_SHAPE_SQL.replace(":table", name))
            shape = TableShape(
                {str(r[0]): str(r[1]) for r in rows},
                frozenset(str(r[0]) for r in rows if r[2] == "t"),
                frozenset(str(r[0]) for r in rows if r[3] == "t"),
            )
            self._shapes[(schema, table)] = shape
        return shape

    async def _change(self, change: Change) -> bytes:
        if isinstance(change, TruncateTables):
            names = ", ".join(f"{quote_ident(s)}.{quote_ident(t)}" for s, t in change.tables)
            restart = " RESTART IDENTITY" if change.restart_identity else ""
            cascade = " CASCADE" if change.cascade else ""
            return self._execute(f"TRUNCATE ONLY {names}{restart}{cascade}")
        assert isinstance(change, Row)
        return await self._row(change)

    async def _row(self, row: Row) -> bytes:
        nulls = tuple(v is None for v in row.key_values)
        shape = (row.schema, row.table, row.op, row.columns, row.key_columns, nulls)
        plan = self._plans.get(shape)
        if plan is None:
            plan = self._plans[shape] = await self._plan(row)
        values, keys = row.values, row.key_values
        params = [_encoded(values[i]) for i in plan.values]
        params += [_encoded(keys[i]) for i in plan.keys]
        return self._execute(plan.sql, params)

    async def _plan(self, row: Row) -> _RowPlan:
        """The statement for rows shaped like `row`; raises ReplicationError when the
        replica's table lacks a column of it."""
        shape = await self._shape(row.schema, row.table)
        name = f"{quote_ident(row.schema)}.{quote_ident(row.table)}"
        missing = set(row.columns + row.key_columns) - shape.types.keys()
        if missing:
            raise ReplicationError(f"{name} on the replica lacks columns {sorted(missing)}")
        values: list[int] = []  # new values bound, then key values
        keys: list[int] = []

        def value(i: int) -> str:
            values.append(i)
            return f"${len(values)}::{shape.types[row.columns[i]]}"

        def key(i: int, typed: bool = True) -> str:
            keys.append(i)
            number = f"${len(values) + len(keys)}"
            return f"{number}::{shape.types[row.key_columns[i]]}" if typed else number

        if row.op is Op.DELETE and not row.key_columns:
            return _RowPlan(f"DELETE FROM ONLY {name}", (), ())
        if row.op is Op.INSERT:
            cols = ", ".join(quote_ident(c) for c in row.columns)
            vals = ", ".join(value(i) for i in range(len(row.columns)))
            sql = f"INSERT INTO {name} ({cols}) OVERRIDING SYSTEM VALUE VALUES ({vals})"
            return _RowPlan(sql, tuple(values), ())
        sets = ""
        if row.op is Op.UPDATE:
            sets = ", ".join(
                f"{quote_ident(c)} = {value(i)}"
                for i, c in enumerate(row.columns)
                if c not in shape.identity_always
            ) or ", ".join(f"{quote_ident(c)} = {quote_ident(c)}" for c in row.key_columns[:1])
        if shape.key and shape.key == set(row.key_columns):
            where = " AND ".join(
                f"{quote_ident(c)} = {key(i)}" for i, c in enumerate(row.key_columns)
            )
        else:  # no usable key: compare every old value as text, touch one row only
            # format('%s') prints with the type's output function, as pgoutput did.
            same = " AND ".join(
                f"{quote_ident(c)} IS NULL"
                if row.key_values[i] is None
                else f"format('%s', {quote_ident(c)}) = {key(i, typed=False)}"
                for i, c in enumerate(row.key_columns)
            )
            where = f"ctid = (SELECT ctid FROM {name} WHERE {same} LIMIT 1)"
        if row.op is Op.UPDATE:
            action = f"UPDATE {name} SET {sets} WHERE {where}"
        else:
            action = f"DELETE FROM {name} WHERE {where}"
        what = quote_literal(f"{row.op.name} on {row.schema}.{row.table}")
        return _RowPlan(
            f"WITH c AS ({action} RETURNING 1) SELECT {SCHEMA}.expect_one(count(*), {what}) FROM c",
            tuple(values),
            tuple(keys),
        )

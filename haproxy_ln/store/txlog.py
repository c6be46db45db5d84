"""Reading the txlog: what the replica store applied, one line per source transaction.

`read` (asyncio side of the bridge) selects records by commit time and
table; `describe` turns one into text: a summary line, and with `changes`
one line per change with its values.
"""

from __future__ import annotations

from datetime import datetime

import asyncpg

from haproxy_ln.replication.record import Ddl, Op, Record, Row, TruncateTables
from haproxy_ln.replication.stream import format_lsn
from haproxy_ln.store.schema import SCHEMA

_MAX_VALUE = 60


async def read(
    conn: asyncpg.Connection,
    *,
    since: str | None,
    until: str | None,
    table: str | None,
    limit: int,
) -> list[tuple[datetime, Record]]:
    """Records (oldest first) committed in [since, until) that touch `table`
    (schema.table, or a bare name for any schema)."""
    rows = await conn.fetch(
        f"SELECT commit_time, record FROM {SCHEMA}.txlog "
        "WHERE ($1::text IS NULL OR commit_time >= $1::text::timestamptz) "
        "AND ($2::text IS NULL OR commit_time < $2::text::timestamptz) "
        "AND ($3::text IS NULL OR $3 = ANY (tables) OR EXISTS "
        "(SELECT 1 FROM unnest(tables) t WHERE split_part(t, '.', 2) = $3)) "
        "ORDER BY id DESC LIMIT $4",
        since,
        until,
        table,
        limit,
    )
    return [(r[0], Record.unpack(r[1])) for r in reversed(rows)]


def _value(v: str | None) -> str:
    if v is None:
        return "NULL"
    text = v if len(v) <= _MAX_VALUE else v[: _MAX_VALUE - 3] + "..."
    return "'" + text.replace("'", "''") + "'"


def _pairs(columns: tuple[str, ...], values: tuple[str | None, ...]) -> str:
    return ", ".join(f"{c}={_value(v)}" for c, v in zip(columns, values, strict=True))


def describe(commit_time: datetime, record: Record, *, changes: bool) -> list[str]:
    counts: dict[str, list[int]] = {}
    lines = []
    for c in record.changes:
        if isinstance(c, Ddl):
            lines.append(f"    DDL {' '.join(c.sql.split())[:200]}")
        elif isinstance(c, TruncateTables):
            lines.append("    TRUNCATE " + ", ".join(f"{s}.{t}" for s, t in c.tables))
        else:
            assert isinstance(c, Row)
            slot = {Op.INSERT: 0, Op.UPDATE: 1, Op.DELETE: 2}[c.op]
            counts.setdefault(f"{c.schema}.{c.table}", [0, 0, 0])[slot] += 1
            where = f" WHERE {_pairs(c.key_columns, c.key_values)}" if c.key_columns else ""
            values = f" ({_pairs(c.columns, c.values)})" if c.columns else ""
            lines.append(f"    {c.op.name} {c.schema}.{c.table}{values}{where}")
    summary = " ".join(f"{t}(+{i} ~{u} -{d})" for t, (i, u, d) in counts.items())
    ddl = " +DDL" if any(isinstance(c, Ddl) for c in record.changes) else ""
    head = (
        f"{commit_time.isoformat(sep=' ', timespec='milliseconds')}  "
        f"lsn {format_lsn(record.commit_lsn)}  xid {record.xid}  epoch {record.epoch}  "
        f"from {record.source_node}  {summary}{ddl}"
    )
    return [head, *lines] if changes else [head]

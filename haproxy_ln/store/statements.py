"""SQL scripts as statements, parsed by PostgreSQL's own parser (libpg_query via pglast)."""

from __future__ import annotations

import pglast
from pglast import ast
from pglast.stream import RawStream

from haproxy_ln.errors import ReplicationError


def split(sql: str) -> list[tuple[ast.Node, str]]:
    """Each statement of `sql` with its text. Raises ReplicationError if it does not parse."""
    try:
        parsed = pglast.parse_sql(sql)
    except pglast.parser.ParseError as e:
        raise ReplicationError(f"cannot parse SQL: {e}") from e
    out = []
    for raw in parsed:  # pglast gives locations in characters of `sql`
        start = raw.stmt_location or 0
        end = start + raw.stmt_len if raw.stmt_len else len(sql)
        out.append((raw.stmt, sql[start:end].strip()))
    return out


# Statements whose effects reach the replica as rows, or do not belong there.
_NOT_SCHEMA = (
    ast.InsertStmt,
    ast.UpdateStmt,
    ast.DeleteStmt,
    ast.CopyStmt,
    ast.TransactionStmt,
    ast.VariableSetStmt,
    ast.VariableShowStmt,
    ast.ExplainStmt,
    ast.PrepareStmt,
    ast.ExecuteStmt,
    ast.DeallocateStmt,
    ast.NotifyStmt,
    ast.ListenStmt,
    ast.UnlistenStmt,
    ast.LockStmt,
    ast.VacuumStmt,
    ast.CheckPointStmt,
    ast.DiscardStmt,
    ast.CallStmt,
)


def ddl_statements(sql: str) -> list[str]:
    """The schema statements of a client's query text, in order.

    The event trigger sends the whole text of the query that ran DDL; it
    may also hold DML, transaction control or session settings, whose
    effects arrive as rows (or do not belong on the replica): those are
    dropped. SELECT ... INTO creates a table and is kept. CONCURRENTLY is
    removed from index statements, since the batch runs in a transaction.
    CREATE TABLE ... AS becomes WITH NO DATA: its rows arrive in the stream.
    Raises ReplicationError if the text does not parse.
    """
    kept = []
    for stmt, text in split(sql):
        if isinstance(stmt, _NOT_SCHEMA):
            continue
        if isinstance(stmt, ast.SelectStmt) and stmt.intoClause is None:
            continue
        if isinstance(stmt, (ast.IndexStmt, ast.DropStmt)) and stmt.concurrent:
            kept.append(RawStream()(_with(stmt, concurrent=False)))
        elif isinstance(stmt, ast.CreateTableAsStmt) and stmt.into is not None:
            into = _with(stmt.into, skipData=True)
            kept.append(RawStream()(_with(stmt, into=into)))
        else:
            kept.append(text)
    return kept


def _with(node: ast.Node, **changes: object) -> ast.Node:
    """A copy of `node` with some fields changed."""
    values = node(depth=None, skip_none=True)
    values.update(
        {
            k: v(depth=None, skip_none=True) if isinstance(v, ast.Node) else v
            for k, v in changes.items()
        }
    )
    return type(node)(values)


def created_with_rows(sql: str) -> set[str]:
    """Names of the tables that CREATE TABLE ... AS statements in `sql` create.

    Their rows reach the stream before the statement's DDL message (the
    trigger fires at the end of the command), so the applier creates such a
    table, empty, before its first row.
    """
    return {
        stmt.into.rel.relname
        for stmt, _ in split(sql)
        if isinstance(stmt, ast.CreateTableAsStmt) and stmt.into is not None
    }

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
    data = sql.encode()  # locations count bytes
    out = []
    for raw in parsed:
        start = raw.stmt_location or 0
        end = start + raw.stmt_len if raw.stmt_len else len(data)
        out.append((raw.stmt, data[start:end].decode().strip()))
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
    Raises ReplicationError if the text does not parse.
    """
    kept = []
    for stmt, text in split(sql):
        if isinstance(stmt, _NOT_SCHEMA):
            continue
        if isinstance(stmt, ast.SelectStmt) and stmt.intoClause is None:
            continue
        if isinstance(stmt, (ast.IndexStmt, ast.DropStmt)) and stmt.concurrent:
            kept.append(RawStream()(_without_concurrently(stmt)))
        else:
            kept.append(text)
    return kept


def _without_concurrently(stmt: ast.IndexStmt | ast.DropStmt) -> ast.Node:
    values = stmt(depth=None, skip_none=True)
    values["concurrent"] = False
    return type(stmt)(values)

"""SQL statements, parsed by PostgreSQL's own parser (libpg_query via pglast).

How DDL is replayed: PostgreSQL reports every DDL command it runs to our
event trigger (ddl_command_end), which emits its command tag, numbered
within the client's statement, along with the statement's text. `match`
pairs those commands with the DDL statements of the text, in order, and
says which statement each command replays; it refuses (DdlNotReplayable)
whenever the pairing is not certain: DDL that ran inside code (a DO block
with control flow, a function, procedure or trigger) cannot be replayed
without running the code's other statements on the replica too. A DO block
whose body is straight-line (no branches, loops, exception handlers, dynamic
SQL or early exits) runs each of its statements exactly once, so its DDL
statements pair like those of the text itself.

`replay_statements` turns one statement into what the replica runs (see
its doc). Everything here is pure.
"""

from __future__ import annotations

import copy
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

import pglast
from pglast import ast
from pglast.enums import AlterTableType, ConstrType, ObjectType, TransactionStmtKind
from pglast.stream import RawStream

from haproxy_ln.errors import ReplicationError, SetupError


class DdlNotReplayable(SetupError):
    """DDL ran in a way the replica cannot repeat exactly; the message says why."""


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


# -- which statements PostgreSQL reports to event triggers ---------------------

# Statements PostgreSQL 15 runs without event triggers (utility.c runs them in
# standard_ProcessUtility, not ProcessUtilitySlow), and queries.
_NEVER_REPORTED = (
    ast.TransactionStmt,
    ast.DeclareCursorStmt,
    ast.ClosePortalStmt,
    ast.FetchStmt,
    ast.DoStmt,
    ast.CreateTableSpaceStmt,
    ast.DropTableSpaceStmt,
    ast.AlterTableSpaceOptionsStmt,
    ast.TruncateStmt,
    ast.CopyStmt,
    ast.PrepareStmt,
    ast.ExecuteStmt,
    ast.DeallocateStmt,
    ast.GrantRoleStmt,
    ast.CreatedbStmt,
    ast.AlterDatabaseStmt,
    ast.AlterDatabaseRefreshCollStmt,
    ast.AlterDatabaseSetStmt,
    ast.DropdbStmt,
    ast.NotifyStmt,
    ast.ListenStmt,
    ast.UnlistenStmt,
    ast.LoadStmt,
    ast.CallStmt,
    ast.ClusterStmt,
    ast.VacuumStmt,
    ast.ExplainStmt,
    ast.AlterSystemStmt,
    ast.VariableSetStmt,
    ast.VariableShowStmt,
    ast.DiscardStmt,
    ast.CreateEventTrigStmt,
    ast.AlterEventTrigStmt,
    ast.CreateRoleStmt,
    ast.AlterRoleStmt,
    ast.AlterRoleSetStmt,
    ast.DropRoleStmt,
    ast.ReassignOwnedStmt,
    ast.LockStmt,
    ast.ConstraintsSetStmt,
    ast.CheckPointStmt,
    ast.ReindexStmt,
    ast.InsertStmt,
    ast.UpdateStmt,
    ast.DeleteStmt,
    ast.MergeStmt,
)
# Global objects and event triggers: statements on them are not reported either.
_UNREPORTED_OBJECTS = {
    ObjectType.OBJECT_DATABASE,
    ObjectType.OBJECT_TABLESPACE,
    ObjectType.OBJECT_ROLE,
    ObjectType.OBJECT_PARAMETER_ACL,
    ObjectType.OBJECT_EVENT_TRIGGER,
}
# Statement type -> the field naming the kind of object it acts on.
_OBJECT_FIELD = {
    ast.GrantStmt: "objtype",
    ast.DropStmt: "removeType",
    ast.RenameStmt: "renameType",
    ast.AlterObjectDependsStmt: "objectType",
    ast.AlterObjectSchemaStmt: "objectType",
    ast.AlterOwnerStmt: "objectType",
    ast.CommentStmt: "objtype",
    ast.SecLabelStmt: "objtype",
}


def reported(stmt: ast.Node) -> bool:
    """Whether PostgreSQL runs ddl_command_end event triggers for `stmt` (once)."""
    if isinstance(stmt, ast.SelectStmt):
        return _select_into(stmt) is not None  # SELECT ... INTO creates a table
    if isinstance(stmt, _NEVER_REPORTED):
        return False
    field = _OBJECT_FIELD.get(type(stmt))
    return field is None or getattr(stmt, field) not in _UNREPORTED_OBJECTS


# -- pairing PostgreSQL's DDL commands with the statements of the text ---------


@dataclass(frozen=True, slots=True)
class Command:
    """A statement of the client's text that PostgreSQL reports as a DDL command."""

    text: str
    keyword: str  # its first word, which is also the first word of its command tag
    # CREATE/ALTER EXTENSION: the commands of the extension's script are reported
    # first (with other tags), then the statement itself with this tag.
    extension_tag: str | None = None


@dataclass(frozen=True, slots=True)
class Script:
    """What a client's query text runs, as far as DDL goes."""

    commands: tuple[Command, ...]
    code: tuple[str, ...]  # first words of statements that run code which may run DDL
    # A transaction ends (or rolls back to a savepoint) between two of its statements:
    # the numbering of commands restarts there, so commands cannot be paired.
    ends_transaction_midway: bool


_TRANSACTION_ENDS = {
    TransactionStmtKind.TRANS_STMT_COMMIT,
    TransactionStmtKind.TRANS_STMT_ROLLBACK,
    TransactionStmtKind.TRANS_STMT_ROLLBACK_TO,
    TransactionStmtKind.TRANS_STMT_PREPARE,
    TransactionStmtKind.TRANS_STMT_COMMIT_PREPARED,
    TransactionStmtKind.TRANS_STMT_ROLLBACK_PREPARED,
}
# Statements that run no user code, so cannot run DDL unseen.
_INERT = (
    ast.TransactionStmt,
    ast.VariableSetStmt,
    ast.VariableShowStmt,
    ast.DiscardStmt,
    ast.LockStmt,
    ast.ListenStmt,
    ast.UnlistenStmt,
    ast.NotifyStmt,
    ast.DeallocateStmt,
    ast.PrepareStmt,
    ast.CheckPointStmt,
)


def script(sql: str) -> Script:
    """The DDL commands of `sql` in order, straight-line DO blocks opened.

    Raises ReplicationError if it does not parse.
    """
    commands: list[Command] = []
    code: list[str] = []
    ended = midway = False
    for stmt, text in _statements(sql):
        if isinstance(stmt, ast.TransactionStmt):
            ended = ended or stmt.kind in _TRANSACTION_ENDS
            continue
        midway = midway or ended
        if reported(stmt):
            extension = {ast.CreateExtensionStmt: "CREATE EXTENSION"}.get(type(stmt))
            if isinstance(stmt, ast.AlterExtensionStmt):
                extension = "ALTER EXTENSION"
            commands.append(Command(text, _first_word(text), extension))
        elif not isinstance(stmt, _INERT):
            code.append(_first_word(text))
    return Script(tuple(commands), tuple(dict.fromkeys(code)), midway)


def _statements(sql: str) -> list[tuple[ast.Node, str]]:
    """The statements of `sql`, those of straight-line PL/pgSQL DO blocks in their place."""
    out: list[tuple[ast.Node, str]] = []
    for stmt, text in split(sql):
        body = _straight_line_body(stmt) if isinstance(stmt, ast.DoStmt) else None
        if body is None:
            out.append((stmt, text))
        else:
            for inner in body:
                out.extend(_statements(inner))
    return out


def _straight_line_body(do: ast.DoStmt) -> list[str] | None:
    """The SQL statements of a PL/pgSQL DO block that runs each exactly once, in order;
    None for any other block (or language)."""
    options = {d.defname: d.arg.sval for d in do.args or () if isinstance(d.arg, ast.String)}
    if options.get("language", "plpgsql").lower() != "plpgsql" or "as" not in options:
        return None
    body = options["as"]
    tag = "$haproxy_ln_body$"
    while tag in body:
        tag = tag[:-1] + "_$"
    try:
        parsed = pglast.parse_plpgsql(
            f"CREATE FUNCTION f() RETURNS void LANGUAGE plpgsql AS {tag}{body}{tag}"
        )
    except pglast.parser.ParseError:
        return None
    out: list[str] = []
    return out if _collect(parsed[0]["PLpgSQL_function"]["action"], out, last=True) else None


# Statements that run once, in order, and never end the block early nor hide
# what they run (an expression may call a function that runs DDL: then PostgreSQL
# reports more commands than the text has, and the pairing fails).
_PASS_THROUGH = {
    "PLpgSQL_stmt_raise",
    "PLpgSQL_stmt_assign",
    "PLpgSQL_stmt_perform",
    "PLpgSQL_stmt_assert",
    "PLpgSQL_stmt_getdiag",
}


def _collect(node: dict[str, Any], out: list[str], *, last: bool) -> bool:
    """Append the SQL of the block `node` to `out`; False if it is not straight-line."""
    ((kind, body),) = node.items()
    if kind != "PLpgSQL_stmt_block" or body.get("exceptions"):
        return False
    statements = body.get("body", [])
    for i, statement in enumerate(statements):
        ((inner_kind, inner),) = statement.items()
        if inner_kind == "PLpgSQL_stmt_block":
            if not _collect(statement, out, last=False):
                return False
        elif inner_kind == "PLpgSQL_stmt_execsql":
            if not inner.get("into"):  # SELECT ... INTO a variable is a query
                out.append(inner["sqlstmt"]["PLpgSQL_expr"]["query"])
        elif inner_kind == "PLpgSQL_stmt_return":
            if not (last and i == len(statements) - 1):
                return False
        elif inner_kind not in _PASS_THROUGH:
            return False
    return True


def _first_word(text: str) -> str:
    """The first keyword of a statement, after comments."""
    for token in pglast.parser.scan(text):
        if token.name not in ("C_COMMENT", "SQL_COMMENT"):
            word = text[token.start : token.end + 1].upper()
            return "SELECT" if word in ("WITH", "(") else word
    return ""


def match(sql: str, tags: Sequence[str]) -> list[str | None]:
    """For each DDL command PostgreSQL reported for the client text `sql` (their
    command tags, in order), the statement of the text it replays, or None when it
    belongs to a statement replayed at a later command (an extension's script).

    Raises DdlNotReplayable when the commands are not the text's own DDL statements
    one for one, and ReplicationError if the text does not parse.
    """
    found = script(sql)
    if found.ends_transaction_midway:
        raise DdlNotReplayable(
            "its query text ends a transaction (or rolls back to a savepoint) between "
            "statements, so its DDL commands cannot be told apart"
        )
    out: list[str | None] = []
    for command in found.commands:
        if command.extension_tag is not None:
            while len(out) < len(tags) and tags[len(out)] != command.extension_tag:
                out.append(None)
        if len(out) >= len(tags) or tags[len(out)].split()[0] != command.keyword:
            break
        out.append(command.text)
    else:
        if len(out) == len(tags):
            return out
    raise DdlNotReplayable(_mismatch(found, tags))


def _mismatch(found: Script, tags: Sequence[str]) -> str:
    ran = ", ".join(tags) or "none"
    own = ", ".join(c.keyword for c in found.commands) or "none"
    inside = ", ".join(found.code) or "code"
    return (
        f"PostgreSQL ran the DDL commands [{ran}] but the query text's own DDL "
        f"statements are [{own}]: DDL ran inside {inside} (a DO block with control "
        "flow, a function, a procedure or a trigger), which the replica cannot "
        "replay without running that code's other statements a second time"
    )


# -- what the replica runs -----------------------------------------------------

# Statements whose effects reach the replica as rows, or do not belong there
# (only texts of version-1 records, which held a whole query text, contain them).
_NOT_SCHEMA = (
    ast.InsertStmt,
    ast.UpdateStmt,
    ast.DeleteStmt,
    ast.MergeStmt,
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


def replay_statements(
    sql: str,
    missing: Sequence[tuple[str, str]] = (),
    existing: Collection[tuple[str, str]] = (),
) -> list[str]:
    """What the replica runs for the DDL statement `sql`.

    - CONCURRENTLY goes (the batch runs in a transaction);
    - CREATE TABLE ... AS and SELECT ... INTO create the table WITH NO DATA:
      their rows arrive in the stream;
    - ADD COLUMN: `missing` holds the values that rows already in the table read
      in each new column on the primary ([column, attmissingval text]), computed
      there from the column's default once (now(), current_user, a literal read in
      the client's time zone): the replica adds the column with that value as a
      constant default, then sets the default the statement gave (or drops it).
      A column ADD COLUMN IF NOT EXISTS left alone because it existed (`existing`
      holds such (relation, column) pairs, see `added_if_missing`) is not touched.
      Raises DdlNotReplayable if a new column's tables read different values.
    - DML, transaction control and session statements, found only in the whole
      query texts of version-1 records, are dropped.

    Raises ReplicationError if `sql` does not parse.
    """
    kept: list[str] = []
    for stmt, text in split(sql):
        if isinstance(stmt, _NOT_SCHEMA):
            continue
        if isinstance(stmt, ast.SelectStmt) and _select_into(stmt) is None:
            continue
        kept.extend(_replay(stmt, text, missing, existing))
    return kept


def _replay(
    stmt: ast.Node,
    text: str,
    missing: Sequence[tuple[str, str]],
    existing: Collection[tuple[str, str]],
) -> list[str]:
    if isinstance(stmt, (ast.IndexStmt, ast.DropStmt)) and stmt.concurrent:
        return [_sql(_with(stmt, concurrent=False))]
    if isinstance(stmt, ast.CreateTableAsStmt) and stmt.objtype == ObjectType.OBJECT_TABLE:
        return [_sql(_with(stmt, into=_with(stmt.into, skipData=True)))]
    if isinstance(stmt, ast.SelectStmt):
        into, query = _select_into(stmt) or (None, stmt)
        assert into is not None
        return [_sql(_ctas_without_rows(into, query))]
    if isinstance(stmt, ast.AlterTableStmt) and stmt.objtype == ObjectType.OBJECT_TABLE:
        return _alter_table(stmt, text, missing, existing)
    return [text]


def _alter_table(
    stmt: ast.AlterTableStmt,
    text: str,
    missing: Sequence[tuple[str, str]],
    existing: Collection[tuple[str, str]],
) -> list[str]:
    values: dict[str, set[str]] = {}
    for name, value in missing:
        values.setdefault(name, set()).add(value)
    relation = _relation_name(stmt.relation)
    commands, after, changed = [], [], False
    for cmd in stmt.cmds or ():
        if isinstance(cmd.def_, ast.PartitionCmd) and cmd.def_.concurrent:
            cmd, changed = _with(cmd, def_=_with(cmd.def_, concurrent=False)), True
        column = cmd.def_ if isinstance(cmd.def_, ast.ColumnDef) else None
        if (
            cmd.subtype == AlterTableType.AT_AddColumn
            and column is not None
            and column.colname in values
            and not (cmd.missing_ok and (relation, column.colname) in existing)
        ):
            cmd, default = _with_constant_default(cmd, column, values[column.colname], relation)
            after.append(_set_default(stmt, column.colname, default))
            changed = True
        commands.append(cmd)
    if not changed:
        return [text]
    return [_sql(_with(stmt, cmds=commands)), *after]


def _with_constant_default(
    cmd: ast.AlterTableCmd, column: ast.ColumnDef, values: set[str], relation: str
) -> tuple[ast.AlterTableCmd, ast.Node | None]:
    """`cmd` adding `column` with the primary's value as its default, and the
    statement's own default expression (None if it gave none)."""
    if len(values) != 1:
        raise DdlNotReplayable(
            f"the tables of {relation} read different values in new column "
            f"{column.colname}: {sorted(values)}"
        )
    constant = ast.TypeCast(
        arg=ast.A_Const(val=ast.String(sval=_array_element(next(iter(values))))),
        typeName=column.typeName,
    )
    defaults = [c for c in column.constraints or () if c.contype == ConstrType.CONSTR_DEFAULT]
    others = [c for c in column.constraints or () if c.contype != ConstrType.CONSTR_DEFAULT]
    fixed = ast.Constraint(contype=ConstrType.CONSTR_DEFAULT, raw_expr=constant, location=-1)
    new_column = _with(column, constraints=[*others, fixed])
    return _with(cmd, def_=new_column), defaults[0].raw_expr if defaults else None


def _set_default(stmt: ast.AlterTableStmt, column: str, default: ast.Node | None) -> str:
    """ALTER TABLE (as `stmt` names the table) ALTER COLUMN SET DEFAULT / DROP DEFAULT."""
    cmd = ast.AlterTableCmd(
        subtype=AlterTableType.AT_ColumnDefault, name=column, def_=default, behavior=0
    )
    return _sql(_with(stmt, cmds=[cmd], missing_ok=False))


def added_if_missing(sql: str) -> list[tuple[str, str]]:
    """(relation, column) of each ADD COLUMN IF NOT EXISTS in the statements of `sql`."""
    return [
        (_relation_name(stmt.relation), cmd.def_.colname)
        for stmt, _ in split(sql)
        if isinstance(stmt, ast.AlterTableStmt)
        for cmd in stmt.cmds or ()
        if cmd.subtype == AlterTableType.AT_AddColumn
        and cmd.missing_ok
        and isinstance(cmd.def_, ast.ColumnDef)
    ]


def _relation_name(relation: ast.RangeVar) -> str:
    """The name of `relation` as SQL (without ONLY)."""
    return _sql(_with(relation, inh=True))


def _array_element(text: str) -> str:
    """The element of a one-element array in PostgreSQL's text form ({x} or {"x"})."""
    if len(text) < 2 or text[0] != "{" or text[-1] != "}":
        raise ReplicationError(f"not a one-element array: {text!r}")
    inner = text[1:-1]
    if not inner.startswith('"'):
        return inner
    out, i = [], 1
    while i < len(inner) - 1:
        if inner[i] == "\\":
            i += 1
        out.append(inner[i])
        i += 1
    return "".join(out)


def _select_into(stmt: ast.SelectStmt) -> tuple[ast.IntoClause, ast.SelectStmt] | None:
    """The INTO clause of SELECT ... INTO (in the leftmost SELECT of a set operation)
    and the statement without it; None for a SELECT without INTO."""
    if stmt.intoClause is not None:
        return stmt.intoClause, _with(stmt, intoClause=None)
    if stmt.larg is None:
        return None
    inner = _select_into(stmt.larg)
    return None if inner is None else (inner[0], _with(stmt, larg=inner[1]))


def _ctas_without_rows(into: ast.IntoClause, query: ast.SelectStmt) -> ast.Node:
    return ast.CreateTableAsStmt(
        query=query,
        into=_with(into, skipData=True),
        objtype=ObjectType.OBJECT_TABLE,
        is_select_into=False,
        if_not_exists=False,
    )


def _sql(node: ast.Node) -> str:
    text: str = RawStream()(node)
    return text


def _with(node: ast.Node, **changes: object) -> Any:
    """A copy of `node` with some fields changed."""
    copied = copy.deepcopy(node)
    for name, value in changes.items():
        setattr(copied, name, value)
    return copied

"""Replication records: one per source transaction, and how pgoutput becomes one.

How this works: `Assembler` is fed the decoded pgoutput messages of the
stream in order. It remembers relations (pgoutput sends a Relation message
before the first change of a table and again after its schema changes),
collects the changes between Begin and Commit, and at Commit returns one
`Record`. A record is self-contained: every change names its schema, table
and columns, so the txlog can be read and applied without the source's
catalog. Values stay in PostgreSQL's text format, which the replica parses
with each column's own input function, so they round-trip exactly.

DDL arrives as transactional logical messages from our event trigger
(store/schema.py): `haproxy_ln.ddl` once per DDL command PostgreSQL runs,
numbered within the client's statement, whose text comes with the first;
`haproxy_ln.rows` and `haproxy_ln.row` with every row of a table whose rows
the command computed anew (a table rewrite, which is not decoded). At Commit
the commands of each statement are paired with the statement's own DDL
statements (store/statements.py: `match`), each becoming a `Ddl` at its
place among the rows, because a migration's rows may need the table it
creates; DDL that cannot be paired (it ran inside code) stops replication
with DdlNotReplayable rather than let the replica diverge. A rewritten
table's rows become a keyless DELETE (every row) and INSERTs. CREATE TABLE
AS and SELECT ... INTO stream their rows before their command ends: their
Ddl moves to just before the first row of the table they created, told
apart from older tables of the same name by its OID (pgoutput's relation
id). Changes to our own schema `haproxy_ln` (fence, replica state, txlog)
are node-local and never replicated.

Wire format (msgpack, versioned): a map {v, epoch, source_node, commit_lsn,
end_lsn, xid, commit_time, changes}; commit_time is microseconds since the
Unix epoch; each change is an array whose first element says its kind:
["ddl", sql, search_path, settings, missing] · ["i", schema, table, columns, values] ·
["u", schema, table, columns, values, key_columns, key_values] ·
["d", schema, table, key_columns, key_values] (no key: every row) ·
["t", [[schema, table], ...], cascade, restart_identity]. Records written
before settings and missing existed end the ddl array after search_path.
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass
from typing import Any

import msgpack

from haproxy_ln.errors import ProtocolViolation, ReplicationError
from haproxy_ln.replication import pgoutput
from haproxy_ln.replication.stream import PG_EPOCH_OFFSET_US, format_lsn
from haproxy_ln.store.statements import DdlNotReplayable, match

FORMAT_VERSION = 1
# Session settings under which text values print and parse back identically,
# on the replication connection and on every store session alike.
TEXT_SETTINGS = {
    "DateStyle": "ISO",
    "IntervalStyle": "postgres",
    "TimeZone": "UTC",
    "extra_float_digits": "3",
    "bytea_output": "hex",
}
DDL_PREFIX = "haproxy_ln.ddl"
ROWS_PREFIX = "haproxy_ln.rows"  # a rewritten table: its name and columns
ROW_PREFIX = "haproxy_ln.row"  # one row of it
OWN_SCHEMA = "haproxy_ln"


class Op(enum.Enum):
    INSERT = "i"
    UPDATE = "u"
    DELETE = "d"


@dataclass(frozen=True, slots=True)
class Ddl:
    """One DDL statement as the client wrote it, and what its meaning depended on:
    the schemas its names resolved in, the client's settings that read literals
    (TimeZone, DateStyle, IntervalStyle) and its role (which owns what the
    statement creates), and for ADD COLUMN the values rows already there read
    in the new columns ([column, attmissingval text])."""

    sql: str
    search_path: tuple[str, ...]
    settings: tuple[tuple[str, str], ...] = ()
    missing: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class Row:
    """One row change. `columns`/`values` are the new values (unchanged TOAST
    columns left out); `key_columns`/`key_values` find the old row."""

    op: Op
    schema: str
    table: str
    columns: tuple[str, ...] = ()
    values: tuple[str | None, ...] = ()
    key_columns: tuple[str, ...] = ()
    key_values: tuple[str | None, ...] = ()


@dataclass(frozen=True, slots=True)
class TruncateTables:
    tables: tuple[tuple[str, str], ...]
    cascade: bool
    restart_identity: bool


Change = Ddl | Row | TruncateTables


@dataclass(frozen=True, slots=True)
class Record:
    epoch: int
    source_node: str
    commit_lsn: int
    end_lsn: int
    xid: int
    commit_time: int
    changes: tuple[Change, ...]

    @property
    def has_ddl(self) -> bool:
        """Whether the transaction changed the schema."""
        return any(isinstance(c, Ddl) for c in self.changes)

    def tables(self) -> list[str]:
        """Qualified names of the tables this record touches, in first-touch order."""
        names: dict[str, None] = {}
        for c in self.changes:
            if isinstance(c, Row):
                names[f"{c.schema}.{c.table}"] = None
            elif isinstance(c, TruncateTables):
                names.update((f"{s}.{t}", None) for s, t in c.tables)
        return list(names)

    def pack(self) -> bytes:
        packed: bytes = msgpack.packb(
            {
                "v": FORMAT_VERSION,
                "epoch": self.epoch,
                "source_node": self.source_node,
                "commit_lsn": self.commit_lsn,
                "end_lsn": self.end_lsn,
                "xid": self.xid,
                "commit_time": self.commit_time,
                "changes": [_pack_change(c) for c in self.changes],
            },
            use_bin_type=True,
        )
        return packed

    @classmethod
    def unpack(cls, data: bytes) -> Record:
        """Raises ProtocolViolation for data that is not a record of a known version."""
        try:
            m = msgpack.unpackb(data, raw=False)
            if m["v"] != FORMAT_VERSION:
                raise ProtocolViolation(f"txlog record version {m['v']} is not {FORMAT_VERSION}")
            return cls(
                int(m["epoch"]),
                str(m["source_node"]),
                int(m["commit_lsn"]),
                int(m["end_lsn"]),
                int(m["xid"]),
                int(m["commit_time"]),
                tuple(_unpack_change(c) for c in m["changes"]),
            )
        except (ValueError, KeyError, TypeError, IndexError, msgpack.UnpackException) as e:
            raise ProtocolViolation(f"malformed txlog record: {e}") from e


def _pack_change(c: Change) -> list[Any]:
    if isinstance(c, Ddl):
        pairs = [list(p) for p in c.settings], [list(m) for m in c.missing]
        return ["ddl", c.sql, list(c.search_path), *pairs]
    if isinstance(c, TruncateTables):
        return ["t", [list(t) for t in c.tables], c.cascade, c.restart_identity]
    head = [c.op.value, c.schema, c.table]
    if c.op is Op.INSERT:
        return [*head, list(c.columns), list(c.values)]
    if c.op is Op.UPDATE:
        return [*head, list(c.columns), list(c.values), list(c.key_columns), list(c.key_values)]
    return [*head, list(c.key_columns), list(c.key_values)]


def _unpack_change(c: list[Any]) -> Change:
    kind = c[0]
    if kind == "ddl":
        settings, missing = (c[3], c[4]) if len(c) > 3 else ([], [])
        return Ddl(
            str(c[1]),
            tuple(str(s) for s in c[2]),
            tuple((str(k), str(v)) for k, v in settings),
            tuple((str(k), str(v)) for k, v in missing),
        )
    if kind == "t":
        return TruncateTables(tuple((str(s), str(t)) for s, t in c[1]), bool(c[2]), bool(c[3]))
    op = Op(kind)
    if op is Op.INSERT:
        return Row(op, c[1], c[2], tuple(c[3]), tuple(c[4]))
    if op is Op.UPDATE:
        return Row(op, c[1], c[2], tuple(c[3]), tuple(c[4]), tuple(c[5]), tuple(c[6]))
    return Row(op, c[1], c[2], key_columns=tuple(c[3]), key_values=tuple(c[4]))


@dataclass(frozen=True, slots=True)
class _Statement:
    """A client statement that ran DDL, and the tags of its commands so far."""

    sql: str
    tags: list[str]


@dataclass(frozen=True, slots=True)
class _Command:
    """One DDL command our event trigger reported, before it is paired at Commit."""

    statement: _Statement
    n: int  # its number within the statement, from 1
    search_path: tuple[str, ...]
    temporary: bool  # acts on temporary objects only, which the replica has not
    created: frozenset[int]  # OIDs of the tables CREATE TABLE AS / SELECT INTO created
    settings: tuple[tuple[str, str], ...]
    missing: tuple[tuple[str, str], ...]


def _json(content: bytes, prefix: str) -> Any:
    try:
        return json.loads(content)
    except ValueError as e:
        raise ProtocolViolation(f"malformed {prefix} message: {e}") from e


def _command(m: Any, statement: _Statement | None) -> _Command | Ddl:
    """The command of our event trigger's message; a Ddl for the messages of older
    versions, which held the whole query text once per statement."""
    try:
        search_path = tuple(str(s) for s in m["search_path"])
        if "n" not in m:
            return Ddl(str(m["sql"]), search_path)
        n = int(m["n"])
        if n == 1:
            statement = _Statement(str(m["sql"]), [])
        elif statement is None or len(statement.tags) != n - 1:
            raise ProtocolViolation(f"{DDL_PREFIX} command {n} without command {n - 1}")
        statement.tags.append(str(m["tag"]))
        return _Command(
            statement,
            n,
            search_path,
            bool(m["temporary"]),
            frozenset(int(o) for o in m["created"]),
            tuple((str(k), str(v)) for k, v in m["settings"].items()),
            tuple((str(c), str(v)) for c, v in m["missing"] or ()),
        )
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ProtocolViolation(f"malformed {DDL_PREFIX} message: {e}") from e


def _present(
    names: tuple[str, ...], values: pgoutput.Tuple, keep: tuple[bool, ...] | None = None
) -> tuple[tuple[str, ...], tuple[str | None, ...]]:
    """The (names, values) of the columns that are kept (all when `keep` is None) and
    not unchanged TOAST."""
    if len(values) != len(names):
        raise ProtocolViolation(f"a change has {len(values)} values for {len(names)} columns")
    if keep is None:
        if pgoutput.UNCHANGED not in values:  # the common case, without a copy
            return names, values  # type: ignore[return-value]  # no Unchanged in it
        keep = (True,) * len(names)
    pairs = [
        (n, v)
        for n, v, k in zip(names, values, keep, strict=True)
        if k and not isinstance(v, pgoutput.Unchanged)
    ]
    return tuple(n for n, _ in pairs), tuple(v for _, v in pairs)


# What a transaction collects before Commit: a change, or a DDL command not yet
# paired with its statement; with the relation id of a row's table.
_Pending = tuple[Change | _Command, int | None]


class Assembler:
    """Turns the pgoutput messages of a stream into Records, one per transaction."""

    def __init__(self, epoch: int, source_node: str) -> None:
        self.epoch = epoch
        self.source_node = source_node
        # relid -> the relation, its column names, which columns are its key
        self._relations: dict[int, tuple[pgoutput.Relation, tuple[str, ...], tuple[bool, ...]]]
        self._relations = {}
        self._begin: pgoutput.Begin | None = None
        self._pending: list[_Pending] = []
        self._statement: _Statement | None = None  # of the last DDL command
        self._rewritten: tuple[str, str, tuple[str, ...]] | None = None  # rows arriving

    @property
    def in_transaction(self) -> bool:
        return self._begin is not None

    def feed(self, msg: pgoutput.PgOutputMessage) -> Record | None:
        """Take one message; returns the Record when it completes a transaction.

        Raises ProtocolViolation for changes outside a transaction, unknown
        relations, an update or delete that names no row, or malformed messages
        of our event trigger; DdlNotReplayable (at Commit) for DDL the replica
        cannot repeat exactly.
        """
        if isinstance(msg, pgoutput.Relation):
            names = tuple(c.name for c in msg.columns)
            self._relations[msg.relid] = (msg, names, tuple(c.is_key for c in msg.columns))
        elif isinstance(msg, pgoutput.Begin):
            if self._begin is not None:
                raise ProtocolViolation("Begin inside a transaction")
            self._begin, self._pending = msg, []
            self._statement = self._rewritten = None
        elif isinstance(msg, pgoutput.Commit):
            return self._commit(msg)
        elif isinstance(msg, (pgoutput.Type, pgoutput.Origin)):
            pass  # the replica's own catalog types the values; origins are not used
        elif isinstance(msg, pgoutput.Message):
            if msg.transactional:
                self._message(msg.prefix, msg.content)
        else:
            self._add_change(msg)
        return None

    def _add(self, change: Change | _Command, relid: int | None = None) -> None:
        if self._begin is None:
            raise ProtocolViolation(f"{type(change).__name__} outside a transaction")
        self._pending.append((change, relid))

    def _message(self, prefix: str, content: bytes) -> None:
        if prefix == ROW_PREFIX:
            if self._rewritten is None:
                raise ProtocolViolation(f"{ROW_PREFIX} message without {ROWS_PREFIX}")
            schema, table, columns = self._rewritten
            values = _json(content, prefix)
            if not isinstance(values, list) or len(values) != len(columns):
                raise ProtocolViolation(f"malformed {ROW_PREFIX} message for {schema}.{table}")
            self._add(Row(Op.INSERT, schema, table, columns, tuple(values)))
            return
        self._rewritten = None
        if prefix == DDL_PREFIX:
            command = _command(_json(content, prefix), self._statement)
            if isinstance(command, _Command):
                self._statement = command.statement
            self._add(command)
        elif prefix == ROWS_PREFIX:
            # A rewritten table: the replica's rows give way to the primary's.
            m = _json(content, prefix)
            try:
                head = (str(m["schema"]), str(m["table"]), tuple(str(c) for c in m["columns"]))
            except (KeyError, TypeError) as e:
                raise ProtocolViolation(f"malformed {ROWS_PREFIX} message: {e}") from e
            if head[0] == OWN_SCHEMA:  # node-local; our trigger never sends them
                raise ProtocolViolation(f"{ROWS_PREFIX} message for {head[0]}.{head[1]}")
            self._add(Row(Op.DELETE, head[0], head[1]))
            self._rewritten = head

    def _relation(self, relid: int) -> tuple[pgoutput.Relation, tuple[str, ...], tuple[bool, ...]]:
        try:
            return self._relations[relid]
        except KeyError:
            raise ProtocolViolation(f"change for relation {relid} before its Relation") from None

    def _add_change(
        self, msg: pgoutput.Insert | pgoutput.Update | pgoutput.Delete | pgoutput.Truncate
    ) -> None:
        self._rewritten = None
        if isinstance(msg, pgoutput.Truncate):
            rels = [self._relation(r)[0] for r in msg.relids]
            tables = tuple((r.namespace, r.name) for r in rels if r.namespace != OWN_SCHEMA)
            if tables:
                self._add(TruncateTables(tables, msg.cascade, msg.restart_identity))
            return
        rel, names, is_key = self._relation(msg.relid)
        if rel.namespace == OWN_SCHEMA:
            return
        if isinstance(msg, pgoutput.Insert):
            cols, vals = _present(names, msg.new)
            self._add(Row(Op.INSERT, rel.namespace, rel.name, cols, vals), rel.relid)
            return
        if msg.old is not None:
            key_cols, key_vals = _present(names, msg.old, None if msg.old_kind == "O" else is_key)
        elif isinstance(msg, pgoutput.Update):
            key_cols, key_vals = _present(names, msg.new, is_key)
        else:
            key_cols, key_vals = (), ()
        if not key_cols:
            raise ProtocolViolation(f"change to {rel.namespace}.{rel.name} names no row")
        if isinstance(msg, pgoutput.Update):
            cols, vals = _present(names, msg.new)
            row = Row(Op.UPDATE, rel.namespace, rel.name, cols, vals, key_cols, key_vals)
        else:
            row = Row(Op.DELETE, rel.namespace, rel.name, (), (), key_cols, key_vals)
        self._add(row, rel.relid)

    def _commit(self, msg: pgoutput.Commit) -> Record:
        begin = self._begin
        if begin is None:
            raise ProtocolViolation("Commit without Begin")
        self._begin = None
        pending, self._pending = self._pending, []
        self._statement = self._rewritten = None
        try:
            changes = _in_apply_order(pending)
        except DdlNotReplayable as e:
            raise DdlNotReplayable(
                f"transaction {begin.xid} (commit {format_lsn(msg.commit_lsn)}) ran DDL "
                f"that the replica cannot repeat exactly: {e}. Nothing of it was applied "
                "and replication stops here. Run DDL as plain statements, not inside DO "
                "blocks with control flow, functions, procedures or triggers (see "
                "docs/replication.md, DDL); to go on, reseed the replica store "
                "(haproxy-ln reseed) once the primary no longer waits for it"
            ) from None
        return Record(
            self.epoch,
            self.source_node,
            msg.commit_lsn,
            msg.end_lsn,
            begin.xid,
            msg.commit_time + PG_EPOCH_OFFSET_US,
            tuple(changes),
        )


def _in_apply_order(pending: list[_Pending]) -> list[Change]:
    """The changes of a transaction as the replica applies them: each DDL command
    replaced by the statement it replays (`match`), and each CREATE TABLE AS /
    SELECT INTO moved to just before the first row of the table it created.

    Raises DdlNotReplayable.
    """
    replays: dict[int, list[str | None]] = {}
    out: list[_Pending] = []
    moves: list[tuple[Ddl, frozenset[int]]] = []
    for item, relid in pending:
        if not isinstance(item, _Command):
            out.append((item, relid))
            continue
        if dict(item.settings).get("standard_conforming_strings") == "off":
            raise DdlNotReplayable(
                "it ran with standard_conforming_strings = off, under which its text "
                "cannot be read reliably"
            )
        key = id(item.statement)
        if key not in replays:
            replays[key] = _replays(item.statement)
        sql = replays[key][item.n - 1]
        if sql is not None and not item.temporary:
            ddl = Ddl(sql, item.search_path, item.settings, item.missing)
            out.append((ddl, None))
            if item.created:
                moves.append((ddl, item.created))
    for ddl, created in moves:
        _hoist(out, ddl, created)
    return [change for change, _ in out if not isinstance(change, _Command)]


def _replays(statement: _Statement) -> list[str | None]:
    try:
        return match(statement.sql, statement.tags)
    except DdlNotReplayable:
        raise
    except ReplicationError as e:  # the text does not parse
        raise DdlNotReplayable(str(e)) from None


def _hoist(out: list[_Pending], ddl: Ddl, created: frozenset[int]) -> None:
    """Move `ddl` to just before the first row of a table it created, if earlier."""
    at = next(i for i, (change, _) in enumerate(out) if change is ddl)
    first = next((i for i, (_, relid) in enumerate(out) if relid in created), at)
    if first < at:
        out.insert(first, out.pop(at))

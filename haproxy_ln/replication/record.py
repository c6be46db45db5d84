"""Replication records: one per source transaction, and how pgoutput becomes one.

How this works: `Assembler` is fed the decoded pgoutput messages of the
stream in order. It remembers relations (pgoutput sends a Relation message
before the first change of a table and again after its schema changes),
collects the changes between Begin and Commit, and at Commit returns one
`Record`. A record is self-contained: every change names its schema, table
and columns, so the txlog can be read and applied without the source's
catalog. Values stay in PostgreSQL's text format, which the replica parses
with each column's own input function, so they round-trip exactly.

DDL arrives as transactional logical messages with the prefix
`haproxy_ln.ddl` (emitted by our event trigger, with the schemas the
statement's unqualified names resolved in) and is kept in `changes`
at its place among the rows, because a migration's rows may need the table
it creates. Changes to our own schema `haproxy_ln` (fence, replica state,
txlog) are node-local and never replicated.

Wire format (msgpack, versioned): a map {v, epoch, source_node, commit_lsn,
end_lsn, xid, commit_time, changes}; commit_time is microseconds since the
Unix epoch; each change is an array whose first element says its kind:
["ddl", sql, search_path] · ["i", schema, table, columns, values] ·
["u", schema, table, columns, values, key_columns, key_values] ·
["d", schema, table, key_columns, key_values] ·
["t", [[schema, table], ...], cascade, restart_identity].
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass
from typing import Any

import msgpack

from haproxy_ln.errors import ProtocolViolation
from haproxy_ln.replication import pgoutput
from haproxy_ln.replication.stream import PG_EPOCH_OFFSET_US

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
OWN_SCHEMA = "haproxy_ln"


class Op(enum.Enum):
    INSERT = "i"
    UPDATE = "u"
    DELETE = "d"


@dataclass(frozen=True, slots=True)
class Ddl:
    """Schema change text as the client sent it, and the schemas its names resolved in."""

    sql: str
    search_path: tuple[str, ...]


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
        return ["ddl", c.sql, list(c.search_path)]
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
        return Ddl(str(c[1]), tuple(str(s) for s in c[2]))
    if kind == "t":
        return TruncateTables(tuple((str(s), str(t)) for s, t in c[1]), bool(c[2]), bool(c[3]))
    op = Op(kind)
    if op is Op.INSERT:
        return Row(op, c[1], c[2], tuple(c[3]), tuple(c[4]))
    if op is Op.UPDATE:
        return Row(op, c[1], c[2], tuple(c[3]), tuple(c[4]), tuple(c[5]), tuple(c[6]))
    return Row(op, c[1], c[2], key_columns=tuple(c[3]), key_values=tuple(c[4]))


def _ddl(content: bytes) -> Ddl:
    """The Ddl of our event trigger's message: JSON {"sql": ..., "search_path": [...]}."""
    try:
        m = json.loads(content)
        return Ddl(str(m["sql"]), tuple(str(s) for s in m["search_path"]))
    except (ValueError, KeyError, TypeError) as e:
        raise ProtocolViolation(f"malformed {DDL_PREFIX} message: {e}") from e


def _present(
    names: tuple[str, ...], values: pgoutput.Tuple, keep: tuple[bool, ...]
) -> tuple[tuple[str, ...], tuple[str | None, ...]]:
    """The (names, values) of the columns that are kept and not unchanged TOAST."""
    pairs = [
        (n, v)
        for n, v, k in zip(names, values, keep, strict=True)
        if k and not isinstance(v, pgoutput.Unchanged)
    ]
    return tuple(n for n, _ in pairs), tuple(v for _, v in pairs)


class Assembler:
    """Turns the pgoutput messages of a stream into Records, one per transaction."""

    def __init__(self, epoch: int, source_node: str) -> None:
        self.epoch = epoch
        self.source_node = source_node
        self._relations: dict[int, pgoutput.Relation] = {}
        self._begin: pgoutput.Begin | None = None
        self._changes: list[Change] = []

    @property
    def in_transaction(self) -> bool:
        return self._begin is not None

    def feed(self, msg: pgoutput.PgOutputMessage) -> Record | None:
        """Take one message; returns the Record when it completes a transaction.

        Raises ProtocolViolation for changes outside a transaction, unknown
        relations, or an update or delete that names no row.
        """
        if isinstance(msg, pgoutput.Relation):
            self._relations[msg.relid] = msg
        elif isinstance(msg, pgoutput.Begin):
            if self._begin is not None:
                raise ProtocolViolation("Begin inside a transaction")
            self._begin, self._changes = msg, []
        elif isinstance(msg, pgoutput.Commit):
            return self._commit(msg)
        elif isinstance(msg, (pgoutput.Type, pgoutput.Origin)):
            pass  # the replica's own catalog types the values; origins are not used
        elif isinstance(msg, pgoutput.Message):
            if msg.transactional and msg.prefix == DDL_PREFIX:
                self._add(_ddl(msg.content))
        else:
            self._add_change(msg)
        return None

    def _add(self, change: Change) -> None:
        if self._begin is None:
            raise ProtocolViolation(f"{type(change).__name__} outside a transaction")
        self._changes.append(change)

    def _relation(self, relid: int) -> pgoutput.Relation:
        try:
            return self._relations[relid]
        except KeyError:
            raise ProtocolViolation(f"change for relation {relid} before its Relation") from None

    def _add_change(
        self, msg: pgoutput.Insert | pgoutput.Update | pgoutput.Delete | pgoutput.Truncate
    ) -> None:
        if isinstance(msg, pgoutput.Truncate):
            rels = [self._relation(r) for r in msg.relids]
            tables = tuple((r.namespace, r.name) for r in rels if r.namespace != OWN_SCHEMA)
            if tables:
                self._add(TruncateTables(tables, msg.cascade, msg.restart_identity))
            return
        rel = self._relation(msg.relid)
        if rel.namespace == OWN_SCHEMA:
            return
        names = tuple(c.name for c in rel.columns)
        every = (True,) * len(names)
        if isinstance(msg, pgoutput.Insert):
            cols, vals = _present(names, msg.new, every)
            self._add(Row(Op.INSERT, rel.namespace, rel.name, cols, vals))
            return
        is_key = tuple(c.is_key for c in rel.columns)
        if msg.old is not None:
            key_cols, key_vals = _present(names, msg.old, every if msg.old_kind == "O" else is_key)
        elif isinstance(msg, pgoutput.Update):
            key_cols, key_vals = _present(names, msg.new, is_key)
        else:
            key_cols, key_vals = (), ()
        if not key_cols:
            raise ProtocolViolation(f"change to {rel.namespace}.{rel.name} names no row")
        if isinstance(msg, pgoutput.Update):
            cols, vals = _present(names, msg.new, every)
            self._add(Row(Op.UPDATE, rel.namespace, rel.name, cols, vals, key_cols, key_vals))
        else:
            self._add(Row(Op.DELETE, rel.namespace, rel.name, (), (), key_cols, key_vals))

    def _commit(self, msg: pgoutput.Commit) -> Record:
        begin = self._begin
        if begin is None:
            raise ProtocolViolation("Commit without Begin")
        self._begin = None
        changes, self._changes = tuple(self._changes), []
        return Record(
            self.epoch,
            self.source_node,
            msg.commit_lsn,
            msg.end_lsn,
            begin.xid,
            msg.commit_time + PG_EPOCH_OFFSET_US,
            changes,
        )

"""Decode pgoutput logical replication messages (protocol version 1), sans IO.

How this works: PostgreSQL's walsender wraps each pgoutput message in an
XLogData frame; the caller strips that frame and hands the payload to
`decode`, which returns one frozen dataclass per message. The first byte
names the kind; a `_Reader` walks the rest with bounds checks, so every
malformed input ends as `ProtocolViolation` naming the kind and the fault,
never as IndexError or struct.error. Each declared count is checked against
the bytes left before its items are read. We never request streaming,
two-phase or binary output, so those message kinds and the 'b' column kind
are rejected rather than half-understood.

Wire format (PostgreSQL 15 docs, "Logical Replication Message Formats"):
integers big-endian; LSNs uint64, xids and oids uint32, timestamps int64
microseconds since 2000-01-01 UTC; String is zero-terminated UTF-8.
"""

import enum
import struct
from collections.abc import Callable
from dataclasses import dataclass

from haproxy_ln.errors import ProtocolViolation


class Unchanged(enum.Enum):
    """A TOASTed column the UPDATE left alone: PostgreSQL does not send its value."""

    TOAST = "u"


UNCHANGED = Unchanged.TOAST
Value = str | None | Unchanged
Tuple = tuple[Value, ...]


@dataclass(frozen=True, slots=True)
class Begin:
    final_lsn: int
    commit_time: int
    xid: int


@dataclass(frozen=True, slots=True)
class Commit:
    flags: int
    commit_lsn: int
    end_lsn: int
    commit_time: int


@dataclass(frozen=True, slots=True)
class Origin:
    commit_lsn: int
    name: str


@dataclass(frozen=True, slots=True)
class Column:
    flags: int
    name: str
    type_oid: int
    typmod: int

    @property
    def is_key(self) -> bool:
        return bool(self.flags & 1)


@dataclass(frozen=True, slots=True)
class Relation:
    relid: int
    namespace: str
    name: str
    replica_identity: str
    columns: tuple[Column, ...]


@dataclass(frozen=True, slots=True)
class Type:
    oid: int
    namespace: str
    name: str


@dataclass(frozen=True, slots=True)
class Insert:
    relid: int
    new: Tuple


@dataclass(frozen=True, slots=True)
class Update:
    relid: int
    old_kind: str | None  # 'K': old replica identity key, 'O': whole old row, None: neither
    old: Tuple | None
    new: Tuple


@dataclass(frozen=True, slots=True)
class Delete:
    relid: int
    old_kind: str
    old: Tuple


@dataclass(frozen=True, slots=True)
class Truncate:
    relids: tuple[int, ...]
    cascade: bool
    restart_identity: bool


@dataclass(frozen=True, slots=True)
class Message:
    transactional: bool
    lsn: int
    prefix: str
    content: bytes


PgOutputMessage = (
    Begin | Commit | Origin | Relation | Type | Insert | Update | Delete | Truncate | Message
)

_TEXT, _NULL, _UNCHANGED = b"t"[0], b"n"[0], b"u"[0]
_LENGTH = struct.Struct(">i")
_COLUMN_MIN_SIZE = 10  # flags 1 + name >= 1 + type oid 4 + typmod 4
_HINT = "(does a TupleData column count disagree with its columns?)"


class _Reader:
    __slots__ = ("buf", "kind", "pos")

    def __init__(self, buf: bytes, kind: str) -> None:
        self.buf, self.kind, self.pos = buf, kind, 1

    def fail(self, what: str) -> ProtocolViolation:
        return ProtocolViolation(f"pgoutput {self.kind} message: {what}")

    def raw(self, n: int, what: str) -> bytes:
        left = len(self.buf) - self.pos
        if n > left:
            raise self.fail(f"truncated: {what} needs {n} bytes at offset {self.pos}, {left} left")
        self.pos += n
        return self.buf[self.pos - n : self.pos]

    def ints(self, fmt: str, what: str) -> tuple[int, ...]:
        return struct.unpack(fmt, self.raw(struct.calcsize(fmt), what))

    def num(self, fmt: str, what: str) -> int:
        return self.ints(fmt, what)[0]

    def count(self, fmt: str, what: str, unit: int) -> int:
        """A declared count or length, refused unless `unit` bytes each could follow."""
        n, left = self.num(fmt, what), len(self.buf) - self.pos
        if n < 0:
            raise self.fail(f"negative {what} {n}")
        if n * unit > left:
            raise self.fail(f"{what} {n} cannot fit in the {left} bytes left")
        return n

    def text(self, raw: bytes, what: str) -> str:
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise self.fail(f"{what} is not valid UTF-8 ({e.reason} at byte {e.start})") from None

    def string(self, what: str) -> str:
        end = self.buf.find(b"\0", self.pos)
        if end < 0:
            raise self.fail(f"truncated: {what} at offset {self.pos} has no terminating zero")
        raw, self.pos = self.buf[self.pos : end], end + 1
        return self.text(raw, what)

    def namespace(self) -> str:
        return self.string("namespace") or "pg_catalog"  # the docs: "" stands for pg_catalog

    def marker(self, what: str) -> str:
        return chr(self.num(">B", what))

    def tuple_data(self, what: str) -> Tuple:
        ncols = self.count(">h", f"{what} column count", 1)
        values: list[Value] = []
        buf, pos, end = self.buf, self.pos, len(self.buf)
        # The common case in one tight loop; anything unusual is read again by
        # `_column`, which says exactly what is wrong.
        for i in range(ncols):
            kind = buf[pos] if pos < end else 0
            if kind == _TEXT and pos + 5 <= end:
                (length,) = _LENGTH.unpack_from(buf, pos + 1)
                if 0 <= length <= end - pos - 5:
                    try:
                        values.append(buf[pos + 5 : pos + 5 + length].decode("utf-8"))
                        pos += 5 + length
                        continue
                    except UnicodeDecodeError:
                        pass
            elif kind == _NULL:
                values.append(None)
                pos += 1
                continue
            elif kind == _UNCHANGED:
                values.append(UNCHANGED)
                pos += 1
                continue
            self.pos = pos
            values.append(self._column(f"{what} column {i + 1} of {ncols}"))
            pos = self.pos
        self.pos = pos
        return tuple(values)

    def _column(self, col: str) -> Value:
        kind = self.marker(f"{col} kind")
        if kind == "n":
            return None
        if kind == "u":
            return UNCHANGED
        if kind == "t":
            length = self.count(">i", f"{col} length", 1)
            return self.text(self.raw(length, col), col)
        if kind == "b":
            raise self.fail(
                f"{col} is binary ('b'); that needs the proto_version/binary options, "
                "which we never request"
            )
        raise self.fail(f"{col} has unknown kind {kind!r}, expected 'n', 'u' or 't'")


def _relation(r: _Reader) -> Relation:
    relid, namespace, name = r.num(">I", "relation oid"), r.namespace(), r.string("name")
    identity = r.marker("replica identity")
    if identity not in ("d", "n", "f", "i"):
        raise r.fail(f"unknown replica identity {identity!r}, expected 'd', 'n', 'f' or 'i'")
    ncols = r.count(">h", "column count", _COLUMN_MIN_SIZE)
    columns = tuple(
        Column(r.num(">B", "column flags"), r.string("column name"), *r.ints(">Ii", "column type"))
        for _ in range(ncols)
    )
    return Relation(relid, namespace, name, identity, columns)


def _update(r: _Reader) -> Update:
    relid, marker = r.num(">I", "relation oid"), r.marker("tuple marker")
    if marker == "N":
        return Update(relid, None, None, r.tuple_data("new tuple"))
    if marker not in ("K", "O"):
        raise r.fail(f"expected 'K', 'O' or 'N' after the relation oid, got {marker!r}")
    old = r.tuple_data("old key" if marker == "K" else "old row")
    if (marker_new := r.marker("new tuple marker")) != "N":
        raise r.fail(f"expected 'N' after the old tuple, got {marker_new!r} {_HINT}")
    return Update(relid, marker, old, r.tuple_data("new tuple"))


def _insert(r: _Reader) -> Insert:
    relid, marker = r.num(">I", "relation oid"), r.marker("tuple marker")
    if marker != "N":
        raise r.fail(f"expected 'N' after the relation oid, got {marker!r}")
    return Insert(relid, r.tuple_data("new tuple"))


def _delete(r: _Reader) -> Delete:
    relid, marker = r.num(">I", "relation oid"), r.marker("tuple marker")
    if marker not in ("K", "O"):
        raise r.fail(f"expected 'K' or 'O' after the relation oid, got {marker!r}")
    return Delete(relid, marker, r.tuple_data("old key" if marker == "K" else "old row"))


def _truncate(r: _Reader) -> Truncate:
    nrels, options = r.count(">i", "relation count", 4), r.num(">B", "options")
    relids = tuple(r.num(">I", "relation oid") for _ in range(nrels))
    return Truncate(relids, bool(options & 1), bool(options & 2))


def _message(r: _Reader) -> Message:
    flags, lsn, prefix = r.num(">B", "flags"), r.num(">Q", "LSN"), r.string("prefix")
    content = r.raw(r.count(">i", "content length", 1), "content")
    return Message(bool(flags & 1), lsn, prefix, content)


_DECODERS: dict[str, tuple[str, Callable[[_Reader], PgOutputMessage]]] = {
    "B": ("Begin", lambda r: Begin(*r.ints(">QqI", "final LSN, commit time, xid"))),
    "C": ("Commit", lambda r: Commit(*r.ints(">BQQq", "flags, LSNs, commit time"))),
    "O": ("Origin", lambda r: Origin(r.num(">Q", "commit LSN"), r.string("origin name"))),
    "R": ("Relation", _relation),
    "Y": ("Type", lambda r: Type(r.num(">I", "type oid"), r.namespace(), r.string("type name"))),
    "I": ("Insert", _insert),
    "U": ("Update", _update),
    "D": ("Delete", _delete),
    "T": ("Truncate", _truncate),
    "M": ("Message", _message),
}


def decode(data: bytes | memoryview) -> PgOutputMessage:
    """Decode one whole pgoutput message (the XLogData payload).

    Raises ProtocolViolation, naming the message kind and the fault, for:
    empty input; an unknown type byte (streaming and two-phase kinds
    included); a truncated message; bytes left over after a complete
    message; a negative or impossible count or length; a tuple column kind
    other than 'n', 'u' or 't' (binary 'b' needs options we never request);
    an unknown tuple marker or replica identity; invalid UTF-8 in any text.
    A TupleData column count that disagrees with the columns present shows
    up as one of the truncated, leftover or marker faults.
    """
    buf = bytes(data)
    if not buf:
        raise ProtocolViolation("pgoutput message is empty")
    entry = _DECODERS.get(chr(buf[0]))
    if entry is None:
        raise ProtocolViolation(
            f"pgoutput message has unknown type byte {buf[:1]!r} (streaming and two-phase "
            "messages need options we never request)"
        )
    name, decoder = entry
    r = _Reader(buf, f"{name} ({chr(buf[0])!r})")
    msg = decoder(r)
    if r.pos != len(buf):
        hint = f" {_HINT}" if name in ("Insert", "Update", "Delete") else ""
        raise r.fail(f"{len(buf) - r.pos} bytes left over after a complete message{hint}")
    return msg

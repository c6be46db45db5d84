"""pgoutput decoder: hand-built messages, an encode/decode round trip, hostile input."""

import ast
import contextlib
import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from haproxy_ln.errors import ProtocolViolation
from haproxy_ln.replication import pgoutput
from haproxy_ln.replication.pgoutput import (
    UNCHANGED,
    Begin,
    Column,
    Commit,
    Delete,
    Insert,
    Message,
    Origin,
    PgOutputMessage,
    Relation,
    Truncate,
    Tuple,
    Type,
    Unchanged,
    Update,
    decode,
)

# --- a test-only encoder, written from the docs like the decoder -------------


def _s(text: str) -> bytes:
    return text.encode() + b"\0"


def _ns(namespace: str) -> bytes:
    return _s("" if namespace == "pg_catalog" else namespace)


def _tuple(values: Tuple) -> bytes:
    out = struct.pack(">h", len(values))
    for v in values:
        if v is None:
            out += b"n"
        elif isinstance(v, Unchanged):
            out += b"u"
        else:
            data = v.encode()
            out += b"t" + struct.pack(">i", len(data)) + data
    return out


def encode(m: PgOutputMessage) -> bytes:
    match m:
        case Begin():
            return b"B" + struct.pack(">QqI", m.final_lsn, m.commit_time, m.xid)
        case Commit():
            return b"C" + struct.pack(">BQQq", m.flags, m.commit_lsn, m.end_lsn, m.commit_time)
        case Origin():
            return b"O" + struct.pack(">Q", m.commit_lsn) + _s(m.name)
        case Relation():
            out = b"R" + struct.pack(">I", m.relid) + _ns(m.namespace) + _s(m.name)
            out += m.replica_identity.encode() + struct.pack(">h", len(m.columns))
            for c in m.columns:
                out += struct.pack(">B", c.flags) + _s(c.name)
                out += struct.pack(">Ii", c.type_oid, c.typmod)
            return out
        case Type():
            return b"Y" + struct.pack(">I", m.oid) + _ns(m.namespace) + _s(m.name)
        case Insert():
            return b"I" + struct.pack(">I", m.relid) + b"N" + _tuple(m.new)
        case Update():
            old = b"" if m.old is None else str(m.old_kind).encode() + _tuple(m.old)
            return b"U" + struct.pack(">I", m.relid) + old + b"N" + _tuple(m.new)
        case Delete():
            return b"D" + struct.pack(">I", m.relid) + m.old_kind.encode() + _tuple(m.old)
        case Truncate():
            options = int(m.cascade) | int(m.restart_identity) << 1
            out = b"T" + struct.pack(">iB", len(m.relids), options)
            return out + b"".join(struct.pack(">I", r) for r in m.relids)
        case Message():
            out = b"M" + struct.pack(">BQ", int(m.transactional), m.lsn) + _s(m.prefix)
            return out + struct.pack(">i", len(m.content)) + m.content
    raise AssertionError(m)


# --- strategies ---------------------------------------------------------------

u8 = st.integers(0, 2**8 - 1)
u32 = st.integers(0, 2**32 - 1)
i32 = st.integers(-(2**31), 2**31 - 1)
u64 = st.integers(0, 2**64 - 1)
i64 = st.integers(-(2**63), 2**63 - 1)
cstring = st.text(st.characters(codec="utf-8", exclude_characters="\0"), max_size=20)
namespaces = cstring.filter(bool)  # "" on the wire is pg_catalog, so it never decodes to ""
values = st.one_of(st.none(), st.just(UNCHANGED), st.text(max_size=20))
tuples = st.lists(values, max_size=6).map(tuple)
old_parts = st.one_of(st.just((None, None)), st.tuples(st.sampled_from("KO"), tuples))


def _update(relid: int, old: tuple[str | None, Tuple | None], new: Tuple) -> Update:
    return Update(relid, old[0], old[1], new)


messages: st.SearchStrategy[PgOutputMessage] = st.one_of(
    st.builds(Begin, u64, i64, u32),
    st.builds(Commit, u8, u64, u64, i64),
    st.builds(Origin, u64, cstring),
    st.builds(
        Relation,
        u32,
        namespaces,
        cstring,
        st.sampled_from("dnfi"),
        st.lists(st.builds(Column, u8, cstring, u32, i32), max_size=5).map(tuple),
    ),
    st.builds(Type, u32, namespaces, cstring),
    st.builds(Insert, u32, tuples),
    st.builds(_update, u32, old_parts, tuples),
    st.builds(Delete, u32, st.sampled_from("KO"), tuples),
    st.builds(Truncate, st.lists(u32, max_size=5).map(tuple), st.booleans(), st.booleans()),
    st.builds(Message, st.booleans(), u64, cstring, st.binary(max_size=30)),
)

# --- one of each, by hand -----------------------------------------------------

SAMPLES: list[PgOutputMessage] = [
    Begin(final_lsn=0x16B3748, commit_time=752_000_000_000_000, xid=731),
    Commit(flags=0, commit_lsn=0x16B3748, end_lsn=0x16B3778, commit_time=752_000_000_000_000),
    Origin(commit_lsn=0x1000, name="node_a"),
    Relation(
        7,
        "public",
        "channels",
        "d",
        (Column(1, "id", 23, -1), Column(0, "state", 1043, 36)),
    ),
    Type(oid=16_500, namespace="public", name="mood"),
    Insert(7, ("1", None, UNCHANGED, "")),
    Update(7, None, None, ("1", "open")),
    Update(7, "K", ("1", None), ("2", "open")),
    Update(7, "O", ("1", "closed"), ("1", "open")),
    Delete(7, "K", ("1", None)),
    Delete(7, "O", ("1", "closed")),
    Truncate((7, 8), cascade=True, restart_identity=False),
    Message(True, 0x1000, "haproxy-ln", b"\x00\xff"),
]


def test_begin_decodes_lsn_timestamp_and_unsigned_xid() -> None:
    data = b"B" + (2**64 - 1).to_bytes(8, "big") + (-5).to_bytes(8, "big", signed=True)
    data += (2**32 - 1).to_bytes(4, "big")
    assert decode(data) == Begin(final_lsn=2**64 - 1, commit_time=-5, xid=2**32 - 1)


def test_commit_decodes_flags_lsns_and_timestamp() -> None:
    data = b"C\x00" + bytes(range(1, 9)) + bytes(range(9, 17)) + (10**15).to_bytes(8, "big")
    assert decode(data) == Commit(0, 0x0102030405060708, 0x090A0B0C0D0E0F10, 10**15)


def test_origin_decodes_lsn_and_name() -> None:
    assert decode(b"O" + (42).to_bytes(8, "big") + b"node_a\0") == Origin(42, "node_a")


def test_relation_decodes_columns_key_flags_and_negative_typmod() -> None:
    data = b"R\x00\x00\x40\x00public\0channels\0f\x00\x02"
    data += b"\x01id\0\x00\x00\x00\x17\xff\xff\xff\xff"
    data += b"\x00note\0\x00\x00\x04\x13\x00\x00\x00\x24"
    rel = decode(data)
    assert rel == Relation(
        0x4000, "public", "channels", "f", (Column(1, "id", 23, -1), Column(0, "note", 1043, 36))
    )
    assert isinstance(rel, Relation)
    assert [c.is_key for c in rel.columns] == [True, False]


def test_relation_empty_namespace_means_pg_catalog() -> None:
    rel = decode(b"R\x00\x00\x00\x01\0pg_class\0n\x00\x00")
    assert rel == Relation(1, "pg_catalog", "pg_class", "n", ())


def test_type_decodes_oid_and_empty_namespace_as_pg_catalog() -> None:
    assert decode(b"Y\x00\x00\x40\x74\0mood\0") == Type(0x4074, "pg_catalog", "mood")
    assert decode(b"Y\x00\x00\x40\x74app\0mood\0") == Type(0x4074, "app", "mood")


def test_insert_decodes_null_unchanged_unicode_and_empty_text() -> None:
    data = b"I\x00\x00\x00\x07N\x00\x04n" + b"u" + b"t\x00\x00\x00\x05\xe2\x9a\xa1ok" + b"t\0\0\0\0"
    assert decode(data) == Insert(7, (None, UNCHANGED, "\u26a1ok", ""))


def test_update_without_old_tuple_has_only_new() -> None:
    data = b"U\x00\x00\x00\x07N\x00\x01t\x00\x00\x00\x01x"
    assert decode(data) == Update(7, None, None, ("x",))


def test_update_with_old_key_keeps_both_tuples() -> None:
    data = b"U\x00\x00\x00\x07K\x00\x02t\x00\x00\x00\x011n" + b"N\x00\x02t\x00\x00\x00\x012u"
    assert decode(data) == Update(7, "K", ("1", None), ("2", UNCHANGED))


def test_update_with_full_old_row_keeps_both_tuples() -> None:
    data = b"U\x00\x00\x00\x07O\x00\x01t\x00\x00\x00\x01a" + b"N\x00\x01t\x00\x00\x00\x01b"
    assert decode(data) == Update(7, "O", ("a",), ("b",))


@pytest.mark.parametrize("kind", ["K", "O"])
def test_delete_keeps_old_kind_and_tuple(kind: str) -> None:
    data = b"D\x00\x00\x00\x07" + kind.encode() + b"\x00\x02t\x00\x00\x00\x011n"
    assert decode(data) == Delete(7, kind, ("1", None))


@pytest.mark.parametrize(
    ("options", "cascade", "restart"), [(0, False, False), (1, True, False), (3, True, True)]
)
def test_truncate_decodes_relids_and_option_bits(
    options: int, cascade: bool, restart: bool
) -> None:
    data = b"T\x00\x00\x00\x02" + bytes([options]) + b"\x00\x00\x00\x07\xff\xff\xff\xff"
    assert decode(data) == Truncate((7, 2**32 - 1), cascade, restart)


@pytest.mark.parametrize(("flags", "transactional"), [(0, False), (1, True)])
def test_message_decodes_transactional_flag_and_raw_content(
    flags: int, transactional: bool
) -> None:
    data = bytes([ord("M"), flags]) + (9).to_bytes(8, "big") + b"ddl\0\x00\x00\x00\x02\x00\xff"
    assert decode(data) == Message(transactional, 9, "ddl", b"\x00\xff")


def test_decode_accepts_memoryview() -> None:
    data = encode(SAMPLES[5])
    assert decode(memoryview(data)) == SAMPLES[5]


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: type(m).__name__)
def test_samples_round_trip(msg: PgOutputMessage) -> None:
    assert decode(encode(msg)) == msg


@given(messages)
def test_any_message_round_trips(msg: PgOutputMessage) -> None:
    assert decode(encode(msg)) == msg


# --- malformed input ------------------------------------------------------------


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: type(m).__name__)
def test_every_strict_prefix_is_refused(msg: PgOutputMessage) -> None:
    data = encode(msg)
    for n in range(len(data)):
        with pytest.raises(ProtocolViolation):
            decode(data[:n])


@given(messages, st.data())
def test_any_strict_prefix_of_any_message_is_refused(
    msg: PgOutputMessage, data: st.DataObject
) -> None:
    wire = encode(msg)
    n = data.draw(st.integers(0, len(wire) - 1))
    with pytest.raises(ProtocolViolation):
        decode(wire[:n])


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: type(m).__name__)
def test_appended_garbage_is_refused(msg: PgOutputMessage) -> None:
    with pytest.raises(ProtocolViolation, match="left over"):
        decode(encode(msg) + b"\x00")


def test_empty_input_is_refused() -> None:
    with pytest.raises(ProtocolViolation, match="empty"):
        decode(b"")


@pytest.mark.parametrize("type_byte", [b"S", b"E", b"c", b"A", b"b", b"P", b"K", b"r", b"\xff"])
def test_unknown_and_streaming_type_bytes_are_refused(type_byte: bytes) -> None:
    with pytest.raises(ProtocolViolation, match="unknown type byte"):
        decode(type_byte + b"\x00" * 16)


def test_binary_column_kind_is_refused_naming_binary() -> None:
    data = b"I\x00\x00\x00\x07N\x00\x01b\x00\x00\x00\x04\x00\x00\x00\x01"
    with pytest.raises(ProtocolViolation, match="binary"):
        decode(data)


def test_unknown_column_kind_is_refused() -> None:
    with pytest.raises(ProtocolViolation, match="unknown kind 'x'"):
        decode(b"I\x00\x00\x00\x07N\x00\x01x")


def test_invalid_utf8_in_a_text_value_is_refused() -> None:
    with pytest.raises(ProtocolViolation, match="UTF-8"):
        decode(b"I\x00\x00\x00\x07N\x00\x01t\x00\x00\x00\x02\xc3\x28")


def test_invalid_utf8_in_a_string_field_is_refused() -> None:
    with pytest.raises(ProtocolViolation, match=r"Origin.*UTF-8"):
        decode(b"O" + bytes(8) + b"\xff\0")


@pytest.mark.parametrize(
    "data",
    [
        b"R\x00\x00\x00\x01\0t\0d\x7f\xff" + b"\x00c\0",  # 32767 columns, 3 bytes
        b"I\x00\x00\x00\x07N\x7f\xff" + b"n" * 10,  # 32767 values, 10 bytes
        b"I\x00\x00\x00\x07N\x00\x01t\x7f\xff\xff\xff" + b"x",  # 2 GiB value
        b"T\x7f\xff\xff\xff\x00\x00\x00\x00\x07",  # 2**31 - 1 relations
        b"M\x00" + bytes(8) + b"p\0\x7f\xff\xff\xff" + b"x",  # 2 GiB content
    ],
    ids=["relation", "tuple", "text", "truncate", "message"],
)
def test_huge_declared_count_with_short_buffer_is_refused_up_front(data: bytes) -> None:
    with pytest.raises(ProtocolViolation, match="cannot fit"):
        decode(data)


@pytest.mark.parametrize(
    "data",
    [
        b"R\x00\x00\x00\x01\0t\0d\xff\xff",
        b"I\x00\x00\x00\x07N\xff\xff",
        b"I\x00\x00\x00\x07N\x00\x01t\xff\xff\xff\xff",
        b"T\xff\xff\xff\xff\x00",
        b"M\x00" + bytes(8) + b"p\0\xff\xff\xff\xff",
    ],
    ids=["relation", "tuple", "text", "truncate", "message"],
)
def test_negative_count_or_length_is_refused(data: bytes) -> None:
    with pytest.raises(ProtocolViolation, match="negative"):
        decode(data)


def test_tuple_column_count_larger_than_present_is_refused() -> None:
    with pytest.raises(ProtocolViolation, match="truncated: new tuple column 3 of 3"):
        decode(b"I\x00\x00\x00\x07N\x00\x03nt\0\0\0\0")
    with pytest.raises(ProtocolViolation, match="cannot fit"):
        decode(b"I\x00\x00\x00\x07N\x00\x03nn")


def test_tuple_column_count_smaller_than_present_is_refused() -> None:
    with pytest.raises(ProtocolViolation, match="column count"):
        decode(b"I\x00\x00\x00\x07N\x00\x01nn")
    with pytest.raises(ProtocolViolation, match="column count"):
        decode(b"U\x00\x00\x00\x07K\x00\x01nnN\x00\x00")


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"I\x00\x00\x00\x07K\x00\x00", "expected 'N'"),
        (b"U\x00\x00\x00\x07X\x00\x00", "expected 'K', 'O' or 'N'"),
        (b"D\x00\x00\x00\x07N\x00\x00", "expected 'K' or 'O'"),
        (b"R\x00\x00\x00\x01\0t\0x\x00\x00", "replica identity"),
    ],
)
def test_unknown_marker_is_refused(data: bytes, match: str) -> None:
    with pytest.raises(ProtocolViolation, match=match):
        decode(data)


def test_error_names_the_message_kind() -> None:
    with pytest.raises(ProtocolViolation, match=r"pgoutput Update \('U'\) message: truncated"):
        decode(b"U\x00\x00")


@settings(max_examples=500)
@given(st.binary(max_size=64))
def test_arbitrary_bytes_decode_or_raise_protocol_violation(data: bytes) -> None:
    with contextlib.suppress(ProtocolViolation):
        decode(data)


@settings(max_examples=1000)
@given(st.sampled_from(b"BCOMRYIUDT"), st.binary(max_size=64))
def test_arbitrary_bodies_for_known_kinds_decode_or_raise_protocol_violation(
    type_byte: int, body: bytes
) -> None:
    with contextlib.suppress(ProtocolViolation):
        decode(bytes([type_byte]) + body)


def test_decoder_imports_no_io_modules() -> None:
    tree = ast.parse(Path(pgoutput.__file__).read_text())
    imported = {
        name.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.Import | ast.ImportFrom)
        for name in (
            [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
        )
    }
    assert imported <= {"enum", "struct", "collections", "dataclasses", "haproxy_ln"}

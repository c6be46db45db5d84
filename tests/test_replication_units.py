"""The pure parts of replication: stream messages, what may be confirmed, records, DDL."""

from __future__ import annotations

import ast as pyast
import struct
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from haproxy_ln.errors import ProtocolViolation
from haproxy_ln.replication import pgoutput, stream
from haproxy_ln.replication.record import (
    Assembler,
    Ddl,
    Op,
    Record,
    Row,
    TruncateTables,
)
from haproxy_ln.store.apply import hoist_created_tables
from haproxy_ln.store.statements import ddl_statements

PACKAGE = Path(__file__).resolve().parent.parent / "haproxy_ln"


def test_keepalives_advance_the_confirmed_position_only_when_nothing_is_pending() -> None:
    c = stream.Confirmation(100)
    c.received(150)
    assert c.durable == 150  # an idle stream: skipped transactions must be released
    c.received(160, opens=True)
    c.received(400)
    assert c.durable == 150  # a transaction is open: nothing past it may be confirmed
    c.applied(300)
    assert c.durable == 400  # all applied: everything the server vouched for


def test_applied_without_a_pending_transaction_is_a_bug() -> None:
    with pytest.raises(ValueError):
        stream.Confirmation(0).applied(10)


def test_stream_messages_decode_and_status_updates_carry_the_position_three_times() -> None:
    xlog = stream.decode(memoryview(struct.pack("!cQQq", b"w", 5, 9, 0) + b"B..."))
    assert isinstance(xlog, stream.XLogData) and (xlog.start, xlog.wal_end) == (5, 9)
    assert bytes(xlog.payload) == b"B..."
    keepalive = stream.decode(memoryview(struct.pack("!cQq?", b"k", 77, 0, True)))
    assert keepalive == stream.Keepalive(77, True)
    body = stream.status_update(0x1_0000_0010, stream.PG_EPOCH_OFFSET_US + 5)
    assert struct.unpack("!cQQQq?", body) == (
        b"r",
        0x1_0000_0010,
        0x1_0000_0010,
        0x1_0000_0010,
        5,
        False,
    )


@pytest.mark.parametrize("data", [b"", b"w", b"k" + b"\0" * 5, b"z" + b"\0" * 17])
def test_malformed_stream_messages_are_protocol_violations(data: bytes) -> None:
    with pytest.raises(ProtocolViolation):
        stream.decode(memoryview(data))


def test_lsn_text_round_trips() -> None:
    assert stream.format_lsn(0x16_0000_B7C8) == "16/B7C8"
    assert stream.parse_lsn("16/B7C8") == 0x16_0000_B7C8
    with pytest.raises(ValueError):
        stream.parse_lsn("16B7C8")


values = st.one_of(st.none(), st.text(max_size=20))
names = st.text(min_size=1, max_size=10)
rows = st.builds(
    lambda op, s, t, cols, key: Row(
        op,
        s,
        t,
        *(
            (tuple(c for c, _ in cols), tuple(v for _, v in cols))
            if op is not Op.DELETE
            else ((), ())
        ),
        *(
            (tuple(c for c, _ in key), tuple(v for _, v in key))
            if op is not Op.INSERT
            else ((), ())
        ),
    ),
    st.sampled_from(Op),
    names,
    names,
    st.lists(st.tuples(names, values), max_size=4),
    st.lists(st.tuples(names, values), min_size=1, max_size=2),
)
changes = st.one_of(
    rows,
    st.builds(Ddl, st.text(), st.lists(names, max_size=3).map(tuple)),
    st.builds(
        TruncateTables,
        st.lists(st.tuples(names, names), min_size=1, max_size=3).map(tuple),
        st.booleans(),
        st.booleans(),
    ),
)
records = st.builds(
    Record,
    st.integers(1, 2**62),
    names,
    st.integers(0, 2**64 - 1),
    st.integers(0, 2**64 - 1),
    st.integers(0, 2**32 - 1),
    st.integers(0, 2**62),
    st.lists(changes, max_size=5).map(tuple),
)


@given(records)
def test_records_round_trip_through_msgpack(record: Record) -> None:
    assert Record.unpack(record.pack()) == record


def test_a_record_of_another_version_or_garbage_is_refused() -> None:
    import msgpack

    with pytest.raises(ProtocolViolation, match="version 2"):
        Record.unpack(msgpack.packb({"v": 2}))
    with pytest.raises(ProtocolViolation):
        Record.unpack(b"\xc1garbage")


REL = pgoutput.Relation(
    16384,
    "public",
    "t",
    "d",
    (
        pgoutput.Column(1, "id", 20, -1),
        pgoutput.Column(0, "v", 25, -1),
        pgoutput.Column(0, "big", 17, -1),
    ),
)
OWN = pgoutput.Relation(16400, "haproxy_ln", "fence", "d", (pgoutput.Column(1, "epoch", 20, -1),))


def feed_all(messages: list[pgoutput.PgOutputMessage]) -> list[Record]:
    assembler = Assembler(epoch=3, source_node="a")
    return [r for m in messages if (r := assembler.feed(m)) is not None]


def test_a_transaction_becomes_one_record_with_changes_in_order() -> None:
    ddl = b'{"sql": "CREATE TABLE x (a int)", "search_path": ["public"]}'
    (record,) = feed_all(
        [
            REL,
            OWN,
            pgoutput.Begin(900, 10, 77),
            pgoutput.Message(True, 800, "haproxy_ln.ddl", ddl),
            pgoutput.Message(True, 800, "someone.else", b"ignored"),
            pgoutput.Insert(16384, ("1", "a", None)),
            pgoutput.Insert(16400, ("9",)),  # our own schema: never replicated
            pgoutput.Update(16384, None, None, ("1", "b", pgoutput.UNCHANGED)),
            pgoutput.Update(16384, "K", ("1", None, None), ("2", "b", pgoutput.UNCHANGED)),
            pgoutput.Delete(16384, "K", ("2", None, None)),
            pgoutput.Truncate((16384, 16400), cascade=False, restart_identity=True),
            pgoutput.Commit(0, 900, 950, 10),
        ]
    )
    assert (record.epoch, record.source_node, record.commit_lsn, record.end_lsn, record.xid) == (
        3,
        "a",
        900,
        950,
        77,
    )
    assert record.commit_time == 10 + stream.PG_EPOCH_OFFSET_US
    assert record.changes == (
        Ddl("CREATE TABLE x (a int)", ("public",)),
        Row(Op.INSERT, "public", "t", ("id", "v", "big"), ("1", "a", None)),
        Row(Op.UPDATE, "public", "t", ("id", "v"), ("1", "b"), ("id",), ("1",)),
        Row(Op.UPDATE, "public", "t", ("id", "v"), ("2", "b"), ("id",), ("1",)),
        Row(Op.DELETE, "public", "t", key_columns=("id",), key_values=("2",)),
        TruncateTables((("public", "t"),), cascade=False, restart_identity=True),
    )
    assert record.tables() == ["public.t"]


def test_full_identity_finds_the_row_by_every_old_value() -> None:
    full = pgoutput.Relation(
        5, "s", "nopk", "f", (pgoutput.Column(0, "a", 23, -1), pgoutput.Column(0, "b", 25, -1))
    )
    (record,) = feed_all(
        [
            full,
            pgoutput.Begin(1, 0, 1),
            pgoutput.Delete(5, "O", ("1", None)),
            pgoutput.Commit(0, 1, 2, 0),
        ]
    )
    assert record.changes == (
        Row(Op.DELETE, "s", "nopk", key_columns=("a", "b"), key_values=("1", None)),
    )


@pytest.mark.parametrize(
    "messages",
    [
        [REL, pgoutput.Insert(16384, ("1", "a", None))],  # outside a transaction
        [pgoutput.Begin(1, 0, 1), pgoutput.Insert(99, ("1",))],  # unknown relation
        [pgoutput.Commit(0, 1, 2, 0)],
        [pgoutput.Begin(1, 0, 1), pgoutput.Begin(1, 0, 1)],
        [pgoutput.Begin(1, 0, 1), pgoutput.Message(True, 1, "haproxy_ln.ddl", b"{not json")],
    ],
)
def test_impossible_streams_are_protocol_violations(
    messages: list[pgoutput.PgOutputMessage],
) -> None:
    with pytest.raises(ProtocolViolation):
        feed_all(messages)


def test_ddl_replay_keeps_schema_statements_and_drops_what_arrives_as_rows() -> None:
    sql = (
        "BEGIN; SET search_path = x; CREATE TABLE a (id int); INSERT INTO a VALUES (1); "
        "SELECT 1; SELECT * INTO b FROM a; CREATE INDEX CONCURRENTLY ai ON a (id); "
        "UPDATE a SET id = 2; DO $$ BEGIN NULL; END $$; COMMIT"
    )
    kept = ddl_statements(sql)
    assert kept[0] == "CREATE TABLE a (id int)"
    assert kept[1] == "SELECT * INTO b FROM a"
    assert "CONCURRENTLY" not in kept[2].upper() and "INDEX ai ON a" in kept[2]
    assert kept[3].startswith("DO $$")
    assert len(kept) == 4


PURE = ["replication", "pgwire"]
FORBIDDEN = {"trio", "asyncio", "asyncpg", "socket", "time", "trio_asyncio", "select"}


@pytest.mark.parametrize("package", PURE)
def test_pure_packages_import_no_io_or_clock(package: str) -> None:
    for path in sorted((PACKAGE / package).glob("*.py")):
        tree = pyast.parse(path.read_text())
        for node in pyast.walk(tree):
            if isinstance(node, pyast.Import):
                roots = {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, pyast.ImportFrom):
                roots = {(node.module or "").split(".")[0]}
            else:
                continue
            assert not roots & FORBIDDEN, f"{path.name} imports {roots & FORBIDDEN}"


def test_create_table_as_is_replayed_empty_before_its_streamed_rows() -> None:
    (kept,) = ddl_statements("CREATE TABLE c AS SELECT 1 AS g")
    assert "WITH NO DATA" in kept.upper()
    ddl = Ddl("CREATE TABLE c AS SELECT 1 AS g", ("public",))
    before = Row(Op.INSERT, "public", "other", ("x",), ("1",))
    row = Row(Op.INSERT, "public", "c", ("g",), ("1",))
    assert hoist_created_tables([before, row, ddl]) == [before, ddl, row]
    plain = Ddl("ALTER TABLE c ADD COLUMN h int", ("public",))
    assert hoist_created_tables([row, plain]) == [row, plain]  # only CREATE TABLE AS moves

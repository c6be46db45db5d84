"""The pure parts of replication: stream messages, what may be confirmed, records, DDL."""

from __future__ import annotations

import ast as pyast
import json
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
from haproxy_ln.store.statements import DdlNotReplayable, match, replay_statements

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
    st.builds(
        Ddl,
        st.text(),
        st.lists(names, max_size=3).map(tuple),
        st.lists(st.tuples(names, st.text()), max_size=3).map(tuple),
        st.lists(st.tuples(names, st.text()), max_size=3).map(tuple),
    ),
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


def test_records_written_before_ddl_settings_existed_still_unpack() -> None:
    import msgpack

    old = {"v": 1, "epoch": 1, "source_node": "a", "commit_lsn": 1, "end_lsn": 2, "xid": 3}
    data = msgpack.packb({**old, "commit_time": 0, "changes": [["ddl", "CREATE TABLE t ()", []]]})
    assert Record.unpack(data).changes == (Ddl("CREATE TABLE t ()", ()),)


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


@pytest.mark.parametrize(
    "change",
    [
        pgoutput.Insert(16384, ("1", "a")),
        pgoutput.Update(16384, None, None, ("1", "b", None, "extra")),
        pgoutput.Delete(16384, "K", ("2",)),
    ],
)
def test_a_change_whose_values_do_not_match_its_columns_is_a_protocol_violation(
    change: pgoutput.PgOutputMessage,
) -> None:
    with pytest.raises(ProtocolViolation, match="values for 3 columns"):
        feed_all([REL, pgoutput.Begin(900, 10, 77), change])


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


def test_old_records_replay_only_the_schema_statements_of_their_text() -> None:
    sql = (
        "BEGIN; SET search_path = x; CREATE TABLE a (id int); INSERT INTO a VALUES (1); "
        "SELECT 1; SELECT * INTO b FROM a; CREATE INDEX CONCURRENTLY ai ON a (id); "
        "UPDATE a SET id = 2; DO $$ BEGIN NULL; END $$; COMMIT"
    )
    kept = replay_statements(sql)
    assert kept[0] == "CREATE TABLE a (id int)"
    assert kept[1] == "CREATE TABLE b AS SELECT * FROM a WITH NO DATA"
    assert "CONCURRENTLY" not in kept[2].upper() and "INDEX ai ON a" in kept[2]
    assert kept[3].startswith("DO $$")
    assert len(kept) == 4


@pytest.mark.parametrize(
    ("sql", "replayed"),
    [
        ("CREATE TABLE c AS SELECT 1 AS g", "CREATE TABLE c AS SELECT 1 AS g WITH NO DATA"),
        ("SELECT * INTO c FROM s", "CREATE TABLE c AS SELECT * FROM s WITH NO DATA"),
        (  # INTO belongs to the leftmost SELECT of a set operation
            "SELECT 1 AS a INTO c UNION SELECT 2",
            "CREATE TABLE c AS SELECT 1 AS a UNION SELECT 2 WITH NO DATA",
        ),
        # a materialized view's rows are not streamed: the replica computes them
        ("CREATE MATERIALIZED VIEW m AS SELECT 1", "CREATE MATERIALIZED VIEW m AS SELECT 1"),
        ("DROP INDEX CONCURRENTLY i", "DROP INDEX i"),
        ("ALTER TABLE p DETACH PARTITION c CONCURRENTLY", "ALTER TABLE p DETACH PARTITION c"),
        ("ALTER TABLE t ADD COLUMN c int DEFAULT 1", "ALTER TABLE t ADD COLUMN c int DEFAULT 1"),
    ],
)
def test_replayed_statements_create_no_rows_and_need_no_concurrency(
    sql: str, replayed: str
) -> None:
    assert replay_statements(sql) == [replayed]


def test_a_new_column_gets_the_value_the_primary_computed_once() -> None:
    sql = (
        "ALTER TABLE ONLY s.t ADD COLUMN c timestamptz NOT NULL DEFAULT now(), ADD d int, "
        "ADD COLUMN e dom, ADD COLUMN f text[] DEFAULT '{}'"
    )
    missing = [
        ("c", '{"2024-01-02 03:04:05.123456+00"}'),
        ("e", r"""{"it's \"q\" \\x"}"""),
        ("f", '{"{a,\\"b c\\"}"}'),
        ("z", "{1}"),  # an older column of the table
    ]
    assert replay_statements(sql, missing) == [
        "ALTER TABLE ONLY s.t ADD COLUMN c timestamptz NOT NULL "
        "DEFAULT CAST('2024-01-02 03:04:05.123456+00' AS timestamptz), ADD COLUMN d integer, "
        r"""ADD COLUMN e dom DEFAULT CAST('it''s "q" \x' AS dom), """
        """ADD COLUMN f text[] DEFAULT CAST('{a,"b c"}' AS text[])""",
        "ALTER TABLE ONLY s.t ALTER COLUMN c SET DEFAULT now()",
        "ALTER TABLE ONLY s.t ALTER COLUMN e DROP DEFAULT ",
        "ALTER TABLE ONLY s.t ALTER COLUMN f SET DEFAULT '{}'",
    ]


def test_add_column_if_not_exists_leaves_an_existing_column_alone() -> None:
    sql = "ALTER TABLE t ADD COLUMN IF NOT EXISTS c timestamptz DEFAULT now()"
    assert replay_statements(sql, [("c", "{x}")], [("t", "c")]) == [sql]
    assert len(replay_statements(sql, [("c", "{x}")], [("t", "other")])) == 2


def test_a_new_column_read_differently_by_its_tables_is_refused() -> None:
    with pytest.raises(DdlNotReplayable, match="different values"):
        replay_statements(
            "ALTER TABLE p ADD COLUMN c int DEFAULT f()", [("c", "{1}"), ("c", "{2}")]
        )


def test_ddl_commands_pair_with_the_statements_of_their_text() -> None:
    text = (
        "BEGIN; CREATE TABLE a (x int); INSERT INTO a VALUES (1); /* c */ alter table a add b int"
    )
    assert match(text, ["CREATE TABLE", "ALTER TABLE"]) == [
        "CREATE TABLE a (x int)",
        "/* c */ alter table a add b int",
    ]
    assert match("SELECT 1 AS a INTO b", ["SELECT INTO"]) == ["SELECT 1 AS a INTO b"]
    # a straight-line DO block: its DDL statements, not its rows
    block = (
        "DO $$ DECLARE n int; BEGIN CREATE TABLE x (id int); INSERT INTO x VALUES (1); "
        "SELECT count(*) INTO n FROM x; PERFORM 1; BEGIN DROP TABLE x; END; END $$"
    )
    assert match(block, ["CREATE TABLE", "DROP TABLE"]) == [
        "CREATE TABLE x (id int)",
        "DROP TABLE x",
    ]
    # an extension's script reports its commands first
    assert match("CREATE EXTENSION e", ["CREATE FUNCTION", "CREATE EXTENSION"]) == [
        None,
        "CREATE EXTENSION e",
    ]


@pytest.mark.parametrize(
    ("sql", "tags", "why"),
    [
        ("DO $$ BEGIN IF true THEN CREATE TABLE x (); END IF; END $$", ["CREATE TABLE"], "DO"),
        (
            "DO $$ BEGIN CREATE TABLE x (); EXCEPTION WHEN others THEN END $$",
            ["CREATE TABLE"],
            "DO",
        ),
        ("DO $$ BEGIN EXECUTE 'CREATE TABLE x ()'; END $$", ["CREATE TABLE"], "DO"),
        ("DO $$ BEGIN CREATE TABLE x (); RETURN; DROP TABLE x; END $$", ["CREATE TABLE"], "DO"),
        ("SELECT f()", ["CREATE TABLE"], "SELECT"),
        ("CALL p()", ["ALTER TABLE"], "CALL"),
        (
            "CREATE TABLE a (); INSERT INTO a DEFAULT VALUES",
            ["CREATE TABLE", "CREATE TABLE"],
            "INSERT",
        ),
        ("CREATE TABLE a ()", ["ALTER TABLE"], "code"),
        ("CREATE TABLE a (); COMMIT; CREATE TABLE b ()", ["CREATE TABLE"], "ends a transaction"),
        ("SAVEPOINT s; CREATE TABLE a (); ROLLBACK TO s; SELECT f()", ["CREATE TABLE"], "ends a"),
    ],
)
def test_ddl_that_ran_inside_code_is_refused(sql: str, tags: list[str], why: str) -> None:
    with pytest.raises(DdlNotReplayable, match=why):
        match(sql, tags)


def ddl_message(n: int, tag: str, sql: str | None = None, **more: object) -> pgoutput.Message:
    body = {
        "n": n,
        "sql": sql,
        "search_path": ["public"],
        "tag": tag,
        "temporary": False,
        "created": [],
        "settings": {"TimeZone": "UTC"},
        "missing": None,
        **more,
    }
    return pgoutput.Message(True, 1, "haproxy_ln.ddl", json.dumps(body).encode())


OLD_C = pgoutput.Relation(100, "public", "c", "d", (pgoutput.Column(1, "id", 23, -1),))
NEW_C = pgoutput.Relation(200, "public", "c", "d", (pgoutput.Column(0, "v", 23, -1),))


def test_create_table_as_moves_before_the_first_row_of_the_table_it_created() -> None:
    """Told apart by relation id: rows of an older table of the same name stay after."""
    text = "DELETE FROM c; DROP TABLE c; CREATE TABLE c AS SELECT 1 AS v"
    (record,) = feed_all(
        [
            OLD_C,
            NEW_C,
            pgoutput.Begin(1, 0, 1),
            pgoutput.Delete(100, "K", ("1",)),
            ddl_message(1, "DROP TABLE", text),
            pgoutput.Insert(200, ("1",)),
            pgoutput.Insert(200, ("2",)),
            ddl_message(2, "CREATE TABLE AS", created=[200]),
            pgoutput.Commit(0, 1, 2, 0),
        ]
    )
    path, settings = ("public",), (("TimeZone", "UTC"),)
    assert record.changes == (
        Row(Op.DELETE, "public", "c", key_columns=("id",), key_values=("1",)),
        Ddl("DROP TABLE c", path, settings),
        Ddl("CREATE TABLE c AS SELECT 1 AS v", path, settings),
        Row(Op.INSERT, "public", "c", ("v",), ("1",)),
        Row(Op.INSERT, "public", "c", ("v",), ("2",)),
    )


def test_a_rewritten_table_arrives_as_all_its_rows() -> None:
    rows = pgoutput.Message(
        True, 1, "haproxy_ln.rows", b'{"schema": "s", "table": "t", "columns": ["a", "b"]}'
    )
    (record,) = feed_all(
        [
            pgoutput.Begin(1, 0, 1),
            ddl_message(1, "ALTER TABLE", "ALTER TABLE t ADD b float8 DEFAULT random()"),
            rows,
            pgoutput.Message(True, 1, "haproxy_ln.row", b'["1", "0.5"]'),
            pgoutput.Message(True, 1, "haproxy_ln.row", b'["2", null]'),
            pgoutput.Commit(0, 1, 2, 0),
        ]
    )
    assert record.changes[1:] == (
        Row(Op.DELETE, "s", "t"),  # no key: every row
        Row(Op.INSERT, "s", "t", ("a", "b"), ("1", "0.5")),
        Row(Op.INSERT, "s", "t", ("a", "b"), ("2", None)),
    )


def test_temporary_objects_and_extension_scripts_replay_nothing_of_their_own() -> None:
    (record,) = feed_all(
        [
            pgoutput.Begin(1, 0, 1),
            ddl_message(1, "CREATE TABLE", "CREATE TEMP TABLE t (a int)", temporary=True),
            ddl_message(1, "CREATE FUNCTION", "CREATE EXTENSION e"),
            ddl_message(2, "CREATE EXTENSION"),
            pgoutput.Commit(0, 1, 2, 0),
        ]
    )
    assert [c.sql for c in record.changes if isinstance(c, Ddl)] == ["CREATE EXTENSION e"]


def test_ddl_inside_code_stops_at_commit_saying_what_to_do() -> None:
    messages = [
        pgoutput.Begin(1, 0, 77),
        ddl_message(1, "CREATE TABLE", "SELECT make_table()"),
        pgoutput.Commit(0, 0x10, 0x20, 0),
    ]
    with pytest.raises(
        DdlNotReplayable, match=r"transaction 77 \(commit 0/10\).*haproxy-ln reseed"
    ):
        feed_all(messages)


@pytest.mark.parametrize(
    "messages",
    [
        [pgoutput.Begin(1, 0, 1), ddl_message(2, "ALTER TABLE")],  # command 2 without 1
        [pgoutput.Begin(1, 0, 1), pgoutput.Message(True, 1, "haproxy_ln.row", b"[]")],
        [pgoutput.Begin(1, 0, 1), pgoutput.Message(True, 1, "haproxy_ln.ddl", b'{"n": 1}')],
        [  # our own tables are node-local
            pgoutput.Begin(1, 0, 1),
            pgoutput.Message(
                True,
                1,
                "haproxy_ln.rows",
                b'{"schema": "haproxy_ln", "table": "fence", "columns": []}',
            ),
        ],
    ],
)
def test_malformed_ddl_messages_are_protocol_violations(
    messages: list[pgoutput.PgOutputMessage],
) -> None:
    with pytest.raises(ProtocolViolation):
        feed_all(messages)


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

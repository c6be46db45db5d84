"""Differential tests: whatever runs on the primary, the replica store equals it.

Once `haproxy-ln replicate` is synchronous, every COMMIT on the primary
returns only after the replica store has it, so right after each commit the
two must hold the same rows, table by table. Hypothesis generates programs
(transactions of inserts, updates including primary-key changes, deletes,
truncates and DDL) over most built-in types; every statement runs under a
savepoint, so one that fails on the primary (a duplicate key, a column
dropped earlier) is rolled back and the program goes on. A deterministic
test puts extreme values of each type through inserts, updates and deletes,
and small tests pin DDL and replica-identity edge cases; the product bugs
found here are strict xfails (they fail loudly once fixed: drop the mark).

A commit that would wait forever (the replicator died, stalled, or retries a
batch it cannot apply) is turned into a failure by `Watchdog`, which releases
the primary's synchronous wait.
"""

from __future__ import annotations

import random
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from psycopg import sql
from psycopg.types.json import Jsonb
from replication_harness import ReplicatorProcess, rows_digest

from haproxy_ln.local import PostgresCluster
from haproxy_ln.store import schema
from haproxy_ln.store.statements import reported, split

Pair = tuple[PostgresCluster, PostgresCluster]
Digest = dict[str, tuple[int, str]]

COMMIT_LIMIT = 30.0  # seconds a commit may wait for the replica before the test fails


# -- failure reporting -----------------------------------------------------


class ReplicatorBroken(BaseException):
    """The replicator died or stalled.

    Not an Exception, so it escapes Hypothesis: once the replicator is gone
    every later example would fail the same way, and shrinking would only
    report a meaningless minimal program instead of the one that broke it.
    """


class Watchdog:
    """Fails commits that wait too long for the replica instead of hanging the test.

    A thread checks that the replicator is alive, has not logged "replication
    interrupted" (nothing here is a fault to recover from, so it would retry
    the same batch forever) and that no commit inside `commit()` has waited
    more than `limit` seconds; if one fails, it removes the replicator from
    `synchronous_standby_names` on the primary (so the commit returns, locally
    committed) and `commit()` raises ReplicatorBroken with the replicator's log.
    """

    def __init__(self, primary: PostgresCluster, rep: ReplicatorProcess, limit: float) -> None:
        self.primary, self.rep, self.limit = primary, rep, limit
        self.fired: str | None = None
        self._since: float | None = None
        self._log_offset = len(rep.log())
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def __enter__(self) -> Watchdog:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()

    def _dead(self) -> str | None:
        code = self.rep.proc.poll() if self.rep.proc is not None else None
        return None if code is None else f"the replicator exited with code {code}"

    def _interrupted(self) -> str | None:
        """The first "replication interrupted" line the replicator logged, if any."""
        log = self.rep.log()
        for line in log[self._log_offset :].splitlines():
            if "replication interrupted" in line:
                return f"the replicator failed to apply: {line}"
        self._log_offset = max(self._log_offset, log.rfind("\n") + 1)
        return None

    def _watch(self) -> None:
        while not self._done.wait(0.05):
            since = self._since
            reason = self._dead() or self._interrupted()
            if reason is None and since is not None and time.monotonic() - since > self.limit:
                reason = f"a commit waited more than {self.limit} s for the replica"
            if reason is not None:
                self.fired = reason
                self.primary.psql(
                    "ALTER SYSTEM RESET synchronous_standby_names;\nSELECT pg_reload_conf();"
                )
                return

    def check(self) -> None:
        """Raises ReplicatorBroken if the replicator is gone (or fired before)."""
        if self.fired is None:
            self.fired = self._dead()
        if self.fired is not None:
            log = self.rep.log()
            raise ReplicatorBroken(f"{self.fired}\nreplicator log ends with:\n{log[-3000:]}")

    @contextmanager
    def commit(self) -> Iterator[None]:
        self.check()
        self._since = time.monotonic()
        try:
            yield
        finally:
            self._since = None
        self.check()


def digest(conn: psycopg.Connection[Any]) -> Digest:
    """`rows_digest` through an open connection (same SQL, so the same answer), but
    leaving out temporary tables, which only their own session can read."""
    tables = [
        r[0]
        for r in conn.execute(
            "SELECT format('%I.%I', schemaname, tablename) FROM pg_tables "
            "WHERE schemaname NOT IN ('pg_catalog', 'information_schema', 'haproxy_ln') "
            "AND schemaname NOT LIKE 'pg\\_temp\\_%' ORDER BY 1"
        )
    ]
    out = {}
    for t in tables:
        row = conn.execute(
            f"SELECT count(*), coalesce(md5(string_agg(r::text, ',' ORDER BY r::text)), '') "
            f"FROM {t} r"
        ).fetchone()
        assert row is not None
        out[t] = (int(row[0]), str(row[1]))
    return out


def _clip(text: str, n: int = 300) -> str:
    return text if len(text) <= n else f"{text[:n]}... ({len(text)} chars)"


def _table_rows(conn: psycopg.Connection[Any], table: str) -> list[str]:
    return [r[0] for r in conn.execute(f"SELECT r::text FROM {table} r ORDER BY 1")]


def _columns(conn: psycopg.Connection[Any], table: str) -> str:
    row = conn.execute(
        "SELECT string_agg(attname || ' ' || format_type(atttypid, atttypmod), ', ' "
        "ORDER BY attnum) FROM pg_attribute "
        "WHERE attrelid = %s::regclass AND attnum > 0 AND NOT attisdropped",
        (table,),
    ).fetchone()
    return str(row[0]) if row else "?"


def describe_difference(
    primary: psycopg.Connection[Any],
    replica: psycopg.Connection[Any],
    on_primary: Digest,
    on_replica: Digest,
) -> str:
    """Which tables differ, their columns and their first differing rows, both sides."""
    lines = []
    for table in sorted(on_primary.keys() | on_replica.keys()):
        p, r = on_primary.get(table), on_replica.get(table)
        if p == r:
            continue
        lines.append(f"table {table}: primary (rows, md5) {p}, replica {r}")
        if p is None or r is None:
            continue
        p_cols, r_cols = _columns(primary, table), _columns(replica, table)
        lines.append(f"  columns on the primary: {p_cols}")
        if r_cols != p_cols:
            lines.append(f"  columns on the replica: {r_cols}")
        p_rows, r_rows = _table_rows(primary, table), _table_rows(replica, table)
        first = next(
            (i for i, (a, b) in enumerate(zip(p_rows, r_rows, strict=False)) if a != b),
            min(len(p_rows), len(r_rows)),
        )
        lines.append(f"  rows ordered by text, first difference at row {first}:")
        lines.append(f"    primary: {_clip(p_rows[first]) if first < len(p_rows) else '(none)'}")
        lines.append(f"    replica: {_clip(r_rows[first]) if first < len(r_rows) else '(none)'}")
        only_p = list((Counter(p_rows) - Counter(r_rows)).elements())
        only_r = list((Counter(r_rows) - Counter(p_rows)).elements())
        lines.append(f"  {len(only_p)} rows only on the primary, e.g.:")
        lines.extend(f"    {_clip(row)}" for row in only_p[:3])
        lines.append(f"  {len(only_r)} rows only on the replica, e.g.:")
        lines.extend(f"    {_clip(row)}" for row in only_r[:3])
    return "\n".join(lines)


def assert_same(
    primary: psycopg.Connection[Any], replica: psycopg.Connection[Any], context: str = ""
) -> None:
    on_primary, on_replica = digest(primary), digest(replica)
    if on_primary != on_replica:
        raise AssertionError(
            f"the replica differs from the primary{context}:\n"
            + describe_difference(primary, replica, on_primary, on_replica)
        )


# -- values ----------------------------------------------------------------


@dataclass(frozen=True)
class BigBytes:
    """`size` random bytes (TOASTed out of line), made only when the program runs."""

    seed: int
    size: int

    def make(self) -> bytes:
        return random.Random(self.seed).randbytes(self.size)


@dataclass(frozen=True)
class BigText:
    """`size` random characters, some multi-byte, made only when the program runs."""

    seed: int
    size: int

    def make(self) -> str:
        rnd = random.Random(self.seed)
        return "".join(rnd.choice("aé€😀\t\x01 z'\"\\") for _ in range(self.size))


def materialize(value: Any) -> Any:
    return value.make() if isinstance(value, BigBytes | BigText) else value


def nullable(s: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.none() | s


LABELS = ["happy", "sad", "ñandú 😀", "it's", "x y"]
LATER_LABEL = "later"  # added by ALTER TYPE ... ADD VALUE during a program

TEXT = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=12)
JSON_SCALAR = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | TEXT
)
JSON = st.recursive(
    JSON_SCALAR,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(TEXT, children, max_size=3),
    max_leaves=6,
).map(Jsonb)
NUMERIC = st.one_of(
    st.sampled_from([Decimal("NaN"), Decimal("Infinity"), Decimal("-Infinity"), Decimal("0.000")]),
    st.builds(
        lambda digits, exponent: Decimal(f"{digits}E{exponent}"),
        st.integers(-(10**45), 10**45),
        st.integers(-40, 40),
    ),
)
BYTEA = st.binary(max_size=16) | st.builds(
    BigBytes, st.integers(0, 2**32), st.integers(100_000, 1_000_000)
)
ENUM = st.sampled_from([*LABELS, LATER_LABEL])

# column -> (type, strategy for its values); tk and tn have them all.
COLUMNS: dict[str, tuple[str, st.SearchStrategy[Any]]] = {
    "i2": ("int2", st.integers(-(2**15), 2**15 - 1)),
    "i4": ("int4", st.integers(-(2**31), 2**31 - 1)),
    "i8": ("int8", st.integers(-(2**63), 2**63 - 1)),
    "num": ("numeric", NUMERIC),
    "f4": ("float4", st.floats(width=32)),
    "f8": ("float8", st.floats()),
    "t": ("text", TEXT | st.builds(BigText, st.integers(0, 2**32), st.integers(3000, 50_000))),
    "b": ("bytea", BYTEA),
    "flag": ("bool", st.booleans()),
    "ts": ("timestamptz", st.datetimes(timezones=st.timezones())),
    "d": ("date", st.dates()),
    "iv": ("interval", st.timedeltas()),
    "u": ("uuid", st.uuids()),
    "j": ("jsonb", JSON),
    "ai": ("int4[]", st.lists(nullable(st.integers(-(2**31), 2**31 - 1)), max_size=3)),
    "at": ("text[]", st.lists(nullable(TEXT), max_size=3)),
    "m": ("mood", ENUM),
    "ma": ("mood[]", st.lists(nullable(ENUM), max_size=3)),
}
DROPPABLE = ["f4", "iv", "at", "ma", "x0", "x1", "x2"]
# Types of columns added by ALTER TABLE ... ADD COLUMN ... DEFAULT.
EXTRA_TYPES: dict[str, st.SearchStrategy[Any]] = {
    name: COLUMNS[col][1]
    for name, col in [
        ("int8", "i8"),
        ("numeric", "num"),
        ("float8", "f8"),
        ("bool", "flag"),
        ("timestamptz", "ts"),
        ("uuid", "u"),
        ("jsonb", "j"),
        ("int4[]", "ai"),
        ("mood", "m"),
    ]
}
EXTRA_TYPES["text"] = TEXT

TK_IDS = st.integers(0, 7)
TN_KEYS = st.integers(0, 3)
TM_IDS = st.sampled_from([uuid.UUID(int=n * 0x1_0001_0001) for n in range(6)])
KEYS = {"tk": TK_IDS, "tn": TN_KEYS, "tm": TM_IDS}
KEY_COLUMN = {"tk": "id", "tn": "k", "tm": "id"}

ROW = st.fixed_dictionaries({}, optional={c: nullable(s) for c, (_, s) in COLUMNS.items()})
TM_ROW = st.fixed_dictionaries(
    {},
    optional={
        "v": nullable(JSON),
        "a": nullable(COLUMNS["at"][1]),
        "n": nullable(NUMERIC),
        "b": nullable(BYTEA),
    },
)

SETUP_DDL = [
    "CREATE TYPE mood AS ENUM ({})".format(
        ", ".join("'" + s.replace("'", "''") + "'" for s in LABELS)
    ),
    "CREATE TABLE tk (id bigint PRIMARY KEY, {})".format(
        ", ".join(f"{c} {t}" for c, (t, _) in COLUMNS.items())
    ),
    # No primary key: the event trigger gives it REPLICA IDENTITY FULL; duplicates allowed.
    "CREATE TABLE tn (k int4, {})".format(", ".join(f"{c} {t}" for c, (t, _) in COLUMNS.items())),
]
TM_DDL = (
    "CREATE TABLE tm (id uuid PRIMARY KEY, v jsonb, a text[], n numeric DEFAULT 42, b bytea, "
    "note text DEFAULT '{}')"
)
# CREATE TABLE ... AS and SELECT ... INTO: their rows stream before their DDL.
TC_DDL = [
    "CREATE TABLE tc AS SELECT id, i4, t, b, j, ai FROM tk",
    "CREATE TABLE tc AS SELECT k, i4, t, b, at FROM tn WHERE k < 2",
    "SELECT id, i8, ts, ma INTO tc FROM tk WHERE id > 2",
    "SELECT k AS id, u INTO tc FROM tn UNION ALL SELECT id, u FROM tk",
]
# Columns whose values the primary computes when they are added: per row (a table
# rewrite, not decoded) or once (a fast default read by the rows already there).
COMPUTED_COLUMNS = [
    "float8 DEFAULT random()",
    "timestamptz DEFAULT clock_timestamp()",
    "timestamptz NOT NULL DEFAULT now()",
    "uuid DEFAULT gen_random_uuid()",
    "int8 DEFAULT nextval('hl_seq')",
    "text DEFAULT md5(random()::text)",
    "int8 GENERATED BY DEFAULT AS IDENTITY",
    "timestamptz DEFAULT '2024-02-03 04:05'",  # read in the client's time zone
]
TIME_ZONES = ["UTC", "Pacific/Chatham", "America/St_Johns", "Asia/Kolkata"]
# A DO block that runs each statement once: DDL and rows, the DDL with computed values.
DO_BLOCK = (
    "DO $$ BEGIN "
    "CREATE TABLE IF NOT EXISTS tx (id int PRIMARY KEY, r float8 DEFAULT random()); "
    "INSERT INTO tx (id) VALUES ({key}) ON CONFLICT DO NOTHING; "
    "ALTER TABLE tx ADD COLUMN IF NOT EXISTS a timestamptz DEFAULT now(); "
    "INSERT INTO tx (id) VALUES ({key} + 100) ON CONFLICT DO NOTHING; "
    "ALTER TABLE tx ALTER COLUMN r TYPE float8 USING r + random(); "
    "END $$"
)
RESET = [
    "DROP TABLE IF EXISTS tk, tn, tm, tc, tx",
    "DROP TYPE IF EXISTS mood",
    "DROP SEQUENCE IF EXISTS hl_seq",
    "CREATE SEQUENCE hl_seq",
]


# -- programs --------------------------------------------------------------


@dataclass(frozen=True)
class Op:
    kind: str
    table: str = ""
    key: Any = None
    other: Any = None  # a second key, a column, or a type, depending on the kind
    values: Any = None  # a row (dict), a value, or a list of rows


def _op(kind: str, table: str, **parts: st.SearchStrategy[Any]) -> st.SearchStrategy[Op]:
    return st.builds(Op, st.just(kind), st.just(table), **parts)


def _row_for(table: str) -> st.SearchStrategy[dict[str, Any]]:
    return TM_ROW if table == "tm" else ROW


def _add_column(tables: tuple[str, ...] = ("tk", "tn", "tm")) -> st.SearchStrategy[Op]:
    def with_type(type_: str) -> st.SearchStrategy[Op]:
        return st.builds(
            Op,
            st.just("add_column"),
            st.sampled_from(tables),
            st.sampled_from(["x0", "x1", "x2"]),
            st.just(type_),
            nullable(EXTRA_TYPES[type_]),  # the default, if any
        )

    return st.sampled_from(sorted(EXTRA_TYPES)).flatmap(with_type)


def _ops() -> st.SearchStrategy[Op]:
    tables = ["tk", "tn", "tm"]
    insert = st.one_of(
        *[_op("insert", t, key=KEYS[t], values=_row_for(t)) for t in ["tk", "tk", "tn", "tn", "tm"]]
    )
    update = st.one_of(*[_op("update", t, key=KEYS[t], values=_row_for(t)) for t in tables])
    return st.one_of(
        insert,
        insert,
        update,
        # only a small column changes: big TOASTed values go unchanged through pgoutput
        st.one_of(
            *[_op("touch", t, key=KEYS[t], values=nullable(st.integers(0, 99))) for t in tables]
        ),
        _op("set_pk", "tk", key=TK_IDS, other=st.integers(0, 11)),
        _op("set_pk", "tm", key=TM_IDS, other=TM_IDS),
        st.one_of(*[_op("delete", t, key=KEYS[t]) for t in tables]),
        _op("duplicate", "tn", key=TN_KEYS),
        st.builds(Op, st.just("truncate"), st.sampled_from(["tk", "tn", "tm", "tc", "tk, tn"])),
        _add_column(),
        _add_column(),
        st.builds(
            Op, st.just("drop_column"), st.sampled_from(tables), other=st.sampled_from(DROPPABLE)
        ),
        st.builds(Op, st.just("create_tm"), values=st.lists(st.tuples(TM_IDS, TM_ROW), max_size=3)),
        st.builds(
            Op, st.just("create_tm_one_query"), values=st.lists(st.tuples(TM_IDS, JSON), max_size=3)
        ),
        st.builds(
            Op,
            st.just("rows_then_ddl"),
            key=TN_KEYS,
            values=TEXT,
            other=_add_column(("tn",)),
        ),
        st.builds(Op, st.just("drop_table"), st.sampled_from(["tm", "tc"])),
        st.builds(Op, st.just("create_tc_as"), other=st.sampled_from(TC_DDL)),
        st.builds(Op, st.just("delete_one_tc")),
        st.builds(Op, st.just("recreate_tn")),
        st.builds(Op, st.just("add_enum_value")),
        st.builds(
            Op,
            st.just("add_computed_column"),
            st.sampled_from(tables),
            st.sampled_from(["x0", "x1", "x2"]),
            st.sampled_from(COMPUTED_COLUMNS),
            st.sampled_from(TIME_ZONES),
        ),
        st.builds(Op, st.just("recompute_column"), st.sampled_from(["tk", "tn"])),
        st.builds(
            Op,
            st.just("retype_ts"),
            st.sampled_from(["tk", "tn"]),
            other=st.sampled_from(TIME_ZONES),
        ),
        st.builds(Op, st.just("do_block"), key=st.integers(0, 5)),
    )


@dataclass(frozen=True)
class Transaction:
    ops: list[Op]
    commit: bool


TRANSACTION = st.builds(
    Transaction, st.lists(_ops(), min_size=1, max_size=10), st.booleans() | st.just(True)
)
SETUP_ROWS = st.lists(
    st.one_of(*[_op("insert", t, key=KEYS[t], values=ROW) for t in ["tk", "tn"]]), max_size=4
)


@dataclass(frozen=True)
class Program:
    setup_rows: list[Op]
    transactions: list[Transaction]


PROGRAM = st.builds(Program, SETUP_ROWS, st.lists(TRANSACTION, min_size=1, max_size=6))


# -- running programs ------------------------------------------------------


def _ident(name: str) -> sql.Identifier:
    return sql.Identifier(name)


def _existing(conn: psycopg.Connection[Any], table: str) -> dict[str, str]:
    """Columns of `table` as the running transaction sees them: name -> type."""
    rows = conn.execute(
        "SELECT attname, format_type(atttypid, atttypmod) FROM pg_attribute "
        "WHERE attrelid = to_regclass(%s) AND attnum > 0 AND NOT attisdropped",
        (table,),
    ).fetchall()
    return {r[0]: r[1] for r in rows}


def _placeholder(type_: str) -> sql.Composable:
    # Enums have no implicit cast from the text psycopg sends.
    return sql.SQL("%s::mood" if type_ == "mood" else "%s::mood[]" if type_ == "mood[]" else "%s")


def _values_for(
    conn: psycopg.Connection[Any], table: str, row: dict[str, Any]
) -> tuple[list[str], list[sql.Composable], list[Any]]:
    existing = _existing(conn, table)
    names = [c for c in row if c in existing]
    return names, [_placeholder(existing[c]) for c in names], [materialize(row[c]) for c in names]


def _literal(conn: psycopg.Connection[Any], value: Any, type_: str) -> str:
    if value is None:
        return "NULL"
    return f"{sql.Literal(materialize(value)).as_string(conn)}::{type_}"


class Runner:
    def __init__(self, conn: psycopg.Connection[Any], watchdog: Watchdog) -> None:
        self.conn = conn
        self.watchdog = watchdog
        self.trace: list[str] = []  # what ran, for failure messages
        self.outcomes: Counter[str] = Counter()  # "kind ok" / "kind failed"

    def execute(
        self, query: sql.Composed | sql.SQL | str, params: list[Any] | tuple[Any, ...] = ()
    ) -> None:
        text = query if isinstance(query, str) else query.as_string(self.conn)
        shown = ", ".join(_clip(repr(p), 200) for p in params)
        self.trace.append(_clip(text, 400) + (f"  -- params: {shown}" if params else ""))
        self.conn.execute(query, params or None)

    def op(self, op: Op) -> None:
        """Run `op` under a savepoint; if the primary refuses it, roll it back and go on."""
        self.execute("SAVEPOINT op")
        try:
            self._op(op)
        except psycopg.DatabaseError as e:
            self.trace.append(f"  -> failed, rolled back to the savepoint: {e.sqlstate} {e}")
            self.execute("ROLLBACK TO SAVEPOINT op")
            self.outcomes[f"{op.kind} failed"] += 1
        else:
            self.execute("RELEASE SAVEPOINT op")
            self.outcomes[f"{op.kind} ok"] += 1

    def commit(self) -> None:
        self.trace.append("COMMIT")
        with self.watchdog.commit():
            self.conn.commit()

    def rollback(self) -> None:
        self.trace.append("ROLLBACK")
        self.conn.rollback()

    def _insert(self, table: str, key: Any, row: dict[str, Any]) -> None:
        names, marks, params = self._row(table, row)
        self.execute(
            sql.SQL("INSERT INTO {} ({}) VALUES ({})").format(
                _ident(table),
                sql.SQL(", ").join(map(_ident, [KEY_COLUMN[table], *names])),
                sql.SQL(", ").join([sql.SQL("%s"), *marks]),
            ),
            [key, *params],
        )

    def _row(
        self, table: str, row: dict[str, Any]
    ) -> tuple[list[str], list[sql.Composable], list[Any]]:
        return _values_for(self.conn, table, row)

    def _op(self, op: Op) -> None:
        t, key = op.table, op.key
        if op.kind == "insert":
            self._insert(t, key, op.values)
        elif op.kind == "update":
            names, marks, params = self._row(t, op.values)
            if not names:
                return
            sets = sql.SQL(", ").join(
                sql.SQL("{} = {}").format(_ident(n), m) for n, m in zip(names, marks, strict=True)
            )
            self.execute(
                sql.SQL("UPDATE {} SET {} WHERE {} = %s").format(
                    _ident(t), sets, _ident(KEY_COLUMN[t])
                ),
                [*params, key],
            )
        elif op.kind == "touch":
            column = "n" if t == "tm" else "i4"
            self.execute(
                sql.SQL("UPDATE {} SET {} = %s WHERE {} = %s").format(
                    _ident(t), _ident(column), _ident(KEY_COLUMN[t])
                ),
                [op.values, key],
            )
        elif op.kind == "set_pk":
            self.execute(
                sql.SQL("UPDATE {} SET id = %s WHERE id = %s").format(_ident(t)), [op.other, key]
            )
        elif op.kind == "delete":
            self.execute(
                sql.SQL("DELETE FROM {} WHERE {} = %s").format(_ident(t), _ident(KEY_COLUMN[t])),
                [key],
            )
        elif op.kind == "duplicate":
            self.execute("INSERT INTO tn (SELECT * FROM tn WHERE k = %s LIMIT 1)", [key])
        elif op.kind == "truncate":
            self.execute(f"TRUNCATE {t}")
        elif op.kind == "add_column":
            default = (
                "" if op.values is None else f" DEFAULT {_literal(self.conn, op.values, op.other)}"
            )
            self.execute(f"ALTER TABLE {t} ADD COLUMN {key} {op.other}{default}")
        elif op.kind == "drop_column":
            self.execute(f"ALTER TABLE {t} DROP COLUMN {op.other}")
        elif op.kind == "create_tm":
            # CREATE TABLE and rows in one transaction, the rows as parameters
            self.execute(TM_DDL.format("créé 😀"))
            for id_, row in op.values:
                self._insert("tm", id_, row)
        elif op.kind == "create_tm_one_query":
            # DDL and DML in one query text: the replica must run the DDL only
            rows = ", ".join(
                f"({_literal(self.conn, id_, 'uuid')}, {_literal(self.conn, v, 'jsonb')})"
                for id_, v in op.values
            )
            self.execute(
                TM_DDL.format("créé 😀")
                + (f"; INSERT INTO tm (id, v) VALUES {rows}" if rows else "")
            )
        elif op.kind == "rows_then_ddl":
            # DML before DDL in one query text: the replica must run the DDL only
            add = op.other
            text = _literal(self.conn, op.values, "text")
            default = (
                ""
                if add.values is None
                else f" DEFAULT {_literal(self.conn, add.values, add.other)}"
            )
            self.execute(
                f"INSERT INTO tn (k, t) VALUES ({key}, {text}); "
                f"ALTER TABLE tn ADD COLUMN {add.key} {add.other}{default}"
            )
        elif op.kind == "create_tc_as":
            self.execute(op.other)
        elif op.kind == "delete_one_tc":
            self.execute("DELETE FROM tc WHERE ctid = (SELECT min(ctid) FROM tc)")
        elif op.kind == "drop_table":
            self.execute(f"DROP TABLE {t}")
        elif op.kind == "recreate_tn":
            self.execute("DROP TABLE tn")
            self.execute(SETUP_DDL[2])
        elif op.kind == "add_enum_value":
            self.execute(f"ALTER TYPE mood ADD VALUE IF NOT EXISTS '{LATER_LABEL}'")
        elif op.kind == "add_computed_column":
            self.execute(f"SET LOCAL TimeZone = '{op.values}'")
            self.execute(f"ALTER TABLE {t} ADD COLUMN {key} {op.other}")
        elif op.kind == "recompute_column":
            # a rewrite with values computed per row
            self.execute(f"ALTER TABLE {t} ALTER COLUMN f8 TYPE float8 USING f8 + random()")
        elif op.kind == "retype_ts":
            # timestamptz -> timestamp reads the client's time zone
            self.execute(f"SET LOCAL TimeZone = '{op.other}'")
            self.execute(f"ALTER TABLE {t} ALTER COLUMN ts TYPE timestamp")
        elif op.kind == "do_block":
            self.execute(DO_BLOCK.format(key=key))
        else:
            raise AssertionError(f"unknown op {op.kind}")


# Kinds of operation that must have succeeded at least once, or the run proved little.
MUST_SUCCEED = [
    "insert",
    "update",
    "touch",
    "set_pk",
    "delete",
    "truncate",
    "add_column",
    "add_computed_column",
    "recompute_column",
    "do_block",
]


# One program with every kind above, run before the drawn ones: what hypothesis draws
# is not uniform, and a run once drew about 730 operations without an
# add_computed_column, which failed the check below with nothing wrong.
EVERY_KIND = Program(
    [Op("insert", "tk", 1, values={"i4": 1}), Op("insert", "tn", 1, values={"t": "a"})],
    [
        Transaction(
            [
                Op("insert", "tk", 2, values={"i8": 2}),
                Op("update", "tk", 1, values={"i2": 3}),
                Op("touch", "tn", 1, values=4),
                Op("set_pk", "tk", 2, other=3),
                Op("delete", "tk", 3),
                Op("truncate", "tn"),
                Op("add_column", "tk", "x0", "int8", 5),
                Op("add_computed_column", "tk", "x1", COMPUTED_COLUMNS[0], TIME_ZONES[1]),
                Op("recompute_column", "tk"),
                Op("do_block", key=1),
            ],
            True,
        )
    ],
)


def run_program(
    program: Program,
    runner: Runner,
    p_read: psycopg.Connection[Any],
    r_read: psycopg.Connection[Any],
    pair: Pair,
) -> None:
    runner.conn.rollback()
    for statement in RESET:
        runner.execute(statement)
    runner.commit()
    for statement in SETUP_DDL:
        runner.execute(statement)
    for op in program.setup_rows:
        runner.op(op)
    runner.commit()
    assert_same(p_read, r_read, " after the setup transaction")
    for i, tx in enumerate(program.transactions):
        for op in tx.ops:
            runner.op(op)
        if tx.commit:
            runner.commit()
            assert_same(p_read, r_read, f" after transaction {i}")
        else:
            runner.rollback()
    runner.conn.rollback()
    primary, replica = pair
    on_primary, on_replica = rows_digest(primary), rows_digest(replica)
    assert on_replica == on_primary, "rows_digest differs:\n" + describe_difference(
        p_read, r_read, on_primary, on_replica
    )


# Hypothesis warns about the size of the programs' strategy repr; nothing to act on.
@pytest.mark.filterwarnings("ignore:Generating overly large repr")
def test_random_programs_leave_the_replica_equal_to_the_primary(
    pg_pair: Pair, tmp_path: Path
) -> None:
    primary, replica = pg_pair
    rep = ReplicatorProcess(primary, replica, tmp_path / "rep.log").start()
    outcomes: Counter[str] = Counter()
    examples = 0
    try:
        with (
            Watchdog(primary, rep, COMMIT_LIMIT) as watchdog,
            psycopg.connect(primary.dsn()) as conn,
            psycopg.connect(primary.dsn(), autocommit=True) as p_read,
            psycopg.connect(replica.dsn(), autocommit=True) as r_read,
        ):

            @settings(
                max_examples=40,
                deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
                print_blob=True,
            )
            @given(program=PROGRAM)
            @example(program=EVERY_KIND)
            def run(program: Program) -> None:
                nonlocal examples
                examples += 1
                runner = Runner(conn, watchdog)
                try:
                    run_program(program, runner, p_read, r_read, pg_pair)
                except (AssertionError, ReplicatorBroken) as e:
                    e.add_note("statements run in this example:\n" + "\n".join(runner.trace))
                    raise
                finally:
                    outcomes.update(runner.outcomes)

            run()
        assert examples >= 20, f"only {examples} examples ran"
        never = [kind for kind in MUST_SUCCEED if not outcomes[f"{kind} ok"]]
        assert not never, f"these operations never succeeded: {never}; outcomes: {outcomes}"
    finally:
        code = rep.stop()
    assert code == 0, rep.log()


# -- extreme values, deterministic -----------------------------------------

BIG_TEXT = BigText(7, 200_000).make()
BIG_BYTES = BigBytes(7, 1_000_000).make()
HUGE_NUMERIC = "-" + "9" * 131072 + "." + "9" * 16383  # the most digits numeric takes
TINY_NUMERIC = "0." + "0" * 16382 + "1"
JSON_UNICODE = (
    '{"ключ": "значение", "😀": [1, 2.5e300, null, true, false, -0.0, 1e-300], '
    '"": {"a\\u0001b": "\\t\\n"}, "k\\"q": "\\ud83d\\ude00", "ü": {"😀": {"": []}}}'
)

# column -> (type, values): row i in round g holds values[(i + g) % len(values)], so
# every value meets every kind of change; None is SQL NULL, str is parsed by the type.
EXTREMES: dict[str, tuple[str, list[Any]]] = {
    "i2": ("int2", ["-32768", "32767", None]),
    "i4": ("int4", ["-2147483648", "2147483647", None]),
    "i8": ("int8", ["-9223372036854775808", "9223372036854775807", None]),
    "num": ("numeric", ["NaN", "Infinity", HUGE_NUMERIC, TINY_NUMERIC, "-Infinity", None]),
    "f4": ("float4", ["NaN", "-0", "1.4e-45", "3.4028235e38", "-Infinity", None]),
    "f8": ("float8", ["1e-300", "-0", "NaN", "5e-324", "1.7976931348623157e308", "Infinity", None]),
    "t": ("text", ["\x01\x02\t\n\r\x1b\x7f ünïcødé 😀 \u2028 'q' \"dq\" \\", BIG_TEXT, "", None]),
    "b": ("bytea", [b"", BIG_BYTES, b"\x00\xff\\'", None]),
    "flag": ("bool", ["true", "false", None]),
    "ts": (
        "timestamptz",
        [
            "-infinity",
            "infinity",
            "4713-01-01 00:00:00+00 BC",
            "294276-12-31 23:59:59.999999+00",
            "2000-01-01 00:00:00.000001+15:59",
            None,
        ],
    ),
    "d": ("date", ["-infinity", "infinity", "4713-01-01 BC", "5874897-12-31", None]),
    "iv": (
        "interval",
        [
            "-178000000 years",
            "178000000 years",
            "-1 microseconds",
            "-2147483648 days",
            "1 mon -1 days +00:00:00.000001",
            None,
        ],
    ),
    "u": (
        "uuid",
        ["00000000-0000-0000-0000-000000000000", "ffffffff-ffff-ffff-ffff-ffffffffffff", None],
    ),
    "j": ("jsonb", [JSON_UNICODE, "[]", '"\\u2028"', "null", None]),
    "ai": ("int4[]", ["{-2147483648,NULL,2147483647}", "{}", "{{1,2},{3,4}}", "[0:1]={5,6}", None]),
    "at": ("text[]", ['{"a,b","\\"q\\"","\\\\",NULL,"NULL",""}', "{}", '{"ü😀","x y","{}"}', None]),
    "m": ("mood", ["ñandú 😀", "it's", None]),
    "ma": ("mood[]", ["{}", '{happy,NULL,"it\'s","ñandú 😀"}', None]),
}
EXTREME_ROWS = 4


def _extreme(column: str, row: int, round_: int) -> Any:
    values = EXTREMES[column][1]
    return values[(row + round_) % len(values)]


def _extreme_columns(table: str) -> list[str]:
    return list(EXTREMES)


def _set_extremes(table: str, row: int, round_: int) -> tuple[sql.Composable, list[Any]]:
    """`c1 = CAST(%s AS t1), ...` and its parameters for row `row` in round `round_`."""
    columns = _extreme_columns(table)
    sets = sql.SQL(", ").join(
        sql.SQL("{} = CAST(%s AS {})").format(_ident(c), sql.SQL(EXTREMES[c][0])) for c in columns
    )
    return sets, [_extreme(c, row, round_) for c in columns]


def test_extreme_values_of_every_type_replicate_exactly(pg_pair: Pair, tmp_path: Path) -> None:
    """One row per extreme value of each type, inserted, updated (the key too), touched
    (TOASTed values unchanged) and deleted; the replica must match exactly after each commit,
    with a primary key and without one (REPLICA IDENTITY FULL, duplicate rows)."""
    primary, replica = pg_pair
    rep = ReplicatorProcess(primary, replica, tmp_path / "rep.log").start()
    try:
        with (
            Watchdog(primary, rep, COMMIT_LIMIT) as watchdog,
            psycopg.connect(primary.dsn()) as conn,
            psycopg.connect(primary.dsn(), autocommit=True) as p_read,
            psycopg.connect(replica.dsn(), autocommit=True) as r_read,
        ):
            runner = Runner(conn, watchdog)

            def commit(what: str) -> None:
                runner.commit()
                assert_same(p_read, r_read, f" after {what}")

            runner.execute(SETUP_DDL[0])
            for table, key in [("ext_pk", "id int PRIMARY KEY"), ("ext_full", "k int")]:
                columns = ", ".join(f"{c} {EXTREMES[c][0]}" for c in _extreme_columns(table))
                runner.execute(f"CREATE TABLE {table} ({key}, note int, {columns})")
            commit("creating the tables")
            for table, key in [("ext_pk", "id"), ("ext_full", "k")]:
                for row in range(EXTREME_ROWS):
                    sets, params = _set_extremes(table, row, 0)
                    runner.execute(f"INSERT INTO {table} ({key}, note) VALUES (%s, 0)", [row])
                    runner.execute(
                        sql.SQL("UPDATE {} SET {} WHERE {} = %s").format(
                            _ident(table), sets, _ident(key)
                        ),
                        [*params, row],
                    )
            runner.execute("INSERT INTO ext_full SELECT * FROM ext_full")  # duplicates
            commit("inserting")
            for round_ in range(1, 4):
                for row in range(EXTREME_ROWS):
                    sets, params = _set_extremes("ext_pk", row, round_)
                    runner.execute(
                        sql.SQL(
                            "UPDATE ext_pk SET id = id + 100, {} WHERE mod(id, 100) = %s"
                        ).format(sets),
                        [*params, row],
                    )
                    sets, params = _set_extremes("ext_full", row, round_)
                    runner.execute(
                        sql.SQL(
                            "UPDATE ext_full SET {} "
                            "WHERE ctid = (SELECT ctid FROM ext_full WHERE k = %s LIMIT 1)"
                        ).format(sets),
                        [*params, row],
                    )
                commit(f"update round {round_}")
            # Only a small column changes: TOASTed values travel as "unchanged".
            runner.execute("UPDATE ext_pk SET note = note + 1")
            runner.execute("UPDATE ext_full SET note = note + 1")
            commit("touching the rows")
            runner.execute("DELETE FROM ext_pk WHERE mod(id, 2) = 0")
            runner.execute(
                "DELETE FROM ext_full WHERE ctid IN "
                "(SELECT min(ctid) FROM ext_full GROUP BY k HAVING mod(k, 2) = 0)"
            )
            runner.execute("DELETE FROM ext_full WHERE k = 1")
            commit("deleting")
            on_primary = rows_digest(primary)
            assert on_primary["public.ext_pk"][0] == 2
            assert on_primary["public.ext_full"][0] == 4
            assert rows_digest(replica) == on_primary
    except ReplicatorBroken as e:
        raise AssertionError(str(e)) from None
    finally:
        code = rep.stop()
    assert code == 0, rep.log()


# -- DDL and replica identity edge cases; known bugs as strict xfails -------


def replicate_each(
    pair: Pair,
    tmp_path: Path,
    transactions: list[str | list[str]],
    *,
    before_replicator: str = "",
) -> None:
    """Run each transaction (a query text, or several) and commit it; assert the replica
    equals the primary after each; fails (instead of hanging) if the replicator cannot apply."""
    primary, replica = pair
    if before_replicator:
        primary.psql(before_replicator)
    rep = ReplicatorProcess(primary, replica, tmp_path / "rep.log").start()
    try:
        with (
            Watchdog(primary, rep, COMMIT_LIMIT) as watchdog,
            psycopg.connect(primary.dsn()) as conn,
            psycopg.connect(primary.dsn(), autocommit=True) as p_read,
            psycopg.connect(replica.dsn(), autocommit=True) as r_read,
        ):
            for transaction in transactions:
                for statement in [transaction] if isinstance(transaction, str) else transaction:
                    conn.execute(statement)
                with watchdog.commit():
                    conn.commit()
                assert_same(p_read, r_read, f" after {transaction!r}")
    except ReplicatorBroken as e:
        raise AssertionError(str(e)) from None
    finally:
        code = rep.stop()
    assert code == 0, rep.log()


def test_non_ascii_text_around_ddl_in_one_query(pg_pair: Pair, tmp_path: Path) -> None:
    """The DDL of a multi-statement query is cut out of its text: multi-byte characters
    before or inside it must not shift the cut."""
    replicate_each(
        pg_pair,
        tmp_path,
        [
            "CREATE TABLE a (id int PRIMARY KEY, v text DEFAULT 'é'); CREATE TABLE b (x int)",
            "INSERT INTO a VALUES (1, 'ü😀'); ALTER TABLE a ADD COLUMN c int DEFAULT 7",
            "/* ключ 😀 */ INSERT INTO b VALUES (1); -- é\nCREATE INDEX ON a (v); DROP TABLE b",
        ],
    )


# Types whose text from `::text` is not their output text, among others.
FULL_IDENTITY_TYPES = {
    "bool": "false",
    "inet": "10.0.0.1",
    "cidr": "10.0.0.0/8",
    "char(4)": "ab",
    "varchar(3)": "ab ",
    "money": "-12.34",
    "macaddr": "08:00:2b:01:02:03",
    "point": "(1.5,-0)",
    "json": '{"b": 1,  "a": [1, 2]}',
    "xml": "<a>x &amp; y</a>",
    "bit(3)": "101",
    "tsvector": "a:1 b:2",
    "int4range": "[1,5)",
    "numeric(10,2)": "-0.50",
    "timetz": "12:00:00-03:30",
    "timestamp": "infinity",
    "float4[]": "{NaN,-0,1e-45}",
}


def test_rows_without_a_key_are_found_whatever_their_types(pg_pair: Pair, tmp_path: Path) -> None:
    """REPLICA IDENTITY FULL: updates and deletes find the row by all its old values."""
    columns = ", ".join(f"c{i} {t}" for i, t in enumerate(FULL_IDENTITY_TYPES))
    values = ", ".join(f"'{v}'" for v in FULL_IDENTITY_TYPES.values())
    replicate_each(
        pg_pair,
        tmp_path,
        [
            f"CREATE TABLE t (k int, {columns}); INSERT INTO t VALUES (1, {values}), (1, {values})",
            "UPDATE t SET k = 2 WHERE ctid = (SELECT min(ctid) FROM t)",
            "UPDATE t SET c0 = NOT c0 WHERE k = 2",
            "DELETE FROM t WHERE k = 1",
            "DELETE FROM t",
        ],
    )


def test_ddl_and_rows_in_a_do_block(pg_pair: Pair, tmp_path: Path) -> None:
    """A DO block that runs each of its statements once: the replica runs its DDL
    statements, each where PostgreSQL ran it, and its rows come from the stream only."""
    replicate_each(
        pg_pair,
        tmp_path,
        [
            "DO $$ BEGIN CREATE TABLE x (id int PRIMARY KEY); INSERT INTO x VALUES (1); END $$",
            "DO $$ DECLARE n int; BEGIN INSERT INTO x VALUES (2); SELECT count(*) INTO n FROM x; "
            "RAISE NOTICE 'rows: %', n; BEGIN ALTER TABLE x ADD COLUMN v float8 DEFAULT random(); "
            "END; INSERT INTO x (id) VALUES (3); CREATE INDEX ON x (v); END $$",
            [
                "INSERT INTO x VALUES (4)",
                "DO $$ BEGIN ALTER TABLE x DROP COLUMN v; INSERT INTO x VALUES (5); END $$; "
                "INSERT INTO x VALUES (6)",
            ],
        ],
    )


def stops_loudly(pair: Pair, tmp_path: Path, setup: str, statement: str, says: list[str]) -> None:
    """Commit `statement` on the primary (not waiting for the replica): the replicator
    must stop with an error saying each of `says`, having applied nothing of it."""
    primary, replica = pair
    primary.psql(setup)
    rep = ReplicatorProcess(primary, replica, tmp_path / "rep.log").start()
    try:
        before = rows_digest(replica)
        with psycopg.connect(primary.dsn(), autocommit=True) as conn:
            conn.execute("SET synchronous_commit = local")
            conn.execute(statement)
        assert rep.proc is not None
        try:
            code = rep.proc.wait(COMMIT_LIMIT)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the replicator did not stop:\n{rep.log()[-3000:]}") from None
        log = rep.log()
        assert code == 1, log[-3000:]
        for words in says:
            assert words in log, log[-3000:]
        assert rows_digest(replica) == before
        assert rows_digest(primary) != before  # the transaction did commit there
    finally:
        rep.stop()


ROWS_BY_CODE = "CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t VALUES (1)"
# (setup, a statement that runs DDL and rows inside code)
DDL_INSIDE_CODE = {
    "a DO block with a branch": (
        ROWS_BY_CODE,
        "DO $$ BEGIN IF (SELECT count(*) FROM t) > 0 THEN "
        "CREATE TABLE y (id int PRIMARY KEY); INSERT INTO y VALUES (1); END IF; END $$",
    ),
    "a function": (
        ROWS_BY_CODE + "; CREATE FUNCTION mk() RETURNS void LANGUAGE plpgsql AS "
        "$f$ BEGIN CREATE TABLE y (id int PRIMARY KEY); INSERT INTO y VALUES (1); END $f$",
        "SELECT mk()",
    ),
    "a procedure": (
        ROWS_BY_CODE + "; CREATE PROCEDURE mk() LANGUAGE plpgsql AS "
        "$f$ BEGIN ALTER TABLE t ADD COLUMN v int; INSERT INTO t VALUES (2, 2); END $f$",
        "CALL mk()",
    ),
    "a trigger": (
        ROWS_BY_CODE + "; CREATE FUNCTION mk() RETURNS trigger LANGUAGE plpgsql AS "
        "$f$ BEGIN CREATE TABLE y (id int); RETURN NEW; END $f$; "
        "CREATE TRIGGER mk BEFORE INSERT ON t FOR EACH ROW EXECUTE FUNCTION mk()",
        "CREATE INDEX ON t (id); INSERT INTO t VALUES (2)",
    ),
}


@pytest.mark.parametrize("case", list(DDL_INSIDE_CODE))
def test_ddl_inside_code_stops_replication_loudly(pg_pair: Pair, tmp_path: Path, case: str) -> None:
    """DDL run by code the replica cannot replay alone (it would run the code's rows a
    second time) stops the replicator with an error saying what to do, applying nothing."""
    setup, statement = DDL_INSIDE_CODE[case]
    stops_loudly(
        pg_pair,
        tmp_path,
        setup,
        statement,
        ["cannot repeat exactly", "DDL ran inside", "haproxy-ln reseed"],
    )


def test_after_such_a_stop_the_documented_recovery_works(pg_pair: Pair, tmp_path: Path) -> None:
    """docs/replication.md: release the primary's wait, reseed, replicate again."""
    setup, statement = DDL_INSIDE_CODE["a function"]
    stops_loudly(pg_pair, tmp_path, setup, statement, ["haproxy-ln reseed"])
    primary, replica = pg_pair
    primary.psql("ALTER SYSTEM RESET synchronous_standby_names;\nSELECT pg_reload_conf();")
    argv = ["reseed", "--source", primary.dsn(), "--replica", replica.dsn()]
    reseed = subprocess.run(
        [sys.executable, "-m", "haproxy_ln", *argv],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert reseed.returncode == 0, reseed.stderr
    rep = ReplicatorProcess(primary, replica, tmp_path / "again.log").start()
    try:
        primary.psql("INSERT INTO y VALUES (2)")
        assert rows_digest(replica) == rows_digest(primary)
        assert "public.y" in rows_digest(replica)
    finally:
        assert rep.stop() == 0, rep.log()


def test_a_text_that_commits_between_ddl_statements_stops_replication(
    pg_pair: Pair, tmp_path: Path
) -> None:
    """A query text whose DDL spans transactions: its commands cannot be paired."""
    stops_loudly(
        pg_pair,
        tmp_path,
        "SELECT 1",
        "CREATE TABLE a (id int); COMMIT; CREATE TABLE b (id int)",
        ["ends a transaction", "haproxy-ln reseed"],
    )


def test_each_ddl_statement_of_a_text_runs_where_it_ran(pg_pair: Pair, tmp_path: Path) -> None:
    """The DDL statements of one query text run on the replica each at its own place
    among the text's rows: a column retyped (with a USING expression) or dropped
    after rows went in sees those rows."""
    replicate_each(
        pg_pair,
        tmp_path,
        [
            "CREATE TABLE a (id int PRIMARY KEY, v int, w int); INSERT INTO a VALUES (1, 2, 3); "
            "ALTER TABLE a ALTER COLUMN v TYPE text USING v::text || 'x'; "
            "INSERT INTO a VALUES (2, 'y', 4); ALTER TABLE a DROP COLUMN w; "
            "INSERT INTO a VALUES (3, 'z')",
            "BEGIN; INSERT INTO a VALUES (4, 'q'); CREATE TABLE b AS SELECT * FROM a; "
            "DROP TABLE a; COMMIT",
        ],
    )


def test_temporary_tables_stay_on_the_primary(pg_pair: Pair, tmp_path: Path) -> None:
    """DDL on temporary objects is not replayed: the replica would keep them in its
    own session (a second CREATE TEMP TABLE of the same name would then fail)."""
    replicate_each(
        pg_pair,
        tmp_path,
        [
            ["CREATE TEMP TABLE t (id int)", "INSERT INTO t VALUES (1)", "CREATE TABLE p (id int)"],
            [
                "ALTER TABLE t ADD COLUMN v int",
                "CREATE INDEX ON t (id)",
                "INSERT INTO p VALUES (1)",
            ],
            ["DISCARD TEMP", "CREATE TEMP TABLE t (id int) ON COMMIT DROP", "DROP TABLE p"],
            ["CREATE TEMP TABLE t (id int)", "DROP TABLE t", "CREATE TABLE p (id int)"],
        ],
    )


SOURCE_TABLE = (
    "CREATE TABLE s (id int PRIMARY KEY, v text); INSERT INTO s VALUES (1, 'a'), (2, 'b')"
)


def test_create_table_as(pg_pair: Pair, tmp_path: Path) -> None:
    """Its rows stream before its DDL message: the replica creates the table empty first.
    A materialized view's rows are not streamed: the replica computes them."""
    replicate_each(
        pg_pair,
        tmp_path,
        [
            "CREATE TABLE c AS SELECT * FROM s",
            "CREATE TABLE d AS SELECT id FROM s WHERE id > 1; INSERT INTO d VALUES (7)",
            ["INSERT INTO s VALUES (3, 'c')", "CREATE TABLE f AS SELECT v FROM s", "DROP TABLE d"],
            "CREATE TABLE e AS SELECT * FROM s WHERE false",
            "CREATE MATERIALIZED VIEW mv AS SELECT id FROM s",
        ],
        before_replicator=SOURCE_TABLE,
    )
    primary, replica = pg_pair
    assert replica.psql("SELECT count(*) FROM mv") == primary.psql("SELECT count(*) FROM mv")


def test_select_into(pg_pair: Pair, tmp_path: Path) -> None:
    """SELECT ... INTO streams its rows before its DDL message, like CREATE TABLE AS."""
    replicate_each(
        pg_pair,
        tmp_path,
        [
            "SELECT * INTO c FROM s",
            "SELECT id, v INTO d FROM s WHERE id = 1 UNION ALL SELECT 9, 'z'",
            "INSERT INTO s VALUES (3, 'c'); SELECT * INTO e FROM s; SELECT 1 AS one INTO f",
        ],
        before_replicator=SOURCE_TABLE,
    )


def test_create_table_as_replacing_a_table_with_rows(pg_pair: Pair, tmp_path: Path) -> None:
    """The new c's DDL moves before the new c's rows only, not before rows of the c
    it replaces (the tables are told apart by their OID)."""
    replicate_each(
        pg_pair,
        tmp_path,
        [
            ["DELETE FROM c WHERE id = 1", "DROP TABLE c", "CREATE TABLE c AS SELECT * FROM s"],
            "DELETE FROM c WHERE id = 2; DROP TABLE c; SELECT * INTO c FROM s; "
            "INSERT INTO c VALUES (5, 'e')",
        ],
        before_replicator=SOURCE_TABLE + "; CREATE TABLE c (id int PRIMARY KEY); "
        "INSERT INTO c VALUES (1), (2)",
    )


def column_defaults(cluster: PostgresCluster) -> str:
    """Every column default of the public schema, as SQL text."""
    return cluster.psql(
        "SELECT c.relname, a.attname, pg_get_expr(d.adbin, d.adrelid) FROM pg_attrdef d "
        "JOIN pg_class c ON c.oid = d.adrelid JOIN pg_attribute a "
        "ON a.attrelid = d.adrelid AND a.attnum = d.adnum "
        "WHERE c.relnamespace = 'public'::regnamespace ORDER BY 1, 2"
    )


COMPUTED_SETUP = (
    "CREATE TABLE s (id int PRIMARY KEY, v text); "
    "INSERT INTO s SELECT g, 'v' || g FROM generate_series(1, 50) g; "
    "CREATE TABLE n (k int, v text); "  # no key: REPLICA IDENTITY FULL, duplicate rows
    "INSERT INTO n SELECT g % 3, 'x' FROM generate_series(1, 20) g; "
    "CREATE SEQUENCE q START 100; "
    "CREATE TABLE p (id int, v int) PARTITION BY RANGE (id); "
    "CREATE TABLE p1 PARTITION OF p FOR VALUES FROM (0) TO (100); "
    "CREATE TABLE p2 PARTITION OF p FOR VALUES FROM (100) TO (200); "
    "INSERT INTO p SELECT g, g FROM generate_series(1, 150, 7) g"
)


def test_add_column_with_volatile_default(pg_pair: Pair, tmp_path: Path) -> None:
    """ADD COLUMN (or a new type) whose values the primary computes per row rewrites the
    table, which is not decoded: the primary sends the table's rows with the DDL. A
    default computed once (now(), a literal read in the client's time zone) gives the
    rows already there the primary's value. The defaults stay the statements' own."""
    replicate_each(
        pg_pair,
        tmp_path,
        [
            "ALTER TABLE s ADD COLUMN r float8 DEFAULT random()",
            "ALTER TABLE s ADD COLUMN c timestamptz DEFAULT clock_timestamp(), "
            "ADD COLUMN q bigint DEFAULT nextval('q')",
            "ALTER TABLE s ADD COLUMN u uuid UNIQUE DEFAULT gen_random_uuid()",
            "ALTER TABLE s ADD COLUMN i bigint GENERATED ALWAYS AS IDENTITY",
            [
                "SELECT pg_sleep(0.01)",
                "ALTER TABLE s ADD COLUMN t timestamptz NOT NULL DEFAULT now()",
                "INSERT INTO s (id, v) VALUES (51, 'new')",
                "UPDATE s SET r = 0.5 WHERE id = 2",
            ],
            "ALTER TABLE s ALTER COLUMN t SET DEFAULT '2000-01-01 00:00+00'",
            # t exists: the replica must leave it (and its default) alone
            "ALTER TABLE s ADD COLUMN IF NOT EXISTS t timestamptz DEFAULT now()",
            [
                "SET TimeZone = 'Pacific/Chatham'",
                "ALTER TABLE s ADD COLUMN l timestamptz DEFAULT '2024-02-03 04:05'",
                "ALTER TABLE s ADD COLUMN d date DEFAULT current_date + 1",
            ],
            "ALTER TABLE n ADD COLUMN r float8 DEFAULT random()",
            "UPDATE n SET v = 'y' WHERE ctid = (SELECT min(ctid) FROM n WHERE k = 1)",
            "ALTER TABLE p ADD COLUMN r float8 DEFAULT random(), "
            "ADD COLUMN t timestamptz DEFAULT now()",
            "ALTER TABLE p ADD COLUMN t2 timestamptz DEFAULT statement_timestamp()",
            "ALTER TABLE s ALTER COLUMN v TYPE text USING v || random()",
            ["SET TimeZone = 'Asia/Kolkata'", "ALTER TABLE s ALTER COLUMN c TYPE timestamp"],
        ],
        before_replicator=COMPUTED_SETUP,
    )
    primary, replica = pg_pair
    assert column_defaults(replica) == column_defaults(primary)


def test_an_unlogged_table_made_logged_brings_its_rows(pg_pair: Pair, tmp_path: Path) -> None:
    """An unlogged table's rows are never streamed: made logged, it is rewritten (not
    decoded either), and its rows must reach the replica with the DDL."""
    replicate_each(
        pg_pair,
        tmp_path,
        [
            [
                "CREATE UNLOGGED TABLE u (id int PRIMARY KEY, v text)",
                "INSERT INTO u SELECT g, 'v' || g FROM generate_series(1, 20) g",
                "ALTER TABLE u SET LOGGED",
                "UPDATE u SET v = 'w' WHERE id = 3",
            ],
            ["ALTER TABLE u SET UNLOGGED", "ALTER TABLE u SET LOGGED"],
        ],
    )


def test_what_ddl_creates_belongs_to_the_role_that_ran_it(pg_pair: Pair, tmp_path: Path) -> None:
    """The daemon's migrations run as its role and create its own tables: on the replica
    too, or after a failover the daemon could not use them."""
    primary, replica = pg_pair
    replica.psql("CREATE ROLE app")  # roles are not replicated
    replicate_each(
        pg_pair,
        tmp_path,
        [
            [
                "SET ROLE app",
                "CREATE TABLE owned (id int PRIMARY KEY)",
                "CREATE SEQUENCE owned_seq",
                "ALTER TABLE owned ADD COLUMN t timestamptz DEFAULT now()",
                "INSERT INTO owned VALUES (1)",
                "RESET ROLE",
            ],
            ["SET ROLE app", "CREATE TABLE made AS SELECT * FROM owned", "RESET ROLE"],
            "CREATE TABLE mine (id int)",
        ],
        # its own schema: the initial copy leaves public without USAGE for PUBLIC
        before_replicator="CREATE ROLE app; CREATE SCHEMA app AUTHORIZATION app",
    )
    owners = (
        "SELECT relname, relowner::regrole FROM pg_class "
        "WHERE relnamespace IN ('app'::regnamespace, 'public'::regnamespace) ORDER BY 1"
    )
    assert replica.psql(owners) == primary.psql(owners)
    assert "owned|app" in primary.psql(owners)
    assert "mine|postgres" in primary.psql(owners)


def test_a_role_cannot_put_ddl_of_its_own_making_in_the_stream(pg: PostgresCluster) -> None:
    """The replica runs each DDL message as the role it names: only our trigger may emit
    one, naming a role the session may act as; a role's own DDL still works."""
    pg.psql(schema.STORE_TABLES + schema.DDL_FUNCTION + schema.DDL_TRIGGER_SQL)
    pg.create_user("mallory", "pw")
    pg.psql("GRANT CREATE ON SCHEMA public TO mallory; CREATE TABLE theirs (id int)")
    forged = (
        """'{"n": 1, "sql": "ALTER ROLE mallory SUPERUSER", "settings": {"role": "postgres"}}'"""
    )
    with psycopg.connect(pg.dsn(user="mallory", password="pw"), autocommit=True) as conn:
        for attempt, refusal in [
            (f"SELECT pg_logical_emit_message(true, 'haproxy_ln.ddl', {forged})", "denied"),
            (f"SELECT haproxy_ln.emit_ddl({forged})", "event trigger"),
            (
                f"CREATE TABLE z AS SELECT 1 AS one FROM haproxy_ln.emit_ddl({forged})",
                "cannot act as postgres",
            ),
            # the replica would replace the table's rows with the ones sent
            ("SELECT haproxy_ln.emit_rows('theirs'::regclass)", "event trigger"),
            (
                "CREATE TABLE z AS SELECT 1 AS one FROM haproxy_ln.emit_rows('theirs'::regclass)",
                "only for a role that may alter it",
            ),
        ]:
            with pytest.raises(psycopg.DatabaseError, match=refusal):
                conn.execute(attempt)
        conn.execute("CREATE TABLE mine (id int); ALTER TABLE mine ADD COLUMN t text DEFAULT 'x'")


def test_ddl_reads_its_literals_as_the_client_did(pg_pair: Pair, tmp_path: Path) -> None:
    """A default's literal is read once, when its DDL runs, in the client's time zone and
    date style: the replica reads it the same way (rows inserted after a failover get it)."""
    replicate_each(
        pg_pair,
        tmp_path,
        [
            [
                "SET TimeZone = 'America/St_Johns'",
                "SET DateStyle = 'SQL, DMY'",
                "SET IntervalStyle = 'sql_standard'",
                "CREATE TABLE z (id int PRIMARY KEY, t timestamptz DEFAULT '02/01/2024 12:00', "
                "d date DEFAULT '03/04/2024', i interval DEFAULT '-1 2:03:04')",
                "INSERT INTO z (id) VALUES (1)",
                "ALTER TABLE z ADD COLUMN u timestamptz DEFAULT '01/02/2024 08:00'",
            ],
        ],
    )
    primary, replica = pg_pair
    assert column_defaults(replica) == column_defaults(primary)


# Statements and whether PostgreSQL reports them to ddl_command_end event triggers.
REPORTED = {
    "CREATE TABLE r (id int PRIMARY KEY, v text)": True,
    "CREATE TABLE IF NOT EXISTS r (id int)": True,
    "DROP TABLE IF EXISTS nothere": True,
    "CREATE INDEX ri ON r (v)": True,
    "ALTER TABLE r ADD COLUMN w int": True,
    "ALTER INDEX ri RENAME TO ri2": True,
    "CREATE SCHEMA sx CREATE TABLE st (id int) CREATE VIEW sv AS SELECT 1 AS one": True,
    "COMMENT ON TABLE r IS 'x'": True,
    "COMMENT ON DATABASE postgres IS 'x'": False,
    "GRANT SELECT ON r TO PUBLIC": True,
    "REVOKE SELECT ON r FROM PUBLIC": True,
    "GRANT CONNECT ON DATABASE postgres TO PUBLIC": False,
    "ALTER DEFAULT PRIVILEGES GRANT SELECT ON TABLES TO PUBLIC": True,
    "CREATE ROLE rr": False,
    "ALTER ROLE rr NOLOGIN": False,
    "CREATE VIEW rv AS SELECT * FROM r": True,
    "CREATE MATERIALIZED VIEW rm AS SELECT * FROM r": True,
    "REFRESH MATERIALIZED VIEW rm": True,
    "SELECT * INTO ri3 FROM r": True,
    "CREATE TABLE ra AS SELECT * FROM r": True,
    "CREATE SEQUENCE rs": True,
    "ALTER SEQUENCE rs RESTART": True,
    "CREATE TYPE re AS ENUM ('a')": True,
    "ALTER TYPE re ADD VALUE 'b'": True,
    "CREATE FUNCTION rf() RETURNS int LANGUAGE sql AS 'SELECT 1'": True,
    "CREATE PROCEDURE rp() LANGUAGE sql AS 'SELECT 1'": True,
    "CREATE TRIGGER rt BEFORE UPDATE ON r FOR EACH ROW "
    "EXECUTE FUNCTION suppress_redundant_updates_trigger()": True,
    "CREATE POLICY rpol ON r USING (true)": True,
    "CREATE PUBLICATION rpub": True,
    "CREATE EXTENSION IF NOT EXISTS plpgsql": True,
    "CREATE TABLE ro (id int)": True,
    "ALTER TABLE ro OWNER TO rr": True,
    "ALTER TABLE r SET SCHEMA sx": True,
    "DROP OWNED BY rr": True,
    "REASSIGN OWNED BY rr TO postgres": False,
    "DROP ROLE rr": False,
    "ALTER DATABASE postgres SET work_mem = '8MB'": False,
    "ALTER SYSTEM RESET work_mem": False,
    "TRUNCATE ra": False,
    "VACUUM ra": False,
    "ANALYZE ra": False,
    "CLUSTER": False,
    "REINDEX TABLE ra": False,
    "CHECKPOINT": False,
    "DO $$ BEGIN NULL; END $$": False,
    "CALL rp()": False,
    "SELECT rf()": False,
    "INSERT INTO ra VALUES (1, 'x', 1)": False,
    "UPDATE ra SET id = 2": False,
    "DELETE FROM ra": False,
    "EXPLAIN SELECT 1": False,
    "SET work_mem = '8MB'": False,
    "SHOW work_mem": False,
    "LISTEN x": False,
    "NOTIFY x": False,
    "PREPARE q AS SELECT 1": False,
    "EXECUTE q": False,
    "DEALLOCATE q": False,
    "DISCARD ALL": False,
    "DROP EXTENSION IF EXISTS nothere": True,
    "DROP TABLE ra": True,
}


def test_which_statements_postgresql_reports_as_ddl(pg: PostgresCluster) -> None:
    """`reported` must say which statements PostgreSQL reports to event triggers: DDL
    is replayed by pairing the reported commands with the text's statements."""
    pg.psql(
        "CREATE TABLE fired (n serial, q text); "
        "CREATE FUNCTION log_ddl() RETURNS event_trigger LANGUAGE plpgsql AS "
        "$f$ BEGIN INSERT INTO fired (q) VALUES (current_query()); END $f$; "
        "CREATE EVENT TRIGGER log_ddl ON ddl_command_end EXECUTE FUNCTION log_ddl()"
    )
    wrong = []
    with psycopg.connect(pg.dsn(), autocommit=True) as conn:
        for statement, expected in REPORTED.items():
            ((stmt, _),) = split(statement)
            assert reported(stmt) == expected, statement
            conn.execute(statement)
            row = conn.execute("SELECT count(*) FROM fired WHERE q = %s", (statement,)).fetchone()
            if row is None or (row[0] == 1) != expected or row[0] > 1:
                wrong.append(f"{statement}: reported {row[0] if row else '?'} times")
    assert not wrong, wrong


def test_enum_value_added_then_used_while_catching_up(pg_pair: Pair, tmp_path: Path) -> None:
    primary, replica = pg_pair
    primary.psql(
        "CREATE TYPE e AS ENUM ('a'); CREATE TABLE t (id int PRIMARY KEY, v e); "
        "CREATE TABLE big (id int PRIMARY KEY)"
    )
    rep = ReplicatorProcess(primary, replica, tmp_path / "rep.log").start()
    offset = len(rep.log())
    try:
        with psycopg.connect(replica.dsn()) as busy:
            # The replica is busy applying a first transaction, so the next two (committed
            # without waiting, as while the replicator is away) queue up: one batch.
            busy.execute("LOCK TABLE big")
            first = threading.Thread(
                target=primary.psql, args=("INSERT INTO big VALUES (1)",), daemon=True
            )
            first.start()
            deadline = time.monotonic() + COMMIT_LIMIT
            while (
                primary.psql(
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'SyncRep'"
                ).strip()
                != "1"
            ):
                assert time.monotonic() < deadline, "the first commit does not wait"
                time.sleep(0.05)
            primary.psql(
                "SET synchronous_commit = local;\n"
                "ALTER TYPE e ADD VALUE 'b';\n"
                "INSERT INTO t VALUES (1, 'b');"
            )
            time.sleep(1)
        first.join(COMMIT_LIMIT)
        deadline = time.monotonic() + COMMIT_LIMIT
        while rows_digest(replica) != rows_digest(primary):
            new = rep.log()[offset:]
            assert "replication interrupted" not in new, new[-3000:]
            assert time.monotonic() < deadline, new[-3000:]
            time.sleep(0.1)
    finally:
        code = rep.stop()
    assert code == 0, rep.log()

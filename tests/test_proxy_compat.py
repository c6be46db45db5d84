"""Real clients through the proxy against PostgreSQL 15: psql, pgbench, asyncpg, psycopg.

Every test drives a real client through a `ProxyThread` in front of the
shared session cluster (or a dedicated one for authentication) and checks
what came back: values round-tripped, row counts, SQLSTATEs, and the
proxy's own counters. Blocking calls that a proxy bug could hang run in a
thread or a subprocess with a timeout, so such a bug fails the test.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import io
import json
import os
import re
import socket
import struct
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import psycopg
import pytest
from harness import ProxyThread
from psycopg import errors as pg_errors
from psycopg.pq import TransactionStatus

from haproxy_ln.local import PostgresCluster
from haproxy_ln.local.postgres import Auth

T = TypeVar("T")

CLIENT_TIMEOUT = 120  # seconds any one client command may take before the test fails
CANCEL_REQUEST_CODE = 80877102


# -- helpers ---------------------------------------------------------------------------------


def unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:10]}"


def client_env() -> dict[str, str]:
    """Our environment without PG* variables, plus a connect timeout and UTF-8."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update(PGCONNECT_TIMEOUT="10", PGCLIENTENCODING="UTF8")
    return env


def run(cmd: list[str], *, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run a client program; it must succeed within CLIENT_TIMEOUT."""
    result = subprocess.run(
        cmd,
        input=stdin,
        env=client_env(),
        capture_output=True,
        text=True,
        timeout=CLIENT_TIMEOUT,
        check=False,
    )
    assert result.returncode == 0, f"{cmd[0]} failed ({result.returncode}):\n{result.stderr}"
    return result


def psql(dsn: str, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """psql, unaligned tuples only, quiet, stopping at the first error unless told otherwise."""
    return run(["psql", "-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1", *args, dsn], stdin=stdin)


def direct(cluster: PostgresCluster, db: str, sql: str) -> str:
    """`sql` run on the cluster itself, bypassing the proxy."""
    return cluster.psql(sql, dbname=db).strip()


def connect(proxy: ProxyThread, db: str, app: str = "compat", **kwargs: Any) -> psycopg.Connection:
    """A psycopg connection through the proxy (statement_timeout as a safety net)."""
    return psycopg.connect(
        proxy.dsn(dbname=db),
        connect_timeout=10,
        application_name=app,
        options="-c statement_timeout=120s",
        **kwargs,
    )


def run_async(make: Callable[[], Any], timeout: float = CLIENT_TIMEOUT) -> Any:
    """Run the coroutine `make()` under asyncio with an overall timeout."""

    async def main() -> Any:
        return await asyncio.wait_for(make(), timeout)

    return asyncio.run(main())


async def aconnect(proxy: ProxyThread, db: str, **kwargs: Any) -> asyncpg.Connection:
    return await asyncpg.connect(
        proxy.dsn(dbname=db), timeout=10, command_timeout=CLIENT_TIMEOUT, **kwargs
    )


def wait_until(predicate: Callable[[], T], what: str, timeout: float = 15.0) -> T:
    """Poll `predicate` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def stat(proxy: ProxyThread, name: str) -> int:
    return int(proxy.call(getattr, proxy.proxy.stats, name))


def member_count(proxy: ProxyThread) -> int:
    return int(proxy.call(len, proxy.proxy.members))


def backends(cluster: PostgresCluster, app: str, *, sleeping: bool = False) -> int:
    """How many backends with application_name `app` exist (or run pg_sleep now)."""
    sql = f"SELECT count(*) FROM pg_stat_activity WHERE application_name = '{app}'"
    if sleeping:
        sql += " AND state = 'active' AND query LIKE '%pg_sleep%'"
    return int(cluster.psql(sql).strip())


def wait_sleeping(cluster: PostgresCluster, app: str, count: int = 1) -> None:
    wait_until(lambda: backends(cluster, app, sleeping=True) == count, f"{count} x pg_sleep")


@contextlib.contextmanager
def backends_terminated_on_failure(cluster: PostgresCluster, *apps: str) -> Iterator[None]:
    """If the block fails, end every backend of `apps`, so the test does not wait for sleeps."""
    try:
        yield
    except BaseException:
        names = ", ".join(f"'{a}'" for a in apps)
        cluster.psql(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            f"WHERE application_name IN ({names}) AND pid <> pg_backend_pid()"
        )
        raise


def copy_text(rows: Iterable[tuple[Any, ...]]) -> str:
    """Rows in COPY text format: tab-separated, backslash escapes, \\N for NULL."""

    def field(value: Any) -> str:
        if value is None:
            return "\\N"
        text = str(value)
        for raw, escaped in (("\\", "\\\\"), ("\t", "\\t"), ("\n", "\\n"), ("\r", "\\r")):
            text = text.replace(raw, escaped)
        return text

    return "".join("\t".join(field(v) for v in row) + "\n" for row in rows)


def ledger_rows(n: int) -> list[tuple[int, str | None, int]]:
    """(id, note, amount_msat) rows with tabs, newlines, backslashes, unicode, '' and NULL."""
    rows = []
    for i in range(1, n + 1):
        note: str | None = f"payment {i}\tvia ⚡ ñode «{i % 13}» C:\\chan"
        if i % 5 == 0:
            note += "\nsecond line 🚀"
        if i % 7 == 0:
            note = None
        elif i % 11 == 0:
            note = ""
        rows.append((i, note, (i * 1_000_003) % 2**62 - 2**61))
    return rows


LEDGER_TABLE = "CREATE TABLE ledger (id int PRIMARY KEY, note text, amount_msat bigint)"


@pytest.fixture
def db(pg_session: PostgresCluster) -> Iterator[str]:
    """A fresh database on the session cluster, dropped afterwards."""
    name = unique("compat")
    pg_session.create_database(name, "postgres")
    try:
        yield name
    finally:
        pg_session.psql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# -- 1. libpq / psql -------------------------------------------------------------------------


def test_psql_query_returns_unicode_rows(proxy: ProxyThread, db: str) -> None:
    out = psql(proxy.dsn(dbname=db), "-c", "SELECT g, 'ñode ⚡ ' || g FROM generate_series(1, 3) g")
    assert out.stdout == "1|ñode ⚡ 1\n2|ñode ⚡ 2\n3|ñode ⚡ 3\n"


def test_psql_copy_in_and_out_round_trips_a_file(
    proxy: ProxyThread, db: str, pg_session: PostgresCluster, tmp_path: Path
) -> None:
    rows = ledger_rows(3000)
    source, target = tmp_path / "in.tsv", tmp_path / "out.tsv"
    source.write_text(copy_text(rows), encoding="utf-8")
    script = (
        f"{LEDGER_TABLE};\n"
        f"\\copy ledger FROM '{source}'\n"
        f"\\copy (SELECT * FROM ledger ORDER BY id) TO '{target}'\n"
    )
    psql(proxy.dsn(dbname=db), stdin=script)

    assert target.read_bytes() == source.read_bytes()
    notes = [r[1] for r in rows]
    stored = direct(
        pg_session,
        db,
        "SELECT count(*), count(note), count(*) FILTER (WHERE note LIKE '%' || chr(9) || '%'), "
        "sum(length(note)), sum(amount_msat) FROM ledger",
    )
    assert stored.split("|") == [
        str(len(rows)),
        str(sum(n is not None for n in notes)),
        str(sum(n is not None and "\t" in n for n in notes)),
        str(sum(len(n) for n in notes if n is not None)),
        str(sum(r[2] for r in rows)),
    ]


def test_psql_multi_statement_query_is_one_implicit_transaction(
    proxy: ProxyThread, db: str, pg_session: PostgresCluster
) -> None:
    dsn = proxy.dsn(dbname=db)
    psql(dsn, "-c", "CREATE TABLE multi (a int)")
    out = psql(
        dsn, "-c", "INSERT INTO multi VALUES (1), (2), (3); SELECT sum(a) FROM multi; SELECT 'two'"
    )
    assert out.stdout == "6\ntwo\n"
    # psql -c sends the whole string as one Query: an error in it undoes the earlier statements.
    failed = subprocess.run(
        ["psql", "-X", "-At", dsn, "-c", "INSERT INTO multi VALUES (100); SELECT 1/0"],
        env=client_env(),
        capture_output=True,
        text=True,
        timeout=CLIENT_TIMEOUT,
        check=False,
    )
    assert failed.returncode == 1
    assert "division by zero" in failed.stderr
    assert direct(pg_session, db, "SELECT count(*), sum(a) FROM multi") == "3|6"


def test_psql_session_recovers_after_errors(proxy: ProxyThread, db: str) -> None:
    script = """
\\set ON_ERROR_STOP 0
\\set VERBOSITY verbose
SELECT 'pid ' || pg_backend_pid();
SELECT 1/0;
SELECT 'still alive';
BEGIN;
SELECT * FROM no_such_table;
SELECT 'never shown';
ROLLBACK;
SELECT 'recovered ' || count(*) FROM (VALUES (1), (2)) v;
SELECT 'pid ' || pg_backend_pid();
"""
    out = psql(proxy.dsn(dbname=db), stdin=script)
    lines = out.stdout.splitlines()
    assert lines[1:3] == ["still alive", "recovered 2"]
    assert lines[0] == lines[3]  # the same backend throughout
    for sqlstate in ("22012", "42P01", "25P02"):  # division by zero, no table, aborted txn
        assert f"ERROR:  {sqlstate}" in out.stderr
    assert stat(proxy, "connections_total") == 1


# -- 2. pgbench ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pgbench_db(pg_session: PostgresCluster) -> Iterator[str]:
    """A database initialised with `pgbench -i -s 1` through a proxy."""
    name = unique("pgbench")
    pg_session.create_database(name, "postgres")
    init_proxy = ProxyThread(pg_session).start()
    try:
        run(["pgbench", "-i", "-s", "1", "-q", init_proxy.dsn(dbname=name)])
    finally:
        init_proxy.stop()
    try:
        assert direct(pg_session, name, "SELECT count(*) FROM pgbench_accounts") == "100000"
        yield name
    finally:
        pg_session.psql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def pgbench_result(output: str) -> tuple[int, int, int]:
    """(processed, expected, failed) transactions from pgbench's report."""
    processed = re.search(r"number of transactions actually processed: (\d+)/(\d+)", output)
    failed = re.search(r"number of failed transactions: (\d+)", output)
    assert processed and failed, f"unexpected pgbench output:\n{output}"
    return int(processed[1]), int(processed[2]), int(failed[1])


@pytest.mark.parametrize("script", [["-S"], []], ids=["select-only", "tpcb"])
@pytest.mark.parametrize("mode", ["simple", "extended", "prepared"])
def test_pgbench_completes_every_transaction(
    proxy: ProxyThread, pgbench_db: str, pg_session: PostgresCluster, mode: str, script: list[str]
) -> None:
    cmd = ["pgbench", "-M", mode, *script, "-c", "2", "-j", "2", "-t", "200"]
    out = run([*cmd, proxy.dsn(dbname=pgbench_db)]).stdout
    assert pgbench_result(out) == (400, 400, 0)
    # pgbench empties pgbench_history first; each TPC-B transaction inserts one row.
    history = direct(pg_session, pgbench_db, "SELECT count(*) FROM pgbench_history")
    assert int(history) == (0 if script else 400)


# -- 3. asyncpg ------------------------------------------------------------------------------


def test_asyncpg_named_prepared_statement_runs_many_times(proxy: ProxyThread, db: str) -> None:
    async def scenario() -> None:
        conn = await aconnect(proxy, db)
        try:
            stmt = await conn.prepare("SELECT $1::int8 * 2 AS doubled, $2::text || '⚡' AS tagged")
            assert stmt.get_name()  # a named server-side statement, not the unnamed one
            for i in range(500):
                row = await stmt.fetchrow(i, f"n{i}")
                assert (row["doubled"], row["tagged"]) == (2 * i, f"n{i}⚡")
            names = await conn.fetch("SELECT name FROM pg_prepared_statements")
            assert stmt.get_name() in {r["name"] for r in names}
        finally:
            await conn.close()

    run_async(scenario)


TYPED_TABLE = """CREATE TABLE typed (
    id int PRIMARY KEY, i8 int8, num numeric, txt text, raw bytea, ts timestamptz,
    doc jsonb, ints int4[], texts text[], missing int8)"""


def test_asyncpg_binary_types_round_trip(proxy: ProxyThread, db: str) -> None:
    doc = {"channel": "0x1x2", "msat": 2**53, "peers": ["ñ", "⚡"], "open": True}
    values = (
        1,
        -(2**63) + 1,
        Decimal("-12345678901234567890.123456789012345678"),
        "ünïcödé ⚡ 🚀 tab\there\nnewline 'quote' \\ backslash",
        bytes(range(256)) * 64 + b"\x00",
        dt.datetime(2024, 2, 29, 23, 59, 58, 999_999, tzinfo=dt.UTC),
        json.dumps(doc),
        [1, None, -(2**31), 2**31 - 1],
        ["a", "", None, '⚡ "quoted" {brace}'],
        None,
    )

    async def scenario() -> tuple[asyncpg.Record, asyncpg.Record]:
        conn = await aconnect(proxy, db)
        try:
            await conn.execute(TYPED_TABLE)
            await conn.execute(
                "INSERT INTO typed VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)", *values
            )
            stored = await conn.fetchrow("SELECT * FROM typed WHERE id = 1")
            echoed = await conn.fetchrow(
                "SELECT $1::int8, $2::numeric, $3::text, $4::bytea, $5::timestamptz, $6::int8",
                values[1],
                values[2],
                values[3],
                values[4],
                values[5],
                None,
            )
            return stored, echoed
        finally:
            await conn.close()

    stored, echoed = run_async(scenario)
    assert tuple(stored[k] for k in ("id", "i8", "num", "txt", "raw", "ts")) == values[:6]
    assert json.loads(stored["doc"]) == doc
    assert (stored["ints"], stored["texts"], stored["missing"]) == values[7:]
    assert tuple(echoed) == (*values[1:6], None)


def test_asyncpg_transactions_commit_and_roll_back(
    proxy: ProxyThread, db: str, pg_session: PostgresCluster
) -> None:
    class Abort(Exception):
        pass

    async def scenario() -> None:
        conn = await aconnect(proxy, db)
        try:
            await conn.execute("CREATE TABLE channels (id int PRIMARY KEY, state text)")
            async with conn.transaction():
                await conn.execute("INSERT INTO channels VALUES (1, 'opening')")
                await conn.execute("UPDATE channels SET state = 'open' WHERE id = 1")
            with contextlib.suppress(Abort):
                async with conn.transaction():
                    await conn.execute("INSERT INTO channels VALUES (2, 'lost')")
                    raise Abort
            async with conn.transaction():
                await conn.execute("INSERT INTO channels VALUES (3, 'kept')")
                with contextlib.suppress(Abort):
                    async with conn.transaction():  # a savepoint
                        await conn.execute("INSERT INTO channels VALUES (4, 'undone')")
                        raise Abort
            assert not conn.is_in_transaction()
        finally:
            await conn.close()

    run_async(scenario)
    kept = direct(pg_session, db, "SELECT string_agg(id || state, ',' ORDER BY id) FROM channels")
    assert kept == "1open,3kept"


def test_asyncpg_executemany_inserts_every_row(
    proxy: ProxyThread, db: str, pg_session: PostgresCluster
) -> None:
    rows = [(i, f"htlc {i} ⚡") for i in range(2000)]

    async def scenario() -> None:
        conn = await aconnect(proxy, db)
        try:
            await conn.execute("CREATE TABLE htlcs (id int PRIMARY KEY, label text)")
            await conn.executemany("INSERT INTO htlcs VALUES ($1, $2)", rows)
        finally:
            await conn.close()

    run_async(scenario)
    stored = direct(pg_session, db, "SELECT count(*), sum(id), sum(length(label)) FROM htlcs")
    assert stored == f"2000|{sum(range(2000))}|{sum(len(r[1]) for r in rows)}"


def test_asyncpg_copy_records_in_and_query_out(proxy: ProxyThread, db: str) -> None:
    rows = ledger_rows(5000)

    async def scenario() -> tuple[str, str]:
        conn = await aconnect(proxy, db)
        try:
            await conn.execute(LEDGER_TABLE)
            status = await conn.copy_records_to_table("ledger", records=rows)
            out = io.BytesIO()
            await conn.copy_from_query("SELECT * FROM ledger ORDER BY id", output=out)
            return status, out.getvalue().decode()
        finally:
            await conn.close()

    status, text = run_async(scenario)
    assert status == "COPY 5000"
    assert text == copy_text(rows)


# -- 4. psycopg 3 ----------------------------------------------------------------------------


def test_psycopg_unnamed_statements_with_binary_results(proxy: ProxyThread, db: str) -> None:
    params = (
        2**62 + 7,
        "ünïcödé ⚡",
        b"\x00\xffbinary",
        Decimal("0.00000001"),
        dt.datetime(2009, 1, 3, 18, 15, 5, tzinfo=dt.UTC),
        [3, None, 1],
    )
    query = "SELECT %s::int8, %s::text, %s::bytea, %s::numeric, %s::timestamptz, %s::int4[]"
    with connect(proxy, db, autocommit=True, prepare_threshold=None) as conn:
        cur = conn.cursor(binary=True)
        for _ in range(20):
            assert cur.execute(query, params).fetchone() == params
        assert cur.pgresult is not None
        assert cur.pgresult.fformat(0) == 1  # binary
        assert conn.execute("SELECT %s::int8 + 1", [41], binary=True).fetchone() == (42,)
        assert conn.execute("SELECT count(*) FROM pg_prepared_statements").fetchone() == (0,)


def test_psycopg_commit_and_rollback(
    proxy: ProxyThread, db: str, pg_session: PostgresCluster
) -> None:
    def committed() -> str:
        return direct(pg_session, db, "SELECT coalesce(string_agg(v, ',' ORDER BY v), '') FROM t")

    with connect(proxy, db) as conn:  # psycopg's default: BEGIN before the first statement
        conn.execute("CREATE TABLE t (v text)")
        conn.commit()
        conn.execute("INSERT INTO t VALUES ('a')")
        assert conn.info.transaction_status == TransactionStatus.INTRANS
        assert committed() == ""  # not visible before COMMIT
        conn.commit()
        assert committed() == "a"
        conn.execute("INSERT INTO t VALUES ('b')")
        conn.rollback()
        with conn.transaction():
            conn.execute("INSERT INTO t VALUES ('c')")
        assert conn.info.transaction_status == TransactionStatus.IDLE
    assert committed() == "a,c"


def test_psycopg_pipeline_results_and_error_recovery(proxy: ProxyThread, db: str) -> None:
    with connect(proxy, db, autocommit=True) as conn:
        conn.execute("CREATE TABLE p (id int PRIMARY KEY, v text)")
        with conn.pipeline():
            for i in range(10):
                conn.execute("INSERT INTO p VALUES (%s, %s)", (i, f"v{i}"))
            count = conn.execute("SELECT count(*) FROM p")
            seven = conn.execute("SELECT v FROM p WHERE id = %s", [7], binary=True)
        assert count.fetchone() == (10,)
        assert seven.fetchone() == ("v7",)

        with pytest.raises(pg_errors.UniqueViolation), conn.pipeline():
            conn.execute("INSERT INTO p VALUES (100, 'before')")
            conn.execute("INSERT INTO p VALUES (0, 'duplicate')")
            conn.execute("INSERT INTO p VALUES (101, 'after')")
        # One implicit transaction up to the Sync: nothing of it stays.
        assert conn.info.transaction_status == TransactionStatus.IDLE
        assert conn.execute("SELECT count(*), max(id) FROM p").fetchone() == (10, 9)
        with conn.pipeline():
            conn.execute("INSERT INTO p VALUES (200, 'again')")
            again = conn.execute("SELECT v FROM p WHERE id = 200")
        assert again.fetchone() == ("again",)


def test_psycopg_copy_in_and_out(proxy: ProxyThread, db: str) -> None:
    rows = [
        (i, None if i % 9 == 0 else f"row {i}\t⚡\n«{i}»", bytes([i % 256]) * (i % 50))
        for i in range(4000)
    ]
    with connect(proxy, db, autocommit=True) as conn:
        cur = conn.cursor()
        cur.execute("CREATE TABLE c (id int PRIMARY KEY, note text, data bytea)")
        with cur.copy("COPY c (id, note, data) FROM STDIN") as copy:
            for row in rows:
                copy.write_row(row)
        assert cur.rowcount == len(rows)
        with cur.copy("COPY (SELECT * FROM c ORDER BY id) TO STDOUT (FORMAT BINARY)") as copy:
            copy.set_types(["int4", "text", "bytea"])
            binary_out = list(copy.rows())
        with cur.copy("COPY (SELECT id, note FROM c ORDER BY id) TO STDOUT") as copy:
            text_out = b"".join(bytes(block) for block in copy).decode()
    assert binary_out == rows
    assert text_out == copy_text((i, note) for i, note, _ in rows)


# -- 5. LISTEN / NOTIFY ----------------------------------------------------------------------


def test_listen_receives_notifications_sent_through_the_proxy(proxy: ProxyThread, db: str) -> None:
    payloads = ["first", "ünïcödé ⚡", "x" * 7000]
    with (
        connect(proxy, db, autocommit=True) as listener,
        connect(proxy, db, autocommit=True) as notifier,
        ThreadPoolExecutor(1) as pool,
    ):
        listener.execute("LISTEN ln_events")
        (notifier_pid,) = notifier.execute("SELECT pg_backend_pid()").fetchone()
        for payload in payloads:
            notifier.execute("SELECT pg_notify('ln_events', %s)", [payload])
        # They reach the listener's socket while it is idle between queries.
        time.sleep(0.5)
        got = list(listener.notifies(timeout=10, stop_after=len(payloads)))
        assert [(n.channel, n.payload) for n in got] == [("ln_events", p) for p in payloads]
        assert {n.pid for n in got} == {notifier_pid}

        # One sent while the listener is blocked waiting for notifications.
        def notify_later() -> None:
            time.sleep(0.5)
            notifier.execute("NOTIFY ln_events, 'while waiting'")

        sender = pool.submit(notify_later)
        got = list(listener.notifies(timeout=10, stop_after=1))
        sender.result(timeout=10)
        assert [n.payload for n in got] == ["while waiting"]

        # A NOTIFY inside a transaction arrives at COMMIT, once, and the listener still works.
        with notifier.transaction():
            notifier.execute("NOTIFY ln_events, 'committed'")
            notifier.execute("NOTIFY ln_events, 'committed'")  # folded by PostgreSQL
        got = list(listener.notifies(timeout=10, stop_after=1))
        assert [n.payload for n in got] == ["committed"]
        assert list(listener.notifies(timeout=0.5)) == []
        assert listener.execute("SELECT 'listener usable'").fetchone() == ("listener usable",)


def test_notification_pid_matches_the_notifiers_backend_pid(proxy: ProxyThread, db: str) -> None:
    # libpq's idiom for skipping one's own notifications compares be_pid with PQbackendPID.
    with connect(proxy, db, autocommit=True) as conn:
        conn.execute("LISTEN self_check")
        conn.execute("NOTIFY self_check, 'mine'")
        (notification,) = list(conn.notifies(timeout=10, stop_after=1))
        assert notification.pid == conn.info.backend_pid
        assert conn.execute("SELECT pg_backend_pid()").fetchone() == (conn.info.backend_pid,)


# -- 6. Cancel -------------------------------------------------------------------------------
#
# psycopg's cancel() runs libpq's blocking PQcancel without releasing the GIL, which would
# freeze the proxy thread of this very process: the tests call it in a child process, and
# use cancel_safe() (libpq >= 17's non-blocking cancel API, same CancelRequest) in-process.


def sleep_in_transaction(
    pool: ThreadPoolExecutor, conn: psycopg.Connection, seconds: float
) -> Future[Any]:
    """Start `SELECT pg_sleep` inside a transaction block, in a thread."""
    conn.execute("SELECT 'begin'")  # psycopg's default: this opened a transaction with BEGIN
    assert conn.info.transaction_status == TransactionStatus.INTRANS
    return pool.submit(lambda: conn.execute(f"SELECT 'slept' FROM pg_sleep({seconds})").fetchone())


def assert_cancelled(sleeping: Future[Any]) -> None:
    error = sleeping.exception(timeout=15)
    assert isinstance(error, pg_errors.QueryCanceled), repr(error)
    assert error.sqlstate == "57014"
    assert "user request" in str(error)  # not a statement timeout


def test_cancel_safe_interrupts_a_statement_in_a_transaction(
    proxy: ProxyThread, db: str, pg_session: PostgresCluster
) -> None:
    app = unique("cancel")
    with (
        ThreadPoolExecutor(1) as pool,
        connect(proxy, db, app=app) as conn,
        backends_terminated_on_failure(pg_session, app),
    ):
        sleeping = sleep_in_transaction(pool, conn, 30)
        wait_sleeping(pg_session, app)
        conn.cancel_safe(timeout=10)  # a CancelRequest with the proxy's key for this client
        assert_cancelled(sleeping)
        assert conn.info.transaction_status == TransactionStatus.INERROR
        conn.rollback()
        assert conn.execute("SELECT 'usable'").fetchone() == ("usable",)
    wait_until(lambda: stat(proxy, "cancels_forwarded") == 1, "the cancel to be counted")
    assert (stat(proxy, "cancels_withheld"), stat(proxy, "cancels_unmatched")) == (0, 0)


CANCEL_CLIENT = """
import json, sys, threading
import psycopg

conn = psycopg.connect(sys.argv[1], connect_timeout=10, application_name=sys.argv[2])
conn.execute("SELECT 'begin'")  # opens a transaction block
outcome = {}

def sleep():
    try:
        conn.execute("SELECT pg_sleep(30)")
    except psycopg.Error as e:
        outcome["error"] = [e.sqlstate, str(e)]

sleeper = threading.Thread(target=sleep)
sleeper.start()
sys.stdin.readline()  # the test saw the backend sleeping
conn.cancel()
sleeper.join(20)
outcome["status"] = conn.info.transaction_status.name
conn.rollback()
outcome["after"] = conn.execute("SELECT 'usable'").fetchone()[0]
print(json.dumps(outcome))
"""


def test_libpq_cancel_from_another_process_interrupts_a_statement(
    proxy: ProxyThread, db: str, pg_session: PostgresCluster
) -> None:
    app = unique("cancel_proc")
    cmd = [sys.executable, "-c", CANCEL_CLIENT, proxy.dsn(dbname=db), app]
    with (
        backends_terminated_on_failure(pg_session, app),
        subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        ) as child,
    ):
        try:
            wait_sleeping(pg_session, app)
            out, err = child.communicate("cancel\n", timeout=60)
        finally:
            child.kill()
    assert child.returncode == 0, err
    outcome = json.loads(out)
    assert outcome["error"][0] == "57014"
    assert "user request" in outcome["error"][1]
    assert (outcome["status"], outcome["after"]) == ("INERROR", "usable")
    wait_until(lambda: stat(proxy, "cancels_forwarded") == 1, "the cancel to be counted")


def test_asyncpg_timeout_cancels_through_the_proxy(proxy: ProxyThread, db: str) -> None:
    async def scenario() -> None:
        conn = await aconnect(proxy, db)
        try:
            with pytest.raises(TimeoutError):
                async with conn.transaction():
                    await conn.fetchval("SELECT pg_sleep(30)", timeout=1)
            assert not conn.is_in_transaction()
            assert await conn.fetchval("SELECT 'usable'") == "usable"
        finally:
            await conn.close()

    started = time.monotonic()
    run_async(scenario)
    assert time.monotonic() - started < 25  # the sleep was cancelled, not waited out
    wait_until(lambda: stat(proxy, "cancels_forwarded") == 1, "the cancel to be counted")


def test_cancel_reaches_only_its_own_backend(
    proxy: ProxyThread, db: str, pg_session: PostgresCluster
) -> None:
    app_a, app_b = unique("cancel_a"), unique("cancel_b")
    with (
        ThreadPoolExecutor(2) as pool,
        connect(proxy, db, app=app_a) as a,
        connect(proxy, db, app=app_b) as b,
        backends_terminated_on_failure(pg_session, app_a, app_b),
    ):
        sleeping_a = sleep_in_transaction(pool, a, 30)
        sleeping_b = sleep_in_transaction(pool, b, 4)
        wait_sleeping(pg_session, app_a)
        wait_sleeping(pg_session, app_b)
        a.cancel_safe(timeout=10)
        assert_cancelled(sleeping_a)
        assert sleeping_b.result(timeout=20) == ("slept",)
        a.rollback()
        b.commit()
    wait_until(lambda: stat(proxy, "cancels_forwarded") == 1, "the cancel to be counted")


def send_cancel_request(port: int, pid: int, secret: bytes) -> bytes:
    """Send a raw CancelRequest to the proxy; returns whatever came back before it closed."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(struct.pack("!III", 16, CANCEL_REQUEST_CODE, pid) + secret)
        received = b""
        while chunk := sock.recv(4096):
            received += chunk
        return received


def test_cancel_with_a_wrong_key_does_nothing(
    proxy: ProxyThread, db: str, pg_session: PostgresCluster
) -> None:
    app = unique("wrongkey")
    with (
        ThreadPoolExecutor(1) as pool,
        connect(proxy, db, app=app) as conn,
        backends_terminated_on_failure(pg_session, app),
    ):
        pid = conn.info.backend_pid

        def visible_secret() -> bytes:  # the secret the proxy gave this client
            (member,) = [m for m in proxy.proxy.members if m.session.backend_key[0] == pid]
            return bytes(member.session.proxy_secret)

        secret = proxy.call(visible_secret)
        wrong_secret = bytes([secret[0] ^ 0xFF]) + secret[1:]
        sleeping = sleep_in_transaction(pool, conn, 3)
        wait_sleeping(pg_session, app)
        assert send_cancel_request(proxy.port, pid, wrong_secret) == b""
        assert send_cancel_request(proxy.port, pid ^ 0x2, secret) == b""  # another pid
        assert sleeping.result(timeout=20) == ("slept",)
        conn.commit()
    wait_until(lambda: stat(proxy, "cancels_unmatched") == 2, "two unmatched cancels")
    assert stat(proxy, "cancels_forwarded") == 0


def test_cancel_of_an_autocommit_statement_is_withheld(
    proxy: ProxyThread, db: str, pg_session: PostgresCluster
) -> None:
    app = unique("withheld")
    with (
        ThreadPoolExecutor(1) as pool,
        connect(proxy, db, app=app, autocommit=True) as conn,
        backends_terminated_on_failure(pg_session, app),
    ):
        sleeping = pool.submit(lambda: conn.execute("SELECT 'slept' FROM pg_sleep(4)").fetchone())
        wait_sleeping(pg_session, app)
        conn.cancel_safe(timeout=10)  # the statement could commit: the proxy must not forward
        assert sleeping.result(timeout=20) == ("slept",)
    wait_until(lambda: stat(proxy, "cancels_withheld") == 1, "the withheld cancel")
    assert stat(proxy, "cancels_forwarded") == 0


# -- 7. Large values -------------------------------------------------------------------------


def test_50mb_bytea_round_trips(proxy: ProxyThread, db: str) -> None:
    data = os.urandom(50 * 1024 * 1024)
    digest = hashlib.sha256(data).hexdigest()
    with connect(proxy, db, autocommit=True) as conn:
        conn.execute("CREATE TABLE blob (id int, data bytea)")
        conn.execute("INSERT INTO blob VALUES (1, %b)", [data])  # a binary parameter
        server = conn.execute("SELECT encode(sha256(data), 'hex'), length(data) FROM blob")
        assert server.fetchone() == (digest, len(data))
        (binary,) = conn.execute("SELECT data FROM blob", binary=True).fetchone()
        assert hashlib.sha256(binary).hexdigest() == digest
        del binary
        (text,) = conn.execute("SELECT data FROM blob").fetchone()  # ~100 MB of hex
        assert hashlib.sha256(text).hexdigest() == digest


# -- 8. Authentication passthrough -----------------------------------------------------------


@pytest.mark.parametrize("auth", ["scram-sha-256", "md5"])
def test_password_authentication_passes_through(local_servers_dir: Path, auth: Auth) -> None:
    password = "s3cr3t ⚡ 'quoted'"
    cluster = PostgresCluster(
        Path(tempfile.mkdtemp(prefix="pg-auth-", dir=local_servers_dir)),
        auth=auth,
        superuser_password=password,
    )
    try:
        cluster.start()
        cluster.create_user("lnd", "lnd-password")
        stored = cluster.psql("SELECT left(rolpassword, 3) FROM pg_authid WHERE rolname = 'lnd'")
        assert stored.strip() == {"md5": "md5", "scram-sha-256": "SCR"}[auth]
        running = ProxyThread(cluster).start()
        try:
            assert_password_auth(running, password)
        finally:
            running.stop()
        assert 'password authentication failed for user "postgres"' in cluster.log_tail(200)
    finally:
        cluster.stop()


def assert_password_auth(running: ProxyThread, password: str) -> None:
    dsn = running.dsn()

    async def scenario() -> None:
        conn = await asyncpg.connect(dsn, password=password, timeout=10)
        try:
            assert await conn.fetchval("SELECT current_user") == "postgres"
        finally:
            await conn.close()
        conn = await asyncpg.connect(running.dsn(user="lnd"), password="lnd-password", timeout=10)
        try:
            assert await conn.fetchval("SELECT current_user") == "lnd"
        finally:
            await conn.close()
        with pytest.raises(asyncpg.InvalidPasswordError) as wrong:
            await asyncpg.connect(dsn, password="wrong", timeout=10)
        assert wrong.value.sqlstate == "28P01"

    run_async(scenario)
    with psycopg.connect(dsn, password=password, connect_timeout=10) as conn:
        assert conn.execute("SELECT 'libpq in'").fetchone() == ("libpq in",)
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(dsn, password="wrong", connect_timeout=10)


# -- 9. Client disconnects mid-query ---------------------------------------------------------


class RawClient:
    """A minimal protocol-3 client on a plain socket (trust authentication only)."""

    def __init__(self, port: int, db: str, app: str, timeout: float = 30) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        params = {"user": "postgres", "database": db, "application_name": app}
        body = b"".join(k.encode() + b"\0" + v.encode() + b"\0" for k, v in params.items())
        body += b"\0"
        self.sock.sendall(struct.pack("!II", 8 + len(body), 3 << 16) + body)
        self.until_ready()

    def _recv_exact(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise ConnectionError("connection closed")
            data += chunk
        return data

    def read_message(self) -> tuple[bytes, bytes]:
        kind, length = struct.unpack("!cI", self._recv_exact(5))
        return kind, self._recv_exact(length - 4)

    def until_ready(self) -> None:
        while True:
            kind, body = self.read_message()
            if kind == b"E":
                raise AssertionError(f"server error: {body!r}")
            if kind == b"Z":
                return

    def send(self, kind: bytes, body: bytes) -> None:
        self.sock.sendall(kind + struct.pack("!I", 4 + len(body)) + body)

    def send_query(self, sql: str) -> None:
        self.send(b"Q", sql.encode() + b"\0")

    def simple(self, sql: str) -> None:
        self.send_query(sql)
        self.until_ready()

    def close(self) -> None:
        """Go away without a Terminate message (the kernel sends a FIN)."""
        self.sock.close()

    def reset(self) -> None:
        """Go away with a TCP reset, as a crashed host or a killed process with unread data."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()


def start_vanishing_query(client: RawClient, in_transaction: bool) -> None:
    # PostgreSQL aborts a query within 100 ms once its client socket is closed.
    client.simple("SET client_connection_check_interval = '100ms'")
    if in_transaction:
        client.simple("BEGIN")
    client.send_query("INSERT INTO vanished SELECT 'done' FROM pg_sleep(2)")


@contextlib.contextmanager
def private_proxy(cluster: PostgresCluster) -> Iterator[ProxyThread]:
    """A proxy of the test's own, for tests that may crash it (reported as the failure)."""
    running = ProxyThread(cluster).start()
    try:
        yield running
    except BaseException:
        with contextlib.suppress(Exception):  # a crash is what the test reports
            running.stop()
        raise
    running.stop()


@pytest.mark.parametrize("in_transaction", [False, True], ids=["autocommit", "in-transaction"])
def test_client_vanishing_mid_query_leaves_nothing_behind(
    proxy: ProxyThread, db: str, pg_session: PostgresCluster, in_transaction: bool
) -> None:
    app = unique("vanish")
    direct(pg_session, db, "CREATE TABLE vanished (note text)")
    with backends_terminated_on_failure(pg_session, app):
        client = RawClient(proxy.port, db, app)
        start_vanishing_query(client, in_transaction)
        wait_sleeping(pg_session, app)
        client.close()

        assert psql(proxy.dsn(dbname=db), "-c", "SELECT 'still serving'").stdout == (
            "still serving\n"
        )
        wait_until(lambda: member_count(proxy) == 0, "the proxy to forget the client")
        wait_until(lambda: backends(pg_session, app) == 0, "the backend to exit", timeout=20)
        assert psql(proxy.dsn(dbname=db), "-c", "SELECT 'serving after'").stdout == (
            "serving after\n"
        )
    # Autocommit: the statement could commit, so the proxy kept its backend until the
    # answer (else PostgreSQL would have aborted it). In a transaction it is rolled back.
    rows = direct(pg_session, db, "SELECT count(*) FROM vanished")
    assert rows == ("0" if in_transaction else "1")


@pytest.mark.parametrize("in_transaction", [False, True], ids=["autocommit", "in-transaction"])
def test_client_reset_mid_query_does_not_stop_the_proxy(
    db: str, pg_session: PostgresCluster, in_transaction: bool
) -> None:
    app = unique("reset")
    direct(pg_session, db, "CREATE TABLE vanished (note text)")
    with private_proxy(pg_session) as running, backends_terminated_on_failure(pg_session, app):
        client = RawClient(running.port, db, app)
        start_vanishing_query(client, in_transaction)
        wait_sleeping(pg_session, app)
        client.reset()  # the proxy's next read of this client fails with ECONNRESET
        wait_until(lambda: member_count(running) == 0, "the proxy to forget the client")
        wait_until(lambda: backends(pg_session, app) == 0, "the backend to exit", timeout=20)
        RawClient(running.port, db, unique("next"), timeout=5).simple("SELECT 'still serving'")
    assert direct(pg_session, db, "SELECT count(*) FROM vanished") == (
        "0" if in_transaction else "1"
    )


def error_fields(body: bytes) -> dict[str, str]:
    """The fields of an ErrorResponse body, by their one-letter codes."""
    return {f[:1].decode(): f[1:].decode() for f in body.split(b"\0") if f}


def test_protocol_violation_after_startup_ends_only_that_client(
    db: str, pg_session: PostgresCluster
) -> None:
    with private_proxy(pg_session) as running:
        bystander = RawClient(running.port, db, unique("bystander"), timeout=5)
        offender = RawClient(running.port, db, unique("offender"))
        offender.send(b"C", b"Xname\0")  # Close of an unknown kind ('X'): malformed
        kind, body = offender.read_message()
        assert kind == b"E"
        assert error_fields(body)["C"] == "08P01"
        assert offender.sock.recv(1) == b""  # then the proxy closes the connection
        bystander.simple("SELECT 'bystander unaffected'")
        RawClient(running.port, db, unique("next"), timeout=5).simple("SELECT 'still serving'")
        assert stat(running, "protocol_errors") == 1

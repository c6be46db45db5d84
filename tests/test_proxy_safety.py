"""The proxy never lets a commit escape the synchronous standby, and the gate.

A cluster with `synchronous_standby_names` naming a standby that never comes
makes every commit wait in SyncRep, which is exactly the window in which a
cancel or a dropped connection could make PostgreSQL commit locally only.
"""

import threading
import time
from collections.abc import Iterator

import psycopg
import pytest
from harness import ProxyThread, RawClient

from haproxy_ln.local import PostgresCluster
from haproxy_ln.pgwire.messages import error_fields

WAIT = 20.0


def direct(cluster: PostgresCluster) -> psycopg.Connection:
    return psycopg.connect(cluster.dsn(), autocommit=True, connect_timeout=10)


def wait_for(predicate: object, what: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def syncrep_waiters(cluster: PostgresCluster, app: str) -> int:
    with direct(cluster) as conn:
        row = conn.execute(
            "select count(*) from pg_stat_activity"
            " where application_name = %s and wait_event = 'SyncRep'",
            (app,),
        ).fetchone()
    assert row is not None
    return int(row[0])


def rows(cluster: PostgresCluster) -> int:
    with direct(cluster) as conn:
        row = conn.execute("select count(*) from t").fetchone()
    assert row is not None
    return int(row[0])


@pytest.fixture
def syncrep(pg: PostgresCluster) -> Iterator[PostgresCluster]:
    """A cluster whose commits wait for a synchronous standby that never comes."""
    with direct(pg) as conn:
        conn.execute("create table t (id int)")
        conn.execute("alter system set synchronous_standby_names = 'never_connects'")
        conn.execute("select pg_reload_conf()")
    yield pg
    release(pg)


def release(cluster: PostgresCluster) -> None:
    with direct(cluster) as conn:
        conn.execute("alter system set synchronous_standby_names = ''")
        conn.execute("select pg_reload_conf()")


def insert_in_thread(dsn: str, app: str) -> tuple[threading.Thread, list[object]]:
    """Run an autocommit INSERT in a thread; its outcome lands in the list."""
    outcome: list[object] = []
    conn = psycopg.connect(dsn, autocommit=True, application_name=app, connect_timeout=10)

    def run() -> None:
        try:
            conn.execute("insert into t values (1)")
            outcome.append("committed")
        except psycopg.Error as e:
            outcome.append(e)
        finally:
            conn.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.conn = conn  # type: ignore[attr-defined]
    return thread, outcome


def test_cancel_never_releases_sync_wait(syncrep: PostgresCluster, mode: str) -> None:
    # Control: cancelling directly makes PostgreSQL commit without the standby.
    thread, outcome = insert_in_thread(syncrep.dsn(), "direct")
    wait_for(lambda: syncrep_waiters(syncrep, "direct") == 1, "the direct commit to wait")
    thread.conn.cancel_safe(timeout=10)  # type: ignore[attr-defined]
    thread.join(WAIT)
    assert outcome == ["committed"] and rows(syncrep) == 1  # committed locally only

    proxy = ProxyThread(syncrep, mode=mode).start()
    try:
        thread, outcome = insert_in_thread(proxy.dsn(), "proxied")
        wait_for(lambda: syncrep_waiters(syncrep, "proxied") == 1, "the proxied commit to wait")
        thread.conn.cancel_safe(timeout=10)  # type: ignore[attr-defined]
        wait_for(lambda: proxy.proxy.stats.cancels_withheld == 1, "the cancel to be withheld")
        time.sleep(1)
        assert syncrep_waiters(syncrep, "proxied") == 1
        assert rows(syncrep) == 1 and outcome == []  # still waiting, still invisible
        release(syncrep)
        thread.join(WAIT)
        assert outcome == ["committed"] and rows(syncrep) == 2
        assert proxy.proxy.stats.cancels_forwarded == 0
    finally:
        proxy.stop()


def pg_socket_state(cluster: PostgresCluster, app: str) -> str:
    """TCP state of PostgreSQL's socket for the backend named `app`."""
    with direct(cluster) as conn:
        row = conn.execute(
            "select client_port from pg_stat_activity where application_name = %s", (app,)
        ).fetchone()
    assert row is not None, f"no backend for {app}"
    local, remote = f"{cluster.port:04X}", f"{row[0]:04X}"
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            if fields[1].endswith(":" + local) and fields[2].endswith(":" + remote):
                return {"01": "ESTABLISHED", "08": "CLOSE_WAIT"}.get(fields[3], fields[3])
    raise AssertionError("socket not found")


def test_client_leaving_never_closes_backend_during_sync_wait(
    syncrep: PostgresCluster, mode: str
) -> None:
    proxy = ProxyThread(syncrep, mode=mode).start()
    try:
        client = RawClient(proxy.port)
        client.startup(application_name="leaver")
        client.query("insert into t values (1)")
        wait_for(lambda: syncrep_waiters(syncrep, "leaver") == 1, "the commit to wait")
        client.close()
        time.sleep(1)
        assert len(proxy.proxy.members) == 1  # the connection is draining, not gone
        assert pg_socket_state(syncrep, "leaver") == "ESTABLISHED"
        assert syncrep_waiters(syncrep, "leaver") == 1 and rows(syncrep) == 0
        release(syncrep)
        wait_for(lambda: not proxy.proxy.members, "the proxy to let the backend go")
        assert rows(syncrep) == 1
    finally:
        proxy.stop()


def test_gate_closed_refuses_new_connections_with_reason(any_proxy: ProxyThread) -> None:
    any_proxy.call(any_proxy.proxy.gate.close, "fenced: lease lost", "b")
    with pytest.raises(psycopg.OperationalError) as info:
        psycopg.connect(any_proxy.dsn(), connect_timeout=10)
    assert "haproxy-ln is not admitting connections: fenced: lease lost" in str(info.value)
    assert "the active node is b" in str(info.value)
    client = RawClient(any_proxy.port)
    (mtype, body), *_ = client.startup()
    assert mtype == b"E" and error_fields(body)["C"] == "57P03"
    assert any_proxy.proxy.stats.rejected_gate == 2
    any_proxy.call(any_proxy.proxy.gate.open)
    with psycopg.connect(any_proxy.dsn(), connect_timeout=10) as conn:
        assert conn.execute("select 1").fetchone() == (1,)


def test_gate_close_terminates_every_client_at_once(any_proxy: ProxyThread) -> None:
    idle = RawClient(any_proxy.port)
    idle.startup()
    busy = RawClient(any_proxy.port)
    busy.startup()
    busy.query("begin")
    assert busy.read_until(b"Z")[-1] == (b"Z", b"T")
    busy.query("select pg_sleep(30)")  # inside a block: cannot commit, no reason to wait
    time.sleep(0.3)
    started = time.monotonic()
    any_proxy.call(any_proxy.proxy.gate.close, "switchover to b", "b")
    for client in (idle, busy):
        msgs = []
        with pytest.raises(EOFError):
            while True:
                msgs.append(client.read_message())
        errors = [error_fields(body) for mtype, body in msgs if mtype == b"E"]
        assert errors and errors[-1]["C"] == "57P01", msgs
        assert "terminated by haproxy-ln: switchover to b" in errors[-1]["M"]
    assert time.monotonic() - started < 5
    wait_for(lambda: not any_proxy.proxy.members, "every connection to end")


def test_lowering_synchronous_commit_is_refused_in_order(any_proxy: ProxyThread) -> None:
    with psycopg.connect(any_proxy.dsn(), autocommit=True, connect_timeout=10) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as info:
            conn.execute("set synchronous_commit = off")
        assert "synchronous_commit would be set to 'off'" in str(info.value)
        assert conn.execute("show synchronous_commit").fetchone() == ("on",)
        conn.execute("set synchronous_commit = remote_apply")  # stronger: allowed
        with conn.pipeline() as pipe:
            first = conn.execute("select 1")
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute("set local synchronous_commit to local")
                pipe.sync()
            assert first.fetchone() == (1,)
        assert conn.execute("select 2").fetchone() == (2,)
    with psycopg.connect(any_proxy.dsn(), connect_timeout=10) as conn:
        conn.execute("select 1")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("set local synchronous_commit = off")
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.INERROR
        conn.rollback()
        assert conn.execute("show synchronous_commit").fetchone() == ("on",)


def test_startup_options_lowering_synchronous_commit_are_refused(any_proxy: ProxyThread) -> None:
    with pytest.raises(psycopg.OperationalError) as info:
        psycopg.connect(any_proxy.dsn(), options="-c synchronous_commit=off", connect_timeout=10)
    assert "haproxy-ln refused the connection" in str(info.value)

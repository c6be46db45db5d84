"""The proxy relays real PostgreSQL sessions: a first smoke test."""

import subprocess
import time

import psycopg
import pytest
from harness import ProxyThread


def psql(proxy: ProxyThread, sql: str) -> str:
    return subprocess.run(
        ["psql", "-X", "-At", "-v", "ON_ERROR_STOP=1", proxy.dsn(), "-c", sql],
        check=True,
        capture_output=True,
        text=True,
        timeout=30,
    ).stdout


def test_psql_query_through_the_proxy(proxy: ProxyThread) -> None:
    assert psql(proxy, "select 40 + 2") == "42\n"
    assert proxy.proxy.stats.connections_total == 1


def test_connection_returns_to_the_relay_thread_after_python_handled_a_message(
    proxy: ProxyThread,
) -> None:
    stats = proxy.proxy.stats

    def attaches(n: int) -> bool:
        # The hand-over to the relay thread happens once the connection is quiet, which
        # may be just after the client has its answer: give a loaded machine time.
        deadline = time.monotonic() + 10
        while stats.relay_attaches < n and time.monotonic() < deadline:
            time.sleep(0.01)
        return stats.relay_attaches == n

    with psycopg.connect(proxy.dsn(), autocommit=True, connect_timeout=10) as conn:
        assert conn.execute("select 1").fetchone() == (1,)
        assert attaches(1)
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("set synchronous_commit = off")  # the C session defers to Python
        for i in range(3):
            assert conn.execute("select %s::int", (i,)).fetchone() == (i,)
        assert attaches(2)


def test_bytes_relayed_are_counted_both_ways_by_every_implementation(
    any_proxy: ProxyThread,
) -> None:
    before = any_proxy.call(any_proxy.proxy.bytes_relayed)
    query = "select repeat('x', 100000)"
    with psycopg.connect(any_proxy.dsn(), autocommit=True, connect_timeout=10) as conn:
        for _ in range(3):
            assert len(conn.execute(query).fetchone()[0]) == 100000  # type: ignore[index]
    deadline = time.monotonic() + 10
    while True:
        to_server, to_client = any_proxy.call(any_proxy.proxy.bytes_relayed)
        grew = (to_server - before[0], to_client - before[1])
        if grew[1] >= 300_000 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert grew[0] >= 3 * len(query), grew  # every query text went to the server
    assert 300_000 <= grew[1] < 400_000, grew  # three 100 kB rows came back, and little else

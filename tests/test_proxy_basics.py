"""The proxy relays real PostgreSQL sessions: a first smoke test."""

import subprocess

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

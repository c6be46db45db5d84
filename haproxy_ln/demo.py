"""`haproxy-ln demo`: a local PostgreSQL, the proxy in front of it, pgbench through it.

The failover demo (two nodes, etcd, the Lightning daemon simulator) replaces
this once the pair exists; until then the demo shows the proxy doing real
work: it starts a throwaway PostgreSQL 15 cluster on a free loopback port,
fills it with pgbench's tables, runs pgbench's TPC-B-like workload through
the proxy and prints pgbench's summary next to the proxy's own counters.
Everything is stopped and removed at the end, also on Ctrl-C.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Callable

import trio

from haproxy_ln import framing
from haproxy_ln.config import HostPort, ProxyConfig
from haproxy_ln.local import PostgresCluster, scratch_dir
from haproxy_ln.proxy.gate import Gate
from haproxy_ln.proxy.server import Proxy

_SUMMARY = (
    "number of transactions actually processed",
    "number of failed",
    "latency average",
    "tps = ",
)


def run_demo(seconds: int, clients: int, say: Callable[[str], None]) -> int:
    """Run the demo; returns pgbench's exit status."""
    base = scratch_dir("haproxy-ln-demo-")
    cluster = PostgresCluster(base / "pg")
    try:
        say("starting a throwaway PostgreSQL 15 cluster")
        cluster.start()
        say(f"PostgreSQL listens on {cluster.host}:{cluster.port}; creating pgbench tables")
        subprocess.run(
            ["pgbench", "-i", "-q", "-s", "1", cluster.dsn()],
            check=True,
            capture_output=True,
            timeout=300,
        )
        return trio.run(_through_proxy, cluster, seconds, clients, say)
    finally:
        say("stopping PostgreSQL and removing its files")
        cluster.stop()
        shutil.rmtree(base, ignore_errors=True)


async def _through_proxy(
    cluster: PostgresCluster, seconds: int, clients: int, say: Callable[[str], None]
) -> int:
    config = ProxyConfig.model_validate({"upstream": f"{cluster.host}:{cluster.port}"})
    config = config.model_copy(update={"listen": HostPort("127.0.0.1", 0)})
    proxy = Proxy(config, Gate(is_open=True))
    async with trio.open_nursery() as nursery:
        ((host, port),) = await nursery.start(proxy.serve)
        framer = "C framer and relay thread" if framing.NATIVE else "pure-Python framer"
        say(f"haproxy-ln proxy listens on {host}:{port} ({framer})")
        say(f"running pgbench TPC-B through the proxy: {clients} clients, {seconds} s")
        result = await trio.run_process(
            [
                "pgbench",
                "-c",
                str(clients),
                "-j",
                str(min(clients, 2)),
                "-T",
                str(seconds),
                f"postgresql://postgres@{host}:{port}/postgres",
            ],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
        proxy.stop()
    for line in result.stdout.decode().splitlines():
        if line.startswith(_SUMMARY):
            print(f"  {line}")
    if result.returncode:
        sys.stderr.write(result.stderr.decode())
    stats = proxy.stats
    print(
        f"  proxy: {stats.connections_total} client connections, "
        f"{stats.protocol_errors} protocol errors, {stats.cancels_withheld} cancels withheld"
    )
    return result.returncode

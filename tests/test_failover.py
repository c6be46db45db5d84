"""Failover, switchover and rejoin with two real agents (issue 5).

The daemon is the Lightning simulator in cln mode (through its node's
proxy, journaling every acknowledged channel state); after each scenario
the journal checker must find every acknowledged state on the active
node's database (lost = 0, split brain = 0) and the one-signer check must
pass. A few plain rows written through the proxy keep the cause of a
failure obvious.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from agent_harness import check_one_signer, first, wait_for

from haproxy_ln.local import EtcdServer, PostgresCluster
from haproxy_ln.local.pair import AgentNode, make_keys, sim_daemon
from haproxy_ln.sim.checker import check

pytestmark = pytest.mark.slow

RATE = 20.0


class Node(AgentNode):
    @property
    def journal(self) -> Path:
        return self.base.parent / f"journal-{self.name}"


@pytest.fixture
def pair(
    tmp_path: Path, etcd: EtcdServer, pg_pair: tuple[PostgresCluster, PostgresCluster]
) -> Iterator[tuple[Node, Node]]:
    kek, sealed = make_keys(tmp_path)
    a = Node("a", tmp_path / "a", pg_pair[0], etcd.endpoint)
    b = Node("b", tmp_path / "b", pg_pair[1], etcd.endpoint)
    for node in (a, b):
        node.base.mkdir()
    a.write_config(b, kek, sealed, sim_daemon(a, a.journal, RATE))
    b.write_config(a, kek, sealed, sim_daemon(b, b.journal, RATE))
    try:
        yield a, b
    finally:
        for node in (a, b):
            node.stop()


def check_journals(active: Node, *nodes: Node) -> None:
    """Every state the simulated daemon acknowledged is on `active`'s database; one signer."""
    journals = [n.journal for n in nodes if n.journal.exists()]
    result = check(journals, active.pg.dsn())
    assert result.acked > 0
    assert result.ok, result.to_dict()
    check_one_signer(*nodes)


def acked_after(node: Node, after: float) -> bool:
    from haproxy_ln.sim.journal import read_journal

    records = read_journal(node.journal) if node.journal.exists() else []
    return any(r.kind == "ack" and r.mono >= after for r in records)


def synchronous(active: Node, standby: Node) -> bool:
    lines = active.log().splitlines()
    last = [line for line in lines if "haproxy_ln.agent.shell: active:" in line]
    return bool(last) and last[-1].endswith(f"synchronous with {standby.name}")


def wait_sync(active: Node, standby: Node, timeout: float = 60) -> None:
    wait_for(
        f"{active.name} synchronous with {standby.name}",
        lambda: synchronous(active, standby),
        timeout,
        active,
        standby,
    )


def write(node: Node, value: int) -> None:
    """One acknowledged commit through `node`'s proxy."""
    dsn = f"host=127.0.0.1 port={node.proxy_port} user=postgres dbname=postgres"
    with psycopg.connect(dsn, connect_timeout=5, autocommit=True) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS acked (v int PRIMARY KEY)")
        conn.execute("INSERT INTO acked VALUES (%s)", (value,))


def rows(node: Node) -> set[int]:
    text = node.pg.psql("SELECT v FROM acked ORDER BY v").split()
    return {int(v) for v in text}


def switchover(node: Node, to: str | None = None) -> str:
    argv = [sys.executable, "-m", "haproxy_ln", "switchover", "--config", str(node.config_path)]
    argv += ["--to", to] if to else []
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr + node.log()[-3000:]
    return done.stdout


def start_pair(a: Node, b: Node) -> None:
    a.start()
    wait_for("a active", lambda: first(a, "daemon.ready") is not None, 60, a)
    b.start()
    wait_sync(a, b)


def test_switchover_both_ways_loses_no_write(pair: tuple[Node, Node]) -> None:
    a, b = pair
    start_pair(a, b)
    write(a, 1)
    started = time.monotonic()
    out = switchover(a, "b")
    assert "to b" in out, out
    wait_for("b's daemon", lambda: first(b, "daemon.ready", started) is not None, 30, a, b)
    # No lease wait: b took the key while a's lease was still alive (a never lost, revoked
    # or stopped renewing it), so the handover, not an expiry, let b in.
    acquired = first(b, "leader.acquired", started)
    assert acquired is not None
    lease_ends = [
        e for e in a.events() if e.kind in ("lease.lost", "lease.revoked", "agent.killed")
    ]
    assert all(e.mono < started for e in lease_ends), lease_ends
    assert a.running
    write(b, 2)
    assert rows(b) == {1, 2}
    wait_sync(b, a)  # replication now runs the other way
    assert rows(a) == {1, 2}
    switchover(b)
    wait_for("a's daemon again", lambda: first(a, "daemon.ready", started + 1) is not None, 30, a)
    write(a, 3)
    wait_sync(a, b)
    assert rows(a) == rows(b) == {1, 2, 3}
    check_journals(a, a, b)


def test_old_active_rejoins_as_standby_and_the_pair_returns_to_sync(
    pair: tuple[Node, Node],
) -> None:
    a, b = pair
    start_pair(a, b)
    write(a, 1)
    killed = a.kill()
    wait_for("b's daemon", lambda: first(b, "daemon.ready", killed) is not None, 30, b)
    write(b, 2)  # b runs degraded: a is gone
    a.start()
    wait_sync(b, a)
    assert "standby: " in a.log().split("agent.started")[-1]
    assert rows(a) == rows(b) == {1, 2}
    write(b, 3)
    assert rows(a) == {1, 2, 3}  # synchronous: on a before b acknowledged it
    wait_for("b's daemon to write", lambda: acked_after(b, time.monotonic() - 0.5), 30, b)
    check_journals(b, a, b)


TIMELINE_STEPS = (
    "detected",
    "leader_acquired",
    "fence_raised",
    "sequences_moved",
    "primary_bootstrapped",
    "gate_opened",
    "keys_materialized",
    "daemon_ready",
)


def takeover_timeline(node: Node, after: float) -> dict[str, object]:
    """The takeover timeline `node` recorded after `after` (it follows daemon.ready)."""
    done = lambda: first(node, "takeover.timeline", after) is not None  # noqa: E731
    wait_for(f"{node.name}'s takeover timeline", done, 10, node)
    found = first(node, "takeover.timeline", after)
    assert found is not None
    assert set(TIMELINE_STEPS) <= set(found.fields), found.fields
    return found.fields


def test_failover_after_kill_9_of_the_active_postgresql(pair: tuple[Node, Node]) -> None:
    a, b = pair
    start_pair(a, b)
    write(a, 1)
    killed = time.monotonic()
    a.pg.kill()
    wait_for("b's daemon", lambda: first(b, "daemon.ready", killed) is not None, 60, a, b)
    takeover_timeline(b, killed)
    write(b, 2)
    assert rows(b) == {1, 2}
    wait_for("b's daemon to write", lambda: acked_after(b, killed), 30, b)
    check_journals(b, a, b)


def test_failover_after_a_clean_stop_needs_no_lease_wait(pair: tuple[Node, Node]) -> None:
    a, b = pair
    start_pair(a, b)
    write(a, 1)
    stopped = time.monotonic()
    assert a.stop() == 0
    wait_for("b's daemon", lambda: first(b, "daemon.ready", stopped) is not None, 30, b)
    timeline = takeover_timeline(b, stopped)
    # a revoked its lease on the way out: b took the key without waiting for it to expire.
    revoked = first(a, "lease.revoked", stopped)
    acquired = first(b, "leader.acquired", stopped)
    assert revoked is not None and acquired is not None
    assert revoked.mono <= acquired.mono
    assert isinstance(timeline["daemon_ready"], float)
    write(b, 2)
    assert rows(b) == {1, 2}
    wait_for("b's daemon to write", lambda: acked_after(b, stopped), 30, b)
    check_journals(b, a, b)


def test_rejoin_of_a_diverged_old_active_discards_what_the_new_primary_lacks(
    pair: tuple[Node, Node],
) -> None:
    """a commits locally what never reached b (its agent, and so its replicator, is dead):
    when a rejoins, that row must not survive: a is re-copied from b."""
    a, b = pair
    start_pair(a, b)
    write(a, 1)
    killed = a.kill()
    a.pg.psql("SET synchronous_commit = local; INSERT INTO acked VALUES (99)")
    assert rows(a) == {1, 99}
    wait_for("b's daemon", lambda: first(b, "daemon.ready", killed) is not None, 30, b)
    write(b, 2)
    a.start()
    wait_sync(b, a)
    assert rows(a) == rows(b) == {1, 2}
    wait_for("b's daemon to write", lambda: acked_after(b, killed), 30, b)
    check_journals(b, a, b)

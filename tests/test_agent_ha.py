"""Two agents against one etcd (issue 4): one signer, fencing, no promotion without sync.

Each test runs two real `haproxy-ln run` agents with their own PostgreSQL,
one etcd, sealed keys and a fake daemon, injects a fault, and checks the
outcome from the agents' safety event logs (monotonic timestamps) with
`check_one_signer` and exact comparisons against the lease deadlines.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from agent_harness import TTL, Node, check_one_signer, first, pair_of, wait_for
from faultproxy import FaultProxy

from haproxy_ln.events import Event
from haproxy_ln.local import EtcdServer, PostgresCluster

pytestmark = pytest.mark.slow

ACTIVE_WITHIN = 60.0  # seconds: first start copies the (empty) database and bootstraps


KEEPALIVE = TTL / 3


@pytest.fixture
def etcd_link(etcd: EtcdServer) -> Iterator[FaultProxy]:
    """Node a's link to etcd, which tests can cut."""
    with FaultProxy(etcd.endpoint) as link:
        yield link


@pytest.fixture
def pair(
    tmp_path: Path,
    etcd: EtcdServer,
    etcd_link: FaultProxy,
    pg_pair: tuple[PostgresCluster, PostgresCluster],
) -> Iterator[tuple[Node, Node]]:
    with pair_of(tmp_path, pg_pair, (etcd_link.endpoint, etcd.endpoint)) as nodes:
        yield nodes


def active_node(*nodes: Node) -> Node | None:
    ready = [n for n in nodes if n.proc is not None and "active: " in n.log()]
    return ready[0] if len(ready) == 1 else None


def start_active_first(a: Node, b: Node) -> None:
    """Start a, wait until it is active, then start b."""
    a.start()
    wait_for("a to run its daemon", lambda: first(a, "daemon.ready") is not None, ACTIVE_WITHIN, a)
    b.start()
    wait_for("b to stand by", lambda: "standby: " in b.log(), ACTIVE_WITHIN, a, b)


def test_two_agents_exactly_one_becomes_active(pair: tuple[Node, Node]) -> None:
    a, b = pair
    a.start()
    b.start()
    wait_for(
        "one daemon ready",
        lambda: any(first(n, "daemon.ready") for n in (a, b)),
        ACTIVE_WITHIN,
        a,
        b,
    )
    time.sleep(3 * TTL)
    ready = [n.name for n in (a, b) if first(n, "daemon.ready")]
    assert len(ready) == 1, ready
    standby = b if ready == ["a"] else a
    assert "standby: " in standby.log(), standby.log()[-3000:]
    check_one_signer(a, b)


def wait_synchronous(a: Node, b: Node) -> None:
    """Wait until a (active) names b in the sync record."""
    wait_for("a to be synchronous with b", lambda: "synchronous with b" in a.log(), 60, a, b)


def event(node: Node, kind: str, after: float = 0.0) -> Event:
    found = first(node, kind, after)
    assert found is not None, f"no {kind} on {node.name} after {after}: {node.log()[-3000:]}"
    return found


def test_kill_9_of_the_active_standby_takes_over_only_after_the_lease_expired(
    pair: tuple[Node, Node],
) -> None:
    a, b = pair
    start_active_first(a, b)
    wait_synchronous(a, b)
    killed = a.kill()
    wait_for("b's daemon", lambda: first(b, "daemon.ready", killed) is not None, 30, b)
    acquired = event(b, "leader.acquired", killed)
    # a's last keepalive was sent at most one interval before the kill, so etcd
    # keeps its lease (and leader key) for at least TTL - interval after it.
    assert acquired.mono - killed >= TTL - KEEPALIVE - 0.2, acquired.mono - killed
    keys, daemon = event(b, "keys.materialized", killed), event(b, "daemon.started", killed)
    assert acquired.mono < keys.mono < daemon.mono
    check_one_signer(a, b)


def self_fence_is_before_the_lease_can_expire(node: Node, after: float) -> Event:
    """The node's self-fence event, after checking that the daemon was killed (SIGKILL
    delivered: it runs no more code, though reaping it may take a little longer on a loaded
    machine) and the keys gone before last keepalive sent + TTL, the earliest time etcd
    could expire the lease."""
    fenced = event(node, "ha.fenced", after)
    assert fenced.fields["cause"], fenced
    sent = fenced.fields["last_keepalive_sent"]
    assert isinstance(sent, float)
    killed = event(node, "daemon.killed", after)
    assert killed.fields["delivered"] is True, killed
    for kind in ("daemon.killed", "keys.destroyed"):
        gone = event(node, kind, after)
        assert gone.mono < sent + TTL, (kind, gone.mono, sent + TTL)
    return fenced


def test_active_cut_off_from_etcd_fences_itself_before_its_lease_expires(
    pair: tuple[Node, Node], etcd_link: FaultProxy
) -> None:
    a, b = pair
    start_active_first(a, b)
    wait_synchronous(a, b)
    cut = time.monotonic()
    etcd_link.blackhole()
    # The teardown follows the fence event by a few ms: wait for its last step.
    wait_for("a's teardown", lambda: first(a, "keys.destroyed", cut) is not None, 30, a)
    fenced = self_fence_is_before_the_lease_can_expire(a, cut)
    wait_for("b's daemon", lambda: first(b, "daemon.ready", cut) is not None, 30, a, b)
    assert event(b, "leader.acquired", cut).mono > fenced.mono
    etcd_link.heal()
    wait_for("a to stand by again", lambda: first(a, "ha.standby", cut) is not None, 30, a)
    check_one_signer(a, b)


def test_paused_active_fences_itself_first_on_waking_and_its_epoch_is_refused(
    pair: tuple[Node, Node],
) -> None:
    """While the agent is paused nothing of it runs: not its proxy (so its daemon's database
    path is frozen), not its HA loop. Under systemd the watchdog (WatchdogSec below the TTL)
    kills a paused agent and its daemon with it; here, without systemd, the daemon child
    outlives the pause, so one-signer is checked outside the pause only."""
    a, b = pair
    start_active_first(a, b)
    wait_synchronous(a, b)
    old_epoch = event(a, "leader.acquired").fields["epoch"]
    paused = time.monotonic()
    a.signal(signal.SIGSTOP)
    wait_for("b's daemon", lambda: first(b, "daemon.ready", paused) is not None, 30, b)
    new_epoch = event(b, "fence.raised", paused).fields["epoch"]
    assert isinstance(new_epoch, int) and isinstance(old_epoch, int) and new_epoch > old_epoch
    woke = time.monotonic()
    a.signal(signal.SIGCONT)
    wait_for("a's teardown", lambda: first(a, "keys.destroyed", woke) is not None, 30, a)
    fenced = event(a, "ha.fenced", paused)
    sent = fenced.fields["last_keepalive_sent"]
    assert isinstance(sent, float) and sent < paused, fenced
    # On waking, a's first events are its teardown: nothing else happened before it.
    teardown = {"ha.fenced", "daemon.killed", "daemon.stopping", "daemon.stopped"}
    teardown |= {"keys.destroyed", "lease.lost"}
    after_wake = [e.kind for e in a.events() if e.mono >= woke]
    assert {"ha.fenced", "daemon.stopped", "keys.destroyed"} <= set(after_wake), after_wake
    done = max(after_wake.index(k) for k in ("ha.fenced", "daemon.stopped", "keys.destroyed"))
    assert set(after_wake[: done + 1]) <= teardown, after_wake
    # The store a's replicator wrote to is fenced at b's epoch: a's epoch is refused there.
    assert int(b.pg.psql("SELECT epoch FROM haproxy_ln.fence").strip()) == new_epoch
    wait_for("a to stand by", lambda: first(a, "ha.standby", woke) is not None, 30, a)
    torn_down = max(event(a, k, woke).mono for k in ("daemon.stopped", "keys.destroyed"))
    check_one_signer(a, b, outside=(paused, torn_down))


def promote(node: Node, *flags: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "haproxy_ln", "promote", "--config", str(node.config_path)]
    return subprocess.run(argv + list(flags), capture_output=True, text=True, timeout=90)


def test_standby_not_named_in_the_sync_record_waits_until_an_operator_forces_it(
    pair: tuple[Node, Node],
) -> None:
    a, b = pair
    start_active_first(a, b)
    wait_synchronous(a, b)
    b.pg.stop()  # the replica store is gone: a degrades and clears the sync record
    wait_for(
        "a to degrade", lambda: "running alone" in a.log().split("synchronous with b")[-1], 30, a
    )
    killed = a.kill()
    time.sleep(3 * TTL)
    assert first(b, "leader.acquired", killed) is None
    assert first(b, "keys.materialized", killed) is None
    last_reason = b.log().strip().splitlines()[-1]
    assert "standby: " in last_reason and "sync record" in last_reason, last_reason
    # The operator's override: refused without the data-loss flag, then honoured.
    b.pg.start()
    refused = promote(b)
    assert refused.returncode == 1 and "--accept-data-loss" in refused.stderr, refused.stderr
    time.sleep(TTL)
    assert first(b, "leader.acquired", killed) is None
    forced = promote(b, "--accept-data-loss", "--timeout", "60")
    assert forced.returncode == 0, forced.stderr + b.log()[-3000:]
    assert "b took over in place of epoch" in forced.stdout
    wait_for("b to run its daemon", lambda: first(b, "daemon.ready", killed) is not None, 60, b)
    assert "forced by the operator, who accepted data loss" in b.log()
    check_one_signer(a, b)

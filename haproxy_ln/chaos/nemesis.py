"""The nemeses: one fault each, injected into a healthy pair, held, then healed.

How this works: each nemesis is a function `(pair, rng) -> params`. It
picks its target from the pair as it is (the active or the standby node,
the etcd leader), injects the fault, holds it for a random time drawn from
`rng` (so a trial is replayed by its seed), heals what it can and returns
its parameters. It records `nemesis.inject` and `nemesis.heal` in the
chaos log (monotonic times) and, for a paused agent, `agent.paused` and
`agent.resumed`, from which the checker derives the paused-agent window.
Whatever the nemesis leaves broken (a killed process it did not restart)
is the recovery phase's job (`ChaosPair.repair`).

`NEMESES` maps the command-line names to the functions, in a stable order.
"""

from __future__ import annotations

import contextlib
import errno
import random
import signal
import time
from collections.abc import Callable
from pathlib import Path

from haproxy_ln.chaos import hostile
from haproxy_ln.chaos.system import ChaosNode, ChaosPair, PairFailed, wait_until
from haproxy_ln.local import LocalServerError

__all__ = ["NEMESES", "Nemesis", "Params"]

TTL = 2.0  # the pair's [ha] lease_ttl (haproxy_ln.local.pair)

Params = dict[str, str | int | float | None]
Nemesis = Callable[[ChaosPair, random.Random], Params]


def _active(pair: ChaosPair) -> ChaosNode:
    node = pair.active()
    if node is None:
        raise PairFailed("no active node to inject a fault into")
    return node


def _hold(rng: random.Random, low: float, high: float) -> float:
    seconds = round(rng.uniform(low, high), 3)
    time.sleep(seconds)
    return seconds


def kill_active_agent(pair: ChaosPair, rng: random.Random) -> Params:
    """kill -9 of the active agent (its daemon dies with it); restarted after a while."""
    node = _active(pair)
    pair.note(node, "nemesis.inject", what="kill -9 agent")
    node.agent.kill()
    hold = _hold(rng, 0.5, 6.0)
    node.agent.start()
    pair.note(node, "nemesis.heal", what="agent restarted")
    return {"target": node.name, "restart_after_s": hold}


def kill_standby_agent(pair: ChaosPair, rng: random.Random) -> Params:
    """kill -9 of the standby agent; restarted after a while."""
    node = pair.peer(_active(pair))
    pair.note(node, "nemesis.inject", what="kill -9 agent")
    node.agent.kill()
    hold = _hold(rng, 0.5, 6.0)
    node.agent.start()
    pair.note(node, "nemesis.heal", what="agent restarted")
    return {"target": node.name, "restart_after_s": hold}


def _kill_postgres(pair: ChaosPair, node: ChaosNode, rng: random.Random) -> Params:
    pair.note(node, "nemesis.inject", what="kill -9 PostgreSQL")
    node.pg.kill()
    hold = _hold(rng, 1.0, 8.0)
    node.pg.start()
    pair.note(node, "nemesis.heal", what="PostgreSQL restarted")
    return {"target": node.name, "restart_after_s": hold}


def kill_active_postgres(pair: ChaosPair, rng: random.Random) -> Params:
    """kill -9 of the active node's PostgreSQL (every process of it); restarted later."""
    return _kill_postgres(pair, _active(pair), rng)


def kill_standby_postgres(pair: ChaosPair, rng: random.Random) -> Params:
    """kill -9 of the standby's PostgreSQL, the active's replica store; restarted later."""
    return _kill_postgres(pair, pair.peer(_active(pair)), rng)


def pause_active_agent(pair: ChaosPair, rng: random.Random) -> Params:
    """SIGSTOP of the active agent for longer than the lease TTL, then SIGCONT."""
    node = _active(pair)
    pair.note(node, "nemesis.inject", what="SIGSTOP agent")
    pair.note(node, "agent.paused")
    node.agent_paused = True
    node.agent.signal(signal.SIGSTOP)
    hold = _hold(rng, TTL + 0.5, TTL + 4.0)
    node.agent.signal(signal.SIGCONT)
    node.agent_paused = False
    pair.note(node, "agent.resumed")
    pair.note(node, "nemesis.heal", what="SIGCONT agent")
    return {"target": node.name, "paused_s": hold}


def pause_active_postgres(pair: ChaosPair, rng: random.Random) -> Params:
    """SIGSTOP of the active node's PostgreSQL (all its processes), then SIGCONT."""
    node = _active(pair)
    pair.note(node, "nemesis.inject", what="SIGSTOP PostgreSQL")
    node.pg_paused = True
    node.signal_pg(signal.SIGSTOP)
    hold = _hold(rng, 1.0, 8.0)
    node.signal_pg(signal.SIGCONT)
    node.pg_paused = False
    pair.note(node, "nemesis.heal", what="SIGCONT PostgreSQL")
    return {"target": node.name, "paused_s": hold}


def partition_active_etcd(pair: ChaosPair, rng: random.Random) -> Params:
    """The active agent cut off from every etcd member (its own proxies), then healed."""
    node = _active(pair)
    pair.note(node, "nemesis.inject", what="partition from etcd")
    for link in node.etcd_links:
        link.blackhole()
    hold = _hold(rng, 1.0, 6.0)
    for link in node.etcd_links:
        link.heal()
    pair.note(node, "nemesis.heal", what="etcd links healed")
    return {"target": node.name, "partitioned_s": hold}


def partition_replica_link(pair: ChaosPair, rng: random.Random) -> Params:
    """The active's replicator cut off from the replica store (the standby's database)."""
    node = _active(pair)
    link = node.replica_link
    assert link is not None
    pair.note(node, "nemesis.inject", what="partition from the replica store")
    link.blackhole()
    hold = _hold(rng, 1.0, 8.0)
    link.heal()
    pair.note(node, "nemesis.heal", what="replica link healed")
    return {"target": node.name, "partitioned_s": hold}


def kill_etcd_leader(pair: ChaosPair, rng: random.Random) -> Params:
    """kill -9 of the etcd member that leads; restarted after a while."""
    found: list[str] = []

    def leader_known() -> bool:
        leader = pair.etcd.leader()
        if leader is not None:
            found.append(leader.name)
        return leader is not None

    wait_until("an etcd leader", leader_known, 10.0)
    member = next(m for m in pair.etcd.members if m.name == found[-1])
    pair.note(None, "nemesis.inject", what=f"kill -9 etcd leader {member.name}")
    member.kill()
    hold = _hold(rng, 1.0, 5.0)
    member.start()
    pair.note(None, "nemesis.heal", what=f"etcd member {member.name} restarted")
    return {"target": member.name, "restart_after_s": hold}


def hostile_clients(pair: ChaosPair, rng: random.Random) -> Params:
    """A burst of garbage, oversized and half-open connections on the active's proxy port."""
    node = _active(pair)
    seconds = round(rng.uniform(1.0, 4.0), 3)
    pair.note(node, "nemesis.inject", what="hostile clients on the proxy port")
    counts = hostile.burst(node.agent.proxy_port, seconds, rng)
    pair.note(node, "nemesis.heal", what="hostile clients gone")
    return {"target": node.name, "burst_s": seconds, **counts}


def _fill(path: Path) -> int:
    """Write zeros to `path` until the filesystem is full; bytes written."""
    written = 0
    with path.open("wb", buffering=0) as f:
        for chunk in (1 << 20, 1 << 12, 1):
            block = bytes(chunk)
            try:
                while True:
                    written += f.write(block) or 0
            except OSError as e:
                if e.errno != errno.ENOSPC:
                    raise
    return written


def fill_standby_disk(pair: ChaosPair, rng: random.Random) -> Params:
    """The standby's disk (a tmpfs holding its PostgreSQL) filled until writes to that
    PostgreSQL fail, held full, then freed."""
    node = pair.peer(_active(pair))
    if node.disk is None:
        return {"target": node.name, "skipped": "no tmpfs could be mounted"}
    pair.note(node, "nemesis.inject", what="fill the disk")
    filled = _fill(node.disk / "fill")

    def write_fails() -> bool:
        try:
            node.pg.psql(
                "CREATE TABLE IF NOT EXISTS chaos_fill (x text);"
                "INSERT INTO chaos_fill SELECT repeat('x', 4000) FROM generate_series(1, 500)"
            )
        except LocalServerError:
            return True
        return False

    started = time.monotonic()
    failed = True
    try:
        wait_until("a write to the full disk to fail", write_fails, 15.0)
    except PairFailed:
        failed = False
    fails_after = round(time.monotonic() - started, 3)
    pair.note(node, "disk.full", writes_fail=failed)
    hold = _hold(rng, 1.0, 4.0)
    (node.disk / "fill").unlink()
    pair.note(node, "nemesis.heal", what="disk freed")
    with contextlib.suppress(LocalServerError):  # it may be restarting after a PANIC
        node.pg.psql("DROP TABLE IF EXISTS chaos_fill")
    return {
        "target": node.name,
        "filled_bytes": filled,
        "writes_failed": int(failed),
        "writes_failed_after_s": fails_after,
        "held_full_s": hold,
    }


def _take_down(pair: ChaosPair, node: ChaosNode) -> None:
    pair.note(node, "nemesis.inject", what="kill -9 agent and PostgreSQL")
    node.agent.kill()
    node.pg.kill()


def _bring_up(pair: ChaosPair, node: ChaosNode) -> None:
    node.pg.start()
    node.agent.start()
    pair.note(node, "nemesis.heal", what="PostgreSQL and agent restarted")


def _rolled_back(node: ChaosNode, since: float, without: ChaosNode) -> PairFailed | None:
    """The failure to report if `node` took the leader key at or after `since`, lacking
    writes that `without` had acknowledged alone: a rollback."""
    if any(e.kind == "leader.acquired" and e.mono >= since for e in node.events()):
        return PairFailed(f"{node.name} took the lead without {without.name}'s writes")
    return None


def lose_both_nodes_in_turn(pair: ChaosPair, rng: random.Random) -> Params:
    """A double fault. The active node goes down whole (agent and PostgreSQL); once
    the standby has taken over and acknowledged writes alone (degraded), it goes down
    too. The first node comes back first, without those writes: it must not take over
    (no rollback) while it is alone, longer than the lease TTL, until the second is back."""
    first = _active(pair)
    second = pair.peer(first)
    _take_down(pair, first)
    down = time.monotonic()
    wait_until(
        f"{second.name} to take over and acknowledge writes alone",
        lambda: pair.active() is second and second.acked_since(down),
        60.0,
    )
    took_over = round(time.monotonic() - down, 3)
    _take_down(pair, second)
    _bring_up(pair, first)
    alone = time.monotonic()
    hold = _hold(rng, TTL + 2.0, TTL + 6.0)
    rollback = _rolled_back(first, alone, second)
    _bring_up(pair, second)
    if rollback:
        raise rollback
    return {"first": first.name, "second_took_over_after_s": took_over, "first_alone_s": hold}


def degrade_then_lose_active(pair: ChaosPair, rng: random.Random) -> Params:
    """A double fault. The active's link to the replica store is cut until the active
    degrades and acknowledges writes alone; then its agent is killed. The standby
    lacks those writes: it must not take over (no rollback) while the active is gone,
    longer than the lease TTL. Then the link heals and the agent restarts, to lead again."""
    node = _active(pair)
    standby = pair.peer(node)
    link = node.replica_link
    assert link is not None
    pair.note(node, "nemesis.inject", what="partition from the replica store")
    link.blackhole()
    cut = time.monotonic()

    def degraded_and_acked_alone() -> bool:
        records = [
            e.mono
            for e in node.events()
            if e.kind == "sync.record" and e.mono >= cut and e.fields.get("replica") is None
        ]
        return bool(records) and node.acked_since(records[-1])

    wait_until(
        f"{node.name} to degrade and acknowledge writes alone", degraded_and_acked_alone, 30.0
    )
    degraded = round(time.monotonic() - cut, 3)
    pair.note(node, "nemesis.inject", what="kill -9 agent")
    node.agent.kill()
    gone = time.monotonic()
    hold = _hold(rng, TTL + 2.0, TTL + 6.0)
    rollback = _rolled_back(standby, gone, node)
    link.heal()
    node.agent.start()
    pair.note(node, "nemesis.heal", what="replica link healed, agent restarted")
    if rollback:
        raise rollback
    return {"target": node.name, "degraded_after_s": degraded, "agent_dead_s": hold}


NEMESES: dict[str, Nemesis] = {
    "kill-active-agent": kill_active_agent,
    "kill-active-postgres": kill_active_postgres,
    "kill-standby-agent": kill_standby_agent,
    "kill-standby-postgres": kill_standby_postgres,
    "pause-active-agent": pause_active_agent,
    "pause-active-postgres": pause_active_postgres,
    "partition-active-etcd": partition_active_etcd,
    "partition-replica-link": partition_replica_link,
    "kill-etcd-leader": kill_etcd_leader,
    "hostile-clients": hostile_clients,
    "fill-standby-disk": fill_standby_disk,
    "lose-both-nodes-in-turn": lose_both_nodes_in_turn,
    "degrade-then-lose-active": degrade_then_lose_active,
}

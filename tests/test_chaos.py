"""The fault-injection suite (issue 6) and the bugs it found.

- The checker's interval logic on hand-made events (no servers).
- A 3-member etcd cluster survives the loss of its leader.
- Regression tests for the bugs the suite found (docs/reliability.md lists
  them): an asyncio error nobody awaited ended the agent; a replica link
  that drops packets hung the replicator forever; the agent never started
  the daemon with the lnd or "none" key adapters; a restarted lnd was never
  unlocked; SIGSTOP/SIGKILL of a PostgreSQL reached only its postmaster; a
  database error ended the agent; an etcd stream reset ended the agent; the
  observation delayed the self-fence past the earliest lease expiry; an
  agent restarted at once after kill -9 dropped the slot it needed.
- The CI set: `haproxy-ln chaos` runs every nemesis once in cln mode and
  once in lnd mode (so every nemesis twice), and every trial must be safe
  (no lost or conflicting acknowledged write, one signer, no daemon without
  a valid lease) and recover.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import grpc
import grpc.aio
import psycopg
import pytest
import trio
from agent_harness import Node as FakeDaemonNode
from agent_harness import first, make_keys, wait_for
from replication_harness import READY, ReplicatorProcess

from haproxy_ln.agent.shell import HaShell
from haproxy_ln.chaos.checker import check_signers, leadership_intervals, outage
from haproxy_ln.chaos.command import NEMESIS_NAMES
from haproxy_ln.chaos.nemesis import NEMESES
from haproxy_ln.config import EtcdConfig, HostPort, load
from haproxy_ln.coord.client import EtcdClient, _Unavailable
from haproxy_ln.coord.model import Lease
from haproxy_ln.daemon.sdnotify import SystemdNotifier
from haproxy_ln.daemon.supervisor import DaemonState as SupervisorState
from haproxy_ln.errors import CoordError
from haproxy_ln.events import Event, EventLog, FieldValue, read_events
from haproxy_ln.ha import HaState, Role, step
from haproxy_ln.keys.lnd import LndCustody, LndSettings
from haproxy_ln.keys.lnrpc import WalletState
from haproxy_ln.keys.sealing import KekSource
from haproxy_ln.keys.tools import new_kek, seal_file
from haproxy_ln.local import EtcdServer, PostgresCluster, free_port
from haproxy_ln.local.etcd import EtcdCluster
from haproxy_ln.local.faultproxy import FaultProxy
from haproxy_ln.local.pair import AgentNode
from haproxy_ln.local.ports import pid_alive
from haproxy_ln.proxy.gate import Gate
from haproxy_ln.sim.wallet import WalletServer, load_or_create_tls
from haproxy_ln.store import bridge

TTL = 2.0


def ev(node: str, kind: str, mono: float, **fields: FieldValue) -> Event:
    return Event(kind, node, mono, mono, fields)


# --- the checker ------------------------------------------------------------------------------


def test_every_nemesis_has_a_command_line_name() -> None:
    assert tuple(NEMESES) == NEMESIS_NAMES


def test_a_daemon_killed_before_the_earliest_lease_expiry_held_a_valid_lease() -> None:
    a = [
        ev("a", "leader.acquired", 10.0, epoch=5),
        ev("a", "daemon.started", 11.0),
        ev("a", "ha.fenced", 13.5, last_keepalive_sent=12.0),
        ev("a", "daemon.stopped", 13.9),
    ]
    assert leadership_intervals(a, [], TTL, 20.0) == [(10.0, 14.0)]
    found = check_signers({"a": a, "b": []}, [], TTL, (0.0, 20.0), 20.0)
    assert found.ok and not found.unleased_daemon


def test_a_daemon_alive_past_last_keepalive_sent_plus_ttl_counts_as_unleased() -> None:
    a = [
        ev("a", "leader.acquired", 10.0, epoch=5),
        ev("a", "daemon.started", 11.0),
        ev("a", "ha.fenced", 13.5, last_keepalive_sent=12.0),
        ev("a", "daemon.stopped", 14.25),
    ]
    found = check_signers({"a": a, "b": []}, [], TTL, (0.0, 20.0), 20.0)
    assert found.unleased_daemon == ("daemon on a without a valid lease during 14.000..14.250",)
    assert not found.ok


def _takeover(paused: bool) -> tuple[dict[str, list[Event]], list[Event]]:
    """a leads and runs its daemon; b takes over at 8 while a's daemon still runs (to 9.5)."""
    a = [
        ev("a", "leader.acquired", 0.0, epoch=1),
        ev("a", "daemon.started", 1.0),
        ev("a", "ha.fenced", 9.2, last_keepalive_sent=4.9),
        ev("a", "daemon.stopped", 9.5),
    ]
    b = [ev("b", "leader.acquired", 8.0, epoch=2), ev("b", "daemon.started", 8.5)]
    chaos = [ev("chaos", "agent.paused", 5.0, on="a"), ev("chaos", "agent.resumed", 9.0, on="a")]
    return {"a": a, "b": b}, chaos if paused else []


def test_two_daemons_at_once_are_an_overlap_and_the_old_one_unleased() -> None:
    events, chaos = _takeover(paused=False)
    found = check_signers(events, chaos, TTL, (0.0, 20.0), 20.0)
    assert found.overlaps == ("daemon on a and b at once during 8.500..9.500",)
    # a's lease ended at 4.9 + TTL, before b took the key at 8.
    assert found.unleased_daemon == ("daemon on a without a valid lease during 6.900..9.500",)
    assert not found.paused_overlaps and not found.paused_unleased


def test_what_a_paused_agents_daemon_does_until_its_teardown_is_counted_apart() -> None:
    events, chaos = _takeover(paused=True)
    found = check_signers(events, chaos, TTL, (0.0, 20.0), 20.0)
    assert found.ok
    assert found.paused_overlaps == (
        "daemon on a and b at once during 8.500..9.500 (agent paused)",
    )
    assert len(found.paused_unleased) == 1


def test_findings_belong_to_the_trial_in_whose_window_they_start() -> None:
    events, chaos = _takeover(paused=False)
    assert check_signers(events, chaos, TTL, (10.0, 20.0), 20.0).ok


def test_the_outage_is_the_longest_gap_between_acknowledged_writes_around_the_fault() -> None:
    acks = [1.0, 1.1, 1.2, 4.0, 4.1, 9.0]
    assert outage(acks, 1.15, 5.0) == pytest.approx(2.8)  # 1.2 .. 4.0
    assert outage(acks, 4.05, 6.0) == pytest.approx(1.9)  # 4.1 .. until 6.0


# --- the harness ------------------------------------------------------------------------------


def test_a_three_member_etcd_cluster_elects_a_new_leader_when_its_leader_dies(
    local_servers_dir: Path,
) -> None:
    cluster = EtcdCluster(local_servers_dir / "etcd-cluster")
    try:
        cluster.start()
        assert len(set(cluster.endpoints)) == 3
        old = cluster.leader()
        assert old is not None
        old.kill()
        wait_for("a new leader", lambda: cluster.leader() not in (None, old), 15)
        old.start()  # rejoins from its data directory
        assert old.pid is not None and cluster.leader() is not None
    finally:
        cluster.stop()
    assert all(m.pid is None for m in cluster.members)


# --- regressions: bugs the suite found --------------------------------------------------------


def test_a_stopped_postgresql_answers_nothing_and_a_killed_one_leaves_no_process(
    pg: PostgresCluster,
) -> None:
    """Each backend runs in a session of its own: signalling the postmaster's process group
    (as PostgresCluster.kill did) reached the postmaster only, so SIGSTOP left every open
    session serving and the pause-active-postgres nemesis injected nothing."""
    with psycopg.connect(pg.dsn(), autocommit=True) as conn:
        backend = conn.execute("SELECT pg_backend_pid()").fetchone()
        assert backend is not None
        pg.signal_all(signal.SIGSTOP)
        try:
            answered = threading.Event()
            asker = threading.Thread(target=lambda: (conn.execute("SELECT 1"), answered.set()))
            asker.start()
            assert not answered.wait(1.0)
        finally:
            pg.signal_all(signal.SIGCONT)
        asker.join(10)
        assert answered.is_set()
    postmaster = pg.pid
    assert postmaster is not None
    pg.kill()
    assert not pid_alive(postmaster) and not pid_alive(backend[0])
    pg.start()
    assert pg.psql("SELECT 1").strip() == "1"


async def test_an_asyncio_error_nobody_awaits_is_logged_and_does_not_end_the_bridge(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """grpc.aio leaves such errors behind when an etcd member dies; trio-asyncio's default
    handler raised them into its nursery and the whole agent exited."""

    async def orphan_errors() -> int:
        loop = asyncio.get_running_loop()
        loop.call_exception_handler({"message": "Task was destroyed but it is pending!"})
        loop.call_exception_handler(
            {"message": "Task exception was never retrieved", "exception": RuntimeError("x")}
        )
        return 1

    with caplog.at_level(logging.ERROR):
        async with bridge.open_bridge():
            assert await bridge.call(orphan_errors) == 1
            await trio.sleep(0.1)
            assert await bridge.call(orphan_errors) == 1
    assert "Task was destroyed but it is pending!" in caplog.text


@pytest.mark.slow
def test_a_replica_link_that_drops_packets_ends_the_stuck_apply_and_commits_resume_after_heal(
    pg_pair: tuple[PostgresCluster, PostgresCluster], tmp_path: Path
) -> None:
    """Nothing errors over a link that drops packets: the apply waited forever, the
    replicator still counted as streaming (so the HA loop never degraded) and every commit
    waited, even after the link healed (the dropped bytes never came)."""
    primary, replica = pg_pair
    with FaultProxy(("127.0.0.1", replica.port)) as link:
        process = ReplicatorProcess(primary, replica, tmp_path / "replicator.log")
        process.argv[process.argv.index("--replica") + 1] = (
            f"postgresql://postgres@{link.endpoint}/postgres"
        )
        process.start()
        primary.psql("CREATE TABLE t (v int PRIMARY KEY)")
        committed: list[int] = []
        stop = threading.Event()

        def writer() -> None:
            with psycopg.connect(primary.dsn(), autocommit=True) as conn:
                for v in range(1_000_000):
                    if stop.is_set():
                        return
                    conn.execute("INSERT INTO t VALUES (%s)", (v,))
                    committed.append(v)

        thread = threading.Thread(target=writer, daemon=True)
        thread.start()
        try:
            wait_for("commits", lambda: len(committed) > 20, 30)
            link.blackhole()  # the applier is busy, so an apply is cut mid-flight
            wait_for(
                "the stuck apply to be given up", lambda: "during an apply" in process.log(), 30
            )
            link.heal()
            resumed = len(committed)
            wait_for("commits after the heal", lambda: len(committed) > resumed + 20, 60)
        finally:
            stop.set()
            process.stop()
            thread.join(30)
        assert int(replica.psql("SELECT count(*) FROM t")) >= resumed + 20


async def test_lnd_custody_unlocks_an_lnd_that_restarted_locked(tmp_path: Path) -> None:
    """An lnd that crashes (its database died) is started again by the agent, locked; the
    custody, still counting the old one as unlocked, never sent the password again."""
    kek, password, sealed = tmp_path / "kek", tmp_path / "password", tmp_path / "sealed"
    new_kek(kek)
    password.write_bytes(b"wallet password")
    seal_file(kek, password, sealed, "lnd-wallet-password")
    cert, key = load_or_create_tls(tmp_path / "tls.cert", tmp_path / "tls.key", "127.0.0.1")
    rpc = HostPort("127.0.0.1", free_port())
    events = EventLog(tmp_path / "events.jsonl", "a")
    settings = LndSettings(rpc, tmp_path / "tls.cert", sealed, timeout=5.0, poll_interval=0.05)
    custody = LndCustody(settings, KekSource(file=kek), events)
    for _ in range(2):  # the second lnd is the first one started again
        lnd = WalletServer(rpc, cert, key, b"wallet password").start()
        try:
            await custody.unlock()
            assert lnd.state is WalletState.UNLOCKED and custody.held
        finally:
            lnd.stop()
    kinds = [(e.kind, e.fields.get("reason")) for e in read_events(tmp_path / "events.jsonl")]
    assert kinds == [
        ("keys.materialized", None),
        ("keys.destroyed", "lnd restarted"),
        ("keys.materialized", None),
    ]


@pytest.mark.slow
def test_a_replica_store_that_refuses_writes_is_retried_not_fatal(
    pg_pair: tuple[PostgresCluster, PostgresCluster], tmp_path: Path
) -> None:
    """A full disk on the replica store made a write in the replicator's set-up fail with a
    database error, which escaped the replicator and ended the whole agent; a read-only
    database refuses the same way."""
    primary, replica = pg_pair
    replica.psql("ALTER DATABASE postgres SET default_transaction_read_only = on")
    process = ReplicatorProcess(primary, replica, tmp_path / "replicator.log")
    process.start(wait=False)
    try:
        refused = lambda: "read-only transaction" in process.log()  # noqa: E731
        wait_for("the refusal", refused, 30)
        time.sleep(0.5)
        assert process.proc is not None and process.proc.poll() is None, process.log()
        replica.psql(
            "SET default_transaction_read_only = off;"
            "ALTER DATABASE postgres RESET default_transaction_read_only"
        )
        synchronous = lambda: READY in process.log()  # noqa: E731
        wait_for("the replicator to be synchronous", synchronous, 60)
    finally:
        process.stop()


def test_an_etcd_stream_reset_under_a_call_is_unavailable_not_a_refusal() -> None:
    """gRPC reports a connection cut under a call as INTERNAL "Stream removed"; as a
    CoordError it escaped the lease keepalive and ended the agent (partition-active-etcd,
    at the heal)."""
    client = EtcdClient(EtcdConfig(), None)
    endpoint = HostPort("127.0.0.1", 2379)
    reset = grpc.aio.AioRpcError(
        grpc.StatusCode.INTERNAL,
        details="Stream removed (RST_STREAM (Received RST_STREAM with error code 1))",
    )
    assert isinstance(client._error("lease keepalive", endpoint, reset), _Unavailable)
    other = grpc.aio.AioRpcError(grpc.StatusCode.INTERNAL, details="etcdserver: corrupt")
    assert isinstance(client._error("lease keepalive", endpoint, other), CoordError)


class _Refuses:
    """A coord whose keepalive etcd refuses with an error that is not "unavailable"."""

    calls = 0

    async def keepalive(self, lease: Lease) -> None:
        self.calls += 1
        raise CoordError("etcd at 127.0.0.1:2379 refused lease keepalive: INTERNAL: ?")


def _shell(
    tmp_path: Path,
    nursery: trio.Nursery,
    *,
    coord: object,
    gate: Gate,
    local: object = None,
    supervisor: object = None,
    custody: object = None,
) -> HaShell:
    """Node a's HaShell (keys adapter none) over fakes of its collaborators."""
    a = AgentNode("a", tmp_path, PostgresCluster(tmp_path / "pg"), "127.0.0.1:2379")
    keys: dict[str, object] = {"adapter": "none", "kek_file": None, "cln_hsm_secret": None}
    a.write_config(a, tmp_path, tmp_path, {}, keys=keys)
    return HaShell(
        load(a.config_path),
        coord,  # type: ignore[arg-type]
        local,  # type: ignore[arg-type]
        gate,
        supervisor,  # type: ignore[arg-type]
        custody,  # type: ignore[arg-type]
        EventLog(None, "a"),
        nursery,
        SystemdNotifier(None),
    )


async def test_a_refused_lease_keepalive_does_not_end_the_agent(tmp_path: Path) -> None:
    refuses = _Refuses()
    async with trio.open_nursery() as nursery:
        shell = _shell(tmp_path, nursery, coord=refuses, gate=Gate(is_open=False))
        shell.lease = Lease(1, 2)
        with trio.move_on_after(1.5):
            await shell.keepalive()  # before the fix: raised at the first refusal
        assert refuses.calls >= 2


class _Hangs:
    """A coord and a local store that never answer (etcd cut off, PostgreSQL paused)."""

    abandoned = False

    async def view(self) -> None:
        await trio.sleep_forever()

    async def facts(self) -> None:
        await trio.sleep_forever()

    def abandon(self) -> None:
        self.abandoned = True


async def test_a_leader_observing_unanswering_etcd_and_postgresql_steps_by_its_deadline(
    tmp_path: Path,
) -> None:
    """Woken at its deadline with etcd cut off, the loop first read etcd for up to
    request_timeout and fenced after the earliest moment etcd could expire the lease."""
    hangs = _Hangs()
    async with trio.open_nursery() as nursery:
        shell = _shell(
            tmp_path,
            nursery,
            coord=hangs,
            local=hangs,
            gate=Gate(is_open=True),
            supervisor=SimpleNamespace(state=SupervisorState.READY),
            custody=SimpleNamespace(held=True),
        )
        shell.state = HaState(role=Role.ACTIVE, epoch=7, highest_epoch=7)
        shell.lease = Lease(1, 2)
        shell.last_keepalive_sent = time.monotonic() - 1.3  # the deadline is 0.2 s away
        deadline = shell._deadline()
        assert deadline is not None
        with trio.fail_after(5):  # before the fix: never (both calls hang)
            snapshot = await shell.observe()
        assert time.monotonic() - deadline < 0.05
        assert snapshot.store_unreachable_since is not None and hangs.abandoned
        now = time.monotonic()
        decision = step(shell.state, snapshot, now, timing=shell.timing, mode=shell.mode)
        assert decision.role is Role.FENCED


async def test_a_stopped_replicator_leaves_no_hold_on_the_gate(tmp_path: Path) -> None:
    """A replicator whose session broke while it guarded the gate (invariant 5) held it
    after it was stopped; a new leader whose peer was down then served nothing."""
    gate = Gate(is_open=True)
    async with trio.open_nursery() as nursery:
        shell = _shell(tmp_path, nursery, coord=None, gate=gate)
        shell._start_replicating(1)
        assert shell.replicator is not None
        shell.replicator.guards_gate = True  # the sync record named the replica
        with trio.fail_after(10):  # its PostgreSQL is not running: it retries, holding
            while gate.is_open:
                await trio.sleep(0.01)
        shell._start_replicating(2)  # a new epoch; nothing names a replica yet
        assert gate.is_open, gate.refusal()
        nursery.cancel_scope.cancel()


@pytest.fixture
def lone_node(
    tmp_path: Path, etcd: EtcdServer, pg_pair: tuple[PostgresCluster, PostgresCluster]
) -> Iterator[AgentNode]:
    a = AgentNode("a", tmp_path / "a", pg_pair[0], etcd.endpoint)
    b = AgentNode("b", tmp_path / "b", pg_pair[1], etcd.endpoint)
    a.base.mkdir()
    daemon: dict[str, object] = {
        "mode": "child",
        "command": [sys.executable, "-c", "import time; time.sleep(3600)"],
        "stop_timeout": 5.0,
    }
    keys: dict[str, object] = {"adapter": "none", "kek_file": None, "cln_hsm_secret": None}
    a.write_config(b, tmp_path, tmp_path, daemon, keys=keys)
    try:
        yield a
    finally:
        a.stop()


@pytest.mark.slow
def test_an_agent_without_key_custody_starts_its_daemon(lone_node: AgentNode) -> None:
    """With adapter "none" (or lnd, whose keys are held only once unlocked, beside the start)
    the keys were never "present", so the loop asked for them forever and never started the
    daemon; the lnd chaos trials cover lnd."""
    lone_node.start()
    wait_for("the daemon", lambda: first(lone_node, "daemon.ready") is not None, 60, lone_node)
    assert first(lone_node, "keys.materialized") is None


@pytest.mark.slow
def test_an_agent_restarted_at_once_after_kill_9_keeps_its_slot_and_returns_to_sync(
    tmp_path: Path, etcd: EtcdServer, pg_pair: tuple[PostgresCluster, PostgresCluster]
) -> None:
    """Restarted at once, the agent stood by until its own old key expired and dropped its
    replication slot meanwhile, as a standby does; then it led again (it led the newest
    epoch), and its replicator stopped for good: the slot was missing ("run haproxy-ln
    reseed"), so the pair never returned to synchronous replication."""
    kek, sealed = make_keys(tmp_path)
    a = FakeDaemonNode("a", tmp_path / "a", pg_pair[0], etcd.endpoint)
    b = FakeDaemonNode("b", tmp_path / "b", pg_pair[1], etcd.endpoint)
    for node, peer in ((a, b), (b, a)):
        node.base.mkdir()
        node.write_config(peer, kek, sealed)
    try:
        a.start()
        wait_for("a to lead", lambda: first(a, "daemon.ready") is not None, 60, a)
        b.start()
        wait_for("a synchronous with b", lambda: "synchronous with b" in a.log(), 60, a, b)
        b.stop()  # only a can lead now; b's PostgreSQL stays its replica store
        killed = a.kill()
        a.start()
        wait_for("a to lead again", lambda: first(a, "daemon.ready", killed) is not None, 60, a)
        named = lambda: any(  # noqa: E731
            e.kind == "sync.record" and e.fields.get("replica") == "b" and e.mono > killed
            for e in a.events()
        )
        wait_for("a synchronous with b again", named, 60, a)
    finally:
        a.stop()
        b.stop()


# --- the CI set -------------------------------------------------------------------------------


def _chaos(mode: str, seed: int, tmp_path: Path) -> dict[str, object]:
    results = tmp_path / f"chaos-{mode}.jsonl"
    argv = [sys.executable, "-m", "haproxy_ln", "chaos", "--trials", str(len(NEMESES))]
    argv += ["--seed", str(seed), "--mode", mode, "--results", str(results), "--json"]
    started = time.monotonic()
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600, check=False)
    print(done.stdout)  # the summary table, shown with -s or on failure
    assert done.returncode == 0, done.stdout[-20000:] + done.stderr[-5000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert isinstance(summary, dict)
    trials = [json.loads(line) for line in results.read_text().splitlines()]
    assert {t["nemesis"] for t in trials} == set(NEMESES)
    assert all(t["ok"] for t in trials), [t for t in trials if not t["ok"]]
    print(f"{mode}: {len(trials)} trials in {time.monotonic() - started:.0f} s")
    return summary


@pytest.mark.slow
@pytest.mark.parametrize(("mode", "seed"), [("cln", 601), ("lnd", 602)])
def test_every_nemesis_leaves_one_signer_and_every_acknowledged_write(
    mode: str, seed: int, tmp_path: Path
) -> None:
    summary = _chaos(mode, seed, tmp_path)
    assert summary["ok"] is True
    assert summary["trials"] == len(NEMESES)
    assert summary["per_nemesis"] == dict.fromkeys(sorted(NEMESES), 1)
    for key in ("lost_writes", "conflicts", "overlaps", "unleased_daemon"):
        assert summary[key] == 0, summary
    assert summary["recovered"] == len(NEMESES)

"""The synchronous barrier under faults: a commit is acknowledged only once the
replica store has it, whatever happens to the replicator in between."""

from __future__ import annotations

import contextlib
import random
import signal
import threading
import time
from pathlib import Path

import psycopg
import pytest
import trio
from harness import ProxyThread
from replication_harness import ReplicatorProcess, rows_digest

from haproxy_ln import metrics
from haproxy_ln.agent.local import LocalStore
from haproxy_ln.config import ReplicationConfig
from haproxy_ln.local import PostgresCluster
from haproxy_ln.local.ports import LocalServerError
from haproxy_ln.store import bridge

Pair = tuple[PostgresCluster, PostgresCluster]


def wait_for_sync_waiters(cluster: PostgresCluster, n: int = 1, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        waiting = cluster.psql("SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'SyncRep'")
        if int(waiting) >= n:
            return
        time.sleep(0.05)
    raise AssertionError(f"no commit is waiting for the replica after {timeout} s")


class Committer(threading.Thread):
    """Runs `sql` in its own autocommit connection; `done` once the commit is acknowledged."""

    def __init__(self, dsn: str, sql: str) -> None:
        super().__init__(daemon=True)
        self.dsn, self.sql = dsn, sql
        self.done = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with psycopg.connect(self.dsn, autocommit=True) as conn:
                conn.execute(self.sql)
        except BaseException as e:
            self.error = e
        self.done.set()


def count(cluster: PostgresCluster, table: str) -> int:
    return int(cluster.psql(f"SELECT count(*) FROM {table}"))


def test_commit_waits_for_a_killed_replicator_and_completes_when_it_returns(
    pg_pair: Pair, tmp_path: Path
) -> None:
    primary, replica = pg_pair
    primary.psql("CREATE TABLE t (id int PRIMARY KEY)")
    rep = ReplicatorProcess(primary, replica, tmp_path / "rep.log").start()
    try:
        rep.kill()
        committer = Committer(primary.dsn(), "INSERT INTO t VALUES (1)")
        committer.start()
        wait_for_sync_waiters(primary)
        assert not committer.done.wait(1.0), "the commit was acknowledged without the replica"
        assert count(replica, "t") == 0
        rep.start()
        assert committer.done.wait(30), rep.log()
        assert committer.error is None
        assert count(replica, "t") == 1
    finally:
        rep.stop()


def test_cancel_through_the_proxy_does_not_release_a_waiting_commit(
    pg_pair: Pair, tmp_path: Path
) -> None:
    primary, replica = pg_pair
    primary.psql("CREATE TABLE t (id int PRIMARY KEY)")
    rep = ReplicatorProcess(primary, replica, tmp_path / "rep.log").start()
    proxy = ProxyThread(primary).start()
    try:
        rep.kill()
        with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
            result: list[BaseException | None] = []
            worker = threading.Thread(
                target=lambda: result.append(_execute(conn, "INSERT INTO t VALUES (7)"))
            )
            worker.start()
            wait_for_sync_waiters(primary)
            conn.cancel_safe()
            worker.join(1.5)
            assert worker.is_alive(), "the cancel released the synchronous wait"
            assert count(replica, "t") == 0
            rep.start()
            worker.join(30)
            assert not worker.is_alive()
            assert result == [None]
        assert count(replica, "t") == 1
    finally:
        proxy.stop()
        rep.stop()


def _execute(conn: psycopg.Connection, sql: str) -> BaseException | None:
    try:
        conn.execute(sql)
    except BaseException as e:
        return e
    return None


def test_kill_9_of_the_replicator_mid_batch_loses_nothing_and_doubles_nothing(
    pg_pair: Pair, tmp_path: Path
) -> None:
    primary, replica = pg_pair
    # `seen` has no key: a record applied twice would leave a duplicate row there.
    primary.psql("CREATE TABLE t (id int PRIMARY KEY, pad text); CREATE TABLE seen (id int)")
    rep = ReplicatorProcess(primary, replica, tmp_path / "rep.log").start()
    acknowledged: list[int] = []
    stop = threading.Event()

    def write(first: int) -> None:
        with psycopg.connect(primary.dsn(), autocommit=True) as conn:
            i = first
            while not stop.is_set():
                with conn.transaction():
                    conn.execute("INSERT INTO t VALUES (%s, repeat('x', 500))", (i,))
                    conn.execute("INSERT INTO seen VALUES (%s)", (i,))
                acknowledged.append(i)
                i += 4

    writers = [threading.Thread(target=write, args=(k,), daemon=True) for k in range(4)]
    rng = random.Random(7)
    try:
        for w in writers:
            w.start()
        for _ in range(6):
            time.sleep(rng.uniform(0.2, 0.8))
            rep.kill()
            time.sleep(rng.uniform(0.0, 0.3))
            rep.start()
        time.sleep(0.5)
        stop.set()
        for w in writers:
            w.join(30)
        assert len(acknowledged) > 100
        assert rows_digest(replica) == rows_digest(primary)
        on_replica = {int(x) for x in replica.psql("SELECT id FROM seen").split()}
        assert set(acknowledged) <= on_replica
        assert count(replica, "seen") == len(on_replica)
        assert (
            replica.psql("SELECT count(*) = count(DISTINCT end_lsn) FROM haproxy_ln.txlog").strip()
            == "t"
        )
    finally:
        stop.set()
        rep.stop()


def test_a_stale_epoch_is_refused_by_the_replica_store(pg_pair: Pair, tmp_path: Path) -> None:
    primary, replica = pg_pair
    primary.psql("CREATE TABLE t (id int PRIMARY KEY)")
    newer = ReplicatorProcess(primary, replica, tmp_path / "newer.log", epoch=5).start()
    primary.psql("INSERT INTO t VALUES (1)")
    assert newer.stop() == 0
    older = ReplicatorProcess(primary, replica, tmp_path / "older.log", epoch=4)
    older.start(wait=False)
    assert older.proc is not None
    assert older.proc.wait(30) == 1
    assert "fenced at epoch 5" in older.log()
    # The store's own check refuses it too, whoever asks.
    with pytest.raises(LocalServerError, match="writer epoch 4 is stale"):
        replica.psql("BEGIN; SELECT haproxy_ln.check_fence(4, 'old'); COMMIT")
    assert replica.psql("SELECT epoch FROM haproxy_ln.fence").strip() == "5"


def test_gate_stays_closed_after_a_primary_restart_until_the_replica_caught_up(
    pg_pair: Pair,
) -> None:
    primary, replica = pg_pair
    primary.psql("CREATE TABLE t (id int PRIMARY KEY)")
    config = ReplicationConfig(source=primary.dsn(), replica=replica.dsn())
    proxy = ProxyThread(primary, replication=config).start()
    blocker = psycopg.connect(replica.dsn())
    try:
        primary.psql(
            "ALTER SYSTEM SET synchronous_standby_names = '\"haproxy_ln\"'; SELECT pg_reload_conf()"
        )
        assert proxy.call(lambda: proxy.gate.is_open)
        # Stall the replicator at the replica store: it cannot take the fence lock.
        blocker.execute("LOCK TABLE haproxy_ln.fence IN ACCESS EXCLUSIVE MODE")
        committer = Committer(proxy.dsn(), "INSERT INTO t VALUES (1)")
        committer.start()
        wait_for_sync_waiters(primary)
        primary.stop()  # fast shutdown: the waiting commit is on local disk
        primary.start()
        assert primary.psql("SELECT count(*) FROM t").strip() == "1"  # visible, not replicated
        time.sleep(1.0)
        assert not proxy.call(lambda: proxy.gate.is_open)
        with pytest.raises(psycopg.OperationalError, match="not admitting connections"):
            psycopg.connect(proxy.dsn(), connect_timeout=5).close()
        blocker.rollback()
        deadline = time.monotonic() + 30
        while not proxy.call(lambda: proxy.gate.is_open):
            assert time.monotonic() < deadline, "the gate never opened after catching up"
            time.sleep(0.05)
        assert count(replica, "t") == 1
        with psycopg.connect(proxy.dsn()) as conn:
            assert conn.execute("SELECT count(*) FROM t").fetchone() == (1,)
    finally:
        blocker.close()
        proxy.stop()


def test_a_restart_of_the_replica_store_is_survived(pg_pair: Pair, tmp_path: Path) -> None:
    primary, replica = pg_pair
    primary.psql("CREATE TABLE t (id int PRIMARY KEY)")
    rep = ReplicatorProcess(primary, replica, tmp_path / "rep.log").start()
    try:
        replica.stop()
        replica.start()
        committer = Committer(primary.dsn(), "INSERT INTO t VALUES (1)")
        committer.start()
        assert committer.done.wait(30), rep.log()
        assert committer.error is None
        assert count(replica, "t") == 1
        assert rep.proc is not None and rep.proc.poll() is None, rep.log()
    finally:
        assert rep.stop() == 0, rep.log()


def test_commit_wait_is_measured_per_replicated_transaction(pg_pair: Pair) -> None:
    primary, replica = pg_pair
    primary.psql("CREATE TABLE t (id int PRIMARY KEY)")
    config = ReplicationConfig(source=primary.dsn(), replica=replica.dsn())
    proxy = ProxyThread(primary, replication=config).start()
    wait = metrics.COMMIT_WAIT_SECONDS
    try:
        before, summed = metric_value(wait, "_count"), metric_value(wait, "_sum")
        started = time.monotonic()
        with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
            for i in range(5):
                conn.execute("INSERT INTO t VALUES (%s)", (i,))
        took = time.monotonic() - started
        deadline = time.monotonic() + 10
        while metric_value(wait, "_count") < before + 5:
            assert time.monotonic() < deadline, "five commits, not five observations"
            time.sleep(0.05)
        waited = metric_value(wait, "_sum") - summed  # the registry is process-wide
        assert 0 < waited < 5 * (took + 1.0)  # each commit's wait lies within the whole run
    finally:
        proxy.stop()


def metric_value(histogram: object, suffix: str) -> float:
    """The histogram's total `_count` or `_sum` across its samples."""
    return sum(
        sample.value
        for family in histogram.collect()  # type: ignore[attr-defined]
        for sample in family.samples
        if sample.name.endswith(suffix)
    )


def test_a_writer_paused_mid_batch_does_not_hold_a_new_leaders_fence_up(
    pg_pair: Pair, tmp_path: Path
) -> None:
    # An old leader's replicator, paused while the replica store applies a big batch,
    # holds the fence row (and the position) until its connection dies. The new
    # leader, raising the fence on that store, must end that session, not wait for it.
    primary, replica = pg_pair
    primary.psql("CREATE TABLE big (id int PRIMARY KEY, pad text)")
    old = ReplicatorProcess(primary, replica, tmp_path / "old.log", epoch=1).start()
    assert old.proc is not None
    big = "INSERT INTO big SELECT g, repeat('x', 200) FROM generate_series(1, 300000) g"

    def commit_big() -> None:  # waits for the paused replicator: stopping the cluster ends it
        with contextlib.suppress(LocalServerError):
            primary.psql(big)

    threading.Thread(target=commit_big, daemon=True).start()
    holding = (
        "SELECT count(*) FROM pg_locks WHERE granted AND mode = 'RowShareLock' "
        "AND relation = 'haproxy_ln.fence'::regclass"
    )
    deadline = time.monotonic() + 60
    while replica.psql(holding).strip() == "0":
        assert time.monotonic() < deadline, "the batch never started on the replica store"
        time.sleep(0.01)
    old.proc.send_signal(signal.SIGSTOP)
    try:
        time.sleep(0.5)
        assert replica.psql(holding).strip() == "1", "the batch ended before the pause"

        async def take_over() -> None:
            config = ReplicationConfig(source=replica.dsn(), replica=primary.dsn())
            async with bridge.open_bridge():
                store = LocalStore(config)
                try:
                    with trio.fail_after(30):
                        await store.raise_fence(2, "new")
                finally:
                    await store.close()

        trio.run(take_over)
        assert replica.psql("SELECT epoch, node FROM haproxy_ln.fence").strip() == "2|new"
        assert replica.psql(holding).strip() == "0"
        assert count(replica, "big") == 0  # the paused batch was rolled back
    finally:
        old.proc.send_signal(signal.SIGCONT)
    # Resumed, the old writer finds its session gone and is refused from then on.
    assert old.proc.wait(60) == 1
    assert "fenced at epoch 2" in old.log()

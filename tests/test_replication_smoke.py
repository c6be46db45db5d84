"""The replication commands end to end: replicate, log, reseed, and their errors."""

from __future__ import annotations

import datetime
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from click.testing import CliRunner
from replication_harness import READY, ReplicatorProcess, rows_digest

from haproxy_ln.cli import main
from haproxy_ln.local import PostgresCluster
from haproxy_ln.local.postgres import descendants

Pair = tuple[PostgresCluster, PostgresCluster]


def test_replica_equals_primary_after_copy_and_stream_and_the_log_shows_it(
    pg_pair: Pair, tmp_path: Path
) -> None:
    primary, replica = pg_pair
    primary.psql("CREATE TABLE t (id serial PRIMARY KEY, v text); INSERT INTO t (v) VALUES ('a')")
    rep = ReplicatorProcess(primary, replica, tmp_path / "rep.log").start()
    try:
        primary.psql("INSERT INTO t (v) VALUES ('b'); UPDATE t SET v = 'c' WHERE id = 1")
        primary.psql("CREATE TABLE other (x int)")
        assert rows_digest(replica) == rows_digest(primary)
    finally:
        assert rep.stop() == 0, rep.log()
    runner = CliRunner()
    result = runner.invoke(main, ["log", "--store", replica.dsn(), "--table", "t", "--changes"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert len([line for line in lines if "public.t(" in line]) == 2
    assert "    INSERT public.t (id='2', v='b')" in lines
    assert "    UPDATE public.t (id='1', v='c') WHERE id='1'" in lines
    assert "DDL" not in result.output  # CREATE TABLE other does not touch t
    everything = runner.invoke(main, ["log", "--store", replica.dsn()])
    assert "+DDL" in everything.output
    bad = runner.invoke(main, ["log", "--store", replica.dsn(), "--since", "no time"])
    assert bad.exit_code == 1
    assert "cannot read the txlog" in bad.output


def test_reseed_repairs_a_diverged_replica_but_not_one_fenced_higher(
    pg_pair: Pair, tmp_path: Path
) -> None:
    primary, replica = pg_pair
    primary.psql("CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t SELECT generate_series(1, 50)")
    rep = ReplicatorProcess(primary, replica, tmp_path / "rep.log", epoch=2).start()
    assert rep.stop() == 0
    replica.psql("DELETE FROM t WHERE id > 10")  # diverged
    argv = ["reseed", "--source", primary.dsn(), "--replica", replica.dsn()]
    refused = CliRunner().invoke(main, [*argv, "--epoch", "1"])
    assert refused.exit_code == 1
    assert "fenced at epoch 2" in refused.output
    assert replica.psql("SELECT count(*) FROM t").strip() == "10"  # untouched
    result = CliRunner().invoke(main, [*argv, "--epoch", "2"])
    assert result.exit_code == 0, result.output
    assert rows_digest(replica) == rows_digest(primary)
    # The copy recreates schema public as initdb leaves it: every role may use it (the
    # daemon's own role, after a failover), not only the owner.
    usable = "SELECT has_schema_privilege('public', 'public', 'USAGE')"
    assert replica.psql(usable).strip() == primary.psql(usable).strip() == "t"
    rep = ReplicatorProcess(primary, replica, tmp_path / "rep.log", epoch=2).start()
    try:
        primary.psql("INSERT INTO t VALUES (51)")
        assert rows_digest(replica) == rows_digest(primary)
    finally:
        assert rep.stop() == 0


def test_a_primary_without_logical_wal_is_refused_with_what_to_set(
    local_servers_dir: Path, pg_session: PostgresCluster
) -> None:
    cluster = PostgresCluster(local_servers_dir / "wal-replica", settings={"wal_level": "replica"})
    cluster.start()
    try:
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "haproxy_ln",
                "replicate",
                "--source",
                cluster.dsn(),
                "--replica",
                pg_session.dsn(),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        cluster.stop()
    assert result.returncode == 1
    assert "wal_level is replica; set wal_level = logical" in result.stderr


def test_an_idle_primary_turns_synchronous_promptly_after_a_checkpoint(
    pg_pair: Pair, tmp_path: Path
) -> None:
    """After a CHECKPOINT on an idle primary the walsender waited, in state catchup,
    for the next WAL record (12 s in the benchmark) before counting as synchronous;
    set_sync writes one."""
    primary, replica = pg_pair
    subprocess.run(
        ["pgbench", "-i", "-s", "1", "-q", primary.dsn()], check=True, capture_output=True
    )
    primary.psql("VACUUM ANALYZE; CHECKPOINT;")
    rep = ReplicatorProcess(primary, replica, tmp_path / "rep.log").start()
    try:
        stamps = {
            marker: datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")
            for line in rep.log().splitlines()
            for marker in ("replica caught up", READY)
            if marker in line
        }
        gap = (stamps[READY] - stamps["replica caught up"]).total_seconds()
        assert gap < 3, rep.log()
    finally:
        assert rep.stop() == 0, rep.log()


def test_an_idle_replicator_notices_that_the_replica_store_stopped_answering(
    pg_pair: Pair, tmp_path: Path
) -> None:
    """With nothing to apply, the replicator pings the replica store once a second
    (the ticker asks the apply task): a store that stops answering ends the session
    within connect_timeout (5 s), so the HA loop can degrade."""
    primary, replica = pg_pair
    rep = ReplicatorProcess(primary, replica, tmp_path / "rep.log").start()
    assert replica.pid is not None
    paused = [replica.pid, *descendants(replica.pid)]
    try:
        for pid in paused:
            os.kill(pid, signal.SIGSTOP)
        deadline = time.monotonic() + 15
        while "the replica store did not answer within 5.0 s" not in rep.log():
            assert time.monotonic() < deadline, rep.log()
            time.sleep(0.1)
    finally:
        for pid in paused:
            os.kill(pid, signal.SIGCONT)
        code = rep.stop()
    assert code == 0, rep.log()

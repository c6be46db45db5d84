from pathlib import Path

from replication_harness import ReplicatorProcess, rows_digest

from haproxy_ln.local import PostgresCluster


def test_replica_equals_primary_after_copy_and_stream(
    pg_pair: tuple[PostgresCluster, PostgresCluster], tmp_path: Path
) -> None:
    primary, replica = pg_pair
    primary.psql("CREATE TABLE t (id serial PRIMARY KEY, v text); INSERT INTO t (v) VALUES ('a')")
    rep = ReplicatorProcess(primary, replica, tmp_path / "rep.log").start()
    try:
        primary.psql("INSERT INTO t (v) VALUES ('b'); UPDATE t SET v = 'c' WHERE id = 1")
        assert rows_digest(replica) == rows_digest(primary)
    finally:
        assert rep.stop() == 0, rep.log()

"""The local PostgreSQL and etcd servers that every other integration test stands on."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

import haproxy_ln.local.etcd as etcd_module
import haproxy_ln.local.ports as ports_module
import haproxy_ln.local.postgres as postgres_module
from haproxy_ln.local import EtcdServer, LocalServerError, PostgresCluster, free_port, free_ports
from haproxy_ln.local.ports import LOOPBACK, pid_alive


@pytest.fixture
def server_dir(local_servers_dir: Path) -> Path:
    return Path(tempfile.mkdtemp(prefix="test-", dir=local_servers_dir))


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A loopback port held open by a listening socket for the whole test."""
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        sock.listen()
        yield int(sock.getsockname()[1])


def wait_gone(pid: int, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while pid_alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def test_cluster_answers_select_1(pg: PostgresCluster) -> None:
    assert pg.psql("SELECT 1").strip() == "1"
    assert pg.host == "127.0.0.1"
    assert pg.dsn(dbname="x") == f"postgresql://postgres@127.0.0.1:{pg.port}/x"
    assert pg.psql("SHOW wal_level").strip() == "logical"


def test_two_clusters_get_different_ports(pg: PostgresCluster, pg_session: PostgresCluster) -> None:
    assert pg.port != pg_session.port
    assert pg.pid != pg_session.pid
    assert pg_session.psql("SELECT 2").strip() == "2"


def test_scram_auth_accepts_right_password_and_rejects_wrong(server_dir: Path) -> None:
    with PostgresCluster(
        server_dir,
        auth="scram-sha-256",
        superuser_password="super'secret",
        settings={"max_connections": "42"},
    ) as cluster:
        cluster.create_user("alice", "pa ss'word")
        cluster.create_database("alice_db", owner="alice")
        assert cluster.psql("SELECT current_user", user="alice", dbname="alice_db") == "alice\n"
        stored = cluster.psql("SELECT rolpassword FROM pg_authid WHERE rolname = 'alice'")
        assert stored.startswith("SCRAM-SHA-256$")
        assert cluster.psql("SHOW max_connections").strip() == "42"
        with pytest.raises(LocalServerError, match="password authentication failed"):
            cluster.psql("SELECT 1", user="alice", password="wrong")
        with pytest.raises(LocalServerError, match="password authentication failed"):
            cluster.psql("SELECT 1", user="postgres", password="wrong")


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="superuser_password"):
        PostgresCluster(Path("/nonexistent"), auth="md5")
    with pytest.raises(ValueError, match="port"):
        PostgresCluster(Path("/nonexistent"), settings={"port": "5432"})


def test_stop_is_idempotent_and_ends_the_postmaster(server_dir: Path) -> None:
    cluster = PostgresCluster(server_dir)
    cluster.stop()
    cluster.start()
    pid = cluster.pid
    assert pid is not None and pid_alive(pid)
    cluster.stop()
    assert not pid_alive(pid)
    assert cluster.pid is None
    cluster.stop()
    cluster.start()
    assert cluster.psql("SELECT 3").strip() == "3"
    cluster.stop()


def test_cluster_in_failing_block_is_still_stopped(server_dir: Path) -> None:
    pids: list[int | None] = []
    try:
        with PostgresCluster(server_dir) as cluster:
            pids.append(cluster.pid)
            raise RuntimeError("simulated test failure")
    except RuntimeError:
        pass
    [pid] = pids
    assert pid is not None
    assert not pid_alive(pid)


def _started_by_a_killed_owner(script: str) -> int:
    """Run `script`, which starts a process and prints its pid; SIGKILL the script once
    that process runs. Returns its pid."""
    with subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, text=True
    ) as owner:
        try:
            assert owner.stdout is not None
            pid = int(owner.stdout.readline())
            assert pid_alive(pid)
        finally:
            owner.send_signal(signal.SIGKILL)
    return pid


def test_cluster_dies_with_the_process_that_started_it(server_dir: Path) -> None:
    script = textwrap.dedent(
        f"""
        import time
        from pathlib import Path
        from haproxy_ln.local import PostgresCluster
        cluster = PostgresCluster(Path({str(server_dir)!r}))
        cluster.start()
        print(cluster.pid, flush=True)
        time.sleep(600)
        """
    )
    pid = _started_by_a_killed_owner(script)
    assert wait_gone(pid), "postmaster outlived the SIGKILLed process that started it"


def test_a_child_spawned_to_die_with_its_parent_does(server_dir: Path) -> None:
    script = textwrap.dedent(
        """
        import subprocess, sys, time
        from haproxy_ln.local.ports import die_with_parent
        child = subprocess.Popen(["sleep", "600"], preexec_fn=die_with_parent())
        print(child.pid, flush=True)
        time.sleep(600)
        """
    )
    pid = _started_by_a_killed_owner(script)
    assert wait_gone(pid, timeout=10), "the child outlived the SIGKILLed process that spawned it"


def test_free_ports_are_distinct_and_below_the_ephemeral_range() -> None:
    # An outgoing connection takes its local port from the ephemeral range, so a port
    # from there could be taken between free_ports and the server's bind.
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    ports = free_ports(50)
    assert len(set(ports)) == 50
    assert all(1024 <= port < low for port in ports), ports
    for port in ports:  # each was free: nothing listens there
        with socket.socket() as sock:
            sock.bind((LOOPBACK, port))


def test_free_ports_skip_a_port_in_use(busy_port: int, monkeypatch: pytest.MonkeyPatch) -> None:
    candidates = iter([busy_port, busy_port])
    monkeypatch.setattr(ports_module, "_below_ephemeral", lambda: candidates)
    (port,) = free_ports(1)  # both candidates tried and refused, then the kernel's choice
    assert port != busy_port and next(candidates, None) is None


def test_start_retries_when_the_chosen_port_is_taken(
    server_dir: Path, busy_port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    ports = iter([busy_port, free_port()])
    monkeypatch.setattr(postgres_module, "free_port", lambda: next(ports))
    with PostgresCluster(server_dir) as cluster:
        assert cluster.port != busy_port
        assert cluster.psql("SELECT 1").strip() == "1"


def test_start_on_a_taken_fixed_port_fails_with_the_log(server_dir: Path, busy_port: int) -> None:
    cluster = PostgresCluster(server_dir, port=busy_port)
    with pytest.raises(LocalServerError, match="Address already in use"):
        cluster.start()
    assert cluster.pid is None


def test_etcd_starts_and_reports_healthy(etcd: EtcdServer) -> None:
    with urllib.request.urlopen(f"http://{etcd.endpoint}/health", timeout=5) as response:
        assert json.loads(response.read())["health"] == "true"
    host, port = etcd.endpoint.split(":")
    assert host == "127.0.0.1" and int(port) > 0


def test_etcd_put_and_get_with_etcdctl(etcd: EtcdServer) -> None:
    etcdctl = shutil.which("etcdctl")
    if etcdctl is None:
        pytest.skip("etcdctl not installed (Debian package etcd-client)")
    env = {**os.environ, "ETCDCTL_API": "3"}

    def etcdctl_run(*args: str) -> str:
        argv = [etcdctl, f"--endpoints={etcd.endpoint}", *args]
        done = subprocess.run(argv, env=env, capture_output=True, text=True, check=True, timeout=30)
        return done.stdout

    etcdctl_run("put", "/haproxy-ln/test", "hello")
    assert etcdctl_run("get", "/haproxy-ln/test", "--print-value-only").strip() == "hello"


def test_etcd_stop_is_idempotent_and_ends_the_process(server_dir: Path) -> None:
    server = EtcdServer(server_dir)
    server.start()
    pid = server.pid
    assert pid is not None and pid_alive(pid)
    server.stop()
    assert not pid_alive(pid)
    server.stop()
    assert server.pid is None


def test_etcd_start_retries_when_a_chosen_port_is_taken(
    server_dir: Path, busy_port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    choices = iter([[busy_port, free_port()], free_ports(2)])
    monkeypatch.setattr(etcd_module, "free_ports", lambda count: next(choices))
    with EtcdServer(server_dir) as server:
        assert server.endpoint != f"{LOOPBACK}:{busy_port}"
        assert server.pid is not None

"""Shared fixtures: real PostgreSQL clusters and etcd members on free loopback ports.

How this works: one scratch directory (mode 0755, so the `postgres` user can
reach clusters in it when tests run as root) holds a subdirectory per server
and is removed at the end of the session. Every server is stopped in the
fixture's teardown, which runs even when the test fails; servers whose
binaries are missing make the fixture fail loudly (tools/setup.sh installs
them). Should pytest itself be killed, the servers' supervisors stop them.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import MODES, ProxyThread
from replication_harness import kill_leftovers

from haproxy_ln.local import EtcdServer, PostgresCluster, scratch_dir


@pytest.fixture(autouse=True)
def _no_replicator_left_running() -> Iterator[None]:
    yield
    kill_leftovers()


@pytest.fixture(scope="session")
def local_servers_dir() -> Iterator[Path]:
    """Session-wide scratch directory for local servers; removed afterwards."""
    path = scratch_dir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _server_dir(base: Path, prefix: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=prefix, dir=base))


@pytest.fixture
def pg(local_servers_dir: Path) -> Iterator[PostgresCluster]:
    """A fresh, started PostgreSQL cluster with trust auth, for this test only."""
    cluster = PostgresCluster(_server_dir(local_servers_dir, "pg-"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def pg_session(local_servers_dir: Path) -> Iterator[PostgresCluster]:
    """A started PostgreSQL cluster (trust auth) shared by the whole session.

    Tests using it must not depend on, or leave behind, global state: create
    their own roles and databases under unique names.
    """
    cluster = PostgresCluster(_server_dir(local_servers_dir, "pg-session-"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def etcd(local_servers_dir: Path) -> Iterator[EtcdServer]:
    """A fresh, started single-member etcd for this test only."""
    server = EtcdServer(_server_dir(local_servers_dir, "etcd-"))
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture
def proxy(pg_session: PostgresCluster) -> Iterator[ProxyThread]:
    """A proxy (gate open, default settings) in front of the session cluster."""
    running = ProxyThread(pg_session).start()
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture(params=MODES)
def mode(request: pytest.FixtureRequest) -> str:
    """Each proxy mode: the C relay thread, Python's pumps, and pure Python."""
    return str(request.param)


@pytest.fixture
def any_proxy(pg_session: PostgresCluster, mode: str) -> Iterator[ProxyThread]:
    """A proxy in front of the session cluster, in each mode; startup times out after 1 s."""
    running = ProxyThread(pg_session, mode=mode, startup_timeout=1.0).start()
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture
def pg_pair(local_servers_dir: Path) -> Iterator[tuple[PostgresCluster, PostgresCluster]]:
    """Two fresh clusters for this test: (primary, replica store)."""
    clusters = [
        PostgresCluster(_server_dir(local_servers_dir, prefix))
        for prefix in ("pg-primary-", "pg-replica-")
    ]
    try:
        for cluster in clusters:
            cluster.start()
        yield clusters[0], clusters[1]
    finally:
        for cluster in clusters:
            cluster.stop()

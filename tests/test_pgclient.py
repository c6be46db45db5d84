"""Our own client connection (replicator.pgclient): TLS as sslmode asks, the
extended-protocol pipeline, and replication to a replica store over TLS."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from replication_harness import ReplicatorProcess, rows_digest

from haproxy_ln.errors import ReplicationError, ServerError
from haproxy_ln.local import PostgresCluster
from haproxy_ln.local.postgres import OS_USER_WHEN_ROOT
from haproxy_ln.pgwire import messages
from haproxy_ln.pgwire.dsn import PgTarget
from haproxy_ln.replicator.pgclient import PgConnection, SocketTransport
from haproxy_ln.replicator.walsender import WalSenderConnection
from haproxy_ln.sim.wallet import self_signed


@pytest.fixture(scope="module")
def tls_pg(local_servers_dir: Path) -> Iterator[tuple[PostgresCluster, Path]]:
    """A cluster serving TLS with a self-signed certificate for 127.0.0.1: (cluster, CA file)."""
    base = Path(tempfile.mkdtemp(prefix="pg-tls-", dir=local_servers_dir))
    cert, key = self_signed([])
    certs = base / "certs"
    certs.mkdir()
    (certs / "server.crt").write_bytes(cert)
    (certs / "server.key").write_bytes(key)
    (certs / "server.key").chmod(0o600)
    if os.geteuid() == 0:
        for path in (certs, certs / "server.crt", certs / "server.key"):
            shutil.chown(path, OS_USER_WHEN_ROOT)
    cluster = PostgresCluster(
        base,
        settings={
            "ssl": "on",
            "ssl_cert_file": str(certs / "server.crt"),
            "ssl_key_file": str(certs / "server.key"),
        },
    )
    try:
        cluster.start()
        yield cluster, certs / "server.crt"
    finally:
        cluster.stop()


def _target(cluster: PostgresCluster, query: str = "") -> PgTarget:
    return PgTarget.parse(cluster.dsn() + query)


async def _uses_tls(target: PgTarget) -> bool:
    conn = await PgConnection.connect(target, {}, timeout=10)
    try:
        rows = await conn.query("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        return rows == [("t",)]
    finally:
        await conn.aclose()


@pytest.mark.parametrize(
    ("mode", "tls"),
    [
        ("verify-full", True),
        ("verify-ca", True),
        ("require", True),
        ("prefer", True),
        ("disable", False),
    ],
)
def test_sslmode_decides_whether_the_session_is_encrypted(
    tls_pg: tuple[PostgresCluster, Path], mode: str, tls: bool
) -> None:
    cluster, ca = tls_pg
    target = _target(cluster, f"?sslmode={mode}&sslrootcert={ca}")
    assert trio.run(_uses_tls, target) is tls


def test_a_certificate_from_another_authority_is_refused(
    tls_pg: tuple[PostgresCluster, Path], tmp_path: Path
) -> None:
    cluster, _ = tls_pg
    other, _ = self_signed([])
    (tmp_path / "other.crt").write_bytes(other)
    target = _target(cluster, f"?sslmode=verify-full&sslrootcert={tmp_path / 'other.crt'}")
    with pytest.raises(ReplicationError, match=r"TLS with .* failed: .*certificate verify failed"):
        trio.run(_uses_tls, target)


def test_tls_required_but_refused_and_bad_urls_are_clear_errors(pg: PostgresCluster) -> None:
    with pytest.raises(ReplicationError, match="refuses TLS, which sslmode requires"):
        trio.run(_uses_tls, _target(pg, "?sslmode=require"))
    assert trio.run(_uses_tls, _target(pg, "?sslmode=prefer")) is False
    with pytest.raises(ValueError, match="sslmode 'sometimes' is not one of disable"):
        _target(pg, "?sslmode=sometimes")
    with pytest.raises(ValueError, match="unknown parameter 'ssl_mode': the URL may set sslmode"):
        _target(pg, "?ssl_mode=require")


def test_an_unreadable_certificate_file_is_a_clear_error(
    pg: PostgresCluster, tmp_path: Path
) -> None:
    target = _target(pg, f"?sslmode=verify-full&sslrootcert={tmp_path / 'missing.pem'}")
    with pytest.raises(ReplicationError, match="cannot set up TLS"):
        trio.run(_uses_tls, target)


def test_a_pipeline_runs_as_one_transaction_and_an_error_undoes_it(pg: PostgresCluster) -> None:
    pg.psql("CREATE TABLE pipe (id int PRIMARY KEY, v text)")

    async def main() -> None:
        conn = await PgConnection.connect(_target(pg), {}, timeout=10)
        try:
            insert = messages.parse(b"ins", "INSERT INTO pipe VALUES ($1::int, $2)", [25, 25])
            ok = insert + messages.bind_execute(b"ins", [b"1", "é".encode()])
            ok += messages.bind_execute(b"ins", [b"2", None])
            await conn.run(ok)
            # The second row collides: the first of this pipeline must be undone too.
            bad = messages.bind_execute(b"ins", [b"3", b"x"])
            bad += messages.bind_execute(b"ins", [b"1", b"dup"])
            with pytest.raises(ServerError) as caught:
                await conn.run(bad)
            assert caught.value.sqlstate == "23505"
            # The connection is usable after the error, the statement still prepared;
            # closing one that does not exist is no error.
            await conn.run(messages.bind_execute(b"ins", [b"4", b"d"]))
            await conn.run(messages.close_statement(b"absent"))
            assert await conn.query("SELECT id, v FROM pipe ORDER BY id") == [
                ("1", "é"),
                ("2", None),
                ("4", "d"),
            ]
        finally:
            await conn.aclose()

    trio.run(main)


def test_replication_to_a_store_over_verified_tls(
    pg: PostgresCluster, tls_pg: tuple[PostgresCluster, Path], tmp_path: Path
) -> None:
    replica, ca = tls_pg
    database = "tlsrep"
    for cluster in (pg, replica):
        cluster.psql(f"CREATE DATABASE {database}")
    pg.psql(
        "CREATE TABLE t (id int PRIMARY KEY, v text); INSERT INTO t VALUES (1, 'a')",
        dbname=database,
    )
    rep = ReplicatorProcess(
        pg,
        replica,
        tmp_path / "rep.log",
        dbname=database,
        replica_query=f"?sslmode=verify-full&sslrootcert={ca}",
    ).start()
    try:
        pg.psql("INSERT INTO t VALUES (2, 'b'); UPDATE t SET v = 'c' WHERE id = 1", dbname=database)
        assert rows_digest(replica, database) == rows_digest(pg, database)
        encrypted = replica.psql(
            "SELECT count(*) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) "
            f"WHERE s.ssl AND a.datname = '{database}'"
        )
        assert int(encrypted) >= 1
    finally:
        assert rep.stop() == 0, rep.log()


# -- the socket transport ------------------------------------------------------------


def _transport_pair() -> tuple[SocketTransport, socket.socket]:
    ours, theirs = socket.socketpair()
    return SocketTransport(ours), theirs


async def test_a_busy_socket_still_lets_other_tasks_run_and_cancellation_through() -> None:
    """Reads that find data at once skip trio's checkpoint, but not every time: a
    stream that never runs dry must not starve the other tasks or ignore a deadline."""
    transport, theirs = _transport_pair()
    theirs.sendall(b"x" * 200_000)
    read = 0
    ticks = 0

    async def reader() -> None:
        nonlocal read
        while True:
            read += len(await transport.receive_some(1))

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await trio.lowlevel.checkpoint()

    with trio.move_on_after(0.05):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            nursery.start_soon(ticker)
    assert 0 < read < 200_000  # cancelled while data was still waiting
    assert ticks > read / 100  # the ticker ran all along
    await transport.aclose()
    theirs.close()


async def test_the_transport_carries_more_than_a_socket_buffer_both_ways() -> None:
    transport, theirs = _transport_pair()
    theirs.setblocking(False)
    payload = os.urandom(4 << 20)  # several socket buffers: send_all must wait
    received = bytearray()

    async def drain() -> None:
        while len(received) < len(payload):
            await trio.lowlevel.wait_readable(theirs)
            received.extend(theirs.recv(1 << 16))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(drain)
        await transport.send_all(payload)
    assert bytes(received) == payload
    theirs.close()
    assert await transport.receive_some() == b""  # end of stream
    with pytest.raises(trio.BrokenResourceError):
        for _ in range(100):  # the first send after the peer left may still succeed
            await transport.send_all(b"y" * 65536)
    await transport.aclose()


class _RecordingStream(trio.abc.Stream):
    """Serves `data` in chunks of at most `chunk` bytes; records what each read asked."""

    def __init__(self, data: bytes, chunk: int) -> None:
        self.data, self.chunk, self.asked = data, chunk, list[int]()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        assert max_bytes is not None
        self.asked.append(max_bytes)
        n = min(max_bytes, self.chunk)
        out, self.data = self.data[:n], self.data[n:]
        return out

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        raise AssertionError("nothing is sent")

    async def wait_send_all_might_not_block(self) -> None:
        raise AssertionError("nothing is sent")

    async def aclose(self) -> None:
        pass


async def test_a_large_message_is_read_a_megabyte_at_a_time() -> None:
    """A read may allocate all it asks for: a 3 MB message (or a declared 1 GB one)
    must not be asked for whole."""
    body = os.urandom(3 << 20)
    stream = _RecordingStream(messages.build(b"d", body), 200_000)
    conn = WalSenderConnection(stream, PgTarget.parse("postgresql://u@127.0.0.1:1/d"))
    assert await conn.receive() == body
    assert max(stream.asked) <= 1 << 20

"""The simulator speaks to PostgreSQL as the daemons do, and journals an unknown COMMIT.

A recording relay between the simulator and PostgreSQL keeps every byte the
simulator sends; the tests read the frontend messages back (Query, Parse,
Bind) and check the pattern each mode promises: CLN's simple BEGIN/COMMIT
and unnamed PQexecParams with binary results, each transaction ending with
the data_version check; lnd's named prepared statements, parsed once per
connection, in SERIALIZABLE transactions.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
import trio

from haproxy_ln.config import HostPort
from haproxy_ln.errors import DatabaseLost
from haproxy_ln.keys.lnd import unlock_wallet
from haproxy_ln.keys.sealing import Secret
from haproxy_ln.local import PostgresCluster
from haproxy_ln.sim.checker import check
from haproxy_ln.sim.journal import read_journal
from haproxy_ln.sim.runner import LndWallet, Mode, SimSettings, Simulator

_STARTUP = 196608  # protocol 3.0; SSLRequest and GSSENCRequest use other codes


@dataclass(frozen=True)
class Message:
    kind: bytes
    body: bytes

    def cstrings(self, count: int) -> list[bytes]:
        return self.body.split(b"\0")[:count]


class Recorder:
    """A TCP relay to 127.0.0.1:`port` keeping what each client connection sends."""

    def __init__(self, port: int) -> None:
        self._target = port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self.sent: list[bytearray] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self._target))
            record = bytearray()
            self.sent.append(record)
            for src, dst, buf in ((client, upstream, record), (upstream, client, None)):
                threading.Thread(target=self._pump, args=(src, dst, buf), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket, record: bytearray | None) -> None:
        try:
            while data := src.recv(65536):
                if record is not None:
                    record += data
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._listener.close()

    def connections(self) -> list[list[Message]]:
        """The frontend messages of each connection, after its startup packet."""
        return [parse_frontend(bytes(data)) for data in self.sent]


def parse_frontend(data: bytes) -> list[Message]:
    pos = 0
    while True:  # SSLRequest / GSSENCRequest, then the StartupMessage: no type byte
        length, code = struct.unpack_from("!II", data, pos)
        pos += length
        if code == _STARTUP:
            break
    messages = []
    while pos + 5 <= len(data):
        (length,) = struct.unpack_from("!I", data, pos + 1)
        messages.append(Message(data[pos : pos + 1], data[pos + 5 : pos + 1 + length]))
        pos += 1 + length
    return messages


def bind_result_formats(bind: Message) -> list[int]:
    body = bind.body
    pos = body.index(b"\0") + 1  # portal
    pos = body.index(b"\0", pos) + 1  # statement
    (nformats,) = struct.unpack_from("!H", body, pos)
    pos += 2 + 2 * nformats
    (nparams,) = struct.unpack_from("!H", body, pos)
    pos += 2
    for _ in range(nparams):
        (size,) = struct.unpack_from("!i", body, pos)
        pos += 4 + max(size, 0)
    (nresults,) = struct.unpack_from("!H", body, pos)
    return list(struct.unpack_from(f"!{nresults}H", body, pos + 2))


def queries(messages: list[Message]) -> list[str]:
    return [m.body.rstrip(b"\0").decode() for m in messages if m.kind == b"Q"]


@pytest.fixture
def recorder(pg_session: PostgresCluster) -> Iterator[Recorder]:
    relay = Recorder(pg_session.port)
    try:
        yield relay
    finally:
        relay.close()


def new_database(cluster: PostgresCluster) -> str:
    name = f"sim_{uuid.uuid4().hex[:12]}"
    cluster.create_database(name, "postgres")
    return name


def test_cln_mode_sends_simple_begin_commit_and_unnamed_binary_statements_ending_in_the_check(
    tmp_path: Path, pg_session: PostgresCluster, recorder: Recorder
) -> None:
    name = new_database(pg_session)
    key = tmp_path / "hsm_secret"
    key.write_bytes(b"k" * 32)
    dsn = f"postgresql://postgres@127.0.0.1:{recorder.port}/{name}"
    settings = SimSettings(
        mode=Mode.CLN, dsn=dsn, journal=tmp_path / "j", key_file=key, rate=0, count=8
    )
    Simulator(settings).run()

    (messages,) = recorder.connections()  # one connection, as lightningd has
    parses = [m for m in messages if m.kind == b"P"]
    assert parses and all(m.cstrings(1) == [b""] for m in parses)  # unnamed statements only
    binds = [m for m in messages if m.kind == b"B"]
    assert binds and all(set(bind_result_formats(b)) <= {1} for b in binds)  # binary results
    sent = queries(messages)
    # the migration, the channel opening and the 8 updates: each BEGIN ... COMMIT
    assert sent.count("BEGIN") == sent.count("COMMIT") == 10
    # every write transaction's last statement before COMMIT is the data_version check
    last_before_commit: list[bytes] = []
    last = b""
    for m in messages:
        if m.kind == b"P":
            last = m.cstrings(2)[1]
        elif m.kind == b"Q" and m.body.startswith(b"COMMIT"):
            last_before_commit.append(last)
    check = b"UPDATE vars SET intval = intval + 1 WHERE name = 'data_version' AND intval = $1"
    assert b"INSERT INTO version" in last_before_commit[0]  # the migration
    assert last_before_commit[1:] == [check] * 9  # the channel opening and the 8 updates


async def test_lnd_mode_uses_named_statements_parsed_once_per_connection_in_serializable(
    tmp_path: Path, pg_session: PostgresCluster, recorder: Recorder
) -> None:
    name = new_database(pg_session)
    password = tmp_path / "password"
    password.write_bytes(b"pw")
    wallet = LndWallet(
        password, tmp_path / "tls.cert", tmp_path / "tls.key", HostPort("127.0.0.1", 0)
    )
    dsn = f"postgresql://postgres@127.0.0.1:{recorder.port}/{name}"
    sim = Simulator(
        SimSettings(mode=Mode.LND, dsn=dsn, journal=tmp_path / "j", wallet=wallet, rate=0, count=40)
    )
    done = trio.Event()

    def run() -> None:
        try:
            sim.run()
        finally:
            trio.from_thread.run_sync(done.set, trio_token=token)

    token = trio.lowlevel.current_trio_token()
    threading.Thread(target=run, daemon=True).start()
    assert await trio.to_thread.run_sync(sim.listening.wait, 15)
    assert sim.wallet is not None
    await unlock_wallet(sim.wallet.address, wallet.tls_cert, Secret(b"pw"), 5.0)
    with trio.fail_after(30):
        await done.wait()

    connections = recorder.connections()
    assert len(connections) == 4  # the pool
    binds = 0
    for messages in connections:
        names = [m.cstrings(1)[0] for m in messages if m.kind == b"P"]
        assert all(names) and len(names) == len(set(names))  # named, each parsed once
        binds += sum(1 for m in messages if m.kind == b"B")
        begins = [q for q in queries(messages) if q.startswith("BEGIN")]
        assert all(q in ("BEGIN", "BEGIN ISOLATION LEVEL SERIALIZABLE") for q in begins)
    total_parses = sum(1 for c in connections for m in c if m.kind == b"P")
    assert binds > 2 * total_parses  # statements are reused, not parsed again


def test_a_connection_lost_during_commit_is_journaled_as_unknown_not_acknowledged(
    tmp_path: Path, pg: PostgresCluster
) -> None:
    # A COMMIT held by synchronous replication (a standby that never answers), and
    # the connection killed while it waits: the outcome is unknown to the daemon.
    dsn = pg.dsn()
    key = tmp_path / "hsm_secret"
    key.write_bytes(b"k" * 32)
    journal = tmp_path / "journal"
    sim = Simulator(
        SimSettings(mode=Mode.CLN, dsn=dsn, journal=journal, key_file=key, rate=20, count=None)
    )
    errors: list[BaseException] = []

    def run() -> None:
        try:
            sim.run()
        except BaseException as e:
            errors.append(e)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    with psycopg.connect(dsn, autocommit=True) as admin:
        deadline = time.monotonic() + 15
        while not journal.exists() or not any(r.kind == "ack" for r in read_journal(journal)):
            assert time.monotonic() < deadline
            time.sleep(0.02)
        admin.execute("ALTER SYSTEM SET synchronous_standby_names = 'nobody'")
        admin.execute("SELECT pg_reload_conf()")
        waiting = (
            "SELECT pid FROM pg_stat_activity WHERE application_name = 'haproxy-ln-sim-cln'"
            " AND wait_event = 'SyncRep'"
        )
        while not (rows := admin.execute(waiting).fetchall()):
            assert time.monotonic() < deadline
            time.sleep(0.02)
        admin.execute("SELECT pg_terminate_backend(%s)", (rows[0][0],))
        thread.join(15)
        admin.execute("ALTER SYSTEM RESET synchronous_standby_names")
        admin.execute("SELECT pg_reload_conf()")

    assert len(errors) == 1 and isinstance(errors[0], DatabaseLost)
    assert "outcome is unknown" in str(errors[0])
    records = read_journal(journal)
    assert [r.kind for r in records][-2:] == ["unknown", "exit"]
    result = check([journal], dsn)
    acked = sum(1 for r in records if r.kind == "ack")
    assert (result.acked, result.unknown, result.lost) == (acked, 1, 0)

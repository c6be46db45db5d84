"""Hostile and broken clients get a clear error and a closed connection.

The proxy keeps serving everyone else, and its memory stays bounded.
"""

import contextlib
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import psycopg
import pytest
from harness import ProxyThread, RawClient

from haproxy_ln.local import PostgresCluster, free_port
from haproxy_ln.pgwire.messages import error_fields
from haproxy_ln.pgwire.session import Session


def read_all(client: RawClient) -> list[tuple[bytes, bytes]]:
    msgs = []
    try:
        while True:
            msgs.append(client.read_message())
    except EOFError:
        return msgs


def fatal(msgs: list[tuple[bytes, bytes]]) -> dict[str, str]:
    errors = [error_fields(body) for mtype, body in msgs if mtype == b"E"]
    assert errors, msgs
    assert errors[-1]["S"] == "FATAL"
    return errors[-1]


def still_serves(proxy: ProxyThread) -> None:
    with psycopg.connect(proxy.dsn(), connect_timeout=10) as conn:
        assert conn.execute("select 7").fetchone() == (7,)


def test_garbage_instead_of_startup_is_refused(any_proxy: ProxyThread) -> None:
    client = RawClient(any_proxy.port)
    client.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    error = fatal(read_all(client))
    assert error["C"] == "08P01"
    assert error["M"] == "protocol violation: startup packet length 1195725856 is outside 8..10000"
    still_serves(any_proxy)
    assert any_proxy.proxy.stats.protocol_errors == 1


def test_oversized_message_is_refused_without_allocating(any_proxy: ProxyThread) -> None:
    client = RawClient(any_proxy.port)
    client.startup()
    client.send(b"Q" + struct.pack("!I", 0x7FFFFFF0) + b"select")
    error = fatal(read_all(client))
    assert error["C"] == "08P01"
    assert "message length 2147483632 exceeds the limit of 67108864 bytes" in error["M"]
    still_serves(any_proxy)
    # Wait for the connections' teardowns: until then a connection may hold a buffer
    # for a moment (the relay reading the last client's Terminate), so a zero seen
    # while any remains proves nothing and a nonzero reading is no leak.
    deadline = time.monotonic() + 10
    while any_proxy.proxy.members and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not any_proxy.proxy.members
    assert any_proxy.proxy.pool.in_use == 0


def test_unknown_message_type_after_startup_is_refused(any_proxy: ProxyThread) -> None:
    client = RawClient(any_proxy.port)
    client.startup()
    client.send(b"\x01\x00\x00\x00\x04")
    assert fatal(read_all(client))["M"] == "protocol violation: unknown message type byte 0x01"
    still_serves(any_proxy)


def test_half_open_startup_times_out(any_proxy: ProxyThread) -> None:
    client = RawClient(any_proxy.port)
    client.send(struct.pack("!I", 40) + b"\x00\x03")  # a startup packet that never completes
    started = time.monotonic()
    error = fatal(read_all(client))
    assert error["M"] == "startup packet not received in time"
    assert 0.5 < time.monotonic() - started < 10
    still_serves(any_proxy)


def test_client_that_never_reads_cannot_grow_proxy_memory(any_proxy: ProxyThread) -> None:
    client = RawClient(any_proxy.port)
    client.startup()
    client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    client.query("select repeat('x', 1000000) from generate_series(1, 2000)")  # 2 GB of rows
    time.sleep(2)
    in_use = any_proxy.proxy.pool.in_use
    assert in_use <= 64 * 1024, in_use  # one buffer per direction at most: backpressure
    still_serves(any_proxy)
    client.close()


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_ten_thousand_idle_connections_are_refused_and_memory_stays_bounded(
    pg_session: PostgresCluster, tmp_path: Path
) -> None:
    config = tmp_path / "node.toml"
    config.write_text(
        '[node]\nname = "a"\n[proxy]\nmax_client_connections = 2000\nstartup_timeout = 3.0\n'
    )
    port = free_port()
    exe = Path(sys.executable).with_name("haproxy-ln")
    args = [str(exe), "proxy", "--config", str(config), "--listen", f"127.0.0.1:{port}"]
    args += ["--upstream", f"127.0.0.1:{pg_session.port}", "--log-level", "warning"]
    proc = subprocess.Popen(args, stderr=subprocess.PIPE, text=True)
    idle: list[socket.socket] = []
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "proxy did not start"
                time.sleep(0.1)
        dsn = f"postgresql://postgres@127.0.0.1:{port}/postgres"
        with psycopg.connect(dsn, connect_timeout=10, autocommit=True) as busy:
            before = rss_kib(proc.pid)
            for _ in range(10_000):
                s = socket.socket()
                s.setblocking(False)
                with contextlib.suppress(BlockingIOError):
                    s.connect(("127.0.0.1", port))
                idle.append(s)
            peak = before
            for _ in range(20):  # the established session keeps working meanwhile
                assert busy.execute("select 1").fetchone() == (1,)
                peak = max(peak, rss_kib(proc.pid))
                time.sleep(0.1)
            outcomes = {"53300": 0, "08P01": 0}
            for s in idle:
                s.setblocking(True)
                s.settimeout(15)
                data = b""
                while chunk := s.recv(4096):
                    data += chunk
                code = error_fields(data[5:])["C"]
                outcomes[code] += 1
            # Every one got a clear error: 53300 at once past the limit, or 08P01 once its
            # startup timed out (slots freed by timeouts admit later ones, so more than
            # 2000 can time out in all).
            assert sum(outcomes.values()) == 10_000
            admitted = 2000 - 1  # the busy session holds one slot
            assert outcomes["08P01"] >= admitted and outcomes["53300"] >= 5000, outcomes
            assert busy.execute("select 2").fetchone() == (2,)
            assert peak - before < 64 * 2000, (before, peak)  # < 64 KiB per admitted client
    finally:
        for s in idle:
            s.close()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    assert proc.returncode == 0, proc.stderr.read() if proc.stderr else ""


def test_deep_pipeline_is_paced_not_buffered(any_proxy: ProxyThread) -> None:
    client = RawClient(any_proxy.port)
    client.startup()
    n = 1000  # far beyond the 64 requests in flight a session tracks
    client.send(
        b"".join(
            b"Q" + struct.pack("!I", 4 + len(q)) + q for q in (b"select %d\0" % i for i in range(n))
        )
    )
    answers = []
    for _ in range(n):
        msgs = client.read_until(b"Z")
        answers.append(next(body for mtype, body in msgs if mtype == b"D"))
    assert answers == [struct.pack("!HI", 1, len(str(i))) + str(i).encode() for i in range(n)]
    still_serves(any_proxy)


def test_a_bug_on_one_connection_ends_only_that_connection(
    pg_session: PostgresCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = Session.client_message

    def buggy(self: Session, msg: bytes | memoryview) -> bytes | None:
        if b"boom" in bytes(msg):
            raise RuntimeError("injected bug")
        return original(self, msg)

    monkeypatch.setattr(Session, "client_message", buggy)
    proxy = ProxyThread(pg_session, mode="pure").start()
    try:
        client = RawClient(proxy.port)
        client.startup()
        client.query("select 'boom'")
        error = fatal(read_all(client))
        assert (error["C"], error["M"]) == ("XX000", "internal error in haproxy-ln")
        still_serves(proxy)
    finally:
        proxy.stop()

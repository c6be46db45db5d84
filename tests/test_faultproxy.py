"""The fault-injecting proxy itself: it passes bytes, partitions, resets, and heals."""

from __future__ import annotations

import contextlib
import socket
import socketserver
import threading
from collections.abc import Iterator

import pytest
from faultproxy import FaultProxy, Mode

WAIT = 5.0  # seconds to wait for bytes that must arrive
QUIET = 0.3  # seconds of silence that show bytes do not arrive


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        server = self.server
        assert isinstance(server, EchoServer)
        with server.lock:
            server.connections += 1
        # The proxy resets connections on purpose: that ends the echo, it is no error.
        with contextlib.suppress(ConnectionResetError, BrokenPipeError):
            while data := self.request.recv(65536):
                self.request.sendall(data)


class EchoServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Echo)
        self.lock = threading.Lock()
        self.connections = 0

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.server_address[1]}"


@pytest.fixture
def echo() -> Iterator[EchoServer]:
    server = EchoServer()
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.fixture
def proxy(echo: EchoServer) -> Iterator[FaultProxy]:
    with FaultProxy(echo.endpoint) as running:
        yield running


def connect(proxy: FaultProxy) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=WAIT)
    return sock


def receive(sock: socket.socket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            break
        data += chunk
    return bytes(data)


def assert_silent(sock: socket.socket) -> None:
    """Nothing arrives on `sock` for a while, and it is not closed either."""
    sock.settimeout(QUIET)
    with pytest.raises(TimeoutError):
        sock.recv(1)
    sock.settimeout(WAIT)


def assert_reset(proxy: FaultProxy) -> None:
    """A new connection is reset (while connecting or at its first read)."""
    with pytest.raises(ConnectionResetError), connect(proxy) as sock:
        sock.recv(1)


def test_pass_forwards_bytes_both_ways_in_order(proxy: FaultProxy) -> None:
    payload = bytes(range(256)) * 16384  # 4 MiB, more than the proxy buffers per direction
    with connect(proxy) as sock:
        sender = threading.Thread(target=sock.sendall, args=(payload,))
        sender.start()
        assert receive(sock, len(payload)) == payload
        sender.join()
    assert proxy.mode is Mode.PASS


def test_blackhole_keeps_connections_open_but_silent(proxy: FaultProxy, echo: EchoServer) -> None:
    with connect(proxy) as sock:
        sock.sendall(b"before")
        assert receive(sock, 6) == b"before"
        proxy.blackhole()
        sock.sendall(b"during")
        assert_silent(sock)
        assert proxy.open_connections == 1


def test_blackhole_accepts_new_connections_without_forwarding_them(
    proxy: FaultProxy, echo: EchoServer
) -> None:
    with connect(proxy) as first:
        first.sendall(b"x")
        assert receive(first, 1) == b"x"
    proxy.blackhole()
    with connect(proxy) as sock:
        sock.sendall(b"hello")
        assert_silent(sock)
    assert proxy.accepted == 2
    assert echo.connections == 1


def test_heal_resumes_open_connections_and_closes_those_held(proxy: FaultProxy) -> None:
    with connect(proxy) as kept:
        kept.sendall(b"a")
        assert receive(kept, 1) == b"a"
        proxy.blackhole()
        held = connect(proxy)
        kept.sendall(b"lost")
        assert_silent(kept)
        proxy.heal()
        kept.sendall(b"again")
        assert receive(kept, 5) == b"again"  # "lost" was dropped, not delayed
        with held:
            assert held.recv(1) == b""  # closed, so its client connects again
        with connect(proxy) as fresh:
            fresh.sendall(b"new")
            assert receive(fresh, 3) == b"new"


def test_reset_closes_open_connections_and_refuses_new_ones_until_heal(proxy: FaultProxy) -> None:
    with connect(proxy) as sock:
        sock.sendall(b"a")
        assert receive(sock, 1) == b"a"
        proxy.reset()
        with pytest.raises(ConnectionResetError):
            sock.recv(1)
    assert_reset(proxy)
    assert proxy.open_connections == 0
    proxy.heal()
    with connect(proxy) as sock:
        sock.sendall(b"b")
        assert receive(sock, 1) == b"b"


def test_a_target_that_refuses_resets_the_client() -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    with FaultProxy(f"127.0.0.1:{port}") as proxy:
        assert_reset(proxy)


def test_stop_closes_client_connections(echo: EchoServer) -> None:
    proxy = FaultProxy(echo.endpoint).start()
    sock = connect(proxy)
    sock.sendall(b"a")
    assert receive(sock, 1) == b"a"
    proxy.stop()
    with sock:
        assert sock.recv(1) == b""
    proxy.stop()  # idempotent

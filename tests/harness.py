"""A proxy running in a background thread, for tests that use blocking clients.

The proxy runs its own trio loop in a thread so that tests can drive it with
ordinary blocking clients (psql, pgbench, psycopg, asyncpg under asyncio.run)
and still reach its internals (gate, stats, members) through `call`, which
runs a function inside the proxy's loop.
"""

from __future__ import annotations

import socket
import struct
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import trio

from haproxy_ln import framing
from haproxy_ln.config import HostPort, ProxyConfig, ReplicationConfig
from haproxy_ln.local import PostgresCluster
from haproxy_ln.proxy.gate import Gate
from haproxy_ln.proxy.server import Proxy
from haproxy_ln.replicator.service import Replicator
from haproxy_ln.store import bridge

T = TypeVar("T")
MODES = ["relay", "pumps", "pure"]


class ProxyThread:
    """`Proxy` in front of `cluster`, listening on a free loopback port."""

    def __init__(
        self,
        cluster: PostgresCluster,
        *,
        mode: str = "relay",
        replication: ReplicationConfig | None = None,
        **settings: Any,
    ) -> None:
        """`mode`: "relay" (C relay thread), "pumps" (C framer, Python's pumps
        only) or "pure" (the pure-Python twins, as without the C extension).
        With `replication`, a Replicator runs in the same loop and holds the
        gate as the agent's would; start() returns once it streams."""
        config = ProxyConfig.model_validate(
            {"upstream": f"{cluster.host}:{cluster.port}", **settings}
        )
        # Port 0 (the kernel picks) is not valid operator input, so set it here.
        self.config = config.model_copy(update={"listen": HostPort("127.0.0.1", 0)})
        self.cluster = cluster
        self.mode = mode
        self.replication = replication
        self.replicator: Replicator | None = None
        self.gate = Gate(is_open=True)
        self.port = 0
        self._token: trio.lowlevel.TrioToken | None = None
        self._proxy: Proxy | None = None
        self._replicating: trio.CancelScope | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    @property
    def proxy(self) -> Proxy:
        assert self._proxy is not None
        return self._proxy

    def start(self) -> ProxyThread:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError(f"proxy did not start: {self._error!r}")
        if self._error is not None:
            raise self._error
        return self

    def _run(self) -> None:
        try:
            trio.run(self._main)
        except BaseException as e:  # surfaced by start() or stop()
            self._error = e
            self._ready.set()

    async def _main(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        impl = framing.PURE if self.mode == "pure" else framing.DEFAULT
        self._proxy = Proxy(
            self.config, self.gate, implementation=impl, use_relay=self.mode == "relay"
        )
        if self.replication is None:
            await self._serve()
        else:
            async with bridge.open_bridge():
                await self._serve()

    async def _serve(self) -> None:
        assert self._proxy is not None
        async with trio.open_nursery() as nursery:
            addresses = await nursery.start(self._proxy.serve)
            self.port = addresses[0][1]
            if self.replication is not None:
                self.replicator = Replicator(self.replication, node="a", epoch=1, gate=self.gate)
                self._replicating = nursery.cancel_scope
                await nursery.start(self.replicator.run)
            self._ready.set()

    def _stop(self) -> None:
        assert self._proxy is not None
        self._proxy.stop()
        if self._replicating is not None:
            self._replicating.cancel()

    def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn(*args)` inside the proxy's trio loop and return its result."""
        return trio.from_thread.run_sync(fn, *args, trio_token=self._token)

    def dsn(self, user: str = "postgres", dbname: str = "postgres", **params: str) -> str:
        query = "&".join(f"{k}={v}" for k, v in params.items())
        return f"postgresql://{user}@127.0.0.1:{self.port}/{dbname}" + (
            f"?{query}" if query else ""
        )

    def stop(self, timeout: float = 30) -> None:
        """Stop the proxy; raises if it failed or does not stop in time."""
        if self._thread.is_alive() and self._proxy is not None:
            self.call(self._stop)
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise RuntimeError("proxy did not stop in time")
        if self._error is not None:
            raise self._error


class RawClient:
    """A blocking PostgreSQL wire client that speaks only what a test needs."""

    def __init__(self, port: int, timeout: float = 10) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def startup(self, **params: str) -> list[tuple[bytes, bytes]]:
        """Send a StartupMessage (trust auth) and read up to ReadyForQuery."""
        params = {"user": "postgres", "database": "postgres", **params}
        body = struct.pack("!I", 196608)
        body += b"".join(k.encode() + b"\0" + v.encode() + b"\0" for k, v in params.items())
        self.send(struct.pack("!I", len(body) + 5) + body + b"\0")
        return self.read_until(b"Z")

    def query(self, sql: str) -> None:
        body = sql.encode() + b"\0"
        self.send(b"Q" + struct.pack("!I", len(body) + 4) + body)

    def read_message(self) -> tuple[bytes, bytes]:
        """(type, body) of the next message; raises EOFError when closed."""
        header = self._exactly(5)
        (length,) = struct.unpack("!I", header[1:])
        return header[:1], self._exactly(length - 4)

    def read_until(self, mtype: bytes) -> list[tuple[bytes, bytes]]:
        """Messages up to and including the first of `mtype` or a FATAL error."""
        got = []
        while True:
            msg = self.read_message()
            got.append(msg)
            if msg[0] == mtype or (msg[0] == b"E" and b"SFATAL" in msg[1]):
                return got

    def _exactly(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise EOFError(f"closed after {len(data)} of {n} bytes")
            data += chunk
        return data

    def close(self) -> None:
        self.sock.close()

"""The proxy: listeners, admission limits, and orderly stop.

`Proxy.serve` accepts clients and runs one ClientConnection task per client
until `stop()`; it returns once every connection has finished its teardown
(including any backend kept open for a commit still waiting for the
standby). `run_standalone` is `haproxy-ln proxy`: the proxy alone with the
gate open, stopped by SIGTERM or SIGINT.
"""

from __future__ import annotations

import errno
import logging
import signal
import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio

from haproxy_ln import framing
from haproxy_ln.config import ProxyConfig
from haproxy_ln.errors import ListenError
from haproxy_ln.pgwire import messages
from haproxy_ln.proxy.cancel import CancelRouter
from haproxy_ln.proxy.connection import ClientConnection, send_nowait
from haproxy_ln.proxy.gate import Gate

if TYPE_CHECKING:
    from haproxy_ln.framing.relay import NativeRelay

log = logging.getLogger(__name__)

_TOO_MANY = messages.error_response(
    "53300", "haproxy-ln: too many client connections (proxy.max_client_connections)", fatal=True
)
_SHUTTING_DOWN = messages.error_response("57P01", "haproxy-ln is shutting down", fatal=True)
_ACCEPT_RETRY = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
_POOL_KEEP_MAX = 32 << 20


@dataclass
class ProxyStats:
    """Counters kept by the proxy (exported as metrics by the agent)."""

    connections_total: int = 0
    rejected_gate: int = 0
    rejected_limit: int = 0
    cancels_forwarded: int = 0
    cancels_withheld: int = 0
    cancels_unmatched: int = 0
    protocol_errors: int = 0
    relay_attaches: int = 0  # connections lent to the C relay thread (again)
    bytes_from_clients: int = 0  # relayed by Python's pumps (see Proxy.bytes_relayed)
    bytes_from_servers: int = 0


class Proxy:
    """A PostgreSQL proxy in session mode: one backend connection per client."""

    def __init__(
        self,
        config: ProxyConfig,
        gate: Gate,
        *,
        implementation: framing.Implementation = framing.DEFAULT,
        use_relay: bool = True,
    ) -> None:
        self.config = config
        self.implementation = implementation
        self.gate = gate
        self.pool = implementation.Pool(
            config.buffer_chunk,
            config.buffer_budget,
            min(config.buffer_budget // 8, _POOL_KEEP_MAX),
        )
        self.cancels = CancelRouter(self)
        self.members: set[ClientConnection] = set()
        self.stats = ProxyStats()
        self.addresses: list[tuple[str, int]] = []
        self.relay: NativeRelay | None = None
        self._use_relay = use_relay and implementation.native
        self._accepting = trio.CancelScope()

    async def serve(
        self, *, task_status: trio.TaskStatus[list[tuple[str, int]]] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Listen and serve until stop(); reports the bound addresses.

        Raises ListenError if the address cannot be bound."""
        listen = self.config.listen
        try:
            listeners = await trio.open_tcp_listeners(listen.port, host=listen.host)
        except OSError as e:
            raise ListenError(f"[proxy] listen {listen}: {e}") from None
        self.addresses = [lst.socket.getsockname()[:2] for lst in listeners]
        if self._use_relay:
            from haproxy_ln.framing.relay import NativeRelay

            self.relay = NativeRelay()
        try:
            async with trio.open_nursery() as background:
                if self.relay is not None:
                    background.start_soon(self.relay.watch)
                async with trio.open_nursery() as connections:
                    with self._accepting:
                        async with trio.open_nursery() as accepting:
                            for listener in listeners:
                                accepting.start_soon(self._accept_loop, listener, connections)
                            task_status.started(self.addresses)
                    for listener in listeners:
                        await listener.aclose()
                background.cancel_scope.cancel()
        finally:
            if self.relay is not None:
                self.relay.close()

    def bytes_relayed(self) -> tuple[int, int]:
        """Bytes relayed so far (from clients to servers, from servers to clients), by
        Python's pumps and the relay thread together."""
        to_server, to_client = self.stats.bytes_from_clients, self.stats.bytes_from_servers
        if self.relay is not None:
            from_clients, from_servers = self.relay.relayed()
            to_server, to_client = to_server + from_clients, to_client + from_servers
        return to_server, to_client

    def stop(self) -> None:
        """Stop accepting and terminate every client; serve() then returns."""
        self._accepting.cancel()
        for conn in list(self.members):
            conn.terminate(_SHUTTING_DOWN)

    async def _accept_loop(self, listener: trio.SocketListener, nursery: trio.Nursery) -> None:
        while True:
            try:
                sock, _ = await listener.socket.accept()
            except OSError as e:
                if e.errno not in _ACCEPT_RETRY:
                    raise
                log.warning("accept failed (%s); retrying", e)
                await trio.sleep(0.1)
                continue
            if len(self.members) >= self.config.max_client_connections:
                self.stats.rejected_limit += 1
                send_nowait(sock.fileno(), _TOO_MANY)
                sock.close()
                continue
            _tune(sock)
            self.stats.connections_total += 1
            nursery.start_soon(ClientConnection(self, sock).run)


def _tune(sock: trio.socket.SocketType) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    # Notice half-open clients (a crashed daemon host) within about two minutes.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 60)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 6)


async def run_standalone(config: ProxyConfig) -> None:
    """Run the proxy alone with the gate open until SIGTERM or SIGINT."""
    if framing.NATIVE:
        log.info("framing: native C extension, relay thread on")
    else:
        log.warning("framing: pure-Python fallback (%s)", framing.native_problem)
    proxy = Proxy(config, Gate(is_open=True))
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            addresses = await nursery.start(proxy.serve)
            log.info(
                "proxy listening on %s, upstream %s",
                ", ".join(f"{h}:{p}" for h, p in addresses),
                config.upstream,
            )
            async for signum in signals:
                log.info("%s received: stopping", signal.Signals(signum).name)
                proxy.stop()
                break

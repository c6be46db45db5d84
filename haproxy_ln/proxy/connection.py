"""One client connection: startup, then two pumps, then a careful teardown.

How this works: the startup phase reads the untyped first message (answering
SSLRequest/GSSENCRequest with `N`, routing CancelRequest, refusing
durability-lowering parameters and closed-gate admissions), connects to
PostgreSQL and forwards the StartupMessage. Then one task pumps client to
server and one server to client. Each pump waits for its socket to be
readable, lets the framer read and scan into a pooled buffer, shows every
held message to the session, and sends the window on. Once the session is
established and quiet, the connection is lent to the C relay thread, which
does the same without the GIL and hands it back when Python is needed.

Teardown is where funds are protected: when the client side ends for any
reason (it left, the gate closed, it broke the protocol), the backend
connection stays open, and its answers are read and dropped, for as long as
the session says a commit may be waiting for the synchronous standby.
Closing it earlier could let PostgreSQL give up that wait and commit
locally only.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial
from typing import TYPE_CHECKING

import trio

from haproxy_ln.errors import BufferBudgetExhausted, ProtocolViolation
from haproxy_ln.framing import FramerAPI, codes
from haproxy_ln.pgwire import messages, sql

if TYPE_CHECKING:
    from haproxy_ln.framing.relay import Attachment
    from haproxy_ln.proxy.server import Proxy

log = logging.getLogger(__name__)

_TERMINATE = messages.build(b"X", b"")


class ClientGone(Exception):
    """The client closed its side."""


class ClientConnection:
    """The proxy side of one client connection and its backend connection."""

    def __init__(self, proxy: Proxy, sock: trio.socket.SocketType) -> None:
        self._proxy = proxy
        self._client = sock
        self._client_fd = sock.fileno()
        self._server: trio.socket.SocketType | None = None
        self._server_fd = -1
        cfg, impl = proxy.config, proxy.implementation
        self._c = impl.Framer(proxy.pool, codes.CLIENT_TABLE, cfg.max_message_size, untyped=True)
        self._s = impl.Framer(
            proxy.pool, codes.SERVER_TABLE, codes.SERVER_MAX_MESSAGE, untyped=False
        )
        self.session = impl.Session()
        self._attachment: Attachment | None = None
        self._failure: Exception | None = None
        self._scope: trio.CancelScope | None = None
        self._final_error: bytes | None = None
        self._cancel_barrier: trio.Event | None = None
        self._barrier_answers = 0
        self._barrier_cancel_done = False
        self._room = trio.Event()
        self._client_idle = False
        self._quiet = False
        self._holds = 0
        proxy.members.add(self)

    # -- control from outside ------------------------------------------------

    def terminate(self, error: bytes) -> None:
        """End the client side now, telling it `error` if the stream allows."""
        if self._final_error is None:
            self._final_error = error
        if self._scope is not None:
            self._scope.cancel()

    # -- lifecycle -----------------------------------------------------------

    async def run(self) -> None:
        """Serve the connection to its end; never raises for peer behaviour."""
        proxy = self._proxy
        try:
            with trio.CancelScope() as self._scope:
                try:
                    if await self._startup():
                        await self._relay()
                    if self._failure is not None:
                        raise self._failure
                except ProtocolViolation as e:
                    proxy.stats.protocol_errors += 1
                    log.info("client %s broke the protocol: %s", self._peer(), e)
                    self._fail("08P01", f"protocol violation: {e}")
                except BufferBudgetExhausted as e:
                    log.warning("client %s: %s", self._peer(), e)
                    self._fail("53200", str(e))
                except (ClientGone, OSError):
                    pass
                except Exception:
                    # A bug of ours: end this connection, keep serving the others.
                    log.exception("internal error on the connection from %s", self._peer())
                    self._fail("XX000", "internal error in haproxy-ln")
        finally:
            proxy.gate.leave(self)
            with trio.CancelScope(shield=True):
                await self._teardown()
            proxy.members.discard(self)

    def _fail(self, sqlstate: str, text: str) -> None:
        if self._final_error is None:
            self._final_error = messages.error_response(sqlstate, text, fatal=True)

    def _peer(self) -> str:
        try:
            host, port = self._client.getpeername()[:2]
            return f"{host}:{port}"
        except OSError:
            return "?"

    # -- startup -------------------------------------------------------------

    async def _startup(self) -> bool:
        """Run the startup phase; True when the relay should start."""
        proxy = self._proxy
        first = None
        with trio.move_on_after(proxy.config.startup_timeout):
            first = await self._first_message()
            while isinstance(first, messages.SSLRequest | messages.GSSENCRequest):
                self._c.drop()
                await _send_all(self._client, messages.SSL_REFUSED)
                self._c.expect_untyped()
                first = await self._first_message()
        if first is None:
            self._fail("08P01", "startup packet not received in time")
            return False
        if isinstance(first, messages.CancelRequest):
            self._c.drop()
            await proxy.cancels.deliver(first)
            return False
        assert isinstance(first, messages.StartupMessage)
        problem = sql.options_violation(first.params)
        if problem:
            self._fail("42501", f"haproxy-ln refused the connection: {problem}")
            return False
        if not proxy.gate.admit(self):
            proxy.stats.rejected_gate += 1
            self._final_error = proxy.gate.refusal()
            return False
        await self._connect_upstream()
        self._c.accept()
        await self._flush(self._c, self._server, self._server_fd)
        return True

    async def _first_message(self) -> messages.FirstMessage:
        await self._next_held(self._c, self._client, self._client_fd)
        return messages.parse_first(self._c.message())

    async def _connect_upstream(self) -> None:
        proxy = self._proxy
        up = proxy.config.upstream
        try:
            with trio.fail_after(proxy.config.connect_timeout):
                stream = await trio.open_tcp_stream(up.host, up.port)
        except (OSError, trio.TooSlowError) as e:
            log.warning("cannot reach PostgreSQL at %s: %s", up, e)
            self._fail("08006", f"haproxy-ln cannot reach PostgreSQL at {up}")
            raise ClientGone from e
        self._server = stream.socket
        self._server_fd = self._server.fileno()
        self.session.proxy_secret = proxy.cancels.register(self)

    # -- relay -----------------------------------------------------------------

    async def _relay(self) -> None:
        """Relay until either side ends; the relay thread does the steady state.

        Python's pumps run the startup, and take over whenever the relay thread
        hands the connection back: for a message it leaves to Python, or for a
        cancel. At the next quiet point the connection goes back to the thread;
        at the end of a stream or an error, Python's pumps meet it and report.
        """
        relay = self._proxy.relay
        while relay is not None:
            if not await self._pumps(until_quiet=True):
                return
            if self._holds or self._cancel_barrier is not None:
                continue  # a cancel got hold of the connection meanwhile
            self._attachment = relay.attach(
                self._client_fd, self._server_fd, self._c, self._s, self.session
            )
            self._proxy.stats.relay_attaches += 1
            try:
                await self._attachment.returned.wait()
            finally:
                reason = await self._attachment.reclaim()
                self._attachment = None
            if reason in (codes.RELAY_EOF, codes.RELAY_ERROR):
                break
        await self._pumps(until_quiet=False)

    @asynccontextmanager
    async def in_python(self) -> AsyncIterator[None]:
        """Hold the connection in Python's hands (its session readable) for a while."""
        self._holds += 1
        try:
            if self._attachment is not None:
                await self._attachment.reclaim()
            yield
        finally:
            self._holds -= 1

    async def _pumps(self, *, until_quiet: bool) -> bool:
        """Run both pumps in Python; True if they stopped at a quiet point."""
        self._quiet = False
        self._client_idle = False  # until the client pump has handled all it holds
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._pump, self._pump_to_server, nursery.cancel_scope)
            nursery.start_soon(
                self._pump, partial(self._pump_to_client, until_quiet), nursery.cancel_scope
            )
        return self._quiet and self._failure is None

    async def _pump(self, pump: Callable[[], Awaitable[None]], done: trio.CancelScope) -> None:
        try:
            await pump()
        except Exception as e:  # recorded, and raised again by run()
            if self._failure is None:
                self._failure = e
        finally:
            done.cancel()

    async def _pump_to_server(self) -> None:
        c, session = self._c, self.session
        server, server_fd = self._server, self._server_fd
        assert server is not None
        while True:
            while not session.full and (t := c.next()) != codes.MORE:
                replacement = session.client_message(c.message())
                if replacement is None:
                    c.accept()
                else:
                    await _send_instead(
                        c, partial(self._to_server, c, server, server_fd), server, replacement
                    )
                if t == ord("X"):
                    break
            await self._to_server(c, server, server_fd)
            session.flushed()
            if session.terminated:
                return
            if session.full:
                self._room = trio.Event()
                await self._room.wait()
                continue
            self._client_idle = True  # everything the client sent has been handled
            await trio.lowlevel.wait_readable(self._client_fd)
            self._client_idle = False
            if self._recv(c, self._client_fd) == 0:
                return

    async def _pump_to_client(self, until_quiet: bool) -> None:
        s, session = self._s, self.session
        client, client_fd = self._client, self._client_fd
        assert self._server is not None
        while True:
            while s.next() != codes.MORE:
                replacement = session.server_message(s.message())
                if replacement is None:
                    s.accept()
                else:
                    await _send_instead(
                        s, partial(self._flush, s, client, client_fd), client, replacement
                    )
            if s.pending():
                await self._flush(s, client, client_fd)
            self._check_barrier()
            if not session.full:
                self._room.set()
            if until_quiet and self._is_quiet():
                self._quiet = True
                return
            await trio.lowlevel.wait_readable(self._server_fd)
            if self._recv(s, self._server_fd) == 0:
                return

    def _is_quiet(self) -> bool:
        """Nothing half done: the relay thread may take over now."""
        return (
            self.session.ready
            and self._client_idle
            and not self._holds
            and self._cancel_barrier is None
            and not self._s.pending()
        )

    async def _to_server(self, c: FramerAPI, server: trio.socket.SocketType, fd: int) -> None:
        """Send the client's window on, unless a cancel is being absorbed."""
        if c.pending():
            while self._cancel_barrier is not None:
                await self._cancel_barrier.wait()
            await self._flush(c, server, fd)

    async def _next_held(self, framer: FramerAPI, sock: trio.socket.SocketType, fd: int) -> int:
        while (t := framer.next()) == codes.MORE:
            await trio.lowlevel.wait_readable(sock)
            if self._recv(framer, fd) == 0:
                raise ClientGone
        return t

    def _recv(self, framer: FramerAPI, fd: int) -> int:
        """framer.recv(fd), counting the bytes relayed (the relay thread counts its own)."""
        n = framer.recv(fd)
        if n > 0:
            stats = self._proxy.stats
            if fd == self._client_fd:
                stats.bytes_from_clients += n
            else:
                stats.bytes_from_servers += n
        return n

    @staticmethod
    async def _flush(framer: FramerAPI, sock: trio.socket.SocketType | None, fd: int) -> None:
        while framer.send(fd):
            assert sock is not None
            await trio.lowlevel.wait_writable(sock)

    # -- cancel barrier ------------------------------------------------------

    def hold_for_cancel(self) -> None:
        """Hold client traffic until a cancel has been delivered and absorbed.

        Released once PostgreSQL closed the cancel connection (the signal is
        sent) and every request in flight now has been answered (the signal
        has been consumed), so it cannot hit a commit sent afterwards.
        """
        self._cancel_barrier = trio.Event()
        self._barrier_answers = self.session.answered + self.session.in_flight
        self._barrier_cancel_done = False

    def cancel_delivered(self) -> None:
        self._barrier_cancel_done = True
        self._check_barrier()

    @property
    def cancel_pending(self) -> bool:
        return self._cancel_barrier is not None

    def _check_barrier(self) -> None:
        barrier = self._cancel_barrier
        if (
            barrier is not None
            and self._barrier_cancel_done
            and self.session.answered >= self._barrier_answers
        ):
            self._cancel_barrier = None
            barrier.set()

    # -- teardown ----------------------------------------------------------------

    async def _teardown(self) -> None:
        self._proxy.cancels.unregister(self)
        if self._final_error is not None and self._s.at_boundary():
            send_nowait(self._client_fd, self._final_error)
        self._client.close()
        clean_to_server = self._c.at_boundary()
        self._c.close()
        if self._server is not None:
            if self.session.must_keep_backend():
                await self._drain_backend()
            if clean_to_server:
                send_nowait(self._server_fd, _TERMINATE)
            self._server.close()
        self._s.close()

    async def _drain_backend(self) -> None:
        """Read and drop answers until no commit can be waiting any more."""
        s, session, server = self._s, self.session, self._server
        assert server is not None
        log.info("client gone while a commit may wait for the standby; keeping the backend")
        s.discard()
        try:
            while session.must_keep_backend():
                while s.next() != codes.MORE:
                    session.server_message(s.message())
                    s.accept()
                s.discard()
                if not session.must_keep_backend():
                    break
                await trio.lowlevel.wait_readable(server)
                if s.recv(self._server_fd) == 0:
                    break
        except (ProtocolViolation, OSError) as e:
            log.warning("backend failed while draining: %s", e)


async def _send_instead(
    framer: FramerAPI,
    flush: Callable[[], Awaitable[None]],
    sock: trio.socket.SocketType,
    replacement: bytes,
) -> None:
    """Send `replacement` where the held message was, in order, and drop it."""
    await flush()
    framer.drop()
    with trio.CancelScope(shield=True):  # half a message would corrupt the stream
        await _send_all(sock, replacement)


async def _send_all(sock: trio.socket.SocketType, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[await sock.send(view) :]


def send_nowait(fd: int, data: bytes) -> None:
    """Best effort for a last message: never blocks, never raises."""
    with contextlib.suppress(OSError):
        os.write(fd, data)

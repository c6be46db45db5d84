"""Python's side of the C relay thread (native/pgrelay.c).

`NativeRelay.attach` hands an established connection's sockets, framers and
session to the relay thread and returns an `Attachment`; the connection is
the thread's until it is handed back (end of stream, an error, a message
that needs Python, or `Attachment.reclaim`). `NativeRelay.watch` is the trio
task that receives handbacks. Nothing here touches a connection while the
relay thread owns it.
"""

from __future__ import annotations

import os

import trio

from haproxy_ln._native import ffi, lib
from haproxy_ln.framing import codes
from haproxy_ln.framing.native import CFramer, CSession

assert (lib.PGR_EOF, lib.PGR_ERROR, lib.PGR_ESCALATE, lib.PGR_REQUESTED) == (
    codes.RELAY_EOF,
    codes.RELAY_ERROR,
    codes.RELAY_ESCALATE,
    codes.RELAY_REQUESTED,
)
_BATCH = 64


class Attachment:
    """One connection lent to the relay thread."""

    def __init__(self, relay: NativeRelay) -> None:
        self._relay = relay
        self.conn = ffi.new("pgr_conn *")  # freed only after the handback
        self.key = int(ffi.cast("uintptr_t", self.conn))
        self.returned = trio.Event()
        self.reason = 0

    async def reclaim(self) -> int:
        """Ask for the connection back and wait for it; returns why it came back."""
        if not self.returned.is_set():
            lib.pgr_detach(self._relay.r, self.conn)
            with trio.CancelScope(shield=True):
                await self.returned.wait()
        return self.reason


class NativeRelay:
    """The relay thread and the table of connections lent to it."""

    def __init__(self) -> None:
        self.r = ffi.new("pgr_relay *")
        err = lib.pgr_start(self.r)
        if err:
            raise OSError(-err, "cannot start the relay thread")
        self._lent: dict[int, Attachment] = {}
        self._out = ffi.new("pgr_conn *[]", _BATCH)

    def relayed(self) -> tuple[int, int]:
        """Bytes the relay thread has read from clients and from servers so far."""
        return int(self.r.relayed[0]), int(self.r.relayed[1])

    def attach(
        self, client_fd: int, server_fd: int, to_server: object, to_client: object, session: object
    ) -> Attachment:
        """Lend a connection (C framers and C session only) to the relay thread."""
        assert isinstance(to_server, CFramer) and isinstance(to_client, CFramer)
        assert isinstance(session, CSession)
        a = Attachment(self)
        self._lent[a.key] = a
        lib.pgr_attach(self.r, a.conn, client_fd, server_fd, to_server._f, to_client._f, session._s)
        return a

    async def watch(self) -> None:
        """Deliver handbacks to their connections, forever."""
        fd = self.r.notify_fd
        while True:
            await trio.lowlevel.wait_readable(fd)
            try:
                os.read(fd, 8)
            except BlockingIOError:
                continue
            while n := lib.pgr_take(self.r, self._out, _BATCH):
                for i in range(n):
                    a = self._lent.pop(int(ffi.cast("uintptr_t", self._out[i])), None)
                    if a is not None:  # always, unless the C side is broken
                        a.reason = self._out[i].reason
                        a.returned.set()

    def close(self) -> None:
        """Stop the thread; every connection must have been handed back."""
        assert not self._lent, "connections still lent to the relay thread"
        lib.pgr_stop(self.r)

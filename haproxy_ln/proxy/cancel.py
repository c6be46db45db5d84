"""CancelRequest routing by remapped BackendKeyData.

Clients never see a backend's real key: each connection gets a random key
from us, and a CancelRequest is matched against those (constant-time on the
secret) and forwarded with the real key to the backend of that connection
only. A cancel that could release a synchronous-replication wait is
withheld: PostgreSQL answers such a cancel by committing locally without
the standby, which is exactly the rollback a failover must never see.
"""

from __future__ import annotations

import hmac
import logging
import secrets
from typing import TYPE_CHECKING

import trio

from haproxy_ln.pgwire import messages

if TYPE_CHECKING:
    from haproxy_ln.proxy.connection import ClientConnection
    from haproxy_ln.proxy.server import Proxy

log = logging.getLogger(__name__)


class CancelRouter:
    """The proxy's table of client-visible backend keys."""

    def __init__(self, proxy: Proxy) -> None:
        self._proxy = proxy
        self._by_pid: dict[int, tuple[bytes, ClientConnection]] = {}

    def register(self, conn: ClientConnection) -> tuple[int, bytes]:
        """A fresh random key for `conn`, unique among live connections."""
        pid = secrets.randbits(31) | 1
        while pid in self._by_pid:
            pid = secrets.randbits(31) | 1
        secret = secrets.token_bytes(4)
        self._by_pid[pid] = (secret, conn)
        return pid, secret

    def unregister(self, conn: ClientConnection) -> None:
        key = conn.session.proxy_key
        if key is not None and self._by_pid.get(key[0], (b"", None))[1] is conn:
            del self._by_pid[key[0]]

    async def deliver(self, request: messages.CancelRequest) -> None:
        """Forward a client's cancel to the matching backend, if it is safe."""
        stats = self._proxy.stats
        entry = self._by_pid.get(request.pid)
        if entry is None or not hmac.compare_digest(entry[0], request.secret):
            stats.cancels_unmatched += 1
            return
        conn = entry[1]
        backend_key = conn.session.backend_key
        if backend_key is None or conn.cancel_pending:
            stats.cancels_unmatched += 1
            return
        if not conn.session.cancel_is_safe():
            stats.cancels_withheld += 1
            log.warning(
                "withheld a cancel: a commit may be waiting for the synchronous standby, "
                "and cancelling it would commit locally without the replica"
            )
            return
        conn.hold_for_cancel()
        try:
            await self._send(backend_key)
        finally:
            conn.cancel_delivered()

    async def _send(self, backend_key: tuple[int, bytes]) -> None:
        cfg = self._proxy.config
        try:
            with trio.fail_after(cfg.connect_timeout):
                stream = await trio.open_tcp_stream(cfg.upstream.host, cfg.upstream.port)
        except (OSError, trio.TooSlowError) as e:
            log.warning("cannot reach PostgreSQL at %s to cancel: %s", cfg.upstream, e)
            return
        async with stream:
            try:
                await stream.send_all(messages.cancel_request(*backend_key))
                # PostgreSQL closes the connection once it has signalled the backend.
                while await stream.receive_some(64):
                    pass
            except trio.BrokenResourceError as e:
                log.warning("cancel connection to PostgreSQL failed: %s", e)
                return
        self._proxy.stats.cancels_forwarded += 1

"""CancelRequest routing by remapped BackendKeyData.

Clients never see a backend's real cancel secret: each connection gets a
random secret from us (with the backend's own pid), and a CancelRequest is
matched by secret and pid and forwarded with the real key to the backend of
that connection only. A cancel that could release a synchronous-replication wait is
withheld: PostgreSQL answers such a cancel by committing locally without
the standby, which is exactly the rollback a failover must never see.
"""

from __future__ import annotations

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
    """The proxy's table of client-visible cancel secrets."""

    def __init__(self, proxy: Proxy) -> None:
        self._proxy = proxy
        self._by_secret: dict[bytes, ClientConnection] = {}

    def register(self, conn: ClientConnection) -> bytes:
        """A fresh random secret for `conn`, unique among live connections."""
        secret = secrets.token_bytes(4)
        while secret in self._by_secret:
            secret = secrets.token_bytes(4)
        self._by_secret[secret] = conn
        return secret

    def unregister(self, conn: ClientConnection) -> None:
        secret = conn.session.proxy_secret
        if secret is not None and self._by_secret.get(secret) is conn:
            del self._by_secret[secret]

    async def deliver(self, request: messages.CancelRequest) -> None:
        """Forward a client's cancel to the matching backend, if it is safe."""
        stats = self._proxy.stats
        conn = self._by_secret.get(request.secret)
        key = conn.session.backend_key if conn is not None else None
        if conn is None or key is None or key[0] != request.pid:
            stats.cancels_unmatched += 1
            return
        async with conn.in_python():  # the session lives with the relay thread otherwise
            if conn.cancel_pending:
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
            await self._send(key)
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

"""The health endpoints as a small ASGI application (served by hypercorn, server.py).

How this works: HTTP parsing, keep-alive, limits on request size and bad
requests are hypercorn's (on h11); this app only routes `GET` and `HEAD`:

    /health    200 while the agent's HA loop is alive and recent
    /active    200 only on the leaseholder with its daemon ready and gate open
    /standby   200 only on a caught-up standby named in the sync record;
               ?max_lag=1048576 (bytes) or ?max_lag=5s / 500ms
    /status    JSON report (200 while the loop is alive, else 503)
    /metrics   Prometheus exposition of `registry`

Role endpoints answer 200 or 503, with the reason as a line of text, so a
load balancer routes on the code alone. Other paths are 404, other methods
405: nothing on this port changes the node (switchover is a CLI command
that writes to etcd). Any failure inside a request is logged and answered
503, never raised into the server.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qs

from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import CollectorRegistry

from haproxy_ln.ha import Role
from haproxy_ln.health import rules
from haproxy_ln.health.collect import ReportSource

__all__ = ["HealthApp"]

log = logging.getLogger(__name__)

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

ROUTES = ("/health", "/active", "/standby", "/status", "/metrics")
TEXT = "text/plain; charset=utf-8"


class HealthApp:
    """ASGI 3 application over a `ReportSource` and a Prometheus registry."""

    def __init__(self, source: ReportSource, registry: CollectorRegistry) -> None:
        self.source = source
        self.registry = registry

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return  # websocket: hypercorn closes a connection the app did not accept
        try:
            code, content_type, body = await self._answer(scope)
        except Exception:
            log.exception("health request %s failed", scope.get("path"))
            code, content_type, body = 503, TEXT, b"internal error: see the agent's log\n"
        headers = [
            (b"content-type", content_type.encode()),
            (b"content-length", str(len(body)).encode()),
            (b"cache-control", b"no-store"),
        ]
        if code == 405:
            headers.append((b"allow", b"GET, HEAD"))
        await send({"type": "http.response.start", "status": code, "headers": headers})
        head = scope["method"] == "HEAD"
        await send({"type": "http.response.body", "body": b"" if head else body})

    async def _answer(self, scope: Scope) -> tuple[int, str, bytes]:
        path = scope["path"]
        if path not in ROUTES:
            return 404, TEXT, b"not found: try /health, /active, /standby, /status, /metrics\n"
        if scope["method"] not in ("GET", "HEAD"):
            return 405, TEXT, b"only GET and HEAD: this port changes nothing on the node\n"
        if path == "/metrics":
            await self.source.report()  # refresh the replication facts the collector reads
            accept = _header(scope, b"accept")
            encoder, content_type = choose_encoder(accept)
            return 200, content_type, encoder(self.registry)
        if path == "/status":
            report = await self.source.report()
            body = json.dumps(report.as_json(), indent=2, sort_keys=True).encode() + b"\n"
            return (200 if report.healthy else 503), "application/json", body
        if path == "/standby":
            try:
                limit = _max_lag(scope)
            except ValueError as e:
                # A broken check must not route traffic here: 503, saying why.
                return 503, TEXT, f"{e}\n".encode()
            report = self.source.report_now()
            if report.role is Role.STANDBY:  # only a standby's answer depends on the databases
                report = await self.source.report()
            verdict = rules.standby(report, limit)
        elif path == "/active":
            verdict = rules.active(await self.source.report(replication=False))
        else:
            verdict = rules.health(await self.source.report(replication=False))
        return verdict.code, TEXT, f"{verdict.reason}\n".encode()


def _max_lag(scope: Scope) -> rules.LagLimit | None:
    """`?max_lag=` of the request, None when absent. Raises ValueError when unusable."""
    query = scope.get("query_string", b"").decode("latin-1")
    values = parse_qs(query, keep_blank_values=True, max_num_fields=20).get("max_lag")
    if not values:
        return None
    if len(values) > 1:
        raise ValueError("max_lag is given more than once")
    return rules.parse_max_lag(values[0])


def _header(scope: Scope, name: bytes) -> str:
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return bytes(value).decode("latin-1")
    return ""


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return

"""The agent's health and metrics HTTP server: hypercorn serving `HealthApp` under trio.

How this works: `run_health` is a task for the agent's nursery
(`await nursery.start(run_health, ...)`): it builds the report source over
the HA shell and the proxy, registers the scrape-time collector with the
agent's Prometheus registry, binds `[health] listen` and reports the bound
URLs once it accepts connections. Cancelling the task stops the server,
unregisters the collector and closes the probe's database connections.

Why hypercorn: a maintained ASGI server that runs natively in a trio
nursery (`hypercorn.trio.serve`, with `task_status`), on h11 for HTTP/1.1
parsing, with bounded request heads, keep-alive timeouts and bad requests
answered by the server, not by us (docs/health.md).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, cast

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve
from hypercorn.typing import Framework
from prometheus_client.registry import CollectorRegistry

from haproxy_ln import metrics
from haproxy_ln.config import Config, HostPort
from haproxy_ln.errors import ListenError
from haproxy_ln.health.app import HealthApp
from haproxy_ln.health.collect import AgentSource
from haproxy_ln.health.metrics import AgentCollector
from haproxy_ln.health.store import StoreProbe

if TYPE_CHECKING:
    from haproxy_ln.agent.shell import HaShell
    from haproxy_ln.proxy.server import Proxy

__all__ = ["run_health", "serve_app"]

log = logging.getLogger(__name__)


def hypercorn_config(listen: HostPort) -> HypercornConfig:
    config = HypercornConfig()
    config.bind = [str(listen)]
    config.accesslog = None  # load balancers poll every second or so: no line per check
    config.errorlog = logging.getLogger("haproxy_ln.health.http")
    config.keep_alive_timeout = 10.0
    config.graceful_timeout = 1.0
    config.include_server_header = False
    return config


async def serve_app(
    app: HealthApp,
    listen: HostPort,
    *,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve `app` on `listen` until cancelled; reports the bound URLs.

    Raises ListenError if the address cannot be bound."""
    try:
        await serve(cast(Framework, app), hypercorn_config(listen), task_status=task_status)
    except* OSError as group:
        # Binding is the only OSError hypercorn lets out (serve_listeners retries accepts).
        raise ListenError(f"[health] listen {listen}: {group.exceptions[0]}") from None


async def run_health(
    config: Config,
    shell: HaShell,
    proxy: Proxy,
    *,
    registry: CollectorRegistry = metrics.REGISTRY,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """The agent's health server; see the module docstring."""
    probe = StoreProbe(config.replication)
    source = AgentSource(shell, proxy, probe)
    collector = AgentCollector(source)
    registry.register(collector)
    try:
        await serve_app(HealthApp(source, registry), config.health.listen, task_status=task_status)
    finally:
        registry.unregister(collector)
        await probe.close()

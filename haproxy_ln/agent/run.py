"""`haproxy-ln run`: one node's agent, every service in order, stopped cleanly.

How this works: services start in this order, each only once the one
before is up: the safety event log; key custody, which removes secrets a
killed agent left behind; the store bridge; etcd (`coord`); the gate,
closed; the proxy behind it; the daemon supervisor; the health and
metrics server (`[health] listen`); then the HA shell (its lease
keepalive, its etcd watch and its loop), the systemd watchdog and
READY=1. SIGTERM or SIGINT stops the node: gate closed, daemon stopped,
keys destroyed, replicator stopped, leader key released and lease revoked
(so the peer takes over at once instead of after the TTL), in that order.
"""

from __future__ import annotations

import logging
import signal
from functools import partial
from pathlib import Path

import trio

from haproxy_ln.agent.local import LocalStore
from haproxy_ln.agent.shell import HaShell
from haproxy_ln.config import Config
from haproxy_ln.coord import open_coord
from haproxy_ln.daemon.sdnotify import SystemdNotifier, run_watchdog
from haproxy_ln.daemon.supervisor import open_supervisor
from haproxy_ln.errors import CoordError, DaemonFailed, HaproxyLnError
from haproxy_ln.events import EventLog
from haproxy_ln.health.server import run_health
from haproxy_ln.keys import custody_from_config
from haproxy_ln.proxy.gate import Gate
from haproxy_ln.proxy.server import Proxy
from haproxy_ln.store import bridge

log = logging.getLogger(__name__)

STOP_GRACE = 30.0  # seconds the clean stop may take before the rest is abandoned


async def run_agent(config: Config) -> None:
    """Run this node's agent until SIGTERM or SIGINT. Raises HaproxyLnError if it cannot start."""
    node = config.node.name
    events = EventLog(Path(config.node.event_log), node)
    try:
        events.emit("agent.started")
    except OSError as e:
        raise HaproxyLnError(f"[node] event_log: cannot write {e.filename}: {e.strerror}") from None
    keys = custody_from_config(config.keys, events)
    keys.cleanup_at_start()
    notifier = SystemdNotifier.from_env()
    gate = Gate(is_open=False, reason="this node is not the active node yet")
    local = LocalStore(config.replication)
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with (
            bridge.open_bridge(),
            open_coord(config.etcd, node) as coord,
            trio.open_nursery() as nursery,
        ):
            proxy = Proxy(config.proxy, gate)
            await nursery.start(proxy.serve)
            async with open_supervisor(config.daemon, events) as daemon:
                shell = HaShell(config, coord, local, gate, daemon, keys, events, nursery, notifier)
                await nursery.start(run_health, config, shell, proxy)
                async with trio.open_nursery() as ha_tasks:
                    ha_tasks.start_soon(shell.keepalive)
                    ha_tasks.start_soon(shell.watch)
                    ha_tasks.start_soon(shell.run)
                    await nursery.start(
                        partial(run_watchdog, healthy=shell.healthy),
                        notifier,
                        config.ha.timing().keepalive_interval,
                    )
                    notifier.ready(f"node {node}: started")
                    async for signum in signals:
                        log.info("%s received: stopping", signal.Signals(signum).name)
                        break
                    notifier.stopping("stopping")
                    ha_tasks.cancel_scope.cancel()
                with trio.CancelScope(shield=True), trio.move_on_after(STOP_GRACE):
                    await _stop(shell)
            proxy.stop()
            await local.close()
            nursery.cancel_scope.cancel()
    events.emit("agent.stopped")


async def _stop(shell: HaShell) -> None:
    """Hand everything back, most dangerous first; each step is tried even if one fails."""
    shell.gate.close("haproxy-ln is stopping on this node")
    try:
        await shell.daemon.stop()
    except DaemonFailed as e:
        log.error("stopping the daemon: %s", e)
        await shell.daemon.kill("the graceful stop failed")
    try:
        await shell.keys.destroy()
    except (HaproxyLnError, OSError) as e:
        log.error("destroying the keys: %s", e)
    shell.stop_replicating()
    epoch, lease = shell.state.epoch, shell.lease
    try:
        if (
            epoch is not None
            and shell.view.leader is not None
            and shell.view.leader.node == shell.node
        ):
            await shell.coord.resign(epoch, None)
        if lease is not None:
            await shell.coord.revoke(lease)
            shell.events.emit("lease.revoked", lease=lease.id)
    except CoordError as e:
        log.warning("releasing leadership in etcd: %s (the peer waits for the TTL)", e)

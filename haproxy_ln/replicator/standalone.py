"""`haproxy-ln replicate`: the replicator alone, for tests, benchmarks and migrations.

How this works: bootstrap the primary, seed the replica if it is empty,
stream; once the replica has caught up, make the primary wait for it
(`synchronous_standby_names`), so from then on every acknowledged commit is
durable in the replica store. On SIGTERM or SIGINT in `sync` mode the
primary stops waiting before we leave (commits go on alone); in `strict`
mode it keeps waiting until a replicator comes back.
"""

from __future__ import annotations

import logging
import signal

import trio

from haproxy_ln.config import ReplicationConfig
from haproxy_ln.replicator.service import Replicator, targets
from haproxy_ln.store import bridge, primary
from haproxy_ln.store.copy import CopyProgress

log = logging.getLogger(__name__)


async def _wait_caught_up(replicator: Replicator) -> None:
    while not replicator.status.caught_up:
        await trio.sleep(0.02)


async def _set_sync(config: ReplicationConfig, *, enable: bool) -> None:
    source, _ = targets(config)
    conn = await bridge.connect(source, timeout=config.connect_timeout)
    try:
        if enable:
            await bridge.call(primary.set_sync, conn, config.sync_name)
            await bridge.call(primary.wait_sync_state, conn, config.sync_name, "sync", 30.0)
            log.info("synchronous: every commit now waits for the replica store")
        else:
            await bridge.call(primary.clear_sync, conn)
            log.warning("no longer synchronous: commits are acknowledged without the replica")
    finally:
        await bridge.close(conn)


async def run_replicate(config: ReplicationConfig, *, node: str, epoch: int) -> None:
    """Replicate until SIGTERM/SIGINT. Raises ReplicationError when it cannot start."""
    replicator = Replicator(config, node=node, epoch=epoch, progress=CopyProgress())
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with bridge.open_bridge(), trio.open_nursery() as nursery:
            await nursery.start(replicator.run)
            await _wait_caught_up(replicator)
            await _set_sync(config, enable=True)
            async for signum in signals:
                log.info("%s received: stopping", signal.Signals(signum).name)
                break
            if config.mode == "sync":
                with trio.CancelScope(shield=True):
                    await _set_sync(config, enable=False)
            nursery.cancel_scope.cancel()

"""`haproxy-ln replicate`, `reseed` and `log`: replication from the command line.

`replicate` runs the replicator alone, for tests, benchmarks and migrations.

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
from collections.abc import Callable

import trio

from haproxy_ln.config import ReplicationConfig
from haproxy_ln.errors import ReplicationError
from haproxy_ln.pgwire.dsn import PgTarget
from haproxy_ln.replicator.service import Replicator, targets
from haproxy_ln.replicator.walsender import WalSenderConnection
from haproxy_ln.store import bridge, primary, txlog
from haproxy_ln.store.copy import CopyProgress, initial_copy

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
            try:
                await bridge.call(primary.wait_sync_state, conn, config.sync_name, "sync", 60.0)
            except BaseException:
                # Do not leave the primary waiting for a replicator that is going away.
                with trio.CancelScope(shield=True):
                    await bridge.call(primary.clear_sync, conn)
                raise
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


async def run_reseed(config: ReplicationConfig, *, node: str, epoch: int) -> None:
    """Re-copy the replica store from the primary now. Raises ReplicationError."""
    source, replica = targets(config)
    async with bridge.open_bridge():
        wal = await WalSenderConnection.open(
            source, config.sync_name, timeout=config.connect_timeout
        )
        try:
            system = await wal.identify_system()
            store = await bridge.connect(replica, timeout=config.connect_timeout)
            try:
                await bridge.call(primary.ensure_store, store)
            finally:
                await bridge.close(store)
            await initial_copy(
                wal,
                source,
                replica,
                slot=config.slot,
                epoch=epoch,
                node=node,
                system_id=system.system_id,
                workers=config.copy_workers,
                progress=CopyProgress(),
            )
        finally:
            await wal.aclose()


async def print_log(
    store: PgTarget,
    *,
    since: str | None,
    until: str | None,
    table: str | None,
    limit: int,
    changes: bool,
    echo: Callable[[str], None],
) -> None:
    """Print the txlog of the replica store at `store`. Raises ReplicationError."""
    async with bridge.open_bridge():
        conn = await bridge.connect(store, timeout=10)
        try:
            records = await bridge.call(
                txlog.read, conn, since=since, until=until, table=table, limit=limit
            )
        except bridge.PostgresError as e:
            raise ReplicationError(f"cannot read the txlog: {e}") from None
        finally:
            await bridge.close(conn)
    for commit_time, record in records:
        for line in txlog.describe(commit_time, record, changes=changes):
            echo(line)

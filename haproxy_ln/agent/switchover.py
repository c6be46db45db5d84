"""`haproxy-ln switchover`: ask the active node to hand over, and wait until it has.

How this works: the request goes to etcd (`<prefix>/switchover`, naming the
current leader's epoch), where only that leader acts on it: it closes its
gate, waits until the replica has every commit, stops its daemon, destroys
its keys and deletes its leader key naming the successor, which takes over
at once (see docs/ha.md). This command only writes the request and watches
the leader key; it changes nothing on any node itself, so it needs etcd
credentials, not access to the nodes. A request that was not carried out in
time is withdrawn, so it cannot fire later by surprise.
"""

from __future__ import annotations

import logging
import time

import trio

from haproxy_ln.config import Config
from haproxy_ln.coord import open_coord
from haproxy_ln.errors import CoordError

log = logging.getLogger(__name__)


async def switchover(config: Config, target: str | None, timeout: float) -> str:
    """Hand over from the active node to `target` (None: its peer); returns a summary.

    Raises CoordError (no leader, refused, or not done within `timeout`
    seconds: the request is then withdrawn), CoordUnavailable.
    """
    async with open_coord(config.etcd, config.node.name) as coord:
        before = await coord.leader()
        if before is not None and before.node == target:
            raise CoordError(f"{target} is already the active node (epoch {before.epoch})")
        started = time.monotonic()
        request = await coord.request_switchover(target)
        old = before.node if before is not None else "?"
        log.info("asked %s (epoch %d) to hand over to %s", old, request.epoch, target or "its peer")
        leader = await coord.next_leader(request.epoch, timeout)
        if leader is not None:
            took = time.monotonic() - started
            return (
                f"switched over from {old} (epoch {request.epoch}) to {leader.node} "
                f"(epoch {leader.epoch}) in {took:.2f} s"
            )
        with trio.CancelScope(shield=True):
            await coord.drop_switchover(request)
        raise CoordError(
            f"{old} did not hand over within {timeout:g} s (the request is withdrawn): its log "
            "says why (a switchover waits until the replica has every commit)"
        )

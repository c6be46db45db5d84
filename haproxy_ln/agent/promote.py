"""`haproxy-ln promote --accept-data-loss`: the operator's override of invariant 2.

How this works: a standby promotes only if the sync record names it for the
epoch it replaces; otherwise it waits, since the old active may have
acknowledged commits its replica never got (it ran degraded, say). When that
active is gone for good, an operator can accept the loss: this command
writes `<prefix>/force`, naming this node and the newest epoch, but only
while no node holds the leader key and the sync record is as read. The
node's HA loop then promotes in place of that epoch only, so a request left
behind could never force a later promotion. The command waits until the
node leads, then deletes the request; a request not carried out in time is
withdrawn too, so it cannot fire later by surprise.
"""

from __future__ import annotations

import logging
import time

import trio

from haproxy_ln.config import Config
from haproxy_ln.coord import open_coord
from haproxy_ln.errors import CoordError

log = logging.getLogger(__name__)


async def force_promotion(config: Config, timeout: float) -> str:
    """Make this configuration's node take over; returns a summary.

    Raises CoordError (a node is active, nothing to force, or not done within
    `timeout` seconds: the request is then withdrawn), CoordUnavailable.
    """
    node = config.node.name
    async with open_coord(config.etcd, node) as coord:
        started = time.monotonic()
        request = await coord.force_promotion(node)
        log.warning("forcing %s to promote in place of epoch %d", node, request.epoch)
        leader = await coord.next_leader(request.epoch, timeout)
        if leader is not None:
            await coord.drop_force(request)  # done: it would never fire again anyway
            if leader.node != node:
                raise CoordError(f"{leader.node} took over (epoch {leader.epoch}) instead")
            took = time.monotonic() - started
            return (
                f"{node} took over in place of epoch {request.epoch}, as epoch "
                f"{leader.epoch}, in {took:.2f} s; writes the old active acknowledged "
                f"without {node}'s replica are lost"
            )
        with trio.CancelScope(shield=True):
            await coord.drop_force(request)
        raise CoordError(
            f"{node} did not take over within {timeout:g} s (the request is withdrawn): "
            "is its agent running? Its log says why"
        )

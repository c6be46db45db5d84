"""Noticing that the pair's keys changed: a watch, and a read that confirms.

How this works: `Coord.wait_change(after, timeout)` first watches the
pair's key range from revision `after + 1`. etcd replays every event since
then, so a change made before the watch started is seen too, and the wait
ends at the first event. If the history was compacted, etcd cancels the
watch: that counts as a change, as one may have been lost.

A watch alone cannot tell a quiet etcd from an unreachable one (a
partitioned connection just goes silent), so when the time is up
`changed_since` reads the range twice in one request, now and as it was at
revision `after`, and compares the keys' create and mod revisions. That
read is bounded like any request, so the wait ends in at most `timeout`
plus the request timeout, with an answer or `CoordUnavailable`.

Both functions run on the asyncio side of the bridge.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Any, cast

import grpc
import grpc.aio
from etcd3aio.kv import KVService

from haproxy_ln.coord.client import Member
from haproxy_ln.coord.model import Keys
from haproxy_ln.errors import CoordError


async def watch_for_event(member: Member, keys: Keys, after_revision: int) -> None:
    """Return at the first change to the pair's keys after `after_revision`.

    Runs until then: the caller bounds it. Raises CoordError if etcd cancels
    the watch for another reason than compaction; gRPC errors propagate.
    """
    stream = cast(
        AsyncGenerator[Any, None],
        member.watch.watch(keys.range_start, keys.range_end, start_revision=after_revision + 1),
    )
    try:
        async for answer in stream:
            if answer.compact_revision > 0 or answer.events:
                return
            if answer.canceled:
                raise CoordError(f"etcd cancelled the watch: {answer.cancel_reason or 'no reason'}")
    finally:
        await stream.aclose()


async def changed_since(member: Member, keys: Keys, after_revision: int, timeout: float) -> bool:
    """Whether any of the pair's keys differs now from how it was at `after_revision`.

    True too when that revision was compacted away (it may have changed).
    gRPC errors propagate.
    """
    try:
        answer = await member.kv.txn(
            [],  # no compare: the success branch, both reads, always runs
            [
                KVService.txn_op_get(keys.range_start, range_end=keys.range_end),
                KVService.txn_op_get(
                    keys.range_start, range_end=keys.range_end, revision=after_revision
                ),
            ],
            [],
            timeout=timeout,
        )
    except grpc.aio.AioRpcError as e:
        if e.code() == grpc.StatusCode.OUT_OF_RANGE:  # compacted (or a future revision)
            return True
        raise
    now, then = (
        {(bytes(kv.key), kv.create_revision, kv.mod_revision) for kv in op.response_range.kvs}
        for op in answer.responses
    )
    return now != then

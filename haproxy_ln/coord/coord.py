"""The HA loop's view of etcd: a lease, the leader key, the sync record, a watch.

How this works: `open_coord(config, node)` gives a `Coord` for this node.
Each method is one etcd request (a transaction where several keys must agree)
bounded by `[etcd] request_timeout` (see `client`), and raises
`CoordUnavailable` when etcd did not answer in time. Nothing runs in the
background: the caller decides when to renew the lease and can time each
renewal, which the one-signer rule (DESIGN invariant 1) needs.

The leader key is created only if absent and carries the holder's lease, so
it disappears when the holder stops renewing; its create revision is the
epoch, a fencing token that only grows. Every write that must come from the
leader (the sync record, resigning) is a transaction that first checks the
leader key still has that create revision, so a deposed leader's late write
changes nothing.

Every request can be tried again after a timeout whose outcome is unknown:
a campaign that did create the key finds it holding this node's name and
lease and returns its epoch; resign and write_sync check the epoch again.

A planned switchover (`resign` with a successor) deletes the leader key and
writes `<prefix>/successor` in the same transaction. The record has a lease
of its own that nobody renews, so it lasts `successor_ttl` seconds. While it
exists only the named node may take the leader key, and taking it deletes
the record; a successor that died cannot block the pair beyond that.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager, suppress
from dataclasses import dataclass
from typing import Any

import trio
import trio_asyncio
from etcd3aio.kv import KVService

from haproxy_ln.config import EtcdConfig
from haproxy_ln.coord.client import EtcdClient, Member, read_tls
from haproxy_ln.coord.model import (
    CoordView,
    ForceRequest,
    Keys,
    Leader,
    Lease,
    Successor,
    SwitchoverRequest,
    SyncRecord,
    decode_force,
    decode_leader,
    decode_successor,
    decode_switchover,
    decode_sync,
    encode_force,
    encode_successor,
    encode_switchover,
    encode_sync,
)
from haproxy_ln.coord.watch import changed_since, watch_for_event
from haproxy_ln.errors import CoordError, CoordUnavailable, LeaseLost
from haproxy_ln.store import bridge

__all__ = ["DEFAULT_SUCCESSOR_TTL", "Coord", "open_coord"]

DEFAULT_SUCCESSOR_TTL = 10
LEADER_POLL = 0.05  # seconds between reads of the leader key while waiting for a new one
"""Seconds a named successor has to take the leader key before anyone may."""

_txn = KVService.txn_compare_create_revision
_put = KVService.txn_op_put
_get = KVService.txn_op_get
_delete = KVService.txn_op_delete


@dataclass(frozen=True, slots=True)
class _Kv:
    """One key as etcd returned it."""

    key: bytes
    value: bytes
    create_revision: int
    mod_revision: int
    lease: int


def _kvs(range_response: Any) -> list[_Kv]:
    return [
        _Kv(bytes(kv.key), bytes(kv.value), kv.create_revision, kv.mod_revision, kv.lease)
        for kv in range_response.kvs
    ]


def _one(range_response: Any) -> _Kv | None:
    found = _kvs(range_response)
    return found[0] if found else None


class Coord:
    """This node's handle on the pair's keys in etcd; made by `open_coord`."""

    def __init__(self, client: EtcdClient, keys: Keys, node: str) -> None:
        self._client = client
        self._keys = keys
        self.node = node

    # --- the lease ----------------------------------------------------------------------------

    async def grant_lease(self, ttl: int) -> Lease:
        """A new lease of `ttl` whole seconds (etcd may grant more: see `Lease.ttl`).

        Raises ValueError for ttl < 1, CoordUnavailable, CoordError.
        """
        if ttl < 1:
            raise ValueError(f"a lease TTL is a whole number of seconds >= 1, not {ttl}")

        async def grant(member: Member, timeout: float) -> Any:
            return await member.lease.grant(ttl, timeout=timeout)

        answer = await self._client.request("lease grant", grant)
        if answer.error:
            raise CoordError(f"etcd refused a lease of {ttl} s: {answer.error}")
        return Lease(id=int(answer.ID), ttl=int(answer.TTL))

    async def keepalive(self, lease: Lease) -> float:
        """Renew `lease` once; returns the seconds it now has left (its TTL).

        The renewal counts from when etcd's leader received it, which is
        after the caller sent it: a deadline computed from the send time is
        never later than etcd's. Raises LeaseLost if the lease has expired or
        was revoked, CoordUnavailable, CoordError.
        """

        async def renew(member: Member, timeout: float) -> int | None:
            call = member.lease.keep_alive(lease.id)
            try:
                async for answer in call:
                    return int(answer.TTL)
                return None
            finally:
                call.cancel()

        ttl = await self._client.request("lease keepalive", renew)
        if ttl is None:
            raise CoordUnavailable("etcd closed the keepalive stream without an answer")
        if ttl <= 0:
            raise LeaseLost(f"lease {lease.id:x} has expired or was revoked")
        return float(ttl)

    async def revoke(self, lease: Lease) -> None:
        """Revoke `lease`, deleting the keys attached to it; a lease already gone is fine.

        Raises CoordUnavailable, CoordError.
        """

        async def revoke(member: Member, timeout: float) -> None:
            await member.lease.revoke(lease.id, timeout=timeout)

        with suppress(LeaseLost):
            await self._client.request("lease revoke", revoke)

    # --- the leader key -----------------------------------------------------------------------

    async def campaign(self, lease: Lease) -> int | None:
        """Take the leader key for this node on `lease`; returns the epoch, or None.

        None: another node holds the key, or a planned successor other than
        this node may still take it. Raises LeaseLost if `lease` is gone,
        CoordUnavailable, CoordError.
        """
        keys = self._keys

        async def take(member: Member, timeout: float) -> Any:
            return await member.kv.txn(
                [_txn(keys.leader, 0), _txn(keys.successor, 0)],
                [_put(keys.leader, self.node, lease=lease.id)],
                [_get(keys.leader), _get(keys.successor)],
                timeout=timeout,
            )

        answer = await self._client.request("campaign", take)
        if answer.succeeded:
            return int(answer.header.revision)
        held = _one(answer.responses[0].response_range)
        if held is not None:
            return self._own_epoch(held, lease)
        record = _one(answer.responses[1].response_range)
        if record is None:  # it expired between the compare and the read: next time
            return None
        if decode_successor(keys.successor, record.value).node != self.node:
            return None
        return await self._take_as_successor(lease, record.create_revision)

    async def _take_as_successor(self, lease: Lease, record_revision: int) -> int | None:
        """Take the leader key and delete the successor record naming this node.

        `record_revision`: the record's create revision, so that a record
        written since (naming another node) is not taken for this one.
        """
        keys = self._keys

        async def take(member: Member, timeout: float) -> Any:
            return await member.kv.txn(
                [
                    _txn(keys.leader, 0),
                    _txn(keys.successor, record_revision),
                ],
                [_put(keys.leader, self.node, lease=lease.id), _delete(keys.successor)],
                [_get(keys.leader)],
                timeout=timeout,
            )

        answer = await self._client.request("campaign as successor", take)
        if answer.succeeded:
            return int(answer.header.revision)
        held = _one(answer.responses[0].response_range)
        return None if held is None else self._own_epoch(held, lease)

    def _own_epoch(self, held: _Kv, lease: Lease) -> int | None:
        """The epoch of `held` if this node created it on `lease` (an earlier try did)."""
        if held.lease == lease.id and held.value == self.node.encode():
            return held.create_revision
        return None

    async def leader(self) -> Leader | None:
        """Who holds the leader key now, or None. Raises CoordUnavailable, CoordError."""
        keys = self._keys

        async def read(member: Member, timeout: float) -> Any:
            return await member.kv.get(keys.leader, timeout=timeout)

        held = _one(await self._client.request("read leader", read))
        return None if held is None else _leader(keys, held)

    async def next_leader(self, after_epoch: int, timeout: float) -> Leader | None:
        """The leader of an epoch above `after_epoch`, once there is one; None if there
        is none within `timeout` seconds. Polls. Raises CoordUnavailable, CoordError."""
        with trio.move_on_after(timeout):
            while True:
                leader = await self.leader()
                if leader is not None and leader.epoch > after_epoch:
                    return leader
                await trio.sleep(LEADER_POLL)
        return None

    async def resign(
        self, epoch: int, successor: str | None = None, successor_ttl: int = DEFAULT_SUCCESSOR_TTL
    ) -> bool:
        """Delete the leader key if its epoch is still `epoch`; False if it was not.

        With `successor`, also record that only that node may take the key,
        for `successor_ttl` seconds. Raises CoordUnavailable, CoordError.
        """
        keys = self._keys
        record_lease = None if successor is None else await self.grant_lease(successor_ttl)

        async def delete(member: Member, timeout: float) -> Any:
            writes = [_delete(keys.leader)]
            if successor is not None and record_lease is not None:
                record = encode_successor(Successor(node=successor, after_epoch=epoch))
                writes.append(_put(keys.successor, record, lease=record_lease.id))
            return await member.kv.txn([_txn(keys.leader, epoch)], writes, [], timeout=timeout)

        try:
            answer = await self._client.request("resign", delete)
        except BaseException:
            if record_lease is not None:
                with trio.CancelScope(shield=True):
                    await self._forget(record_lease)
            raise
        if not answer.succeeded and record_lease is not None:
            await self._forget(record_lease)
        return bool(answer.succeeded)

    async def _forget(self, lease: Lease) -> None:
        """Revoke a lease nothing may need any more; it expires anyway if etcd is away."""
        with suppress(CoordError):
            await self.revoke(lease)

    # --- the sync record ----------------------------------------------------------------------

    async def write_sync(self, epoch: int, node: str | None) -> bool:
        """Record that `node`'s replica (None: nobody's) holds every commit of `epoch`.

        Written only while this node holds the leader key at `epoch`; returns
        False, writing nothing, otherwise. Raises CoordUnavailable, CoordError.
        """
        keys = self._keys
        value = encode_sync(SyncRecord(epoch=epoch, node=node))

        async def write(member: Member, timeout: float) -> Any:
            return await member.kv.txn(
                [_txn(keys.leader, epoch), KVService.txn_compare_value(keys.leader, self.node)],
                [_put(keys.sync, value)],
                [],
                timeout=timeout,
            )

        return bool((await self._client.request("write sync record", write)).succeeded)

    async def read_sync(self) -> SyncRecord | None:
        """The sync record, or None if there is none. Raises CoordUnavailable, CoordError."""
        keys = self._keys

        async def read(member: Member, timeout: float) -> Any:
            return await member.kv.get(keys.sync, timeout=timeout)

        record = _one(await self._client.request("read sync record", read))
        return None if record is None else decode_sync(keys.sync, record.value)

    # --- planned switchover ---------------------------------------------------------------------

    async def request_switchover(self, target: str | None) -> SwitchoverRequest:
        """Ask the current leader to hand over to `target` (None: its peer).

        The request names the leader's epoch and is written only while that
        leader still holds the key, so a request never outlives the leader
        it was meant for. Raises CoordError when there is no leader (or it
        changed meanwhile), CoordUnavailable.
        """
        keys = self._keys
        leader = await self.leader()
        if leader is None:
            raise CoordError("no node is active: there is nothing to switch over")
        request = SwitchoverRequest(epoch=leader.epoch, target=target)

        async def write(member: Member, timeout: float) -> Any:
            return await member.kv.txn(
                [_txn(keys.leader, leader.epoch)],
                [_put(keys.switchover, encode_switchover(request))],
                [],
                timeout=timeout,
            )

        if not (await self._client.request("request switchover", write)).succeeded:
            raise CoordError(f"the leader of epoch {leader.epoch} changed meanwhile: try again")
        return request

    async def drop_switchover(self, request: SwitchoverRequest) -> bool:
        """Delete the switchover request if it still equals `request`.

        Raises CoordUnavailable, CoordError."""
        value = encode_switchover(request)
        return await self._delete_if(self._keys.switchover, value, "drop switchover request")

    async def _delete_if(self, key: bytes, value: bytes, operation: str) -> bool:
        """Delete `key` if its value is still `value`; whether it was."""

        async def delete(member: Member, timeout: float) -> Any:
            return await member.kv.txn(
                [KVService.txn_compare_value(key, value)], [_delete(key)], [], timeout=timeout
            )

        return bool((await self._client.request(operation, delete)).succeeded)

    # --- forced promotion -----------------------------------------------------------------------

    async def force_promotion(self, node: str) -> ForceRequest:
        """Let `node` promote in place of the newest epoch although the sync record does
        not name it: the operator accepts that commits acknowledged only by the old
        leader may be lost (invariant 2's override).

        Written only while no node leads and the sync record is as read, so it cannot
        override a leader that is alive, nor a record that changed meanwhile; the node
        honours it only for that epoch. Raises CoordError (a node leads; no sync
        record, so nothing to force; the keys changed meanwhile), CoordUnavailable.
        """
        keys = self._keys
        view = await self.view()
        if view.leader is not None:
            raise CoordError(
                f"{view.leader.node} is active (epoch {view.leader.epoch}): a forced promotion "
                "only replaces a leader that is gone (haproxy-ln switchover hands over "
                "without losing writes)"
            )
        record = view.sync
        if record is None:
            raise CoordError("there is no sync record: the first node to take the key leads")
        request = ForceRequest(node=node, epoch=record.epoch)

        async def write(member: Member, timeout: float) -> Any:
            return await member.kv.txn(
                [
                    _txn(keys.leader, 0),
                    KVService.txn_compare_value(keys.sync, encode_sync(record)),
                ],
                [_put(keys.force, encode_force(request))],
                [],
                timeout=timeout,
            )

        if not (await self._client.request("force promotion", write)).succeeded:
            raise CoordError("a node took the leader key or the sync record changed: try again")
        return request

    async def drop_force(self, request: ForceRequest) -> bool:
        """Delete the forced-promotion request if it still equals `request`.

        Raises CoordUnavailable, CoordError."""
        return await self._delete_if(
            self._keys.force, encode_force(request), "drop forced promotion"
        )

    # --- everything at once, and waiting for a change -----------------------------------------

    async def view(self) -> CoordView:
        """The pair's keys (leader, sync, successor, requests) as of one revision.

        Raises CoordUnavailable, CoordError (also for a value haproxy-ln
        could not have written).
        """
        keys = self._keys

        async def read(member: Member, timeout: float) -> Any:
            return await member.kv.get(keys.range_start, keys.range_end, timeout=timeout)

        answer = await self._client.request("read keys", read)
        found = {kv.key: kv for kv in _kvs(answer)}
        held, sync, record, request, force = (
            found.get(k)
            for k in (keys.leader, keys.sync, keys.successor, keys.switchover, keys.force)
        )
        return CoordView(
            leader=None if held is None else _leader(keys, held),
            sync=None if sync is None else decode_sync(keys.sync, sync.value),
            successor=None if record is None else decode_successor(keys.successor, record.value),
            revision=int(answer.header.revision),
            switchover=None
            if request is None
            else decode_switchover(keys.switchover, request.value),
            force=None if force is None else decode_force(keys.force, force.value),
        )

    async def wait_change(self, after_revision: int, timeout: float) -> bool:
        """Wait up to `timeout` s for any of the pair's keys to change after `after_revision`.

        Returns True as soon as one has (or may have: its history was
        compacted), False when `timeout` passed and etcd confirms nothing
        changed. Takes at most `timeout` plus the request timeout. Raises
        CoordUnavailable when etcd cannot confirm, CoordError.
        """
        keys = self._keys
        with trio.move_on_after(timeout):
            try:
                await self._client.stream(
                    "watch", lambda member: watch_for_event(member, keys, after_revision)
                )
                return True
            except CoordUnavailable:
                # The stream broke (etcd restarting, or a connection reset): the
                # read below, bounded and failing over, decides. Waiting out the
                # timeout first keeps a caller that loops from spinning.
                await trio.sleep_forever()
        return await self._client.request(
            "read changes", lambda member, t: changed_since(member, keys, after_revision, t)
        )


def _leader(keys: Keys, held: _Kv) -> Leader:
    return decode_leader(keys.leader, held.value, held.create_revision, held.lease)


@asynccontextmanager
async def open_coord(config: EtcdConfig, node: str) -> AsyncIterator[Coord]:
    """A `Coord` for `node` on the cluster `config` names, until the block ends.

    Connects lazily: etcd being down now is reported by the first request.
    Uses the enclosing trio-asyncio bridge (`store.bridge.open_bridge`) or
    opens one: gRPC's asyncio support must not run in two loops at once.
    (A bridge opened here is a nursery, so an exception leaving the block
    then arrives wrapped in an ExceptionGroup.) Raises CoordError if a
    configured TLS file cannot be read.
    """
    tls = await read_tls(config)
    async with AsyncExitStack() as stack:
        if trio_asyncio.current_loop.get() is None:
            await stack.enter_async_context(bridge.open_bridge())
        client = EtcdClient(config, tls)
        stack.push_async_callback(client.aclose)
        yield Coord(client, Keys(config.prefix), node)

"""What haproxy-ln keeps in etcd, as values: the key layout and the records.

How this works: a pair's keys all live under one prefix (`[etcd] prefix`),
so one range read or one watch covers them:

    <prefix>/leader     plain text, the active node's name, attached to its
                        lease; its create revision is the epoch
    <prefix>/sync       JSON {"epoch": E, "node": "b" | null}, no lease: the
                        node whose replica holds every acknowledged commit of
                        epoch E, or none; it must outlive the leader's lease
    <prefix>/successor  JSON {"node": "b", "after_epoch": E}, on a short lease
                        of its own: written by a planned resign, it lets only
                        "b" take the leader key next, until it expires

This module is pure: it encodes and decodes values and raises `CoordError`
for a value haproxy-ln could not have written. No I/O, no clock.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from haproxy_ln.errors import CoordError

__all__ = [
    "CoordView",
    "ForceRequest",
    "Keys",
    "Leader",
    "Lease",
    "Successor",
    "SwitchoverRequest",
    "SyncRecord",
    "decode_force",
    "decode_leader",
    "decode_successor",
    "decode_switchover",
    "decode_sync",
    "encode_force",
    "encode_successor",
    "encode_switchover",
    "encode_sync",
]


@dataclass(frozen=True, slots=True)
class Keys:
    """The etcd keys of one pair, under `prefix` (validated by `EtcdConfig`)."""

    prefix: str

    @property
    def leader(self) -> bytes:
        return f"{self.prefix}/leader".encode()

    @property
    def sync(self) -> bytes:
        return f"{self.prefix}/sync".encode()

    @property
    def successor(self) -> bytes:
        return f"{self.prefix}/successor".encode()

    @property
    def switchover(self) -> bytes:
        return f"{self.prefix}/switchover".encode()

    @property
    def force(self) -> bytes:
        return f"{self.prefix}/force".encode()

    @property
    def range_start(self) -> bytes:
        """First key of the pair's range: every key under `<prefix>/`."""
        return f"{self.prefix}/".encode()

    @property
    def range_end(self) -> bytes:
        """End (exclusive) of the pair's range: `<prefix>0`, as "0" follows "/"."""
        return f"{self.prefix}0".encode()


@dataclass(frozen=True, slots=True)
class Lease:
    """An etcd lease: `ttl` is what etcd granted, which may exceed what was asked."""

    id: int
    ttl: int


@dataclass(frozen=True, slots=True)
class Leader:
    """Who holds the leader key: `epoch` is its create revision."""

    node: str
    epoch: int
    lease_id: int


@dataclass(frozen=True, slots=True)
class SyncRecord:
    """Whose replica holds every acknowledged commit of `epoch`; `node` None: nobody's."""

    epoch: int
    node: str | None


@dataclass(frozen=True, slots=True)
class Successor:
    """A planned handover: only `node` may take the leader key after `after_epoch`."""

    node: str
    after_epoch: int


@dataclass(frozen=True, slots=True)
class SwitchoverRequest:
    """An operator asked the leader of `epoch` to hand over to `target` (None: the peer)."""

    epoch: int
    target: str | None


@dataclass(frozen=True, slots=True)
class ForceRequest:
    """An operator forced `node` to promote in place of the leader of `epoch`,
    accepting that commits acknowledged only by that leader may be lost."""

    node: str
    epoch: int


@dataclass(frozen=True, slots=True)
class CoordView:
    """All of the pair's keys as of one etcd `revision` (read in one transaction)."""

    leader: Leader | None
    sync: SyncRecord | None
    successor: Successor | None
    revision: int
    switchover: SwitchoverRequest | None = None
    force: ForceRequest | None = None


def encode_sync(record: SyncRecord) -> bytes:
    return json.dumps({"epoch": record.epoch, "node": record.node}, sort_keys=True).encode()


def encode_successor(successor: Successor) -> bytes:
    return json.dumps(
        {"after_epoch": successor.after_epoch, "node": successor.node}, sort_keys=True
    ).encode()


def encode_switchover(request: SwitchoverRequest) -> bytes:
    return json.dumps({"epoch": request.epoch, "target": request.target}, sort_keys=True).encode()


def encode_force(request: ForceRequest) -> bytes:
    return json.dumps(
        {"node": request.node, "epoch": request.epoch, "accept_data_loss": True}, sort_keys=True
    ).encode()


def _object(key: bytes, value: bytes, fields: set[str]) -> dict[str, object]:
    """`value` as a JSON object with exactly `fields`; raises CoordError naming the key."""
    try:
        data = json.loads(value)
    except (ValueError, UnicodeDecodeError):
        raise _foreign(key, value, "is not JSON") from None
    if not isinstance(data, dict) or set(data) != fields:
        raise _foreign(key, value, f"is not an object with the keys {', '.join(sorted(fields))}")
    return data


def _epoch(key: bytes, value: bytes, data: dict[str, object], name: str) -> int:
    epoch = data[name]
    # bool is an int to isinstance, but never an epoch
    if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 1:
        raise _foreign(key, value, f"has no revision as {name}")
    return epoch


def _node(key: bytes, value: bytes, data: dict[str, object]) -> str:
    node = data["node"]
    if not isinstance(node, str) or not node:
        raise _foreign(key, value, "has no node name")
    return node


def _foreign(key: bytes, value: bytes, problem: str) -> CoordError:
    """Nothing but haproxy-ln should write under its prefix: say which key holds what."""
    return CoordError(f"etcd key {key.decode(errors='replace')} {problem}: {value[:200]!r}")


def decode_sync(key: bytes, value: bytes) -> SyncRecord:
    """Parse a sync record; raises CoordError if haproxy-ln could not have written it."""
    data = _object(key, value, {"epoch", "node"})
    node = None if data["node"] is None else _node(key, value, data)
    return SyncRecord(epoch=_epoch(key, value, data, "epoch"), node=node)


def decode_successor(key: bytes, value: bytes) -> Successor:
    """Parse a successor record; raises CoordError if haproxy-ln could not have written it."""
    data = _object(key, value, {"after_epoch", "node"})
    return Successor(
        node=_node(key, value, data), after_epoch=_epoch(key, value, data, "after_epoch")
    )


def decode_switchover(key: bytes, value: bytes) -> SwitchoverRequest:
    """Parse a switchover request; raises CoordError if haproxy-ln could not have written it."""
    data = _object(key, value, {"epoch", "target"})
    target = data["target"]
    if target is not None and (not isinstance(target, str) or not target):
        raise _foreign(key, value, "has no node name as target")
    return SwitchoverRequest(epoch=_epoch(key, value, data, "epoch"), target=target)


def decode_force(key: bytes, value: bytes) -> ForceRequest:
    """Parse a forced-promotion request; raises CoordError if haproxy-ln could not have
    written it (the data-loss flag is part of the record, and must be true)."""
    data = _object(key, value, {"node", "epoch", "accept_data_loss"})
    if data["accept_data_loss"] is not True:
        raise _foreign(key, value, "does not accept data loss")
    return ForceRequest(node=_node(key, value, data), epoch=_epoch(key, value, data, "epoch"))


def decode_leader(key: bytes, value: bytes, create_revision: int, lease_id: int) -> Leader:
    """The leader key's value as a `Leader`; raises CoordError if it is not a node name."""
    try:
        node = value.decode()
    except UnicodeDecodeError:
        node = ""
    if not node:
        raise _foreign(key, value, "holds no node name")
    return Leader(node=node, epoch=create_revision, lease_id=lease_id)

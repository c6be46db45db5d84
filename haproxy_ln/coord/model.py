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
    "Keys",
    "Leader",
    "Lease",
    "Successor",
    "SyncRecord",
    "decode_successor",
    "decode_sync",
    "encode_successor",
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
class CoordView:
    """All of the pair's keys as of one etcd `revision` (read in one transaction)."""

    leader: Leader | None
    sync: SyncRecord | None
    successor: Successor | None
    revision: int


def encode_sync(record: SyncRecord) -> bytes:
    return json.dumps({"epoch": record.epoch, "node": record.node}, sort_keys=True).encode()


def encode_successor(successor: Successor) -> bytes:
    return json.dumps(
        {"after_epoch": successor.after_epoch, "node": successor.node}, sort_keys=True
    ).encode()


def _object(key: bytes, value: bytes, fields: dict[str, tuple[type, ...]]) -> dict[str, object]:
    """`value` as a JSON object with exactly `fields`, each of one of its types.

    Raises CoordError naming the key, as nothing but haproxy-ln should write it.
    """
    problem = None
    try:
        data = json.loads(value)
    except (ValueError, UnicodeDecodeError):
        problem = "is not JSON"
    else:
        if not isinstance(data, dict) or set(data) != set(fields):
            problem = f"is not a JSON object with exactly the keys {', '.join(sorted(fields))}"
        else:
            for name, types in fields.items():
                # bool is an int to isinstance, but never a valid epoch
                if isinstance(data[name], bool) or not isinstance(data[name], types):
                    problem = f"has a {name} of the wrong type"
                    break
    if problem is not None:
        raise CoordError(f"etcd key {key.decode(errors='replace')} {problem}: {value[:200]!r}")
    return data  # type: ignore[no-any-return]


def decode_sync(key: bytes, value: bytes) -> SyncRecord:
    """Parse a sync record; raises CoordError if haproxy-ln could not have written it."""
    data = _object(key, value, {"epoch": (int,), "node": (str, type(None))})
    return SyncRecord(epoch=data["epoch"], node=data["node"])  # type: ignore[arg-type]


def decode_successor(key: bytes, value: bytes) -> Successor:
    """Parse a successor record; raises CoordError if haproxy-ln could not have written it."""
    data = _object(key, value, {"after_epoch": (int,), "node": (str,)})
    return Successor(node=data["node"], after_epoch=data["after_epoch"])  # type: ignore[arg-type]


def decode_leader(key: bytes, value: bytes, create_revision: int, lease_id: int) -> Leader:
    """The leader key's value as a `Leader`; raises CoordError if it is not a node name."""
    try:
        node = value.decode()
    except UnicodeDecodeError:
        node = ""
    if not node:
        raise CoordError(f"etcd key {key.decode(errors='replace')} holds no node name: {value!r}")
    return Leader(node=node, epoch=create_revision, lease_id=lease_id)

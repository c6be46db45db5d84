"""The actions `step` asks the shell to carry out, as data.

How this works: each action is a frozen dataclass naming one idempotent
operation. The shell runs the actions of one decision in order, each to its
end, and runs the rest even if one fails (no action in a decision depends on
another in the same decision; a step that depends on an earlier one is only
decided once a snapshot shows the earlier one's outcome). Each action's
docstring says what to do and which snapshot fact shows that it is done.

etcd writes (`ETCD_WRITES`) must be transactions guarded as documented, so a
node that lost leadership between reading and writing changes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # model.py imports this module at run time
    from haproxy_ln.ha.model import SwitchoverRequest

__all__ = [
    "ETCD_WRITES",
    "AcquireLeader",
    "Action",
    "CloseGate",
    "DestroyKeys",
    "DropSwitchoverRequest",
    "HandOver",
    "KillDaemon",
    "MaterializeKeys",
    "OpenGate",
    "PreparePrimary",
    "RaiseFence",
    "Resign",
    "RevokeLease",
    "SetSyncStandby",
    "StartDaemon",
    "StartReplicating",
    "StopDaemon",
    "StopReplicating",
    "WriteSyncRecord",
]


@dataclass(frozen=True, slots=True)
class AcquireLeader:
    """Create `<prefix>/leader` = this node's name under `lease`, only if absent
    (Txn: create_revision == 0). Done: `leader` is ours; its create revision is the epoch."""

    lease: int


@dataclass(frozen=True, slots=True)
class RaiseFence:
    """Raise the local store's fence to `epoch` with this node as writer (check_fence).
    Done: `store_fence.epoch >= epoch`. A fence already above `epoch` shows up as such."""

    epoch: int


@dataclass(frozen=True, slots=True)
class WriteSyncRecord:
    """Put `<prefix>/sync` = (epoch, node), in a Txn guarded on the leader key's create
    revision == `epoch` (only the leader of `epoch` writes it). Done: `sync_record` equals it."""

    epoch: int
    node: str | None


@dataclass(frozen=True, slots=True)
class PreparePrimary:
    """Make the local PostgreSQL the primary of `epoch`: move every sequence past the
    largest value in its column, then bootstrap (schema, publication, DDL event trigger,
    replication slot). Done: `primary_epoch == epoch`."""

    epoch: int


@dataclass(frozen=True, slots=True)
class SetSyncStandby:
    """Put the replicator in `synchronous_standby_names` (enabled) or remove it, with
    ALTER SYSTEM and a reload. Done: `sync_standby_names_set == enabled`."""

    enabled: bool


@dataclass(frozen=True, slots=True)
class StartReplicating:
    """Run the replicator (local primary -> peer's store) writing with `epoch`.
    Done: `replication` is not None and `replication.epoch == epoch`."""

    epoch: int


@dataclass(frozen=True, slots=True)
class StopReplicating:
    """Stop the replicator. Done: `replication is None`."""


@dataclass(frozen=True, slots=True)
class OpenGate:
    """Admit clients at the proxy. Done: `gate_open`."""


@dataclass(frozen=True, slots=True)
class CloseGate:
    """Turn new clients away and terminate admitted ones, saying `reason` and, when
    known, the `leader` to use instead. Done: `not gate_open`."""

    reason: str
    leader: str | None


@dataclass(frozen=True, slots=True)
class MaterializeKeys:
    """Decrypt the daemon's secrets onto the runtime directory. Done: `keys_present`."""


@dataclass(frozen=True, slots=True)
class DestroyKeys:
    """Remove (shred) the daemon's secrets. Done: `not keys_present`."""


@dataclass(frozen=True, slots=True)
class StartDaemon:
    """Start the Lightning daemon (it reaches its database through the open gate).
    Done: `daemon` is STARTING, then READY (or FAILED)."""


@dataclass(frozen=True, slots=True)
class StopDaemon:
    """Stop the daemon gracefully (planned switchover). Done: `daemon` STOPPED."""


@dataclass(frozen=True, slots=True)
class KillDaemon:
    """Kill the daemon at once (SIGKILL, no grace: it may sign nothing more).
    Done: `daemon` STOPPED."""


@dataclass(frozen=True, slots=True)
class HandOver:
    """Planned switchover, one Txn guarded on the leader key's create revision ==
    `epoch`: delete the leader key and put `<prefix>/successor` = (successor, epoch)
    under a short lease of its own that nobody renews, so it lapses if the successor
    does not take over. Done: `leader` is no longer ours."""

    successor: str
    epoch: int


@dataclass(frozen=True, slots=True)
class Resign:
    """Delete the leader key, guarded on its create revision == `epoch`.
    Done: `leader` is no longer ours."""

    epoch: int


@dataclass(frozen=True, slots=True)
class RevokeLease:
    """Revoke `lease` (deleting every key attached to it), then grant a new one.
    Done: `snapshot.lease != lease`."""

    lease: int


@dataclass(frozen=True, slots=True)
class DropSwitchoverRequest:
    """Delete the switchover request if it still equals `request`; log `reason`.
    Done: `switchover` differs from `request`."""

    request: SwitchoverRequest
    reason: str


Action = (
    AcquireLeader
    | RaiseFence
    | WriteSyncRecord
    | PreparePrimary
    | SetSyncStandby
    | StartReplicating
    | StopReplicating
    | OpenGate
    | CloseGate
    | MaterializeKeys
    | DestroyKeys
    | StartDaemon
    | StopDaemon
    | KillDaemon
    | HandOver
    | Resign
    | RevokeLease
    | DropSwitchoverRequest
)

ETCD_WRITES: tuple[type[Action], ...] = (
    AcquireLeader,
    WriteSyncRecord,
    HandOver,
    Resign,
    RevokeLease,
    DropSwitchoverRequest,
)

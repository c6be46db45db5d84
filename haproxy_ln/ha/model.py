"""What the HA state machine reads and returns: roles, timing, the snapshot, state, decision.

How this works: the shell observes the world (etcd, the local PostgreSQL, the
daemon supervisor, key custody, the gate, the replicator) into one immutable
`Snapshot` of facts, on the monotonic clock. `step` (machine.py) turns the
previous `HaState`, that snapshot and `now` into a `Decision`: the next state,
the actions to carry out (actions.py), a stable human-readable reason, and the
monotonic time by which `step` must run again. Nothing here does I/O or reads
a clock; every time is a plain float of monotonic seconds given by the shell.

Every action's outcome must show up as a fact in a later snapshot (e.g.
`RaiseFence(12)` as `store_fence.epoch == 12`), so an action that failed or
was cut short is simply decided again by the next step.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from haproxy_ln.ha.actions import Action

__all__ = [
    "DaemonState",
    "Decision",
    "Fence",
    "ForcePromotion",
    "HaState",
    "LeaderKey",
    "ReplicaFacts",
    "Role",
    "Snapshot",
    "Successor",
    "SwitchoverRequest",
    "SyncMode",
    "SyncRecord",
    "SyncState",
    "Timing",
]


class Role(enum.Enum):
    """What this node is doing in the pair."""

    STARTING = "starting"  # just started: make sure nothing runs, then standby
    STANDBY = "standby"  # holds nothing; follows the leader or waits to promote
    CANDIDATE = "candidate"  # acquiring the leader key or taking over in order
    ACTIVE = "active"  # leads: keys, daemon, gate open (kept so while the lease holds)
    FENCED = "fenced"  # lost or could not renew leadership: tears everything down
    DEMOTING = "demoting"  # planned switchover: handing over to a named successor


LEADER_ROLES = frozenset({Role.CANDIDATE, Role.ACTIVE, Role.DEMOTING})


class SyncMode(enum.Enum):
    """`[replication].mode`: what the active does when its replica is lost."""

    SYNC = "sync"  # after degrade_after, clear the sync record and run on alone
    STRICT = "strict"  # never degrade: commits wait for the replica however long


class DaemonState(enum.Enum):
    """The Lightning daemon as its supervisor sees it."""

    STOPPED = "stopped"  # no process
    STARTING = "starting"  # process running, not ready yet
    READY = "ready"  # process running and ready
    FAILED = "failed"  # exited on its own or never became ready; no process runs

    @property
    def running(self) -> bool:
        return self in (DaemonState.STARTING, DaemonState.READY)


class SyncState(enum.Enum):
    """`pg_stat_replication.sync_state` of the replicator's walsender on the local primary."""

    ASYNC = "async"
    POTENTIAL = "potential"
    SYNC = "sync"
    QUORUM = "quorum"


@dataclass(frozen=True, slots=True)
class Timing:
    """The lease and degrade timing `step` follows, in seconds (from `[ha]`).

    Raises ValueError on construction if the values cannot be safe (the
    config validates the same rules with messages for operators).
    """

    lease_ttl: float
    keepalive_interval: float
    safety_margin: float
    degrade_after: float
    primary_lost_after: float = 5.0  # local PostgreSQL unreachable this long: give up leading

    def __post_init__(self) -> None:
        if not (self.lease_ttl > 0 and self.safety_margin > 0 and self.keepalive_interval > 0):
            raise ValueError("lease_ttl, keepalive_interval and safety_margin must be > 0")
        if not self.safety_margin < self.lease_ttl - self.keepalive_interval:  # as config.py
            raise ValueError("keepalive_interval must be < lease_ttl - safety_margin")
        if not (self.degrade_after > 0 and self.primary_lost_after > 0):
            raise ValueError("degrade_after and primary_lost_after must be > 0")

    def lease_deadline(self, keepalive_sent: float) -> float:
        """When a node whose last acknowledged keepalive was sent at `keepalive_sent`
        must have fenced itself: before etcd, which counts the TTL from when it
        received that keepalive (later), can expire the lease."""
        return keepalive_sent + self.lease_ttl - self.safety_margin


@dataclass(frozen=True, slots=True)
class LeaderKey:
    """`<prefix>/leader` as read from etcd."""

    node: str  # the value: the holder's node name
    epoch: int  # the key's create revision: the fencing token
    lease: int  # the etcd lease the key is attached to


@dataclass(frozen=True, slots=True)
class SyncRecord:
    """`<prefix>/sync`: the node whose replica holds every acknowledged commit of `epoch`."""

    epoch: int
    node: str | None  # None: nobody (the leader of `epoch` runs alone, or has just begun)


@dataclass(frozen=True, slots=True)
class Successor:
    """`<prefix>/successor`: the leader of `after_epoch` handed over to `node` (switchover)."""

    node: str
    after_epoch: int


@dataclass(frozen=True, slots=True)
class Fence:
    """The local store's `haproxy_ln.fence` row: no writer below `epoch` may write here."""

    epoch: int
    node: str  # who raised it: this node when it took over, else the leader replicating here


@dataclass(frozen=True, slots=True)
class ReplicaFacts:
    """This node's replicator (local primary -> peer's store), while it runs."""

    epoch: int  # the epoch it writes with
    unreachable_since: float | None  # since when it cannot reach the peer's store; None: reaches it
    caught_up: (
        bool  # the peer's store has everything up to the local WAL end read for this snapshot
    )
    sync_state: SyncState | None  # its walsender's pg_stat_replication.sync_state; None: no row

    @property
    def reachable(self) -> bool:
        return self.unreachable_since is None


@dataclass(frozen=True, slots=True)
class SwitchoverRequest:
    """An operator's request that the leader of `epoch` hand over to `target` (None: the peer)."""

    epoch: int
    target: str | None


@dataclass(frozen=True, slots=True)
class ForcePromotion:
    """An operator's request that this node promote although invariant 2 forbids it.

    Honoured only with `accept_data_loss` and only to replace `epoch` (the newest epoch
    this node knows of), so a request left behind never forces a later promotion.
    """

    epoch: int
    accept_data_loss: bool


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Facts the shell observed just before calling `step`. Times are monotonic seconds.

    etcd facts (`leader`, `sync_record`, `successor`, `switchover`) are the last values
    read; when `etcd_reachable` is False they may be stale.
    """

    node: str  # this node's name
    peer: str | None  # the other node of the pair; None: no replica configured
    etcd_reachable: bool  # the last etcd request answered
    lease: int | None  # this node's etcd lease id; None while the shell is granting one
    # When the shell SENT the last keepalive (or grant) of `lease` that etcd acknowledged.
    last_keepalive_sent: float | None
    leader: LeaderKey | None  # None: no leader key
    sync_record: SyncRecord | None  # None: never written (a brand-new pair)
    successor: Successor | None  # None: no handover pending
    store_fence: Fence | None  # None: the local store has no fence row yet
    primary_epoch: int | None  # epoch for which PreparePrimary last completed here
    replication: ReplicaFacts | None  # None: this node's replicator is not running
    sync_standby_names_set: bool  # the local PostgreSQL lists the replicator in it
    daemon: DaemonState
    keys_present: bool  # the daemon's secrets exist on the runtime directory
    gate_open: bool  # the gate admits clients (the HA open/close, not replicator holds)
    switchover: SwitchoverRequest | None = None
    force_promotion: ForcePromotion | None = None
    # Since when the local PostgreSQL cannot be reached; None: it answers.
    store_unreachable_since: float | None = None

    @property
    def holds_anything(self) -> bool:
        """Whether anything that only a leader may have is present here."""
        return self.daemon.running or self.keys_present or self.gate_open

    def owns(self, leader: LeaderKey | None) -> bool:
        """Whether `leader` is this node's key under its current lease."""
        return (
            leader is not None
            and self.lease is not None
            and leader.node == self.node
            and leader.lease == self.lease
        )


@dataclass(frozen=True, slots=True)
class HaState:
    """What `step` remembers between calls; `HaState()` is the state of a fresh agent."""

    role: Role = Role.STARTING
    epoch: int | None = None  # the epoch this node leads (or led, when fenced)
    highest_epoch: int = 0  # the highest leader epoch seen in any snapshot
    fence_cause: str | None = None  # why this node fenced itself (FENCED only)
    switchover: SwitchoverRequest | None = None  # the request being carried out (DEMOTING)
    successor: str | None = None  # whom it hands over to (DEMOTING)
    ignored_request: SwitchoverRequest | None = None  # refused or abandoned: not retried


@dataclass(frozen=True, slots=True)
class Decision:
    """What `step` decided: carry out `actions` in order, then step again by `wake_at`."""

    state: HaState
    actions: tuple[Action, ...]
    reason: str  # stable while nothing changes: log it when it differs from the last one
    wake_at: float  # monotonic time by which to call `step` again even if no fact changed

    @property
    def role(self) -> Role:
        return self.state.role

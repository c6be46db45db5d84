"""The leader's replication policy: keep the replicator running, degrade and re-enable.

How this works: once the local PostgreSQL is the primary of the leader's epoch
and the sync record belongs to that epoch, each step compares three facts,
the sync record, `synchronous_standby_names` and the replica's state, and
emits at most the one next move of each ordered sequence:

- degrade (mode "sync"): the replica unreachable for `degrade_after` -> FIRST
  write the sync record naming nobody, THEN (seen in a later snapshot) remove
  the replicator from synchronous_standby_names. In that order, whenever the
  record names the replica, PostgreSQL still waits for it (invariant 3).
- re-enable: replica caught up -> set synchronous_standby_names -> (seen)
  sync_state = sync -> THEN name the replica in the sync record.
- mode "strict": synchronous_standby_names is always set and never cleared.
"""

from __future__ import annotations

from dataclasses import dataclass

from haproxy_ln.ha.actions import (
    Action,
    SetSyncStandby,
    StartReplicating,
    StopReplicating,
    WriteSyncRecord,
)
from haproxy_ln.ha.model import ReplicaFacts, Snapshot, SyncMode, SyncState, Timing

__all__ = ["SyncStep", "replication_step"]


@dataclass(frozen=True, slots=True)
class SyncStep:
    """The replication part of a leader's decision."""

    actions: tuple[Action, ...]
    status: str  # a stable phrase, e.g. "synchronous with b"
    deadline: float | None  # when the policy must look again (the degrade deadline)


def _replicator(snapshot: Snapshot, epoch: int) -> tuple[list[Action], ReplicaFacts | None]:
    """Start, restart or stop the replicator; the facts of a replicator of `epoch`, if any."""
    facts = snapshot.replication
    if facts is not None and (facts.epoch != epoch or snapshot.peer is None):
        return [StopReplicating()], None  # started for another epoch, or no peer any more
    if facts is None and snapshot.peer is not None:
        return [StartReplicating(epoch)], None
    return [], facts


def _why_not_in_sync(peer: str, facts: ReplicaFacts | None) -> str:
    if facts is None:
        return f"replica {peer} not replicating yet"
    if not facts.reachable:
        return f"replica {peer} unreachable"
    if not facts.caught_up:
        return f"replica {peer} catching up"
    state = facts.sync_state.value if facts.sync_state else "absent"
    return f"replica {peer} sync_state is {state}, not sync"


def _strict(snapshot: Snapshot, epoch: int, peer: str, facts: ReplicaFacts | None) -> SyncStep:
    if not snapshot.sync_standby_names_set:
        return SyncStep((SetSyncStandby(True),), "strict: setting synchronous_standby_names", None)
    record = snapshot.sync_record
    if record is not None and record.node == peer:
        if facts is not None and not facts.reachable:
            return SyncStep((), f"strict: replica {peer} unreachable, commits wait for it", None)
        return SyncStep((), f"synchronous with {peer}", None)
    if facts is not None and facts.reachable and facts.sync_state is SyncState.SYNC:
        status = f"{peer} is synchronous: naming it in the sync record"
        return SyncStep((WriteSyncRecord(epoch, peer),), status, None)
    return SyncStep((), f"strict: commits wait ({_why_not_in_sync(peer, facts)})", None)


def _sync(
    snapshot: Snapshot,
    epoch: int,
    peer: str,
    facts: ReplicaFacts | None,
    now: float,
    timing: Timing,
) -> SyncStep:
    record = snapshot.sync_record
    names_peer = record is not None and record.node == peer
    ssn = snapshot.sync_standby_names_set
    if names_peer:
        if facts is not None and facts.unreachable_since is not None:
            since = facts.unreachable_since
            deadline = since + timing.degrade_after
            if now >= deadline:
                status = (
                    f"degrading: replica {peer} unreachable since {since:.3f}; "
                    "clearing the sync record first"
                )
                return SyncStep((WriteSyncRecord(epoch, None),), status, None)
            status = f"replica {peer} unreachable since {since:.3f}; degrading at {deadline:.3f}"
            return SyncStep((), status, deadline)
        if not ssn:  # someone cleared it: commits would not wait although the record says so
            status = f"sync record names {peer}: setting synchronous_standby_names again"
            return SyncStep((SetSyncStandby(True),), status, None)
        return SyncStep((), f"synchronous with {peer}", None)
    reachable = facts is not None and facts.reachable
    if ssn:
        if not reachable:
            status = (
                "degraded: removing the replicator from synchronous_standby_names "
                f"(sync record names no node, replica {peer} unreachable)"
            )
            return SyncStep((SetSyncStandby(False),), status, None)
        if facts is not None and facts.sync_state is SyncState.SYNC:
            status = f"re-enabling: {peer} is synchronous; naming it in the sync record"
            return SyncStep((WriteSyncRecord(epoch, peer),), status, None)
        return SyncStep((), f"re-enabling: {_why_not_in_sync(peer, facts)}", None)
    if facts is not None and facts.reachable and facts.caught_up:
        status = f"re-enabling: replica {peer} caught up; setting synchronous_standby_names"
        return SyncStep((SetSyncStandby(True),), status, None)
    return SyncStep((), f"degraded: running alone ({_why_not_in_sync(peer, facts)})", None)


def replication_step(
    snapshot: Snapshot, epoch: int, now: float, timing: Timing, mode: SyncMode
) -> SyncStep:
    """The replication moves for the leader of `epoch`. Raises nothing.

    Call only once `primary_epoch == epoch` and the sync record is for `epoch`.
    """
    actions, facts = _replicator(snapshot, epoch)
    peer = snapshot.peer
    if peer is None:
        if mode is SyncMode.STRICT:
            policy = _strict_alone(snapshot)
        elif snapshot.sync_standby_names_set:
            policy = SyncStep(
                (SetSyncStandby(False),), "no peer configured: clearing sync standby", None
            )
        else:
            policy = SyncStep((), "running alone: no peer configured", None)
    elif mode is SyncMode.STRICT:
        policy = _strict(snapshot, epoch, peer, facts)
    else:
        policy = _sync(snapshot, epoch, peer, facts, now, timing)
    return SyncStep((*actions, *policy.actions), policy.status, policy.deadline)


def _strict_alone(snapshot: Snapshot) -> SyncStep:
    if not snapshot.sync_standby_names_set:
        return SyncStep((SetSyncStandby(True),), "strict: setting synchronous_standby_names", None)
    return SyncStep((), "strict without a peer: commits wait for a replica", None)

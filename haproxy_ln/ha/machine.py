"""`step`: one HA decision from the previous state, a snapshot of facts and `now`.

How this works: one handler per role reads the snapshot and either decides
(actions, a reason, maybe a deadline) or hands over to another role's handler
within the same step (e.g. STARTING -> STANDBY -> CANDIDATE), so a role
change never waits for the next wake-up. Rules, in the order they are checked:

- A leader (CANDIDATE with the key, ACTIVE, DEMOTING) whose lease deadline
  (last keepalive sent + TTL - safety margin) has passed, whose leader key is
  gone or not its own, or whose store or sync record shows a newer epoch, is
  FENCED before anything else: kill the daemon, destroy keys, close the gate.
- A node that is not a leader never keeps anything only a leader may have.
- Taking over goes one fact at a time: key -> fence -> sync record for the
  new epoch -> primary prepared -> (strict: sync standby set) -> gate open ->
  keys -> daemon ready. Each step is decided only once the previous one's
  outcome is seen in a snapshot, so one decision never holds two dependent steps.

Time only enters through `now`; the decision's `wake_at` says when the next
rule can fire without any fact changing (the lease deadline, the degrade
deadline) or, failing that, one keepalive interval later.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from haproxy_ln.ha.actions import (
    ETCD_WRITES,
    AcquireLeader,
    Action,
    CloseGate,
    DestroyKeys,
    DropSwitchoverRequest,
    HandOver,
    KillDaemon,
    MaterializeKeys,
    OpenGate,
    PreparePrimary,
    RaiseFence,
    Resign,
    RevokeLease,
    SetSyncStandby,
    StartDaemon,
    StopDaemon,
    StopReplicating,
    WriteSyncRecord,
)
from haproxy_ln.ha.model import (
    LEADER_ROLES,
    DaemonState,
    Decision,
    HaState,
    Role,
    Snapshot,
    SwitchoverRequest,
    SyncMode,
    Timing,
)
from haproxy_ln.ha.promotion import may_promote
from haproxy_ln.ha.sync import replication_step

__all__ = ["step"]

# ACTIVE -> FENCED -> STANDBY -> CANDIDATE is the longest chain; more is a loop (a bug).
_MAX_HOPS = 6


@dataclass(frozen=True, slots=True)
class _Ctx:
    snap: Snapshot
    now: float
    timing: Timing
    mode: SyncMode

    @property
    def deadline(self) -> float | None:
        """The self-fence deadline of the current lease; None without an acknowledged one."""
        sent = self.snap.last_keepalive_sent
        if self.snap.lease is None or sent is None:
            return None
        return self.timing.lease_deadline(sent)

    @property
    def lease_valid(self) -> bool:
        deadline = self.deadline
        return deadline is not None and self.now < deadline

    @property
    def other_leader(self) -> str | None:
        leader = self.snap.leader
        return None if leader is None or self.snap.owns(leader) else leader.node


@dataclass(frozen=True, slots=True)
class _Result:
    state: HaState
    actions: tuple[Action, ...]
    reason: str
    deadline: float | None = None


@dataclass(frozen=True, slots=True)
class _Goto:
    """Continue with `state`'s handler in this same step, after `actions`."""

    state: HaState
    actions: tuple[Action, ...] = ()


def _teardown(ctx: _Ctx, reason: str) -> list[Action]:
    """Everything a non-leader must not keep, most dangerous first."""
    snap = ctx.snap
    actions: list[Action] = []
    if snap.daemon.running:
        actions.append(KillDaemon())
    if snap.keys_present:
        actions.append(DestroyKeys())
    if snap.gate_open:
        actions.append(CloseGate(reason, ctx.other_leader))
    if snap.replication is not None:
        actions.append(StopReplicating())
    return actions


def _lost_leadership(ctx: _Ctx, epoch: int) -> str | None:
    """Why the leader of `epoch` must fence itself now, or None."""
    snap, deadline = ctx.snap, ctx.deadline
    if deadline is None:
        return "lease lost"
    if ctx.now >= deadline:
        return (
            f"lease not renewed: deadline {deadline:.3f} passed "
            f"(last keepalive sent at {snap.last_keepalive_sent:.3f})"
        )
    leader = snap.leader
    if leader is None:
        return f"leader key of epoch {epoch} is gone"
    if not snap.owns(leader) or leader.epoch != epoch:
        return f"leader key is held by {leader.node} at epoch {leader.epoch}"
    if snap.store_fence is not None and snap.store_fence.epoch > epoch:
        fence = snap.store_fence
        return f"local store fenced at epoch {fence.epoch} by {fence.node}, above our {epoch}"
    if snap.sync_record is not None and snap.sync_record.epoch > epoch:
        return f"sync record is for epoch {snap.sync_record.epoch}, above our {epoch}"
    lost = _primary_lost_at(ctx)
    if lost is not None and ctx.now >= lost:
        # The daemon can do nothing without its database: hand leadership to the
        # standby, which may promote if the sync record names it.
        return (
            f"local PostgreSQL unreachable for {ctx.timing.primary_lost_after:g} s "
            f"(since {snap.store_unreachable_since:.3f})"
        )
    return None


def _primary_lost_at(ctx: _Ctx) -> float | None:
    """When a leader whose local PostgreSQL does not answer gives up; None: it answers."""
    since = ctx.snap.store_unreachable_since
    return None if since is None else since + ctx.timing.primary_lost_after


def _fence(state: HaState, cause: str) -> _Goto:
    return _Goto(
        HaState(
            role=Role.FENCED,
            epoch=state.epoch,
            highest_epoch=state.highest_epoch,
            fence_cause=cause,
            ignored_request=state.ignored_request,
        )
    )


def _standby_state(state: HaState) -> HaState:
    return HaState(
        role=Role.STANDBY,
        highest_epoch=state.highest_epoch,
        ignored_request=state.ignored_request,
    )


# --- roles without leadership ----------------------------------------------------------------


def _starting(ctx: _Ctx, state: HaState) -> _Result | _Goto:
    actions = _teardown(ctx, "starting")
    if ctx.snap.holds_anything:
        return _Result(state, tuple(actions), "starting: stopping what a previous run left")
    return _Goto(_standby_state(state), tuple(actions))


def _fenced(ctx: _Ctx, state: HaState) -> _Result | _Goto:
    snap = ctx.snap
    cause = state.fence_cause or "fenced"
    actions = _teardown(ctx, f"fenced: {cause}")
    if snap.holds_anything:
        return _Result(state, tuple(actions), f"self-fenced ({cause}): stopping everything")
    if not snap.etcd_reachable:
        return _Result(state, tuple(actions), f"fenced ({cause}): waiting for etcd")
    leader = snap.leader
    if leader is not None and snap.owns(leader):
        # Still our key: let it go now rather than make the peer wait out the TTL.
        # A lease whose keepalives went unanswered is spent: revoke it outright.
        if snap.lease is not None and not ctx.lease_valid:
            actions.append(RevokeLease(snap.lease))
            return _Result(state, tuple(actions), f"fenced ({cause}): revoking our lease")
        actions.append(Resign(leader.epoch))
        return _Result(state, tuple(actions), f"fenced ({cause}): resigning the leader key")
    return _Goto(_standby_state(state), tuple(actions))


def _standby(ctx: _Ctx, state: HaState) -> _Result | _Goto:
    snap = ctx.snap
    actions = _teardown(ctx, "standby")
    if snap.sync_standby_names_set:
        # This node's database is the replica store: writes to it must not wait.
        actions.append(SetSyncStandby(False))
    leader = snap.leader
    if snap.holds_anything:
        return _Result(state, tuple(actions), "standby: stopping what only a leader may run")
    if leader is not None and snap.owns(leader):
        actions.append(Resign(leader.epoch))
        return _Result(state, tuple(actions), "standby: releasing a leader key it does not lead")
    if leader is not None:
        if leader.node == snap.node:
            reason = f"waiting: this node's previous lease still holds epoch {leader.epoch}"
        else:
            reason = f"following {leader.node} at epoch {leader.epoch}"
        return _Result(state, tuple(actions), reason)
    if not snap.etcd_reachable:
        return _Result(state, tuple(actions), "waiting: etcd unreachable")
    if not ctx.lease_valid:
        return _Result(state, tuple(actions), "waiting: no valid lease yet")
    verdict = may_promote(snap, state.highest_epoch)
    if not verdict.allowed:
        return _Result(state, tuple(actions), verdict.reason)
    return _Goto(replace(state, role=Role.CANDIDATE, epoch=None), tuple(actions))


# --- taking over and leading -----------------------------------------------------------------


def _candidate(ctx: _Ctx, state: HaState) -> _Result | _Goto:
    snap = ctx.snap
    if state.epoch is not None:
        return _lead(ctx, state)
    leader = snap.leader
    if leader is not None and snap.owns(leader):
        return _lead(ctx, replace(state, epoch=leader.epoch))
    standby = _Goto(_standby_state(state))
    if leader is not None or not snap.etcd_reachable or not ctx.lease_valid:
        return standby
    if snap.holds_anything or snap.lease is None:
        return standby
    verdict = may_promote(snap, state.highest_epoch)
    if not verdict.allowed:
        return standby
    reason = f"promoting: {verdict.reason}; taking the leader key"
    return _Result(state, (AcquireLeader(snap.lease),), reason)


def _lead(ctx: _Ctx, state: HaState) -> _Result | _Goto:
    """CANDIDATE holding the key, or ACTIVE: the next missing step of taking over."""
    snap = ctx.snap
    epoch = state.epoch
    assert epoch is not None
    cause = _lost_leadership(ctx, epoch)
    if cause is not None:
        return _fence(state, cause)
    doing = "promoting" if state.role is Role.CANDIDATE else f"active at epoch {epoch}"
    lost = _primary_lost_at(ctx)
    if lost is not None:
        reason = f"{doing}: waiting for the local PostgreSQL, which does not answer"
        return _Result(state, (), reason, lost)
    if snap.store_fence is None or snap.store_fence.epoch < epoch:
        return _Result(state, (RaiseFence(epoch),), f"{doing}: raising the store fence to {epoch}")
    if snap.sync_record is None or snap.sync_record.epoch < epoch:
        reason = f"{doing}: recording epoch {epoch} in the sync record, naming no node yet"
        return _Result(state, (WriteSyncRecord(epoch, None),), reason)
    if snap.primary_epoch != epoch:
        reason = f"{doing}: moving sequences and bootstrapping the primary"
        return _Result(state, (PreparePrimary(epoch),), reason)
    sync = replication_step(snap, epoch, ctx.now, ctx.timing, ctx.mode)
    if ctx.mode is SyncMode.STRICT and not snap.sync_standby_names_set:
        return _Result(state, sync.actions, f"{doing}: {sync.status}", sync.deadline)
    step: Action | None = None
    if not snap.gate_open:
        step, what = OpenGate(), "opening the gate"
    elif not snap.keys_present:
        step, what = MaterializeKeys(), "materializing the keys"
    elif snap.daemon in (DaemonState.STOPPED, DaemonState.FAILED):
        step, what = StartDaemon(), f"starting the daemon ({snap.daemon.value})"
    elif snap.daemon is DaemonState.STARTING:
        what = "waiting for the daemon to be ready"
    else:
        state = replace(state, role=Role.ACTIVE)
        return _serve(ctx, state, sync.actions, sync.status, sync.deadline)
    actions = (step, *sync.actions) if step is not None else sync.actions
    return _Result(state, actions, f"{doing}: {what}", sync.deadline)


def _serve(
    ctx: _Ctx,
    state: HaState,
    actions: tuple[Action, ...],
    status: str,
    deadline: float | None,
) -> _Result | _Goto:
    """ACTIVE with everything running: watch for a switchover request."""
    epoch = state.epoch
    request = ctx.snap.switchover
    reason = f"active at epoch {epoch}; {status}"
    if request is None or request == state.ignored_request:
        return _Result(state, actions, reason, deadline)
    refusal = _switchover_refusal(ctx, state, request)
    if refusal is not None:
        drop = DropSwitchoverRequest(request, refusal)
        return _Result(replace(state, ignored_request=request), (*actions, drop), reason, deadline)
    successor = request.target or ctx.snap.peer
    return _Goto(replace(state, role=Role.DEMOTING, switchover=request, successor=successor))


def _switchover_refusal(ctx: _Ctx, state: HaState, request: SwitchoverRequest) -> str | None:
    snap = ctx.snap
    target = request.target or snap.peer
    if request.epoch != state.epoch:
        return f"switchover request is for epoch {request.epoch}, this node leads {state.epoch}"
    if target is None:
        return "switchover refused: no peer configured"
    if target != snap.peer:
        return f"switchover refused: {target} is not the peer ({snap.peer})"
    if snap.replication is None or not snap.replication.reachable:
        return f"switchover refused: replica {target} is unreachable"
    return None


def _demoting(ctx: _Ctx, state: HaState) -> _Result | _Goto:
    snap = ctx.snap
    epoch, successor, request = state.epoch, state.successor, state.switchover
    assert epoch is not None and successor is not None and request is not None
    if not snap.owns(snap.leader) and not snap.holds_anything:
        return _Goto(_standby_state(state))  # handed over (or lost, with nothing left)
    cause = _lost_leadership(ctx, epoch)
    if cause is not None:
        return _fence(state, cause)
    active = replace(state, role=Role.ACTIVE, switchover=None, successor=None)
    if snap.switchover != request:
        return _Goto(replace(active, ignored_request=request))  # cancelled
    facts = snap.replication
    give_up = None
    if facts is not None and facts.unreachable_since is not None:
        give_up = facts.unreachable_since + ctx.timing.degrade_after
        if ctx.now >= give_up:
            why = f"switchover to {successor} abandoned: replica unreachable"
            drop = DropSwitchoverRequest(request, why)
            return _Goto(replace(active, ignored_request=request), (drop,))
    sync = replication_step(snap, epoch, ctx.now, ctx.timing, ctx.mode)
    doing = f"switchover to {successor}"
    if snap.gate_open:
        close = CloseGate(f"switchover to {successor}", successor)
        return _Result(state, (close, *sync.actions), f"{doing}: closing the gate", give_up)
    record = snap.sync_record
    has_everything = (
        record is not None
        and record.node == successor
        and facts is not None
        and facts.reachable
        and facts.caught_up
    )
    if not has_everything:
        reason = f"{doing}: waiting for the replica to have everything ({sync.status})"
        return _Result(state, sync.actions, reason, give_up)
    if snap.daemon.running:
        return _Result(state, (StopDaemon(),), f"{doing}: stopping the daemon", give_up)
    if snap.keys_present:
        return _Result(state, (DestroyKeys(),), f"{doing}: destroying the keys", give_up)
    return _Result(state, (HandOver(successor, epoch),), f"{doing}: handing over", give_up)


_HANDLERS = {
    Role.STARTING: _starting,
    Role.STANDBY: _standby,
    Role.CANDIDATE: _candidate,
    Role.ACTIVE: _lead,
    Role.FENCED: _fenced,
    Role.DEMOTING: _demoting,
}


def step(
    state: HaState, snapshot: Snapshot, now: float, *, timing: Timing, mode: SyncMode
) -> Decision:
    """Decide what this node does now. Pure: no I/O, no clock but `now`.

    Raises RuntimeError only on a bug (roles handing over to each other in a loop).
    """
    ctx = _Ctx(snapshot, now, timing, mode)
    if snapshot.leader is not None:
        state = replace(state, highest_epoch=max(state.highest_epoch, snapshot.leader.epoch))
    actions: list[Action] = []
    for _ in range(_MAX_HOPS):
        outcome = _HANDLERS[state.role](ctx, state)
        actions.extend(outcome.actions)
        if isinstance(outcome, _Result):
            break
        state = outcome.state
    else:
        raise RuntimeError(f"HA roles handed over in a loop, ending at {state.role.value}")
    final, reason = outcome.state, outcome.reason
    if not snapshot.etcd_reachable and any(isinstance(a, ETCD_WRITES) for a in actions):
        # They could not succeed; the next step decides them again once etcd answers.
        actions = [a for a in actions if not isinstance(a, ETCD_WRITES)]
        reason = f"{reason} (etcd unreachable: not writing to it)"
    wake = [now + timing.keepalive_interval]
    if outcome.deadline is not None:
        wake.append(outcome.deadline)
    self_fence = ctx.deadline
    if final.role in LEADER_ROLES and final.epoch is not None and self_fence is not None:
        wake.append(self_fence)
    return Decision(final, tuple(actions), reason, min(wake))

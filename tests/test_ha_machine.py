"""The HA state machine: each rule of `step` at exact times, and two nodes in a simulated world.

Nothing sleeps and nothing real runs: snapshots are built by hand (or by the
tiny world at the bottom, where a dict-like object stands for etcd) and time
is a number passed to `step`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import pytest

from haproxy_ln.ha import (
    AcquireLeader,
    Action,
    CloseGate,
    DaemonState,
    Decision,
    DestroyKeys,
    DropSwitchoverRequest,
    Fence,
    ForcePromotion,
    HandOver,
    HaState,
    KillDaemon,
    LeaderKey,
    MaterializeKeys,
    OpenGate,
    PreparePrimary,
    RaiseFence,
    ReplicaFacts,
    Resign,
    RevokeLease,
    Role,
    SetSyncStandby,
    Snapshot,
    StartDaemon,
    StartReplicating,
    StopDaemon,
    StopReplicating,
    Successor,
    SwitchoverRequest,
    SyncMode,
    SyncRecord,
    SyncState,
    Timing,
    WriteSyncRecord,
    step,
)

TIMING = Timing(lease_ttl=2.0, keepalive_interval=0.5, safety_margin=0.5, degrade_after=5.0)
SENT = 100.0  # last keepalive sent: the self-fence deadline is 101.5
DEADLINE = 101.5
LEASE = 7

# A standby "a" of the pair (a, b) with a fresh lease, nothing running, no leader key.
STANDBY = Snapshot(
    node="a",
    peer="b",
    etcd_reachable=True,
    lease=LEASE,
    last_keepalive_sent=SENT,
    leader=None,
    sync_record=SyncRecord(12, "a"),
    successor=None,
    store_fence=Fence(12, "b"),
    primary_epoch=None,
    replication=None,
    sync_standby_names_set=False,
    daemon=DaemonState.STOPPED,
    keys_present=False,
    gate_open=False,
)
IN_SYNC = ReplicaFacts(epoch=12, unreachable_since=None, caught_up=True, sync_state=SyncState.SYNC)
# "a" active at epoch 12, everything running, synchronous with "b".
ACTIVE = replace(
    STANDBY,
    leader=LeaderKey("a", 12, LEASE),
    sync_record=SyncRecord(12, "b"),
    store_fence=Fence(12, "a"),
    primary_epoch=12,
    replication=IN_SYNC,
    sync_standby_names_set=True,
    daemon=DaemonState.READY,
    keys_present=True,
    gate_open=True,
)
ACTIVE_STATE = HaState(role=Role.ACTIVE, epoch=12, highest_epoch=12)
STANDBY_STATE = HaState(role=Role.STANDBY, highest_epoch=12)


def decide(
    state: HaState, snap: Snapshot, now: float = SENT + 0.1, mode: SyncMode = SyncMode.SYNC
) -> Decision:
    return step(state, snap, now, timing=TIMING, mode=mode)


# --- invariant 1: one signer -------------------------------------------------------------


def test_active_self_fences_exactly_at_the_lease_deadline() -> None:
    before = decide(ACTIVE_STATE, ACTIVE, now=DEADLINE - 0.001)
    assert before.role is Role.ACTIVE
    assert before.actions == ()
    assert before.wake_at == DEADLINE  # the shell must wake exactly then
    at = decide(ACTIVE_STATE, ACTIVE, now=DEADLINE)
    assert at.role is Role.FENCED
    reason = "fenced: lease not renewed: deadline 101.500 passed (last keepalive sent at 100.000)"
    assert at.actions == (
        KillDaemon(),
        DestroyKeys(),
        CloseGate(reason, None),
        StopReplicating(),
    )
    assert at.reason.startswith("self-fenced (lease not renewed: deadline 101.500 passed")


def test_first_step_after_a_long_pause_fences_before_anything_else() -> None:
    # SIGSTOP for a minute, with a switchover request and a lost replica waiting too.
    woken = replace(
        ACTIVE,
        switchover=SwitchoverRequest(12, "b"),
        replication=replace(IN_SYNC, unreachable_since=SENT),
    )
    decision = decide(ACTIVE_STATE, woken, now=SENT + 60)
    assert decision.role is Role.FENCED
    assert decision.actions[:3] == (
        KillDaemon(),
        DestroyKeys(),
        CloseGate(decision.actions[2].reason, None),  # type: ignore[union-attr]
    )
    assert not any(isinstance(a, WriteSyncRecord | SetSyncStandby) for a in decision.actions)


@pytest.mark.parametrize(
    ("change", "cause"),
    [
        ({"lease": None}, "lease lost"),
        ({"leader": None}, "leader key of epoch 12 is gone"),
        ({"leader": LeaderKey("b", 13, 9)}, "leader key is held by b at epoch 13"),
        ({"leader": LeaderKey("a", 12, 6)}, "leader key is held by a at epoch 12"),  # old lease
        ({"store_fence": Fence(14, "b")}, "local store fenced at epoch 14 by b, above our 12"),
        ({"sync_record": SyncRecord(13, None)}, "sync record is for epoch 13, above our 12"),
    ],
)
def test_leader_that_lost_leadership_fences(change: dict[str, object], cause: str) -> None:
    decision = decide(ACTIVE_STATE, replace(ACTIVE, **change))  # type: ignore[arg-type]
    assert decision.role is Role.FENCED
    assert decision.state.fence_cause == cause
    assert decision.actions[:2] == (KillDaemon(), DestroyKeys())
    assert decision.reason == f"self-fenced ({cause}): stopping everything"


def test_fenced_names_the_new_leader_when_closing_the_gate() -> None:
    decision = decide(ACTIVE_STATE, replace(ACTIVE, leader=LeaderKey("b", 13, 9)))
    gate = [a for a in decision.actions if isinstance(a, CloseGate)]
    assert gate == [CloseGate("fenced: leader key is held by b at epoch 13", "b")]


FENCED_STATE = HaState(
    role=Role.FENCED, epoch=12, highest_epoch=12, fence_cause="local store fenced"
)
TORN_DOWN = replace(
    ACTIVE, daemon=DaemonState.STOPPED, keys_present=False, gate_open=False, replication=None
)


def test_fenced_resigns_its_key_only_once_everything_is_down() -> None:
    half = decide(FENCED_STATE, replace(TORN_DOWN, keys_present=True))
    assert half.actions == (DestroyKeys(),)  # not Resign: the peer must not start yet
    done = decide(FENCED_STATE, TORN_DOWN)
    assert done.actions == (Resign(12),)
    assert done.reason == "fenced (local store fenced): resigning the leader key"


def test_fenced_revokes_a_lease_it_could_not_renew() -> None:
    decision = decide(FENCED_STATE, TORN_DOWN, now=DEADLINE + 1)
    assert decision.actions == (RevokeLease(LEASE),)


def test_fenced_becomes_standby_once_it_sees_the_new_leader() -> None:
    decision = decide(FENCED_STATE, replace(TORN_DOWN, leader=LeaderKey("b", 13, 9)))
    assert decision.role is Role.STANDBY
    assert decision.state.epoch is None and decision.state.highest_epoch == 13
    assert decision.reason == "following b at epoch 13"


def test_fenced_waits_for_etcd() -> None:
    unreachable = replace(TORN_DOWN, etcd_reachable=False, leader=None)
    decision = decide(FENCED_STATE, unreachable)
    assert (decision.role, decision.actions) == (Role.FENCED, ())
    assert decision.reason == "fenced (local store fenced): waiting for etcd"


def test_starting_node_kills_whatever_a_previous_run_left() -> None:
    leftover = replace(STANDBY, daemon=DaemonState.READY, keys_present=True, gate_open=True)
    decision = decide(HaState(), leftover)
    assert decision.role is Role.STARTING
    assert decision.actions == (KillDaemon(), DestroyKeys(), CloseGate("starting", None))
    clean = decide(HaState(), replace(STANDBY, leader=LeaderKey("b", 12, 9)))
    assert (clean.role, clean.actions, clean.reason) == (
        Role.STANDBY,
        (),
        "following b at epoch 12",
    )


def test_standby_keeps_nothing_only_a_leader_may_have() -> None:
    stray = replace(
        STANDBY, leader=LeaderKey("b", 12, 9), keys_present=True, sync_standby_names_set=True
    )
    decision = decide(STANDBY_STATE, stray)
    assert decision.actions == (DestroyKeys(), SetSyncStandby(False))


# --- invariant 2: no rollback ------------------------------------------------------------


def promote(snap: Snapshot, highest: int = 12) -> Decision:
    return decide(HaState(role=Role.STANDBY, highest_epoch=highest), snap)


@pytest.mark.parametrize(
    ("change", "highest", "reason"),
    [
        (
            {"sync_record": SyncRecord(12, "b")},
            12,
            "waiting: sync record names b for epoch 12, not us",
        ),
        (
            {"sync_record": SyncRecord(11, "a")},
            12,  # a leader of 12 was seen
            "waiting: sync record names us for epoch 11, but epoch 12 is newer",
        ),
        (
            {"sync_record": SyncRecord(11, "a"), "store_fence": Fence(12, "b")},
            0,  # not seen, but b wrote to our store at 12
            "waiting: sync record names us for epoch 11, but epoch 12 is newer",
        ),
        (
            {"sync_record": SyncRecord(12, None)},
            12,
            "waiting: sync record names no node for epoch 12",
        ),
        (
            {"sync_record": SyncRecord(12, None), "store_fence": Fence(11, "a")},
            11,  # this node led 11, but a later leader recorded 12
            "waiting: sync record names no node for epoch 12",
        ),
        (
            {"sync_record": SyncRecord(11, None), "store_fence": Fence(11, "a")},
            12,  # this node led 11, but a leader of 12 was seen since
            "waiting: sync record names no node for epoch 11",
        ),
        (
            {"successor": Successor("c", 12)},
            12,
            "waiting: epoch 12 was handed over to c",
        ),
        (
            {"sync_record": SyncRecord(12, "b"), "force_promotion": ForcePromotion(12, False)},
            12,
            "waiting: sync record names b for epoch 12, not us; "
            "forced promotion needs the data-loss flag",
        ),
        (
            {"sync_record": SyncRecord(12, "b"), "force_promotion": ForcePromotion(11, True)},
            12,
            "waiting: sync record names b for epoch 12, not us; "
            "forced promotion names epoch 11, the newest is 12",
        ),
    ],
)
def test_standby_refuses_to_promote(change: dict[str, object], highest: int, reason: str) -> None:
    decision = promote(replace(STANDBY, **change), highest)  # type: ignore[arg-type]
    assert (decision.role, decision.actions, decision.reason) == (Role.STANDBY, (), reason)


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ({}, "sync record names us for epoch 12"),
        ({"sync_record": None, "store_fence": None}, "no sync record: a new pair"),
        (
            {"sync_record": SyncRecord(12, None), "store_fence": Fence(12, "a")},
            "this node led epoch 12, the newest",
        ),
        ({"successor": Successor("a", 12)}, "sync record names us for epoch 12"),
        ({"successor": Successor("b", 11)}, "sync record names us for epoch 12"),  # stale
        (
            {"sync_record": SyncRecord(12, "b"), "force_promotion": ForcePromotion(12, True)},
            "forced by the operator, who accepted data loss "
            "(sync record names b for epoch 12, not us)",
        ),
    ],
)
def test_standby_promotes_at_once_when_allowed(change: dict[str, object], why: str) -> None:
    decision = promote(replace(STANDBY, **change))  # type: ignore[arg-type]
    assert decision.role is Role.CANDIDATE
    assert decision.actions == (AcquireLeader(LEASE),)
    assert decision.reason.startswith(f"promoting: {why}")


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"etcd_reachable": False}, "waiting: etcd unreachable"),
        ({"lease": None}, "waiting: no valid lease yet"),
        (
            {"leader": LeaderKey("a", 12, 6)},
            "waiting: this node's previous lease still holds epoch 12",
        ),
    ],
)
def test_standby_does_not_try_without_etcd_lease_or_free_key(
    change: dict[str, object], reason: str
) -> None:
    decision = promote(replace(STANDBY, **change))  # type: ignore[arg-type]
    assert (decision.role, decision.actions, decision.reason) == (Role.STANDBY, (), reason)


def test_standby_does_not_promote_with_a_lease_past_its_deadline() -> None:
    decision = decide(STANDBY_STATE, STANDBY, now=DEADLINE)
    assert (decision.role, decision.actions) == (Role.STANDBY, ())


def test_candidate_that_lost_the_race_follows_the_winner() -> None:
    decision = decide(HaState(role=Role.CANDIDATE), replace(STANDBY, leader=LeaderKey("b", 13, 9)))
    assert (decision.role, decision.actions) == (Role.STANDBY, ())
    assert decision.reason == "following b at epoch 13"


# --- taking over, in order ---------------------------------------------------------------


def take_over(mode: SyncMode) -> list[Action]:
    """Every action a lone standby "a" decides, with each outcome applied at once."""
    world = World(mode=mode)
    node = world.add("a", peer="b")
    world.etcd.sync = SyncRecord(12, "a")
    node.fence = Fence(12, "b")
    node.state = STANDBY_STATE
    world.run(until=3.0)
    assert node.state.role is Role.ACTIVE
    return [a for _, name, a in world.log if name == "a"]


def first(actions: list[Action], kind: type) -> int:
    return next(i for i, a in enumerate(actions) if isinstance(a, kind))


def test_promotion_goes_key_fence_record_primary_gate_keys_daemon() -> None:
    actions = take_over(SyncMode.SYNC)
    order = [
        AcquireLeader,
        RaiseFence,
        WriteSyncRecord,
        PreparePrimary,
        OpenGate,
        MaterializeKeys,
        StartDaemon,
    ]
    positions = [first(actions, kind) for kind in order]
    assert positions == sorted(positions)
    epoch = next(a.epoch for a in actions if isinstance(a, RaiseFence))
    assert WriteSyncRecord(epoch, None) in actions  # the new epoch, naming nobody yet
    assert first(actions, StartReplicating) > first(actions, PreparePrimary)
    assert not any(isinstance(a, SetSyncStandby) for a in actions)  # b never caught up


def test_strict_promotion_sets_sync_standby_before_opening_the_gate() -> None:
    actions = take_over(SyncMode.STRICT)
    assert (
        first(actions, PreparePrimary) < first(actions, SetSyncStandby) < first(actions, OpenGate)
    )


def test_candidate_steps_wait_for_each_outcome() -> None:
    state = HaState(role=Role.CANDIDATE, epoch=13, highest_epoch=13)
    taken = replace(STANDBY, leader=LeaderKey("a", 13, LEASE))
    assert decide(state, taken).actions == (RaiseFence(13),)
    fenced = replace(taken, store_fence=Fence(13, "a"))
    assert decide(state, fenced).actions == (WriteSyncRecord(13, None),)
    recorded = replace(fenced, sync_record=SyncRecord(13, None))
    assert decide(state, recorded).actions == (PreparePrimary(13),)
    prepared = replace(recorded, primary_epoch=13)
    assert decide(state, prepared).actions == (OpenGate(), StartReplicating(13))
    starting = replace(
        prepared,
        gate_open=True,
        keys_present=True,
        daemon=DaemonState.STARTING,
        replication=ReplicaFacts(13, SENT, False, None),
    )
    waiting = decide(state, starting)
    assert (waiting.role, waiting.actions) == (Role.CANDIDATE, ())
    assert waiting.reason == "promoting: waiting for the daemon to be ready"
    ready = decide(state, replace(starting, daemon=DaemonState.READY))
    assert ready.role is Role.ACTIVE
    assert ready.reason == "active at epoch 13; degraded: running alone (replica b unreachable)"


def test_active_restarts_a_failed_daemon_and_lost_keys() -> None:
    assert decide(ACTIVE_STATE, replace(ACTIVE, keys_present=False)).actions == (MaterializeKeys(),)
    failed = decide(ACTIVE_STATE, replace(ACTIVE, daemon=DaemonState.FAILED))
    assert failed.actions == (StartDaemon(),)
    assert failed.role is Role.ACTIVE


def test_leader_whose_key_vanished_may_take_a_new_one_in_the_same_step() -> None:
    # ACTIVE -> FENCED -> STANDBY -> CANDIDATE: nothing was held, the record names us.
    idle = replace(TORN_DOWN, leader=None, sync_record=SyncRecord(12, "a"))
    decision = decide(ACTIVE_STATE, replace(idle, sync_standby_names_set=False))
    assert decision.role is Role.CANDIDATE
    assert decision.actions == (AcquireLeader(LEASE),)
    assert decision.state.epoch is None


def test_candidate_finding_its_store_fenced_higher_gives_up() -> None:
    state = HaState(role=Role.CANDIDATE, epoch=13, highest_epoch=13)
    snap = replace(STANDBY, leader=LeaderKey("a", 13, LEASE), store_fence=Fence(20, "b"))
    decision = decide(state, snap)
    assert decision.role is Role.FENCED
    assert decision.actions == (Resign(13),)  # nothing was running yet


# --- degrading and re-enabling -----------------------------------------------------------

LOST_SINCE = 200.0


def lost(now_sent: float = LOST_SINCE) -> Snapshot:
    return replace(
        ACTIVE,
        last_keepalive_sent=now_sent,
        replication=replace(IN_SYNC, unreachable_since=LOST_SINCE, sync_state=None),
    )


def test_degrade_waits_exactly_degrade_after() -> None:
    early = decide(ACTIVE_STATE, lost(204.9), now=LOST_SINCE + 4.999)
    assert early.actions == ()
    assert early.wake_at == LOST_SINCE + 5.0
    assert early.reason == (
        "active at epoch 12; replica b unreachable since 200.000; degrading at 205.000"
    )


def test_degrade_clears_the_sync_record_first_then_sync_standby_names() -> None:
    first_step = decide(ACTIVE_STATE, lost(204.9), now=LOST_SINCE + 5.0)
    assert first_step.actions == (WriteSyncRecord(12, None),)  # not SetSyncStandby yet
    cleared = replace(lost(204.9), sync_record=SyncRecord(12, None))
    second = decide(ACTIVE_STATE, cleared, now=LOST_SINCE + 5.1)
    assert second.actions == (SetSyncStandby(False),)
    alone = replace(cleared, sync_standby_names_set=False)
    third = decide(ACTIVE_STATE, alone, now=LOST_SINCE + 5.2)
    assert third.actions == ()
    assert third.reason == "active at epoch 12; degraded: running alone (replica b unreachable)"


def test_strict_mode_never_degrades() -> None:
    decision = decide(ACTIVE_STATE, lost(299.0), now=LOST_SINCE + 99, mode=SyncMode.STRICT)
    assert decision.actions == ()
    assert (
        decision.reason == "active at epoch 12; strict: replica b unreachable, commits wait for it"
    )


def test_degrade_cannot_skip_the_record_while_etcd_is_down() -> None:
    decision = decide(ACTIVE_STATE, replace(lost(204.9), etcd_reachable=False), now=205.0)
    assert decision.actions == ()  # never SetSyncStandby(False) while the record names b
    assert decision.reason.endswith("(etcd unreachable: not writing to it)")


def test_reenable_goes_caught_up_then_sync_names_then_sync_state_then_record() -> None:
    alone = replace(
        ACTIVE,
        sync_record=SyncRecord(12, None),
        sync_standby_names_set=False,
        replication=replace(IN_SYNC, caught_up=False, sync_state=SyncState.ASYNC),
    )
    assert decide(ACTIVE_STATE, alone).actions == ()
    caught_up = replace(alone, replication=replace(IN_SYNC, sync_state=SyncState.ASYNC))
    assert decide(ACTIVE_STATE, caught_up).actions == (SetSyncStandby(True),)
    names_set = replace(caught_up, sync_standby_names_set=True)
    waiting = decide(ACTIVE_STATE, names_set)
    assert waiting.actions == ()  # sync_state is still async: the record must wait
    assert (
        waiting.reason == "active at epoch 12; re-enabling: replica b sync_state is async, not sync"
    )
    in_sync = replace(names_set, replication=IN_SYNC)
    assert decide(ACTIVE_STATE, in_sync).actions == (WriteSyncRecord(12, "b"),)


def test_sync_record_naming_the_replica_restores_sync_standby_names() -> None:
    decision = decide(ACTIVE_STATE, replace(ACTIVE, sync_standby_names_set=False))
    assert decision.actions == (SetSyncStandby(True),)


# --- planned switchover ------------------------------------------------------------------

REQUEST = SwitchoverRequest(12, None)


def test_switchover_steps_in_order() -> None:
    asked = replace(ACTIVE, switchover=REQUEST)
    d = decide(ACTIVE_STATE, asked)
    assert d.role is Role.DEMOTING
    assert d.actions == (CloseGate("switchover to b", "b"),)
    state = d.state
    closed = replace(asked, gate_open=False, replication=replace(IN_SYNC, caught_up=False))
    d = decide(state, closed)
    assert d.actions == ()
    assert d.reason == (
        "switchover to b: waiting for the replica to have everything (synchronous with b)"
    )
    everything = replace(closed, replication=IN_SYNC)
    assert decide(state, everything).actions == (StopDaemon(),)
    stopped = replace(everything, daemon=DaemonState.STOPPED)
    assert decide(state, stopped).actions == (DestroyKeys(),)
    no_keys = replace(stopped, keys_present=False)
    d = decide(state, no_keys)
    assert d.actions == (HandOver("b", 12),)
    handed = replace(no_keys, leader=None, successor=Successor("b", 12), switchover=None)
    d = decide(state, handed)
    assert d.role is Role.STANDBY
    assert d.actions == (StopReplicating(), SetSyncStandby(False))
    assert d.reason == "waiting: epoch 12 was handed over to b"


def test_switchover_waits_until_the_record_names_the_successor() -> None:
    state = decide(ACTIVE_STATE, replace(ACTIVE, switchover=REQUEST)).state
    degraded = replace(
        ACTIVE,
        switchover=REQUEST,
        gate_open=False,
        sync_record=SyncRecord(12, None),
        sync_standby_names_set=False,
    )
    d = decide(state, degraded)
    assert d.actions == (SetSyncStandby(True),)  # re-enabling first; no StopDaemon yet
    assert d.role is Role.DEMOTING


def test_successor_promotes_at_once() -> None:
    b = replace(
        STANDBY,
        node="b",
        peer="a",
        sync_record=SyncRecord(12, "b"),
        successor=Successor("b", 12),
        store_fence=Fence(12, "a"),
    )
    d = decide(STANDBY_STATE, b, now=SENT + 0.001)
    assert d.actions == (AcquireLeader(LEASE),)


def test_cancelled_switchover_reopens_the_gate() -> None:
    state = decide(ACTIVE_STATE, replace(ACTIVE, switchover=REQUEST)).state
    d = decide(state, replace(ACTIVE, gate_open=False, daemon=DaemonState.STOPPED))
    assert d.role is Role.ACTIVE
    assert d.actions == (OpenGate(),)


def test_switchover_abandoned_when_the_replica_stays_unreachable() -> None:
    state = decide(ACTIVE_STATE, replace(ACTIVE, switchover=REQUEST)).state
    gone = replace(
        ACTIVE,
        switchover=REQUEST,
        gate_open=False,
        last_keepalive_sent=204.9,
        replication=replace(IN_SYNC, unreachable_since=LOST_SINCE),
    )
    assert decide(state, gone, now=204.999).wake_at == 205.0
    d = decide(state, gone, now=205.0)
    assert d.role is Role.ACTIVE
    assert d.actions[0] == DropSwitchoverRequest(
        REQUEST, "switchover to b abandoned: replica unreachable"
    )
    assert OpenGate() in d.actions
    assert d.state.ignored_request == REQUEST
    again = decide(d.state, replace(gone, gate_open=True), now=205.1)
    assert again.role is Role.ACTIVE  # the same request is not started again


@pytest.mark.parametrize(
    ("request_", "reason"),
    [
        (SwitchoverRequest(11, None), "switchover request is for epoch 11, this node leads 12"),
        (SwitchoverRequest(12, "c"), "switchover refused: c is not the peer (b)"),
        (SwitchoverRequest(12, "a"), "switchover refused: a is not the peer (b)"),
    ],
)
def test_bad_switchover_request_is_dropped(request_: SwitchoverRequest, reason: str) -> None:
    d = decide(ACTIVE_STATE, replace(ACTIVE, switchover=request_))
    assert d.role is Role.ACTIVE
    assert d.actions == (DropSwitchoverRequest(request_, reason),)


# --- timing and reasons ------------------------------------------------------------------


def test_reason_is_stable_while_nothing_changes() -> None:
    reasons = {decide(ACTIVE_STATE, ACTIVE, now=SENT + t / 10).reason for t in range(10)}
    assert reasons == {"active at epoch 12; synchronous with b"}


def test_without_a_deadline_the_shell_polls_each_keepalive_interval() -> None:
    d = decide(STANDBY_STATE, replace(STANDBY, leader=LeaderKey("b", 12, 9)), now=300.0)
    assert d.wake_at == 300.5


# --- two nodes in a simulated world ------------------------------------------------------


@dataclass
class Etcd:
    """The little of etcd the pair uses: leases with expiry, three keys, a revision."""

    revision: int = 100
    leases: dict[int, float] = field(default_factory=dict)  # id -> expires at
    leader: LeaderKey | None = None
    sync: SyncRecord | None = None
    successor: Successor | None = None
    switchover: SwitchoverRequest | None = None  # written by the operator's CLI

    def expire(self, now: float) -> None:
        for lease, expires in list(self.leases.items()):
            if now >= expires:
                del self.leases[lease]
                if self.leader is not None and self.leader.lease == lease:
                    self.leader = None


@dataclass
class Node:
    """One simulated node: its facts, as a shell would observe them."""

    name: str
    peer: str | None
    state: HaState = field(default_factory=HaState)
    lease: int | None = None
    last_sent: float | None = None
    next_keepalive: float = 0.0
    daemon: DaemonState = DaemonState.STOPPED
    daemon_ready_at: float = 0.0
    keys: bool = False
    gate: bool = False
    ssn: bool = False
    fence: Fence | None = None
    primary_epoch: int | None = None
    replicating: int | None = None
    frozen: bool = False  # SIGSTOP of the whole machine: no steps, no keepalives
    cut_off: bool = False  # etcd unreachable from here
    view: tuple[LeaderKey | None, SyncRecord | None, Successor | None, SwitchoverRequest | None] = (
        None,
        None,
        None,
        None,
    )
    wake_at: float = 0.0
    last_snapshot: Snapshot | None = None
    decisions: list[tuple[float, Decision]] = field(default_factory=list)


@dataclass
class World:
    mode: SyncMode = SyncMode.SYNC
    etcd: Etcd = field(default_factory=Etcd)
    nodes: dict[str, Node] = field(default_factory=dict)
    log: list[tuple[float, str, Action]] = field(default_factory=list)
    now: float = 0.0

    def add(self, name: str, peer: str | None) -> Node:
        self.nodes[name] = Node(name, peer)
        return self.nodes[name]

    def keepalive(self, node: Node) -> None:
        if node.cut_off or self.now < node.next_keepalive:
            return
        node.next_keepalive = self.now + TIMING.keepalive_interval
        if node.lease not in self.etcd.leases:
            self.etcd.revision += 1
            node.lease = self.etcd.revision  # a fresh grant
        self.etcd.leases[node.lease] = self.now + TIMING.lease_ttl
        node.last_sent = self.now

    def snapshot(self, node: Node) -> Snapshot:
        if not node.cut_off:
            etcd = self.etcd
            node.view = (etcd.leader, etcd.sync, etcd.successor, etcd.switchover)
        if node.daemon is DaemonState.STARTING and self.now >= node.daemon_ready_at:
            node.daemon = DaemonState.READY
        peer = self.nodes.get(node.peer) if node.peer else None
        replication = None
        if node.replicating is not None:
            up = peer is not None and not peer.frozen
            sync_state = SyncState.SYNC if node.ssn and up else None
            replication = ReplicaFacts(node.replicating, None if up else 0.0, up, sync_state)
        leader, sync, successor, switchover = node.view
        return Snapshot(
            node=node.name,
            peer=node.peer,
            etcd_reachable=not node.cut_off,
            lease=node.lease,
            last_keepalive_sent=node.last_sent,
            leader=leader,
            sync_record=sync,
            successor=successor,
            store_fence=node.fence,
            primary_epoch=node.primary_epoch,
            replication=replication,
            sync_standby_names_set=node.ssn,
            daemon=node.daemon,
            keys_present=node.keys,
            gate_open=node.gate,
            switchover=switchover,
        )

    def carry_out(self, node: Node, action: Action) -> None:
        self.log.append((self.now, node.name, action))
        etcd = self.etcd
        mine = etcd.leader is not None and etcd.leader.node == node.name
        match action:
            case AcquireLeader(lease=lease):
                if etcd.leader is None and lease in etcd.leases:
                    etcd.revision += 1
                    etcd.leader = LeaderKey(node.name, etcd.revision, lease)
            case WriteSyncRecord(epoch=epoch, node=name):
                if mine and etcd.leader is not None and etcd.leader.epoch == epoch:
                    etcd.sync = SyncRecord(epoch, name)
            case HandOver(successor=successor, epoch=epoch):
                if mine and etcd.leader is not None and etcd.leader.epoch == epoch:
                    etcd.leader, etcd.successor = None, Successor(successor, epoch)
            case Resign(epoch=epoch):
                if mine and etcd.leader is not None and etcd.leader.epoch == epoch:
                    etcd.leader = None
            case DropSwitchoverRequest(request=request):
                if etcd.switchover == request:
                    etcd.switchover = None
            case RevokeLease(lease=lease):
                etcd.leases.pop(lease, None)
                if etcd.leader is not None and etcd.leader.lease == lease:
                    etcd.leader = None
                node.lease, node.next_keepalive = None, self.now  # grant a new one
            case RaiseFence(epoch=epoch):
                if node.fence is None or node.fence.epoch < epoch:
                    node.fence = Fence(epoch, node.name)
            case PreparePrimary(epoch=epoch):
                node.primary_epoch = epoch
            case SetSyncStandby(enabled=enabled):
                node.ssn = enabled
            case StartReplicating(epoch=epoch):
                node.replicating = epoch
            case StopReplicating():
                node.replicating = None
            case OpenGate():
                node.gate = True
            case CloseGate():
                node.gate = False
            case MaterializeKeys():
                node.keys = True
            case DestroyKeys():
                node.keys = False
            case StartDaemon():
                node.daemon, node.daemon_ready_at = DaemonState.STARTING, self.now + 0.1
            case StopDaemon() | KillDaemon():
                node.daemon = DaemonState.STOPPED
            case _:
                raise AssertionError(f"unexpected {action}")

    def replicate(self, node: Node) -> None:
        """The replicator raises the peer store's fence to its epoch (check_fence)."""
        peer = self.nodes.get(node.peer) if node.peer else None
        if node.replicating is None or peer is None or peer.frozen:
            return
        if peer.fence is None or peer.fence.epoch < node.replicating:
            peer.fence = Fence(node.replicating, node.name)

    def tick(self, node: Node) -> None:
        """What one node's shell does now: step when due or when a fact changed."""
        if node.frozen:
            return
        for _ in range(20):
            snap = self.snapshot(node)
            if snap == node.last_snapshot and self.now < node.wake_at:
                break
            decision = step(node.state, snap, self.now, timing=TIMING, mode=self.mode)
            node.decisions.append((self.now, decision))
            node.state, node.wake_at, node.last_snapshot = decision.state, decision.wake_at, snap
            for action in decision.actions:
                self.carry_out(node, action)
            if not decision.actions:
                break
        self.keepalive(node)
        self.replicate(node)

    def run(self, until: float, check: bool = True) -> None:
        while self.now < until:
            self.etcd.expire(self.now)
            for node in self.nodes.values():
                self.tick(node)
            if check:
                self.check_one_signer()
            self.now = round(self.now + 0.01, 2)

    def check_one_signer(self) -> None:
        """Invariant 1 as the test sees it: a node that can act holds keys or runs the
        daemon only while etcd shows it as the leader, so never two at once."""
        for node in self.nodes.values():
            if node.frozen or not (node.keys or node.daemon.running):
                continue
            leader = self.etcd.leader
            assert leader is not None and leader.node == node.name, (self.now, node.name)
            assert leader.lease == node.lease and leader.lease in self.etcd.leases

    def first_time(self, name: str, kind: type) -> float:
        return next(t for t, n, a in self.log if n == name and isinstance(a, kind))


def pair() -> World:
    world = World()
    world.add("a", peer="b")
    world.add("b", peer="a")
    world.run(until=5.0)
    return world


def test_a_new_pair_elects_exactly_one_active_and_becomes_synchronous() -> None:
    world = pair()
    a, b = world.nodes["a"], world.nodes["b"]
    assert (a.state.role, b.state.role) == (Role.ACTIVE, Role.STANDBY)
    epoch = a.state.epoch
    assert epoch is not None and world.etcd.leader == LeaderKey("a", epoch, a.lease)  # type: ignore[arg-type]
    assert world.etcd.sync == SyncRecord(epoch, "b")
    assert b.fence == Fence(epoch, "a")  # a's replicator fenced b's store
    assert (a.daemon, b.daemon) == (DaemonState.READY, DaemonState.STOPPED)
    assert a.ssn and not b.ssn
    assert b.decisions[-1][1].reason == f"following a at epoch {epoch}"


def test_standby_takes_over_only_after_the_frozen_actives_lease_expires() -> None:
    world = pair()
    a, b = world.nodes["a"], world.nodes["b"]
    a.frozen = True  # stops renewing and stepping, with its daemon paused too
    frozen_at = world.now
    assert a.last_sent is not None
    expiry = a.last_sent + TIMING.lease_ttl
    world.run(until=frozen_at + 5.0)
    took_over = world.first_time("b", AcquireLeader)
    assert expiry <= took_over < expiry + 0.05
    assert b.state.role is Role.ACTIVE
    assert world.etcd.sync == SyncRecord(b.state.epoch, None)  # type: ignore[arg-type]
    # a wakes: its very first decision kills the daemon, before anything else.
    a.frozen = False
    before, unfrozen_at = len(a.decisions), world.now
    world.run(until=world.now + 2.0)
    woke_at, woke = a.decisions[before]
    assert woke_at == unfrozen_at
    assert woke.role is Role.FENCED
    assert woke.actions[0] == KillDaemon()
    assert a.state.role is Role.STANDBY
    assert a.decisions[-1][1].reason == f"following b at epoch {b.state.epoch}"
    # b re-enables synchronous replication to a once a's store has caught up.
    assert world.etcd.sync == SyncRecord(b.state.epoch, "a")  # type: ignore[arg-type]
    assert a.fence == Fence(b.state.epoch, "b")  # type: ignore[arg-type]


def test_active_cut_off_from_etcd_fences_itself_before_the_standby_takes_over() -> None:
    world = pair()
    a, b = world.nodes["a"], world.nodes["b"]
    a.cut_off = True  # keeps running, cannot renew
    assert a.last_sent is not None
    deadline = TIMING.lease_deadline(a.last_sent)
    world.run(until=world.now + 5.0)
    killed = world.first_time("a", KillDaemon)
    took_over = world.first_time("b", AcquireLeader)
    assert deadline <= killed < deadline + 0.05
    assert took_over >= a.last_sent + TIMING.lease_ttl > killed
    assert (a.state.role, b.state.role) == (Role.FENCED, Role.ACTIVE)
    assert a.decisions[-1][1].reason.endswith("waiting for etcd")


def test_planned_switchover_hands_over_without_waiting_for_the_lease() -> None:
    world = pair()
    a, b = world.nodes["a"], world.nodes["b"]
    assert a.state.epoch is not None
    start = world.now
    world.etcd.switchover = SwitchoverRequest(a.state.epoch, None)  # haproxy-ln switchover
    world.run(until=start + 1.0)
    handed = world.first_time("a", HandOver)
    took_over = world.first_time("b", AcquireLeader)
    assert took_over - start < 0.1  # no lease wait
    assert handed <= took_over
    assert world.first_time("a", CloseGate) <= world.first_time("a", StopDaemon) <= handed
    assert world.first_time("a", DestroyKeys) <= handed
    assert (a.state.role, b.state.role) == (Role.STANDBY, Role.ACTIVE)
    assert world.etcd.sync is not None and world.etcd.sync.epoch == b.state.epoch
    assert world.etcd.switchover is None  # the new leader dropped the stale request
    assert a.decisions[-1][1].reason == f"following b at epoch {b.state.epoch}"


# -- the leader's own PostgreSQL is gone -------------------------------------------------


def test_active_waits_for_its_postgresql_until_primary_lost_after() -> None:
    down = replace(ACTIVE, store_unreachable_since=100.2, store_fence=None)
    decision = step(ACTIVE_STATE, down, 100.3, timing=TIMING, mode=SyncMode.SYNC)
    assert decision.role is Role.ACTIVE
    assert decision.actions == ()  # no RaiseFence into a database that does not answer
    assert "local PostgreSQL" in decision.reason
    assert decision.wake_at == min(100.2 + TIMING.primary_lost_after, 100.3 + 0.5, DEADLINE)


def test_active_gives_up_leading_when_its_postgresql_stays_unreachable() -> None:
    down = replace(ACTIVE, store_unreachable_since=95.0, store_fence=None)
    before = step(ACTIVE_STATE, down, 99.999, timing=TIMING, mode=SyncMode.SYNC)
    assert before.role is Role.ACTIVE
    decision = step(ACTIVE_STATE, down, 100.0, timing=TIMING, mode=SyncMode.SYNC)
    assert decision.role is Role.FENCED
    kill, destroy, close = decision.actions[:3]
    assert (kill, destroy) == (KillDaemon(), DestroyKeys())
    assert isinstance(close, CloseGate) and "local PostgreSQL unreachable for 5 s" in close.reason
    assert "local PostgreSQL unreachable for 5 s" in (decision.state.fence_cause or "")

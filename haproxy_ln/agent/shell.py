"""The HA shell: observe the world, call the pure `ha.step`, carry out its actions.

How this works: `HaShell.run` loops: read one `Snapshot` (etcd's keys, the
local PostgreSQL's fence and sync settings, the daemon, the keys, the gate,
this node's replicator), call `step`, log the reason when it changes, carry
out the actions in order, then wait until `decision.wake_at` or until a
fact changes (etcd watch, lease renewal, daemon state). Every action is
idempotent and its outcome shows in the next snapshot, so a failed action
is only logged: the next step decides it again.

Time is `time.monotonic()` throughout: the same clock as the event log and
the gate's expiry, so the self-fence deadline means the same everywhere.
Actions run under that deadline while this node leads: an action that
hangs (an unreachable database, say) is cut off so that the step that
fences the node runs on time. Slow actions (starting or stopping the
daemon) run in the background; their progress shows in the snapshot.

The lease is renewed by `keepalive`, a task of its own, every
keepalive_interval; it records when it SENT each keepalive that etcd
acknowledged, which is what the deadline counts from.
"""

from __future__ import annotations

import logging
import math
import time

import trio

from haproxy_ln import ha, metrics
from haproxy_ln.agent.local import UNREACHABLE, LocalStore
from haproxy_ln.config import Config
from haproxy_ln.coord import Coord
from haproxy_ln.coord.model import CoordView, Lease, SwitchoverRequest
from haproxy_ln.daemon.sdnotify import SystemdNotifier
from haproxy_ln.daemon.supervisor import DaemonState as SupervisorState
from haproxy_ln.daemon.supervisor import DaemonSupervisor
from haproxy_ln.errors import (
    CoordError,
    CoordUnavailable,
    DaemonFailed,
    HaproxyLnError,
    LeaseLost,
    SetupError,
)
from haproxy_ln.events import EventLog
from haproxy_ln.keys import KeyCustody
from haproxy_ln.proxy.gate import Gate
from haproxy_ln.replicator.service import GATE_KEY, Replicator
from haproxy_ln.store import bridge

log = logging.getLogger(__name__)

ERROR_PAUSE = 0.2  # seconds before stepping again after an action failed
_LEADING = (ha.Role.CANDIDATE, ha.Role.ACTIVE, ha.Role.DEMOTING)

_DAEMON_STATES = {
    SupervisorState.STOPPED: ha.DaemonState.STOPPED,
    SupervisorState.STARTING: ha.DaemonState.STARTING,
    SupervisorState.READY: ha.DaemonState.READY,
    SupervisorState.STOPPING: ha.DaemonState.STARTING,  # still running, not ready
    SupervisorState.FAILED: ha.DaemonState.FAILED,
}


class HaShell:
    """One node's HA loop and the services it drives; see the module docstring."""

    def __init__(
        self,
        config: Config,
        coord: Coord,
        local: LocalStore,
        gate: Gate,
        daemon: DaemonSupervisor,
        keys: KeyCustody,
        events: EventLog,
        nursery: trio.Nursery,
        notifier: SystemdNotifier,
    ) -> None:
        self.config = config
        self.node = config.node.name
        self.coord = coord
        self.local = local
        self.gate = gate
        self.daemon = daemon
        self.keys = keys
        self.events = events
        self.timing = config.ha.timing()
        self.mode = ha.SyncMode(config.replication.mode)
        self._nursery = nursery
        self.notifier = notifier
        self.last_step = time.monotonic()
        self.state = ha.HaState()
        self.reason = "starting"
        self.lease: Lease | None = None
        self.last_keepalive_sent: float | None = None  # of the current lease
        self.last_renewal_sent: float | None = None  # of any lease: kept for the record
        self.etcd_reachable = False
        self.view = CoordView(None, None, None, 0)
        self.primary_epoch: int | None = None
        # MaterializeKeys done: the daemon may start. `keys.held` alone cannot say so for
        # lnd (held only once unlocked, beside the start) or "none" (never held): the loop
        # asked for the keys forever and no daemon started (found by the chaos suite).
        self.keys_ready = False
        self.replicator: Replicator | None = None
        self._replicator_scope: trio.CancelScope | None = None
        self._replica_down_since: float | None = None
        self._store_down_since: float | None = None
        self._changed = trio.Event()
        self.timeline: list[tuple[str, float]] = []  # the takeover under way
        self.last_timeline: dict[str, float] = {}  # seconds from detection, per step

    # --- the loop ---------------------------------------------------------------------------

    def wake(self) -> None:
        """Make the loop step now (a fact changed)."""
        self._changed.set()

    async def run(self) -> None:
        """Step until cancelled."""
        while True:
            snapshot = await self.observe()
            now = time.monotonic()
            decision = ha.step(self.state, snapshot, now, timing=self.timing, mode=self.mode)
            if decision.role is not self.state.role:
                self._record_role(decision.state, now)
            if decision.reason != self.reason or decision.role is not self.state.role:
                log.info("%s: %s", decision.role.value, decision.reason)
                self.notifier.status(f"{decision.role.value}: {decision.reason}")
            self.last_step = now
            self.state, self.reason = decision.state, decision.reason
            failed = False
            for action in decision.actions:
                failed |= not await self._carry_out(action)
            self._set_gate_expiry()
            self._set_replica_guard(snapshot)
            if decision.actions and not failed:
                continue  # their outcomes are the next snapshot's facts
            wake_at = decision.wake_at if not failed else min(decision.wake_at, now + ERROR_PAUSE)
            with trio.move_on_after(max(0.0, wake_at - time.monotonic())):
                await self._changed.wait()
            self._changed = trio.Event()

    def healthy(self) -> bool:
        """Whether the loop has stepped recently (it steps at least every keepalive
        interval): the systemd watchdog is fed only then, so a stuck agent is restarted."""
        return time.monotonic() - self.last_step < self.timing.lease_ttl

    def _step_done(self, kind: str, **fields: int) -> None:
        """A takeover step as an event, and on the failover timeline."""
        event = self.events.emit(kind, **fields)
        self.timeline.append((kind.replace(".", " "), event.mono))

    def _record_role(self, state: ha.HaState, now: float) -> None:
        """An event per role change; a self-fence says why and against which deadline,
        so a checker can prove it came before the lease could expire in etcd.
        Becoming candidate starts a failover timeline; becoming active ends it."""
        if state.role is ha.Role.CANDIDATE:
            self.timeline = [("detected", now)]
        elif state.role is ha.Role.ACTIVE and self.timeline:
            self._finish_timeline(now)
        if state.role is ha.Role.ACTIVE:
            metrics.TAKEOVERS.inc()
        elif state.role is ha.Role.FENCED:
            metrics.SELF_FENCES.inc()
        self.events.emit(
            f"ha.{state.role.value}",
            epoch=state.epoch,
            cause=state.fence_cause,
            step_time=now,
            deadline=self._deadline(),
            last_keepalive_sent=self.last_renewal_sent,
        )

    def _finish_timeline(self, now: float) -> None:
        start = self.timeline[0][1]
        steps = {name: round(at - start, 3) for name, at in self.timeline}
        log.info(
            "takeover timeline: %s", ", ".join(f"{name} +{s:.3f} s" for name, s in steps.items())
        )
        self.events.emit("takeover.timeline", **{k.replace(" ", "_"): v for k, v in steps.items()})
        self.last_timeline, self.timeline = steps, []

    def _time_to_fence(self) -> float:
        """Seconds left before the self-fence deadline (0 once passed; inf without one)."""
        deadline = self._deadline()
        return math.inf if deadline is None else max(0.0, deadline - time.monotonic())

    def _deadline(self) -> float | None:
        if self.lease is None or self.last_keepalive_sent is None:
            return None
        return self.timing.lease_deadline(self.last_keepalive_sent)

    def _set_replica_guard(self, snapshot: ha.Snapshot) -> None:
        # The replicator holds the gate until the replica has everything (invariant 5)
        # only while the sync record promises that replica; degraded, the node serves alone.
        replicator, record = self.replicator, snapshot.sync_record
        if replicator is None:
            return
        promised = (
            record is not None and record.epoch == self.state.epoch and record.node is not None
        )
        if promised:
            replicator.guards_gate = True
        elif replicator.guards_gate:
            replicator.stop_guarding()

    def _set_gate_expiry(self) -> None:
        # Only a leader opens the gate; it must not outlive the lease (see proxy.gate).
        self.gate.expires_at = self._deadline() if self.gate.opened else None

    async def keepalive(self) -> None:
        """Hold a lease: grant one when there is none, renew it every keepalive_interval."""
        ttl = math.ceil(self.timing.lease_ttl)
        while True:
            sent = time.monotonic()
            if self.lease is None and self.state.role is ha.Role.FENCED:
                # A fenced node tears down before it does anything else: a new lease
                # waits until the loop has it standing by.
                await trio.sleep(self.timing.keepalive_interval)
                continue
            try:
                if self.lease is None:
                    self.lease = await self.coord.grant_lease(ttl)
                    self.events.emit("lease.granted", lease=self.lease.id, ttl=self.lease.ttl)
                    self.wake()
                else:
                    await self.coord.keepalive(self.lease)
                self.last_keepalive_sent = self.last_renewal_sent = sent
                self._set_reachable(True)
            except LeaseLost:
                self.events.emit("lease.lost", lease=self.lease.id if self.lease else None)
                self.lease = self.last_keepalive_sent = None
                self.wake()
                continue
            except CoordUnavailable as e:
                log.warning("etcd: lease keepalive failed: %s", e)
                self._set_reachable(False)
            except CoordError as e:  # not renewed either: the deadline decides, not a crash
                log.error("etcd: lease keepalive refused: %s", e)
            await trio.sleep(max(0.0, sent + self.timing.keepalive_interval - time.monotonic()))

    async def watch(self) -> None:
        """Wake the loop whenever one of the pair's etcd keys changes."""
        while True:
            try:
                if await self.coord.wait_change(self.view.revision, timeout=5.0):
                    self.wake()
            except CoordUnavailable:
                await trio.sleep(self.timing.keepalive_interval)
            except CoordError as e:
                log.error("etcd watch: %s", e)
                await trio.sleep(self.timing.keepalive_interval)

    def _set_reachable(self, reachable: bool) -> None:
        if reachable != self.etcd_reachable:
            self.etcd_reachable = reachable
            self.wake()

    # --- observing --------------------------------------------------------------------------

    async def observe(self) -> ha.Snapshot:
        """The facts as of now; etcd's keep their last value while etcd is unreachable.

        While this node leads, reading is cut off at its self-fence deadline (etcd's
        keys then keep their last value), and the local PostgreSQL must answer within
        connect_timeout (else it counts as unreachable), so the step that fences runs
        on time. Woken at the deadline with etcd cut off, the loop read etcd for up to
        request_timeout (3 endpoints) first and fenced half a second late, after the
        earliest moment etcd could expire the lease (found by the chaos suite,
        partition-active-etcd); a paused local PostgreSQL held the loop for good.
        """
        leading = self.state.role in _LEADING
        with trio.move_on_after(self._time_to_fence() if leading else math.inf):
            try:
                self.view = await self.coord.view()
                self._set_reachable(True)
            except CoordUnavailable as e:
                log.debug("etcd: reading the keys failed: %s", e)
                self._set_reachable(False)
            except CoordError as e:  # the keys keep their last value, as when unreachable
                log.error("etcd: reading the keys failed: %s", e)
        local = UNREACHABLE
        budget = self.config.replication.connect_timeout
        if leading:  # the time left now, after reading etcd
            budget = min(budget, self._time_to_fence())
        with trio.move_on_after(budget) as scope:
            local = await self.local.facts()
        if scope.cancelled_caught:
            self.local.abandon()
        self._store_down_since = _down_since(local.reachable, self._store_down_since)
        leader = self.view.leader
        if (
            local.slot_exists
            and self.state.role is ha.Role.STANDBY
            and leader is not None
            and leader.node != self.node
        ):
            await self._drop_stale_slot()
        view, lease = self.view, self.lease
        return ha.Snapshot(
            node=self.node,
            peer=self.config.node.peer,
            etcd_reachable=self.etcd_reachable,
            lease=None if lease is None else lease.id,
            last_keepalive_sent=self.last_keepalive_sent,
            leader=None
            if view.leader is None
            else ha.LeaderKey(view.leader.node, view.leader.epoch, view.leader.lease_id),
            sync_record=None
            if view.sync is None
            else ha.SyncRecord(view.sync.epoch, view.sync.node),
            successor=None
            if view.successor is None
            else ha.Successor(view.successor.node, view.successor.after_epoch),
            store_fence=local.fence,
            primary_epoch=self.primary_epoch,
            replication=self._replica_facts(local.sync_state),
            sync_standby_names_set=local.sync_standby_names_set,
            daemon=_DAEMON_STATES[self.daemon.state],
            keys_present=self.keys.held or self.keys_ready,
            gate_open=self.gate.opened,
            store_unreachable_since=self._store_down_since,
            switchover=None
            if view.switchover is None
            else ha.SwitchoverRequest(view.switchover.epoch, view.switchover.target),
            force_promotion=None
            if view.force is None or view.force.node != self.node
            else ha.ForcePromotion(view.force.epoch, accept_data_loss=True),
        )

    async def _drop_stale_slot(self) -> None:
        # Housekeeping, not a decision: a standby's database is a replica store, and
        # the slot it kept from leading would hold its WAL back forever. Only once
        # another node leads: an agent restarted right after a kill -9 stands by until
        # its own old key expires, and may lead again at once (its store fence shows it
        # led the newest epoch); without its slot its replicator stopped for good ("run
        # haproxy-ln reseed"). Found by the chaos suite, kill-active-agent.
        try:
            await self.local.drop_slot()
            log.info("dropped the replication slot left from leading: this node stands by")
        except HaproxyLnError as e:
            log.warning("dropping the old replication slot: %s", e)

    def _replica_facts(self, sync_state: ha.SyncState | None) -> ha.ReplicaFacts | None:
        replicator = self.replicator
        if replicator is None:
            return None
        status = replicator.status
        self._replica_down_since = _down_since(status.streaming, self._replica_down_since)
        return ha.ReplicaFacts(
            epoch=replicator.epoch,
            unreachable_since=self._replica_down_since,
            caught_up=status.streaming and status.caught_up,
            sync_state=sync_state,
        )

    # --- acting -----------------------------------------------------------------------------

    async def _carry_out(self, action: ha.Action) -> bool:
        """Do `action`, cut off at the self-fence deadline; False (logged) if it failed.

        Past the deadline the actions are the fence itself (kill, destroy the keys, close
        the gate): they are never cut off, or a node cut off from etcd, whose lease is
        still set but expired, would abandon its own teardown at its first checkpoint.
        """
        left = self._time_to_fence()
        with trio.move_on_after(left if left > 0 else math.inf) as scope:
            try:
                await self._do(action)
                return True
            except (HaproxyLnError, OSError, *bridge.CONNECTION_LOST) as e:
                log.warning("%s failed: %s", type(action).__name__, e)
                return False
        if scope.cancelled_caught:
            log.warning("%s cut off at the self-fence deadline", type(action).__name__)
        return False

    async def _do(self, action: ha.Action) -> None:
        match action:
            case ha.KillDaemon():
                await self.daemon.kill("self-fence or lost leadership")
            case ha.DestroyKeys():
                await self.keys.destroy()
                self.keys_ready = False
            case ha.CloseGate(reason=reason, leader=leader):
                self.gate.close(reason, leader)
            case ha.OpenGate():
                self.gate.open()
                self._step_done("gate.opened")
            case ha.AcquireLeader(lease=lease):
                if self.lease is not None and self.lease.id == lease:
                    epoch = await self.coord.campaign(self.lease)
                    if epoch is not None:
                        self._step_done("leader.acquired", epoch=epoch)
            case ha.RaiseFence(epoch=epoch):
                await self.local.raise_fence(epoch, self.node)
                self._step_done("fence.raised", epoch=epoch)
            case ha.PreparePrimary(epoch=epoch):
                await self.local.advance_sequences()
                self._step_done("sequences.moved", epoch=epoch)
                await self.local.bootstrap_primary()
                self._step_done("primary.bootstrapped", epoch=epoch)
                self.primary_epoch = epoch
            case ha.SetSyncStandby(enabled=enabled):
                await self.local.set_sync_standby(enabled)
            case ha.WriteSyncRecord(epoch=epoch, node=node):
                if not await self.coord.write_sync(epoch, node):
                    raise CoordError(f"the sync record was not written: epoch {epoch} is not ours")
                self.events.emit("sync.record", epoch=epoch, replica=node)
            case ha.StartReplicating(epoch=epoch):
                self._start_replicating(epoch)
            case ha.StopReplicating():
                self.stop_replicating()
            case ha.MaterializeKeys():
                await self.keys.materialize()
                self.keys_ready = True
                self.timeline.append(("keys materialized", time.monotonic()))
            case ha.StartDaemon():
                self._nursery.start_soon(self._start_daemon)
            case ha.StopDaemon():
                self._nursery.start_soon(self._stop_daemon)
            case ha.HandOver(successor=successor, epoch=epoch):
                await self.coord.resign(epoch, successor)
            case ha.Resign(epoch=epoch):
                await self.coord.resign(epoch, None)
            case ha.RevokeLease(lease=lease):
                if self.lease is not None and self.lease.id == lease:
                    await self.coord.revoke(self.lease)
                    self.lease = self.last_keepalive_sent = None
            case ha.DropSwitchoverRequest(request=request, reason=reason):
                log.warning("switchover request dropped: %s", reason)
                await self.coord.drop_switchover(
                    SwitchoverRequest(epoch=request.epoch, target=request.target)
                )
            case _:
                raise AssertionError(f"unhandled action {action!r}")

    async def _start_daemon(self) -> None:
        # lnd is ready only once unlocked, so the unlock (which waits for lnd to
        # ask for its password; a no-op for file custody) runs beside the start.
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._unlock)
            try:
                await self.daemon.start()
                self.timeline.append(("daemon ready", time.monotonic()))
            except DaemonFailed as e:
                log.error("the daemon did not start: %s", e)
                nursery.cancel_scope.cancel()
        self.wake()

    async def _unlock(self) -> None:
        try:
            await self.keys.unlock()
        except (HaproxyLnError, OSError) as e:
            log.error("unlocking the daemon's keys: %s", e)

    async def _stop_daemon(self) -> None:
        try:
            await self.daemon.stop()
        except DaemonFailed as e:
            log.error("stopping the daemon: %s", e)
        self.wake()

    def _start_replicating(self, epoch: int) -> None:
        if self.replicator is not None and self.replicator.epoch == epoch:
            return
        self.stop_replicating()
        replicator = Replicator(
            self.config.replication, node=self.node, epoch=epoch, gate=self.gate
        )
        replicator.guards_gate = False  # until the sync record names the replica
        scope = trio.CancelScope()
        self.replicator, self._replicator_scope = replicator, scope
        self._replica_down_since = None
        self._nursery.start_soon(self._replicate, replicator, scope)

    def stop_replicating(self) -> None:
        """Stop this node's replicator, if it runs, and its hold on the gate: what it
        guarded (invariant 5) was its epoch's replica, and a closed gate outlived it.
        A leader whose peer was down then served nothing (found by the chaos suite,
        lose-both-nodes-in-turn)."""
        if self._replicator_scope is not None:
            self._replicator_scope.cancel()
        self.replicator = self._replicator_scope = None
        self.gate.release(GATE_KEY)

    async def _replicate(self, replicator: Replicator, scope: trio.CancelScope) -> None:
        with scope:
            try:
                await replicator.run()
            except* SetupError as group:
                # Final for this epoch (a newer leader fenced the peer's store, or an
                # operator must act): the replica stays unreachable in the snapshot.
                for error in group.exceptions:
                    replicator.status.last_error = str(error)
                    log.error("replication stopped: %s", error)
                replicator.status.streaming = False
                await trio.sleep_forever()


def _down_since(up: bool, since: float | None) -> float | None:
    """Since when something has been down: None while up, else the first time seen down."""
    if up:
        return None
    return time.monotonic() if since is None else since

"""The daemon supervisor: start, await readiness, stop, kill, and notice a death.

How this works: `open_supervisor` gives the HA shell a `DaemonSupervisor`
bound to a nursery. `start()` launches one run of the daemon through a
`Runner` (a child process, or start/stop/kill commands), probes it every
`probe_interval` until ready, and after `start_timeout` kills it and raises
`DaemonFailed`. `stop()` asks it to stop and kills it after `stop_timeout`;
`kill()` kills at once (the self-fence: it never asks). Only one of start and
stop runs at a time; `stop()` and `kill()` take over from whatever is running,
and the interrupted call raises `DaemonFailed`.

The safety record: "daemon.started" is written (fsynced) before the daemon
can run, and "daemon.stopped" only once the runner has seen it gone (the child
reaped, or the stop/kill command confirmed), with `cause` saying why it went:
"stop", "kill", "start_failed" or "exited" (on its own). A checker pairs
them into intervals to prove the daemon never ran on two nodes at once.
Between them come "daemon.ready", "daemon.stopping", "daemon.killed" and
"daemon.start_failed". A daemon that dies on its own turns the state to
FAILED, keeps its exit code in `status()`, and calls `on_change`.

Leaving `open_supervisor` kills a daemon that is still running and waits for
it to be gone (shielded), so the daemon never outlives its supervisor.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import trio

from haproxy_ln.config import DaemonConfig
from haproxy_ln.daemon.child import ChildRunner
from haproxy_ln.daemon.command import CommandRunner
from haproxy_ln.daemon.probes import Probe, ProbeResult, probe_for
from haproxy_ln.daemon.runner import Exit, Runner
from haproxy_ln.errors import DaemonFailed
from haproxy_ln.events import EventLog

__all__ = ["DaemonState", "DaemonStatus", "DaemonSupervisor", "open_supervisor"]

log = logging.getLogger(__name__)


class DaemonState(enum.Enum):
    STOPPED = "stopped"
    STARTING = "starting"
    READY = "ready"
    STOPPING = "stopping"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class DaemonStatus:
    """A snapshot for the HA loop and `/status`."""

    state: DaemonState
    reason: str
    pid: int | None = None
    exit_code: int | None = None
    """The last run's exit status (negative: killed by that signal), when known."""
    since: float = 0.0
    """time.monotonic() of the last change."""


class DaemonSupervisor:
    """Runs the Lightning daemon as `config` says; see the module docstring."""

    def __init__(
        self,
        config: DaemonConfig,
        events: EventLog,
        nursery: trio.Nursery,
        *,
        probe: Probe | None = None,
        on_change: Callable[[DaemonStatus], None] | None = None,
    ) -> None:
        self.config = config
        self._events = events
        self._nursery = nursery
        self._probe = probe or probe_for(config)
        self._on_change = on_change
        self._status = DaemonStatus(DaemonState.STOPPED, "not started", since=time.monotonic())
        self._changed = trio.Event()
        self._run: Runner | None = None
        self._announced = False  # "daemon.started" written for the current run
        self._cause = "exited"  # what "daemon.stopped" will say ended the current run
        self._op: _Op | None = None
        self._last_probe = ProbeResult(False, "not probed yet")

    # --- state ---------------------------------------------------------------------------

    @property
    def state(self) -> DaemonState:
        return self._status.state

    def status(self) -> DaemonStatus:
        return self._status

    async def wait_until(self, *states: DaemonState) -> DaemonStatus:
        """Return the status once the state is one of `states` (at once if it is now)."""
        while self._status.state not in states:
            await self._changed.wait()
        return self._status

    def _set(self, state: DaemonState, reason: str) -> None:
        run = self._run
        exit_code = run.exit.returncode if run and run.exit else self._status.exit_code
        pid = run.pid if run else None
        self._status = DaemonStatus(state, reason, pid, exit_code, time.monotonic())
        log.info("daemon %s: %s", state.value, reason)
        self._changed.set()
        self._changed = trio.Event()
        if self._on_change is not None:
            self._on_change(self._status)

    # --- runner callbacks ----------------------------------------------------------------

    def _announce(self, pid: int | None) -> None:
        self._events.emit("daemon.started", pid=pid, mode=self.config.mode)
        self._announced = True

    def _gone(self, run: Runner, exit: Exit) -> None:
        if not self._announced or run is not self._run:
            return
        self._events.emit(
            "daemon.stopped",
            pid=run.pid,
            code=exit.returncode,
            cause=self._cause,
            detail=exit.detail,
        )
        if self._cause == "exited":
            self._set(DaemonState.FAILED, f"the daemon {exit.detail} on its own")

    def _new_run(self) -> Runner:
        c = self.config
        run: Runner
        if c.mode == "child":
            assert c.command is not None
            run = ChildRunner(c.command, self._announce, lambda exit: self._gone(run, exit))
        else:
            assert c.start is not None and c.stop is not None and c.kill is not None
            run = CommandRunner(
                start=c.start,
                stop=c.stop,
                kill=c.kill,
                status=c.status,
                stop_timeout=c.stop_timeout,
                kill_timeout=c.kill_timeout,
                interval=c.probe_interval,
                status_timeout=c.probe_timeout,
                on_started=self._announce,
                on_gone=lambda exit: self._gone(run, exit),
            )
        return run

    def _running(self) -> Runner | None:
        """The current run if the daemon may be running."""
        run = self._run
        return run if run is not None and run.exit is None else None

    # --- operations ----------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _operation(self, name: str) -> AsyncIterator[_Op]:
        """Run one operation; stop() and kill() may cancel its scope to take over."""
        op = _Op(name, trio.CancelScope(), trio.Event())
        self._op = op
        try:
            with op.scope:
                yield op
        except DaemonFailed:
            raise
        except BaseException:
            # Cancelled from outside (or a bug): leave no daemon running behind us.
            with trio.CancelScope(shield=True):
                await self._kill_quietly(f"{name} was cancelled")
            raise
        finally:
            if self._op is op:
                self._op = None
            op.done.set()

    def _interrupt(self, by: str) -> _Op | None:
        """Cancel the operation under way, if any, so that `by` can take over."""
        op = self._op
        if op is not None:
            op.interrupted_by = by
            op.scope.cancel()
        return op

    async def start(self) -> None:
        """Start the daemon; return once the readiness probe says it is ready.

        Returns at once if it is ready already. Raises DaemonFailed if it
        exits or is not ready within start_timeout (it is then killed), if
        stop() or kill() interrupts it, or if a start or stop is under way.
        If the caller is cancelled, the daemon is killed before Cancelled
        propagates.
        """
        if self.state is DaemonState.READY:
            return
        if self._op is not None:
            raise DaemonFailed(f"cannot start while {self._op.name} is under way")
        if self._running() is not None:
            raise DaemonFailed("cannot start: the last run may still be running; kill() it first")
        if self.config.mode == "none":
            self._set(DaemonState.READY, 'mode = "none": haproxy-ln runs no daemon')
            return
        run = self._run = self._new_run()
        self._announced, self._cause = False, "exited"
        timeout = self.config.start_timeout
        self._set(DaemonState.STARTING, f"starting; probe {self._probe.describe()}")
        began = trio.current_time()
        self._last_probe = ProbeResult(False, "not probed yet")
        failure: str | None = None
        async with self._operation("start") as op:
            with trio.move_on_after(timeout) as timer:
                try:
                    await run.launch(self._nursery)
                    failure = await self._wait_ready(run)
                except DaemonFailed as e:
                    failure = str(e)
            if timer.cancelled_caught:
                failure = f"not ready within {timeout:g} s; last probe: {self._last_probe.detail}"
        if op.scope.cancelled_caught:
            raise DaemonFailed(f"start interrupted by {op.interrupted_by}")
        if failure is None:
            took = trio.current_time() - began
            self._events.emit("daemon.ready", pid=run.pid, seconds=round(took, 3))
            self._set(DaemonState.READY, f"ready after {took:.1f} s: {self._last_probe.detail}")
            return
        self._events.emit("daemon.start_failed", pid=run.pid, reason=failure)
        if run.exit is None:
            self._cause = "start_failed"
            async with self._operation("start cleanup"):
                await self._kill_run(run, failure)
        self._set(DaemonState.FAILED, failure)
        raise DaemonFailed(failure)

    async def _wait_ready(self, run: Runner) -> str | None:
        """Probe until ready (None) or the daemon is gone (why)."""
        async with trio.open_nursery() as nursery:

            async def cancel_when_gone() -> None:
                await run.wait_gone()
                nursery.cancel_scope.cancel()

            nursery.start_soon(cancel_when_gone)
            while True:
                self._last_probe = await self._probe.check()
                if self._last_probe.ready:
                    break
                log.debug("daemon not ready: %s", self._last_probe.detail)
                await trio.sleep(self.config.probe_interval)
            nursery.cancel_scope.cancel()
        if run.exit is not None:
            return f"the daemon {run.exit.detail} before it was ready"
        return None

    async def stop(self) -> None:
        """Stop the daemon: SIGTERM to its process group (or the stop command), and kill
        it after stop_timeout. Returns once it is gone (at once if nothing runs).

        Interrupts a start under way. Raises DaemonFailed if it cannot be
        confirmed gone even after the kill (state FAILED), or if kill()
        takes over and fails.
        """
        op = self._op
        if op is not None and op.name != "start":
            return await self._outcome_of_other_stop()
        if op is not None:
            self._interrupt("stop()")
            await op.done.wait()
        run = self._running()
        if run is None:
            self._settle("stopped")
            return None
        timeout = self.config.stop_timeout
        async with self._operation("stop") as op:
            self._cause = "stop"
            self._set(DaemonState.STOPPING, f"stopping; killed if not gone within {timeout:g} s")
            self._events.emit("daemon.stopping", pid=run.pid)
            with trio.move_on_after(timeout):
                if await run.terminate():
                    await run.wait_gone()
            if run.exit is None:
                await self._kill_run(run, f"still running {timeout:g} s after stop was asked")
        if op.scope.cancelled_caught:  # kill() took over
            return await self._outcome_of_other_stop()
        self._settle("stopped")
        return None

    async def _outcome_of_other_stop(self) -> None:
        """Wait for the stop or kill under way; raises DaemonFailed if it leaves a daemon."""
        await self.wait_until(DaemonState.STOPPED, DaemonState.FAILED)
        if self._running() is not None:
            raise DaemonFailed(f"the daemon may still be running: {self._status.reason}")

    async def kill(self, reason: str = "kill() called") -> None:
        """Kill the daemon at once, never asking it first, and return once it is gone.

        For a child the SIGKILL to its process group is sent before this
        first yields, so it happens even if the caller is then cancelled.
        Interrupts a start or stop under way. Raises DaemonFailed if the
        daemon is not gone within kill_timeout (state FAILED).
        """
        run = self._running()
        op = self._op
        if run is None:
            if op is not None:
                self._interrupt(f"kill ({reason})")
                await op.done.wait()
            self._settle(f"killed ({reason})")
            return
        if op is not None and op.name == "kill":
            await run.kill()  # again: cheap, and the caller wants it now
            return await self._outcome_of_other_stop()
        self._cause = "kill"
        delivered = await run.kill()
        self._interrupt(f"kill ({reason})")
        self._events.emit("daemon.killed", pid=run.pid, reason=reason, delivered=delivered)
        if op is not None:
            await op.done.wait()
        async with self._operation("kill"):
            self._set(DaemonState.STOPPING, f"killed ({reason})")
            await self._wait_killed(run, reason, delivered)
        self._settle(f"killed ({reason})")
        return None

    async def _kill_run(self, run: Runner, why: str) -> None:
        """Kill `run` and wait up to kill_timeout for it to be gone; raises DaemonFailed if not."""
        delivered = await run.kill()
        self._events.emit("daemon.killed", pid=run.pid, reason=why, delivered=delivered)
        await self._wait_killed(run, why, delivered)

    async def _wait_killed(self, run: Runner, why: str, delivered: bool) -> None:
        if delivered:
            with trio.move_on_after(self.config.kill_timeout):
                await run.wait_gone()
        if run.exit is None:
            what = "still running" if delivered else "the kill failed and it may still be running"
            reason = f"{why}; {what} after {self.config.kill_timeout:g} s"
            self._set(DaemonState.FAILED, reason)
            raise DaemonFailed(reason)

    async def _kill_quietly(self, why: str) -> None:
        """Kill whatever runs, logging instead of raising (for cleanup paths)."""
        run = self._running()
        if run is None:
            if self.state in (DaemonState.STARTING, DaemonState.STOPPING):
                self._settle(f"stopped ({why})")  # e.g. cancelled before anything ran
            return
        self._cause = "kill"
        try:
            await self._kill_run(run, why)
        except DaemonFailed as e:
            log.error("daemon: %s", e)
            return
        self._settle(f"killed ({why})")

    def _settle(self, how: str) -> None:
        """Nothing runs any more, as asked: say so (a FAILED state becomes STOPPED)."""
        run = self._run
        detail = f": {run.exit.detail}" if run is not None and run.exit is not None else ""
        self._set(DaemonState.STOPPED, how + detail)

    async def aclose(self) -> None:
        """Kill the daemon if it runs and wait (shielded) until it is gone or kill_timeout."""
        with trio.CancelScope(shield=True):
            op = self._interrupt("shutdown")
            await self._kill_quietly("the supervisor is closing")
            if op is not None:
                await op.done.wait()
            run = self._running()
            if run is not None:
                log.error("daemon (pid %s) may still run; no longer waiting for it", run.pid)
                run.abandon()


@dataclass(slots=True)
class _Op:
    """The start, stop or kill under way (mutable: `interrupted_by` is set later)."""

    name: str
    scope: trio.CancelScope
    done: trio.Event
    interrupted_by: str = "another operation"


@contextlib.asynccontextmanager
async def open_supervisor(
    config: DaemonConfig,
    events: EventLog,
    *,
    probe: Probe | None = None,
    on_change: Callable[[DaemonStatus], None] | None = None,
) -> AsyncIterator[DaemonSupervisor]:
    """A supervisor for the daemon `config` describes, alive for the `async with` block.

    On leaving the block a daemon still running is killed (see `aclose`).
    """
    async with trio.open_nursery() as nursery:
        supervisor = DaemonSupervisor(config, events, nursery, probe=probe, on_change=on_change)
        try:
            yield supervisor
        finally:
            await supervisor.aclose()
            nursery.cancel_scope.cancel()

"""Command mode: the daemon started, stopped and killed by commands (e.g. systemctl).

How this works: `launch` records the start (`on_started(None)`: no pid is
ours to know) and then runs the start command; a failed start command raises,
and the supervisor then runs the kill command. The daemon counts as gone when
a stop or kill command has succeeded and, if a status command is configured,
the status command has then exited non-zero (`systemctl kill` returns before
the processes are gone, so only the status command can confirm it). While
the daemon runs, the status command is also polled every `interval` seconds,
which is how a daemon that died on its own is noticed; without a status
command it is not noticed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import trio

from haproxy_ln.daemon.commands import CommandOutcome, run_command
from haproxy_ln.daemon.runner import Exit, Runner
from haproxy_ln.errors import DaemonFailed

__all__ = ["CommandRunner"]


class CommandRunner(Runner):
    """Runs the daemon through start / stop / kill (and optional status) commands."""

    def __init__(
        self,
        *,
        start: Sequence[str],
        stop: Sequence[str],
        kill: Sequence[str],
        status: Sequence[str] | None,
        stop_timeout: float,
        kill_timeout: float,
        interval: float,
        status_timeout: float,
        on_started: Callable[[int | None], None],
        on_gone: Callable[[Exit], None],
    ) -> None:
        super().__init__(on_started, on_gone)
        self._start, self._stop, self._kill = tuple(start), tuple(stop), tuple(kill)
        self._status = tuple(status) if status else None
        self._stop_timeout = stop_timeout
        self._kill_timeout = kill_timeout
        self._interval = interval
        self._status_timeout = status_timeout
        self._nursery: trio.Nursery | None = None

    async def launch(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery
        self._on_started(None)
        outcome = await run_command(self._start, float("inf"))  # bounded by start_timeout
        if not outcome.ok:
            raise DaemonFailed(f"start command failed: {outcome}")
        if self._status is not None:
            nursery.start_soon(self._watch)

    async def _status_says_gone(self) -> CommandOutcome | None:
        """The status command's outcome if it says the daemon is gone, else None."""
        assert self._status is not None
        outcome = await run_command(self._status, self._status_timeout)
        # A status command that timed out or could not run says nothing either way.
        return outcome if outcome.returncode not in (0, None) else None

    async def _watch(self) -> None:
        while self.exit is None:
            gone = await self._status_says_gone()
            if gone is not None:
                self._set_gone(Exit(None, f"status command {gone.detail}"))
                return
            await trio.sleep(self._interval)

    async def _confirm_gone(self, how: str) -> None:
        if self._status is None:
            self._set_gone(Exit(None, how))  # the command's word is all we have
            return
        while self.exit is None:
            gone = await self._status_says_gone()
            if gone is not None:
                self._set_gone(Exit(None, f"{how}; status command {gone.detail}"))
                return
            await trio.sleep(self._interval)

    def _start_confirming(self, how: str) -> None:
        assert self._nursery is not None, "launch() first"
        self._nursery.start_soon(self._confirm_gone, how)

    async def terminate(self) -> bool:
        outcome = await run_command(self._stop, self._stop_timeout)
        if outcome.ok:
            self._start_confirming("stopped by the stop command")
        return outcome.ok

    def abandon(self) -> None:
        """Nothing to let go of: our commands never outlive their timeouts."""

    async def kill(self) -> bool:
        outcome = await run_command(self._kill, self._kill_timeout)
        if outcome.ok:
            self._start_confirming("killed by the kill command")
        return outcome.ok

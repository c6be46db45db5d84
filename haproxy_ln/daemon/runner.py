"""What the supervisor needs from a way of running the daemon (child process, or commands).

How this works: one `Runner` object stands for one run of the daemon, from
launch until it is gone. It reports two moments through callbacks given at
construction: `on_started(pid)` just before the daemon can run (the supervisor
records "daemon.started" there, so the record always precedes the daemon), and
`on_gone(exit)` once the daemon is really gone. The supervisor decides when
to ask for a graceful stop and when to kill; the runner only carries it out.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass

import trio

__all__ = ["Exit", "Runner"]


@dataclass(frozen=True, slots=True)
class Exit:
    """How a run ended."""

    returncode: int | None
    """The daemon's exit status (negative: killed by that signal); None when not known."""
    detail: str
    """In words, e.g. "killed by SIGKILL" or "status command exited with code 3"."""


class Runner(abc.ABC):
    """One run of the daemon; see the module docstring."""

    def __init__(
        self, on_started: Callable[[int | None], None], on_gone: Callable[[Exit], None]
    ) -> None:
        self._on_started = on_started
        self._on_gone = on_gone
        self._gone = trio.Event()
        self.exit: Exit | None = None
        """Set once the daemon is gone (or was never started)."""
        self.pid: int | None = None
        """The daemon's pid, once known (never, with start/stop commands)."""

    @abc.abstractmethod
    async def launch(self, nursery: trio.Nursery) -> None:
        """Start the daemon, calling `on_started` just before it can run.

        Raises DaemonFailed if it cannot be started; if `on_started` was
        called, the caller must then kill it to be sure it is gone.
        """

    @abc.abstractmethod
    async def terminate(self) -> bool:
        """Ask the daemon to stop; False if the request itself failed (escalate at once)."""

    @abc.abstractmethod
    async def kill(self) -> bool:
        """Kill the daemon now; False if the kill could not be carried out."""

    @abc.abstractmethod
    def abandon(self) -> None:
        """Stop waiting for the daemon to go (it outlived its kill); it may still run."""

    async def wait_gone(self) -> Exit:
        """Return once the daemon is gone."""
        await self._gone.wait()
        assert self.exit is not None
        return self.exit

    def _set_gone(self, exit: Exit) -> None:
        if self.exit is not None:
            return
        self.exit = exit
        self._gone.set()
        self._on_gone(exit)

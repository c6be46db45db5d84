"""Child mode: the daemon as our child process, in a process group of its own.

How this works: we spawn the launcher (see `_helper.py`) in a new session, so
its pid is also its process-group id; it waits for a "go" byte before it
execs the daemon in place. Next we spawn the guard, which holds the read end
of a lifeline pipe whose write end only this process holds: if we die in any
way, even by SIGKILL, the kernel closes the pipe and the guard SIGKILLs the
daemon's whole group. Only then do we call `on_started(pid)` (the durable
"daemon.started" record) and say go. An exec failure comes back over a
close-on-exec status pipe, so "no such file" is a clear error, not a bare
exit code.

A reaper task waits, without reaping, for the daemon to exit (a pidfd turns
readable): while the exited daemon is an unreaped zombie its group id cannot
be reused, so we SIGKILL the group then (helpers the daemon left behind die
with it), release the guard, and only then reap and report the daemon gone.
The reaper is shielded from cancellation: whoever cancels the supervisor
kills the daemon first, and "gone" is reported only when it is.

Why not `prctl(PR_SET_PDEATHSIG)`: it fires when the parent *thread* exits,
and trio spawns processes from worker threads that exit after 10 s idle,
which would kill a healthy daemon; it also only reaches the daemon, not its
helpers. Why not `local.ports.Supervised`: it is blocking (subprocess and
readline, not trio), signals only the daemon's pid rather than its group,
stops it with SIGTERM and a grace period when we die where a fenced node must
SIGKILL at once, and sits between us and the daemon, which hides the
daemon's exit status.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import trio

from haproxy_ln.daemon._helper import GO, RELEASE
from haproxy_ln.daemon.commands import describe_exit
from haproxy_ln.daemon.runner import Exit, Runner
from haproxy_ln.errors import DaemonFailed

__all__ = ["ChildRunner"]

HELPER = str(Path(__file__).with_name("_helper.py"))
# -I: ignore PYTHON* variables and the user's site; -S: no site-packages (stdlib only).
PYTHON = (sys.executable, "-I", "-S", HELPER)


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, sig)


class _Pipes:
    """Pipe ends not yet handed on: each closed exactly once (a number closed twice may
    by then belong to someone else)."""

    def __init__(self) -> None:
        self._open: set[int] = set()

    def open(self) -> tuple[int, int]:
        r, w = os.pipe()  # close-on-exec: no other child inherits them by accident
        self._open |= {r, w}
        return r, w

    def take(self, fd: int) -> int:
        """Hand `fd` on to a new owner, who closes it."""
        self._open.remove(fd)
        return fd

    def close(self, *fds: int) -> None:
        for fd in fds:
            self._open.remove(fd)
            os.close(fd)

    def close_all(self) -> None:
        for fd in self._open:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._open.clear()


async def _read_all(fd: int) -> bytes:
    """Read the pipe `fd` to EOF (closes it)."""
    chunks = []
    async with trio.lowlevel.FdStream(fd) as stream:
        while chunk := await stream.receive_some():
            chunks.append(chunk)
    return b"".join(chunks)


class ChildRunner(Runner):
    """Runs `argv` as the daemon; see the module docstring."""

    def __init__(
        self,
        argv: Sequence[str],
        on_started: Callable[[int | None], None],
        on_gone: Callable[[Exit], None],
    ) -> None:
        super().__init__(on_started, on_gone)
        self.argv = tuple(argv)
        self._proc: trio.Process | None = None
        self._guard: trio.Process | None = None
        self._lifeline: int | None = None  # write end; only we hold it
        self._killed = False
        self._reaping = False
        self._reap_scope = trio.CancelScope(shield=True)

    async def launch(self, nursery: trio.Nursery) -> None:
        pipes = _Pipes()
        go_r, go_w = pipes.open()
        status_r, status_w = pipes.open()
        life_r, life_w = pipes.open()
        started = False
        try:
            try:
                self._proc = await trio.lowlevel.open_process(
                    [*PYTHON, "launch", str(go_r), str(status_w), "--", *self.argv],
                    pass_fds=(go_r, status_w),
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,
                )
                pipes.close(go_r, status_w)
                self._guard = await trio.lowlevel.open_process(
                    [*PYTHON, "guard", str(self._proc.pid)],
                    stdin=life_r,
                    stdout=subprocess.DEVNULL,  # not to hold a pipe our reader waits on
                    start_new_session=True,
                )
                pipes.close(life_r)
            except OSError as e:
                raise DaemonFailed(f"cannot start {self.argv[0]!r}: {e.strerror or e}") from None
            self._lifeline = pipes.take(life_w)
            self.pid = self._proc.pid
            self._reaping = True
            nursery.start_soon(self._reap, self._proc, self._guard)
            if self._killed:
                raise DaemonFailed("killed before it was started")
            # No checkpoint from here to "go": the record precedes the daemon.
            self._on_started(self.pid)
            started = True
            try:
                os.write(go_w, GO)
            except OSError as e:
                raise DaemonFailed(f"the launcher went away: {e.strerror or e}") from None
            status = pipes.take(status_r)
        finally:
            pipes.close_all()  # closing go_w unsent makes the launcher exit without running
            if not started:
                await self._abort()
        problem = await _read_all(status)
        if problem:
            await self._gone.wait()  # the launcher exits right after saying why
            raise DaemonFailed(problem.decode(errors="replace"))

    async def _abort(self) -> None:
        """Undo a launch that never said go: nothing ran, so no "gone" is worth reporting."""
        with trio.CancelScope(shield=True):
            if self._proc is not None:
                _signal_group(self._proc.pid, signal.SIGKILL)
            if self._reaping:
                await self._gone.wait()
                return
            self._release_guard()
            code = None if self._proc is None else await self._proc.wait()
            if self._guard is not None:
                await self._guard.wait()
            self._set_gone(Exit(code, "never started"))

    async def _wait_exited(self, pid: int) -> None:
        """Return once `pid` has exited, leaving it unreaped (a zombie)."""
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:  # no pidfd (old kernel, seccomp): a thread blocked in waitid
            await trio.to_thread.run_sync(
                os.waitid, os.P_PID, pid, os.WEXITED | os.WNOWAIT, abandon_on_cancel=True
            )
            return
        try:
            await trio.lowlevel.wait_readable(pidfd)
        finally:
            trio.lowlevel.notify_closing(pidfd)
            os.close(pidfd)

    async def _reap(self, proc: trio.Process, guard: trio.Process) -> None:
        with self._reap_scope:
            await self._wait_exited(proc.pid)
            _signal_group(proc.pid, signal.SIGKILL)  # helpers left behind; the id is still ours
            self._release_guard()
            code = await proc.wait()
            await guard.wait()
            self._set_gone(Exit(code, describe_exit(code)))

    def _release_guard(self) -> None:
        if self._lifeline is not None:
            with contextlib.suppress(OSError):
                os.write(self._lifeline, RELEASE)
            os.close(self._lifeline)
            self._lifeline = None

    async def terminate(self) -> bool:
        if self._proc is not None and self.exit is None:
            _signal_group(self._proc.pid, signal.SIGTERM)
        return True

    async def kill(self) -> bool:
        self._killed = True
        if self._proc is not None and self.exit is None:
            _signal_group(self._proc.pid, signal.SIGKILL)
        return True

    def abandon(self) -> None:
        """Stop waiting for a daemon that outlived SIGKILL (e.g. stuck in the kernel)."""
        self._reap_scope.cancel()

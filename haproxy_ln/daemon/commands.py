"""Run an operator's command (start, stop, kill, status, probe) with a time limit.

How this works: the command runs in a session of its own, so that on timeout
(or cancellation) SIGKILL goes to its whole process group, helpers included,
before we reap it; the result says how it ended in words an operator can act
on. Its output goes where ours goes (the journal under systemd) and is never
captured: it is not ours to put into errors or events, which must never carry
a secret.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass

import trio

__all__ = ["CommandOutcome", "describe_exit", "run_command"]


def describe_exit(returncode: int) -> str:
    """A returncode in words: "exited with code 3" or "killed by SIGKILL"."""
    if returncode >= 0:
        return f"exited with code {returncode}"
    try:
        return f"killed by {signal.Signals(-returncode).name}"
    except ValueError:
        return f"killed by signal {-returncode}"


@dataclass(frozen=True, slots=True)
class CommandOutcome:
    """How one run of a command ended."""

    program: str
    returncode: int | None
    """The exit status (negative: killed by that signal); None if it never ran or timed out."""
    detail: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def __str__(self) -> str:
        return f"{self.program} {self.detail}"


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


async def run_command(argv: Sequence[str], timeout: float) -> CommandOutcome:
    """Run `argv` and wait up to `timeout` seconds for it to exit.

    Never raises for a command that fails, cannot be found or times out: the
    outcome says which. On timeout or cancellation its process group is
    SIGKILLed and reaped before this returns (or re-raises Cancelled).
    """
    program = os.path.basename(argv[0])
    try:
        proc = await trio.lowlevel.open_process(
            list(argv), stdin=subprocess.DEVNULL, start_new_session=True
        )
    except OSError as e:
        return CommandOutcome(program, None, f"cannot run: {e.strerror or e}")
    try:
        with trio.move_on_after(timeout):
            code = await proc.wait()
            return CommandOutcome(program, code, describe_exit(code))
        return CommandOutcome(program, None, f"did not finish within {timeout:g} s; killed")
    finally:
        if proc.returncode is None:  # not reaped yet, so its group id is still its own
            _kill_group(proc.pid)
            with trio.CancelScope(shield=True):
                await proc.wait()

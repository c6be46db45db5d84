"""The two tiny processes around a child-mode daemon: the launcher and the guard.

How this works: this file runs as a script (`python -I -S _helper.py ROLE ...`),
importing only the standard library, so it starts in a few milliseconds and
never imports the agent.

`launch GO_FD STATUS_FD -- ARGV...` is the daemon's process before it is the
daemon. The agent spawns it in a new session (so its pid is also the
process-group id), records "daemon.started" with that pid, and only then
writes one byte to GO_FD. The launcher then execs ARGV in place, keeping the
pid. If GO_FD reaches EOF instead (the agent died before recording the start),
it exits without running anything. STATUS_FD is close-on-exec: a successful
exec closes it, a failed one writes the reason there first.

`guard PGID` watches a lifeline pipe on stdin whose write end only the agent
holds. Reading "q" means the agent has seen the daemon go and releases the
guard. Reading EOF without "q" means the agent is gone (even by SIGKILL), so
the guard SIGKILLs the whole process group: no daemon outlives its agent. The
guard runs in a session of its own, so signals to the daemon's group or to the
agent's terminal do not reach it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys

GO = b"g"
RELEASE = b"q"
EXIT_NOT_STARTED = 125  # the agent never said go
EXIT_CANNOT_EXEC = 127  # like a shell's "command not found"


def _launch(go_fd: int, status_fd: int, argv: list[str]) -> int:
    try:
        go = os.read(go_fd, 1)
    except OSError:
        go = b""
    if go != GO:
        return EXIT_NOT_STARTED
    os.close(go_fd)
    os.set_inheritable(status_fd, False)  # closed by a successful exec
    # The daemon must not talk to the agent's systemd notify socket.
    for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        os.environ.pop(name, None)
    # Python ignores these at startup, and ignored signals stay ignored across exec.
    for sig in (signal.SIGPIPE, signal.SIGXFSZ):
        signal.signal(sig, signal.SIG_DFL)
    try:
        os.execvp(argv[0], argv)
    except OSError as e:
        os.write(status_fd, f"cannot run {argv[0]!r}: {e.strerror or e}".encode())
    return EXIT_CANNOT_EXEC


def _guard(pgid: int) -> int:
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    while True:
        try:
            data = os.read(0, 64)
        except InterruptedError:
            continue
        if RELEASE in data:
            return 0
        if not data:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
            return 0


def main(args: list[str]) -> int:
    """Run one role; see the module docstring."""
    if len(args) >= 4 and args[0] == "launch" and args[3] == "--" and len(args) > 4:
        return _launch(int(args[1]), int(args[2]), args[4:])
    if len(args) == 2 and args[0] == "guard":
        return _guard(int(args[1]))
    print(f"usage: {sys.argv[0]} launch GO_FD STATUS_FD -- ARGV... | guard PGID", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

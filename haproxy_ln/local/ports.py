"""Loopback ports and child-server lifetimes shared by the local servers.

How this works: `free_port` picks an unused loopback port at random below
the kernel's ephemeral range (`ip_local_port_range`), checking it by
binding it. The port is released before the server binds it, so callers
retry on EADDRINUSE; but no outgoing connection can take it in between,
as those get their local port from the ephemeral range. (Ports from that
range did collide: an agent whose proxy port a connection had taken in
the meantime exited at start.) `Supervised` runs a server under a small supervisor
process (`_supervise`, run with `python -c`). The supervisor starts the server,
reports its pid, reaps it when it exits, and watches a "lifeline" pipe from
us: when the pipe closes (our `close()`, or this Python process dying in any
way, even SIGKILL) it sends the server its stop signals one after another,
waiting `grace` seconds after each. So a server never outlives the process
that started it, whatever thread started it. A process that must be the
direct child (an agent, whose tests SIGKILL and SIGSTOP it and read its exit
code) is spawned with `die_with_parent` instead: the kernel SIGKILLs it when
the thread that spawned it ends, the process with it.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import pwd
import random
import select
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any, Self

from haproxy_ln.errors import HaproxyLnError

LOOPBACK = "127.0.0.1"
EPHEMERAL_RANGE = "/proc/sys/net/ipv4/ip_local_port_range"
FIRST_PORT = 10000  # below it are the well-known defaults (PostgreSQL's 5432, etcd's 2379)
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
SUPERVISOR = f"import sys; from {__name__} import _supervise; sys.exit(_supervise(sys.argv[1:]))"


class LocalServerError(HaproxyLnError):
    """A local test server could not be set up, started or used."""


class LocalServer:
    """A server with start() and stop(), usable as a context manager."""

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def free_ports(count: int) -> list[int]:
    """Return `count` distinct loopback TCP ports that were free a moment ago.

    They come from below the ephemeral range when it leaves room (see the
    module docstring), else from the kernel. The sockets are all open at
    once, so the ports differ from each other; another process may still
    bind one before the caller does.
    """
    socks: list[socket.socket] = []
    try:
        candidates = _below_ephemeral()
        while len(socks) < count:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            socks.append(s)
            for port in candidates:
                with contextlib.suppress(OSError):
                    s.bind((LOOPBACK, port))
                    break
            else:
                s.bind((LOOPBACK, 0))
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def _below_ephemeral() -> Iterator[int]:
    """Random ports from FIRST_PORT up to the ephemeral range; a few, not all of them."""
    try:
        low = int(Path(EPHEMERAL_RANGE).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return iter(())
    if low - FIRST_PORT < 1000:
        return iter(())
    return (random.randrange(FIRST_PORT, low) for _ in range(100))


def free_port() -> int:
    """Return one loopback TCP port that was free a moment ago."""
    return free_ports(1)[0]


def scratch_dir(prefix: str = "haproxy-ln-") -> Path:
    """Create a fresh directory under the system temp dir for local servers.

    It is mode 0755 so the `postgres` user can reach clusters inside it when
    we run as root; the caller removes it (shutil.rmtree) when done.
    """
    path = Path(tempfile.mkdtemp(prefix=prefix))
    path.chmod(0o755)
    return path


def pid_alive(pid: int) -> bool:
    """Whether `pid` is a live process (a zombie counts as dead)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def log_size(path: Path) -> int:
    """Current size of a log file (0 if it does not exist yet)."""
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def read_log(path: Path, offset: int = 0, *, tail: int | None = None) -> str:
    """A log file's text from byte `offset`, or only its last `tail` lines ("" if missing)."""
    try:
        with path.open("rb") as log:
            log.seek(offset)
            text = log.read().decode(errors="replace")
    except FileNotFoundError:
        return ""
    return text if tail is None else "\n".join(text.splitlines()[-tail:])


def as_user(user: str | None) -> dict[str, Any]:
    """`subprocess` keyword arguments that run a child as OS user `user` (None: as us).

    Raises `KeyError` if there is no such user.
    """
    if user is None:
        return {}
    pw = pwd.getpwnam(user)
    return {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}


def die_with_parent() -> Callable[[], None]:
    """A `preexec_fn` for `subprocess.Popen`: the child gets SIGKILL when the
    thread that spawns it ends (prctl PR_SET_PDEATHSIG), so call it from a
    thread that lives as long as the child should, such as the main thread."""
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    parent = os.getpid()

    def arm() -> None:  # in the child, between fork and exec
        if prctl(PR_SET_PDEATHSIG, signal.SIGKILL) != 0 or os.getppid() != parent:
            os._exit(127)  # cannot be tied to the parent, or it is already gone

    return arm


class Supervised:
    """A server process that dies with us; see the module docstring.

    Raises `LocalServerError` if the supervisor cannot start the server.
    """

    def __init__(
        self,
        argv: Sequence[str],
        *,
        log: Path,
        cwd: Path,
        user: str | None = None,
        stop_signals: Sequence[signal.Signals] = (signal.SIGTERM, signal.SIGKILL),
        grace: float = 10.0,
    ) -> None:
        cmd = [sys.executable, "-c", SUPERVISOR, "--grace", str(grace)]
        cmd += ["--signals", ",".join(s.name for s in stop_signals)]
        if user is not None:
            cmd += ["--user", user]
        self._grace = grace * len(stop_signals) + 5
        with log.open("ab") as log_file:
            self._proc = subprocess.Popen(
                [*cmd, "--", *argv],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log_file,
                cwd=cwd,
                start_new_session=True,
            )
        assert self._proc.stdout is not None
        line = self._proc.stdout.readline()
        if not line.strip().isdigit():
            self._proc.wait()
            raise LocalServerError(f"could not start {argv[0]}; see {log}")
        self.pid = int(line)
        """Pid of the server itself (not of the supervisor)."""

    def running(self) -> bool:
        """Whether the server has not exited yet (its supervisor exits right after it)."""
        return self._proc.poll() is None

    def wait(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for the server to exit; True if it has."""
        try:
            self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return False
        return True

    def kill(self) -> None:
        """SIGKILL the server now (no-op if it is gone)."""
        if self.running():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)

    def close(self) -> None:
        """Cut the lifeline, so the supervisor stops the server, and wait for both.

        Never raises; idempotent.
        """
        if self._proc.stdin is not None and not self._proc.stdin.closed:
            self._proc.stdin.close()
        if not self.wait(self._grace):
            self.kill()
            self._proc.kill()
            self._proc.wait()
        if self._proc.stdout is not None:
            self._proc.stdout.close()


def _supervise(argv: Sequence[str]) -> int:
    """Supervisor entry point: run the server, stop it when stdin closes."""
    parser = argparse.ArgumentParser(prog="haproxy-ln-supervisor")
    parser.add_argument("--grace", type=float, required=True)
    parser.add_argument("--signals", required=True)
    parser.add_argument("--user")
    parser.add_argument("cmd", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    stop_requested = False

    def request_stop(signum: int, frame: FrameType | None) -> None:
        nonlocal stop_requested
        stop_requested = True

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGHUP, request_stop)
    child = subprocess.Popen(
        cmd, stdin=subprocess.DEVNULL, stdout=2, stderr=2, **as_user(args.user)
    )
    print(child.pid, flush=True)
    while child.poll() is None and not stop_requested:
        readable, _, _ = select.select([0], [], [], 0.1)
        if readable and not os.read(0, 4096):
            stop_requested = True
    for name in args.signals.split(","):
        if child.poll() is not None:
            break
        child.send_signal(signal.Signals[name])
        deadline = time.monotonic() + args.grace
        while child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
    return child.wait()

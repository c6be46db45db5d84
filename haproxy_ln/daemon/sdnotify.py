"""systemd notifications (READY=1, STATUS=, WATCHDOG=1, STOPPING=1) and the watchdog pinger.

How this works: under a `Type=notify` unit, systemd puts the path of a
datagram socket in `$NOTIFY_SOCKET` (a leading "@" means Linux's abstract
namespace, written with a NUL byte in the address). A notification is one
datagram of newline-separated `NAME=value` lines, sent with one `sendto`. That
is all of the protocol we need, so it is written here rather than taken from a
library: the `systemd-python` bindings need libsystemd's headers to build, and
the small pure-Python packages are unmaintained and add nothing to one
`sendto`. Without `$NOTIFY_SOCKET` every call is a no-op.

With `WatchdogSec=` set, systemd also passes `$WATCHDOG_USEC` (and
`$WATCHDOG_PID`, the process meant to ping) and kills the unit if no
WATCHDOG=1 arrives within that time. `run_watchdog` pings every
min(WATCHDOG_USEC / 2, max_period) seconds; the agent passes a max_period well
below the lease TTL, so a hung agent is restarted long before a healthy one
would have lost its lease.

Sending never raises: a notification that cannot be sent is logged, because
the agent must go on fencing and serving whatever systemd thinks.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable, Mapping

import trio

__all__ = ["SystemdNotifier", "run_watchdog", "watchdog_period"]

log = logging.getLogger(__name__)


def _socket_address(value: str) -> str | None:
    """The `sendto` address for a `$NOTIFY_SOCKET` value, or None if we cannot use it."""
    if value.startswith("@"):
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    return None  # e.g. systemd 254's "vsock:" addresses, for VMs: not ours to handle


class SystemdNotifier:
    """Sends notifications to systemd's socket named by `$NOTIFY_SOCKET` (see module docstring)."""

    def __init__(self, notify_socket: str | None) -> None:
        self._address = _socket_address(notify_socket) if notify_socket else None
        if notify_socket and self._address is None:
            log.warning("NOTIFY_SOCKET=%r is not a path or @name; not notifying", notify_socket)
        self._sock: socket.socket | None = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> SystemdNotifier:
        """A notifier for `$NOTIFY_SOCKET` in `environ` (default: this process's environment)."""
        env = os.environ if environ is None else environ
        return cls(env.get("NOTIFY_SOCKET") or None)

    @property
    def enabled(self) -> bool:
        """Whether there is a socket to notify (else every call does nothing)."""
        return self._address is not None

    def notify(self, **fields: str) -> bool:
        """Send `NAME=value` lines in one datagram; True if sent (False if disabled or failed).

        Newlines in values are replaced by spaces, since a newline ends a line.
        """
        if self._address is None:
            return False
        text = "\n".join(f"{name}={value.replace(chr(10), ' ')}" for name, value in fields.items())
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            # MSG_DONTWAIT: a full socket buffer must not block the trio loop.
            self._sock.sendto(text.encode(), socket.MSG_DONTWAIT, self._address)
        except OSError as e:
            log.warning("systemd notification %s not sent: %s", ",".join(fields), e)
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        """READY=1: startup is finished (and STATUS=, if given)."""
        return self.notify(READY="1", **({"STATUS": status} if status else {}))

    def status(self, text: str) -> bool:
        """STATUS=: one line shown by `systemctl status`."""
        return self.notify(STATUS=text)

    def watchdog(self) -> bool:
        """WATCHDOG=1: the agent is alive."""
        return self.notify(WATCHDOG="1")

    def stopping(self, status: str | None = None) -> bool:
        """STOPPING=1: shutdown has begun (and STATUS=, if given)."""
        return self.notify(STOPPING="1", **({"STATUS": status} if status else {}))

    def close(self) -> None:
        """Close the socket; later notifications open a new one."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def watchdog_period(max_period: float, environ: Mapping[str, str] | None = None) -> float | None:
    """Seconds between WATCHDOG=1 pings, or None if systemd expects none from this process.

    That is min(WATCHDOG_USEC / 2, max_period) when `$WATCHDOG_USEC` is set
    and `$WATCHDOG_PID` is unset or names this process. Raises ValueError if
    max_period is not positive.
    """
    if max_period <= 0:
        raise ValueError(f"max_period must be positive, got {max_period}")
    env = os.environ if environ is None else environ
    usec, pid = env.get("WATCHDOG_USEC", ""), env.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if pid and (not pid.isdigit() or int(pid) != os.getpid()):
        return None  # meant for another process (e.g. our parent's)
    return min(int(usec) / 2_000_000, max_period)


async def run_watchdog(
    notifier: SystemdNotifier,
    max_period: float,
    *,
    healthy: Callable[[], bool] | None = None,
    environ: Mapping[str, str] | None = None,
    task_status: trio.TaskStatus[float | None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Ping the systemd watchdog until cancelled; run it in the agent's nursery.

    `task_status.started` reports the period (None: no watchdog expected, and
    this returns at once). When `healthy` is given, a ping is skipped while it
    returns False, so systemd restarts an agent that is alive but stuck.
    Raises ValueError if max_period is not positive.
    """
    period = watchdog_period(max_period, environ)
    task_status.started(period)
    if period is None or not notifier.enabled:
        return
    while True:
        if healthy is None or healthy():
            notifier.watchdog()
        await trio.sleep(period)

"""Supervision of the Lightning daemon, and systemd notifications for the agent.

`open_supervisor(config.daemon, events)` gives a `DaemonSupervisor` with
`start()`, `stop()`, `kill()`, `state` and `status()`; see `supervisor.py`.
`SystemdNotifier` and `run_watchdog` speak systemd's notify protocol; see
`sdnotify.py`.
"""

from haproxy_ln.daemon.probes import Probe, ProbeResult
from haproxy_ln.daemon.sdnotify import SystemdNotifier, run_watchdog, watchdog_period
from haproxy_ln.daemon.supervisor import (
    DaemonState,
    DaemonStatus,
    DaemonSupervisor,
    open_supervisor,
)

__all__ = [
    "DaemonState",
    "DaemonStatus",
    "DaemonSupervisor",
    "Probe",
    "ProbeResult",
    "SystemdNotifier",
    "open_supervisor",
    "run_watchdog",
    "watchdog_period",
]

"""The agent's side of the health server: a `NodeReport` from the live objects.

How this works: `AgentSource.report()` copies, at one moment, what the HA
shell knows (role, epoch, reason, etcd's keys, the lease, the last takeover
timeline), the gate, the daemon supervisor and the proxy's counters into a
frozen `NodeReport`; only the replication facts need the databases, read
through `StoreProbe` (cached, bounded). Nothing here changes the node.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Protocol

from haproxy_ln import framing
from haproxy_ln.ha.model import LEADER_ROLES
from haproxy_ln.health.model import (
    DaemonFacts,
    EtcdFacts,
    GateFacts,
    LeaderFacts,
    NodeReport,
    ProxyFacts,
    ReplicationFacts,
    SyncRecordFacts,
)
from haproxy_ln.health.store import StoreProbe

if TYPE_CHECKING:  # the agent imports this module
    from haproxy_ln.agent.shell import HaShell
    from haproxy_ln.proxy.server import Proxy

__all__ = ["AgentSource", "ReportSource"]


class ReportSource(Protocol):
    """What the HTTP app asks for; `replication=False` skips the databases."""

    async def report(self, *, replication: bool = True) -> NodeReport: ...

    def report_now(self) -> NodeReport:
        """Without reading the databases: replication facts as last read."""
        ...


class AgentSource:
    """Reports on the agent running in this process."""

    def __init__(self, shell: HaShell, proxy: Proxy, probe: StoreProbe) -> None:
        self.shell = shell
        self.proxy = proxy
        self.probe = probe

    async def report(self, *, replication: bool = True) -> NodeReport:
        if not replication:
            return self.report_now()
        leading = self.shell.state.role in LEADER_ROLES
        return self._report(await self.probe.facts(leading))

    def report_now(self) -> NodeReport:
        return self._report(self.probe.cached())

    def _report(self, replication: ReplicationFacts) -> NodeReport:
        shell, now = self.shell, time.monotonic()
        view = shell.view
        remaining = None
        if shell.lease is not None and shell.last_keepalive_sent is not None:
            remaining = shell.timing.lease_deadline(shell.last_keepalive_sent) - now
        daemon = shell.daemon.status()
        gate = shell.gate
        stats = self.proxy.stats
        to_server, to_client = self.proxy.bytes_relayed()
        return NodeReport(
            node=shell.node,
            peer=shell.config.node.peer,
            role=shell.state.role,
            epoch=shell.state.epoch,
            reason=shell.reason,
            healthy=shell.healthy(),
            loop_age_s=now - shell.last_step,
            etcd=EtcdFacts(
                reachable=shell.etcd_reachable,
                revision=view.revision,
                leader=None
                if view.leader is None
                else LeaderFacts(view.leader.node, view.leader.epoch),
                sync_record=None
                if view.sync is None
                else SyncRecordFacts(view.sync.epoch, view.sync.node),
                switchover_requested=view.switchover is not None,
            ),
            lease_id=None if shell.lease is None else shell.lease.id,
            lease_remaining_s=remaining,
            sync_mode=shell.mode.value,
            replication=replication,
            daemon=DaemonFacts(daemon.state.value, daemon.reason, daemon.pid, daemon.exit_code),
            gate=GateFacts(gate.opened, gate.is_open, gate.reason, gate.active_node),
            proxy=ProxyFacts(
                connections=len(self.proxy.members),
                connections_total=stats.connections_total,
                rejected_gate=stats.rejected_gate,
                rejected_limit=stats.rejected_limit,
                cancels_forwarded=stats.cancels_forwarded,
                cancels_withheld=stats.cancels_withheld,
                cancels_unmatched=stats.cancels_unmatched,
                protocol_errors=stats.protocol_errors,
                bytes_to_server=to_server,
                bytes_to_client=to_client,
                framing=self.proxy.implementation.name,
                native=framing.NATIVE,
                native_problem=framing.native_problem,
                relay_thread=self.proxy.relay is not None,
            ),
            last_failover=dict(shell.last_timeline),
            wall_time=datetime.now(UTC).isoformat(timespec="milliseconds"),
        )

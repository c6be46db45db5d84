"""What one node reports about itself: the facts behind every health endpoint.

How this works: the agent's shell gathers a `NodeReport` (see collect.py):
plain values copied out of the HA shell, the gate, the proxy, the daemon
supervisor and the replication facts (store.py), with every time already
turned into a duration. The endpoint rules (rules.py) and `/status` read
only this, so they are tested by building reports by hand.

Pure: no I/O, no clock. Nothing here may hold a secret: `/status` is
served on an open port, so the report carries names, epochs, states and
numbers only (never a URL, a password or a key).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from haproxy_ln.ha import Role
from haproxy_ln.replication.stream import format_lsn

__all__ = [
    "DaemonFacts",
    "EtcdFacts",
    "GateFacts",
    "LeaderFacts",
    "NodeReport",
    "ProxyFacts",
    "ReplicationFacts",
    "SyncRecordFacts",
]


@dataclass(frozen=True, slots=True)
class LeaderFacts:
    """Who holds etcd's leader key, and its epoch (the key's create revision)."""

    node: str
    epoch: int


@dataclass(frozen=True, slots=True)
class SyncRecordFacts:
    """The sync record: whose replica holds every acknowledged commit of `epoch`."""

    epoch: int
    node: str | None


@dataclass(frozen=True, slots=True)
class EtcdFacts:
    """etcd as this node last read it (kept while etcd is unreachable)."""

    reachable: bool
    revision: int
    leader: LeaderFacts | None
    sync_record: SyncRecordFacts | None
    switchover_requested: bool


@dataclass(frozen=True, slots=True)
class ReplicationFacts:
    """Replication between the pair as this node can measure it (docs/health.md).

    `lag_bytes` and `lag_seconds` are PostgreSQL's own view, on the primary,
    of the replicator's confirmed position (pg_stat_replication): WAL the
    primary has flushed that the replica store has not confirmed, and
    `flush_lag`. The active reads its own PostgreSQL, the standby the
    active's. None: unknown (`problem` says why).
    """

    confirmed_lsn: int | None = None
    lag_bytes: int | None = None
    lag_seconds: float | None = None
    sync_state: str | None = None
    # This node's own database as a replica store (haproxy_ln.replica_state, txlog).
    store_reachable: bool = False
    store_status: str | None = None  # "streaming", "copying", None: not a replica store
    applied_lsn: int | None = None
    applied_at: str | None = None  # ISO 8601, the store's clock
    last_commit_time: str | None = None  # ISO 8601, the primary's clock
    problem: str | None = None

    def as_json(self) -> dict[str, Any]:
        data = asdict(self)
        for name in ("confirmed_lsn", "applied_lsn"):
            if data[name] is not None:
                data[name] = format_lsn(data[name])
        return data


@dataclass(frozen=True, slots=True)
class DaemonFacts:
    state: str  # the supervisor's: stopped, starting, ready, stopping, failed
    reason: str
    pid: int | None
    exit_code: int | None


@dataclass(frozen=True, slots=True)
class GateFacts:
    opened: bool  # the HA loop opened it
    admitting: bool  # a client arriving now is admitted (no hold, lease not past)
    reason: str
    active_node: str | None


@dataclass(frozen=True, slots=True)
class ProxyFacts:
    """The proxy's counters since the agent started (see proxy.server.ProxyStats)."""

    connections: int  # open now
    connections_total: int
    rejected_gate: int
    rejected_limit: int
    cancels_forwarded: int
    cancels_withheld: int
    cancels_unmatched: int
    protocol_errors: int
    bytes_to_server: int  # relayed from clients to PostgreSQL
    bytes_to_client: int  # relayed from PostgreSQL to clients
    framing: str  # "native C" or "pure-Python"
    native: bool  # the C extension is importable (haproxy_ln.framing.NATIVE)
    native_problem: str | None
    relay_thread: bool


@dataclass(frozen=True, slots=True)
class NodeReport:
    """Everything the endpoints decide on, as of one moment."""

    node: str
    peer: str | None
    role: Role
    epoch: int | None  # the epoch this node leads or led
    reason: str  # the HA loop's current reason
    healthy: bool  # the loop stepped within the last lease_ttl (HaShell.healthy)
    loop_age_s: float  # seconds since the loop last stepped
    etcd: EtcdFacts
    lease_id: int | None
    lease_remaining_s: float | None  # until this node's self-fence deadline
    sync_mode: str  # [replication] mode: "sync" or "strict"
    replication: ReplicationFacts
    daemon: DaemonFacts
    gate: GateFacts
    proxy: ProxyFacts
    last_failover: Mapping[str, float] = field(default_factory=dict)
    wall_time: str = ""  # ISO 8601 of when the report was made

    @property
    def synchronous(self) -> bool:
        """Whether the sync record names a replica for the current leader's epoch."""
        leader, record = self.etcd.leader, self.etcd.sync_record
        return (
            leader is not None
            and record is not None
            and record.epoch == leader.epoch
            and record.node is not None
        )

    def as_json(self) -> dict[str, Any]:
        """The `/status` document (see docs/health.md for every field)."""
        etcd = self.etcd
        return {
            "node": self.node,
            "peer": self.peer,
            "time": self.wall_time,
            "role": self.role.value,
            "epoch": self.epoch,
            "reason": self.reason,
            "healthy": self.healthy,
            "loop_age_s": round(self.loop_age_s, 3),
            "leader": None if etcd.leader is None else asdict(etcd.leader),
            "lease": {
                "id": self.lease_id,
                "remaining_s": None
                if self.lease_remaining_s is None
                else round(self.lease_remaining_s, 3),
            },
            "etcd": {
                "reachable": etcd.reachable,
                "revision": etcd.revision,
                "switchover_requested": etcd.switchover_requested,
            },
            "sync": {
                "mode": self.sync_mode,
                "record": None if etcd.sync_record is None else asdict(etcd.sync_record),
                "synchronous": self.synchronous,
            },
            "replication": self.replication.as_json(),
            "daemon": asdict(self.daemon),
            "gate": asdict(self.gate),
            "proxy": asdict(self.proxy),
            "last_failover": dict(self.last_failover),
        }

"""The endpoint rules: from a `NodeReport` to 200 or 503, with the reason.

How this works: each role endpoint is a list of conditions checked in
order; the first that fails gives 503 and says which, so a load balancer
routes on the code and an operator reads the body. Pure: no I/O, no
clock; the tests build reports by hand for every role and state.

- `/health`: the agent's HA loop is alive and recent.
- `/active`: this node leads (role active, etcd's leader key names it for
  its epoch), its daemon is ready and its gate admits clients.
- `/standby`: this node stands by, etcd is reachable, another node leads,
  the sync record names this node for the leader's epoch, this node's
  database is a streaming replica store, and, with `?max_lag=`, the lag
  is known and within it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from haproxy_ln.ha import Role
from haproxy_ln.health.model import NodeReport

__all__ = ["LagLimit", "Verdict", "active", "health", "parse_max_lag", "standby"]

_SECONDS = re.compile(r"^([0-9]+(?:\.[0-9]+)?)(ms|s)$")
_BYTES = re.compile(r"^[0-9]{1,18}$")


@dataclass(frozen=True, slots=True)
class Verdict:
    ok: bool
    reason: str

    @property
    def code(self) -> int:
        return 200 if self.ok else 503


@dataclass(frozen=True, slots=True)
class LagLimit:
    """`?max_lag=`: at most this many bytes, or at most this many seconds."""

    bytes: int | None = None
    seconds: float | None = None

    def __str__(self) -> str:
        return f"{self.bytes} bytes" if self.bytes is not None else f"{self.seconds:g} s"


def parse_max_lag(text: str) -> LagLimit:
    """`1048576` (bytes), `5s` or `500ms`. Raises ValueError saying what is allowed."""
    if _BYTES.match(text):
        return LagLimit(bytes=int(text))
    match = _SECONDS.match(text)
    if match:
        value = float(match.group(1))
        return LagLimit(seconds=value / 1000 if match.group(2) == "ms" else value)
    raise ValueError(
        f"max_lag={text[:40]!r} is neither a number of bytes (1048576) nor a duration (5s, 500ms)"
    )


def _alive(report: NodeReport) -> str | None:
    if report.healthy:
        return None
    return f"the agent's HA loop has not stepped for {report.loop_age_s:.1f} s"


def health(report: NodeReport) -> Verdict:
    problem = _alive(report)
    if problem:
        return Verdict(False, problem)
    return Verdict(True, f"alive: {report.role.value}: {report.reason}")


def active(report: NodeReport) -> Verdict:
    problem = _alive(report) or _not_active(report)
    if problem:
        return Verdict(False, problem)
    return Verdict(True, f"active at epoch {report.epoch}: daemon ready, gate open")


def _not_active(report: NodeReport) -> str | None:
    if report.role is not Role.ACTIVE:
        return f"not active: {report.role.value}: {report.reason}"
    leader = report.etcd.leader
    if leader is None or leader.node != report.node or leader.epoch != report.epoch:
        return "etcd's leader key does not name this node for its epoch"
    if report.daemon.state != "ready":
        return f"the daemon is {report.daemon.state}: {report.daemon.reason}"
    if not report.gate.admitting:
        if report.gate.opened:
            return "the gate is held or its lease deadline has passed"
        return f"the gate is closed: {report.gate.reason}"
    return None


def standby(report: NodeReport, limit: LagLimit | None = None) -> Verdict:
    problem = _alive(report) or _not_standby(report) or _lagging(report, limit)
    if problem:
        return Verdict(False, problem)
    leader = report.etcd.leader
    assert leader is not None  # _not_standby checked
    within = "" if limit is None else f", lag within {limit}"
    return Verdict(
        True, f"standby named in the sync record of {leader.node}'s epoch {leader.epoch}{within}"
    )


def _not_standby(report: NodeReport) -> str | None:
    if report.role is not Role.STANDBY:
        return f"not a standby: {report.role.value}: {report.reason}"
    etcd = report.etcd
    if not etcd.reachable:
        return "etcd is unreachable: the sync record cannot be confirmed"
    leader, record = etcd.leader, etcd.sync_record
    if leader is None:
        return "no node is active"
    if leader.node == report.node:
        return "etcd's leader key names this node"
    if record is None or record.epoch != leader.epoch or record.node != report.node:
        named = "nobody" if record is None or record.node is None else record.node
        at = "" if record is None else f" at epoch {record.epoch}"
        return (
            f"the sync record names {named}{at}, not this node for {leader.node}'s "
            f"epoch {leader.epoch}"
        )
    replication = report.replication
    if not replication.store_reachable:
        return f"this node's database is unreachable: {replication.problem}"
    if replication.store_status != "streaming":
        state = replication.store_status or "not a replica store"
        return f"this node's database is {state}, not a streaming replica"
    return None


def _lagging(report: NodeReport, limit: LagLimit | None) -> str | None:
    if limit is None:
        return None
    replication = report.replication
    if limit.bytes is not None:
        lag_bytes = replication.lag_bytes
        if lag_bytes is None:
            return f"the lag in bytes is unknown: {replication.problem}"
        if lag_bytes > limit.bytes:
            return f"{lag_bytes} bytes behind, more than max_lag {limit.bytes}"
    if limit.seconds is not None:
        lag_seconds = replication.lag_seconds
        if lag_seconds is None:
            return f"the lag in seconds is unknown: {replication.problem}"
        if lag_seconds > limit.seconds:
            return f"{lag_seconds:.3f} s behind, more than max_lag {limit.seconds:g} s"
    return None

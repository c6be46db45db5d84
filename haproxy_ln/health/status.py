"""`haproxy-ln status`: both nodes of the pair, from etcd and from each node's `/status`.

How this works: etcd's keys (leader, sync record, successor, switchover
and forced-promotion requests) are read once, at one revision, with the node's `[etcd]`
settings. Each node's own report comes from its health server: this node's
at `[health] listen` (a wildcard host is asked on loopback), the peer's at
`[node] peer_health`. The HTTP request is the standard library's
`urllib`, bounded by a timeout; a node that does not answer is shown as
such, with why. Nothing is changed anywhere.

`PairStatus.as_json()` is what `--json` prints; `render_table` the table.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

import trio

from haproxy_ln.config import Config, HostPort
from haproxy_ln.coord import open_coord
from haproxy_ln.errors import CoordError

__all__ = ["NodeStatus", "PairStatus", "gather", "render_table"]

HTTP_TIMEOUT = 3.0
_WILDCARD = {"0.0.0.0": "127.0.0.1", "::": "::1"}


@dataclass(frozen=True, slots=True)
class NodeStatus:
    """One node as its health server describes it, or why it could not be asked."""

    node: str
    health: HostPort | None
    http_status: int | None = None
    report: dict[str, Any] | None = None
    error: str | None = None

    def as_json(self) -> dict[str, Any]:
        return {
            "node": self.node,
            "health": None if self.health is None else str(self.health),
            "reachable": self.report is not None,
            "http_status": self.http_status,
            "status": self.report,
            "error": self.error,
        }


@dataclass(frozen=True, slots=True)
class PairStatus:
    etcd: dict[str, Any]
    nodes: tuple[NodeStatus, ...]

    def as_json(self) -> dict[str, Any]:
        return {"etcd": self.etcd, "nodes": [n.as_json() for n in self.nodes]}


async def gather(config: Config) -> PairStatus:
    """etcd's view and every node's `/status`; never raises for an unreachable party."""
    nodes: list[tuple[str, HostPort | None]] = [(config.node.name, _local(config.health.listen))]
    if config.node.peer is not None:
        nodes.append((config.node.peer, config.node.peer_health))
    etcd: dict[str, Any] = {}
    results: dict[str, NodeStatus] = {}

    async def read_etcd() -> None:
        etcd.update(await _etcd(config))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read_etcd)
        for name, address in nodes:
            nursery.start_soon(_fetch_into, results, name, address)
    return PairStatus(etcd, tuple(results[name] for name, _ in nodes))


async def _etcd(config: Config) -> dict[str, Any]:
    problem: dict[str, Any] = {}
    view = None
    try:
        async with open_coord(config.etcd, config.node.name) as coord:
            view = await coord.view()
    except* CoordError as group:
        error: BaseException = group
        while isinstance(error, BaseExceptionGroup):
            error = error.exceptions[0]
        problem = {"reachable": False, "error": str(error)}
    if view is None:
        return problem
    return {
        "reachable": True,
        "revision": view.revision,
        "leader": None
        if view.leader is None
        else {"node": view.leader.node, "epoch": view.leader.epoch},
        "sync_record": None
        if view.sync is None
        else {"epoch": view.sync.epoch, "node": view.sync.node},
        "successor": None
        if view.successor is None
        else {"node": view.successor.node, "after_epoch": view.successor.after_epoch},
        "switchover": None
        if view.switchover is None
        else {"epoch": view.switchover.epoch, "target": view.switchover.target},
        "force": None
        if view.force is None
        else {"node": view.force.node, "epoch": view.force.epoch},
    }


def _local(listen: HostPort) -> HostPort:
    """Where to reach this node's own health server from this host."""
    return HostPort(_WILDCARD.get(listen.host, listen.host), listen.port)


async def _fetch_into(out: dict[str, NodeStatus], name: str, address: HostPort | None) -> None:
    if address is None:
        out[name] = NodeStatus(name, None, error="[node] peer_health is not set")
        return
    out[name] = await trio.to_thread.run_sync(fetch_status, name, address)


def fetch_status(name: str, address: HostPort) -> NodeStatus:
    """GET http://address/status (blocking; run it in a thread)."""
    url = f"http://{address}/status"
    try:
        with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT) as response:
            code, body = response.status, response.read()
    except urllib.error.HTTPError as e:  # 503: the report is still there
        code, body = e.code, e.read()
    except (urllib.error.URLError, OSError) as e:
        reason = e.reason if isinstance(e, urllib.error.URLError) else e
        return NodeStatus(name, address, error=f"{url}: {reason}")
    try:
        report = json.loads(body)
    except ValueError:
        return NodeStatus(name, address, code, error=f"{url} answered {code} without JSON")
    if not isinstance(report, dict):
        return NodeStatus(name, address, code, error=f"{url} answered {code} without a report")
    return NodeStatus(name, address, code, report)


def _lag(report: dict[str, Any]) -> str:
    replication = report.get("replication") or {}
    lag_bytes, lag_seconds = replication.get("lag_bytes"), replication.get("lag_seconds")
    if lag_bytes is None and lag_seconds is None:
        return "?"
    shown_bytes = "?" if lag_bytes is None else f"{lag_bytes}"
    shown_seconds = "?" if lag_seconds is None else f"{lag_seconds:.3f}"
    return f"{shown_bytes} B / {shown_seconds} s"


def render_table(pair: PairStatus) -> str:
    """The pair as text: etcd's keys, then one row per node."""
    etcd = pair.etcd
    lines = []
    if not etcd.get("reachable"):
        lines.append(f"etcd: unreachable: {etcd.get('error', 'unknown')}")
    else:
        leader, record = etcd.get("leader"), etcd.get("sync_record")
        who = "none" if leader is None else f"{leader['node']} (epoch {leader['epoch']})"
        if record is None:
            sync = "none"
        else:
            sync = f"{record['node'] or 'nobody'} for epoch {record['epoch']}"
        lines.append(f"etcd: leader {who}; sync record: {sync}")
        if etcd.get("switchover"):
            lines.append(f"etcd: switchover requested: {etcd['switchover']}")
        if etcd.get("force"):
            force = etcd["force"]
            lines.append(
                f"etcd: forced promotion of {force['node']} in place of epoch {force['epoch']} "
                "requested (data loss accepted)"
            )
    header = ("NODE", "ROLE", "EPOCH", "DAEMON", "GATE", "SYNC", "LAG", "LEASE", "REASON")
    rows = [header]
    for node in pair.nodes:
        r = node.report
        if r is None:
            rows.append((node.node, "unreachable", "", "", "", "", "", "", node.error or ""))
            continue
        lease = r.get("lease", {}).get("remaining_s")
        rows.append(
            (
                node.node,
                str(r.get("role")),
                "-" if r.get("epoch") is None else str(r["epoch"]),
                str(r.get("daemon", {}).get("state")),
                "open" if r.get("gate", {}).get("admitting") else "closed",
                str(r.get("sync", {}).get("mode")),
                _lag(r),
                "-" if lease is None else f"{lease:.1f} s",
                str(r.get("reason")),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
        lines.append("  ".join([*cells, row[-1]]).rstrip())
    return "\n".join(lines)

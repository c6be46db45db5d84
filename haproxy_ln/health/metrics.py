"""Prometheus metrics read from the agent at scrape time.

How this works: the counters the agent updates as things happen (commits
replicated, batch sizes, apply time, takeovers, self-fences) live in
`haproxy_ln.metrics`. Everything that is a state, or a count some other
object already keeps (the proxy's `ProxyStats`), is read when Prometheus
scrapes, by `AgentCollector`, from one `NodeReport`: no second copy of
any number to keep in step. `/metrics` refreshes the replication facts
just before it renders, so the lag is at most one refresh old.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from haproxy_ln.ha import Role
from haproxy_ln.health.collect import ReportSource
from haproxy_ln.health.model import NodeReport

__all__ = ["AgentCollector"]


class AgentCollector(Collector):
    """Gauges and counters of one agent; register it with a registry while it runs."""

    def __init__(self, source: ReportSource) -> None:
        self.source = source

    def describe(self) -> Iterator[Metric]:
        return _families(None)

    def collect(self) -> Iterator[Metric]:
        return _families(self.source.report_now())


def _families(report: NodeReport | None) -> Iterator[Metric]:
    """The metric families, with samples from `report` (none for `describe`)."""

    def gauge(name: str, doc: str, value: float | None) -> GaugeMetricFamily:
        family = GaugeMetricFamily(name, doc)
        if value is not None:
            family.add_metric([], value)
        return family

    def counter(name: str, doc: str, value: int | None) -> CounterMetricFamily:
        family = CounterMetricFamily(name, doc)
        if value is not None:
            family.add_metric([], value)
        return family

    r = report
    yield gauge(
        "haproxy_ln_agent_healthy",
        "1 while the agent's HA loop steps (what /health answers 200 for)",
        None if r is None else float(r.healthy),
    )
    roles = GaugeMetricFamily(
        "haproxy_ln_role", "1 for this node's current HA role, 0 for the others", labels=["role"]
    )
    if r is not None:
        for role in Role:
            roles.add_metric([role.value], float(role is r.role))
    yield roles
    yield gauge(
        "haproxy_ln_epoch",
        "The epoch this node leads or led (etcd leader key's create revision)",
        None if r is None else r.epoch,
    )
    yield gauge(
        "haproxy_ln_lease_remaining_seconds",
        "Seconds until this node's self-fence deadline (last keepalive sent + TTL - margin)",
        None if r is None else r.lease_remaining_s,
    )
    yield gauge(
        "haproxy_ln_synchronous",
        "1 while the sync record names a replica for the leader's epoch",
        None if r is None else float(r.synchronous),
    )
    replication = None if r is None else r.replication
    yield gauge(
        "haproxy_ln_replication_lag_bytes",
        "WAL the primary flushed beyond the replica store's confirmed position "
        "(pg_stat_replication, read on the primary); absent when unknown",
        None if replication is None else replication.lag_bytes,
    )
    yield gauge(
        "haproxy_ln_replication_lag_seconds",
        "The primary's flush_lag for the replicator (0 once caught up); absent when unknown",
        None if replication is None else replication.lag_seconds,
    )
    yield gauge(
        "haproxy_ln_daemon_ready",
        "1 while the Lightning daemon runs here and is ready",
        None if r is None else float(r.daemon.state == "ready"),
    )
    yield gauge(
        "haproxy_ln_gate_open",
        "1 while the proxy admits new database clients",
        None if r is None else float(r.gate.admitting),
    )
    yield gauge(
        "haproxy_ln_native_framing",
        "1 when the proxy uses the C framing extension, 0 for the pure-Python fallback",
        None if r is None else float(r.proxy.native),
    )
    proxy = None if r is None else r.proxy
    yield gauge(
        "haproxy_ln_proxy_connections",
        "Client connections open through the proxy now",
        None if proxy is None else proxy.connections,
    )
    yield counter(
        "haproxy_ln_proxy_connections_accepted",
        "Client connections the proxy accepted",
        None if proxy is None else proxy.connections_total,
    )
    rejected = CounterMetricFamily(
        "haproxy_ln_proxy_rejected",
        "Client connections turned away: by the closed gate, or over max_client_connections",
        labels=["reason"],
    )
    cancels = CounterMetricFamily(
        "haproxy_ln_proxy_cancels",
        "CancelRequests: forwarded, withheld (could release a synchronous-replication wait), "
        "or matching no connection",
        labels=["outcome"],
    )
    if proxy is not None:
        rejected.add_metric(["gate"], proxy.rejected_gate)
        rejected.add_metric(["limit"], proxy.rejected_limit)
        cancels.add_metric(["forwarded"], proxy.cancels_forwarded)
        cancels.add_metric(["withheld"], proxy.cancels_withheld)
        cancels.add_metric(["unmatched"], proxy.cancels_unmatched)
    relayed = CounterMetricFamily(
        "haproxy_ln_proxy_bytes_relayed",
        "Bytes relayed by the proxy: to_server (from clients) and to_client (from PostgreSQL)",
        labels=["direction"],
    )
    if proxy is not None:
        relayed.add_metric(["to_server"], proxy.bytes_to_server)
        relayed.add_metric(["to_client"], proxy.bytes_to_client)
    yield rejected
    yield cancels
    yield relayed
    yield counter(
        "haproxy_ln_proxy_protocol_errors",
        "Client connections ended for breaking the PostgreSQL protocol",
        None if proxy is None else proxy.protocol_errors,
    )

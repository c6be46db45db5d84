"""Prometheus metrics of the agent, in one registry that `/metrics` will expose.

Defined in one place so each is named and described once; modules import
the objects they update.
"""

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REGISTRY = CollectorRegistry(auto_describe=True)

REPLICATED_TRANSACTIONS = Counter(
    "haproxy_ln_replicated_transactions",
    "Source transactions made durable in the replica store",
    registry=REGISTRY,
)
REPLICATION_BATCH_SIZE = Histogram(
    "haproxy_ln_replication_batch_records",
    "Source transactions per replica transaction (group commit)",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
    registry=REGISTRY,
)
REPLICATION_APPLY_SECONDS = Histogram(
    "haproxy_ln_replication_apply_seconds",
    "Time to apply one batch to the replica store, commit included",
    registry=REGISTRY,
)
COMMIT_WAIT_SECONDS = Histogram(
    "haproxy_ln_commit_wait_seconds",
    "From a source transaction's commit to the replicator confirming it durable in the "
    "replica store: while synchronous, how long that COMMIT waited for the replica (the "
    "replicator runs beside its primary, so both times come from one clock)",
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 30),
    registry=REGISTRY,
)
REPLICA_LSN = Gauge(
    "haproxy_ln_replica_lsn",
    "Source WAL position durable in the replica store (confirmed upstream)",
    registry=REGISTRY,
)
INITIAL_COPY_BYTES = Counter(
    "haproxy_ln_initial_copy_bytes",
    "Bytes of table data copied by initial copies",
    registry=REGISTRY,
)
INITIAL_COPY_TABLES_LEFT = Gauge(
    "haproxy_ln_initial_copy_tables_left",
    "Tables an initial copy still has to copy",
    registry=REGISTRY,
)
TAKEOVERS = Counter(
    "haproxy_ln_takeovers",
    "Times this node became the active node (first start, failover or switchover)",
    registry=REGISTRY,
)
SELF_FENCES = Counter(
    "haproxy_ln_self_fences",
    "Times this node fenced itself (lost or could not renew its leadership)",
    registry=REGISTRY,
)

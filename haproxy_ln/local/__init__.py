"""Real local servers (PostgreSQL, etcd) for tests, the demo and benchmarks.

Each server lives in a directory of its own, listens on free loopback ports
only, and is stopped by `stop()`, by leaving its `with` block, or by its
supervisor if this Python process dies.
"""

from haproxy_ln.local.etcd import EtcdServer
from haproxy_ln.local.ports import LocalServerError, free_port, free_ports, scratch_dir
from haproxy_ln.local.postgres import PostgresCluster

__all__ = [
    "EtcdServer",
    "LocalServerError",
    "PostgresCluster",
    "free_port",
    "free_ports",
    "scratch_dir",
]

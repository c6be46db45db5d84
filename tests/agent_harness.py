"""Two-agent tests' helpers on top of haproxy_ln.local.pair: a fake daemon and waiting.

The fake daemon refuses to start without its key file and listens on a
port (the readiness probe), so "keys materialized before the daemon" and
"daemon ready" are real facts of real processes.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from haproxy_ln.events import Event
from haproxy_ln.local import PostgresCluster
from haproxy_ln.local.pair import AgentNode, make_keys, one_signer_overlaps
from haproxy_ln.local.ports import free_port

__all__ = ["TTL", "Node", "check_one_signer", "first", "make_keys", "pair_of", "wait_for"]

FAKE_DAEMON = """
import pathlib, socket, sys
key, port = pathlib.Path(sys.argv[1]), int(sys.argv[2])
if not key.exists():
    sys.exit(f"fake daemon: no key at {key}")
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", port))
s.listen()
while True:
    conn, _ = s.accept()
    conn.close()
"""

TTL = 2.0


class Node(AgentNode):
    """An agent node whose daemon is the fake daemon."""

    def write_config(  # type: ignore[override]
        self, peer: AgentNode, kek: Path, sealed: Path, **sections: dict[str, object]
    ) -> str:
        port = free_port()
        daemon: dict[str, object] = {
            "mode": "child",
            "command": [
                sys.executable,
                "-c",
                FAKE_DAEMON,
                str(self.keys_dir / "hsm_secret"),
                str(port),
            ],
            "probe": "tcp",
            "probe_address": f"127.0.0.1:{port}",
            "probe_interval": 0.1,
            "start_timeout": 20.0,
            "stop_timeout": 5.0,
        }
        return super().write_config(peer, kek, sealed, daemon, **sections)


@contextlib.contextmanager
def pair_of(
    base: Path, pgs: tuple[PostgresCluster, PostgresCluster], etcd_endpoints: tuple[str, str]
) -> Iterator[tuple[Node, Node]]:
    """Nodes a and b (not started) configured as a pair with the fake daemon; each reaches
    etcd at its own endpoint (a fault proxy, say). Both are stopped when the block ends."""
    kek, sealed = make_keys(base)
    a = Node("a", base / "a", pgs[0], etcd_endpoints[0])
    b = Node("b", base / "b", pgs[1], etcd_endpoints[1])
    for node in (a, b):
        node.base.mkdir()
    a.write_config(b, kek, sealed)
    b.write_config(a, kek, sealed)
    try:
        yield a, b
    finally:
        for node in (a, b):
            node.stop()


def wait_for(what: str, predicate: Callable[[], bool], timeout: float, *nodes: AgentNode) -> None:
    """Poll `predicate` until true; fail with the nodes' log tails after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            tails = "\n".join(f"--- {n.name} ---\n{n.log()[-4000:]}" for n in nodes)
            raise AssertionError(f"timed out waiting for {what}\n{tails}")
        time.sleep(0.05)


def first(node: AgentNode, kind: str, after: float = 0.0) -> Event | None:
    return node.first(kind, after)


def check_one_signer(*nodes: AgentNode, outside: tuple[float, float] | None = None) -> None:
    """Fail if two nodes held the keys, or ran the daemon, at overlapping times."""
    overlaps = one_signer_overlaps({n.name: n.events() for n in nodes}, outside=outside)
    assert not overlaps, "\n".join(overlaps)

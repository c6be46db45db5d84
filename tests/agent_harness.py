"""A pair of `haproxy-ln run` agents as child processes, and the one-signer checker.

`Pair.start()` writes one configuration per node (its own PostgreSQL, the
peer's as replica store, one etcd, a sealed hsm_secret, a fake daemon run
as a child that refuses to start without its key and listens on a port),
then starts both agents. Faults are injected on the processes (kill -9,
SIGSTOP) and, through `tests/faultproxy.py`, on a node's link to etcd.

`check_one_signer` reads both nodes' event logs and fails if the keys or the
daemon were held on both nodes at overlapping times. An agent killed with
SIGKILL writes no more events: the harness records `agent.killed` for it,
which ends its intervals (its daemon dies with it, see haproxy_ln.daemon,
and under systemd its tmpfs runtime directory goes with the unit; the
harness removes the key files the same way).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import tomli_w

from haproxy_ln.events import Event, EventLog, read_events
from haproxy_ln.keys.tools import new_kek, seal_file
from haproxy_ln.local import PostgresCluster
from haproxy_ln.local.ports import free_port

FAKE_DAEMON = """
import pathlib, socket, sys, time
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

PREFIX = "/haproxy-ln/test"
TTL = 2.0


@dataclass
class Node:
    name: str
    base: Path
    pg: PostgresCluster
    etcd_endpoint: str
    proc: subprocess.Popen[bytes] | None = None
    proxy_port: int = field(default_factory=free_port)
    daemon_port: int = field(default_factory=free_port)

    @property
    def config_path(self) -> Path:
        return self.base / "node.toml"

    @property
    def events_path(self) -> Path:
        return self.base / "events.jsonl"

    @property
    def log_path(self) -> Path:
        return self.base / "agent.log"

    @property
    def keys_dir(self) -> Path:
        return self.base / "keys"

    def write_config(
        self, peer: Node, kek: Path, sealed: Path, **sections: dict[str, object]
    ) -> None:
        config: dict[str, dict[str, object]] = {
            "node": {"name": self.name, "peer": peer.name, "event_log": str(self.events_path)},
            "proxy": {
                "listen": f"127.0.0.1:{self.proxy_port}",
                "upstream": f"127.0.0.1:{self.pg.port}",
            },
            "replication": {
                "source": self.pg.dsn(),
                "replica": peer.pg.dsn(),
                "connect_timeout": 2.0,
            },
            "etcd": {"endpoints": [self.etcd_endpoint], "prefix": PREFIX, "request_timeout": 0.5},
            "ha": {"lease_ttl": TTL, "safety_margin": 0.5, "degrade_after": 3.0},
            "keys": {
                "adapter": "cln",
                "kek_file": str(kek),
                "cln_hsm_secret": str(sealed),
                "runtime_dir": str(self.keys_dir),
            },
            "daemon": {
                "mode": "child",
                "command": [
                    sys.executable,
                    "-c",
                    FAKE_DAEMON,
                    str(self.keys_dir / "hsm_secret"),
                    str(self.daemon_port),
                ],
                "probe": "tcp",
                "probe_address": f"127.0.0.1:{self.daemon_port}",
                "probe_interval": 0.1,
                "start_timeout": 20.0,
                "stop_timeout": 5.0,
            },
        }
        for name, values in sections.items():
            config[name] = {**config.get(name, {}), **values}
        self.config_path.write_text(tomli_w.dumps(config))

    def start(self) -> None:
        out = open(self.log_path, "ab")  # noqa: SIM115 - the child keeps it
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "haproxy_ln", "run", "--config", str(self.config_path)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        out.close()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def events(self) -> list[Event]:
        return read_events(self.events_path) if self.events_path.exists() else []

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signum)

    def kill(self) -> float:
        """SIGKILL the agent; records `agent.killed` and removes its key files (as systemd
        removes the unit's runtime directory). Returns the monotonic time of the kill."""
        assert self.proc is not None
        killed = EventLog(self.events_path, self.name).emit("agent.killed").mono
        self.proc.kill()
        self.proc.wait(30)
        self.proc = None
        shutil.rmtree(self.keys_dir, ignore_errors=True)
        return killed

    def stop(self, timeout: float = 40) -> int | None:
        """SIGTERM, then SIGKILL after `timeout`; the exit code (None if it was killed)."""
        if self.proc is None:
            return None
        proc, self.proc = self.proc, None
        if proc.poll() is None:
            proc.send_signal(signal.SIGCONT)
            proc.terminate()
            try:
                return proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(30)
                return None
        return proc.returncode


def make_keys(base: Path) -> tuple[Path, Path]:
    """A KEK and a sealed 32-byte hsm_secret in `base`."""
    kek = base / "kek"
    new_kek(kek)
    (base / "plain").mkdir()
    secret = base / "plain" / "hsm_secret"  # the file name is the sealed role
    secret.write_bytes(os.urandom(32))
    sealed = base / "hsm_secret.sealed"
    seal_file(kek, secret, sealed)
    secret.unlink()
    return kek, sealed


def wait_for(what: str, predicate: Callable[[], bool], timeout: float, *nodes: Node) -> None:
    """Poll `predicate` until true; fail with the nodes' log tails after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            tails = "\n".join(f"--- {n.name} ---\n{n.log()[-4000:]}" for n in nodes)
            raise AssertionError(f"timed out waiting for {what}\n{tails}")
        time.sleep(0.05)


def kinds(node: Node) -> list[str]:
    return [e.kind for e in node.events()]


def first(node: Node, kind: str, after: float = 0.0) -> Event | None:
    return next((e for e in node.events() if e.kind == kind and e.mono >= after), None)


_OPENS = {"keys.materialized": "keys", "daemon.started": "daemon"}
_CLOSES = {"keys.destroyed": ("keys",), "daemon.stopped": ("daemon",)}
_ENDS_ALL = ("agent.killed", "agent.started")  # a restarted agent cleans up before anything


def holding_intervals(events: list[Event], now: float) -> dict[str, list[tuple[float, float]]]:
    """Per resource ("keys", "daemon"): the [start, end] times one node held it."""
    open_at: dict[str, float] = {}
    out: dict[str, list[tuple[float, float]]] = {"keys": [], "daemon": []}
    for e in events:
        if e.kind in _OPENS:
            open_at.setdefault(_OPENS[e.kind], e.mono)
        closes = _CLOSES.get(e.kind, ("keys", "daemon") if e.kind in _ENDS_ALL else ())
        for what in closes:
            if what in open_at:
                out[what].append((open_at.pop(what), e.mono))
    for what, start in open_at.items():
        out[what].append((start, now))
    return out


def check_one_signer(*nodes: Node, outside: tuple[float, float] | None = None) -> None:
    """Fail if two nodes held the keys, or ran the daemon, at overlapping times.

    With `outside` = (start, end), holding during that window is not counted
    (a paused agent: see test_agent_ha)."""
    now = time.monotonic()
    held = {n.name: holding_intervals(n.events(), now) for n in nodes}
    if outside is not None:
        held = {n: {w: _cut(iv, outside) for w, iv in r.items()} for n, r in held.items()}
    names = list(held)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            for what in ("keys", "daemon"):
                for a_start, a_end in held[a][what]:
                    for b_start, b_end in held[b][what]:
                        assert a_end <= b_start or b_end <= a_start, (
                            f"{what} held on {a} during {a_start:.3f}..{a_end:.3f} "
                            f"and on {b} during {b_start:.3f}..{b_end:.3f}"
                        )


def _cut(
    intervals: list[tuple[float, float]], window: tuple[float, float]
) -> list[tuple[float, float]]:
    """`intervals` without the parts inside `window`."""
    out = []
    for start, end in intervals:
        if start < window[0]:
            out.append((start, min(end, window[0])))
        if end > window[1]:
            out.append((max(start, window[1]), end))
    return out

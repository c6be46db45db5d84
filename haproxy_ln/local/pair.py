"""A local pair: `haproxy-ln run` agents as child processes, for the demo, tests and bench.

How this works: `AgentNode` is one node: its own PostgreSQL (given), its
configuration file (written by `write_config`, with the peer's PostgreSQL
as replica store, a sealed hsm_secret from `make_keys`, and the daemon
command given), its event log and its agent log, all in its directory.
`start` runs the agent; faults are injected on the process (`kill`,
`signal`). `one_signer_overlaps` reads the nodes' event logs and lists
every time the keys or the daemon were held on two nodes at once.

An agent killed with SIGKILL writes no more events: `kill` records
`agent.killed` for it, which ends its intervals (its daemon dies with it,
see haproxy_ln.daemon), and removes its key files, as systemd removes a
stopped unit's runtime directory.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import tomli_w

from haproxy_ln.events import Event, EventLog, read_events
from haproxy_ln.keys.tools import new_kek, seal_file
from haproxy_ln.local.ports import die_with_parent, free_port
from haproxy_ln.local.postgres import PostgresCluster

__all__ = ["PREFIX", "AgentNode", "make_keys", "one_signer_overlaps", "sim_daemon"]

PREFIX = "/haproxy-ln/local"
STOP_TIMEOUT = 40.0


def make_keys(base: Path) -> tuple[Path, Path]:
    """A KEK and a sealed random 32-byte hsm_secret in `base`; returns their paths."""
    kek = base / "kek"
    new_kek(kek)
    (base / "plain").mkdir()
    secret = base / "plain" / "hsm_secret"  # the file name is the sealed role
    secret.write_bytes(os.urandom(32))
    sealed = base / "hsm_secret.sealed"
    seal_file(kek, secret, sealed)
    secret.unlink()
    return kek, sealed


def sim_daemon(node: AgentNode, journal: Path, rate: float) -> dict[str, object]:
    """A [daemon] table running the Lightning simulator (cln mode) as `node`'s daemon:
    through its proxy, with its materialized hsm_secret, journaling to `journal`."""
    command = [sys.executable, "-m", "haproxy_ln", "sim", "run", "--mode", "cln"]
    command += ["--key-file", str(node.keys_dir / "hsm_secret"), "--dsn", node.proxy_dsn]
    command += ["--journal", str(journal), "--node", node.name, "--rate", f"{rate:g}"]
    return {"mode": "child", "command": command, "probe": "none", "stop_timeout": 10.0}


@dataclass
class AgentNode:
    """One node of a local pair; see the module docstring."""

    name: str
    base: Path
    pg: PostgresCluster
    etcd_endpoint: str
    dbname: str = "postgres"
    proc: subprocess.Popen[bytes] | None = None
    proxy_port: int = field(default_factory=free_port)
    health_port: int = field(default_factory=free_port)

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

    @property
    def health_url(self) -> str:
        """This node's health server ([health] listen), e.g. health_url + "/status"."""
        return f"http://127.0.0.1:{self.health_port}"

    @property
    def proxy_dsn(self) -> str:
        """The URL the daemon uses: this node's proxy."""
        return f"postgresql://postgres@127.0.0.1:{self.proxy_port}/{self.dbname}"

    def write_config(
        self,
        peer: AgentNode,
        kek: Path,
        sealed: Path,
        daemon: dict[str, object],
        **sections: dict[str, object],
    ) -> str:
        """Write this node's configuration file; returns its text.

        `daemon` is the [daemon] table; `sections` override other tables' keys
        (a key given as None is left out, e.g. `keys={"cln_hsm_secret": None}`).
        """
        config: dict[str, dict[str, object]] = {
            "node": {
                "name": self.name,
                "peer": peer.name,
                "peer_health": f"127.0.0.1:{peer.health_port}",
                "event_log": str(self.events_path),
            },
            "proxy": {
                "listen": f"127.0.0.1:{self.proxy_port}",
                "upstream": f"127.0.0.1:{self.pg.port}",
            },
            "replication": {
                "source": self.pg.dsn(dbname=self.dbname),
                "replica": peer.pg.dsn(dbname=self.dbname),
                "connect_timeout": 2.0,
            },
            "etcd": {"endpoints": [self.etcd_endpoint], "prefix": PREFIX, "request_timeout": 0.5},
            "ha": {"lease_ttl": 2.0, "safety_margin": 0.5, "degrade_after": 3.0},
            "keys": {
                "adapter": "cln",
                "kek_file": str(kek),
                "cln_hsm_secret": str(sealed),
                "runtime_dir": str(self.keys_dir),
            },
            "daemon": daemon,
            "health": {"listen": f"127.0.0.1:{self.health_port}"},
        }
        for name, values in sections.items():
            merged = {**config.get(name, {}), **values}
            config[name] = {k: v for k, v in merged.items() if v is not None}
        text = tomli_w.dumps(config)
        self.config_path.write_text(text)
        return text

    def start(self) -> None:
        """Start the agent (its output goes to `log_path`). It is SIGKILLed when the
        calling thread ends: call this from the main thread."""
        with self.log_path.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "haproxy_ln", "run", "--config", str(self.config_path)],
                stdout=out,
                stderr=subprocess.STDOUT,
                preexec_fn=die_with_parent(),
            )

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def exit_code(self) -> int | None:
        """The agent's exit code if it exited on its own (None while it runs or was stopped)."""
        return None if self.proc is None else self.proc.poll()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def events(self) -> list[Event]:
        return read_events(self.events_path) if self.events_path.exists() else []

    def first(self, kind: str, after: float = 0.0) -> Event | None:
        """The first event of `kind` at or after monotonic time `after`, if any."""
        return next((e for e in self.events() if e.kind == kind and e.mono >= after), None)

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signum)

    def kill(self) -> float:
        """SIGKILL the agent; returns the monotonic time of the kill (see module docstring)."""
        assert self.proc is not None
        killed = EventLog(self.events_path, self.name).emit("agent.killed").mono
        self.proc.kill()
        self.proc.wait(30)
        self.proc = None
        shutil.rmtree(self.keys_dir, ignore_errors=True)
        return killed

    def stop(self, timeout: float = STOP_TIMEOUT) -> int | None:
        """SIGTERM (after SIGCONT), then SIGKILL after `timeout`; the exit code, None if killed."""
        proc, self.proc = self.proc, None
        if proc is None:
            return None
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


_OPENS = {"keys.materialized": "keys", "daemon.started": "daemon"}
_CLOSES = {"keys.destroyed": ("keys",), "daemon.stopped": ("daemon",)}
_ENDS_ALL = ("agent.killed", "agent.started")  # a restarted agent cleans up before anything


def holding_intervals(events: Sequence[Event], now: float) -> dict[str, list[tuple[float, float]]]:
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


def _cut(
    intervals: list[tuple[float, float]], window: tuple[float, float] | None
) -> list[tuple[float, float]]:
    """`intervals` without the parts inside `window`."""
    if window is None:
        return intervals
    out = []
    for start, end in intervals:
        if start < window[0]:
            out.append((start, min(end, window[0])))
        if end > window[1]:
            out.append((max(start, window[1]), end))
    return out


def one_signer_overlaps(
    events: dict[str, Sequence[Event]], *, outside: tuple[float, float] | None = None
) -> list[str]:
    """Every overlap of two nodes holding the keys or running the daemon, as sentences.

    `events` maps node names to their events. With `outside` = (start, end),
    holding during that window is not counted (a paused agent, which under
    systemd the watchdog would have killed: see docs/ha.md).
    """
    now = time.monotonic()
    held = {
        node: {what: _cut(iv, outside) for what, iv in holding_intervals(evs, now).items()}
        for node, evs in events.items()
    }
    names = list(held)
    found = []
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            for what in ("keys", "daemon"):
                for a_start, a_end in held[a][what]:
                    for b_start, b_end in held[b][what]:
                        if not (a_end <= b_start or b_end <= a_start):
                            found.append(
                                f"{what} held on {a} during {a_start:.3f}..{a_end:.3f} "
                                f"and on {b} during {b_start:.3f}..{b_end:.3f}"
                            )
    return found

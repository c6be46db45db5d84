"""The system under test: a whole pair on this machine, with a fault proxy on every link.

How this works: `ChaosPair.build()` starts, in a directory of its own:

- a 3-member etcd cluster (`EtcdCluster`);
- for each node (a, b): a small tmpfs (when we may mount one) holding its
  PostgreSQL cluster, so the standby's disk can be filled; three fault
  proxies, one in front of each etcd member, listed as the node's
  `[etcd] endpoints` (cutting all three partitions the node from etcd);
  one fault proxy in front of the peer's PostgreSQL, which is the node's
  `[replication] replica` (cutting it partitions its replicator from the
  replica store);
- the Lightning simulator as each node's daemon (cln: the hsm_secret is
  materialized by the cln adapter; lnd: [keys] adapter lnd unlocks the
  simulator's gRPC wallet with a sealed password, [daemon] probe lnd),
  journaling every acknowledged state to the node's journal;
- agent a first (it leads: the database starts there), then b, and waits
  until a replicates synchronously to b.

The pair is read from the files the processes leave: the agents' event
logs (role changes, sync records) and the journals (acknowledged writes).
`healthy(since)` says whether the pair is whole again: every process runs,
one node is active and names the other, a standby, in its sync record, and
the active acknowledged a write after `since`. `repair()` heals every
proxy, resumes what was paused, frees the filled disk and starts what is
dead; the trial loop then waits for `healthy`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from haproxy_ln.errors import HaproxyLnError
from haproxy_ln.events import Event, EventLog
from haproxy_ln.keys.tools import seal_file
from haproxy_ln.local import PostgresCluster, free_port
from haproxy_ln.local.etcd import EtcdCluster
from haproxy_ln.local.faultproxy import FaultProxy
from haproxy_ln.local.pair import AgentNode, make_keys, sim_daemon

__all__ = ["DBNAME", "ChaosNode", "ChaosPair", "PairFailed", "Say", "wait_until"]

DBNAME = "lightning"
DISK_SIZE = "320m"  # each node's tmpfs: PostgreSQL with a small WAL fits well inside
PG_SETTINGS = {"max_wal_size": "64MB", "min_wal_size": "32MB"}
BUILD_TIMEOUT = 120.0

Say = Callable[[str], None]


class PairFailed(HaproxyLnError):
    """The pair could not be built, or did not become whole again in time."""


def wait_until(what: str, predicate: Callable[[], bool], timeout: float) -> float:
    """Poll `predicate` until true; the monotonic time it was. Raises PairFailed."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise PairFailed(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.05)
    return time.monotonic()


class AckTail:
    """The monotonic times of a journal's `ack` lines, read incrementally."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.times: list[float] = []
        self._offset = 0

    def update(self) -> list[float]:
        try:
            with self.path.open("rb") as f:
                f.seek(self._offset)
                data = f.read()
        except FileNotFoundError:
            return self.times
        end = data.rfind(b"\n") + 1  # a torn last line waits for its end
        for line in data[:end].splitlines():
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                if record.get("kind") == "ack":
                    self.times.append(float(record["mono"]))
        self._offset += end
        return self.times


@dataclass(eq=False)
class ChaosNode:
    """One node: its agent (with its PostgreSQL), its links, its disk and its journal."""

    agent: AgentNode
    etcd_links: list[FaultProxy]
    replica_link: FaultProxy | None
    disk: Path | None  # the tmpfs mount holding its PostgreSQL, if any
    journal: Path
    acks: AckTail = field(init=False)
    pg_paused: bool = False
    agent_paused: bool = False

    def __post_init__(self) -> None:
        self.acks = AckTail(self.journal)

    @property
    def name(self) -> str:
        return self.agent.name

    @property
    def pg(self) -> PostgresCluster:
        return self.agent.pg

    def events(self) -> list[Event]:
        return self.agent.events()

    def role(self) -> str | None:
        """The role of the node's last role change (`ha.<role>`), or None."""
        roles = [e.kind[3:] for e in self.events() if e.kind.startswith("ha.")]
        return roles[-1] if roles else None

    def synchronous_with(self, peer: ChaosNode) -> bool:
        """Whether this node's newest sync record (for its newest epoch) names `peer`."""
        epoch, replica = None, None
        for e in self.events():
            if e.kind == "leader.acquired":
                epoch, replica = e.fields.get("epoch"), None
            elif e.kind == "sync.record" and e.fields.get("epoch") == epoch:
                replica = e.fields.get("replica")
        return replica == peer.name

    def acked_since(self, since: float) -> bool:
        times = self.acks.update()
        return bool(times) and times[-1] >= since

    def signal_pg(self, signum: signal.Signals) -> None:
        """Send `signum` to the postmaster and every process it started."""
        self.pg.signal_all(signum)


class ChaosPair:
    """A pair under test in `base`; see the module docstring."""

    def __init__(self, base: Path, mode: str, rate: float, say: Say) -> None:
        self.base = base
        self.mode = mode
        self.rate = rate
        self.say = say
        self.log = EventLog(base / "chaos.jsonl", "chaos")
        self.etcd = EtcdCluster(base / "etcd")
        self.nodes: list[ChaosNode] = []
        self.tmpfs_ok = True

    # --- building and stopping --------------------------------------------------------------

    def build(self) -> None:
        """Start everything and wait until a is active and synchronous with b.

        Raises PairFailed (or LocalServerError) if that does not happen.
        """
        self.base.mkdir(parents=True, exist_ok=True)
        self.etcd.start()
        kek, sealed = make_keys(self.base)
        agents = [self._agent(name) for name in ("a", "b")]
        links = {a.name: [FaultProxy(e).start() for e in self.etcd.endpoints] for a in agents}
        for agent, other in ((agents[0], agents[1]), (agents[1], agents[0])):
            link = FaultProxy(("127.0.0.1", other.pg.port)).start()
            disk = agent.base / "pg" if self._is_mount(agent.base / "pg") else None
            journal = self.base / f"journal-{agent.name}"
            self.nodes.append(ChaosNode(agent, links[agent.name], link, disk, journal))
        for node in self.nodes:
            self._write_config(node, self.peer(node), kek, sealed)
        a, b = self.nodes
        a.agent.start()
        wait_until("a to become active", lambda: a.role() == "active", BUILD_TIMEOUT)
        b.agent.start()
        wait_until("a to replicate synchronously to b", lambda: self.healthy(0.0), BUILD_TIMEOUT)

    def _agent(self, name: str) -> AgentNode:
        base = self.base / name
        base.mkdir()
        disk = base / "pg"
        disk.mkdir()
        self._mount(disk)
        pg = PostgresCluster(disk, port=free_port(), settings=PG_SETTINGS)
        agent = AgentNode(name, base, pg, "", DBNAME)
        pg.start()
        pg.psql(f"CREATE DATABASE {DBNAME}")
        return agent

    def _mount(self, path: Path) -> None:
        if not self.tmpfs_ok or os.geteuid() != 0:
            self.tmpfs_ok = False
            return
        argv = ["mount", "-t", "tmpfs", "-o", f"size={DISK_SIZE},mode=0755", "tmpfs", str(path)]
        done = subprocess.run(argv, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            self.say(f"cannot mount a tmpfs ({done.stderr.strip()}): no disk-filling nemesis")
            self.tmpfs_ok = False

    @staticmethod
    def _is_mount(path: Path) -> bool:
        return os.path.ismount(path)

    def _write_config(self, node: ChaosNode, peer: ChaosNode, kek: Path, sealed: Path) -> None:
        agent = node.agent
        link = node.replica_link
        assert link is not None
        sections: dict[str, dict[str, object]] = {
            "etcd": {"endpoints": [p.endpoint for p in node.etcd_links]},
            "replication": {"replica": f"postgresql://postgres@{link.endpoint}/{DBNAME}"},
        }
        if self.mode == "lnd":
            daemon, sections["keys"] = self._lnd(node, kek)
        else:
            daemon = sim_daemon(agent, node.journal, self.rate)
        agent.write_config(peer.agent, kek, sealed, daemon, **sections)

    def _lnd(self, node: ChaosNode, kek: Path) -> tuple[dict[str, object], dict[str, object]]:
        """[daemon] and [keys] for the simulator in lnd mode: a gRPC wallet that the agent
        unlocks with the sealed password, and lnd's readiness probe."""
        from haproxy_ln.sim.wallet import load_or_create_tls

        password, sealed = self.base / "wallet-password", self.base / "wallet-password.sealed"
        if not sealed.exists():
            password.write_bytes(os.urandom(16).hex().encode())
            password.chmod(0o600)
            seal_file(kek, password, sealed, "lnd-wallet-password")
        lnd = node.agent.base / "lnd"
        lnd.mkdir(exist_ok=True)
        cert, key = lnd / "tls.cert", lnd / "tls.key"
        load_or_create_tls(cert, key, "127.0.0.1")
        rpc = f"127.0.0.1:{free_port()}"
        command = [sys.executable, "-m", "haproxy_ln", "sim", "run", "--mode", "lnd"]
        command += ["--password-file", str(password), "--tls-cert", str(cert)]
        command += ["--tls-key", str(key), "--rpc", rpc, "--dsn", node.agent.proxy_dsn]
        command += ["--journal", str(node.journal), "--node", node.name]
        command += ["--rate", f"{self.rate:g}", "--pool", "2"]
        daemon: dict[str, object] = {
            "mode": "child",
            "command": command,
            "probe": "lnd",
            "probe_address": rpc,
            "probe_tls_cert": str(cert),
            "start_timeout": 30.0,
            "stop_timeout": 10.0,
        }
        keys: dict[str, object] = {
            "adapter": "lnd",
            "cln_hsm_secret": None,
            "lnd_rpc": rpc,
            "lnd_tls_cert": str(cert),
            "lnd_wallet_password": str(sealed),
            "lnd_timeout": 10.0,
        }
        return daemon, keys

    def stop(self) -> None:
        """Stop everything and unmount the disks. Never raises."""
        for node in self.nodes:
            with contextlib.suppress(Exception):
                node.signal_pg(signal.SIGCONT)
                node.agent.stop()
        for node in self.nodes:
            for link in [*node.etcd_links, node.replica_link]:
                if link is not None:
                    with contextlib.suppress(Exception):
                        link.stop()
            node.pg.stop()
        self.etcd.stop()
        for name in ("a", "b"):
            disk = self.base / name / "pg"
            if self._is_mount(disk):
                subprocess.run(["umount", "-l", str(disk)], capture_output=True, check=False)

    # --- reading the pair -------------------------------------------------------------------

    def node(self, name: str) -> ChaosNode:
        return next(n for n in self.nodes if n.name == name)

    def peer(self, node: ChaosNode) -> ChaosNode:
        return next(n for n in self.nodes if n is not node)

    def active(self) -> ChaosNode | None:
        """The node whose agent runs and whose last role change made it active, if one."""
        found = [n for n in self.nodes if n.agent.running and n.role() == "active"]
        return found[0] if len(found) == 1 else None

    def everything_runs(self) -> bool:
        return (
            all(m.pid is not None for m in self.etcd.members)
            and all(n.pg.running and n.agent.running for n in self.nodes)
            and not any(n.pg_paused or n.agent_paused for n in self.nodes)
        )

    def healthy(self, since: float) -> bool:
        """Whole again: see the module docstring."""
        active = self.active()
        if active is None or not self.everything_runs():
            return False
        standby = self.peer(active)
        return (
            standby.role() == "standby"
            and active.synchronous_with(standby)
            and active.acked_since(since)
        )

    def describe(self) -> str:
        """One line on each node's state, for timeouts and the timeline."""
        parts = []
        for n in self.nodes:
            agent = "running" if n.agent.running else "dead"
            pg = "running" if n.pg.running else "dead"
            parts.append(f"{n.name}: agent {agent}, role {n.role()}, PostgreSQL {pg}")
        dead = [m.name for m in self.etcd.members if m.pid is None]
        parts.append(f"etcd members down: {', '.join(dead) or 'none'}")
        return "; ".join(parts)

    # --- repairing --------------------------------------------------------------------------

    def repair(self) -> list[str]:
        """Heal every link, resume what is paused, free the disks, start what is dead;
        returns what it did (for the timeline)."""
        did = []
        for node in self.nodes:
            for link in [*node.etcd_links, node.replica_link]:
                if link is not None and link.mode.value != "pass":
                    link.heal()
                    did.append(f"healed a link of {node.name}")
            if node.agent_paused:
                node.agent.signal(signal.SIGCONT)
                node.agent_paused = False
                did.append(f"resumed agent {node.name}")
            if node.pg_paused:
                node.signal_pg(signal.SIGCONT)
                node.pg_paused = False
                did.append(f"resumed PostgreSQL {node.name}")
            if node.disk is not None and (node.disk / "fill").exists():
                (node.disk / "fill").unlink()
                did.append(f"freed the disk of {node.name}")
        for member in self.etcd.members:
            if member.pid is None:
                member.start()
                did.append(f"restarted etcd member {member.name}")
        for node in self.nodes:
            if not node.pg.running:
                node.pg.stop()  # a crashed postmaster (disk full) leaves its supervisor
                node.pg.start()
                did.append(f"restarted PostgreSQL {node.name}")
        for node in self.nodes:
            if not node.agent.running:
                if node.agent.proc is not None:
                    self.note(node, "agent.exited", code=node.agent.proc.returncode)
                node.agent.proc = None
                node.agent.start()
                did.append(f"restarted agent {node.name}")
        return did

    def note(self, node: ChaosNode | None, kind: str, **fields: str | int | float | None) -> float:
        """Record a harness action in the chaos log (`on`: the node it concerns); its
        monotonic time."""
        return self.log.emit(kind, on=None if node is None else node.name, **fields).mono

    def remove(self) -> None:
        shutil.rmtree(self.base, ignore_errors=True)

    def save_logs(self, into: Path) -> Path:
        """Copy the logs (agents', PostgreSQL's, etcd's, the events, the journals and the
        chaos log) into the directory `into`; returns it."""
        logs = [self.base / "chaos.jsonl", *self.base.glob("journal-*")]
        logs += [*self.base.glob("*/*.log"), *self.base.glob("*/events.jsonl")]
        logs += [*self.base.glob("*/pg/postgres.log"), *self.base.glob("etcd/*.log")]
        for path in logs:
            if path.is_file():
                target = into / path.relative_to(self.base)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, target)
        return into

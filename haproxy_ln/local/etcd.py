"""Throwaway etcd members and clusters for tests, the demo and the chaos suite.

How this works: `EtcdServer.start()` picks free loopback client and peer
ports, runs /usr/bin/etcd in the foreground under a `Supervised` lifeline
(see `ports`) with its data dir and log inside `base_dir`, and polls
`/health` on the client URL until the member reports healthy and the member
list shows our peer URL (so a stranger on the port is not mistaken for us).
`stop()` cuts the lifeline: the supervisor sends SIGTERM, then SIGKILL after
a grace period; `kill()` is SIGKILL at once (a crash).

On its own an `EtcdServer` is a single-member cluster. `EtcdCluster(base,
size=3)` picks every member's two ports first, gives each member the whole
`name=peer_url` list as `--initial-cluster`, spawns them all (a member is
healthy only once a quorum has elected a leader, so they cannot be started
one by one) and then waits for each. A killed member is started again with
`start()`: its data directory makes etcd rejoin instead of bootstrapping.
`leader()` asks each running member's `/v3/maintenance/status` who leads.
"""

from __future__ import annotations

import json
import shutil
import signal
import time
import urllib.request
from pathlib import Path

from haproxy_ln.local.ports import (
    LOOPBACK,
    LocalServer,
    LocalServerError,
    Supervised,
    free_ports,
    log_size,
    read_log,
)

START_TIMEOUT = 60.0
START_ATTEMPTS = 5
STOP_GRACE = 10.0


def etcd_binary() -> str:
    """Path of the etcd server binary. Raises `LocalServerError` if it is not installed."""
    found = shutil.which("etcd")
    if found is None:
        raise LocalServerError("etcd not found on PATH; run tools/setup.sh (installs etcd-server)")
    return found


class EtcdServer(LocalServer):
    """One etcd member living in `base_dir` (created if missing): on its own a
    single-member cluster; `EtcdCluster` makes members of a larger one."""

    def __init__(self, base_dir: Path, *, name: str = "etcd0") -> None:
        self.base_dir = Path(base_dir).absolute()
        self.name = name
        self.data_dir = self.base_dir / f"{name}.etcd"
        self.log_path = self.base_dir / f"{name}.log"
        self._client_port, self._peer_port = free_ports(2)
        self._server: Supervised | None = None
        self._cluster: tuple[str, str] | None = None  # (initial cluster, token) of a member

    @property
    def endpoint(self) -> str:
        """Client endpoint as "127.0.0.1:port" (what etcdctl --endpoints takes)."""
        return f"{LOOPBACK}:{self._client_port}"

    @property
    def client_url(self) -> str:
        """Client URL, "http://127.0.0.1:port"."""
        return f"http://{self.endpoint}"

    @property
    def peer_url(self) -> str:
        """Peer URL other members would use, "http://127.0.0.1:port"."""
        return f"http://{LOOPBACK}:{self._peer_port}"

    @property
    def pid(self) -> int | None:
        """Pid of the etcd process, or None when it is not running."""
        if self._server is None or not self._server.running():
            return None
        return self._server.pid

    def start(self) -> None:
        """Start etcd and wait until `/health` reports healthy; a no-op if running.

        Retries on new ports if one was taken meanwhile. Raises
        `LocalServerError`, with the tail of the etcd log, if it fails.
        """
        if self.pid is not None:
            return
        self.base_dir.mkdir(parents=True, exist_ok=True)
        try:
            self._start_member(fresh=not self.data_dir.exists())
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop etcd: SIGTERM, then SIGKILL after a grace period. Idempotent; never raises."""
        server, self._server = self._server, None
        if server is not None:
            server.close()

    def kill(self) -> None:
        """Crash this member: SIGKILL now. `start()` brings it back. Idempotent; never raises."""
        server, self._server = self._server, None
        if server is not None:
            server.kill()
            server.close()

    @property
    def member_id(self) -> str | None:
        """This member's id as etcd reports it (decimal), or None if it does not answer."""
        header = self._call("/v3/maintenance/status", b"{}").get("header")
        member = header.get("member_id") if isinstance(header, dict) else None
        return str(member) if member is not None else None

    def leader_id(self) -> str | None:
        """The id of the member this one follows as leader, or None if it does not answer."""
        leader = self._call("/v3/maintenance/status", b"{}").get("leader")
        return str(leader) if leader not in (None, "0", 0) else None

    def log_tail(self, n: int = 40) -> str:
        """The last `n` lines of the etcd log ("" if there is none yet)."""
        return read_log(self.log_path, tail=n)

    def _start_member(self, *, fresh: bool) -> None:
        """Run etcd until it is healthy; a fresh member retries on new ports if one is taken."""
        for attempt in range(1, START_ATTEMPTS + 1):
            offset = log_size(self.log_path)
            if self._cluster is not None:  # a member: the cluster picks ports and retries
                self._spawn()
                if self._wait_healthy():
                    return
                self.stop()
                raise LocalServerError(
                    f"etcd member {self.name} did not become healthy on {self.endpoint}; "
                    f"log ends with:\n{self.log_tail(30)}"
                )
            self._spawn()
            if self._wait_healthy():
                return
            self.stop()
            port_taken = "address already in use" in read_log(self.log_path, offset)
            if not (port_taken and fresh and attempt < START_ATTEMPTS):
                raise LocalServerError(
                    f"etcd in {self.base_dir} did not become healthy on {self.endpoint}; "
                    f"log ends with:\n{self.log_tail(30)}"
                )
            shutil.rmtree(self.data_dir, ignore_errors=True)
            self._client_port, self._peer_port = free_ports(2)

    def _spawn(self) -> None:
        self._server = Supervised(
            [etcd_binary(), *self._args()],
            log=self.log_path,
            cwd=self.base_dir,
            stop_signals=(signal.SIGTERM, signal.SIGKILL),
            grace=STOP_GRACE,
        )

    def _initial_cluster(self) -> str:
        return self._cluster[0] if self._cluster else f"{self.name}={self.peer_url}"

    def _token(self) -> str:
        return self._cluster[1] if self._cluster else f"haproxy-ln-{self.name}-{self._peer_port}"

    def _args(self) -> list[str]:
        return [
            f"--name={self.name}",
            f"--data-dir={self.data_dir}",
            f"--listen-client-urls={self.client_url}",
            f"--advertise-client-urls={self.client_url}",
            f"--listen-peer-urls={self.peer_url}",
            f"--initial-advertise-peer-urls={self.peer_url}",
            f"--initial-cluster={self._initial_cluster()}",
            "--initial-cluster-state=new",
            f"--initial-cluster-token={self._token()}",
            "--logger=zap",
            "--log-outputs=stderr",
        ]

    def _call(self, path: str, body: bytes | None = None) -> dict[str, object]:
        """GET (or POST `body` to) the client URL; {} on any failure."""
        request = urllib.request.Request(self.client_url + path, data=body)
        try:
            with urllib.request.urlopen(request, timeout=2) as response:
                answer = json.loads(response.read())
        except (OSError, ValueError):
            return {}
        return answer if isinstance(answer, dict) else {}

    def _healthy(self) -> bool:
        """Whether the member answering on our client port is ours and healthy."""
        if self._call("/health").get("health") != "true":
            return False
        members = self._call("/v3/cluster/member/list", b"{}").get("members")
        return isinstance(members, list) and any(
            isinstance(m, dict) and self.peer_url in m.get("peerURLs", []) for m in members
        )

    def _wait_healthy(self) -> bool:
        """Wait until our etcd is healthy; False if it exited or timed out."""
        deadline = time.monotonic() + START_TIMEOUT
        while self.pid is not None and time.monotonic() < deadline:
            if self._healthy():
                return True
            time.sleep(0.05)
        return False


class EtcdCluster(LocalServer):
    """`size` etcd members on loopback, in `base_dir`; see the module docstring."""

    def __init__(self, base_dir: Path, size: int = 3) -> None:
        if size < 1:
            raise ValueError("an etcd cluster needs at least one member")
        self.base_dir = Path(base_dir).absolute()
        self.members = [EtcdServer(self.base_dir, name=f"etcd{i}") for i in range(size)]
        self._assign_ports()

    @property
    def endpoints(self) -> list[str]:
        """Every member's client endpoint, "127.0.0.1:port"."""
        return [m.endpoint for m in self.members]

    def start(self) -> None:
        """Start every member that is not running and wait until all are healthy.

        A fresh cluster whose ports were taken meanwhile is retried on new
        ones. Raises `LocalServerError` (with the failing member's log tail).
        """
        self.base_dir.mkdir(parents=True, exist_ok=True)
        fresh = not any(m.data_dir.exists() for m in self.members)
        for attempt in range(1, START_ATTEMPTS + 1):
            offsets = [log_size(m.log_path) for m in self.members]
            try:
                for member in self.members:
                    if member.pid is None:
                        member._spawn()
                for member in self.members:
                    if not member._wait_healthy():
                        raise LocalServerError(
                            f"etcd member {member.name} did not become healthy on "
                            f"{member.endpoint}; log ends with:\n{member.log_tail(30)}"
                        )
                return
            except LocalServerError:
                self.stop()
                taken = any(
                    "address already in use" in read_log(m.log_path, offset)
                    for m, offset in zip(self.members, offsets, strict=True)
                )
                if not (taken and fresh and attempt < START_ATTEMPTS):
                    raise
                for member in self.members:
                    shutil.rmtree(member.data_dir, ignore_errors=True)
                self._assign_ports()
            except BaseException:
                self.stop()
                raise

    def stop(self) -> None:
        """Stop every member. Idempotent; never raises."""
        for member in self.members:
            member.stop()

    def leader(self) -> EtcdServer | None:
        """The member that leads now (as a running member reports it), or None."""
        by_id = {m.member_id: m for m in self.members if m.pid is not None}
        for member in by_id.values():
            leader = member.leader_id()
            if leader is not None and leader in by_id:
                return by_id[leader]
        return None

    def log_tail(self, n: int = 40) -> str:
        return "\n".join(f"--- {m.name} ---\n{m.log_tail(n)}" for m in self.members)

    def _assign_ports(self) -> None:
        ports = free_ports(2 * len(self.members))
        for i, member in enumerate(self.members):
            member._client_port, member._peer_port = ports[2 * i], ports[2 * i + 1]
        initial = ",".join(f"{m.name}={m.peer_url}" for m in self.members)
        token = f"haproxy-ln-cluster-{ports[1]}"
        for member in self.members:
            member._cluster = (initial, token)

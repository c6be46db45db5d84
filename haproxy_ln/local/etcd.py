"""Throwaway etcd members for tests and the demo.

How this works: `EtcdServer.start()` picks free loopback client and peer
ports, runs /usr/bin/etcd in the foreground under a `Supervised` lifeline
(see `ports`) with its data dir and log inside `base_dir`, and polls
`/health` on the client URL until the member reports healthy and the member
list shows our peer URL (so a stranger on the port is not mistaken for us).
`stop()` cuts the lifeline: the supervisor sends SIGTERM, then SIGKILL after
a grace period.

Only a single-member cluster is implemented. The member's place in a cluster
is described by `_initial_cluster()` and `--initial-cluster-state new`; a
3-member cluster would pick all peer ports first and pass every member's
`name=peer_url` pair there.
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
    """One single-member etcd cluster living in `base_dir` (created if missing)."""

    def __init__(self, base_dir: Path, *, name: str = "etcd0") -> None:
        self.base_dir = Path(base_dir).absolute()
        self.name = name
        self.data_dir = self.base_dir / f"{name}.etcd"
        self.log_path = self.base_dir / f"{name}.log"
        self._client_port, self._peer_port = free_ports(2)
        self._server: Supervised | None = None

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

    def log_tail(self, n: int = 40) -> str:
        """The last `n` lines of the etcd log ("" if there is none yet)."""
        return read_log(self.log_path, tail=n)

    def _start_member(self, *, fresh: bool) -> None:
        """Run etcd until it is healthy; a fresh member retries on new ports if one is taken."""
        for attempt in range(1, START_ATTEMPTS + 1):
            offset = log_size(self.log_path)
            self._server = Supervised(
                [etcd_binary(), *self._args()],
                log=self.log_path,
                cwd=self.base_dir,
                stop_signals=(signal.SIGTERM, signal.SIGKILL),
                grace=STOP_GRACE,
            )
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

    def _initial_cluster(self) -> str:
        return f"{self.name}={self.peer_url}"

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
            f"--initial-cluster-token=haproxy-ln-{self.name}-{self._peer_port}",
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

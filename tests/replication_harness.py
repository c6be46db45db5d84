"""`haproxy-ln replicate` as a child process, so tests can SIGKILL and restart it.

`ReplicatorProcess.start()` waits until the replicator has made the primary
synchronous (every commit waits for it) or fails with its log.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from haproxy_ln.local import PostgresCluster

READY = "synchronous: every commit now waits"
_STARTED: list[ReplicatorProcess] = []  # see kill_leftovers


class ReplicatorProcess:
    def __init__(
        self,
        primary: PostgresCluster,
        replica: PostgresCluster,
        log_path: Path,
        *,
        epoch: int = 1,
        mode: str = "sync",
        dbname: str = "postgres",
        replica_query: str = "",
    ) -> None:
        """`replica_query` is appended to the replica's URL (`?sslmode=...`)."""
        self.primary = primary
        self.replica = replica
        self.log_path = log_path
        self.argv = [
            sys.executable,
            "-m",
            "haproxy_ln",
            "replicate",
            "--source",
            primary.dsn(dbname=dbname),
            "--replica",
            replica.dsn(dbname=dbname) + replica_query,
            "--epoch",
            str(epoch),
            "--mode",
            mode,
        ]
        self.proc: subprocess.Popen[bytes] | None = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def start(self, *, wait: bool = True, timeout: float = 60) -> ReplicatorProcess:
        offset = len(self.log())
        out = open(self.log_path, "ab")  # noqa: SIM115 - the child keeps it
        self.proc = subprocess.Popen(self.argv, stdout=out, stderr=subprocess.STDOUT)
        _STARTED.append(self)
        out.close()
        if wait:
            deadline = time.monotonic() + timeout
            while READY not in self.log()[offset:]:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.kill()
                    raise AssertionError(f"replicator did not become synchronous:\n{self.log()}")
                time.sleep(0.05)
        return self

    def kill(self) -> None:
        """SIGKILL: no cleanup, the primary stays synchronous."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM and wait; returns the exit code."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode


def rows_digest(cluster: PostgresCluster, dbname: str = "postgres") -> dict[str, tuple[int, str]]:
    """{table: (row count, md5 of its sorted rows as text)} of every user table."""
    tables = cluster.psql(
        "SELECT format('%I.%I', schemaname, tablename) FROM pg_tables "
        "WHERE schemaname NOT IN ('pg_catalog', 'information_schema', 'haproxy_ln') ORDER BY 1",
        dbname=dbname,
    ).split()
    digest = {}
    for t in tables:
        out = cluster.psql(
            "SELECT count(*) || ' ' || "
            f"coalesce(md5(string_agg(r::text, ',' ORDER BY r::text)), '') FROM {t} r",
            dbname=dbname,
        ).strip()
        count, _, md5 = out.partition(" ")
        digest[t] = (int(count), md5)
    return digest


def kill_leftovers() -> None:
    """SIGKILL every replicator a test started and did not stop (a failure between
    its start and its stop): left running, it would retry against stopped clusters
    for the rest of the session."""
    while _STARTED:
        _STARTED.pop().kill()

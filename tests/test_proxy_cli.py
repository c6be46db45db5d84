"""The real `haproxy-ln proxy` command, run as a subprocess in front of the session cluster."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest

from haproxy_ln.local import PostgresCluster, free_port

HAPROXY_LN = str(Path(sys.executable).parent / "haproxy-ln")
CLIENT_TIMEOUT = 120  # seconds any one client command may take before the test fails
READY_LINE = "proxy listening on"


def client_env() -> dict[str, str]:
    """Our environment without PG* variables, plus a connect timeout."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["PGCONNECT_TIMEOUT"] = "10"
    return env


def run(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        cmd, env=client_env(), capture_output=True, text=True, timeout=CLIENT_TIMEOUT, check=False
    )
    assert result.returncode == 0, f"{cmd[0]} failed ({result.returncode}):\n{result.stderr}"
    return result


@dataclass
class ProxyProcess:
    process: subprocess.Popen[bytes]
    port: int
    log_path: Path

    def dsn(self, dbname: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}"

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@contextlib.contextmanager
def proxy_command(
    upstream: PostgresCluster, tmp_path: Path, env: dict[str, str] | None = None
) -> Iterator[ProxyProcess]:
    """`haproxy-ln proxy` on a free port in front of `upstream`, ready to serve.

    Killed on exit if the test did not stop it.
    """
    port = free_port()
    log_path = tmp_path / f"proxy-{port}.log"
    cmd = [HAPROXY_LN, "proxy", "--listen", f"127.0.0.1:{port}"]
    cmd += ["--upstream", f"{upstream.host}:{upstream.port}"]
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("HAPROXY_LN")}
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env={**base_env, **(env or {})}
        )
    running = ProxyProcess(process, port, log_path)
    try:
        deadline = time.monotonic() + 30
        while READY_LINE not in running.log:
            assert process.poll() is None, f"proxy exited early:\n{running.log}"
            assert time.monotonic() < deadline, f"proxy not ready in 30s:\n{running.log}"
            time.sleep(0.05)
        yield running
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=30)


def psql(dsn: str, sql: str) -> str:
    return run(["psql", "-X", "-At", "-v", "ON_ERROR_STOP=1", dsn, "-c", sql]).stdout


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_proxy_command_serves_psql_and_stops_on_signal(
    pg_session: PostgresCluster, tmp_path: Path, signum: signal.Signals
) -> None:
    with proxy_command(pg_session, tmp_path) as proxy:
        assert psql(proxy.dsn(), "SELECT 40 + 2") == "42\n"
        with psycopg.connect(proxy.dsn(), connect_timeout=10, autocommit=True) as idle:
            assert idle.execute("SELECT 'idle now'").fetchone() == ("idle now",)
            proxy.process.send_signal(signum)
            assert proxy.process.wait(timeout=15) == 0
            with pytest.raises(psycopg.OperationalError, match="shutting down"):
                idle.execute("SELECT 1")
            assert idle.broken
    assert f"{signum.name} received: stopping" in proxy.log
    assert "Traceback" not in proxy.log


@pytest.fixture(scope="module")
def pgbench_db(pg_session: PostgresCluster) -> Iterator[str]:
    """A database initialised with `pgbench -i -s 1` directly on the cluster."""
    name = f"cli_pgbench_{uuid.uuid4().hex[:10]}"
    pg_session.create_database(name, "postgres")
    try:
        run(["pgbench", "-i", "-s", "1", "-q", pg_session.dsn(dbname=name)])
        yield name
    finally:
        pg_session.psql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.mark.parametrize("pure", [True, False], ids=["pure-python", "native"])
def test_proxy_command_runs_pgbench_and_logs_its_framer(
    pg_session: PostgresCluster, pgbench_db: str, tmp_path: Path, pure: bool
) -> None:
    env = {"HAPROXY_LN_PURE": "1"} if pure else {}
    with proxy_command(pg_session, tmp_path, env) as proxy:
        cmd = ["pgbench", "-n", "-S", "-c", "2", "-j", "2", "-t", "200", proxy.dsn(pgbench_db)]
        out = run(cmd).stdout
        processed = re.search(r"number of transactions actually processed: (\d+)/(\d+)", out)
        failed = re.search(r"number of failed transactions: (\d+)", out)
        assert processed and failed, out
        assert (processed[1], processed[2], failed[1]) == ("400", "400", "0")
        proxy.process.send_signal(signal.SIGTERM)
        assert proxy.process.wait(timeout=15) == 0
    if pure:
        assert "framing: pure-Python fallback (disabled by HAPROXY_LN_PURE=1)" in proxy.log
        assert "native C extension" not in proxy.log
    else:
        assert "framing: native C extension" in proxy.log
        assert "pure-Python" not in proxy.log


def test_proxy_command_rejects_a_bad_listen_address() -> None:
    result = subprocess.run(
        [HAPROXY_LN, "proxy", "--listen", "nonsense"],
        capture_output=True,
        text=True,
        timeout=CLIENT_TIMEOUT,
        check=False,
    )
    assert result.returncode == 1
    assert "listen: got 'nonsense'; expected HOST:PORT" in result.stderr
    assert "Traceback" not in result.stderr

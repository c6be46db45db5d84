"""The two proxies under test, as real subprocesses on free loopback ports.

How this works: both run under `Supervised` (haproxy_ln.local.ports), so they
are stopped by `stop()`, by leaving their `with` block, or by their
supervisor if this Python process dies. PgBouncer refuses to run as root,
so when we are root it runs as the `postgres` OS user, like the cluster, from
a config directory that user owns. haproxy-ln runs as the real
`haproxy-ln proxy` command of this checkout's environment. Both are ready
once `psql -c 'SELECT 1'` through them succeeds.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from haproxy_ln.local.ports import (
    LOOPBACK,
    LocalServer,
    LocalServerError,
    Supervised,
    as_user,
    free_port,
)
from haproxy_ln.local.postgres import pg_bin_dir

PGBOUNCER = Path("/usr/sbin/pgbouncer")
READY_TIMEOUT = 30.0
OS_USER_WHEN_ROOT = "postgres"


def client_env() -> dict[str, str]:
    """Our environment without PG* variables, so libpq tools use only what we pass."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["PGCONNECT_TIMEOUT"] = "10"
    return env


def wait_until_ready(port: int, server: Supervised, log: Path, name: str) -> None:
    """Wait until `SELECT 1` works through `port`; raise `LocalServerError` if not."""
    cmd = [str(pg_bin_dir() / "psql"), "-X", "-A", "-t", "-q", "-w", "-c", "SELECT 1"]
    cmd += ["-h", LOOPBACK, "-p", str(port), "-U", "postgres", "-d", "postgres"]
    deadline = time.monotonic() + READY_TIMEOUT
    while server.running() and time.monotonic() < deadline:
        done = subprocess.run(cmd, env=client_env(), capture_output=True, check=False)
        if done.returncode == 0:
            return
        time.sleep(0.1)
    tail = "\n".join(log.read_text(errors="replace").splitlines()[-20:]) if log.exists() else ""
    raise LocalServerError(f"{name} did not become ready on port {port}; log ends with:\n{tail}")


class _Server(LocalServer):
    """A supervised server listening on `port`; subclasses say how to start it."""

    name = "server"

    def __init__(self, base_dir: Path) -> None:
        self.base_dir = base_dir
        self.log_path = base_dir / f"{self.name}.log"
        self.port = free_port()
        self._server: Supervised | None = None

    @property
    def pid(self) -> int:
        """Pid of the server process itself. Raises `LocalServerError` if it is not running."""
        if self._server is None or not self._server.running():
            raise LocalServerError(f"{self.name} is not running")
        return self._server.pid

    def _launch(self) -> Supervised:
        raise NotImplementedError

    def start(self) -> None:
        """Start the server and wait until queries pass through it."""
        self.base_dir.mkdir(parents=True, exist_ok=True)
        try:
            self._server = self._launch()
            wait_until_ready(self.port, self._server, self.log_path, self.name)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL). Idempotent; never raises."""
        server, self._server = self._server, None
        if server is not None:
            server.close()


class PgBouncer(_Server):
    """PgBouncer in session mode with trust auth in front of `upstream_port`."""

    name = "pgbouncer"

    def __init__(self, base_dir: Path, upstream_port: int, *, max_clients: int) -> None:
        super().__init__(base_dir)
        self.upstream_port = upstream_port
        self.max_clients = max_clients

    def settings(self) -> dict[str, str]:
        """The [pgbouncer] section as written to the config file."""
        return {
            "listen_addr": LOOPBACK,
            "listen_port": str(self.port),
            "unix_socket_dir": "",
            "auth_type": "trust",
            "auth_file": str(self.base_dir / "users.txt"),
            "pool_mode": "session",
            "max_client_conn": str(self.max_clients),
            "default_pool_size": str(self.max_clients),
            "ignore_startup_parameters": "extra_float_digits",
            "log_connections": "0",
            "log_disconnections": "0",
        }

    def _write_config(self) -> Path:
        (self.base_dir / "users.txt").write_text('"postgres" ""\n')
        lines = ["[databases]", f"* = host={LOOPBACK} port={self.upstream_port}", "[pgbouncer]"]
        lines += [f"{k} = {v}" for k, v in self.settings().items()]
        path = self.base_dir / "pgbouncer.ini"
        path.write_text("\n".join(lines) + "\n")
        owner = as_user(OS_USER_WHEN_ROOT if os.geteuid() == 0 else None)
        for p in (self.base_dir, path, self.base_dir / "users.txt"):
            if owner:
                os.chown(p, owner["user"], owner["group"])
        self.base_dir.chmod(0o755)
        return path

    def _launch(self) -> Supervised:
        if not PGBOUNCER.exists():
            raise LocalServerError(f"{PGBOUNCER} not found; run tools/setup.sh")
        config = self._write_config()
        return Supervised(
            [str(PGBOUNCER), str(config)],
            log=self.log_path,
            cwd=self.base_dir,
            user=OS_USER_WHEN_ROOT if os.geteuid() == 0 else None,
            stop_signals=(signal.SIGTERM, signal.SIGKILL),
            grace=5.0,
        )


def haproxy_ln_command() -> list[str]:
    """The `haproxy-ln` console script of this environment (found beside sys.executable)."""
    script = Path(sys.executable).parent / "haproxy-ln"
    if script.exists():
        return [str(script)]
    found = shutil.which("haproxy-ln")
    if found is None:
        raise LocalServerError("the haproxy-ln command is not installed (pip install -e .)")
    return [found]


class HaproxyLn(_Server):
    """`haproxy-ln proxy` in front of `upstream_port`, as a subprocess."""

    name = "haproxy-ln"

    def __init__(self, base_dir: Path, upstream_port: int, *, max_clients: int) -> None:
        super().__init__(base_dir)
        self.upstream_port = upstream_port
        self.max_clients = max_clients

    def argv(self) -> list[str]:
        """The command line that starts the proxy."""
        config = self.base_dir / "haproxy-ln.toml"
        return [
            *haproxy_ln_command(),
            "proxy",
            "--config",
            str(config),
            "--listen",
            f"{LOOPBACK}:{self.port}",
            "--upstream",
            f"{LOOPBACK}:{self.upstream_port}",
            "--log-level",
            "info",
        ]

    def native_framer(self) -> bool:
        """Whether the proxy said it uses the native C framer (read from its log)."""
        return "framing: native C extension" in self.log_path.read_text(errors="replace")

    def _launch(self) -> Supervised:
        config = self.base_dir / "haproxy-ln.toml"
        config.write_text(
            f'[node]\nname = "bench"\n\n[proxy]\nmax_client_connections = {self.max_clients}\n'
        )
        if os.environ.get("HAPROXY_LN_PURE") == "1":
            raise LocalServerError("HAPROXY_LN_PURE=1 is set: unset it to bench the C framer")
        return Supervised(
            self.argv(),
            log=self.log_path,
            cwd=self.base_dir,
            stop_signals=(signal.SIGTERM, signal.SIGKILL),
            grace=10.0,
        )

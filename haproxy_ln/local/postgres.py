"""Throwaway PostgreSQL 15 clusters for tests, the demo and benchmarks.

How this works: `PostgresCluster.start()` runs `initdb -A trust` once into
`<base_dir>/data`, then on every start writes `pg_hba.conf` for the chosen
auth method and `haproxy_ln.conf` (included from postgresql.conf, so ALTER
SYSTEM still overrides it) with the port, loopback-only listening, a unix
socket directory inside `base_dir` and the settings. The postmaster runs in
the foreground under a `Supervised` lifeline (see `ports`), so it is stopped
even if this Python process dies. When we are root every server binary runs
as the `postgres` OS user, which owns `base_dir`; clients (psql, pg_isready)
run as ourselves. `stop()` goes `pg_ctl stop -m fast`, then `-m immediate`,
then SIGKILL.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Literal
from urllib.parse import quote

from haproxy_ln.local.ports import (
    LOOPBACK,
    LocalServer,
    LocalServerError,
    Supervised,
    as_user,
    free_port,
    log_size,
    read_log,
)
from haproxy_ln.pgwire.sql import quote_ident, quote_literal

Auth = Literal["trust", "md5", "scram-sha-256"]

DEBIAN_BIN = Path("/usr/lib/postgresql/15/bin")
OS_USER_WHEN_ROOT = "postgres"
START_TIMEOUT = 60.0
START_ATTEMPTS = 5
DEFAULT_SETTINGS = {
    "wal_level": "logical",
    "max_wal_senders": "10",
    "max_replication_slots": "10",
}
MANAGED_SETTINGS = ("port", "listen_addresses", "unix_socket_directories")


def pg_bin_dir() -> Path:
    """Directory of the PostgreSQL server binaries (initdb, pg_ctl, postgres, psql).

    Raises `LocalServerError` if neither Debian's PostgreSQL 15 nor a pg_ctl on
    PATH is found.
    """
    if (DEBIAN_BIN / "pg_ctl").exists():
        return DEBIAN_BIN
    found = shutil.which("pg_ctl")
    if found is None:
        raise LocalServerError(
            f"PostgreSQL server binaries not found in {DEBIAN_BIN} or on PATH; "
            "run tools/setup.sh (as root) to install postgresql-15"
        )
    return Path(found).resolve().parent


def descendants(pid: int) -> list[int]:
    """The processes `pid` started and those they started, as /proc shows them now."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        children.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _stop_tree(pid: int) -> list[int]:
    """SIGSTOP `pid`, then everything it started; returns them all."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGSTOP)
    pids = [pid, *descendants(pid)]
    for each in pids[1:]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(each, signal.SIGSTOP)
    return pids


def _client_env() -> dict[str, str]:
    """Our environment without PG* variables, so libpq tools use only what we pass."""
    return {k: v for k, v in os.environ.items() if not k.startswith("PG")}


class PostgresCluster(LocalServer):
    """One throwaway PostgreSQL cluster living in `base_dir`.

    `base_dir` is created if missing; when we are root it is chowned to the
    `postgres` user, and all its parents must be traversable by that user.
    With `auth` other than "trust", loopback TCP connections need a password
    (unix-socket ones stay trusted), so `superuser_password` is required.
    `settings` are postgresql.conf overrides; the port, listen addresses and
    socket directory are managed here and may not be in it.
    """

    host = LOOPBACK

    def __init__(
        self,
        base_dir: Path,
        *,
        port: int | None = None,
        settings: dict[str, str] | None = None,
        auth: Auth = "trust",
        superuser_password: str | None = None,
    ) -> None:
        """Raises `ValueError` for a managed key in `settings` or a missing password."""
        settings = dict(settings or {})
        managed = sorted(set(settings) & set(MANAGED_SETTINGS))
        if managed:
            raise ValueError(f"settings may not set {', '.join(managed)}: they are managed")
        if auth != "trust" and superuser_password is None:
            raise ValueError(f"auth={auth!r} needs a superuser_password")
        self.base_dir = Path(base_dir).absolute()
        self.data_dir = self.base_dir / "data"
        self.log_path = self.base_dir / "postgres.log"
        self._socket_dir = self.base_dir / "sock"
        self._fixed_port = port
        self._port = port if port is not None else free_port()
        self._auth = auth
        self._settings = {
            **DEFAULT_SETTINGS,
            "password_encryption": "md5" if auth == "md5" else "scram-sha-256",
            **settings,
        }
        self._passwords: dict[str, str] = {}
        if superuser_password is not None:
            self._passwords["postgres"] = superuser_password
        self._server: Supervised | None = None

    @property
    def port(self) -> int:
        """TCP port on 127.0.0.1 (chosen at construction; may change if start() retries)."""
        return self._port

    @property
    def pid(self) -> int | None:
        """Pid of the postmaster, or None when it is not running."""
        if self._server is None or not self._server.running():
            return None
        return self._server.pid

    @property
    def running(self) -> bool:
        """Whether the postmaster started by `start()` is still running."""
        return self.pid is not None

    def dsn(
        self, user: str = "postgres", dbname: str = "postgres", password: str | None = None
    ) -> str:
        """libpq URI for a TCP connection to this cluster."""
        auth = quote(user, safe="")
        if password is not None:
            auth += ":" + quote(password, safe="")
        return f"postgresql://{auth}@{self.host}:{self._port}/{quote(dbname, safe='')}"

    def start(self) -> None:
        """Initialise the cluster if needed, start it and wait until it accepts connections.

        A no-op if it is already running. Retries on another port if the
        chosen one was taken meanwhile (only when no port was given). Raises
        `LocalServerError`, with the tail of the server log, if it fails.
        """
        if self.running:
            return
        self._prepare_dirs()
        if not (self.data_dir / "PG_VERSION").exists():
            self._initdb()
        (self.data_dir / "pg_hba.conf").write_text(self._hba())
        try:
            self._start_postmaster()
            if "postgres" in self._passwords:
                self._psql_at(
                    str(self._socket_dir),
                    "SET log_min_error_statement = 'panic';\n"
                    f"ALTER ROLE postgres PASSWORD {quote_literal(self._passwords['postgres'])};",
                    dbname="postgres",
                    user="postgres",
                    password=None,
                )
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop the cluster: pg_ctl fast, then immediate, then SIGKILL.

        Idempotent; never raises.
        """
        server, self._server = self._server, None
        if server is None:
            return
        for mode, timeout in (("fast", 10), ("immediate", 5)):
            if not server.running():
                break
            with contextlib.suppress(LocalServerError, OSError, subprocess.TimeoutExpired):
                cmd = [str(pg_bin_dir() / "pg_ctl"), "stop", "-D", str(self.data_dir)]
                self._run_as_owner(
                    [*cmd, "-m", mode, "-w", "-t", str(timeout)], timeout=timeout + 5
                )
            server.wait(5)
        server.kill()
        server.close()

    def kill(self) -> None:
        """Crash the cluster: SIGKILL the postmaster and all its processes at once.

        `start()` brings it back (with crash recovery). Idempotent; never raises.
        """
        server, self._server = self._server, None
        if server is None:
            return
        # Stopped first, so no process of it acts on another's death; then all killed.
        # (A process-group signal is not enough: each backend runs in a session of its own.)
        pids = _stop_tree(server.pid)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        server.wait(10)
        server.close()

    def signal_all(self, signum: signal.Signals) -> None:
        """Send `signum` to the postmaster and every process it started, the postmaster
        first (SIGSTOP: it starts no new backend meanwhile). A no-op when not running."""
        pid = self.pid
        if pid is None:
            return
        for each in [pid, *descendants(pid)]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(each, signum)

    def psql(
        self,
        sql: str,
        *,
        dbname: str = "postgres",
        user: str = "postgres",
        password: str | None = None,
    ) -> str:
        """Run `sql` with psql over TCP and return its unaligned, tuples-only stdout.

        The password defaults to the one given for `user` (superuser_password
        or `create_user`). Raises `LocalServerError` with psql's stderr if any
        statement fails.
        """
        if password is None:
            password = self._passwords.get(user)
        return self._psql_at(self.host, sql, dbname=dbname, user=user, password=password)

    def create_user(self, name: str, password: str) -> None:
        """Create a login role with `password`. Raises `LocalServerError` (e.g. if it exists)."""
        self.psql(
            "SET log_min_error_statement = 'panic';\n"
            f"CREATE ROLE {quote_ident(name)} LOGIN PASSWORD {quote_literal(password)};"
        )
        self._passwords[name] = password

    def create_database(self, name: str, owner: str) -> None:
        """Create database `name` owned by role `owner`. Raises `LocalServerError`."""
        self.psql(f"CREATE DATABASE {quote_ident(name)} OWNER {quote_ident(owner)};")

    def log_tail(self, n: int = 40) -> str:
        """The last `n` lines of the server log ("" if there is none yet)."""
        return read_log(self.log_path, tail=n)

    # -- internals ---------------------------------------------------------

    @staticmethod
    def _os_user() -> str | None:
        return OS_USER_WHEN_ROOT if os.geteuid() == 0 else None

    def _run_as_owner(
        self, cmd: list[str], *, timeout: float, cwd: Path | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run a server binary as the cluster's OS user. Raises `LocalServerError` on failure."""
        result = subprocess.run(
            cmd,
            cwd=cwd or self.base_dir,
            env=_client_env(),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            **as_user(self._os_user()),
        )
        if result.returncode != 0:
            raise LocalServerError(f"{Path(cmd[0]).name} failed: {result.stderr.strip()}")
        return result

    def _chown(self, *paths: Path) -> None:
        """Give `paths` to the cluster's OS user (a no-op unless we are root)."""
        kwargs = as_user(self._os_user())
        if not kwargs:
            return
        for path in paths:
            os.chown(path, kwargs["user"], kwargs["group"])

    def _prepare_dirs(self) -> None:
        self.base_dir.mkdir(parents=True, exist_ok=True)
        self._socket_dir.mkdir(exist_ok=True)
        user = self._os_user()
        if user is None:
            return
        self._chown(self.base_dir, self._socket_dir)
        try:
            self._run_as_owner(["test", "-w", str(self.base_dir)], timeout=10, cwd=Path("/"))
        except LocalServerError:
            raise LocalServerError(
                f"user {user!r} cannot write {self.base_dir}: every parent directory "
                "must be traversable by it (chmod 0711 or 0755)"
            ) from None

    def _initdb(self) -> None:
        cmd = [str(pg_bin_dir() / "initdb"), "-D", str(self.data_dir), "-A", "trust"]
        cmd += ["-U", "postgres", "-E", "UTF8", "--locale=C", "--no-sync", "--no-instructions"]
        self._run_as_owner(cmd, timeout=120)
        with (self.data_dir / "postgresql.conf").open("a") as conf:
            conf.write("\ninclude 'haproxy_ln.conf'\n")

    def _start_postmaster(self) -> None:
        """Run the postmaster until it accepts connections, retrying on a taken port."""
        for attempt in range(1, START_ATTEMPTS + 1):
            offset = log_size(self.log_path)
            self._write_conf()
            self._server = Supervised(
                [str(pg_bin_dir() / "postgres"), "-D", str(self.data_dir)],
                log=self.log_path,
                cwd=self.base_dir,
                user=self._os_user(),
                stop_signals=(signal.SIGINT, signal.SIGQUIT, signal.SIGKILL),
                grace=10.0,
            )
            if self._wait_ready():
                return
            self.stop()
            port_taken = "Address already in use" in read_log(self.log_path, offset)
            if not (port_taken and self._fixed_port is None and attempt < START_ATTEMPTS):
                raise LocalServerError(
                    f"PostgreSQL in {self.base_dir} did not start on port {self._port}; "
                    f"server log ends with:\n{self.log_tail(30)}"
                )
            self._port = free_port()

    def _hba(self) -> str:
        return (
            "local all all trust\n"
            f"host all all {LOOPBACK}/32 {self._auth}\n"
            f"host replication all {LOOPBACK}/32 {self._auth}\n"
        )

    def _write_conf(self) -> None:
        values = {
            **self._settings,
            "port": str(self._port),
            "listen_addresses": LOOPBACK,
            "unix_socket_directories": str(self._socket_dir),
        }
        path = self.data_dir / "haproxy_ln.conf"
        path.write_text("".join(f"{k} = {quote_literal(v)}\n" for k, v in values.items()))
        self._chown(path)

    def _wait_ready(self) -> bool:
        """Wait until our postmaster accepts connections; False if it exited or timed out."""
        deadline = time.monotonic() + START_TIMEOUT
        isready = [str(pg_bin_dir() / "pg_isready"), "-q", "-t", "2"]
        isready += ["-h", self.host, "-p", str(self._port), "-d", "postgres"]
        while self._server is not None and self._server.running():
            if time.monotonic() > deadline:
                return False
            ready = self._pidfile_status() in ("ready", "standby")
            if ready and subprocess.run(isready, env=_client_env(), check=False).returncode == 0:
                return True
            time.sleep(0.05)
        return False

    def _pidfile_status(self) -> str:
        """Status line of postmaster.pid if it belongs to our postmaster, else ""."""
        try:
            lines = (self.data_dir / "postmaster.pid").read_text().splitlines()
        except OSError:
            return ""
        if len(lines) < 8 or self._server is None or lines[0] != str(self._server.pid):
            return ""
        return lines[7].strip()

    def _psql_at(self, host: str, sql: str, *, dbname: str, user: str, password: str | None) -> str:
        cmd = [str(pg_bin_dir() / "psql"), "-X", "-A", "-t", "-q", "-w", "-v", "ON_ERROR_STOP=1"]
        cmd += ["-h", host, "-p", str(self._port), "-U", user, "-d", dbname]
        env = _client_env()
        env["PGCONNECT_TIMEOUT"] = "10"
        if password is not None:
            env["PGPASSWORD"] = password
        try:
            result = subprocess.run(
                cmd, input=sql, env=env, capture_output=True, text=True, timeout=120, check=False
            )
        except subprocess.TimeoutExpired:
            raise LocalServerError(f"psql as {user!r} on {dbname!r} timed out") from None
        if result.returncode != 0:
            raise LocalServerError(
                f"psql as {user!r} on {dbname!r} failed: {result.stderr.strip()}"
            )
        return result.stdout

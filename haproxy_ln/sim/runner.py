"""One run of the Lightning daemon simulator, from its keys to its last update.

How this works: `Simulator.run()` does what a daemon does at start, in order,
and stops at the first thing a daemon would crash on:

1. cln: read the key file (hsm_secret), or refuse to start without it.
   lnd: read the wallet password file, serve GetState/UnlockWallet over TLS
   and wait, LOCKED, until the right password arrives; nothing touches the
   database before that.
2. Open the journal and append a `start` line.
3. Connect to the database (any DSN: the haproxy-ln proxy in production),
   run the schema migrations, load the channels (a restart continues from the
   commitment numbers in the database) and open missing ones.
4. Update channels as the `Pacer` says (rate, count, duration) until done or
   until `request_stop()` (the command calls it on SIGTERM and SIGINT): cln
   from its one connection, lnd from a pool of worker threads, each with its
   own connection.
5. Append an `exit` line, with the reason, and return a `SimReport`, or raise
   the SimulatorError that ended the run (DataVersionConflict, DatabaseLost,
   ...): the command turns that into a non-zero exit, as the daemon's crash
   that the HA agent would see.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import os
import random
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from haproxy_ln.config import HostPort
from haproxy_ln.errors import SimulatorError
from haproxy_ln.keys.lnrpc import WalletState
from haproxy_ln.sim import cln, lnd
from haproxy_ln.sim.db import Conn, connect, describe_target, migrate
from haproxy_ln.sim.journal import Journal
from haproxy_ln.sim.model import Pacer, channel_ids
from haproxy_ln.sim.wallet import WalletServer, load_or_create_tls

__all__ = ["LndWallet", "Mode", "SimReport", "SimSettings", "Simulator", "read_secret"]

log = logging.getLogger(__name__)

_MAX_SECRET = 64 * 1024
DEFAULT_RPC = HostPort("127.0.0.1", 10009)  # lnd's default rpclisten


class Mode(enum.Enum):
    """Which daemon's database habits to reproduce."""

    CLN = "cln"
    LND = "lnd"


@dataclass(frozen=True, slots=True)
class LndWallet:
    """lnd mode's wallet: where to serve gRPC, its TLS files, the password file."""

    password_file: Path
    tls_cert: Path
    tls_key: Path
    rpc: HostPort = DEFAULT_RPC


@dataclass(frozen=True, slots=True)
class SimSettings:
    """One simulator run. `rate` is updates per second (0: as fast as it can);
    `count` and `duration` bound the run (None: until stopped)."""

    mode: Mode
    dsn: str = field(repr=False)  # may hold a password
    journal: Path
    node: str = field(default_factory=socket.gethostname)
    key_file: Path | None = None  # cln: the hsm_secret
    wallet: LndWallet | None = None  # lnd
    channels: int = 4
    rate: float = 10.0
    count: int | None = None
    duration: float | None = None
    seed: int | None = None
    pool: int = 4  # lnd: connections (and worker threads)
    max_htlcs: int = 6
    max_retries: int = 30  # lnd: serialization failures retried in a row before giving up
    connect_timeout: float = 5.0

    def check(self) -> None:
        """Raises SimulatorError naming what is missing or out of range."""
        if self.mode is Mode.CLN and self.key_file is None:
            raise SimulatorError("cln mode needs a key file (the hsm_secret)")
        if self.mode is Mode.LND and self.wallet is None:
            raise SimulatorError("lnd mode needs a wallet password file and a TLS cert path")
        if self.channels < 1 or self.pool < 1 or self.max_htlcs < 1:
            raise SimulatorError("channels, pool and max_htlcs must be at least 1")
        if self.rate < 0 or (self.count is not None and self.count < 0):
            raise SimulatorError("rate and count must not be negative")
        if self.duration is not None and self.duration <= 0:
            raise SimulatorError("duration must be positive")


@dataclass(frozen=True, slots=True)
class SimReport:
    """How a run ended without error."""

    mode: Mode
    updates: int
    retries: int
    stopped_by: str  # "count", "duration" or "stop requested"


def read_secret(path: Path, what: str) -> bytes:
    """The bytes of the secret file at `path`.

    Raises SimulatorError, which never holds the secret, if it is missing,
    unreadable, empty or too large.
    """
    try:
        with path.open("rb") as f:
            data = f.read(_MAX_SECRET + 1)
    except FileNotFoundError:
        raise SimulatorError(
            f"{what} {path} does not exist: refusing to start without it "
            "(haproxy-ln puts it there only on the active node)"
        ) from None
    except OSError as e:
        raise SimulatorError(
            f"cannot read {what} {path}: {e.strerror}; refusing to start"
        ) from None
    if not data or len(data) > _MAX_SECRET:
        raise SimulatorError(f"{what} {path} is empty or too large; refusing to start")
    return data


class Simulator:
    """Runs the simulated daemon once; `run()` blocks, `request_stop()` ends it cleanly."""

    def __init__(self, settings: SimSettings) -> None:
        settings.check()
        self.settings = settings
        self.run_id = os.urandom(8).hex()
        self.wallet: WalletServer | None = None
        self.listening = threading.Event()  # lnd: the wallet answers gRPC (see `wallet`)
        self.running = threading.Event()  # channel updates have begun
        self._halt = threading.Event()
        self._stop_requested = False
        self._lock = threading.Lock()
        self._updates = 0
        self._pacer: Pacer | None = None
        self._error: BaseException | None = None

    def request_stop(self) -> None:
        """Finish the update under way and return from `run()` (safe from a signal handler)."""
        self._stop_requested = True
        self._halt.set()

    def run(self) -> SimReport:
        """Run until done or stopped. Raises SimulatorError (DataVersionConflict,
        DatabaseLost, ...) for whatever ends the run as a daemon crash would."""
        s = self.settings
        try:
            if s.mode is Mode.CLN:
                assert s.key_file is not None  # check() made sure
                secret = read_secret(s.key_file, "the key file")
            else:
                assert s.wallet is not None
                secret = read_secret(s.wallet.password_file, "the wallet password file")
                if not self._wait_for_unlock(s.wallet, secret):
                    return SimReport(s.mode, 0, 0, "stop requested before unlock")
            return self._run_journaled(secret)
        finally:
            if self.wallet is not None:
                self.wallet.stop()

    def _run_journaled(self, secret: bytes) -> SimReport:
        s = self.settings
        journal = Journal(s.journal, s.node, s.mode.value, self.run_id)
        try:
            journal.start(os.getpid())
            log.info(
                "simulated %s node %s (run %s) writing to %s",
                s.mode.value,
                s.node,
                self.run_id,
                describe_target(s.dsn),
            )
            rng = random.Random(s.seed)
            if s.mode is Mode.CLN:
                report = self._run_cln(journal, secret, rng)
            else:
                report = self._run_lnd(journal, rng)
            journal.exit(f"stopped by {report.stopped_by} after {report.updates} updates", 0)
            return report
        except SimulatorError as e:
            log.error("stopping: %s", e)
            with contextlib.suppress(SimulatorError):  # the error that ended the run comes first
                journal.exit(str(e), 1)
            raise
        finally:
            journal.close()

    def _connect(self, prepare: bool) -> Conn:
        s = self.settings
        name = f"haproxy-ln-sim-{s.mode.value}"
        return connect(s.dsn, application_name=name, timeout=s.connect_timeout, prepare=prepare)

    def _start_pacer(self) -> None:
        s = self.settings
        now = time.monotonic()
        deadline = None if s.duration is None else now + s.duration
        self._pacer = Pacer(s.rate, s.count, now, deadline)
        self.running.set()

    def _next_turn(self) -> bool:
        """Wait until the next update is due; False when the run is over."""
        assert self._pacer is not None
        if self._halt.is_set():
            return False
        with self._lock:
            due = self._pacer.take(time.monotonic())
        if due is None:
            return False
        delay = due - time.monotonic()
        if delay > 0:
            self._halt.wait(delay)
        return not self._halt.is_set()

    def _done_one(self) -> None:
        with self._lock:
            self._updates += 1

    def _report(self, retries: int) -> SimReport:
        assert self._pacer is not None
        ended = self._pacer.ended_by
        if self._stop_requested or ended is None:
            ended = "stop requested"
        return SimReport(self.settings.mode, self._updates, retries, ended)

    # -- cln ---------------------------------------------------------------

    def _run_cln(self, journal: Journal, key: bytes, rng: random.Random) -> SimReport:
        s = self.settings
        conn = self._connect(prepare=False)
        try:
            node = cln.ClnNode(conn, key, journal, rng, s.max_htlcs)
            node.start(s.channels)
            self._start_pacer()
            while self._next_turn():
                node.update()
                self._done_one()
        finally:
            conn.close()
        return self._report(0)

    # -- lnd ---------------------------------------------------------------

    def _wait_for_unlock(self, wallet: LndWallet, password: bytes) -> bool:
        cert, key = load_or_create_tls(wallet.tls_cert, wallet.tls_key, wallet.rpc.host)
        self.wallet = WalletServer(wallet.rpc, cert, key, password).start()
        self.listening.set()
        log.info("wallet locked; waiting for UnlockWallet on %s", self.wallet.address)
        while not self.wallet.unlocked.wait(0.1):  # run() stops the server on the way out
            if self._halt.is_set():
                return False
        log.info("wallet unlocked")
        return True

    def _run_lnd(self, journal: Journal, rng: random.Random) -> SimReport:
        s = self.settings
        assert self.wallet is not None
        conns: list[Conn] = []
        try:
            for _ in range(s.pool):
                conns.append(self._connect(prepare=True))
            migrate(conns[0], lnd.VERSION_TABLE, lnd.MIGRATIONS)
            workers = [
                lnd.LndWorker(
                    c,
                    journal,
                    random.Random(rng.getrandbits(64)),
                    max_htlcs=s.max_htlcs,
                    max_retries=s.max_retries,
                )
                for c in conns
            ]
            ids = channel_ids(s.channels)
            workers[0].open_channels(ids)
            self.wallet.advance(WalletState.RPC_ACTIVE)
            self._start_pacer()
            threads = [
                threading.Thread(
                    target=self._work,
                    args=(w, ids, random.Random(rng.getrandbits(64))),
                    name=f"lnd-worker-{i}",
                )
                for i, w in enumerate(workers)
            ]
            for t in threads:
                t.start()
            self.wallet.advance(WalletState.SERVER_ACTIVE)
            for t in threads:
                t.join()
        finally:
            for c in conns:
                c.close()
        if self._error is not None:
            raise self._error
        return self._report(sum(w.retries for w in workers))

    def _work(self, worker: lnd.LndWorker, ids: list[bytes], rng: random.Random) -> None:
        try:
            while self._next_turn():
                worker.update(rng.choice(ids))
                self._done_one()
        except BaseException as e:  # re-raised by _run_lnd in the main thread
            with self._lock:
                if self._error is None:
                    self._error = e
            self._halt.set()

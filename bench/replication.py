"""Benchmark synchronous replication: none, PostgreSQL's physical standby, haproxy-ln's.

Usage (from the repository root; root on Debian 12, like the tests):

    .venv/bin/python -m bench.replication [--duration S] [--rounds N] [--scale S]
                                          [--copy-scale S] [--quick] [--keep]

How this works: three setups run side by side, each a throwaway PostgreSQL
15 primary with the real `haproxy-ln proxy` command in front of it, all
with the same settings and data (`pgbench -i` at `--scale`, plus a small
Core-Lightning-like schema), all measured through their proxy:

* (a) the primary alone: synchronous_commit = on, no synchronous_standby_names;
* (b) PostgreSQL's own synchronous streaming replica: a second cluster made
  with `pg_basebackup -R` (as the postgres OS user when we are root), its
  primary_conninfo carrying application_name=standby, and the primary with
  synchronous_standby_names = 'standby'; pg_stat_replication must say
  sync_state = 'sync' before anything is measured;
* (b2) the same primary and standby with synchronous_commit =
  remote_apply, set (ALTER SYSTEM, reload, checked in a new session) before
  each of its runs and set back to `on` before each (b) run. `on` releases
  a commit once the standby has flushed its WAL, before the standby has
  replayed it; remote_apply waits until the standby's queries see it, which
  is what (c) gives: the replicator confirms only after the replica store
  committed the rows. (b2) is for reference; the targets compare (c) with (b);
* (c) haproxy-ln's synchronous logical replication: an empty replica
  cluster and `haproxy-ln replicate`, ready once it logs that every commit
  now waits (its initial copy of the scale-`--scale` data happens then).

Each round runs every workload against (a), (b), (b2), (c) in that order, so slow
drift on a noisy shared machine hits all four alike; the report gives the
median over the rounds and every run. Per run: pgbench's TPS (without
initial connection time) and the exact p50 and p99 of the per-transaction
latencies in pgbench's `--log` files (third column, microseconds; nearest
rank). The workloads are pgbench's built-in TPC-B-like script with 1 and 8
clients, and a Core-Lightning-like script with 1 client (one small
transaction per HTLC: UPDATE one of 100 channels, INSERT an HTLC with a
1.4 kB onion, bump vars.data_version, COMMIT). During the runs of (b) and
(c) the CPU time (from /proc) of the replication processes is recorded: the
primary's walsender, every process of the standby or replica-store cluster,
and the replicator. After the rounds: both replicas must still be `sync`
and hold the same rows as their primaries.

Then everything is stopped and the initial copy is measured alone: a fresh
primary filled by `pgbench -i -s --copy-scale` (70: about 1 GB), a fresh
empty replica, and `haproxy-ln replicate` timed from its start until its
log says the copy is done, the replica caught up, and commits now wait
(ready); its `initial copy done: ...` line is parsed too.

Progress goes to stderr, the report to stdout. Every server and subprocess
is stopped at the end, on errors and on Ctrl-C or SIGTERM too.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import math
import os
import platform
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.probes import BenchError, cpu_seconds, parse_pgbench, pgbench_argv
from bench.proxy import (
    cpu_model,
    first_line,
    format_table,
    init_pgbench,
    mem_total,
    progress,
    sigterm_as_interrupt,
    verdict,
)
from bench.servers import HaproxyLn, client_env, haproxy_ln_command
from haproxy_ln import __version__, framing
from haproxy_ln.local import PostgresCluster, scratch_dir
from haproxy_ln.local.ports import LOOPBACK, LocalServerError, Supervised, as_user
from haproxy_ln.local.postgres import OS_USER_WHEN_ROOT, descendants, pg_bin_dir

SETUPS = ("a", "b", "b2", "c")
SETUP_NAMES = {
    "a": "(a) no replica",
    "b": "(b) physical sync standby",
    "b2": "(b2) physical, remote_apply",
    "c": "(c) haproxy-ln logical sync",
}
# Whose servers each setup runs on: (b2) is (b)'s primary and standby, with
# another synchronous_commit (set before each run of either).
SERVERS = {"a": "a", "b": "b", "b2": "b", "c": "c"}
SYNCHRONOUS_COMMIT = {"b": "on", "b2": "remote_apply"}
PROTOCOL = "simple"
MAX_JOBS = 2
PG_SETTINGS = {
    "max_connections": "100",
    "shared_buffers": "256MB",
    "max_wal_size": "8GB",
    "checkpoint_timeout": "30min",
}
STANDBY_NAME = "standby"
REPLICATOR_SYNC_NAME = "haproxy_ln"  # the replicator's default --sync-name
READY = "synchronous: every commit now waits"
CAUGHT_UP = "replica caught up to"
_LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")
COPY_DONE = re.compile(
    r"initial copy done: (\d+) tables, (\d+) rows, ([0-9.]+) MB in ([0-9.]+) s "
    r"\(([0-9.]+) MB/s\)"
)
CHANNELS = 100

# A Core Lightning-like schema: vars (data_version), channels, channel HTLCs.
CLN_SCHEMA = f"""
CREATE TABLE vars (name text PRIMARY KEY, val text, intval integer, blobval bytea);
INSERT INTO vars (name, intval) VALUES ('data_version', 0);
CREATE TABLE channels (
    id bigserial PRIMARY KEY, peer_id bigint, short_channel_id text, state integer,
    funder integer, msatoshi_local bigint, next_htlc_id bigint, fee_base integer,
    fee_ppm integer, last_tx bytea, updated timestamptz);
INSERT INTO channels (peer_id, short_channel_id, state, funder, msatoshi_local,
                      next_htlc_id, fee_base, fee_ppm, last_tx, updated)
    SELECT i, '800000x' || i || 'x0', 2, 0, 1000000000000, 0, 1000, 10,
           decode(repeat(md5(i::text), 20), 'hex'), now()
    FROM generate_series(1, {CHANNELS}) AS i;
CREATE TABLE htlcs (
    id bigserial PRIMARY KEY, channel_id bigint NOT NULL REFERENCES channels (id),
    channel_htlc_id bigint, direction integer, msatoshi bigint, cltv_expiry integer,
    payment_hash bytea, payment_key bytea, hstate integer, shared_secret bytea,
    routing_onion bytea, received_time bigint);
CREATE INDEX htlcs_channel ON htlcs (channel_id, channel_htlc_id, direction);
"""

CLN_SCRIPT = f"""\\set cid random(1, {CHANNELS})
\\set amt random(1000, 100000000)
BEGIN;
UPDATE channels SET msatoshi_local = msatoshi_local - :amt, next_htlc_id = next_htlc_id + 1, \
last_tx = decode(md5(:amt::text), 'hex'), updated = now() WHERE id = :cid;
INSERT INTO htlcs (channel_id, channel_htlc_id, direction, msatoshi, cltv_expiry, \
payment_hash, hstate, shared_secret, routing_onion, received_time) VALUES (:cid, :amt, 0, \
:amt, 800144, sha256(:amt::text::bytea), 1, sha256(:cid::text::bytea), \
decode(repeat(md5(:amt::text), 86), 'hex'), extract(epoch from now())::bigint);
UPDATE vars SET intval = intval + 1 WHERE name = 'data_version';
COMMIT;
"""


# --- options -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Options:
    """What to run, from the command line."""

    duration: int
    rounds: int
    scale: int
    copy_scale: int
    quick: bool
    keep: bool = False

    @property
    def warmup(self) -> int:
        """Seconds of unreported load per setup before the rounds."""
        return min(5, self.duration)


def parse_args(argv: Sequence[str] | None = None) -> Options:
    """Parse the command line; --quick overrides the durations and sizes."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.replication", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--duration", type=int, default=20, help="seconds per pgbench run [20]")
    parser.add_argument("--rounds", type=int, default=3, help="rounds over all setups [3]")
    parser.add_argument("--scale", type=int, default=10, help="pgbench -i scale factor [10]")
    parser.add_argument(
        "--copy-scale", type=int, default=70, help="scale of the initial-copy database [70]"
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 round of 3 s, small")
    parser.add_argument(
        "--keep",
        action="store_true",
        help="keep the scratch directory (server and replicator logs)",
    )
    ns = parser.parse_args(argv)
    if ns.quick:
        return Options(3, 1, min(ns.scale, 2), min(ns.copy_scale, 5), True, ns.keep)
    if min(ns.duration, ns.rounds, ns.scale, ns.copy_scale) < 1:
        parser.error("all numbers must be at least 1")
    return Options(ns.duration, ns.rounds, ns.scale, ns.copy_scale, False, ns.keep)


# --- workloads and runs --------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    """One pgbench workload: the built-in TPC-B-like script or the CLN-like one."""

    label: str
    clients: int
    cln: bool

    def args(self, duration: int, script: Path) -> list[str]:
        """pgbench options for a run of `duration` seconds."""
        args = ["-M", PROTOCOL, "-c", str(self.clients)]
        args += ["-j", str(min(self.clients, MAX_JOBS)), "-T", str(duration)]
        # TPC-B: pgbench vacuums its tables and truncates the history first.
        return [*args, "-n", "-f", str(script)] if self.cln else args


WORKLOADS = (
    Workload("TPC-B", 1, cln=False),
    Workload("TPC-B", 8, cln=False),
    Workload("CLN-like", 1, cln=True),
)


@dataclass(frozen=True)
class Run:
    """One pgbench run: TPS and the exact latency percentiles of its transactions."""

    tps: float
    transactions: int
    p50_ms: float
    p99_ms: float
    logged: int
    failed: int
    # CPU seconds during the run of: the primary's walsender, the replica's
    # PostgreSQL (standby or replica store, all its processes), the replicator.
    walsender_cpu_s: float | None = None
    replica_pg_cpu_s: float | None = None
    replicator_cpu_s: float | None = None

    @property
    def repl_cpu_us_per_txn(self) -> float | None:
        """All replication CPU (the three above) per transaction, in us."""
        parts = (self.walsender_cpu_s, self.replica_pg_cpu_s, self.replicator_cpu_s)
        if any(p is None for p in parts) or not self.transactions:
            return None
        return sum(p for p in parts if p is not None) * 1e6 / self.transactions


def percentile(ordered: Sequence[int], q: float) -> int:
    """Nearest-rank percentile `q` (0..1) of an ascending, non-empty sequence."""
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def read_latencies(prefix: Path) -> tuple[list[int], int]:
    """Latencies (us) from pgbench's per-transaction logs `prefix.*`, sorted; and failures.

    The third column of each line is the transaction's latency in
    microseconds, or `failed`/`skipped`.
    """
    latencies: list[int] = []
    failed = 0
    for path in sorted(prefix.parent.glob(prefix.name + ".*")):
        for line in path.read_text().splitlines():
            fields = line.split()
            if len(fields) < 3:
                continue
            if fields[2].isdigit():
                latencies.append(int(fields[2]))
            else:
                failed += 1
    latencies.sort()
    return latencies, failed


def cmdline(pid: int) -> str:
    """The command line (or process title) of `pid`, "" if it is gone."""
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


@dataclass(frozen=True)
class Watched:
    """The processes doing a setup's replication work: the sending and the receiving side."""

    walsender: Sequence[int]  # the primary's walsender(s)
    replica_pg: Sequence[int]  # the standby's or the replica store's postmaster and children
    replicator: Sequence[int]  # haproxy-ln replicate (none for the physical standby)


def total_cpu(pids: Sequence[int]) -> float:
    """CPU seconds used so far by `pids` together (ones that are gone count 0)."""
    total = 0.0
    for pid in pids:
        with contextlib.suppress(OSError, IndexError, ValueError):
            total += cpu_seconds(pid)
    return total


def run_pgbench_logged(port: int, args: list[str], log_dir: Path, timeout: float) -> Run:
    """One pgbench run against `port` with per-transaction logs in `log_dir`."""
    log_dir.mkdir(parents=True)
    prefix = log_dir / "txn"
    argv = pgbench_argv(port, [*args, "--log", f"--log-prefix={prefix}"])
    try:
        done = subprocess.run(
            argv,
            env=client_env(),
            cwd=log_dir,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise BenchError(f"pgbench timed out: {shlex.join(argv)}") from None
    if done.returncode != 0:
        raise BenchError(f"pgbench failed ({shlex.join(argv)}):\n{done.stderr.strip()}")
    summary = parse_pgbench(done.stdout)
    latencies, failed = read_latencies(prefix)
    if not latencies:
        raise BenchError(f"no per-transaction latencies in {log_dir}")
    shutil.rmtree(log_dir, ignore_errors=True)
    return Run(
        summary.tps,
        summary.transactions,
        percentile(latencies, 0.50) / 1000,
        percentile(latencies, 0.99) / 1000,
        len(latencies),
        failed,
    )


Results = dict[tuple[int, str], list[Run]]  # (workload index, setup) -> runs


def measured_run(
    port: int, args: list[str], log_dir: Path, timeout: float, watched: Watched | None
) -> Run:
    """`run_pgbench_logged`, with the CPU time of the `watched` processes during it."""
    if watched is None:
        return run_pgbench_logged(port, args, log_dir, timeout)
    groups = (watched.walsender, watched.replica_pg, watched.replicator)
    before = [total_cpu(g) for g in groups]
    run = run_pgbench_logged(port, args, log_dir, timeout)
    after = [total_cpu(g) for g in groups]
    return dataclasses.replace(
        run,
        walsender_cpu_s=after[0] - before[0],
        replica_pg_cpu_s=after[1] - before[1],
        replicator_cpu_s=after[2] - before[2],
    )


def run_rounds(
    ports: dict[str, int],
    watched: dict[str, Watched],
    setups: Setups,
    script: Path,
    logs: Path,
    opts: Options,
) -> Results:
    """Every workload on (a), (b), (b2), (c) in turn, `opts.rounds` times.

    `setups.prepare(setup)` runs before every run; `setups.check_sync(setup)`
    after it raises `BenchError` if a replica stopped being synchronous: such
    a run measured something else.
    """
    for setup in SETUPS:
        if SERVERS[setup] != setup:
            continue  # warmed up with the setup whose servers it shares
        progress(f"warm-up: TPC-B, 8 clients, {opts.warmup} s -> {SETUP_NAMES[setup]}")
        run_pgbench_logged(
            ports[setup], WORKLOADS[1].args(opts.warmup, script), logs / f"warmup-{setup}", 300
        )
    results: Results = {}
    for r in range(opts.rounds):
        for i, workload in enumerate(WORKLOADS):
            for setup in SETUPS:
                setups.prepare(setup)
                run = measured_run(
                    ports[setup],
                    workload.args(opts.duration, script),
                    logs / f"r{r}-w{i}-{setup}",
                    opts.duration + 600,
                    watched.get(setup),
                )
                setups.check_sync(setup)
                results.setdefault((i, setup), []).append(run)
                progress(
                    f"round {r + 1}/{opts.rounds}: {workload.label}, {workload.clients} "
                    f"client(s) -> {SETUP_NAMES[setup]}: {run.tps:.1f} tps, "
                    f"p50 {run.p50_ms:.3f} ms, p99 {run.p99_ms:.3f} ms"
                )
    return results


# --- setups --------------------------------------------------------------------------------


def os_user() -> str | None:
    """The OS user server binaries run as: postgres when we are root."""
    return OS_USER_WHEN_ROOT if os.geteuid() == 0 else None


def prepare_primary(cluster: PostgresCluster, scale: int) -> None:
    """Fill a primary: pgbench tables at `scale` and the CLN-like schema, then CHECKPOINT."""
    init_pgbench(cluster, scale)
    cluster.psql(CLN_SCHEMA)
    cluster.psql("VACUUM ANALYZE; CHECKPOINT;")


def wait_sync_state(primary: PostgresCluster, name: str, timeout: float = 60) -> str:
    """Wait until pg_stat_replication says `name` is 'sync'; return the state row."""
    deadline = time.monotonic() + timeout
    query = (
        "SELECT application_name || ' ' || state || ' ' || sync_state "
        f"FROM pg_stat_replication WHERE application_name = '{name}'"
    )
    while True:
        row = primary.psql(query).strip()
        if row.endswith(" sync"):
            return row
        if time.monotonic() > deadline:
            raise BenchError(f"{name} is not a synchronous standby: {row or 'not connected'}")
        time.sleep(0.1)


def basebackup_standby(primary: PostgresCluster, base: Path) -> PostgresCluster:
    """A physical standby of `primary` in `base` (not started), via pg_basebackup -R."""
    base.mkdir(parents=True)
    owner = as_user(os_user())
    if owner:
        os.chown(base, owner["user"], owner["group"])
    conninfo = f"host={LOOPBACK} port={primary.port} user=postgres application_name={STANDBY_NAME}"
    argv = [str(pg_bin_dir() / "pg_basebackup"), "-D", str(base / "data"), "-d", conninfo]
    argv += ["-R", "-X", "stream", "-c", "fast"]
    progress("pg_basebackup for the physical standby")
    done = subprocess.run(
        argv,
        cwd=base,
        env=client_env(),
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
        **owner,
    )
    if done.returncode != 0:
        raise BenchError(f"pg_basebackup failed: {done.stderr.strip()}")
    auto = (base / "data" / "postgresql.auto.conf").read_text()
    if f"application_name={STANDBY_NAME}" not in auto:
        raise BenchError(f"pg_basebackup -R did not keep application_name:\n{auto}")
    return PostgresCluster(base, settings=PG_SETTINGS)


class Replicator:
    """`haproxy-ln replicate` as a supervised subprocess logging to a file."""

    def __init__(self, source: PostgresCluster, replica: PostgresCluster, base: Path) -> None:
        base.mkdir(parents=True, exist_ok=True)
        self.base = base
        self.log_path = base / "replicate.log"
        self.argv = [
            *haproxy_ln_command(),
            "replicate",
            "--source",
            source.dsn(),
            "--replica",
            replica.dsn(),
            "--epoch",
            "1",
            "--log-level",
            "info",
        ]
        self._server: Supervised | None = None
        self.started = 0.0
        self.started_wall = 0.0
        self.ready_after = 0.0

    @property
    def pid(self) -> int:
        """Pid of the replicator process. Raises `BenchError` if it is not running."""
        if self._server is None or not self._server.running():
            raise BenchError("haproxy-ln replicate is not running")
        return self._server.pid

    def seconds_until(self, text: str) -> float | None:
        """Seconds from our start to the log line containing `text` (by its timestamp)."""
        for line in self.log().splitlines():
            if text in line and (m := _LOG_TIME.match(line)):
                stamp = datetime.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f")
                return stamp.timestamp() - self.started_wall
        return None

    def log(self) -> str:
        """The replicator's log so far."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def start(self, timeout: float) -> None:
        """Start it and wait until every commit waits for it; raise `BenchError` if not."""
        self.started = time.monotonic()
        self.started_wall = time.time()
        self._server = Supervised(
            self.argv,
            log=self.log_path,
            cwd=self.base,
            stop_signals=(signal.SIGTERM, signal.SIGKILL),
            grace=30.0,
        )
        deadline = self.started + timeout
        while READY not in self.log():
            if not self._server.running() or time.monotonic() > deadline:
                tail = "\n".join(self.log().splitlines()[-30:])
                self.stop()
                raise BenchError(f"haproxy-ln replicate did not become ready:\n{tail}")
            time.sleep(0.02)
        self.ready_after = time.monotonic() - self.started

    def stop(self) -> None:
        """SIGTERM (the primary stops waiting), then SIGKILL after 30 s. Never raises."""
        server, self._server = self._server, None
        if server is not None:
            server.close()

    def __enter__(self) -> Replicator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass
class Setups:
    """The running setups and what was checked about them."""

    primaries: dict[str, PostgresCluster]
    standby: PostgresCluster
    replica: PostgresCluster
    replicator: Replicator
    proxies: dict[str, HaproxyLn]
    checks: list[tuple[str, str]]

    def prepare(self, setup: str) -> None:
        """Before a run of (b) or (b2): set (b)'s synchronous_commit as that setup runs
        it, and wait until a new session has it."""
        if setup not in SYNCHRONOUS_COMMIT:
            return
        primary, value = self.primaries["b"], SYNCHRONOUS_COMMIT[setup]
        primary.psql(f"ALTER SYSTEM SET synchronous_commit = {value};\nSELECT pg_reload_conf();")
        deadline = time.monotonic() + 10
        while primary.psql("SHOW synchronous_commit").strip() != value:
            if time.monotonic() > deadline:
                raise BenchError(f"(b)'s primary did not take synchronous_commit = {value}")
            time.sleep(0.05)

    def check_sync(self, setup: str) -> None:
        """Raise `BenchError` unless (b)'s or (c)'s replica is still synchronous."""
        if SERVERS[setup] == "b":
            wait_sync_state(self.primaries["b"], STANDBY_NAME, timeout=5)
        elif setup == "c":
            try:
                wait_sync_state(self.primaries["c"], REPLICATOR_SYNC_NAME, timeout=5)
            except BenchError as e:
                tail = "\n".join(self.replicator.log().splitlines()[-40:])
                raise BenchError(f"{e}; the replicator's log ends with:\n{tail}") from None

    def watched(self) -> dict[str, Watched]:
        """The replication processes of (b) and (c), as they are now."""

        def walsenders(cluster: PostgresCluster) -> list[int]:
            assert cluster.pid is not None
            return [p for p in descendants(cluster.pid) if "walsender" in cmdline(p)]

        def cluster_tree(cluster: PostgresCluster) -> list[int]:
            assert cluster.pid is not None
            return [cluster.pid, *descendants(cluster.pid)]

        b = Watched(walsenders(self.primaries["b"]), cluster_tree(self.standby), [])
        return {
            "b": b,
            "b2": b,
            "c": Watched(
                walsenders(self.primaries["c"]),
                cluster_tree(self.replica),
                [self.replicator.pid],
            ),
        }


def timeline(replicator: Replicator) -> str:
    """When the copy ended, the replica caught up, and commits started waiting."""
    parts = []
    for label, text in (("copy done", "initial copy done"), ("caught up", CAUGHT_UP)):
        seconds = replicator.seconds_until(text)
        parts.append(f"{label} {'?' if seconds is None else f'{seconds:.1f}'} s")
    parts.append(f"synchronous {replicator.ready_after:.1f} s")
    return ", ".join(parts)


def start_setups(stack: contextlib.ExitStack, base: Path, opts: Options) -> Setups:
    """Start (a), (b) and (c) with their proxies; everything is entered on `stack`."""
    primaries = {}
    for setup in dict.fromkeys(SERVERS.values()):
        progress(f"starting the primary of {SETUP_NAMES[setup]}")
        cluster = stack.enter_context(
            PostgresCluster(base / f"primary-{setup}", settings=PG_SETTINGS)
        )
        prepare_primary(cluster, opts.scale)
        primaries[setup] = cluster
    checks: list[tuple[str, str]] = []

    # (b): physical streaming standby, synchronous.
    standby = basebackup_standby(primaries["b"], base / "standby-b")
    stack.enter_context(standby)
    primaries["b"].psql(
        f"ALTER SYSTEM SET synchronous_standby_names = '{STANDBY_NAME}';\n"
        "ALTER SYSTEM SET synchronous_commit = on;\nSELECT pg_reload_conf();"
    )
    checks.append(("(b) pg_stat_replication", wait_sync_state(primaries["b"], STANDBY_NAME)))
    in_recovery = standby.psql("SELECT pg_is_in_recovery()").strip()
    checks.append(("(b) standby pg_is_in_recovery", in_recovery))

    # (c): empty replica store and the replicator.
    progress("starting the replica store of (c)")
    replica = stack.enter_context(PostgresCluster(base / "replica-c", settings=PG_SETTINGS))
    progress("starting haproxy-ln replicate for (c)")
    replicator = stack.enter_context(Replicator(primaries["c"], replica, base / "replicator-c"))
    replicator.start(timeout=900)
    checks.append(
        ("(c) pg_stat_replication", wait_sync_state(primaries["c"], REPLICATOR_SYNC_NAME))
    )
    copy_line = COPY_DONE.search(replicator.log())
    checks.append(("(c) replicator", copy_line.group(0) if copy_line else "no initial copy"))
    checks.append(("(c) start to ready", timeline(replicator)))
    for setup in primaries:
        sync = primaries[setup].psql(
            "SELECT current_setting('synchronous_commit') || ', synchronous_standby_names=' "
            "|| quote_literal(current_setting('synchronous_standby_names'))"
        )
        checks.append((f"{SETUP_NAMES[setup][:3]} primary", f"synchronous_commit={sync.strip()}"))

    proxies = {}
    for setup in primaries:
        progress(f"starting haproxy-ln proxy in front of {SETUP_NAMES[setup]}")
        proxies[setup] = stack.enter_context(
            HaproxyLn(base / f"proxy-{setup}", primaries[setup].port, max_clients=50)
        )
    return Setups(primaries, standby, replica, replicator, proxies, checks)


def consistency_checks(s: Setups) -> list[tuple[str, str]]:
    """After the runs: still synchronous, and the replicas hold what the primaries hold."""
    query = (
        "SELECT (SELECT count(*) FROM htlcs) || ' htlcs, ' || "
        "(SELECT count(*) FROM pgbench_history) || ' history rows, data_version ' || "
        "(SELECT intval FROM vars WHERE name = 'data_version') || ', branch balance ' || "
        "(SELECT sum(bbalance) FROM pgbench_branches)"
    )
    checks = [
        ("(b) still", wait_sync_state(s.primaries["b"], STANDBY_NAME, timeout=5)),
        ("(c) still", wait_sync_state(s.primaries["c"], REPLICATOR_SYNC_NAME, timeout=5)),
    ]
    for label, primary, copy in (
        ("(b)", s.primaries["b"], s.standby),
        ("(c)", s.primaries["c"], s.replica),
    ):
        ours, theirs = primary.psql(query).strip(), copy.psql(query).strip()
        same = "same" if ours == theirs else "DIFFERENT"
        checks.append((f"{label} primary / replica", f"{ours} / {theirs}: {same}"))
    return checks


# --- initial copy --------------------------------------------------------------------------


@dataclass(frozen=True)
class CopyResult:
    """The initial copy of a `pgbench -i -s scale` database to an empty replica."""

    scale: int
    db_bytes: int
    table_bytes: int
    replica_db_bytes: int
    wall_s: float
    done_s: float
    caught_up_s: float
    log_line: str
    tables: int
    rows: int
    copied_mb: float
    copy_s: float
    copy_mb_s: float

    @property
    def db_mb_per_wall_s(self) -> float:
        """Total database size over the wall time from start to ready, in MB/s."""
        return self.db_bytes / 1e6 / self.wall_s

    @property
    def db_mb_per_caught_up_s(self) -> float:
        """Total database size over the wall time from start to caught up, in MB/s."""
        return self.db_bytes / 1e6 / self.caught_up_s


def measure_copy(base: Path, scale: int) -> CopyResult:
    """Fill a fresh primary at `scale`, time `haproxy-ln replicate` to an empty replica."""
    with contextlib.ExitStack() as stack:
        progress("initial copy: starting a fresh primary and an empty replica")
        primary = stack.enter_context(PostgresCluster(base / "copy-primary", settings=PG_SETTINGS))
        replica = stack.enter_context(PostgresCluster(base / "copy-replica", settings=PG_SETTINGS))
        init_pgbench(primary, scale)
        primary.psql("VACUUM ANALYZE; CHECKPOINT;")
        db_bytes = int(primary.psql("SELECT pg_database_size(current_database())"))
        table_bytes = int(
            primary.psql(
                "SELECT sum(pg_table_size(c.oid)) FROM pg_class c "
                "JOIN pg_namespace n ON n.oid = c.relnamespace "
                "WHERE c.relkind = 'r' AND n.nspname = 'public'"
            )
        )
        progress(f"initial copy: {db_bytes / 1e6:.0f} MB database, starting haproxy-ln replicate")
        replicator = stack.enter_context(Replicator(primary, replica, base / "copy-replicator"))
        replicator.start(timeout=1800)
        wall = replicator.ready_after
        match = COPY_DONE.search(replicator.log())
        done_s = replicator.seconds_until("initial copy done")
        caught_up_s = replicator.seconds_until(CAUGHT_UP)
        if match is None or done_s is None or caught_up_s is None:
            raise BenchError(f"no 'initial copy done' or caught-up line in:\n{replicator.log()}")
        replica_bytes = int(replica.psql("SELECT pg_database_size(current_database())"))
        progress(f"initial copy: {timeline(replicator)}; {match.group(0)}")
    return CopyResult(
        scale,
        db_bytes,
        table_bytes,
        replica_bytes,
        wall,
        done_s,
        caught_up_s,
        match.group(0),
        int(match.group(1)),
        int(match.group(2)),
        float(match.group(3)),
        float(match.group(4)),
        float(match.group(5)),
    )


# --- facts about the run -------------------------------------------------------------------


REPO = Path(__file__).resolve().parent.parent


def code_stamp() -> dict[str, float]:
    """Modification time of every file of the haproxy_ln package, by path."""
    stamps = {}
    for path in sorted((REPO / "haproxy_ln").rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts:
            stamps[str(path.relative_to(REPO))] = path.stat().st_mtime
    return stamps


def changed_files(before: dict[str, float], after: dict[str, float]) -> list[str]:
    """Files of the package added, removed or modified between two `code_stamp`s."""
    return sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))


def git_revision() -> str:
    """The checkout's commit, and whether haproxy_ln/ differs from it."""
    try:
        head = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "--", "haproxy_ln"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + (" with uncommitted changes in haproxy_ln/" if dirty else " (clean haproxy_ln/)")


def facts(opts: Options, native: bool) -> list[tuple[str, str]]:
    """The command line, machine, versions and settings, as label/value pairs."""
    return [
        ("command", shlex.join(sys.orig_argv)),
        ("date", time.strftime("%Y-%m-%d %H:%M:%S %Z")),
        ("machine", f"{os.cpu_count()} CPUs (nproc {len(os.sched_getaffinity(0))}), {mem_total()}"),
        ("CPU", cpu_model()),
        ("kernel", f"{platform.system()} {platform.release()}"),
        ("PostgreSQL", first_line([str(pg_bin_dir() / "postgres"), "--version"])),
        ("pgbench", first_line(["pgbench", "--version"])),
        ("haproxy-ln", f"{__version__}, framer: {'native C' if native else 'pure Python'}"),
        ("haproxy-ln commit", git_revision()),
        (
            "PostgreSQL settings",
            ", ".join(f"{k}={v}" for k, v in PG_SETTINGS.items())
            + ", wal_level=logical (all clusters), fsync on",
        ),
        (
            "setups",
            "(a)/(b)/(c) each its own primary, all running at once, each behind its own "
            "haproxy-ln proxy (defaults); (b) pg_basebackup -R -X stream, "
            f"synchronous_standby_names='{STANDBY_NAME}', synchronous_commit=on; (b2) (b)'s "
            "primary and standby with synchronous_commit=remote_apply (set before each run); "
            "(c) haproxy-ln replicate (defaults: sync mode, max_batch 1000)",
        ),
        (
            "pgbench",
            f"-M {PROTOCOL}, scale {opts.scale}, {opts.rounds} rounds x {opts.duration} s per "
            f"setup and workload, -j = min(clients, {MAX_JOBS}); TPC-B vacuums before each "
            "run, CLN-like -n; latencies: --log, nearest-rank percentiles",
        ),
        ("all connections", "TCP over 127.0.0.1, trust auth, no TLS"),
    ]


# --- report --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Summary:
    """Medians over the rounds for one workload and setup."""

    tps: float
    p50_ms: float
    p99_ms: float
    repl_cpu_us: float | None


def summarize(runs: list[Run]) -> Summary:
    """Median TPS, p50, p99 and replication CPU per transaction over `runs`."""
    cpu = [c for r in runs if (c := r.repl_cpu_us_per_txn) is not None]
    return Summary(
        statistics.median(r.tps for r in runs),
        statistics.median(r.p50_ms for r in runs),
        statistics.median(r.p99_ms for r in runs),
        statistics.median(cpu) if cpu else None,
    )


def cpu_cell(value: float | None) -> str:
    """A CPU-per-transaction cell, "-" when not measured."""
    return "-" if value is None else f"{value:.0f}"


def main_table(sums: dict[tuple[int, str], Summary]) -> str:
    """Per workload and setup: medians, and TPS and p99 relative to (b)."""
    headers = ["setup", "workload", "clients", "TPS", "p50 ms", "p99 ms"]
    headers += ["TPS / (b)", "p99 / (b)", "repl CPU us/txn"]
    rows = []
    for i, w in enumerate(WORKLOADS):
        ref = sums[(i, "b")]
        for setup in SETUPS:
            s = sums[(i, setup)]
            rows.append(
                [
                    SETUP_NAMES[setup],
                    w.label,
                    str(w.clients),
                    f"{s.tps:.1f}",
                    f"{s.p50_ms:.3f}",
                    f"{s.p99_ms:.3f}",
                    f"{s.tps / ref.tps:.2f}",
                    f"{s.p99_ms / ref.p99_ms:.2f}",
                    cpu_cell(s.repl_cpu_us),
                ]
            )
    return format_table(headers, rows)


def per_txn(cpu_s: float | None, run: Run) -> float | None:
    """CPU seconds per transaction of `run`, in us (None if not measured)."""
    return None if cpu_s is None or not run.transactions else cpu_s * 1e6 / run.transactions


def runs_table(results: Results, rounds: int) -> str:
    """Every run, in the order it ran."""
    headers = ["round", "workload", "clients", "setup", "TPS", "p50 ms", "p99 ms", "txns"]
    headers += ["CPU us/txn: walsender", "replica PG", "replicator"]
    rows = []
    for r in range(rounds):
        for i, w in enumerate(WORKLOADS):
            for setup in SETUPS:
                run = results[(i, setup)][r]
                txns = str(run.logged) + (f" ({run.failed} failed)" if run.failed else "")
                rows.append(
                    [
                        str(r + 1),
                        w.label,
                        str(w.clients),
                        SETUP_NAMES[setup],
                        f"{run.tps:.1f}",
                        f"{run.p50_ms:.3f}",
                        f"{run.p99_ms:.3f}",
                        txns,
                        cpu_cell(per_txn(run.walsender_cpu_s, run)),
                        cpu_cell(per_txn(run.replica_pg_cpu_s, run)),
                        cpu_cell(per_txn(run.replicator_cpu_s, run) if setup == "c" else None),
                    ]
                )
    return format_table(headers, rows)


def copy_lines(c: CopyResult) -> list[str]:
    """The initial-copy measurement as label/value lines."""
    pairs = [
        ("database", f"pgbench -i -s {c.scale}"),
        ("pg_database_size (primary)", f"{c.db_bytes / 1e6:.1f} MB"),
        ("tables without indexes", f"{c.table_bytes / 1e6:.1f} MB"),
        ("pg_database_size (replica)", f"{c.replica_db_bytes / 1e6:.1f} MB after the copy"),
        ("replicator log", c.log_line),
        ("start to copy done (wall)", f"{c.done_s:.1f} s"),
        ("start to caught up (wall)", f"{c.caught_up_s:.1f} s"),
        ("start to synchronous (wall)", f"{c.wall_s:.1f} s (ready)"),
        (
            "database size / wall time",
            f"{c.db_mb_per_caught_up_s:.1f} MB/s to caught up, "
            f"{c.db_mb_per_wall_s:.1f} MB/s to ready",
        ),
    ]
    width = max(len(k) for k, _ in pairs)
    return [f"{k.ljust(width)}  {v}" for k, v in pairs]


def paired(results: Results, i: int, field: str, ref: str = "b") -> list[float]:
    """Per round, (c)'s `field` over `ref`'s from the same round, for workload `i`."""
    return [
        getattr(c, field) / getattr(b, field)
        for c, b in zip(results[(i, "c")], results[(i, ref)], strict=True)
    ]


def target_lines(
    sums: dict[tuple[int, str], Summary], results: Results, c: CopyResult
) -> list[str]:
    """One line per stated target, with the numbers it was judged on.

    Judged on the ratio of the medians; the ratios within each round, (c)
    against the (b) run just before it, are shown too.
    """
    lines = []
    for i, w in enumerate(WORKLOADS):
        ours, ref = sums[(i, "c")], sums[(i, "b")]
        tps_ratio, p99_ratio = ours.tps / ref.tps, ours.p99_ms / ref.p99_ms
        name = f"{w.label}, {w.clients} client{'s' if w.clients > 1 else ''}"
        per_round = ", ".join(f"{r:.2f}" for r in paired(results, i, "tps"))
        lines.append(
            f"{verdict(tps_ratio >= 0.8)}  {name}: (c) TPS >= 0.8x (b)'s "
            f"({ours.tps:.1f} vs {ref.tps:.1f}, {tps_ratio:.2f}x; per round {per_round})"
        )
        per_round = ", ".join(f"{r:.2f}" for r in paired(results, i, "p99_ms"))
        lines.append(
            f"{verdict(p99_ratio <= 1.5)}  {name}: (c) p99 <= 1.5x (b)'s "
            f"({ours.p99_ms:.3f} vs {ref.p99_ms:.3f} ms, {p99_ratio:.2f}x; "
            f"per round {per_round})"
        )
    for i, w in enumerate(WORKLOADS):
        ours, ref = sums[(i, "c")], sums[(i, "b2")]
        name = f"{w.label}, {w.clients} client{'s' if w.clients > 1 else ''}"
        tps_rounds = ", ".join(f"{r:.2f}" for r in paired(results, i, "tps", "b2"))
        p99_rounds = ", ".join(f"{r:.2f}" for r in paired(results, i, "p99_ms", "b2"))
        lines.append(
            f"info  {name}: (c) against (b2), which also waits until the replica applied: "
            f"TPS {ours.tps / ref.tps:.2f}x (per round {tps_rounds}), "
            f"p99 {ours.p99_ms / ref.p99_ms:.2f}x (per round {p99_rounds})"
        )
    lines.append(
        f"{verdict(c.copy_mb_s >= 50)}  initial copy >= 50 MB/s "
        f"(replicator: {c.copy_mb_s:.1f} MB/s of COPY data; database size / wall time: "
        f"{c.db_mb_per_caught_up_s:.1f} MB/s to caught up, {c.db_mb_per_wall_s:.1f} MB/s "
        "to ready)"
    )
    return lines


def report(
    opts: Options,
    info: list[tuple[str, str]],
    checks: list[tuple[str, str]],
    results: Results,
    copy: CopyResult,
) -> str:
    """The whole report as text."""
    sums = {key: summarize(runs) for key, runs in results.items()}
    width = max(len(k) for k, _ in [*info, *checks])
    title = "haproxy-ln synchronous replication benchmark"
    parts = [title + (" (QUICK smoke run)" if opts.quick else ""), ""]
    parts += [f"{k.ljust(width)}  {v}" for k, v in info]
    parts += ["", "checks", ""]
    parts += [f"{k.ljust(width)}  {v}" for k, v in checks]
    parts += [
        "",
        f"pgbench through haproxy-ln proxy: medians over {opts.rounds} run(s) of "
        f"{opts.duration} s, interleaved (a), (b), (b2), (c); latency per transaction",
        "",
        main_table(sums),
        "",
        "individual runs",
        "",
        runs_table(results, opts.rounds),
        "",
        "initial copy: haproxy-ln replicate to an empty replica, from start until ready",
        "",
        *copy_lines(copy),
        "",
        "targets",
        "",
        *target_lines(sums, results, copy),
    ]
    return "\n".join(parts) + "\n"


# --- main ----------------------------------------------------------------------------------


def run(opts: Options, base: Path) -> str:
    """Set everything up under `base`, measure, stop everything, return the report."""
    script = base / "cln.sql"
    script.write_text(CLN_SCRIPT)
    logs = base / "logs"
    logs.mkdir()
    stamp = code_stamp()
    with contextlib.ExitStack() as stack:
        setups = start_setups(stack, base, opts)
        info = facts(opts, setups.proxies["a"].native_framer())
        ports = {setup: setups.proxies[SERVERS[setup]].port for setup in SETUPS}
        watched = setups.watched()
        info.append(
            (
                "replication CPU",
                "user+system time during each run of: the primary's walsender "
                f"((b) {len(watched['b'].walsender)}, (c) {len(watched['c'].walsender)} "
                "process), the replica's PostgreSQL (postmaster and children: (b) "
                f"{len(watched['b'].replica_pg)}, (c) {len(watched['c'].replica_pg)} "
                "processes), and (c) the haproxy-ln replicate process",
            )
        )
        results = run_rounds(ports, watched, setups, script, logs, opts)
        checks = [*setups.checks, *consistency_checks(setups)]
        warnings = [
            line
            for line in setups.replicator.log().splitlines()
            if " WARNING " in line or " ERROR " in line
        ]
        checks.append(("(c) replicator warnings", str(len(warnings))))
        checks += [("", line) for line in warnings[:10]]
        progress("stopping the setups")
    copy = measure_copy(base, opts.copy_scale)
    changed = changed_files(stamp, code_stamp())
    checks.append(
        (
            "haproxy_ln/ during the run",
            f"CHANGED ON DISK: {', '.join(changed)}" if changed else "unchanged on disk",
        )
    )
    return report(opts, info, checks, results, copy)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: run the benchmark and print the report."""
    opts = parse_args(argv)
    if not framing.NATIVE:
        print(f"warning: C framer unavailable here: {framing.native_problem}", file=sys.stderr)
    base = scratch_dir("haproxy-ln-bench-repl-")
    try:
        with sigterm_as_interrupt():
            text = run(opts, base)
    except KeyboardInterrupt:
        progress("interrupted; every server has been stopped")
        return 130
    except (BenchError, LocalServerError) as e:
        progress(f"failed: {e}")
        return 1
    finally:
        if opts.keep:
            progress(f"kept {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)
    sys.stdout.write(text)
    progress("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The three measurements: pgbench runs, idle-connection memory, allocations.

How this works:

* `run_pgbench` runs one pgbench against a port and parses its
  "tps = ... (without initial connection time)" and "latency average" lines.
* `idle_memory` opens many raw-socket client connections with trust auth
  (StartupMessage, then read until ReadyForQuery), reads the server's VmRSS
  from /proc before, after the startups, and after one `SELECT 1` on each,
  then closes them with Terminate.
* `measure_allocations` runs a `Proxy` in this process under `trio.run`,
  with pgbench as a subprocess, and compares tracemalloc snapshots and the
  framer pool's `mallocs` counter around a steady-state run.
"""

from __future__ import annotations

import contextlib
import gc
import os
import re
import socket
import struct
import subprocess
import time
import tracemalloc
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import trio

from bench.servers import client_env
from haproxy_ln import framing
from haproxy_ln.config import HostPort, ProxyConfig
from haproxy_ln.local.ports import LOOPBACK
from haproxy_ln.proxy.gate import Gate
from haproxy_ln.proxy.server import Proxy

PROTOCOL_3 = 3 << 16
_TPS = re.compile(r"^tps = ([0-9.]+) \(without initial connection time\)", re.M)
_LATENCY = re.compile(r"^latency average = ([0-9.]+) ms", re.M)
_PROCESSED = re.compile(r"^number of transactions actually processed: ([0-9]+)", re.M)


# --- pgbench -------------------------------------------------------------------------------


@dataclass(frozen=True)
class PgbenchResult:
    """One pgbench run: transactions per second, average latency, transactions done."""

    tps: float
    latency_ms: float
    transactions: int


class BenchError(RuntimeError):
    """A benchmark step failed (pgbench error, unexpected server answer)."""


def parse_pgbench(output: str) -> PgbenchResult:
    """Parse pgbench's summary. Raises `BenchError` if a line is missing."""
    tps, latency = _TPS.search(output), _LATENCY.search(output)
    processed = _PROCESSED.search(output)
    if tps is None or latency is None or processed is None:
        raise BenchError(f"cannot parse pgbench output:\n{output}")
    return PgbenchResult(float(tps.group(1)), float(latency.group(1)), int(processed.group(1)))


def pgbench_argv(port: int, args: Sequence[str]) -> list[str]:
    """A pgbench command line for `args` against the loopback `port`."""
    return ["pgbench", "-h", LOOPBACK, "-p", str(port), "-U", "postgres", *args, "postgres"]


def run_pgbench(port: int, args: Sequence[str], timeout: float) -> PgbenchResult:
    """Run pgbench with `args` against `port`. Raises `BenchError` if it fails."""
    argv = pgbench_argv(port, args)
    try:
        done = subprocess.run(
            argv, env=client_env(), capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired:
        raise BenchError(f"pgbench timed out: {' '.join(argv)}") from None
    if done.returncode != 0:
        raise BenchError(f"pgbench failed ({' '.join(argv)}):\n{done.stderr.strip()}")
    return parse_pgbench(done.stdout)


# --- idle connections ----------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time used so far by process `pid` (all its threads)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_kib(pid: int) -> int:
    """Resident set size of `pid` in KiB (VmRSS from /proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise BenchError(f"no VmRSS for pid {pid}")


def _read_exact(sock: socket.socket, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise BenchError("server closed the connection")
        data += chunk
    return bytes(data)


def _read_until_ready(sock: socket.socket) -> None:
    """Read messages until ReadyForQuery; raise `BenchError` on ErrorResponse or auth."""
    while True:
        kind, length = struct.unpack("!cI", _read_exact(sock, 5))
        body = _read_exact(sock, length - 4)
        if kind == b"Z":
            return
        if kind == b"E":
            raise BenchError(f"server error: {body!r}")
        if kind == b"R" and body[:4] != b"\0\0\0\0":
            raise BenchError("server asked for a password; trust auth was expected")


def open_session(port: int) -> socket.socket:
    """A client connection as user postgres, authenticated and ready for queries."""
    params = b"user\0postgres\0database\0postgres\0\0"
    sock = socket.create_connection((LOOPBACK, port), timeout=30)
    try:
        sock.sendall(struct.pack("!II", 8 + len(params), PROTOCOL_3) + params)
        _read_until_ready(sock)
    except BaseException:
        sock.close()
        raise
    return sock


def simple_query(sock: socket.socket, sql: str) -> None:
    """Run one simple-protocol query and read its answer up to ReadyForQuery."""
    text = sql.encode() + b"\0"
    sock.sendall(b"Q" + struct.pack("!I", 4 + len(text)) + text)
    _read_until_ready(sock)


def close_sessions(socks: Sequence[socket.socket]) -> None:
    """Send Terminate on each connection and close it; never raises."""
    for sock in socks:
        with contextlib.suppress(OSError):
            sock.sendall(b"X\0\0\0\4")
        sock.close()


@dataclass(frozen=True)
class IdleMemory:
    """Server RSS around `count` idle client connections, in KiB."""

    count: int
    before: int
    after_startup: int
    after_query: int

    def per_conn_startup(self) -> float:
        """KiB per connection after the startups."""
        return (self.after_startup - self.before) / self.count

    def per_conn_query(self) -> float:
        """KiB per connection after one query on each."""
        return (self.after_query - self.before) / self.count


def idle_memory(port: int, pid: int, count: int, settle: float = 0.5) -> IdleMemory:
    """Measure the RSS of server `pid` around `count` idle connections to `port`."""
    time.sleep(settle)
    before = rss_kib(pid)
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            socks.append(open_session(port))
        time.sleep(settle)
        after_startup = rss_kib(pid)
        for sock in socks:
            simple_query(sock, "SELECT 1")
        time.sleep(settle)
        after_query = rss_kib(pid)
    finally:
        close_sessions(socks)
    return IdleMemory(count, before, after_startup, after_query)


# --- allocations ---------------------------------------------------------------------------

TRACED_FILES = ("*/haproxy_ln/*", "*/trio/*")


@dataclass(frozen=True)
class AllocCase:
    """One allocation measurement: a pgbench workload and its messages per transaction."""

    label: str
    args: tuple[str, ...]
    messages_per_txn: int
    transactions: int
    relay: bool = True  # the C relay thread relays; else Python's pumps do


@dataclass(frozen=True)
class AllocResult:
    """What one `AllocCase` showed."""

    case: AllocCase
    retained_bytes: int
    retained_blocks: int
    transient_peak: int
    mallocs_before: int
    mallocs_after: int

    @property
    def messages(self) -> int:
        """Relayed messages in the measured run (startup and teardown not counted)."""
        return self.case.transactions * self.case.messages_per_txn


def _traced_total(snapshot: tracemalloc.Snapshot) -> tuple[int, int]:
    """Bytes and blocks in `snapshot` allocated from haproxy_ln or trio code."""
    filtered = snapshot.filter_traces([tracemalloc.Filter(True, p) for p in TRACED_FILES])
    stats = filtered.statistics("filename")
    return sum(s.size for s in stats), sum(s.count for s in stats)


async def _pgbench_async(port: int, args: Sequence[str]) -> PgbenchResult:
    done = await trio.run_process(
        pgbench_argv(port, args), capture_stdout=True, capture_stderr=True, env=client_env()
    )
    return parse_pgbench(done.stdout.decode())


async def _measure_case(proxy: Proxy, port: int, case: AllocCase, warmup: int) -> AllocResult:
    """Warm up, then measure one case between two snapshots."""
    await _pgbench_async(port, [*case.args, "-t", str(warmup)])
    await trio.sleep(0.2)
    gc.collect()
    bytes_before, blocks_before = _traced_total(tracemalloc.take_snapshot())
    mallocs_before = proxy.pool.mallocs
    tracemalloc.reset_peak()
    await _pgbench_async(port, [*case.args, "-t", str(case.transactions)])
    await trio.sleep(0.2)  # let the connection finish its teardown
    current, peak = tracemalloc.get_traced_memory()
    mallocs_after = proxy.pool.mallocs
    gc.collect()
    bytes_after, blocks_after = _traced_total(tracemalloc.take_snapshot())
    return AllocResult(
        case,
        retained_bytes=bytes_after - bytes_before,
        retained_blocks=blocks_after - blocks_before,
        transient_peak=peak - current,
        mallocs_before=mallocs_before,
        mallocs_after=mallocs_after,
    )


async def _allocations_main(
    upstream_port: int, cases: Sequence[AllocCase], warmup: int, relay: bool
) -> list[AllocResult]:
    config = ProxyConfig.model_validate({"upstream": f"{LOOPBACK}:{upstream_port}"})
    config = config.model_copy(update={"listen": HostPort(LOOPBACK, 0)})
    proxy = Proxy(config, Gate(is_open=True), use_relay=relay)
    results: list[AllocResult] = []
    async with trio.open_nursery() as nursery:
        addresses = await nursery.start(proxy.serve)
        try:
            # Steady state: every workload once first, so that the pool has grown
            # to the most buffers ever in transit at once before anything counts.
            for case in cases:
                await _pgbench_async(addresses[0][1], [*case.args, "-t", str(warmup)])
            tracemalloc.start(1)
            for case in cases:
                results.append(await _measure_case(proxy, addresses[0][1], case, warmup))
        finally:
            tracemalloc.stop()
            proxy.stop()
    return results


def measure_allocations(
    upstream_port: int, cases: Sequence[AllocCase], warmup: int
) -> list[AllocResult]:
    """Run the proxy in this process and measure each case; see the module docstring."""
    if not framing.NATIVE:
        raise BenchError(f"the C framer is not in use: {framing.native_problem}")
    results = []
    for relay in (True, False):
        chosen = [c for c in cases if c.relay == relay]
        results += trio.run(_allocations_main, upstream_port, chosen, warmup, relay)
    return results

"""Benchmark haproxy-ln against a direct connection and PgBouncer, in one run.

Usage (from the repository root; root on Debian 12, like the tests):

    .venv/bin/python -m bench.proxy [--duration S] [--rounds N] [--scale S] [--quick]

How this works: one throwaway PostgreSQL 15 cluster is initialised with
`pgbench -i`, then PgBouncer (session mode) and the real `haproxy-ln proxy`
command are started in front of it. Every round runs every pgbench workload
against the three targets, the targets in an order rotated each round so that
drift on a shared machine hits all of them alike; the report gives medians
over the rounds. Then the memory of 1,000 idle client connections is
measured in both proxies, both are stopped, and the proxy is run in this
process to count Python allocations and pooled-buffer allocations per
relayed message. Progress goes to stderr, the report to stdout. Every server
is stopped at the end, on errors and on Ctrl-C or SIGTERM too.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

import trio

from bench.probes import (
    AllocCase,
    AllocResult,
    IdleMemory,
    PgbenchResult,
    cpu_seconds,
    idle_memory,
    measure_allocations,
    run_pgbench,
)
from bench.servers import HaproxyLn, PgBouncer, client_env
from haproxy_ln import __version__, framing
from haproxy_ln.config import ProxyConfig
from haproxy_ln.local import PostgresCluster, scratch_dir
from haproxy_ln.local.postgres import pg_bin_dir

TARGETS = ("direct", "haproxy-ln", "pgbouncer")
PROTOCOL = "simple"
MAX_JOBS = 2
PG_SETTINGS = {
    "max_connections": "1200",
    "shared_buffers": "256MB",
    "max_wal_size": "8GB",
    "checkpoint_timeout": "30min",
}
# Simple protocol, select-only: Query, then RowDescription, DataRow,
# CommandComplete and ReadyForQuery.
MESSAGES_PER_SIMPLE_SELECT = 5

_started = time.monotonic()


def progress(text: str) -> None:
    """One progress line on stderr, with the elapsed time."""
    elapsed = time.monotonic() - _started
    print(f"[{elapsed:7.1f}s] {text}", file=sys.stderr, flush=True)


# --- options -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Options:
    """What to run, from the command line."""

    duration: int
    rounds: int
    scale: int
    idle: int
    transactions: int
    quick: bool

    @property
    def warmup(self) -> int:
        """Seconds of unreported select-only load per target before the rounds."""
        return min(5, self.duration)


def parse_args(argv: Sequence[str] | None = None) -> Options:
    """Parse the command line; --quick overrides the durations and counts."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.proxy", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--duration", type=int, default=10, help="seconds per pgbench run [10]")
    parser.add_argument("--rounds", type=int, default=5, help="rounds over all targets [5]")
    parser.add_argument("--scale", type=int, default=10, help="pgbench -i scale factor [10]")
    parser.add_argument("--idle", type=int, default=1000, help="idle connections to open [1000]")
    parser.add_argument(
        "--transactions", type=int, default=5000, help="transactions per allocation run [5000]"
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 round of 2 s, fewer")
    ns = parser.parse_args(argv)
    if ns.quick:
        return Options(2, 1, min(ns.scale, 2), min(ns.idle, 100), min(ns.transactions, 500), True)
    if min(ns.duration, ns.rounds, ns.scale, ns.idle, ns.transactions) < 1:
        parser.error("all numbers must be at least 1")
    return Options(ns.duration, ns.rounds, ns.scale, ns.idle, ns.transactions, False)


# --- workloads -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    """One pgbench workload."""

    label: str
    clients: int
    select_only: bool
    protocol: str = PROTOCOL

    def args(self, duration: int) -> list[str]:
        """pgbench options for a run of `duration` seconds."""
        args = ["-M", self.protocol, "-c", str(self.clients)]
        args += ["-j", str(min(self.clients, MAX_JOBS)), "-T", str(duration)]
        return [*args, "-S", "-n"] if self.select_only else args


WORKLOADS = (
    Workload("TPC-B, 1 client", 1, select_only=False),
    Workload("TPC-B, 8 clients", 8, select_only=False),
    Workload("select-only, 1 client", 1, select_only=True),
    Workload("select-only, 8 clients", 8, select_only=True),
    Workload("select-only, 1 client, prepared", 1, select_only=True, protocol="prepared"),
)


@dataclass(frozen=True)
class Run:
    """One pgbench run, with the CPU time the proxy in between used (None: direct)."""

    result: PgbenchResult
    proxy_cpu_s: float | None


Results = dict[tuple[str, str], list[Run]]


def round_order(round_index: int) -> list[str]:
    """The targets in the order used in round `round_index` (rotated each round)."""
    shift = round_index % len(TARGETS)
    return [*TARGETS[shift:], *TARGETS[:shift]]


def run_one(port: int, pid: int | None, args: list[str], timeout: float) -> Run:
    """One pgbench run against `port`, measuring the CPU time of `pid` if given."""
    before = cpu_seconds(pid) if pid is not None else 0.0
    result = run_pgbench(port, args, timeout)
    cpu = cpu_seconds(pid) - before if pid is not None else None
    return Run(result, cpu)


def run_rounds(ports: dict[str, int], pids: dict[str, int], opts: Options) -> Results:
    """Run every workload against every target, `opts.rounds` times, interleaved.

    `pids` maps the proxies among the targets to their process ids.
    """
    results: Results = {}
    for target in TARGETS:
        progress(f"warm-up: select-only, 8 clients, {opts.warmup} s -> {target}")
        run_pgbench(ports[target], Workload("", 8, True).args(opts.warmup), opts.warmup + 120)
    for r in range(opts.rounds):
        for workload in WORKLOADS:
            for target in round_order(r):
                timeout = opts.duration + 300
                run = run_one(
                    ports[target], pids.get(target), workload.args(opts.duration), timeout
                )
                results.setdefault((workload.label, target), []).append(run)
                progress(
                    f"round {r + 1}/{opts.rounds}: {workload.label} -> {target}: "
                    f"{run.result.tps:.1f} tps, {run.result.latency_ms:.3f} ms"
                )
    return results


# --- setup ---------------------------------------------------------------------------------


def init_pgbench(cluster: PostgresCluster, scale: int) -> None:
    """Create and fill the pgbench tables at `scale`."""
    progress(f"pgbench -i -s {scale}")
    argv = ["pgbench", "-i", "-q", "-s", str(scale), "-h", cluster.host, "-p", str(cluster.port)]
    argv += ["-U", "postgres", "postgres"]
    subprocess.run(argv, env=client_env(), check=True, capture_output=True, timeout=1800)


def write_scripts(directory: Path) -> dict[str, Path]:
    """pgbench scripts returning one row of a given size, keyed by label."""
    scripts = {}
    for label, size in (("8 KiB row", 8192), ("128 KiB row", 131072)):
        path = directory / f"row-{size}.sql"
        path.write_text(f"SELECT repeat('x', {size});\n")
        scripts[label] = path
    return scripts


def alloc_cases(opts: Options, scripts: dict[str, Path]) -> list[AllocCase]:
    """The allocation measurements: small rows, large rows, and a one-transaction baseline.

    Each runs twice: relayed by the C relay thread, and by Python's pumps
    alone (the path a connection takes when the relay hands it back).
    """
    base = ("-M", PROTOCOL, "-c", "1", "-n")
    n = opts.transactions
    per_txn = MESSAGES_PER_SIMPLE_SELECT
    cases = []
    for relay, path_label in ((True, "relay thread"), (False, "Python pumps")):

        def case(label: str, args: tuple[str, ...], count: int) -> AllocCase:
            return AllocCase(f"{label} [{path_label}]", args, per_txn, count, relay)  # noqa: B023

        cases.append(case("connect + 1 transaction (baseline)", (*base, "-S"), 1))
        cases.append(case("select-only (small row)", (*base, "-S"), n))
        cases.append(case("select-only (small row), 4x longer", (*base, "-S"), 4 * n))
        for label, path in scripts.items():
            cases.append(case(f"SELECT repeat('x', N): {label}", (*base, "-f", str(path)), n))
    return cases


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM into KeyboardInterrupt while inside, so cleanup runs."""

    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# --- facts about the run -------------------------------------------------------------------


def first_line(argv: Sequence[str]) -> str:
    """The first line a command prints (its version, say), or "unknown"."""
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    except OSError as e:
        return f"unknown ({e})"
    lines = (done.stdout or done.stderr).strip().splitlines()
    return lines[0] if lines else "unknown"


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo."""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def mem_total() -> str:
    """Total memory from /proc/meminfo, in GiB."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    return "unknown"


def facts(opts: Options, bouncer: PgBouncer, native: bool) -> list[tuple[str, str]]:
    """The command line, machine, versions and settings, as label/value pairs."""
    proxy_defaults = ProxyConfig()
    bouncer_settings = bouncer.settings()
    return [
        ("command", shlex.join(sys.orig_argv)),
        ("date", time.strftime("%Y-%m-%d %H:%M:%S %Z")),
        ("machine", f"{os.cpu_count()} CPUs (nproc {len(os.sched_getaffinity(0))}), {mem_total()}"),
        ("CPU", cpu_model()),
        ("kernel", f"{platform.system()} {platform.release()}"),
        ("PostgreSQL", first_line([str(pg_bin_dir() / "postgres"), "--version"])),
        ("pgbench", first_line(["pgbench", "--version"])),
        ("PgBouncer", first_line(["/usr/sbin/pgbouncer", "--version"])),
        ("haproxy-ln", f"{__version__}, framer: {'native C' if native else 'pure Python'}"),
        ("Python / trio", f"{platform.python_version()} / {trio.__version__}"),
        ("PostgreSQL settings", ", ".join(f"{k}={v}" for k, v in PG_SETTINGS.items())),
        (
            "PgBouncer settings",
            ", ".join(
                f"{k}={bouncer_settings[k]}"
                for k in ("pool_mode", "auth_type", "max_client_conn", "default_pool_size")
            ),
        ),
        (
            "haproxy-ln settings",
            f"defaults (buffer_chunk={proxy_defaults.buffer_chunk}, "
            f"buffer_budget={proxy_defaults.buffer_budget}) "
            f"but max_client_connections={bouncer.max_clients}",
        ),
        (
            "pgbench",
            f"-M {PROTOCOL} (plus one -M prepared row), scale {opts.scale}, "
            f"{opts.rounds} rounds x {opts.duration} s per target and workload, "
            f"-j = min(clients, {MAX_JOBS}); TPC-B vacuums before each run, select-only -n",
        ),
        ("all connections", "TCP over 127.0.0.1, trust auth, no TLS"),
    ]


# --- report --------------------------------------------------------------------------------


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain-text table: first column left-aligned, the others right-aligned."""
    widths = [max(len(str(c)) for c in col) for col in zip(headers, *rows, strict=False)]

    def line(cells: Sequence[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = (c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True))
        return "  ".join([first, *rest]).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(headers), rule, *(line(r) for r in rows)])


@dataclass(frozen=True)
class Summary:
    """Medians over the rounds for one workload and target."""

    tps: float
    tps_min: float
    tps_max: float
    latency_ms: float
    cpu_us_per_txn: float | None


def summarize(runs: list[Run]) -> Summary:
    """Medians over `runs`: TPS (with its range), average latency, proxy CPU per transaction."""
    tps = [r.result.tps for r in runs]
    cpu = [
        r.proxy_cpu_s * 1e6 / r.result.transactions
        for r in runs
        if r.proxy_cpu_s is not None and r.result.transactions
    ]
    return Summary(
        statistics.median(tps),
        min(tps),
        max(tps),
        statistics.median(r.result.latency_ms for r in runs),
        statistics.median(cpu) if cpu else None,
    )


def summaries(results: Results) -> dict[tuple[str, str], Summary]:
    """`summarize` for every workload and target."""
    return {key: summarize(runs) for key, runs in results.items()}


def throughput_table(sums: dict[tuple[str, str], Summary]) -> str:
    """The pgbench table: TPS, TPS vs direct, latency and added latency."""
    headers = ["workload / target", "TPS", "min..max", "vs direct", "latency ms", "added us"]
    headers.append("proxy CPU us/txn")
    rows: list[list[str]] = []
    for w in WORKLOADS:
        direct = sums[(w.label, "direct")]
        rows.append([w.label, "", "", "", "", "", ""])
        for target in TARGETS:
            s = sums[(w.label, target)]
            added = (s.latency_ms - direct.latency_ms) * 1000
            rows.append(
                [
                    f"  {target}",
                    f"{s.tps:.1f}",
                    f"{s.tps_min:.0f}..{s.tps_max:.0f}",
                    f"{s.tps / direct.tps:.3f}",
                    f"{s.latency_ms:.3f}",
                    "-" if target == "direct" else f"{added:+.1f}",
                    "-" if s.cpu_us_per_txn is None else f"{s.cpu_us_per_txn:.1f}",
                ]
            )
    return format_table(headers, rows)


def added_ratio(sums: dict[tuple[str, str], Summary], label: str) -> float:
    """haproxy-ln's added latency divided by PgBouncer's, for workload `label`."""
    direct = sums[(label, "direct")].latency_ms
    ours = sums[(label, "haproxy-ln")].latency_ms - direct
    theirs = sums[(label, "pgbouncer")].latency_ms - direct
    return ours / theirs if theirs > 0 else float("inf")


def memory_table(memory: dict[str, IdleMemory]) -> str:
    """RSS of each proxy around the idle connections."""
    headers = ["proxy", "conns", "RSS before KiB", "after startup", "KiB/conn", "after SELECT 1"]
    headers.append("KiB/conn")
    rows = [
        [
            name,
            str(m.count),
            str(m.before),
            str(m.after_startup),
            f"{m.per_conn_startup():.1f}",
            str(m.after_query),
            f"{m.per_conn_query():.1f}",
        ]
        for name, m in memory.items()
    ]
    return format_table(headers, rows)


def alloc_table(allocs: Sequence[AllocResult]) -> str:
    """Retained and transient Python memory, and buffer mallocs, per case."""
    headers = ["case (in-process proxy)", "txns", "msgs", "retained B", "B/msg", "blocks/msg"]
    headers += ["transient peak KiB", "pool mallocs"]
    rows = [
        [
            a.case.label,
            str(a.case.transactions),
            str(a.messages),
            f"{a.retained_bytes:+d}",
            f"{a.retained_bytes / a.messages:+.3f}",
            f"{a.retained_blocks / a.messages:+.4f}",
            f"{a.transient_peak / 1024:.1f}",
            f"{a.mallocs_before} -> {a.mallocs_after}",
        ]
        for a in allocs
    ]
    return format_table(headers, rows)


def verdict(ok: bool) -> str:
    """PASS or MISS."""
    return "PASS" if ok else "MISS"


def target_lines(
    sums: dict[tuple[str, str], Summary],
    memory: dict[str, IdleMemory],
    allocs: Sequence[AllocResult],
) -> list[str]:
    """One line per stated target, with the numbers it was judged on."""
    lines = []
    for label in ("TPC-B, 1 client", "TPC-B, 8 clients"):
        ours, theirs = sums[(label, "haproxy-ln")].tps, sums[(label, "pgbouncer")].tps
        lines.append(
            f"{verdict(ours >= theirs)}  {label}: haproxy-ln TPS >= PgBouncer's "
            f"({ours:.1f} vs {theirs:.1f}, ratio {ours / theirs:.3f})"
        )
    ratio = added_ratio(sums, "select-only, 1 client")
    lines.append(
        f"{verdict(ratio <= 1.5)}  select-only, 1 client: added latency within 1.5x of "
        f"PgBouncer's (ratio {ratio:.2f}; prepared: "
        f"{added_ratio(sums, 'select-only, 1 client, prepared'):.2f})"
    )
    grown = sum(a.mallocs_after - a.mallocs_before for a in allocs)
    lines.append(
        f"{verdict(grown == 0)}  zero buffer allocations per relayed message in steady "
        f"state ({grown} pool mallocs over all measured runs)"
    )
    m = memory["haproxy-ln"]
    worst = max(m.per_conn_startup(), m.per_conn_query())
    lines.append(
        f"{verdict(worst < 64)}  under 64 KiB per idle connection "
        f"({m.per_conn_startup():.1f} KiB after startup, {m.per_conn_query():.1f} after a query)"
    )
    return lines


def report(
    opts: Options,
    info: list[tuple[str, str]],
    results: Results,
    memory: dict[str, IdleMemory],
    allocs: Sequence[AllocResult],
) -> str:
    """The whole report as text."""
    sums = summaries(results)
    width = max(len(k) for k, _ in info)
    parts = ["haproxy-ln proxy benchmark" + (" (QUICK smoke run)" if opts.quick else ""), ""]
    parts += [f"{k.ljust(width)}  {v}" for k, v in info]
    parts += ["", f"pgbench: medians over {opts.rounds} round(s) of {opts.duration} s", ""]
    parts += [throughput_table(sums), ""]
    parts += [
        "added latency ratio haproxy-ln / PgBouncer, select-only 1 client: "
        f"simple {added_ratio(sums, 'select-only, 1 client'):.2f}, "
        f"prepared {added_ratio(sums, 'select-only, 1 client, prepared'):.2f}",
        "",
        f"memory: proxy VmRSS around {opts.idle} idle authenticated connections",
        "",
        memory_table(memory),
        "",
        "allocations: tracemalloc (haproxy_ln and trio files) and the framer pool, "
        f"{MESSAGES_PER_SIMPLE_SELECT} relayed messages per transaction",
        "",
        alloc_table(allocs),
        "",
        "targets",
        "",
        *target_lines(sums, memory, allocs),
    ]
    return "\n".join(parts) + "\n"


# --- main ----------------------------------------------------------------------------------


def measure_memory(targets: dict[str, HaproxyLn | PgBouncer], count: int) -> dict[str, IdleMemory]:
    """Idle-connection memory for each proxy, one after the other."""
    memory = {}
    for name, server in targets.items():
        progress(f"memory: {count} idle connections -> {name}")
        memory[name] = idle_memory(server.port, server.pid, count)
        time.sleep(1.0)  # let the backends of the closed connections exit
    return memory


def run(opts: Options, base: Path) -> str:
    """Set everything up under `base`, measure, stop everything, return the report."""
    max_clients = opts.idle + 100
    with contextlib.ExitStack() as stack:
        progress("starting PostgreSQL")
        cluster = stack.enter_context(PostgresCluster(base / "pg", settings=PG_SETTINGS))
        init_pgbench(cluster, opts.scale)
        progress("starting haproxy-ln and PgBouncer")
        ours = stack.enter_context(
            HaproxyLn(base / "haproxy-ln", cluster.port, max_clients=max_clients)
        )
        bouncer = stack.enter_context(
            PgBouncer(base / "pgbouncer", cluster.port, max_clients=max_clients)
        )
        native = ours.native_framer()
        info = facts(opts, bouncer, native)
        ports = {"direct": cluster.port, "haproxy-ln": ours.port, "pgbouncer": bouncer.port}
        pids = {"haproxy-ln": ours.pid, "pgbouncer": bouncer.pid}
        results = run_rounds(ports, pids, opts)
        memory = measure_memory({"haproxy-ln": ours, "pgbouncer": bouncer}, opts.idle)
        ours.stop()
        bouncer.stop()
        progress(f"allocations: in-process proxy, {opts.transactions} transactions per case")
        cases = alloc_cases(opts, write_scripts(base))
        allocs = measure_allocations(cluster.port, cases, warmup=max(200, opts.transactions // 5))
    return report(opts, info, results, memory, allocs)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: run the benchmark and print the report."""
    opts = parse_args(argv)
    if not framing.NATIVE:
        print(f"warning: C framer unavailable here: {framing.native_problem}", file=sys.stderr)
    base = scratch_dir("haproxy-ln-bench-")
    try:
        with sigterm_as_interrupt():
            text = run(opts, base)
    except KeyboardInterrupt:
        progress("interrupted; every server has been stopped")
        return 130
    finally:
        shutil.rmtree(base, ignore_errors=True)
    sys.stdout.write(text)
    progress("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())

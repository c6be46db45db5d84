"""Benchmark failover and switchover of a local pair: time to the first write on the new active.

Usage (from the repository root; root on Debian 12, like the tests):

    .venv/bin/python -m bench.failover [--trials N] [--quick] [--keep]

How this works: like `haproxy-ln demo` (haproxy_ln/demo.py), it starts in a
scratch directory one etcd member, two PostgreSQL 15 clusters and two
`haproxy-ln run` agents (nodes a and b, haproxy_ln.local.pair: lease TTL
2 s), whose daemon is the Lightning simulator in cln mode writing through
its node's proxy at a fixed rate and journaling every acknowledged write
with its CLOCK_MONOTONIC time. Every time below is read from those files
(the agents' safety event logs and the simulator's journals, one clock for
all processes), never from when this process happened to poll them.

Failover trials (`--trials`, alternating between the nodes): after 1 to 2
s of traffic (random, so the kill falls anywhere in the keepalive cycle),
SIGKILL the active agent (its daemon dies with it). Measured from the kill:
the standby's `ha.candidate` event (it saw the leader key gone: the lease
expired), each step of its `takeover.timeline` event (leader_acquired,
fence_raised, sequences_moved, primary_bootstrapped, gate_opened,
keys_materialized, daemon_ready, relative to the candidate event), the
simulator's journal `start` line (its process is up: Python started, journal
open), and the first write it acknowledged through the new active's gate.
Then the journal checker runs against the new active's database (lost = 0,
split brain = 0) and the one-signer check over both event logs; the killed
agent is restarted, rejoins as standby (re-copied) and the trial ends once
the new active's `sync.record` event names it.

Switchover trials (the same number, alternating): after the same traffic,
`haproxy_ln.agent.switchover.switchover` asks the active to hand over to the
standby. Measured from the request (the moment the request is in etcd: when
the switchover module logs it): the old active's `ha.demoting` event and its
`daemon.stopped`, the new active's `ha.candidate`, `leader.acquired` (the
new leader key), gate_opened, daemon_ready, its simulator's start, and its
first acknowledged write. The same checks follow, and the trial ends when
the new active replicates synchronously to the old one.

The report (stdout) gives min, median, p90 (nearest rank) and max, the
breakdown by step, every trial, the checks, and the targets (failover
median under 3 s and max under 5 s, switchover under 1 s). Progress goes to
stderr. Every server and agent is stopped at the end, also on errors,
Ctrl-C and SIGTERM; `--keep` keeps the scratch directory (agent logs, event
logs, journals). A trial that fails (a timeout, a failing step) ends the
trials; the report then covers those completed and the exit code is 1.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import platform
import random
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import trio

from bench.probes import BenchError
from bench.proxy import (
    cpu_model,
    first_line,
    format_table,
    mem_total,
    progress,
    sigterm_as_interrupt,
    verdict,
)
from bench.replication import REPO, changed_files, code_stamp, git_revision
from haproxy_ln import __version__
from haproxy_ln.agent.switchover import switchover
from haproxy_ln.config import load
from haproxy_ln.errors import HaproxyLnError
from haproxy_ln.local import EtcdServer, PostgresCluster, scratch_dir
from haproxy_ln.local.etcd import etcd_binary
from haproxy_ln.local.pair import AgentNode, make_keys, one_signer_overlaps, sim_daemon
from haproxy_ln.local.postgres import pg_bin_dir
from haproxy_ln.sim.checker import check

T = TypeVar("T")

DBNAME = "lightning"
RATE = 50.0  # simulated channel updates per second, as in the demo
TIMEOUT = 90.0  # seconds any one wait may take before the trial counts as failed
POLL = 0.05  # seconds between reads of the files (times come from the files, not the polls)
TRAFFIC = (1.0, 2.0)  # seconds of traffic before each trial, uniformly random
DEFAULT_TRIALS = 20
QUICK_TRIALS = 3

# The steps of the `takeover.timeline` event, in order (seconds after `detected`).
TIMELINE = (
    "leader_acquired",
    "fence_raised",
    "sequences_moved",
    "primary_bootstrapped",
    "gate_opened",
    "keys_materialized",
    "daemon_ready",
)
FAILOVER_ROWS = (
    ("detected", "detected (standby's ha.candidate)"),
    *((step, step) for step in TIMELINE),
    ("sim_started", "simulator running (journal start)"),
    ("first_ack", "first write acknowledged"),
)
SWITCHOVER_ROWS = (
    ("demoting", "old active demoting (ha.demoting)"),
    ("old_daemon_stopped", "old daemon stopped"),
    ("detected", "new active candidate (ha.candidate)"),
    ("leader_acquired", "new leader key (leader_acquired)"),
    ("gate_opened", "gate_opened"),
    ("daemon_ready", "daemon_ready"),
    ("sim_started", "simulator running (journal start)"),
    ("first_ack", "first write acknowledged"),
)

TARGET_FAILOVER_MEDIAN = 3.0
TARGET_FAILOVER_MAX = 5.0
TARGET_SWITCHOVER = 1.0


class TrialFailed(BenchError):
    """A trial did not complete; the message says what was awaited and where to look."""


# --- options -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Options:
    """What to run, from the command line."""

    trials: int
    quick: bool
    keep: bool


def parse_args(argv: Sequence[str] | None = None) -> Options:
    """Parse the command line; --quick means 3 trials of each kind."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.failover", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--trials",
        type=int,
        default=DEFAULT_TRIALS,
        help=f"failover trials, and as many switchover trials [{DEFAULT_TRIALS}]",
    )
    parser.add_argument(
        "--quick", action="store_true", help=f"smoke run: {QUICK_TRIALS} trials of each kind"
    )
    parser.add_argument(
        "--keep",
        action="store_true",
        help="keep the scratch directory (agent logs, event logs, journals)",
    )
    ns = parser.parse_args(argv)
    if ns.quick:
        return Options(QUICK_TRIALS, True, ns.keep)
    if ns.trials < 1:
        parser.error("--trials must be at least 1")
    return Options(ns.trials, False, ns.keep)


# --- reading the files as they grow ---------------------------------------------------------


class JsonLines:
    """The complete lines of a JSON-lines file read so far, re-reading only what was appended.

    The agents' event logs and the simulator's journals grow through a whole
    run; parsing them from the start on every poll would load the machine
    under measurement. A line that does not parse (a torn write of a killed
    process) is skipped; the checker reads the journals properly.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lines: list[dict[str, Any]] = []
        self._offset = 0

    def refresh(self) -> list[dict[str, Any]]:
        try:
            with self.path.open("rb") as f:
                f.seek(self._offset)
                data = f.read()
        except FileNotFoundError:
            return self.lines
        end = data.rfind(b"\n") + 1
        for raw in data[:end].splitlines():
            with contextlib.suppress(ValueError):
                line = json.loads(raw)
                if isinstance(line, dict) and isinstance(line.get("mono"), int | float):
                    self.lines.append(line)
        self._offset += end
        return self.lines


@dataclass
class Node:
    """One node of the pair, with its event log and journal being followed."""

    agent: AgentNode
    journal: Path
    _events: JsonLines = field(init=False)
    _journal: JsonLines = field(init=False)

    def __post_init__(self) -> None:
        self._events = JsonLines(self.agent.events_path)
        self._journal = JsonLines(self.journal)

    @property
    def name(self) -> str:
        return self.agent.name

    def events(self, kind: str, after: float, before: float = math.inf) -> list[dict[str, Any]]:
        """Events of `kind` with `after` <= mono <= `before`, in file order."""
        return [
            e
            for e in self._events.refresh()
            if e.get("kind") == kind and after <= e["mono"] <= before
        ]

    def event(self, kind: str, after: float) -> dict[str, Any] | None:
        """The first event of `kind` at or after `after`."""
        found = self.events(kind, after)
        return found[0] if found else None

    def acks(self, after: float, before: float = math.inf) -> list[float]:
        """Monotonic times of the writes this node's daemon acknowledged in [after, before]."""
        return [
            r["mono"]
            for r in self._journal.refresh()
            if r.get("kind") == "ack" and after <= r["mono"] <= before
        ]

    def first_ack(self, after: float) -> float | None:
        found = self.acks(after)
        return found[0] if found else None

    def sim_started(self, after: float) -> float | None:
        """When a simulator run on this node journaled its start, at or after `after`."""
        for r in self._journal.refresh():
            if r.get("kind") == "start" and r["mono"] >= after:
                return float(r["mono"])
        return None

    def synced_to(self, standby: Node, after: float) -> float | None:
        """When this node's `sync.record` event named `standby`, at or after `after`."""
        for e in self.events("sync.record", after):
            if e.get("replica") == standby.name:
                return float(e["mono"])
        return None

    def takeover(self, after: float) -> dict[str, float] | None:
        """The monotonic time of each step of the first takeover completed after `after`.

        `detected` is the step time of the last `ha.candidate` event before
        the `takeover.timeline` event, whose steps are relative to it.
        """
        timeline = self.event("takeover.timeline", after)
        if timeline is None:
            return None
        candidates = self.events("ha.candidate", after, timeline["mono"])
        if not candidates:
            raise TrialFailed(
                f"{self.name}: a takeover.timeline event without an ha.candidate event before it"
            )
        candidate = candidates[-1]
        step_time = candidate.get("step_time")
        detected = float(step_time if isinstance(step_time, int | float) else candidate["mono"])
        marks = {"detected": detected}
        for step in TIMELINE:
            value = timeline.get(step)
            if isinstance(value, int | float):
                marks[step] = detected + value
        return marks


def wait_for(what: str, find: Callable[[], T | None], where: Path) -> T:
    """Poll `find` until it returns something; TrialFailed after TIMEOUT seconds."""
    deadline = time.monotonic() + TIMEOUT
    while (found := find()) is None:
        if time.monotonic() > deadline:
            raise TrialFailed(f"timed out after {TIMEOUT:g} s waiting for {what}; see {where}")
        time.sleep(POLL)
    return found


class RequestTime(logging.Handler):
    """Notes when the switchover module logs that its request is in etcd."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.at: float | None = None

    def emit(self, record: logging.LogRecord) -> None:
        if self.at is None and record.getMessage().startswith("asked "):
            self.at = time.monotonic()


# --- results -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Checks:
    """The journal checker on the new active's database, and the one-signer check."""

    acked: int
    unknown: int
    lost: int
    split_brain: int
    overlaps: int
    findings: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return self.lost == 0 and self.split_brain == 0 and self.overlaps == 0


@dataclass(frozen=True)
class Trial:
    """One failover or switchover: seconds from its origin (kill or request) to each mark."""

    number: int
    old: str
    new: str
    marks: dict[str, float]
    writes_before: int  # acknowledged on the old active during the traffic before
    resync: float  # seconds from the restart (failover) or request (switchover) to sync.record
    checks: Checks
    load1: float  # the 1-minute load average when the trial began
    note: str = ""

    @property
    def total(self) -> float:
        return self.marks["first_ack"]


@dataclass
class Results:
    """Everything measured so far."""

    failovers: list[Trial] = field(default_factory=list)
    switchovers: list[Trial] = field(default_factory=list)
    failure: str | None = None


# --- the pair --------------------------------------------------------------------------------


class Pair:
    """etcd, two PostgreSQL clusters and two agents under `base` (see the module docstring)."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.rng = random.Random()
        self.etcd = EtcdServer(base / "etcd")
        self.a = Node(
            AgentNode("a", base / "a", PostgresCluster(base / "a" / "pg"), "", DBNAME),
            base / "journal-a",
        )
        self.b = Node(
            AgentNode("b", base / "b", PostgresCluster(base / "b" / "pg"), "", DBNAME),
            base / "journal-b",
        )
        self.active, self.standby = self.a, self.b

    def nodes(self) -> tuple[Node, Node]:
        return self.a, self.b

    def start(self) -> None:
        progress(f"scratch directory {self.base}")
        self.etcd.start()
        for node in self.nodes():
            node.agent.base.mkdir(parents=True, exist_ok=True)
            node.agent.etcd_endpoint = self.etcd.endpoint
            node.agent.pg.start()
            node.agent.pg.psql(f"CREATE DATABASE {DBNAME}")
        kek, sealed = make_keys(self.base)
        for node, peer in ((self.a, self.b), (self.b, self.a)):
            daemon = sim_daemon(node.agent, node.journal, RATE)
            node.agent.write_config(peer.agent, kek, sealed, daemon)
        progress("etcd and both PostgreSQL clusters are up; starting agent a")
        self.a.agent.start()
        wait_for("a to become active", lambda: self.a.takeover(0.0), self.a.agent.log_path)
        progress("a is active; starting agent b")
        self.b.agent.start()
        wait_for(
            "a to replicate to b", lambda: self.a.synced_to(self.b, 0.0), self.a.agent.log_path
        )
        progress("a replicates synchronously to b")

    def stop(self) -> None:
        for node in self.nodes():
            node.agent.stop()
        for node in self.nodes():
            node.agent.pg.stop()
        self.etcd.stop()

    # --- a trial's parts -------------------------------------------------------------------

    def traffic(self) -> int:
        """Let the active serve for a random while; the writes it acknowledged meanwhile."""
        start = time.monotonic()
        time.sleep(self.rng.uniform(*TRAFFIC))
        return len(self.active.acks(start))

    def checks(self) -> Checks:
        """The journal checker against the active's database, and the one-signer check."""
        journals = [node.journal for node in self.nodes() if node.journal.exists()]
        result = check(journals, self.active.agent.pg.dsn(dbname=DBNAME))
        overlaps = one_signer_overlaps({n.name: n.agent.events() for n in self.nodes()})
        findings = tuple([f.message for f in result.details[:5]] + overlaps[:5])
        return Checks(
            result.acked, result.unknown, result.lost, result.split_brain, len(overlaps), findings
        )

    def wait_takeover(self, node: Node, after: float) -> dict[str, float]:
        return wait_for(
            f"{node.name}'s takeover", lambda: node.takeover(after), node.agent.log_path
        )

    def wait_first_ack(self, node: Node, after: float) -> float:
        return wait_for(
            f"a write acknowledged through {node.name}'s gate",
            lambda: node.first_ack(after),
            node.journal,
        )

    def wait_sync(self, active: Node, standby: Node, after: float) -> float:
        return wait_for(
            f"{active.name} to replicate synchronously to {standby.name}",
            lambda: active.synced_to(standby, after),
            active.agent.log_path,
        )

    # --- trials ----------------------------------------------------------------------------

    def failover(self, number: int) -> Trial:
        """kill -9 the active agent; the standby takes over; the killed one rejoins."""
        old, new = self.active, self.standby
        load1 = os.getloadavg()[0]
        writes = self.traffic()
        killed = old.agent.kill()
        steps = self.wait_takeover(new, killed)
        first = self.wait_first_ack(new, killed)
        self.active, self.standby = new, old
        marks = {name: at - killed for name, at in steps.items()} | {"first_ack": first - killed}
        if (started := new.sim_started(killed)) is not None:
            marks["sim_started"] = started - killed
        checks = self.checks()
        restarted = time.monotonic()
        old.agent.start()
        synced = self.wait_sync(new, old, restarted)
        return Trial(number, old.name, new.name, marks, writes, synced - restarted, checks, load1)

    def switchover(self, number: int) -> Trial:
        """haproxy-ln switchover from the active to the standby."""
        old, new = self.active, self.standby
        load1 = os.getloadavg()[0]
        writes = self.traffic()
        config = load(old.agent.config_path)
        handler = RequestTime()
        logger = logging.getLogger("haproxy_ln.agent.switchover")
        level = logger.level
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        called = time.monotonic()
        try:
            trio.run(switchover, config, new.name, TIMEOUT)
        finally:
            logger.removeHandler(handler)
            logger.setLevel(level)
        note = ""
        requested = handler.at
        if requested is None:
            requested = called
            note = "request time: before the call (its log line was not seen)"
        steps = self.wait_takeover(new, requested)
        first = self.wait_first_ack(new, requested)
        demoting = wait_for(
            f"{old.name}'s ha.demoting",
            lambda: old.event("ha.demoting", requested),
            old.agent.log_path,
        )
        stopped = wait_for(
            f"{old.name}'s daemon.stopped",
            lambda: old.event("daemon.stopped", requested),
            old.agent.log_path,
        )
        self.active, self.standby = new, old
        marks = {"demoting": demoting["mono"], "old_daemon_stopped": stopped["mono"], **steps}
        marks = {name: at - requested for name, at in marks.items()}
        marks["first_ack"] = first - requested
        if (started := new.sim_started(requested)) is not None:
            marks["sim_started"] = started - requested
        checks = self.checks()
        synced = self.wait_sync(new, old, requested)
        return Trial(
            number, old.name, new.name, marks, writes, synced - requested, checks, load1, note
        )


def run_trials(pair: Pair, opts: Options, results: Results) -> None:
    """The failover trials, then the switchover trials; stops at the first failure."""
    kinds: list[tuple[str, Callable[[int], Trial], list[Trial]]] = [
        ("failover", pair.failover, results.failovers),
        ("switchover", pair.switchover, results.switchovers),
    ]
    for kind, trial, done in kinds:
        for number in range(1, opts.trials + 1):
            try:
                t = trial(number)
            except (BenchError, HaproxyLnError, OSError) as e:  # CoordError, SimulatorError...
                results.failure = f"{kind} trial {number} FAILED: {e}"
                progress(results.failure)
                return
            done.append(t)
            verdicts = "ok" if t.checks.ok else "CHECKS FAILED: " + "; ".join(t.checks.findings)
            progress(
                f"{kind} {number}/{opts.trials}: {t.old} -> {t.new}, first write after "
                f"{t.total:.3f} s (detected/candidate {t.marks.get('detected', math.nan):.3f} s), "
                f"resync {t.resync:.1f} s; {t.checks.acked} acked, {t.checks.lost} lost, "
                f"{t.checks.split_brain} split brain, {t.checks.overlaps} overlaps: {verdicts}"
            )


# --- facts about the run -------------------------------------------------------------------


def uncommitted() -> str:
    """The files of haproxy_ln/ that differ from the commit (others work in this tree)."""
    try:
        status = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "--", "haproxy_ln"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    files = [line[3:] for line in status.splitlines() if line.strip()]
    return ", ".join(files) if files else "none in haproxy_ln/"


def loadavg() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f}, {five:.2f}, {fifteen:.2f}"


def facts(pair: Pair, opts: Options) -> list[tuple[str, str]]:
    """The command line, machine, versions and settings, as label/value pairs."""
    config = load(pair.a.agent.config_path)
    ha = config.ha
    keepalive = ha.timing().keepalive_interval
    return [
        ("command", shlex.join(sys.orig_argv)),
        ("date", time.strftime("%Y-%m-%d %H:%M:%S %Z")),
        ("machine", f"{os.cpu_count()} CPUs (nproc {len(os.sched_getaffinity(0))}), {mem_total()}"),
        ("CPU", cpu_model()),
        ("kernel", f"{platform.system()} {platform.release()}"),
        ("PostgreSQL", first_line([str(pg_bin_dir() / "postgres"), "--version"])),
        ("etcd", first_line([etcd_binary(), "--version"])),
        ("haproxy-ln", __version__),
        ("haproxy-ln commit", git_revision()),
        ("uncommitted at start", uncommitted()),
        (
            "[ha]",
            f"lease_ttl {ha.lease_ttl:g} s, keepalive_interval {keepalive:.3f} s, "
            f"safety_margin {ha.safety_margin:g} s, degrade_after {ha.degrade_after:g} s; "
            f"[etcd] request_timeout {config.etcd.request_timeout:g} s; "
            f"[replication] mode {config.replication.mode}",
        ),
        (
            "pair",
            "one etcd member, two PostgreSQL 15 clusters, two `haproxy-ln run` agents "
            "(haproxy_ln.local.pair), all on this machine, TCP over 127.0.0.1",
        ),
        (
            "daemon",
            f"haproxy-ln sim run --mode cln at {RATE:g} writes/s through the node's proxy "
            "(probe none: ready when started), journal fsynced per write",
        ),
        (
            "trials",
            f"{opts.trials} failovers (kill -9 of the active agent, alternating nodes), then "
            f"{opts.trials} switchovers (alternating); {TRAFFIC[0]:g} to {TRAFFIC[1]:g} s of "
            "traffic (uniformly random) before each",
        ),
    ]


# --- report --------------------------------------------------------------------------------


def nearest_rank(values: Sequence[float], q: float) -> float:
    """The nearest-rank `q` quantile (0 < q <= 1) of `values`."""
    ordered = sorted(values)
    return ordered[max(1, math.ceil(q * len(ordered))) - 1]


def spread(values: Sequence[float]) -> list[str]:
    """min, median, p90, max as cells."""
    if not values:
        return ["-"] * 4
    stats = [min(values), statistics.median(values), nearest_rank(values, 0.9), max(values)]
    return [f"{v:.3f}" for v in stats]


def summary_table(label: str, rows: Sequence[tuple[str, Sequence[float]]]) -> str:
    headers = [label, "trials", "min s", "median s", "p90 s", "max s"]
    return format_table(headers, [[name, str(len(v)), *spread(v)] for name, v in rows])


def breakdown_table(trials: Sequence[Trial], rows: Sequence[tuple[str, str]], origin: str) -> str:
    """Per step: seconds since the origin, and the step's own time (since the previous row)."""
    headers = ["step", "n", f"since {origin}: median", "p90", "max", "step: median", "p90", "max"]
    out = []
    previous: str | None = None
    for key, label in rows:
        since = [t.marks[key] for t in trials if key in t.marks]
        own = [
            t.marks[key] - (t.marks[previous] if previous is not None else 0.0)
            for t in trials
            if key in t.marks and (previous is None or previous in t.marks)
        ]
        cells = spread(since)
        own_cells = spread(own)
        out.append([label, str(len(since)), *cells[1:], *own_cells[1:]])
        previous = key
    return format_table(headers, out)


def trials_table(
    trials: Sequence[Trial], rows: Sequence[tuple[str, str]], short: dict[str, str]
) -> str:
    headers = ["#", "from -> to", *(short[k] for k, _ in rows)]
    headers += ["writes before", "resync s", "acked", "lost", "split", "overlaps", "load1"]
    out = []
    for t in trials:
        cells = [f"{t.marks[k]:.3f}" if k in t.marks else "-" for k, _ in rows]
        out.append(
            [
                str(t.number),
                f"{t.old} -> {t.new}",
                *cells,
                str(t.writes_before),
                f"{t.resync:.1f}",
                str(t.checks.acked),
                str(t.checks.lost),
                str(t.checks.split_brain),
                str(t.checks.overlaps),
                f"{t.load1:.2f}",
            ]
        )
    return format_table(headers, out)


FAILOVER_SHORT = {
    "detected": "detected",
    "leader_acquired": "leader",
    "fence_raised": "fence",
    "sequences_moved": "seqs",
    "primary_bootstrapped": "primary",
    "gate_opened": "gate",
    "keys_materialized": "keys",
    "daemon_ready": "daemon",
    "sim_started": "sim",
    "first_ack": "1st write",
}
SWITCHOVER_SHORT = {
    "demoting": "demoting",
    "old_daemon_stopped": "old stop",
    "detected": "candidate",
    "leader_acquired": "leader key",
    "gate_opened": "gate",
    "daemon_ready": "daemon",
    "sim_started": "sim",
    "first_ack": "1st write",
}


def check_lines(results: Results, opts: Options) -> list[str]:
    """Whether every trial passed the checker and the one-signer check."""
    lines = []
    for kind, trials in (("failover", results.failovers), ("switchover", results.switchovers)):
        if not trials:
            continue
        bad = [t for t in trials if not t.checks.ok]
        lost = sum(t.checks.lost for t in trials)
        split = sum(t.checks.split_brain for t in trials)
        overlaps = sum(t.checks.overlaps for t in trials)
        lines.append(
            f"{verdict(not bad)}  {kind}: journal checker and one-signer check after each of "
            f"{len(trials)}/{opts.trials} trials: lost {lost}, split brain {split}, "
            f"one-signer overlaps {overlaps} (summed over trials); last check: "
            f"{trials[-1].checks.acked} acknowledged states, {trials[-1].checks.unknown} unknown"
        )
        for t in bad:
            lines += [f"      trial {t.number}: {finding}" for finding in t.checks.findings]
    return lines


def target_lines(results: Results) -> list[str]:
    """One line per target, with the numbers it was judged on."""
    lines = []
    fo = [t.total for t in results.failovers]
    if fo:
        median, top = statistics.median(fo), max(fo)
        lines.append(
            f"{verdict(median < TARGET_FAILOVER_MEDIAN)}  failover median under "
            f"{TARGET_FAILOVER_MEDIAN:g} s (kill -9 -> first write: {median:.3f} s)"
        )
        lines.append(
            f"{verdict(top < TARGET_FAILOVER_MAX)}  failover max under {TARGET_FAILOVER_MAX:g} s "
            f"({top:.3f} s; {over(fo, TARGET_FAILOVER_MAX)})"
        )
    for key, what in (
        ("leader_acquired", "request -> new leader key"),
        ("first_ack", "request -> first write"),
    ):
        values = [t.marks[key] for t in results.switchovers if key in t.marks]
        if values:
            lines.append(
                f"{verdict(max(values) < TARGET_SWITCHOVER)}  switchover under "
                f"{TARGET_SWITCHOVER:g} s in every trial, {what} (median "
                f"{statistics.median(values):.3f} s, max {max(values):.3f} s; "
                f"{over(values, TARGET_SWITCHOVER)})"
            )
    return lines


def over(values: Sequence[float], limit: float) -> str:
    """How many of `values` reach `limit`, in words."""
    return f"{sum(v >= limit for v in values)} of {len(values)} trials at or above {limit:g} s"


def report(info: list[tuple[str, str]], results: Results, opts: Options) -> str:
    """The whole report as text."""
    width = max(len(k) for k, _ in info)
    title = "haproxy-ln failover and switchover benchmark"
    parts = [title + (" (QUICK smoke run)" if opts.quick else ""), ""]
    parts += [f"{k.ljust(width)}  {v}" for k, v in info]
    if results.failure:
        parts += ["", results.failure]
    fo, so = results.failovers, results.switchovers
    parts += [
        "",
        "summary",
        "",
        summary_table(
            "measure",
            [
                ("failover: kill -9 -> first write", [t.total for t in fo]),
                ("failover: kill -9 -> detected", [t.marks["detected"] for t in fo]),
                (
                    "switchover: request -> new leader key",
                    [t.marks["leader_acquired"] for t in so if "leader_acquired" in t.marks],
                ),
                ("switchover: request -> first write", [t.total for t in so]),
                ("rejoin: restart -> synchronous again", [t.resync for t in fo]),
            ],
        ),
    ]
    if fo:
        parts += [
            "",
            f"failover breakdown ({len(fo)} trials): seconds since the kill at each step, "
            "and each step's own time",
            "",
            breakdown_table(fo, FAILOVER_ROWS, "kill"),
        ]
    if so:
        parts += [
            "",
            f"switchover breakdown ({len(so)} trials): seconds since the request at each "
            "step, and each step's own time",
            "",
            breakdown_table(so, SWITCHOVER_ROWS, "request"),
        ]
    if fo:
        parts += [
            "",
            "failover trials (seconds since the kill; resync: restart of the killed agent -> "
            "the new active's sync.record naming it)",
            "",
            trials_table(fo, FAILOVER_ROWS, FAILOVER_SHORT),
        ]
    if so:
        parts += [
            "",
            "switchover trials (seconds since the request; resync: request -> the new active's "
            "sync.record naming the old one)",
            "",
            trials_table(so, SWITCHOVER_ROWS, SWITCHOVER_SHORT),
        ]
        parts += [f"trial {t.number}: {t.note}" for t in so if t.note]
    parts += ["", "checks", "", *check_lines(results, opts)]
    parts += ["", "targets", "", *target_lines(results)]
    return "\n".join(parts) + "\n"


# --- main ----------------------------------------------------------------------------------


@contextlib.contextmanager
def no_interrupts() -> Iterator[None]:
    """Let a second Ctrl-C not cut the clean-up short."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def run(opts: Options, base: Path) -> tuple[str, bool]:
    """Start the pair under `base`, run the trials, stop everything; the report and whether
    every trial completed."""
    stamp = code_stamp()
    load_before = loadavg()
    results = Results()
    pair = Pair(base)
    try:
        pair.start()
        info = facts(pair, opts)
        run_trials(pair, opts, results)
    finally:
        with no_interrupts():
            progress("stopping the agents, PostgreSQL and etcd")
            pair.stop()
    changed = changed_files(stamp, code_stamp())
    info += [
        ("load average", f"{load_before} before, {loadavg()} after (1, 5, 15 min)"),
        (
            "haproxy_ln/ during the run",
            f"CHANGED ON DISK: {', '.join(changed)}" if changed else "unchanged on disk",
        ),
    ]
    return report(info, results, opts), results.failure is None


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: run the benchmark and print the report."""
    opts = parse_args(argv)
    base = scratch_dir("haproxy-ln-bench-failover-")
    try:
        with sigterm_as_interrupt():
            text, complete = run(opts, base)
    except KeyboardInterrupt:
        progress("interrupted; every server and agent has been stopped")
        return 130
    except (BenchError, HaproxyLnError) as e:  # setting up: LocalServerError, ConfigError...
        progress(f"failed: {e}")
        return 1
    finally:
        if opts.keep:
            progress(f"kept {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)
    sys.stdout.write(text)
    progress("done" if complete else "done, but not every trial completed")
    return 0 if complete else 1


if __name__ == "__main__":
    sys.exit(main())

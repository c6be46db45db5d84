"""`haproxy-ln demo`: a whole pair on this machine, a failover, a rejoin and a switchover.

How this works: in a fresh temporary directory it starts etcd, two
PostgreSQL 15 clusters and two agents (nodes a and b, each with its own
configuration file, shown), whose daemon is the Lightning simulator in
cln mode writing through its node's proxy and journaling every
acknowledged channel state. Then:

1. traffic on a (active), replicated synchronously to b;
2. SIGKILL of a's agent; b's takeover is followed live from its safety
   events until the first write acknowledged through b's gate;
3. the journal checker proves that b's database holds every state the
   daemon acknowledged (lost = 0, split brain = 0);
4. a comes back, rejoins as standby (re-copied from b) and b returns to
   synchronous replication; a switchover hands back to a, and the checker
   runs again on a's database;
5. the one-signer check over both event logs, a summary, a timeline
   picture (SVG), and with `--json` a JSON summary as the last line.

Everything it started is stopped at the end (on errors and Ctrl-C too).
Its directory is removed after a success; after a failure it stays, and
the last lines of each agent's log are printed. With `--keep` the pair
keeps running until Ctrl-C, with the commands to look at it.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TypeVar

import trio

from haproxy_ln.agent.switchover import switchover
from haproxy_ln.config import load
from haproxy_ln.demo_chart import Lane, Mark, write_svg
from haproxy_ln.errors import HaproxyLnError
from haproxy_ln.events import Event
from haproxy_ln.local import EtcdServer, PostgresCluster, scratch_dir
from haproxy_ln.local.pair import (
    AgentNode,
    holding_intervals,
    make_keys,
    one_signer_overlaps,
    sim_daemon,
)
from haproxy_ln.sim.checker import CheckResult, check
from haproxy_ln.sim.journal import read_journal

DBNAME = "lightning"
RATE = 50  # simulated channel updates per second
TIMEOUT = 90.0  # seconds any one phase may take before the demo gives up
LOG_TAIL = 25  # lines of each agent's log shown when the demo fails

Say = Callable[[str], None]
T = TypeVar("T")


class DemoFailed(HaproxyLnError):
    """A phase of the demo did not complete; the message says which and why."""


@dataclass(frozen=True, slots=True)
class DemoSummary:
    failover_s: float
    switchover_s: float
    acked_writes: int
    lost_writes: int
    split_brain: int
    one_signer_overlaps: int
    ok: bool
    timeline_svg: str

    def as_json(self) -> dict[str, object]:
        return asdict(self)


class Demo:
    """The demo's servers, nodes and clock; see the module docstring."""

    def __init__(self, base: Path, seconds: float, say: Say) -> None:
        self.base = base
        self.seconds = seconds
        self.say = say
        self.started = time.monotonic()
        self.marks: list[Mark] = []
        self.etcd = EtcdServer(base / "etcd")
        self.a = AgentNode("a", base / "a", PostgresCluster(base / "a" / "pg"), "", DBNAME)
        self.b = AgentNode("b", base / "b", PostgresCluster(base / "b" / "pg"), "", DBNAME)

    def t(self, mono: float | None = None) -> float:
        """Seconds since the demo began (for marks and the chart)."""
        return (time.monotonic() if mono is None else mono) - self.started

    def journal(self, node: AgentNode) -> Path:
        return self.base / f"journal-{node.name}"

    def nodes(self) -> tuple[AgentNode, AgentNode]:
        return self.a, self.b

    # --- set up -----------------------------------------------------------------------------

    def start(self) -> None:
        self.say(f"working directory: {self.base}")
        self.etcd.start()
        self.say(f"etcd listens on {self.etcd.endpoint}")
        for node in self.nodes():
            node.base.mkdir(parents=True, exist_ok=True)
            node.etcd_endpoint = self.etcd.endpoint
            node.pg.start()
            node.pg.psql(f"CREATE DATABASE {DBNAME}")
            self.say(f"node {node.name}: PostgreSQL 15 on 127.0.0.1:{node.pg.port}")
        kek, sealed = make_keys(self.base)
        self.say("sealed a random hsm_secret with a new key-encryption key")
        for node, peer in ((self.a, self.b), (self.b, self.a)):
            text = node.write_config(peer, kek, sealed, sim_daemon(node, self.journal(node), RATE))
            self.say(f"node {node.name}: configuration {node.config_path}")
            if node is self.a:
                self.say("\n".join("    " + line for line in text.splitlines()))
        self.a.start()
        self.wait(self.a, "takeover.timeline", 0.0, "a to become active")
        self.say("node a is active; starting node b")
        self.b.start()
        self.wait(self.b, "ha.standby", 0.0, "b to stand by")
        self.wait_sync(self.a, self.b, 0.0)

    # --- waiting and watching ---------------------------------------------------------------

    def wait(self, node: AgentNode, kind: str, after: float, what: str) -> float:
        """Wait for `node`'s event `kind` at or after `after`; its monotonic time."""
        found = _poll(
            lambda: node.first(kind, after) if _running(node) else None,
            f"{what}; see {node.log_path}",
        )
        return found.mono

    def wait_sync(self, active: AgentNode, standby: AgentNode, after: float) -> None:
        def record() -> Event | None:
            _running(active, standby)
            return next(
                (
                    e
                    for e in active.events()
                    if e.kind == "sync.record"
                    and e.fields.get("replica") == standby.name
                    and e.mono >= after
                ),
                None,
            )

        _poll(record, f"{active.name} synchronous with {standby.name}; see {active.log_path}")
        self.say(f"node {active.name} replicates synchronously to node {standby.name}")

    def acks(self, node: AgentNode, after: float = 0.0) -> list[float]:
        path = self.journal(node)
        records = read_journal(path) if path.exists() else []
        return [r.mono for r in records if r.kind == "ack" and r.mono >= after]

    def first_ack(self, node: AgentNode, after: float, what: str) -> float:
        acks = _poll(
            lambda: (_running(node) and self.acks(node, after)) or None,
            f"a write on {node.name} after {what}",
        )
        return acks[0]

    def traffic(self, node: AgentNode, seconds: float) -> None:
        before = len(self.acks(node))
        time.sleep(seconds)
        self.say(f"{len(self.acks(node)) - before} writes acknowledged on node {node.name}")

    def follow(self, node: AgentNode, since: float, until_kind: str) -> None:
        """Print `node`'s events after `since` as they happen, until `until_kind`."""
        shown = 0
        deadline = time.monotonic() + TIMEOUT
        while True:
            _running(node)
            events = [e for e in node.events() if e.mono >= since]
            for e in events[shown:]:
                self.say(f"  +{e.mono - since:6.3f} s  {node.name}: {e.kind}")
            shown = len(events)
            if any(e.kind == until_kind for e in events):
                return
            if time.monotonic() > deadline:
                raise DemoFailed(f"{node.name} did not take over; see {node.log_path}")
            time.sleep(0.01)

    # --- the story --------------------------------------------------------------------------

    def failover(self) -> float:
        self.say(f"traffic on node a for {self.seconds:g} s")
        self.traffic(self.a, self.seconds)
        killed = self.a.kill()
        self.marks.append(Mark(self.t(killed), "kill -9 agent a"))
        self.say("killed node a's agent with SIGKILL; node b's takeover:")
        self.follow(self.b, killed, "takeover.timeline")
        first = self.first_ack(self.b, killed, "the failover")
        took = first - killed
        self.marks.append(Mark(self.t(first), f"b serves (+{took:.2f} s)"))
        self.say(f"  +{took:6.3f} s  b: first write acknowledged through b's gate")
        self.traffic(self.b, self.seconds / 2)
        return took

    def rejoin_and_switch_back(self) -> float:
        restarted = time.monotonic()
        self.marks.append(Mark(self.t(restarted), "a restarts"))
        self.say("restarting node a: it rejoins as standby and is copied from b")
        self.a.start()
        self.wait_sync(self.b, self.a, restarted)
        self.traffic(self.b, self.seconds / 2)
        asked = time.monotonic()
        self.marks.append(Mark(self.t(asked), "switchover to a"))
        config = load(self.b.config_path)
        self.say("switching over from b to a (haproxy-ln switchover --to a)")
        self.say("  " + trio.run(switchover, config, "a", TIMEOUT))
        first = self.first_ack(self.a, asked, "the switchover")
        self.say(f"first write acknowledged through a's gate {first - asked:.3f} s after asking")
        self.wait_sync(self.a, self.b, asked)
        self.traffic(self.a, self.seconds / 2)
        return first - asked

    def check(self, active: AgentNode) -> CheckResult:
        journals = [p for p in map(self.journal, self.nodes()) if p.exists()]
        result = check(journals, active.pg.dsn(dbname=DBNAME))
        verdict = "ok" if result.ok else "FAILED"
        self.say(
            f"checker on node {active.name}'s database: {result.acked} acknowledged states, "
            f"{result.lost} lost, {result.split_brain} split brain: {verdict}"
        )
        for finding in result.details[:10]:
            self.say(f"  {finding}")
        return result

    def chart(self, path: Path) -> None:
        now = time.monotonic()
        lanes = []
        for node in self.nodes():
            running = holding_intervals(node.events(), now)["daemon"]
            lanes.append(
                Lane(
                    node.name,
                    [(self.t(s), self.t(e)) for s, e in running],
                    [self.t(m) for m in self.acks(node)],
                )
            )
        write_svg(path, lanes, self.marks, self.t(now))

    def stop(self) -> None:
        for node in self.nodes():
            node.stop()
        for node in self.nodes():
            node.pg.stop()
        self.etcd.stop()


def run_demo(seconds: float, keep: bool, chart: Path, say: Say) -> DemoSummary:
    """Run the demo; returns its summary. Raises DemoFailed (or HaproxyLnError) if a phase
    does not complete."""
    base = scratch_dir("haproxy-ln-demo-")
    demo = Demo(base, seconds, say)
    try:
        demo.start()
        failover_s = demo.failover()
        first = demo.check(demo.b)
        switchover_s = demo.rejoin_and_switch_back()
        second = demo.check(demo.a)
        overlaps = one_signer_overlaps({n.name: n.events() for n in demo.nodes()})
        for overlap in overlaps:
            say(f"one-signer check FAILED: {overlap}")
        if not overlaps:
            say("one-signer check: the keys and the daemon were never on both nodes at once")
        demo.chart(chart)
        say(f"timeline picture: {chart.absolute()}")
        summary = DemoSummary(
            failover_s=round(failover_s, 3),
            switchover_s=round(switchover_s, 3),
            acked_writes=second.acked,
            lost_writes=first.lost + second.lost,
            split_brain=first.split_brain + second.split_brain,
            one_signer_overlaps=len(overlaps),
            ok=first.ok and second.ok and not overlaps,
            timeline_svg=str(chart.absolute()),
        )
        if keep:
            _explore(demo)
    except BaseException:
        keep = True  # the logs the error points to
        for node in demo.nodes():
            say(f"the last lines of {node.log_path}:")
            for line in node.log().splitlines()[-LOG_TAIL:]:
                say(f"  {line}")
        raise
    else:
        return summary
    finally:
        with _no_interrupts():
            say("stopping the agents, PostgreSQL and etcd")
            demo.stop()
            if keep:
                say(f"the files stay in {base}")
            else:
                shutil.rmtree(base, ignore_errors=True)


def _running(*nodes: AgentNode) -> bool:
    """True; raises DemoFailed if one of `nodes`' agents exited, as waiting on is then
    pointless (an agent that cannot bind its ports exits at once, say)."""
    for node in nodes:
        if node.exit_code is not None:
            raise DemoFailed(
                f"node {node.name}'s agent exited with code {node.exit_code}; see {node.log_path}"
            )
    return True


def _poll(find: Callable[[], T | None], what: str) -> T:
    """Poll `find` until it returns something; raises DemoFailed after TIMEOUT seconds."""
    deadline = time.monotonic() + TIMEOUT
    while (found := find()) is None:
        if time.monotonic() > deadline:
            raise DemoFailed(f"timed out waiting for {what}")
        time.sleep(0.02)
    return found


def _explore(demo: Demo) -> None:
    say = demo.say
    say("the pair keeps running (--keep); try, in another terminal:")
    say(f"  haproxy-ln switchover --config {demo.a.config_path}")
    say(f"  tail -f {demo.a.log_path} {demo.b.log_path}")
    say(f"  haproxy-ln log --config {demo.b.config_path}")
    for node in demo.nodes():
        say(f"  psql '{node.pg.dsn(dbname=DBNAME)}'   # node {node.name}'s database")
    say("press Ctrl-C to stop everything (the files stay in the working directory)")
    with contextlib.suppress(KeyboardInterrupt):
        signal.pause()


@contextlib.contextmanager
def _no_interrupts() -> Iterator[None]:
    """Let a second Ctrl-C not cut the clean-up short."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)

"""Trials: traffic, a fault at a random moment, recovery, and the checks, on one pair.

How this works: `run_chaos` builds a pair (`system.ChaosPair`) and runs the
trials on it one after another. Trial i draws everything random from its
own seed (the run's seed for trial 0, derived from it for the others), so a
failing trial is replayed with `--trials 1 --seed <its seed> --nemesis
<its nemesis>`. The nemeses take turns in an order shuffled by the run's
seed, so each runs equally often. One trial:

1. traffic for a random 0.5..3 s: the moment of the fault;
2. the nemesis injects, holds and heals its fault (`nemesis.py`);
3. recovery: `repair()` (heal every link, resume, free, restart what is
   dead, and again every second meanwhile, as systemd's Restart= would),
   until the pair is whole again (one active, the other a standby named in
   the sync record, a write acknowledged since the heal);
4. the checks: the simulator's checker against the active's database and
   the standby's (lost acknowledged writes, conflicting acknowledged
   states), the one-signer checks (`checker.check_signers`), the outage and
   the recovery time.

If the pair does not become whole within `RECOVERY_TIMEOUT`, the trial says
so and the pair is rebuilt from scratch for the next one (new databases,
new journals). Each trial's result is one JSON line; a failing one carries
its timeline, which is also printed.
"""

from __future__ import annotations

import contextlib
import json
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from itertools import pairwise
from pathlib import Path

from haproxy_ln.chaos.checker import check_signers, outage
from haproxy_ln.chaos.nemesis import NEMESES, TTL, Params
from haproxy_ln.chaos.system import ChaosNode, ChaosPair, PairFailed, Say, wait_until
from haproxy_ln.errors import HaproxyLnError
from haproxy_ln.events import Event, read_events
from haproxy_ln.local import scratch_dir
from haproxy_ln.sim.checker import LOST, CheckResult, check

__all__ = ["ChaosOptions", "TrialResult", "run_chaos", "trial_seed"]

RECOVERY_TIMEOUT = 120.0
REPAIR_EVERY = 1.0  # seconds between repairs while waiting for the pair to be whole
RATE = 20.0


@dataclass(frozen=True, slots=True)
class ChaosOptions:
    trials: int
    seed: int
    nemeses: tuple[str, ...]
    mode: str = "cln"
    rate: float = RATE
    results: Path = Path("chaos-results.jsonl")
    keep: bool = False


@dataclass(frozen=True, slots=True)
class TrialResult:
    """One trial, as one JSON line. Times in seconds; `*_at` relative to the trial start."""

    trial: int
    seed: int
    nemesis: str
    mode: str
    pair: int  # which pair (0, then +1 at each rebuild)
    params: Params
    injected_at: float
    healed_at: float
    active_before: str | None
    active_after: str | None
    failover: bool
    acked: int  # acknowledged states so far on this pair
    unknown: int
    lost: int  # new lost acknowledged writes (active's database)
    standby_lost: int  # acknowledged writes missing on the synchronous standby
    conflicts: int  # new conflicting acknowledged states (split brain)
    overlaps: int
    paused_overlaps: int
    unleased_daemon: int
    unleased_keys: int
    paused_unleased: int
    agent_exits: int  # agents that exited on their own
    outage_s: float
    recovery_s: float | None  # heal to whole again; None: not recovered
    returned_to_sync: bool
    recovered: bool
    error: str | None = None
    findings: list[str] = field(default_factory=list)
    timeline: list[str] = field(default_factory=list)

    @property
    def safe(self) -> bool:
        return not (
            self.lost
            or self.standby_lost
            or self.conflicts
            or self.overlaps
            or self.unleased_daemon
            or self.unleased_keys
        )

    @property
    def ok(self) -> bool:
        """Safe, recovered, and no agent exited on its own (a crash is a bug too)."""
        return self.safe and self.recovered and self.error is None and not self.agent_exits

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "safe": self.safe, "ok": self.ok})


def trial_seed(seed: int, trial: int) -> int:
    """Trial 0 uses the run's seed, so `--trials 1 --seed S` replays a trial of seed S."""
    return seed if trial == 0 else random.Random(f"{seed}/{trial}").randrange(2**31)


class Session:
    """The pair in use and what earlier trials on it already reported."""

    def __init__(self, options: ChaosOptions, base: Path, say: Say) -> None:
        self.options = options
        self.base = base
        self.say = say
        self.generation = -1
        self.pair: ChaosPair | None = None
        self.reported: set[tuple[str, str, str, int]] = set()
        self.exits_seen = 0

    def fresh_pair(self) -> ChaosPair:
        """Stop the pair in use, if any, and build a new one."""
        if self.pair is not None:
            self.pair.stop()
            if not self.options.keep:
                self.pair.remove()
        self.generation += 1
        self.reported, self.exits_seen = set(), 0
        pair = ChaosPair(
            self.base / f"pair-{self.generation}", self.options.mode, self.options.rate, self.say
        )
        self.pair = pair
        self.say(f"building pair {self.generation} ({self.options.mode}) in {pair.base}")
        pair.build()
        return pair

    def close(self) -> None:
        if self.pair is not None:
            self.pair.stop()


def _events(pair: ChaosPair) -> tuple[dict[str, list[Event]], list[Event]]:
    chaos = read_events(pair.log.path) if pair.log.path and pair.log.path.exists() else []
    return {n.name: n.events() for n in pair.nodes}, chaos


def _check_db(pair: ChaosPair, node: ChaosNode) -> CheckResult:
    journals = [n.journal for n in pair.nodes if n.journal.exists()]
    return check(journals, node.pg.dsn(dbname="lightning"))


def run_trial(session: Session, index: int) -> TrialResult:
    options = session.options
    seed = trial_seed(options.seed, index)
    order = list(options.nemeses)
    random.Random(options.seed).shuffle(order)
    name = order[index % len(order)]
    rng = random.Random(seed)
    pair = session.pair
    assert pair is not None
    begin = pair.note(None, "trial.begin", trial=index, seed=seed, nemesis=name)
    before = pair.active()
    time.sleep(round(rng.uniform(0.5, 3.0), 3))
    injected = time.monotonic()
    error = None
    params: Params = {}
    try:
        params = NEMESES[name](pair, rng)
    except (HaproxyLnError, OSError) as e:
        error = f"the nemesis failed: {e}"
    healed = time.monotonic()
    repaired = 0.0

    def whole() -> bool:
        # Repair again now and then: a process may die during the recovery too (as
        # systemd's Restart= would start it again).
        nonlocal repaired
        if time.monotonic() - repaired >= REPAIR_EVERY:
            repaired = time.monotonic()
            for did in pair.repair():
                pair.note(None, "repair", what=did)
        return pair.healthy(healed)

    recovered_at: float | None = None
    try:
        recovered_at = wait_until("the pair to be whole again", whole, RECOVERY_TIMEOUT)
        pair.note(None, "recovered")
    except PairFailed as e:
        error = error or f"{e}: {pair.describe()}"
    active = pair.active()
    findings: list[str] = []
    lost = standby_lost = conflicts = acked = unknown = 0
    try:
        target = active or before or pair.nodes[0]
        checked = _check_db(pair, target)
        acked, unknown = checked.acked, checked.unknown
        for f in checked.details:
            key = (f.kind, f.mode, f.channel, f.commitment)
            if key in session.reported:
                continue
            session.reported.add(key)
            findings.append(f"{f.kind} on {target.name}'s database: {f.message}")
            if f.kind == LOST:
                lost += 1
            else:
                conflicts += 1
        if active is not None and recovered_at is not None:
            standby = pair.peer(active)
            on_standby = _check_db(pair, standby)
            standby_lost = on_standby.lost
            findings += [
                f"lost on the standby {standby.name}: {f.message}"
                for f in on_standby.details
                if f.kind == LOST
            ][:20]
    except HaproxyLnError as e:
        error = error or f"the checker could not run: {e}"
    end = time.monotonic()
    events, chaos = _events(pair)
    signers = check_signers(events, chaos, TTL, (begin, end), end)
    findings += [*signers.overlaps, *signers.unleased_daemon, *signers.unleased_keys]
    findings += [*signers.paused_overlaps, *signers.paused_unleased]
    exits = sum(1 for e in chaos if e.kind == "agent.exited")
    acks = [t for n in pair.nodes for t in n.acks.update()]
    result = TrialResult(
        trial=index,
        seed=seed,
        nemesis=name,
        mode=options.mode,
        pair=session.generation,
        params=params,
        injected_at=round(injected - begin, 3),
        healed_at=round(healed - begin, 3),
        active_before=before.name if before else None,
        active_after=active.name if active else None,
        failover=before is not None and active is not None and before is not active,
        acked=acked,
        unknown=unknown,
        lost=lost,
        standby_lost=standby_lost,
        conflicts=conflicts,
        overlaps=len(signers.overlaps),
        paused_overlaps=len(signers.paused_overlaps),
        unleased_daemon=len(signers.unleased_daemon),
        unleased_keys=len(signers.unleased_keys),
        paused_unleased=len(signers.paused_unleased),
        agent_exits=exits - session.exits_seen,
        outage_s=round(outage(acks, injected, recovered_at or end), 3),
        recovery_s=None if recovered_at is None else round(recovered_at - healed, 3),
        returned_to_sync=recovered_at is not None,
        recovered=recovered_at is not None,
        error=error,
        findings=findings,
    )
    session.exits_seen = exits
    if not result.ok:
        result = TrialResult(
            **{**asdict(result), "timeline": timeline(events, chaos, pair, begin, end)}
        )
    return result


def timeline(
    events: dict[str, list[Event]],
    chaos: Sequence[Event],
    pair: ChaosPair,
    begin: float,
    end: float,
) -> list[str]:
    """The trial's events, both nodes and the harness, in time order, from its start."""
    merged = [e for evs in events.values() for e in evs] + list(chaos)
    lines = []
    for e in sorted(merged, key=lambda e: e.mono):
        if begin - 0.5 <= e.mono <= end:
            fields = " ".join(f"{k}={v}" for k, v in e.fields.items() if v is not None)
            lines.append(f"+{e.mono - begin:8.3f} {e.node:5} {e.kind} {fields}".rstrip())
    for node in pair.nodes:
        acks = [t for t in node.acks.update() if begin <= t <= end]
        gaps = [f"{b - a:.2f} s at +{a - begin:.2f}" for a, b in pairwise(acks) if b - a > 0.5]
        first = f"+{acks[0] - begin:.3f}" if acks else "-"
        last = f"+{acks[-1] - begin:.3f}" if acks else "-"
        lines.append(
            f"acks by {node.name}: {len(acks)} (first {first}, last {last}); "
            f"gaps over 0.5 s: {', '.join(gaps) or 'none'}"
        )
    return lines


def run_chaos(options: ChaosOptions, say: Say) -> list[TrialResult]:
    """Run the trials; every result is also appended to `options.results` as it ends.

    Raises PairFailed (or LocalServerError) if the first pair cannot be built.
    """
    unknown = sorted(set(options.nemeses) - set(NEMESES))
    if unknown:
        raise PairFailed(f"unknown nemesis {', '.join(unknown)}; known: {', '.join(NEMESES)}")
    base = scratch_dir("haproxy-ln-chaos-")
    session = Session(options, base, say)
    results: list[TrialResult] = []
    options.results.write_text("")
    try:
        session.fresh_pair()
        for index in range(options.trials):
            result = run_trial(session, index)
            results.append(result)
            with options.results.open("a") as out:
                out.write(result.to_json() + "\n")
            say(_line(result))
            if not result.ok:
                say(
                    f"  replay: haproxy-ln chaos --trials 1 --seed {result.seed} "
                    f"--nemesis {result.nemesis} --mode {result.mode}"
                )
                for finding in result.findings[:20]:
                    say(f"  finding: {finding}")
                if result.error:
                    say(f"  error: {result.error}")
                for line in result.timeline:
                    say(f"  {line}")
                if session.pair is not None:
                    name = f"{options.results.stem}-trial-{index}-logs"
                    saved = session.pair.save_logs(options.results.with_name(name))
                    say(f"  logs: {saved}")
            if not result.recovered and index + 1 < options.trials:
                session.fresh_pair()
    finally:
        with contextlib.suppress(Exception):
            session.close()
        if not options.keep:
            import shutil

            shutil.rmtree(base, ignore_errors=True)
        else:
            say(f"kept the working directory {base}")
    return results


def _line(r: TrialResult) -> str:
    verdict = "ok" if r.ok else "UNSAFE" if not r.safe else "NOT RECOVERED"
    if r.safe and r.recovered and r.agent_exits:
        verdict = "AGENT EXITED"
    recovery = "-" if r.recovery_s is None else f"{r.recovery_s:.2f}"
    move = f"{r.active_before}->{r.active_after}" if r.failover else f"{r.active_after} stays"
    exits = f" agent exits {r.agent_exits}" if r.agent_exits else ""
    return (
        f"trial {r.trial:4} {r.nemesis:24} seed {r.seed:10} {move:10} outage {r.outage_s:6.2f} s "
        f"recovery {recovery:>6} s lost {r.lost} conflicts {r.conflicts} overlaps {r.overlaps} "
        f"(paused {r.paused_overlaps}) unleased {r.unleased_daemon + r.unleased_keys} "
        f"(paused {r.paused_unleased}){exits}: {verdict}"
    )

"""The one-signer checks and the outage, derived purely from events and acknowledgements.

How this works. Inputs: each node's safety events (monotonic times, one
clock for every process on the machine), the chaos log (when an agent was
paused and resumed) and the acknowledgement times from the journals.

- **Holding intervals**: keys from `keys.materialized` to `keys.destroyed`,
  the daemon from `daemon.started` to `daemon.stopped`; `agent.killed`
  (written by the harness just before the SIGKILL; the daemon's guard kills
  the daemon with the agent) and `agent.started` (a restarted agent cleans
  up first) end both (`haproxy_ln.local.pair.holding_intervals`).
- **Lease-valid intervals** (leadership): a node holds the leader key on a
  valid lease from its `leader.acquired` event (the key was just created on
  its live lease). That ends at the earliest of: its `ha.standby`,
  `lease.lost`, `lease.revoked`, `agent.killed`, `agent.stopped` or
  `agent.started`; the peer's next `leader.acquired` (etcd gave the key to
  the peer, so ours was gone by then); and, once it fenced itself,
  `last_keepalive_sent + TTL` from its `ha.fenced` event: the last
  keepalive etcd acknowledged was received no earlier than it was sent, so
  this is the earliest moment etcd could have expired the lease. Every bound
  is one the lease cannot outlast, so the check is strict: a daemon that
  runs past any of them counts.
- **Paused-agent windows**: from `agent.paused` to the end of that node's
  keys and daemon intervals that were still open at `agent.resumed` (its
  teardown on waking). Without systemd the paused agent's child daemon
  outlives the pause (docs/ha.md); what falls inside such a window is
  counted apart (`paused_*`), never dropped.
- **Overlaps**: the parts of two nodes' keys or daemon intervals that
  coincide. **Unleased**: the parts of a node's daemon (or keys) intervals
  outside its lease-valid intervals. Both must be empty outside the
  paused-agent windows.

Findings are attributed to the trial in whose window they start.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from haproxy_ln.events import Event
from haproxy_ln.local.pair import holding_intervals

__all__ = [
    "SignerCheck",
    "check_signers",
    "leadership_intervals",
    "outage",
    "pause_windows",
]

Span = tuple[float, float]

_LEADERSHIP_ENDS = (
    "ha.standby",
    "lease.lost",
    "lease.revoked",
    "agent.killed",
    "agent.stopped",
    "agent.started",
)


@dataclass(frozen=True, slots=True)
class SignerCheck:
    """Sentences, one per finding, in the trial's window."""

    overlaps: tuple[str, ...]  # must be empty
    paused_overlaps: tuple[str, ...]  # inside a paused-agent window
    unleased_daemon: tuple[str, ...]  # must be empty
    unleased_keys: tuple[str, ...]  # must be empty
    paused_unleased: tuple[str, ...]  # inside a paused-agent window

    @property
    def ok(self) -> bool:
        return not (self.overlaps or self.unleased_daemon or self.unleased_keys)


def leadership_intervals(
    events: Sequence[Event], peer_events: Sequence[Event], ttl: float, now: float
) -> list[Span]:
    """When the node held the leader key on a valid lease; see the module docstring."""
    peer_acquired = sorted(e.mono for e in peer_events if e.kind == "leader.acquired")
    out: list[Span] = []
    start: float | None = None
    bound = math.inf

    def close(at: float) -> None:
        assert start is not None
        taken = next((t for t in peer_acquired if t > start), math.inf)
        out.append((start, max(start, min(at, bound, taken))))

    for e in events:
        if e.kind == "leader.acquired":
            if start is not None:
                close(e.mono)
            start, bound = e.mono, math.inf
        elif start is None:
            continue
        elif e.kind == "ha.fenced":
            sent = e.fields.get("last_keepalive_sent")
            if isinstance(sent, int | float):
                bound = min(bound, float(sent) + ttl)
        elif e.kind in _LEADERSHIP_ENDS:
            close(e.mono)
            start = None
    if start is not None:
        close(now)
    return out


def pause_windows(
    chaos: Sequence[Event], events: Mapping[str, Sequence[Event]], now: float
) -> dict[str, list[Span]]:
    """Per node, the paused-agent windows; see the module docstring."""
    out: dict[str, list[Span]] = {node: [] for node in events}
    paused: dict[str, float] = {}
    for e in chaos:
        node = e.fields.get("on")
        if not isinstance(node, str) or node not in events:
            continue
        if e.kind == "agent.paused":
            paused[node] = e.mono
        elif e.kind == "agent.resumed" and node in paused:
            held = holding_intervals(events[node], now)
            ends = [end for spans in held.values() for s, end in spans if s <= e.mono <= end]
            out[node].append((paused.pop(node), max([e.mono, *ends])))
    for node, start in paused.items():
        out[node].append((start, now))
    return out


def _intersect(a: Span, b: Span) -> Span | None:
    start, end = max(a[0], b[0]), min(a[1], b[1])
    return (start, end) if start < end else None


def _subtract(span: Span, holes: Sequence[Span]) -> list[Span]:
    pieces = [span]
    for hole in sorted(holes):
        rest = []
        for s, e in pieces:
            if hole[1] <= s or e <= hole[0]:
                rest.append((s, e))
                continue
            if s < hole[0]:
                rest.append((s, hole[0]))
            if hole[1] < e:
                rest.append((hole[1], e))
        pieces = rest
    return pieces


def _inside(span: Span, windows: Sequence[Span]) -> list[Span]:
    return [x for w in windows if (x := _intersect(span, w)) is not None]


def check_signers(
    events: Mapping[str, Sequence[Event]],
    chaos: Sequence[Event],
    ttl: float,
    window: Span,
    now: float,
) -> SignerCheck:
    """Overlaps and unleased holding that start inside `window`; see the module docstring."""
    names = sorted(events)
    held = {n: holding_intervals(events[n], now) for n in names}
    pauses = pause_windows(chaos, events, now)
    overlaps: list[str] = []
    paused_overlaps: list[str] = []
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            excused = pauses[a] + pauses[b]
            for what in ("keys", "daemon"):
                for sa in held[a][what]:
                    for sb in held[b][what]:
                        both = _intersect(sa, sb)
                        if both is None:
                            continue
                        say = f"{what} on {a} and {b} at once during {{:.3f}}..{{:.3f}}"
                        for s, e in _subtract(both, excused):
                            if window[0] <= s < window[1]:
                                overlaps.append(say.format(s, e))
                        for s, e in _inside(both, excused):
                            if window[0] <= s < window[1]:
                                paused_overlaps.append(say.format(s, e) + " (agent paused)")
    unleased: dict[str, list[str]] = {"daemon": [], "keys": []}
    paused_unleased: list[str] = []
    for n in names:
        peer_events = [e for m in names if m != n for e in events[m]]
        leads = leadership_intervals(events[n], peer_events, ttl, now)
        for what in ("daemon", "keys"):
            for span in held[n][what]:
                for piece in _subtract(span, leads):
                    say = f"{what} on {n} without a valid lease during {{:.3f}}..{{:.3f}}"
                    for s, e in _subtract(piece, pauses[n]):
                        if window[0] <= s < window[1]:
                            unleased[what].append(say.format(s, e))
                    for s, e in _inside(piece, pauses[n]):
                        if window[0] <= s < window[1]:
                            paused_unleased.append(say.format(s, e) + " (agent paused)")
    return SignerCheck(
        overlaps=tuple(overlaps),
        paused_overlaps=tuple(paused_overlaps),
        unleased_daemon=tuple(unleased["daemon"]),
        unleased_keys=tuple(unleased["keys"]),
        paused_unleased=tuple(paused_unleased),
    )


def outage(acks: Sequence[float], began: float, until: float) -> float:
    """The longest time without an acknowledged write around a fault: the largest gap
    between consecutive acknowledgements (all nodes) in [`began`, `until`], where the
    last one before `began` opens the first gap and `until` closes the last."""
    before = [t for t in acks if t < began]
    prev = max(before) if before else began
    longest = 0.0
    for t in sorted(t for t in acks if began <= t <= until):
        longest = max(longest, t - prev)
        prev = t
    return max(longest, until - prev)

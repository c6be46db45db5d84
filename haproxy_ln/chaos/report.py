"""The summary of a chaos run: a table per nemesis and one JSON object.

How this works: `summarize(results)` adds the trials' counts up per
nemesis and over all; `table(summary)` renders it as a Markdown table
(what docs/reliability.md shows), `Summary.as_json()` is the machine-readable
form `haproxy-ln chaos --json` prints as its last line. Times are the
median and the maximum over the trials that recovered.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from haproxy_ln.chaos.trials import TrialResult

__all__ = ["Row", "Summary", "summarize", "table"]


@dataclass(frozen=True, slots=True)
class Row:
    nemesis: str
    trials: int
    failovers: int
    recovered: int
    lost_writes: int
    conflicts: int
    overlaps: int
    paused_overlaps: int
    unleased_daemon: int
    paused_unleased: int
    agent_exits: int
    outage_median_s: float | None
    outage_max_s: float | None
    recovery_median_s: float | None
    recovery_max_s: float | None


@dataclass(frozen=True, slots=True)
class Summary:
    rows: tuple[Row, ...]
    total: Row
    ok: bool

    def as_json(self) -> dict[str, object]:
        t = self.total
        return {
            "ok": self.ok,
            "trials": t.trials,
            "per_nemesis": {r.nemesis: r.trials for r in self.rows},
            "failovers": t.failovers,
            "recovered": t.recovered,
            "lost_writes": t.lost_writes,
            "conflicts": t.conflicts,
            "overlaps": t.overlaps,
            "paused_overlaps": t.paused_overlaps,
            "unleased_daemon": t.unleased_daemon,
            "paused_unleased": t.paused_unleased,
            "agent_exits": t.agent_exits,
            "outage_s": {"median": t.outage_median_s, "max": t.outage_max_s},
            "recovery_s": {
                "median": t.recovery_median_s,
                "max": t.recovery_max_s,
                "per_nemesis": {
                    r.nemesis: {"median": r.recovery_median_s, "max": r.recovery_max_s}
                    for r in self.rows
                },
            },
        }


def _stats(values: Sequence[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return round(statistics.median(values), 2), round(max(values), 2)


def _row(name: str, results: Sequence[TrialResult]) -> Row:
    recovered = [r for r in results if r.recovered]
    outage = _stats([r.outage_s for r in recovered])
    recovery = _stats([r.recovery_s for r in recovered if r.recovery_s is not None])
    return Row(
        nemesis=name,
        trials=len(results),
        failovers=sum(r.failover for r in results),
        recovered=len(recovered),
        lost_writes=sum(r.lost + r.standby_lost for r in results),
        conflicts=sum(r.conflicts for r in results),
        overlaps=sum(r.overlaps for r in results),
        paused_overlaps=sum(r.paused_overlaps for r in results),
        unleased_daemon=sum(r.unleased_daemon + r.unleased_keys for r in results),
        paused_unleased=sum(r.paused_unleased for r in results),
        agent_exits=sum(r.agent_exits for r in results),
        outage_median_s=outage[0],
        outage_max_s=outage[1],
        recovery_median_s=recovery[0],
        recovery_max_s=recovery[1],
    )


def summarize(results: Sequence[TrialResult]) -> Summary:
    names = sorted({r.nemesis for r in results})
    rows = tuple(_row(n, [r for r in results if r.nemesis == n]) for n in names)
    return Summary(rows, _row("all", results), all(r.safe for r in results))


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def table(summary: Summary) -> str:
    """A Markdown table: one row per nemesis and a total."""
    head = (
        "| nemesis | trials | failovers | recovered | lost writes | conflicts | overlaps "
        "(paused) | unleased daemon (paused) | outage median / max s | "
        "recovery median / max s |"
    )
    lines = [head, "|" + " --- |" * 10]
    for r in [*summary.rows, summary.total]:
        lines.append(
            f"| {r.nemesis} | {r.trials} | {r.failovers} | {r.recovered} | {r.lost_writes} | "
            f"{r.conflicts} | {r.overlaps} ({r.paused_overlaps}) | {r.unleased_daemon} "
            f"({r.paused_unleased}) | {_cell(r.outage_median_s)} / {_cell(r.outage_max_s)} | "
            f"{_cell(r.recovery_median_s)} / {_cell(r.recovery_max_s)} |"
        )
    return "\n".join(lines)

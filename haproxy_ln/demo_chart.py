"""The demo's timeline picture: one SVG file, written by hand (it is a few rectangles).

How this works: one lane per node shows when that node ran the daemon
(from its safety events) and, as ticks, every acknowledged write the
simulated daemon journaled there; vertical lines mark what the demo did
(kill, restart, switchover) and what the agents recorded (takeover done).
Time runs left to right in seconds since the demo began.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from html import escape
from pathlib import Path

__all__ = ["Lane", "Mark", "write_svg"]

WIDTH, LANE_H, TOP, LEFT, RIGHT = 1000, 70, 50, 70, 20
COLORS = ("#3b7dd8", "#d8843b")


@dataclass(frozen=True, slots=True)
class Lane:
    node: str
    running: Sequence[tuple[float, float]]  # daemon intervals, seconds since start
    acks: Sequence[float]  # acknowledged writes, seconds since start


@dataclass(frozen=True, slots=True)
class Mark:
    at: float  # seconds since start
    label: str


def write_svg(path: Path, lanes: Sequence[Lane], marks: Sequence[Mark], end: float) -> None:
    """Write the chart to `path`. Raises OSError if it cannot be written."""
    span = max(end, 1e-3)
    scale = (WIDTH - LEFT - RIGHT) / span
    height = TOP + LANE_H * len(lanes) + 40

    def x(t: float) -> float:
        return LEFT + max(0.0, min(t, span)) * scale

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" '
        'font-family="sans-serif" font-size="12">',
        f'<rect width="{WIDTH}" height="{height}" fill="white"/>',
        '<text x="10" y="20" font-size="14">haproxy-ln demo: daemon running (bar) and '
        "acknowledged writes (ticks) per node</text>",
    ]
    for i, lane in enumerate(lanes):
        y = TOP + i * LANE_H
        color = COLORS[i % len(COLORS)]
        parts.append(f'<text x="10" y="{y + 25}">node {escape(lane.node)}</text>')
        for start, stop in lane.running:
            parts.append(
                f'<rect x="{x(start):.1f}" y="{y + 10}" width="{max(1.0, x(stop) - x(start)):.1f}" '
                f'height="20" fill="{color}" opacity="0.35"/>'
            )
        for t in lane.acks:
            parts.append(
                f'<line x1="{x(t):.1f}" x2="{x(t):.1f}" y1="{y + 34}" y2="{y + 50}" '
                f'stroke="{color}" stroke-width="0.6"/>'
            )
    bottom = TOP + LANE_H * len(lanes)
    for n, mark in enumerate(marks):
        parts.append(
            f'<line x1="{x(mark.at):.1f}" x2="{x(mark.at):.1f}" y1="{TOP - 5}" y2="{bottom}" '
            'stroke="#c00" stroke-dasharray="4,3"/>'
        )
        parts.append(
            f'<text x="{x(mark.at) + 3:.1f}" y="{TOP - 8 - 12 * (n % 2)}" fill="#c00">'
            f"{escape(mark.label)}</text>"
        )
    for second in range(int(span) + 1):
        if second % max(1, int(span) // 10 or 1) == 0:
            parts.append(
                f'<text x="{x(second):.1f}" y="{bottom + 20}" text-anchor="middle">{second}s</text>'
            )
    parts.append("</svg>")
    path.write_text("\n".join(parts) + "\n")

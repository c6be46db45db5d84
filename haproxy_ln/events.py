"""The safety event log: one JSON line per event that a checker must see.

How this works: the agent appends one line per safety-relevant event (keys
materialized or destroyed, daemon started or stopped, lease won or lost,
self-fence) to a file, flushed and fsynced before `emit` returns, so an event
that happened is on disk even if the agent is killed right after. Each line
carries the node name, `mono` (CLOCK_MONOTONIC, which is one clock for every
process on a machine, so two agents on one machine order their events
exactly) and `wall` (for humans). Only names and numbers go in: callers must
never pass a secret as a field.

A checker reads the lines back with `read_events` and pairs them into
intervals (e.g. keys held from `keys.materialized` to `keys.destroyed`).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["Event", "EventLog", "FieldValue", "read_events"]

log = logging.getLogger(__name__)

FieldValue = str | int | float | bool | None


@dataclass(frozen=True, slots=True)
class Event:
    """One line of the event log."""

    kind: str
    node: str
    mono: float
    wall: float
    fields: dict[str, FieldValue] = field(default_factory=dict)


class EventLog:
    """Appends events for one node to `path` (None: log them only, keep no file)."""

    def __init__(self, path: Path | None, node: str) -> None:
        self.path = path
        self.node = node
        self._lock = threading.Lock()  # emit may be called from a worker thread

    def emit(self, kind: str, **fields: FieldValue) -> Event:
        """Record `kind` now; returns the event once it is durable.

        Raises OSError if the file cannot be written: an unrecorded safety
        event must not pass silently.
        """
        event = Event(kind, self.node, time.monotonic(), time.time(), fields)
        line = json.dumps(
            {"kind": kind, "node": self.node, "mono": event.mono, "wall": event.wall, **fields},
            separators=(",", ":"),
        )
        log.info("event %s %s", kind, " ".join(f"{k}={v}" for k, v in fields.items()))
        if self.path is not None:
            with self._lock:
                fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
                try:
                    os.write(fd, line.encode() + b"\n")
                    os.fsync(fd)
                finally:
                    os.close(fd)
        return event


def read_events(path: Path) -> list[Event]:
    """Every event in the file at `path`, in file order; a torn last line is ignored.

    Raises OSError if the file cannot be read, ValueError on a malformed line
    that is not the last.
    """
    lines = path.read_text().splitlines()
    events = []
    for number, line in enumerate(lines, 1):
        try:
            data = json.loads(line)
            kind, node = data.pop("kind"), data.pop("node")
            mono, wall = float(data.pop("mono")), float(data.pop("wall"))
        except (ValueError, KeyError, TypeError) as e:
            if number == len(lines):
                break  # killed mid-write: the event was not durable, so it did not return
            raise ValueError(f"{path}:{number}: not an event line: {e}") from None
        events.append(Event(str(kind), str(node), mono, wall, data))
    return events

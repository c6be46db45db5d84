"""The safety event log: durable lines, read back in order, a torn last line ignored."""

from pathlib import Path

import pytest

from haproxy_ln.events import EventLog, read_events


def test_events_read_back_in_order_with_fields(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    a, b = EventLog(path, "a"), EventLog(path, "b")
    first = a.emit("keys.materialized", epoch=7)
    second = b.emit("keys.destroyed", epoch=7, reason="fence")
    events = read_events(path)
    assert [(e.kind, e.node, e.fields) for e in events] == [
        ("keys.materialized", "a", {"epoch": 7}),
        ("keys.destroyed", "b", {"epoch": 7, "reason": "fence"}),
    ]
    assert events[0].mono == first.mono <= events[1].mono == second.mono


def test_a_torn_last_line_is_ignored_but_a_torn_middle_line_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    EventLog(path, "a").emit("daemon.started")
    with path.open("a") as f:
        f.write('{"kind": "daemon.sto')
    assert [e.kind for e in read_events(path)] == ["daemon.started"]
    with path.open("a") as f:
        f.write("\n")
    EventLog(path, "a").emit("daemon.stopped")
    with pytest.raises(ValueError, match=":2: not an event line"):
        read_events(path)

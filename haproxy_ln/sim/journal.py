"""The acknowledged-state journal: what the simulated daemon has told its peer.

How this works: after a COMMIT returns, the simulator appends one JSON line
for the new channel state (`ack`) and fsyncs it before it does anything
else, the way a daemon sends `revoke_and_ack` only once its database has the
state. A COMMIT whose outcome is unknown (the connection broke during it) is
written as `unknown`: the peer may or may not have been told, so a checker
counts it as neither acknowledged nor lost. A run also writes `start` and
`exit` lines, for people reading a drill.

One line (keys always in this order, hex for bytes):

    {"v":1,"kind":"ack","node":"a","mode":"cln","run":"9f3c...","channel":"<64 hex>",
     "commitment":12,"htlcs":"<64 hex>","mono":1234.5,"wall":1700000000.1}

`mono` is CLOCK_MONOTONIC (one clock for all processes on a machine),
`wall` is for humans. Several runs, on one node or two, may append to one
file or to several; `read_journal` reads them back, ignoring a torn last line.
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from haproxy_ln.errors import SimulatorError
from haproxy_ln.sim.model import ChannelState

__all__ = ["FORMAT_VERSION", "Journal", "JournalRecord", "read_journal"]

FORMAT_VERSION = 1
KINDS = ("start", "ack", "unknown", "exit")


@dataclass(frozen=True, slots=True)
class JournalRecord:
    """One journal line. `channel`, `commitment`, `htlcs` are set for ack and unknown."""

    kind: str
    node: str
    mode: str
    run: str
    mono: float
    wall: float
    channel: bytes | None = None
    commitment: int | None = None
    htlcs: bytes | None = None
    reason: str | None = None


class Journal:
    """Appends one run's lines to `path`, each fsynced before the call returns."""

    def __init__(self, path: Path, node: str, mode: str, run: str) -> None:
        """Open (create, mode 0600) the journal for appending.

        Raises SimulatorError if it cannot be opened.
        """
        self.path = path
        self._node = node
        self._mode = mode
        self._run = run
        self._lock = threading.Lock()  # lnd mode appends from several workers
        existed = path.exists()
        try:
            self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            if not existed:
                # A new file's name must survive a crash too, not only its lines.
                dir_fd = os.open(path.parent, os.O_RDONLY)
                try:
                    os.fsync(dir_fd)
                finally:
                    os.close(dir_fd)
        except OSError as e:
            raise SimulatorError(f"cannot open the journal {path}: {e.strerror}") from None

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1

    def _append(self, kind: str, **fields: object) -> None:
        line = {
            "v": FORMAT_VERSION,
            "kind": kind,
            "node": self._node,
            "mode": self._mode,
            "run": self._run,
            **fields,
            "mono": time.monotonic(),
            "wall": time.time(),
        }
        data = json.dumps(line, separators=(",", ":")).encode() + b"\n"
        with self._lock:
            try:
                os.write(self._fd, data)
                os.fsync(self._fd)
            except OSError as e:
                # A state we cannot journal must not be acknowledged: stop like a daemon would.
                raise SimulatorError(f"cannot append to the journal {self.path}: {e}") from None

    def start(self, pid: int) -> None:
        self._append("start", pid=pid)

    def ack(self, state: ChannelState) -> None:
        """Record `state` as acknowledged to the peer. Raises SimulatorError."""
        self._append(
            "ack",
            channel=state.channel_id.hex(),
            commitment=state.commitment,
            htlcs=state.digest.hex(),
        )

    def unknown(self, state: ChannelState, reason: str) -> None:
        """Record a COMMIT of `state` whose outcome is unknown. Raises SimulatorError."""
        self._append(
            "unknown",
            channel=state.channel_id.hex(),
            commitment=state.commitment,
            htlcs=state.digest.hex(),
            reason=reason,
        )

    def exit(self, reason: str, code: int) -> None:
        self._append("exit", reason=reason, code=code)


def _record(line: dict[str, object]) -> JournalRecord:
    kind = line.get("kind")
    if line.get("v") != FORMAT_VERSION or kind not in KINDS:
        raise ValueError(f"not a version {FORMAT_VERSION} journal line")
    texts = {k: line.get(k) for k in ("node", "mode", "run")}
    if not all(isinstance(v, str) for v in texts.values()):
        raise ValueError("node, mode and run must be strings")
    mono, wall = line.get("mono"), line.get("wall")
    if not isinstance(mono, int | float) or not isinstance(wall, int | float):
        raise ValueError("mono and wall must be numbers")
    reason = line.get("reason")
    record = JournalRecord(
        str(kind),
        str(texts["node"]),
        str(texts["mode"]),
        str(texts["run"]),
        float(mono),
        float(wall),
        reason=reason if isinstance(reason, str) else None,
    )
    if kind not in ("ack", "unknown"):
        return record
    channel, commitment, htlcs = line.get("channel"), line.get("commitment"), line.get("htlcs")
    if not isinstance(channel, str) or not isinstance(htlcs, str):
        raise ValueError("channel and htlcs must be hex strings")
    if not isinstance(commitment, int) or isinstance(commitment, bool) or commitment < 0:
        raise ValueError("commitment must be a whole number")
    return JournalRecord(
        record.kind,
        record.node,
        record.mode,
        record.run,
        record.mono,
        record.wall,
        bytes.fromhex(channel),
        commitment,
        bytes.fromhex(htlcs),
        record.reason,
    )


def read_journal(path: Path) -> list[JournalRecord]:
    """Every record in the journal at `path`, in file order.

    A torn last line (a crash in the middle of an append) is ignored: that
    state was never acknowledged. Raises SimulatorError if the file cannot be
    read or a line other than the last is not a journal line.
    """
    try:
        data = path.read_bytes()
    except OSError as e:
        raise SimulatorError(f"cannot read the journal {path}: {e.strerror}") from None
    lines = data.split(b"\n")
    records = []
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            parsed = json.loads(raw)
            if not isinstance(parsed, dict):
                raise ValueError("not a JSON object")
            records.append(_record(parsed))
        except ValueError as e:  # json.JSONDecodeError and bytes.fromhex's are ValueErrors
            if number == len(lines) and not data.endswith(b"\n"):
                break  # torn last line
            raise SimulatorError(f"{path} line {number} is not a journal line: {e}") from None
    return records

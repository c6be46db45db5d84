"""The streaming-replication sub-protocol inside CopyBoth, and what we may confirm.

How this works: after START_REPLICATION the server sends CopyData messages
that hold either XLogData ('w': a pgoutput message and its WAL position) or
a primary keepalive ('k': the server's WAL end and whether it wants a reply).
We answer with standby status updates ('r') that carry the position durable
in the replica store as write, flush and apply position alike, because
PostgreSQL releases a synchronous commit once our *flush* position passes
its commit record.

`Confirmation` decides that position. Everything received is in commit
order, so once every received transaction is durable in the replica store
(nothing open, nothing queued, nothing being applied) the position may move
to the furthest point the server has vouched for: the end of the last
XLogData or the WAL end of the last keepalive. PostgreSQL 15 skips empty
transactions and then sends only keepalives; without this rule their
commits would wait for the replica forever.
"""

import struct
from dataclasses import dataclass

from haproxy_ln.errors import ProtocolViolation

PG_EPOCH_OFFSET_US = 946_684_800_000_000  # 2000-01-01 minus 1970-01-01, in microseconds

_XLOG_HEADER = struct.Struct("!cQQq")
_KEEPALIVE = struct.Struct("!cQq?")
_STATUS = struct.Struct("!cQQQq?")


@dataclass(frozen=True, slots=True)
class XLogData:
    start: int
    wal_end: int
    payload: memoryview


@dataclass(frozen=True, slots=True)
class Keepalive:
    wal_end: int
    reply_requested: bool


def decode(data: memoryview) -> XLogData | Keepalive:
    """Decode the body of one CopyData message of a replication stream.

    Raises ProtocolViolation for an unknown kind or a short message.
    """
    kind = bytes(data[:1])
    if kind == b"w" and len(data) >= _XLOG_HEADER.size:
        _, start, wal_end, _sent = _XLOG_HEADER.unpack_from(data)
        return XLogData(start, wal_end, data[_XLOG_HEADER.size :])
    if kind == b"k" and len(data) == _KEEPALIVE.size:
        _, wal_end, _sent, reply = _KEEPALIVE.unpack_from(data)
        return Keepalive(wal_end, reply)
    raise ProtocolViolation(f"malformed replication message of kind {kind!r} ({len(data)} bytes)")


def status_update(position: int, now_unix_us: int, *, reply_requested: bool = False) -> bytes:
    """Body of a standby status update confirming `position` as written, flushed and applied."""
    clock = now_unix_us - PG_EPOCH_OFFSET_US
    return _STATUS.pack(b"r", position, position, position, clock, reply_requested)


def format_lsn(lsn: int) -> str:
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


def parse_lsn(text: str) -> int:
    """Raises ValueError for text that is not `X/Y` in hex."""
    high, sep, low = text.partition("/")
    if not sep:
        raise ValueError(f"not an LSN: {text!r}")
    return (int(high, 16) << 32) | int(low, 16)


class Confirmation:
    """Which WAL position is durable in the replica store and may be confirmed."""

    def __init__(self, durable: int) -> None:
        self.durable = durable
        self._vouched = durable
        self._pending = 0

    def received(self, wal_end: int, *, opens: bool = False) -> None:
        """The server vouched for everything up to `wal_end`; `opens` counts one more
        transaction that must become durable before any later position may be confirmed."""
        self._vouched = max(self._vouched, wal_end)
        if opens:
            self._pending += 1
        self._advance()

    def applied(self, end_lsn: int) -> None:
        """A transaction received earlier, ending at `end_lsn`, is durable in the replica store."""
        if self._pending <= 0:
            raise ValueError("applied() without a pending transaction")
        self._pending -= 1
        self.durable = max(self.durable, end_lsn)
        self._advance()

    @property
    def pending(self) -> int:
        return self._pending

    def _advance(self) -> None:
        if self._pending == 0:
            self.durable = max(self.durable, self._vouched)

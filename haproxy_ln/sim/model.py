"""The simulated channels: states, the next update, digests and the pace (pure).

How this works: a channel's state is its commitment number and the set of
HTLCs on that commitment, as a Lightning daemon would have signed it and told
its peer. Each update moves one channel to the next commitment number, adding
or resolving one HTLC (`next_update`, driven by a seeded `random.Random`), so
consecutive states always differ. What the peer has been told is summed up
by `htlc_digest`: SHA-256 over the sorted HTLCs, so two states with the same
commitment number and different HTLC sets can never look alike.

Channel ids are the same for every run and node (`channel_ids`), so the
states acknowledged by runs on two nodes of one pair can be compared.
`Pacer` decides when the next update is due; it takes `now` as an argument
and never reads a clock, so it is tested without sleeping.

No I/O here: the database and journal code calls these functions.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import random
import struct
from collections.abc import Mapping
from dataclasses import dataclass, replace

__all__ = [
    "Change",
    "ChannelHistory",
    "ChannelState",
    "Htlc",
    "Pacer",
    "Update",
    "channel_ids",
    "commitment_secret",
    "decode_state",
    "encode_state",
    "htlc_digest",
    "next_update",
]

_HTLC = struct.Struct(">QBQ32s")  # htlc_id, incoming, amount_msat, payment_hash
_STATE_HEAD = struct.Struct(">BQQH")  # format version, commitment, next_htlc_id, HTLC count
_STATE_VERSION = 1


@dataclass(frozen=True, slots=True)
class Htlc:
    """One HTLC on a commitment."""

    htlc_id: int
    incoming: bool
    amount_msat: int
    payment_hash: bytes

    def encode(self) -> bytes:
        return _HTLC.pack(self.htlc_id, int(self.incoming), self.amount_msat, self.payment_hash)


def htlc_digest(htlcs: tuple[Htlc, ...]) -> bytes:
    """SHA-256 over the HTLCs in id order: what the peer was told about the HTLC set."""
    h = hashlib.sha256(b"haproxy-ln sim htlcs v1")
    for htlc in sorted(htlcs, key=lambda x: x.htlc_id):
        h.update(htlc.encode())
    return h.digest()


@dataclass(frozen=True, slots=True)
class ChannelState:
    """A channel at one commitment number."""

    channel_id: bytes
    commitment: int
    next_htlc_id: int
    htlcs: tuple[Htlc, ...]

    @property
    def digest(self) -> bytes:
        return htlc_digest(self.htlcs)

    @classmethod
    def opened(cls, channel_id: bytes) -> ChannelState:
        """A new channel: commitment 0, no HTLCs."""
        return cls(channel_id, 0, 0, ())


@dataclass(frozen=True, slots=True)
class ChannelHistory:
    """A channel as a database holds it: its current commitment number and the
    HTLC digest of every commitment it keeps a record of."""

    commitment: int
    digests: Mapping[int, bytes]


class Change(enum.Enum):
    """What an update does to the HTLC set."""

    ADD = "add"
    SETTLE = "settle"
    FAIL = "fail"


@dataclass(frozen=True, slots=True)
class Update:
    """One channel update: from `before` to `after` by `change` on `htlc`."""

    before: ChannelState
    after: ChannelState
    change: Change
    htlc: Htlc


def next_update(state: ChannelState, rng: random.Random, max_htlcs: int = 6) -> Update:
    """The next commitment of `state`: one HTLC added, or one settled or failed.

    Raises ValueError if `max_htlcs` is below 1.
    """
    if max_htlcs < 1:
        raise ValueError("max_htlcs must be at least 1")
    add = not state.htlcs or (len(state.htlcs) < max_htlcs and rng.random() < 0.5)
    if add:
        htlc = Htlc(
            htlc_id=state.next_htlc_id,
            incoming=rng.random() < 0.5,
            amount_msat=rng.randrange(1_000, 10_000_000),
            payment_hash=rng.randbytes(32),
        )
        after = replace(
            state,
            commitment=state.commitment + 1,
            next_htlc_id=state.next_htlc_id + 1,
            htlcs=(*state.htlcs, htlc),
        )
        return Update(state, after, Change.ADD, htlc)
    htlc = rng.choice(state.htlcs)
    change = Change.SETTLE if rng.random() < 0.8 else Change.FAIL
    rest = tuple(h for h in state.htlcs if h.htlc_id != htlc.htlc_id)
    after = replace(state, commitment=state.commitment + 1, htlcs=rest)
    return Update(state, after, change, htlc)


def channel_ids(count: int) -> list[bytes]:
    """The ids of the first `count` simulated channels (the same for every run)."""
    return [hashlib.sha256(b"haproxy-ln sim channel %d" % i).digest() for i in range(count)]


def commitment_secret(key: bytes, channel_id: bytes, commitment: int) -> bytes:
    """The per-commitment secret for a commitment, derived from the node's key.

    One-way (HMAC-SHA256), so the stored secrets reveal nothing about the key.
    """
    return hmac.new(key, channel_id + commitment.to_bytes(8, "big"), hashlib.sha256).digest()


def encode_state(state: ChannelState) -> bytes:
    """`state` as one value (lnd mode keeps it under the channel's `state` key)."""
    head = _STATE_HEAD.pack(_STATE_VERSION, state.commitment, state.next_htlc_id, len(state.htlcs))
    return head + b"".join(h.encode() for h in state.htlcs)


def decode_state(channel_id: bytes, data: bytes) -> ChannelState:
    """The inverse of `encode_state`. Raises ValueError for bytes it did not write."""
    if len(data) < _STATE_HEAD.size:
        raise ValueError(f"channel state of {len(data)} bytes is too short")
    version, commitment, next_htlc_id, count = _STATE_HEAD.unpack_from(data)
    if version != _STATE_VERSION or len(data) != _STATE_HEAD.size + count * _HTLC.size:
        raise ValueError("not a channel state written by this simulator")
    htlcs = []
    for i in range(count):
        htlc_id, incoming, amount, payment_hash = _HTLC.unpack_from(
            data, _STATE_HEAD.size + i * _HTLC.size
        )
        htlcs.append(Htlc(htlc_id, bool(incoming), amount, payment_hash))
    return ChannelState(channel_id, commitment, next_htlc_id, tuple(htlcs))


class Pacer:
    """When updates are due: `rate` per second (0: at once), at most `count`, until `deadline`.

    Updates are due on a fixed grid so the rate holds over time; one that
    runs late is due at once, but the grid never falls more than one
    interval behind `now`, so a stall is not followed by a burst.
    Not thread-safe: callers sharing one hold a lock.
    """

    def __init__(
        self, rate: float, count: int | None, start: float, deadline: float | None
    ) -> None:
        """Raises ValueError for a negative rate or count."""
        if rate < 0 or (count is not None and count < 0):
            raise ValueError("rate and count must not be negative")
        self._interval = 1.0 / rate if rate > 0 else 0.0
        self._left = count
        self._due = start
        self._deadline = deadline
        self.ended_by: str | None = None  # "count" or "duration" once take() returned None

    def take(self, now: float) -> float | None:
        """The time the next update is due (<= now: at once), or None when there are no more."""
        if self._left == 0:
            self.ended_by = "count"
            return None
        due = max(self._due, now - self._interval)
        if self._deadline is not None and max(due, now) >= self._deadline:
            self.ended_by = "duration"
            return None
        if self._left is not None:
            self._left -= 1
        self._due = due + self._interval
        return due

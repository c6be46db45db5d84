"""`lnd` mode: lnd's key/value store on PostgreSQL (kvdb/postgres).

How this works: lnd keeps its bbolt-style bucket tree in one table per
database (here `channeldb_kv`): `key` and `value` bytea, `parent_id` naming
the bucket a row is in, `id` a bigserial, and `sequence` for a bucket's
NextSequence counter. A bucket is a row with a NULL value. Every transaction
is SERIALIZABLE, runs on one connection of a pool (pgx: several connections,
statements parsed once under a name and then only bound), and is run again
when PostgreSQL reports a serialization failure or a deadlock, as lnd's
driver does.

The tree the simulator writes:

    open-chan-bucket / <channel id> / state            the current ChannelState
                                    / revocation-log / <commitment, 8 bytes BE> -> HTLC digest
    invoices / <payment hash> -> invoice               (NextSequence numbers them)
    forwarding-log / <sequence, 8 bytes BE> -> event

Each update reads the channel's state inside its transaction (nothing is
cached between transactions, so a retry starts from what is committed),
writes the next state and its revocation-log entry, and for some updates an
invoice or a forwarding event. The sequence counters of those two shared
buckets make concurrent updates of different channels collide too.
"""

from __future__ import annotations

import random
import struct
import time
from collections.abc import Callable

import psycopg

from haproxy_ln.errors import DatabaseLost, SimulatorError
from haproxy_ln.sim.db import (
    Conn,
    Migration,
    as_bytes,
    as_int,
    first_line,
    raise_for,
    retryable,
    rollback_quietly,
    simple,
)
from haproxy_ln.sim.journal import Journal
from haproxy_ln.sim.model import (
    Change,
    ChannelHistory,
    ChannelState,
    Update,
    decode_state,
    encode_state,
    next_update,
)

__all__ = ["MIGRATIONS", "VERSION_TABLE", "Kv", "LndWorker", "read_history"]

VERSION_TABLE = "schema_migrations"
MIGRATIONS: tuple[Migration, ...] = (
    (
        "CREATE TABLE channeldb_kv (key BYTEA NOT NULL, value BYTEA, parent_id BIGINT,"
        " id BIGSERIAL PRIMARY KEY, sequence BIGINT,"
        " CONSTRAINT channeldb_kv_parent FOREIGN KEY (parent_id)"
        " REFERENCES channeldb_kv (id) ON DELETE CASCADE)",
        "CREATE INDEX channeldb_kv_p ON channeldb_kv (parent_id)",
        "CREATE UNIQUE INDEX channeldb_kv_up ON channeldb_kv (parent_id, key)"
        " WHERE parent_id IS NOT NULL",
        "CREATE UNIQUE INDEX channeldb_kv_top ON channeldb_kv (key) WHERE parent_id IS NULL",
    ),
)

OPEN_CHANNELS = b"open-chan-bucket"
INVOICES = b"invoices"
FORWARDS = b"forwarding-log"
STATE = b"state"
REVOCATION_LOG = b"revocation-log"
_INVOICE = struct.Struct(">QQB")  # sequence, amount_msat, state (0 open, 1 settled, 2 canceled)
_FORWARD = struct.Struct(">32sQQQB")  # channel, htlc id, amount_msat, unix time, settled


def _be64(n: int) -> bytes:
    return n.to_bytes(8, "big")


class Kv:
    """lnd's bucket operations on one connection (the caller runs the transaction)."""

    def __init__(self, conn: Conn) -> None:
        self.conn = conn

    def top(self, key: bytes) -> int | None:
        row = self.conn.execute(
            "SELECT id FROM channeldb_kv WHERE parent_id IS NULL AND key = %s", (key,)
        ).fetchone()
        return None if row is None else as_int(row[0])

    def child(self, parent: int, key: bytes) -> tuple[int, bytes | None] | None:
        """The row `key` in bucket `parent`: (id, value; None for a bucket), or None."""
        row = self.conn.execute(
            "SELECT id, value FROM channeldb_kv WHERE parent_id = %s AND key = %s", (parent, key)
        ).fetchone()
        if row is None:
            return None
        return as_int(row[0]), None if row[1] is None else as_bytes(row[1])

    def children(self, parent: int) -> list[tuple[int, bytes, bytes | None]]:
        return [
            (as_int(i), as_bytes(k), None if v is None else as_bytes(v))
            for i, k, v in self.conn.execute(
                "SELECT id, key, value FROM channeldb_kv WHERE parent_id = %s ORDER BY key",
                (parent,),
            )
        ]

    def create_top(self, key: bytes) -> int:
        self.conn.execute(
            "INSERT INTO channeldb_kv (key, parent_id) VALUES (%s, NULL)"
            " ON CONFLICT (key) WHERE parent_id IS NULL DO NOTHING",
            (key,),
        )
        found = self.top(key)
        assert found is not None  # just inserted, or there already
        return found

    def create_bucket(self, parent: int, key: bytes) -> int:
        self.conn.execute(
            "INSERT INTO channeldb_kv (key, parent_id) VALUES (%s, %s)"
            " ON CONFLICT (parent_id, key) WHERE parent_id IS NOT NULL DO NOTHING",
            (key, parent),
        )
        found = self.child(parent, key)
        assert found is not None
        return found[0]

    def bucket(self, parent: int, key: bytes) -> int:
        """The bucket `key` in `parent`. Raises SimulatorError if it is not there."""
        found = self.child(parent, key)
        if found is None or found[1] is not None:
            raise SimulatorError(f"bucket {key!r} is missing from the database")
        return found[0]

    def put(self, parent: int, key: bytes, value: bytes) -> None:
        self.conn.execute(
            "INSERT INTO channeldb_kv (key, value, parent_id) VALUES (%s, %s, %s)"
            " ON CONFLICT (parent_id, key) WHERE parent_id IS NOT NULL"
            " DO UPDATE SET value = excluded.value",
            (key, value, parent),
        )

    def next_sequence(self, bucket: int) -> int:
        row = self.conn.execute(
            "UPDATE channeldb_kv SET sequence = COALESCE(sequence, 0) + 1 WHERE id = %s"
            " RETURNING sequence",
            (bucket,),
        ).fetchone()
        assert row is not None  # the bucket exists: its id was just read
        return as_int(row[0])


def read_history(conn: Conn) -> dict[bytes, ChannelHistory]:
    """Every lnd-mode channel in the database (none if the schema is absent).

    Raises psycopg.Error on database errors, SimulatorError on values this
    simulator did not write.
    """
    row = conn.execute("SELECT to_regclass('channeldb_kv') IS NOT NULL").fetchone()
    if row is None or row[0] is not True:
        return {}
    kv = Kv(conn)
    channels = kv.top(OPEN_CHANNELS)
    history: dict[bytes, ChannelHistory] = {}
    for bucket, cid, _ in [] if channels is None else kv.children(channels):
        state = kv.child(bucket, STATE)
        if state is None or state[1] is None:
            continue
        try:
            commitment = decode_state(cid, state[1]).commitment
        except ValueError as e:
            raise SimulatorError(f"channel {cid.hex()[:16]}: {e}") from None
        log = kv.child(bucket, REVOCATION_LOG)
        entries = [] if log is None else kv.children(log[0])
        digests = {int.from_bytes(k, "big"): v for _, k, v in entries if v is not None}
        history[cid] = ChannelHistory(commitment, digests)
    return history


def ensure_channels(kv: Kv, channel_ids: list[bytes]) -> None:
    """Create the top buckets and any missing channel (inside the caller's transaction)."""
    for top in (INVOICES, FORWARDS):
        kv.create_top(top)
    channels = kv.create_top(OPEN_CHANNELS)
    for cid in channel_ids:
        bucket = kv.create_bucket(channels, cid)
        kv.create_bucket(bucket, REVOCATION_LOG)
        if kv.child(bucket, STATE) is None:
            kv.put(bucket, STATE, encode_state(ChannelState.opened(cid)))


class LndWorker:
    """One pooled connection writing channel updates in SERIALIZABLE transactions."""

    def __init__(
        self,
        conn: Conn,
        journal: Journal,
        rng: random.Random,
        *,
        max_htlcs: int,
        max_retries: int,
    ) -> None:
        self.kv = Kv(conn)
        self._journal = journal
        self._rng = rng
        self._max_htlcs = max_htlcs
        self._max_retries = max_retries
        self.retries = 0  # serialization failures and deadlocks retried so far

    def open_channels(self, channel_ids: list[bytes]) -> None:
        """Create the buckets and missing channels. Raises DatabaseLost, SimulatorError."""
        self._serializable(lambda: ensure_channels(self.kv, channel_ids), "opening channels")

    def update(self, channel_id: bytes) -> ChannelState:
        """Move `channel_id` to its next commitment, journaled once COMMIT returns.

        Raises DatabaseLost (journals `unknown` first if the COMMIT's outcome
        is unknown), SimulatorError (including too many serialization failures).
        """
        update = self._serializable(lambda: self._write(channel_id), "updating a channel")
        assert update is not None
        self._journal.ack(update.after)
        return update.after

    def _write(self, channel_id: bytes) -> Update:
        kv = self.kv
        channels = kv.top(OPEN_CHANNELS)
        if channels is None:
            raise SimulatorError("bucket 'open-chan-bucket' is missing from the database")
        bucket = kv.bucket(channels, channel_id)
        found = kv.child(bucket, STATE)
        if found is None or found[1] is None:
            raise SimulatorError(f"channel {channel_id.hex()[:16]} has no state")
        try:
            before = decode_state(channel_id, found[1])
        except ValueError as e:
            raise SimulatorError(f"channel {channel_id.hex()[:16]}: {e}") from None
        update = next_update(before, self._rng, self._max_htlcs)
        after, htlc = update.after, update.htlc
        kv.put(bucket, STATE, encode_state(after))
        kv.put(kv.bucket(bucket, REVOCATION_LOG), _be64(after.commitment), after.digest)
        if htlc.incoming:
            invoices = self._top(INVOICES)
            if update.change is Change.ADD:
                sequence = kv.next_sequence(invoices)
            else:
                old = kv.child(invoices, htlc.payment_hash)
                sequence = int(_INVOICE.unpack(old[1])[0]) if old and old[1] else 0
            state = {Change.ADD: 0, Change.SETTLE: 1, Change.FAIL: 2}[update.change]
            kv.put(invoices, htlc.payment_hash, _INVOICE.pack(sequence, htlc.amount_msat, state))
        elif update.change is not Change.ADD:
            forwards = self._top(FORWARDS)
            event = _FORWARD.pack(
                channel_id,
                htlc.htlc_id,
                htlc.amount_msat,
                int(time.time()),
                int(update.change is Change.SETTLE),
            )
            kv.put(forwards, _be64(kv.next_sequence(forwards)), event)
        return update

    def _top(self, key: bytes) -> int:
        found = self.kv.top(key)
        if found is None:
            raise SimulatorError(f"bucket {key!r} is missing from the database")
        return found

    def _serializable(self, body: Callable[[], Update | None], doing: str) -> Update | None:
        conn = self.kv.conn
        for attempt in range(self._max_retries + 1):
            try:
                simple(conn, "BEGIN ISOLATION LEVEL SERIALIZABLE")
                update = body()
            except psycopg.Error as e:
                rollback_quietly(conn)
                if retryable(e) and not conn.broken:
                    self._backoff(attempt)
                    continue
                raise_for(conn, e, doing)
            except SimulatorError:
                rollback_quietly(conn)
                raise
            try:
                simple(conn, "COMMIT")
            except psycopg.Error as e:
                if conn.broken and update is not None:
                    self._journal.unknown(update.after, "connection lost during COMMIT")
                    raise DatabaseLost(
                        f"database connection lost during COMMIT while {doing}; the outcome "
                        f"is unknown: {first_line(e)}"
                    ) from None
                if retryable(e) and not conn.broken:
                    self._backoff(attempt)  # a failed COMMIT has already rolled back
                    continue
                raise_for(conn, e, f"committing ({doing})")
            return update
        raise SimulatorError(
            f"gave up {doing} after {self._max_retries + 1} serialization failures in a row"
        )

    def _backoff(self, attempt: int) -> None:
        # Random, growing pauses so colliding workers do not collide again in lockstep.
        self.retries += 1
        time.sleep(self._rng.uniform(0, min(0.05, 0.001 * 2**attempt)))

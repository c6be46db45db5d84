"""`cln` mode: Core Lightning's way of using PostgreSQL.

How this works: one connection, as lightningd has. BEGIN and COMMIT are
simple queries; every other statement is an unnamed parameterized query with
binary results (libpq's PQexecParams; psycopg with `binary=True` and nothing
prepared). The whole state lives in memory, loaded once at start (as
lightningd loads its channels), together with `data_version` from the `vars`
table. Every write transaction ends with

    UPDATE vars SET intval = intval + 1 WHERE name = 'data_version' AND intval = $1

and if that changes no row, another writer has been at the database since we
loaded it: the transaction is rolled back and the simulator dies loudly
(DataVersionConflict), as lightningd does ("Optimistic lock on the database
failed"). That is what catches two active nodes writing the same database.

Tables: `channels` (current commitment number and HTLC digest per channel),
`channel_htlcs`, `commitment_secrets` (one row per commitment: the secret
derived from the node's key, as CLN keeps per-commitment secrets, and the HTLC
digest of that commitment, which is the history the checker verifies),
`invoices`, `forwards`, `vars`, and `version` for the migrations.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable

import psycopg

from haproxy_ln.errors import DatabaseLost, DataVersionConflict, SimulatorError
from haproxy_ln.sim.db import (
    Conn,
    Migration,
    as_bytes,
    as_int,
    first_line,
    migrate,
    raise_for,
    rollback_quietly,
    simple,
)
from haproxy_ln.sim.journal import Journal
from haproxy_ln.sim.model import (
    Change,
    ChannelHistory,
    ChannelState,
    Htlc,
    Update,
    channel_ids,
    commitment_secret,
    next_update,
)

__all__ = ["MIGRATIONS", "VERSION_TABLE", "ClnNode", "read_history"]

VERSION_TABLE = "version"
MIGRATIONS: tuple[Migration, ...] = (
    (
        "CREATE TABLE vars (name TEXT PRIMARY KEY, val TEXT, intval BIGINT)",
        "INSERT INTO vars (name, intval) VALUES ('data_version', 0)",
        "CREATE TABLE channels (id BIGSERIAL PRIMARY KEY, channel_id BYTEA NOT NULL UNIQUE,"
        " next_index_local BIGINT NOT NULL, next_htlc_id BIGINT NOT NULL,"
        " htlc_digest BYTEA NOT NULL, last_update_time BIGINT)",
        "CREATE TABLE channel_htlcs (id BIGSERIAL PRIMARY KEY,"
        " channel_id BIGINT NOT NULL REFERENCES channels(id) ON DELETE CASCADE,"
        " channel_htlc_id BIGINT NOT NULL, direction INTEGER NOT NULL,"
        " msatoshi BIGINT NOT NULL, payment_hash BYTEA NOT NULL, hstate INTEGER NOT NULL,"
        " UNIQUE (channel_id, channel_htlc_id))",
        "CREATE TABLE commitment_secrets ("
        " channel_id BIGINT NOT NULL REFERENCES channels(id) ON DELETE CASCADE,"
        " commitment_number BIGINT NOT NULL, secret BYTEA NOT NULL, htlc_digest BYTEA NOT NULL,"
        " PRIMARY KEY (channel_id, commitment_number))",
        "CREATE TABLE invoices (id BIGSERIAL PRIMARY KEY, state INTEGER NOT NULL,"
        " msatoshi BIGINT NOT NULL, payment_hash BYTEA NOT NULL UNIQUE, label TEXT NOT NULL,"
        " paid_timestamp BIGINT)",
        "CREATE TABLE forwards (id BIGSERIAL PRIMARY KEY, out_channel BIGINT NOT NULL,"
        " out_htlc_id BIGINT NOT NULL, out_msatoshi BIGINT NOT NULL, fee_msat BIGINT NOT NULL,"
        " state INTEGER NOT NULL, resolved_time BIGINT NOT NULL)",
    ),
)

_INCOMING, _OUTGOING = 0, 1  # channel_htlcs.direction, as CLN's DIRECTION_INCOMING/OUTGOING
_HTLC_COMMITTED = 4  # channel_htlcs.hstate: on both commitments
_UNPAID, _PAID, _EXPIRED = 0, 1, 2  # invoices.state
_SETTLED, _FAILED = 1, 2  # forwards.state


def read_history(conn: Conn) -> dict[bytes, ChannelHistory]:
    """Every cln-mode channel in the database (none if the schema is absent).

    Raises psycopg.Error on database errors.
    """
    row = conn.execute("SELECT to_regclass('commitment_secrets') IS NOT NULL").fetchone()
    if row is None or row[0] is not True:
        return {}
    current = {
        as_bytes(cid): as_int(cn)
        for cid, cn in conn.execute("SELECT channel_id, next_index_local FROM channels")
    }
    digests: dict[bytes, dict[int, bytes]] = {cid: {} for cid in current}
    for cid, cn, digest in conn.execute(
        "SELECT c.channel_id, s.commitment_number, s.htlc_digest"
        " FROM commitment_secrets s JOIN channels c ON c.id = s.channel_id"
    ):
        digests[as_bytes(cid)][as_int(cn)] = as_bytes(digest)
    return {cid: ChannelHistory(cn, digests[cid]) for cid, cn in current.items()}


class ClnNode:
    """The simulated lightningd: its one connection, its state in memory, its journal."""

    def __init__(
        self,
        conn: Conn,
        key: bytes,
        journal: Journal,
        rng: random.Random,
        max_htlcs: int,
    ) -> None:
        self._conn = conn
        self._key = key
        self._journal = journal
        self._rng = rng
        self._max_htlcs = max_htlcs
        self._data_version = 0
        self._row_ids: dict[bytes, int] = {}  # channel_id -> channels.id
        self.channels: dict[bytes, ChannelState] = {}

    def _x(self, sql: str, params: tuple[object, ...]) -> psycopg.Cursor[tuple[object, ...]]:
        """One PQexecParams-style statement: unnamed, binary results."""
        return self._conn.execute(sql, params, prepare=False, binary=True)

    def start(self, channels: int) -> None:
        """Migrate, load everything, and open the first `channels` channels if missing.

        Raises DataVersionConflict, DatabaseLost or SimulatorError.
        """
        migrate(self._conn, VERSION_TABLE, MIGRATIONS)
        try:
            self._load()
        except psycopg.Error as e:
            raise_for(self._conn, e, "loading the channels")
        missing = [c for c in channel_ids(channels) if c not in self.channels]
        if missing:
            self._transaction(lambda: self._open_channels(missing), "opening channels")

    def _load(self) -> None:
        row = self._x("SELECT intval FROM vars WHERE name = 'data_version'", ()).fetchone()
        if row is None:
            raise SimulatorError("the vars table has no data_version row")
        self._data_version = as_int(row[0])
        htlcs: dict[int, list[Htlc]] = {}
        for row_id, htlc_id, direction, amount, payment_hash in self._x(
            "SELECT channel_id, channel_htlc_id, direction, msatoshi, payment_hash"
            " FROM channel_htlcs",
            (),
        ):
            htlcs.setdefault(as_int(row_id), []).append(
                Htlc(
                    as_int(htlc_id),
                    direction == _INCOMING,
                    as_int(amount),
                    as_bytes(payment_hash),
                )
            )
        for row_id, cid, commitment, next_htlc_id, digest in self._x(
            "SELECT id, channel_id, next_index_local, next_htlc_id, htlc_digest FROM channels", ()
        ):
            channel = ChannelState(
                as_bytes(cid),
                as_int(commitment),
                as_int(next_htlc_id),
                tuple(sorted(htlcs.get(as_int(row_id), []), key=lambda h: h.htlc_id)),
            )
            if channel.digest != digest:
                # A daemon that loads a state it did not write must not sign on top of it.
                raise SimulatorError(
                    f"channel {channel.channel_id.hex()[:16]}: the HTLCs in channel_htlcs do not "
                    f"match the digest of commitment {channel.commitment}; the database is "
                    "inconsistent"
                )
            self.channels[channel.channel_id] = channel
            self._row_ids[channel.channel_id] = as_int(row_id)

    def _open_channels(self, missing: list[bytes]) -> None:
        for cid in missing:
            state = ChannelState.opened(cid)
            row = self._x(
                "INSERT INTO channels (channel_id, next_index_local, next_htlc_id, htlc_digest,"
                " last_update_time) VALUES (%s, 0, 0, %s, %s) RETURNING id",
                (cid, state.digest, int(time.time())),
            ).fetchone()
            assert row is not None  # RETURNING always gives the row
            self._row_ids[cid] = as_int(row[0])
            self.channels[cid] = state

    def update(self) -> ChannelState:
        """One channel update in one transaction, journaled once COMMIT returns.

        Raises DataVersionConflict (another writer), DatabaseLost (journals
        `unknown` first if the COMMIT's outcome is unknown), SimulatorError.
        """
        cid = self._rng.choice(sorted(self.channels))
        update = next_update(self.channels[cid], self._rng, self._max_htlcs)
        self._transaction(lambda: self._write(update), "updating a channel", update.after)
        self.channels[cid] = update.after
        self._journal.ack(update.after)
        return update.after

    def _write(self, update: Update) -> None:
        after, htlc, now = update.after, update.htlc, int(time.time())
        row_id = self._row_ids[after.channel_id]
        if update.change is Change.ADD:
            self._x(
                "INSERT INTO channel_htlcs (channel_id, channel_htlc_id, direction, msatoshi,"
                " payment_hash, hstate) VALUES (%s, %s, %s, %s, %s, %s)",
                (
                    row_id,
                    htlc.htlc_id,
                    _INCOMING if htlc.incoming else _OUTGOING,
                    htlc.amount_msat,
                    htlc.payment_hash,
                    _HTLC_COMMITTED,
                ),
            )
            if htlc.incoming:
                self._x(
                    "INSERT INTO invoices (state, msatoshi, payment_hash, label)"
                    " VALUES (%s, %s, %s, %s)",
                    (
                        _UNPAID,
                        htlc.amount_msat,
                        htlc.payment_hash,
                        f"sim-{htlc.payment_hash.hex()}",
                    ),
                )
        else:
            self._x(
                "DELETE FROM channel_htlcs WHERE channel_id = %s AND channel_htlc_id = %s",
                (row_id, htlc.htlc_id),
            )
            settled = update.change is Change.SETTLE
            if htlc.incoming:
                self._x(
                    "UPDATE invoices SET state = %s, paid_timestamp = %s WHERE payment_hash = %s",
                    (_PAID if settled else _EXPIRED, now if settled else None, htlc.payment_hash),
                )
            else:
                self._x(
                    "INSERT INTO forwards (out_channel, out_htlc_id, out_msatoshi, fee_msat,"
                    " state, resolved_time) VALUES (%s, %s, %s, %s, %s, %s)",
                    (
                        row_id,
                        htlc.htlc_id,
                        htlc.amount_msat,
                        htlc.amount_msat // 1000,
                        _SETTLED if settled else _FAILED,
                        now,
                    ),
                )
        changed = self._x(
            "UPDATE channels SET next_index_local = %s, next_htlc_id = %s, htlc_digest = %s,"
            " last_update_time = %s WHERE id = %s AND next_index_local = %s",
            (
                after.commitment,
                after.next_htlc_id,
                after.digest,
                now,
                row_id,
                update.before.commitment,
            ),
        ).rowcount
        if changed != 1:
            raise SimulatorError(
                f"channel {after.channel_id.hex()[:16]} is no longer at commitment "
                f"{update.before.commitment} in the database"
            )
        self._x(
            "INSERT INTO commitment_secrets (channel_id, commitment_number, secret, htlc_digest)"
            " VALUES (%s, %s, %s, %s)",
            (
                row_id,
                after.commitment,
                commitment_secret(self._key, after.channel_id, after.commitment),
                after.digest,
            ),
        )

    def _transaction(
        self, body: Callable[[], None], doing: str, state: ChannelState | None = None
    ) -> None:
        """BEGIN; body(); the data_version check; COMMIT, as lightningd's db_commit_transaction.

        Raises DataVersionConflict, DatabaseLost, SimulatorError.
        """
        conn = self._conn
        try:
            simple(conn, "BEGIN")
            body()
            changed = self._x(
                "UPDATE vars SET intval = intval + 1 WHERE name = 'data_version' AND intval = %s",
                (self._data_version,),
            ).rowcount
            if changed != 1:
                raise DataVersionConflict(
                    "optimistic lock on the database failed: data_version is no longer "
                    f"{self._data_version}, so another writer changed the database since this "
                    "node loaded it (two active nodes?). Aborting: concurrent access is unsafe"
                )
        except psycopg.Error as e:
            rollback_quietly(conn)
            raise_for(conn, e, doing)
        except SimulatorError:
            rollback_quietly(conn)
            raise
        try:
            simple(conn, "COMMIT")
        except psycopg.Error as e:
            if conn.broken and state is not None:
                self._journal.unknown(state, "connection lost during COMMIT")
                raise DatabaseLost(
                    f"database connection lost during COMMIT while {doing}; the outcome is "
                    f"unknown: {first_line(e)}"
                ) from None
            raise_for(conn, e, f"committing ({doing})")
        self._data_version += 1

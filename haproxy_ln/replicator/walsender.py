"""A replication connection to the local primary, spoken with our own pgwire code.

How this works: `open` logs in like any `PgConnection`, with
`replication=database` and the sync name as `application_name` (the name
PostgreSQL matches against `synchronous_standby_names`). `query` runs a
replication command (IDENTIFY_SYSTEM, CREATE_REPLICATION_SLOT, ...) or plain
SQL. `start_replication` enters CopyBoth; then `receive` yields the body of
each CopyData and `send` writes one.

The session is pinned to ISO dates, UTC and exact float output, so that the
text values pgoutput produces parse back identically on the replica.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import trio

from haproxy_ln.errors import ProtocolViolation, ReplicationError
from haproxy_ln.pgwire import messages
from haproxy_ln.pgwire.dsn import PgTarget
from haproxy_ln.pgwire.sql import quote_ident, quote_literal
from haproxy_ln.replication.record import TEXT_SETTINGS
from haproxy_ln.replicator.pgclient import PgConnection, server_error

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class SystemInfo:
    system_id: str
    timeline: int
    wal_flush: str
    database: str | None


class WalSenderConnection(PgConnection):
    """One replication-protocol connection. Once streaming, one task may receive while
    others send; every other use is one task at a time."""

    def __init__(self, stream: trio.abc.Stream, target: PgTarget) -> None:
        super().__init__(stream, target)
        self._sending = trio.Lock()

    @classmethod
    async def open(
        cls, target: PgTarget, application_name: str, *, timeout: float
    ) -> WalSenderConnection:
        """Raises ReplicationError (or ServerError) when the server cannot be
        reached, refuses us, or the login does not finish within `timeout`."""
        params = {"replication": "database", "application_name": application_name}
        conn = await cls.connect(target, {**params, **TEXT_SETTINGS}, timeout=timeout)
        assert isinstance(conn, WalSenderConnection)
        return conn

    async def identify_system(self) -> SystemInfo:
        (row,) = await self.query("IDENTIFY_SYSTEM")
        system_id, timeline, wal_flush, database = row
        assert system_id is not None and timeline is not None and wal_flush is not None
        return SystemInfo(system_id, int(timeline), wal_flush, database)

    async def start_replication(self, slot: str, start_lsn: str, publication: str) -> None:
        """Enter CopyBoth. Raises ServerError when the server refuses."""
        await self._stream.send_all(
            messages.query(
                f"START_REPLICATION SLOT {quote_ident(slot)} LOGICAL {start_lsn} "
                f"(proto_version '1', publication_names {quote_literal(publication)}, "
                "messages 'true')"
            )
        )
        while True:
            kind, payload = await self._read()
            if kind == b"W":
                return
            if kind == b"E":
                raise server_error(payload)
            if kind != b"N":
                raise ProtocolViolation(f"unexpected message {kind!r} after START_REPLICATION")

    async def receive(self) -> bytes:
        """The body of the next CopyData. Raises ServerError or ReplicationError
        when the server ends the stream."""
        while True:
            kind, payload = await self._read()
            if kind == b"d":
                return payload
            if kind == b"E":
                raise server_error(payload)
            if kind == b"c":
                raise ReplicationError("the server ended the replication stream")
            if kind == b"N":
                log.info("primary: %s", messages.error_fields(payload).get("M", ""))
            else:
                raise ProtocolViolation(f"unexpected message {kind!r} in a replication stream")

    async def send(self, body: bytes) -> None:
        """Send one CopyData; a concurrent call waits for this one. Without a trip
        through the scheduler when no other send is under way: a confirmation is
        on the path of every waiting commit."""
        try:
            self._sending.acquire_nowait()
        except trio.WouldBlock:
            await self._sending.acquire()
        try:
            await self._send(b"d", body)
        finally:
            self._sending.release()

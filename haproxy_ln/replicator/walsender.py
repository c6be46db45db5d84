"""A replication connection to the local primary, spoken with our own pgwire code.

How this works: `connect` opens a TCP connection, sends a StartupMessage with
`replication=database` and the sync name as `application_name` (the name
PostgreSQL matches against `synchronous_standby_names`), authenticates
(trust, password, md5 or SCRAM-SHA-256 through scramp) and waits for
ReadyForQuery. `query` runs one replication command (IDENTIFY_SYSTEM,
CREATE_REPLICATION_SLOT, ...) or plain SQL and returns its rows as text.
`start_replication` enters CopyBoth; then `receive` yields the body of each
CopyData and `send` writes one. Every read is capped (`MAX_MESSAGE`), and an
ErrorResponse becomes `ServerError`.

The session is pinned to ISO dates, UTC and exact float output, so that the
text values pgoutput produces parse back identically on the replica.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import struct
from dataclasses import dataclass

import scramp
import trio

from haproxy_ln.errors import ProtocolViolation, ReplicationError, ServerError
from haproxy_ln.pgwire import messages
from haproxy_ln.pgwire.dsn import PgTarget
from haproxy_ln.pgwire.sql import quote_ident, quote_literal
from haproxy_ln.replication.record import TEXT_SETTINGS

log = logging.getLogger(__name__)

MAX_MESSAGE = (1 << 30) + (1 << 20)  # one 1 GB field plus headers: PostgreSQL's own limit
SESSION_SETTINGS = {**TEXT_SETTINGS, "client_encoding": "UTF8"}

_AUTH_OK, _AUTH_CLEARTEXT, _AUTH_MD5 = 0, 3, 5
_AUTH_SASL, _AUTH_SASL_CONTINUE, _AUTH_SASL_FINAL = 10, 11, 12


@dataclass(frozen=True, slots=True)
class SystemInfo:
    system_id: str
    timeline: int
    wal_flush: str
    database: str | None


def server_error(body: bytes) -> ServerError:
    """The ServerError an ErrorResponse body describes."""
    fields = messages.error_fields(body)
    return ServerError(fields.get("C", "XX000"), fields.get("M", "error"))


class WalSenderConnection:
    """One replication-protocol connection; not safe for concurrent use."""

    def __init__(self, stream: trio.SocketStream, target: PgTarget) -> None:
        self._stream = stream
        self._target = target
        self._buf = bytearray()
        self.server_pid = 0

    @classmethod
    async def connect(
        cls, target: PgTarget, application_name: str, *, timeout: float
    ) -> WalSenderConnection:
        """Raises ReplicationError (or ServerError) when the server cannot be
        reached, refuses us, or the login does not finish within `timeout`."""
        with trio.move_on_after(timeout) as scope:
            try:
                stream = await trio.open_tcp_stream(target.host, target.port)
            except OSError as e:
                raise ReplicationError(f"cannot connect to {target}: {e}") from e
            conn = cls(stream, target)
            try:
                await conn._login(application_name)
            except BaseException:
                await conn.aclose()
                raise
            return conn
        assert scope.cancelled_caught
        raise ReplicationError(f"login to {target} did not finish within {timeout} s")

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True):
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                await self._stream.send_all(messages.build(b"X", b""))
            await self._stream.aclose()

    async def _login(self, application_name: str) -> None:
        params = {
            "user": self._target.user,
            "database": self._target.database,
            "replication": "database",
            "application_name": application_name,
            **SESSION_SETTINGS,
        }
        body = struct.pack("!I", messages.PROTOCOL_3)
        body += b"".join(k.encode() + b"\0" + v.encode() + b"\0" for k, v in params.items())
        await self._stream.send_all(struct.pack("!I", len(body) + 5) + body + b"\0")
        scram: scramp.ScramClient | None = None
        while True:
            kind, payload = await self._read()
            if kind == b"R":
                scram = await self._authenticate(payload, scram)
            elif kind == b"K":
                (self.server_pid,) = struct.unpack_from("!I", payload)
            elif kind == b"Z":
                return
            elif kind not in (b"S", b"N"):
                raise ProtocolViolation(f"unexpected message {kind!r} during login")

    def _password(self) -> str:
        if self._target.password is None:
            raise ReplicationError(
                f"{self._target} asks for a password and none is configured for it"
            )
        return self._target.password

    async def _authenticate(
        self, payload: bytes, scram: scramp.ScramClient | None
    ) -> scramp.ScramClient | None:
        (code,) = struct.unpack_from("!I", payload)
        if code == _AUTH_OK:
            return scram
        if code == _AUTH_CLEARTEXT:
            await self._send(b"p", self._password().encode() + b"\0")
        elif code == _AUTH_MD5:
            user, salt = self._target.user.encode(), payload[4:8]
            inner = hashlib.md5(self._password().encode() + user).hexdigest().encode()
            digest = b"md5" + hashlib.md5(inner + salt).hexdigest().encode()
            await self._send(b"p", digest + b"\0")
        elif code == _AUTH_SASL:
            offered = [m.decode() for m in payload[4:].split(b"\0") if m]
            if "SCRAM-SHA-256" not in offered:
                raise ReplicationError(f"server offers only SASL mechanisms {offered}")
            scram = scramp.ScramClient(["SCRAM-SHA-256"], self._target.user, self._password())
            first = scram.get_client_first().encode()
            await self._send(b"p", b"SCRAM-SHA-256\0" + struct.pack("!i", len(first)) + first)
        elif code == _AUTH_SASL_CONTINUE and scram is not None:
            scram.set_server_first(payload[4:].decode())
            await self._send(b"p", scram.get_client_final().encode())
        elif code == _AUTH_SASL_FINAL and scram is not None:
            try:
                scram.set_server_final(payload[4:].decode())
            except scramp.ScramException as e:
                raise ReplicationError(f"the server failed SCRAM verification: {e}") from e
        else:
            raise ReplicationError(f"unsupported authentication request {code}")
        return scram

    async def query(self, sql: str) -> list[tuple[str | None, ...]]:
        """Run one command; its rows as text. Raises ServerError for an error."""
        await self._stream.send_all(messages.query(sql))
        rows: list[tuple[str | None, ...]] = []
        error: ServerError | None = None
        while True:
            kind, payload = await self._read()
            if kind == b"D":
                rows.append(_data_row(payload))
            elif kind == b"E":
                error = server_error(payload)
            elif kind == b"Z":
                if error is not None:
                    raise error
                return rows
            elif kind not in (b"T", b"C", b"N", b"S", b"I"):
                raise ProtocolViolation(f"unexpected message {kind!r} in reply to a query")

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
        await self._send(b"d", body)

    async def _send(self, kind: bytes, body: bytes) -> None:
        await self._stream.send_all(messages.build(kind, body))

    async def _fill(self, n: int) -> None:
        while len(self._buf) < n:
            chunk = await self._stream.receive_some(max(65536, n - len(self._buf)))
            if not chunk:
                raise ReplicationError(f"{self._target} closed the connection")
            self._buf += chunk

    async def _read(self) -> tuple[bytes, bytes]:
        """One backend message as (type byte, payload)."""
        await self._fill(5)
        kind = bytes(self._buf[:1])
        (length,) = struct.unpack_from("!I", self._buf, 1)
        if not 4 <= length <= MAX_MESSAGE:
            raise ProtocolViolation(f"message {kind!r} declares impossible length {length}")
        await self._fill(1 + length)
        payload = bytes(self._buf[5 : 1 + length])
        del self._buf[: 1 + length]
        return kind, payload


def _data_row(payload: bytes) -> tuple[str | None, ...]:
    (n,) = struct.unpack_from("!H", payload)
    pos, values = 2, list[str | None]()
    for _ in range(n):
        (size,) = struct.unpack_from("!i", payload, pos)
        pos += 4
        if size < 0:
            values.append(None)
        else:
            values.append(payload[pos : pos + size].decode())
            pos += size
    return tuple(values)

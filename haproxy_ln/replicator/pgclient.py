"""A PostgreSQL client connection on trio, spoken with our own pgwire code.

How this works: `PgConnection.connect` opens a TCP connection, negotiates
TLS as the target's `sslmode` asks (see `tls_context`), sends a
StartupMessage with the given parameters, authenticates (trust, password,
md5 or SCRAM-SHA-256 through scramp) and waits for ReadyForQuery. Then:

- `query` runs one simple Query and returns its rows as text;
- `run` sends a pipeline of extended-protocol messages built with
  `messages.parse`/`bind_execute`/`close_statement`, then one Sync, and
  waits for ReadyForQuery: one round trip for any number of statements, which the
  server runs in one implicit transaction (unless one is open). The first
  ErrorResponse is raised as `ServerError` once the server is ready again,
  so the connection stays usable.

Every read is capped (`MAX_MESSAGE`). The replication connection
(`replicator.walsender`) and the replica store's apply session both use it,
so that the commit path crosses no event-loop bridge.
"""

from __future__ import annotations

import contextlib
import hashlib
import socket
import ssl
import struct
from collections.abc import Mapping

import scramp
import trio

from haproxy_ln.errors import ProtocolViolation, ReplicationError, ServerError
from haproxy_ln.pgwire import messages
from haproxy_ln.pgwire.dsn import PgTarget

MAX_MESSAGE = (1 << 30) + (1 << 20)  # one 1 GB field plus headers: PostgreSQL's own limit

_AUTH_OK, _AUTH_CLEARTEXT, _AUTH_MD5 = 0, 3, 5
_AUTH_SASL, _AUTH_SASL_CONTINUE, _AUTH_SASL_FINAL = 10, 11, 12
# Besides DataRow, ErrorResponse and ReadyForQuery, what may answer our messages (and
# NoticeResponse and ParameterStatus, which may come at any time).
_QUERY_REPLIES = b"TCINS"
_PIPELINE_REPLIES = b"123CDTnsINS"
_ERROR, _DATA_ROW, _READY = b"E"[0], b"D"[0], b"Z"[0]
_LENGTH = struct.Struct("!I")
_READ_MAX = 1 << 20  # bytes asked of the socket at once
# How many reads or writes in a row may find the socket ready before one checkpoint.
_READY_STREAK = 16


def server_error(body: bytes) -> ServerError:
    """The ServerError an ErrorResponse body describes."""
    fields = messages.error_fields(body)
    return ServerError(fields.get("C", "XX000"), fields.get("M", "error"), fields.get("D"))


def tls_context(target: PgTarget) -> tuple[ssl.SSLContext | None, bool]:
    """(context, required) for the target's sslmode, as libpq reads it.

    `disable`: no TLS. `allow`/`prefer` (the default): TLS when the server
    offers it, unverified. `require`: TLS or nothing, unverified unless
    `sslrootcert` is given (then as verify-ca). `verify-ca`: the server's
    chain must lead to `sslrootcert` (or the system's CAs). `verify-full`:
    also its name must match the host. `sslcert`/`sslkey` present a client
    certificate. `PgTarget.parse` has checked the mode. Raises
    ReplicationError for an unreadable file.
    """
    options = dict(target.options)
    mode = options.get("sslmode", "prefer")
    if mode == "disable":
        return None, False
    root = options.get("sslrootcert")
    verify = mode in ("verify-ca", "verify-full") or (mode == "require" and root is not None)
    try:
        context = (
            ssl.create_default_context(cafile=root)
            if verify
            else ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        )
        context.check_hostname = mode == "verify-full"
        if not verify:
            context.verify_mode = ssl.CERT_NONE
        if "sslcert" in options:
            context.load_cert_chain(options["sslcert"], options.get("sslkey"))
    except (OSError, ssl.SSLError) as e:
        raise ReplicationError(f"{target}: cannot set up TLS: {e}") from None
    return context, mode in ("require", "verify-ca", "verify-full")


class SocketTransport(trio.abc.Stream):
    """A connected TCP socket as a trio Stream that tries every read and write at once.

    trio's SocketStream yields to the scheduler after every read or write
    that did not have to wait. On the commit path that was one full scheduler
    round per pgoutput message, per pipeline sent and per reply read: the
    largest share of the replicator's CPU. Here an operation that finds the
    socket ready returns without one; one checkpoint every `_READY_STREAK`
    such operations keeps other tasks and cancellation going on a busy
    stream. Not safe for concurrent reads (or concurrent writes).
    """

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self._sock = sock
        self._streak = 0

    @classmethod
    async def connect(cls, host: str, port: int) -> SocketTransport:
        """Raises OSError when no address of `host` accepts the connection."""
        stream = await trio.open_tcp_stream(host, port)  # which sets TCP_NODELAY
        return cls(socket.socket(fileno=stream.socket.detach()))

    async def _ready(self) -> None:
        self._streak += 1
        if self._streak >= _READY_STREAK:
            self._streak = 0
            await trio.lowlevel.checkpoint()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        while True:
            try:
                data = self._sock.recv(max_bytes or 65536)
            except BlockingIOError:
                self._streak = 0
                await trio.lowlevel.wait_readable(self._sock)
            except OSError as e:
                raise trio.BrokenResourceError(e) from e
            else:
                await self._ready()
                return data

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        while view:
            try:
                view = view[self._sock.send(view) :]
            except BlockingIOError:
                self._streak = 0
                await trio.lowlevel.wait_writable(self._sock)
            except OSError as e:
                raise trio.BrokenResourceError(e) from e
        await self._ready()

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.wait_writable(self._sock)

    async def aclose(self) -> None:
        if self._sock.fileno() != -1:
            trio.lowlevel.notify_closing(self._sock)
            self._sock.close()
        await trio.lowlevel.checkpoint()


class PgConnection:
    """One client connection; not safe for concurrent use."""

    def __init__(self, stream: trio.abc.Stream, target: PgTarget) -> None:
        self._stream = stream
        self._target = target
        self._buf = bytearray()
        self.server_pid = 0

    @classmethod
    async def connect(
        cls, target: PgTarget, params: Mapping[str, str], *, timeout: float
    ) -> PgConnection:
        """Log in with startup `params` (user and database come from `target`).

        Raises ReplicationError (or ServerError) when the server cannot be
        reached, refuses us, or the login does not finish within `timeout`.
        """
        context, tls_required = tls_context(target)
        with trio.move_on_after(timeout) as scope:
            try:
                stream: trio.abc.Stream = await SocketTransport.connect(target.host, target.port)
            except OSError as e:
                raise ReplicationError(f"cannot connect to {target}: {e}") from e
            conn = cls(stream, target)
            try:
                if context is not None:
                    await conn._start_tls(context, tls_required)
                await conn._login(params)
            except BaseException:
                await conn.aclose()
                raise
            return conn
        assert scope.cancelled_caught
        raise ReplicationError(f"login to {target} did not finish within {timeout} s")

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True):
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                with trio.move_on_after(1):
                    await self._stream.send_all(messages.build(b"X", b""))
            with contextlib.suppress(trio.BrokenResourceError, OSError, ssl.SSLError):
                await trio.aclose_forcefully(self._stream)

    async def _start_tls(self, context: ssl.SSLContext, required: bool) -> None:
        await self._stream.send_all(struct.pack("!II", 8, messages.SSL_REQUEST))
        answer = await self._stream.receive_some(1)
        if answer == b"N":
            if required:
                raise ReplicationError(f"{self._target} refuses TLS, which sslmode requires")
            return
        if answer != b"S":
            raise ProtocolViolation(f"unexpected answer {answer!r} to SSLRequest")
        tls = trio.SSLStream(self._stream, context, server_hostname=self._target.host)
        try:
            await tls.do_handshake()
        except trio.BrokenResourceError as e:
            raise ReplicationError(f"TLS with {self._target} failed: {e.__cause__ or e}") from None
        self._stream = tls

    async def _login(self, params: Mapping[str, str]) -> None:
        # We encode and decode text as UTF-8, whatever the server's encoding.
        startup = {
            "user": self._target.user,
            "database": self._target.database,
            "client_encoding": "UTF8",
            **params,
        }
        body = struct.pack("!I", messages.PROTOCOL_3)
        body += b"".join(k.encode() + b"\0" + v.encode() + b"\0" for k, v in startup.items())
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
            elif kind == b"E":
                raise server_error(payload)
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
        """Run one simple Query; its rows as text. Raises ServerError for an error."""
        await self._stream.send_all(messages.query(sql))
        rows: list[tuple[str | None, ...]] = []
        await self._until_ready(_QUERY_REPLIES, rows)
        return rows

    async def run(self, pipeline: bytes | bytearray) -> None:
        """Send `pipeline` and a Sync, and wait until the server has run it; rows it
        returns are not read.

        Raises ServerError for the first error, after which the server
        skipped the rest of the pipeline (and rolled back, outside a
        transaction block).
        """
        await self._stream.send_all(pipeline + messages.SYNC)
        await self._until_ready(_PIPELINE_REPLIES, None)

    async def _until_ready(
        self, expected: bytes, rows: list[tuple[str | None, ...]] | None
    ) -> None:
        """Read until ReadyForQuery, then raise the first error; `expected` are the
        message types that may come besides. Messages nobody needs are dropped
        unread."""
        error: ServerError | None = None
        buf = self._buf
        while True:
            end = await self._next()
            kind = buf[0]
            if kind == _ERROR:
                error = error or server_error(bytes(buf[5:end]))
            elif kind == _DATA_ROW and rows is not None:
                rows.append(messages.data_row(bytes(buf[5:end])))
            elif kind == _READY:
                del buf[:end]
                if error is not None:
                    raise error
                return
            elif kind not in expected:
                raise ProtocolViolation(f"unexpected message {chr(kind)!r} in reply to a query")
            del buf[:end]

    async def _send(self, kind: bytes, body: bytes) -> None:
        await self._stream.send_all(messages.build(kind, body))

    async def _next(self) -> int:
        """Buffer the next whole backend message; returns where it ends in the buffer."""
        buf = self._buf
        if len(buf) < 5:
            await self._fill(5)
        length: int = _LENGTH.unpack_from(buf, 1)[0]
        if not 4 <= length <= MAX_MESSAGE:
            raise ProtocolViolation(f"message {chr(buf[0])!r} declares impossible length {length}")
        if len(buf) < 1 + length:
            await self._fill(1 + length)
        return 1 + length

    async def _fill(self, n: int) -> None:
        while len(self._buf) < n:
            # Each read may allocate all it asks for at first: a declared 1 GB
            # message is read 1 MB at a time, not 1 GB at a time.
            want = min(max(65536, n - len(self._buf)), _READ_MAX)
            chunk = await self._stream.receive_some(want)
            if not chunk:
                raise ReplicationError(f"{self._target} closed the connection")
            self._buf += chunk

    async def _read(self) -> tuple[bytes, bytes]:
        """One backend message as (type byte, payload)."""
        end = await self._next()
        buf = self._buf
        kind, payload = bytes(buf[:1]), bytes(buf[5:end])
        del buf[:end]
        return kind, payload

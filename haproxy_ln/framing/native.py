"""The C framer and session (native/) behind the APIs of their Python twins.

Importing this module raises ImportError when the extension was not built;
haproxy_ln.framing then falls back to the twin and says so.
"""

from typing import NoReturn

from haproxy_ln._native import ffi, lib
from haproxy_ln.errors import ProtocolViolation
from haproxy_ln.framing import codes
from haproxy_ln.pgwire import messages
from haproxy_ln.pgwire import session as session_mod


class CPool:
    """A pgf_pool: pooled power-of-two buffers, exact larger ones, a byte budget."""

    def __init__(self, chunk: int, budget: int, keep: int) -> None:
        self._p = ffi.new("pgf_pool *")
        lib.pgf_pool_init(self._p, chunk, budget, keep)

    def __del__(self) -> None:
        lib.pgf_pool_clear(self._p)

    @property
    def in_use(self) -> int:
        return int(self._p.in_use)

    @property
    def mallocs(self) -> int:
        return int(self._p.mallocs)


_tables: dict[bytes, object] = {}


def _c_table(table: bytes) -> object:
    # One C copy per distinct table, kept for the life of the process.
    c = _tables.get(table)
    if c is None:
        c = _tables[table] = ffi.new("uint8_t[256]", table)
    return c


class CFramer:
    """One direction of one connection; see native/pgframe.h."""

    def __init__(self, pool: CPool, table: bytes, max_message: int, untyped: bool) -> None:
        self._pool = pool  # keep the pool alive while buffers may be out
        self.max_message = max_message
        self._f = ffi.new("pgf_framer *")
        lib.pgf_init(self._f, pool._p, _c_table(table), max_message, int(untyped))

    def __del__(self) -> None:
        lib.pgf_close(self._f)

    def close(self) -> None:
        lib.pgf_close(self._f)

    def recv(self, fd: int) -> int:
        r: int = lib.pgf_recv(self._f, fd)
        if r < codes.MORE:
            codes.raise_for(r, self._f.err_value, self.max_message)
        return r

    def next(self) -> int:
        r: int = lib.pgf_next(self._f)
        if r < codes.MORE:
            codes.raise_for(r, self._f.err_value, self.max_message)
        return r

    def message(self) -> memoryview:
        f = self._f
        if f.msg_type < 0:
            codes.raise_for(codes.ERR_STATE, 0, self.max_message)
        return memoryview(ffi.buffer(f.buf + f.msg_off, f.msg_len))

    def accept(self) -> None:
        if lib.pgf_accept(self._f):
            codes.raise_for(codes.ERR_STATE, 0, self.max_message)

    def drop(self) -> None:
        if lib.pgf_drop(self._f):
            codes.raise_for(codes.ERR_STATE, 0, self.max_message)

    def send(self, fd: int) -> int:
        r: int = lib.pgf_send(self._f, fd)
        if r < 0:
            codes.raise_for(r, self._f.err_value, self.max_message)
        return r

    def discard(self) -> None:
        lib.pgf_discard(self._f)

    def pending(self) -> int:
        f = self._f
        return int(f.rd - f.snd)

    def at_boundary(self) -> bool:
        return bool(lib.pgf_at_boundary(self._f))

    def expect_untyped(self) -> None:
        lib.pgf_expect_untyped(self._f)


_SESSION_ERRORS = {
    lib.PGS_ERR_QUERY: session_mod.QUERY_UNTERMINATED,
    lib.PGS_ERR_NAME: messages.NAME_MALFORMED,
    lib.PGS_ERR_FIELD: messages.FIELD_UNTERMINATED,
    lib.PGS_ERR_CLOSE: session_mod.CLOSE_TOO_SHORT,
    lib.PGS_ERR_RFQ: session_mod.MALFORMED_RFQ,
}


class CSession:
    """The C session (native/pgsession.c) behind pgwire.session.Session's API.

    The relay thread runs the same C structure without the GIL; Python uses
    this wrapper whenever the connection is not attached to the relay.
    """

    def __init__(self, proxy_secret: bytes | None = None) -> None:
        self._s = ffi.new("pgs_session *")
        lib.pgs_init(self._s)
        self.backend_key: tuple[int, bytes] | None = None
        self.proxy_secret = proxy_secret

    @property
    def status(self) -> bytes:
        return bytes([self._s.status])

    @property
    def ready(self) -> bool:
        return bool(self._s.ready)

    @property
    def copy_in(self) -> bool:
        return bool(self._s.copy_in)

    @property
    def terminated(self) -> bool:
        return bool(self._s.terminated)

    @property
    def answered(self) -> int:
        return int(self._s.answered)

    @property
    def in_flight(self) -> int:
        return int(self._s.count)

    @property
    def full(self) -> bool:
        return int(self._s.count) >= int(lib.PGS_MAX_IN_FLIGHT)

    def cancel_is_safe(self) -> bool:
        return bool(lib.pgs_cancel_is_safe(self._s))

    def must_keep_backend(self) -> bool:
        return bool(lib.pgs_must_keep_backend(self._s))

    def flushed(self) -> None:
        lib.pgs_flushed(self._s)

    def _raise(self, r: int) -> NoReturn:
        if r == lib.PGS_ERR_CLOSE_KIND:
            raise ProtocolViolation(session_mod.CLOSE_UNKNOWN_KIND.format(self._s.err_value))
        raise ProtocolViolation(_SESSION_ERRORS[r])

    def client_message(self, msg: bytes | memoryview) -> bytes | None:
        buf = ffi.from_buffer(msg)
        r = lib.pgs_client(self._s, buf, len(msg), 0)
        if r == lib.PGS_CHECK:
            lib.pgs_client(self._s, buf, len(msg), 1)
            return session_mod.durability_replacement(msg)
        if r < 0:
            self._raise(r)
        return None

    def server_message(self, msg: bytes | memoryview) -> bytes | None:
        if msg[0] == ord("K"):
            return session_mod.remap_backend_key(self, msg)
        r = lib.pgs_server(self._s, ffi.from_buffer(msg), len(msg))
        if r < 0:
            self._raise(r)
        return None

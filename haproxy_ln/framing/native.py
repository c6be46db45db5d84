"""The C framer (native/pgframe.c) behind the same API as pure.PyFramer.

Importing this module raises ImportError when the extension was not built;
haproxy_ln.framing then falls back to the twin and says so.
"""

from haproxy_ln._native import ffi, lib
from haproxy_ln.framing import codes


class CPool:
    """A pgf_pool: pooled power-of-two buffers, exact larger ones, a byte budget."""

    def __init__(self, chunk: int, budget: int, keep: int) -> None:
        self._p = ffi.new("pgf_pool *")
        lib.pgf_pool_init(self._p, chunk, budget, keep)

    def __del__(self) -> None:
        lib.pgf_pool_clear(self._p)

    def clear(self) -> None:
        lib.pgf_pool_clear(self._p)

    @property
    def in_use(self) -> int:
        return int(self._p.in_use)

    @property
    def cached(self) -> int:
        return int(self._p.cached)

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

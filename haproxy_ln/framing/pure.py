"""Pure-Python twin of native/pgframe.c.

It follows the C code line by line (same buffer layout, same pool
accounting, same result codes), so the tests can drive both with the same
bytes and require the same events, the same forwarded bytes and the same
errors. It is used when the C extension is not built.
"""

import errno
import os

from haproxy_ln.framing import codes


class PyPool:
    """Pooled power-of-two buffers up to 64 chunks, exact larger ones, a byte budget."""

    def __init__(self, chunk: int, budget: int, keep: int) -> None:
        self.chunk = chunk
        self.budget = budget
        self.keep = keep
        self.in_use = 0
        self.cached = 0
        self.mallocs = 0
        self._free: list[list[bytearray]] = [[] for _ in range(codes.CLASSES)]

    def _size_class(self, need: int) -> tuple[int, int]:
        size = self.chunk
        for c in range(codes.CLASSES):
            if size >= need:
                return c, size
            size <<= 1
        return -1, -(-need // self.chunk) * self.chunk

    def _drop_cached(self) -> None:
        for free in self._free:
            free.clear()
        self.cached = 0

    def take(self, need: int) -> bytearray | None:
        c, size = self._size_class(need)
        if c >= 0 and self._free[c]:
            self.cached -= size
            self.in_use += size
            return self._free[c].pop()
        if self.in_use + self.cached + size > self.budget:
            self._drop_cached()
        if self.in_use + size > self.budget:
            return None
        self.mallocs += 1
        self.in_use += size
        return bytearray(size)

    def give(self, buf: bytearray) -> None:
        cap = len(buf)
        c, _ = self._size_class(cap)
        self.in_use -= cap
        if c >= 0 and self.cached + cap <= self.keep:
            self._free[c].append(buf)
            self.cached += cap


class PyFramer:
    """One direction of one connection; see native/pgframe.h for the layout."""

    def __init__(self, pool: PyPool, table: bytes, max_message: int, untyped: bool) -> None:
        self._pool = pool
        self._table = table
        self.max_message = max_message
        self._untyped = untyped
        self._buf: bytearray | None = None
        self._view: memoryview | None = None
        self._snd = self._rd = self._wr = 0
        self._stream_left = 0
        self._error = 0
        self._err_value = 0
        self._msg_type = -1
        self._msg_off = self._msg_len = 0

    # -- buffer management -------------------------------------------------

    def _release(self) -> None:
        if self._buf is not None:
            self._pool.give(self._buf)
        self._buf = self._view = None
        self._snd = self._rd = self._wr = 0

    def _release_if_empty(self) -> None:
        if self._buf is not None and self._snd == self._wr:
            self._release()

    def close(self) -> None:
        self._release()
        self._msg_type = -1

    def _fail(self, code: int, value: int) -> int:
        self._error = code
        self._err_value = value
        return code

    def _compact(self) -> None:
        assert self._buf is not None
        self._buf[0 : self._wr - self._snd] = self._buf[self._snd : self._wr]
        self._rd -= self._snd
        self._wr -= self._snd
        self._snd = 0

    def _ensure(self, need: int) -> int:
        if self._buf is not None and self._rd + need <= len(self._buf):
            return 0
        total = self._rd - self._snd + need
        if self._buf is not None and total <= len(self._buf):
            self._compact()
            return 0
        nb = self._pool.take(total)
        if nb is None:
            return self._fail(codes.ERR_NOMEM, total)
        if self._buf is not None:
            nb[0 : self._wr - self._snd] = self._buf[self._snd : self._wr]
            self._pool.give(self._buf)
        self._rd -= self._snd
        self._wr -= self._snd
        self._snd = 0
        self._buf = nb
        self._view = memoryview(nb)
        return 0

    # -- the operations, as in pgframe.c -------------------------------------

    def _recv(self, fd: int) -> int:
        if self._error:
            return self._error
        if self._msg_type >= 0:
            return codes.ERR_STATE
        if self._buf is None:
            if self._ensure(1):
                return self._error
        elif self._snd > 0:
            self._compact()
        assert self._buf is not None and self._view is not None
        if self._wr == len(self._buf):
            return codes.ERR_STATE
        try:
            n = os.readv(fd, [self._view[self._wr :]])
        except BlockingIOError:
            self._release_if_empty()
            return codes.MORE
        except OSError as e:
            self._release_if_empty()
            self._err_value = e.errno or 0
            return codes.ERR_IO
        if n > 0:
            self._wr += n
            return n
        self._release_if_empty()
        return 0

    def _next(self) -> int:
        if self._error:
            return self._error
        if self._msg_type >= 0:
            return codes.ERR_STATE
        while True:
            if self._stream_left:
                take = min(self._wr - self._rd, self._stream_left)
                self._rd += take
                self._stream_left -= take
                if self._stream_left:
                    return codes.MORE
            avail = self._wr - self._rd
            buf, rd = self._buf, self._rd
            if self._untyped:
                if avail < 4:
                    return codes.MORE
                assert buf is not None
                length = int.from_bytes(buf[rd : rd + 4], "big")
                if length < codes.UNTYPED_MIN or length > codes.UNTYPED_MAX:
                    return self._fail(codes.ERR_STARTUP, length)
                total = length
                mtype = codes.UNTYPED
            else:
                if avail < 1:
                    return codes.MORE
                assert buf is not None
                mtype = buf[rd]
                if not self._table[mtype] & codes.ALLOW:
                    return self._fail(codes.ERR_TYPE, mtype)
                if avail < 5:
                    return codes.MORE
                length = int.from_bytes(buf[rd + 1 : rd + 5], "big")
                if length < 4:
                    return self._fail(codes.ERR_SHORT, length)
                if length > self.max_message:
                    return self._fail(codes.ERR_LONG, length)
                if not self._table[mtype] & codes.HOLD:
                    self._rd += 5
                    self._stream_left = length - 4
                    continue
                total = length + 1
            if self._ensure(total):
                return self._error
            if self._wr - self._rd < total:
                return codes.MORE
            self._untyped = False
            self._msg_type = mtype
            self._msg_off = self._rd
            self._msg_len = total
            return mtype

    def _accept(self) -> int:
        if self._msg_type < 0:
            return codes.ERR_STATE
        self._rd += self._msg_len
        self._msg_type = -1
        return 0

    def _drop(self) -> int:
        if self._msg_type < 0 or self._snd != self._rd:
            return codes.ERR_STATE
        self._rd += self._msg_len
        self._snd = self._rd
        self._msg_type = -1
        self._release_if_empty()
        return 0

    def _send(self, fd: int) -> int:
        while self._snd < self._rd:
            assert self._view is not None
            try:
                n = os.write(fd, self._view[self._snd : self._rd])
            except InterruptedError:
                continue
            except BlockingIOError:
                return self._rd - self._snd
            except OSError as e:
                self._err_value = e.errno or 0
                return codes.ERR_IO
            if n <= 0:
                self._err_value = errno.EPIPE
                return codes.ERR_IO
            self._snd += n
        self._release_if_empty()
        return 0

    # -- public API (identical to native.CFramer) ----------------------------

    def recv(self, fd: int) -> int:
        """Read what is available from `fd`: bytes read, 0 at EOF, MORE if none.

        Raises ProtocolViolation (sticky), BufferBudgetExhausted, OSError.
        """
        r = self._recv(fd)
        if r < codes.MORE:
            codes.raise_for(r, self._err_value, self.max_message)
        return r

    def next(self) -> int:
        """The next held message's type (UNTYPED for a first message), or MORE.

        Raises ProtocolViolation (sticky), BufferBudgetExhausted, FramerMisuse.
        """
        r = self._next()
        if r < codes.MORE:
            codes.raise_for(r, self._err_value, self.max_message)
        return r

    def message(self) -> memoryview:
        """The held message just returned by next(), header included.

        Valid until accept(), drop() or the next call that moves the buffer.
        """
        if self._msg_type < 0 or self._view is None:
            codes.raise_for(codes.ERR_STATE, 0, self.max_message)
        return self._view[self._msg_off : self._msg_off + self._msg_len]

    def accept(self) -> None:
        """Forward the held message unchanged: it joins the send window."""
        if self._accept():
            codes.raise_for(codes.ERR_STATE, 0, self.max_message)

    def drop(self) -> None:
        """Skip the held message; only allowed when the send window is empty."""
        if self._drop():
            codes.raise_for(codes.ERR_STATE, 0, self.max_message)

    def send(self, fd: int) -> int:
        """Write the send window to `fd`; returns the bytes still unsent.

        Raises OSError when the peer is gone.
        """
        r = self._send(fd)
        if r < 0:
            codes.raise_for(r, self._err_value, self.max_message)
        return r

    def discard(self) -> None:
        """Forget the send window unsent (its destination is gone)."""
        self._snd = self._rd
        self._release_if_empty()

    def pending(self) -> int:
        """Bytes in the send window."""
        return self._rd - self._snd

    def at_boundary(self) -> bool:
        """Everything sent so far ends on a message boundary."""
        return self._snd == self._rd and self._stream_left == 0

    def expect_untyped(self) -> None:
        """The next message has no type byte (after SSLRequest/GSSENCRequest)."""
        self._untyped = True

"""The C framer and its pure-Python twin behave identically, and correctly.

Both are driven through real socket pairs with the same bytes, whole and
one byte at a time; the events, the forwarded bytes, the errors and the
pool's allocation count must match exactly.
"""

import contextlib
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from haproxy_ln.errors import BufferBudgetExhausted, FramerMisuse, ProtocolViolation
from haproxy_ln.framing import codes
from haproxy_ln.framing.native import CFramer, CPool
from haproxy_ln.framing.pure import PyFramer, PyPool

IMPLS = [pytest.param((CPool, CFramer), id="c"), pytest.param((PyPool, PyFramer), id="py")]
CHUNK = 4096
MAX_MESSAGE = 64 * 1024


def typed(t: bytes, body: bytes) -> bytes:
    return t + struct.pack("!I", len(body) + 4) + body


def untyped(code: int, body: bytes = b"") -> bytes:
    return struct.pack("!II", len(body) + 8, code) + body


@dataclass
class Run:
    events: list[tuple[int, bytes]] = field(default_factory=list)
    output: bytearray = field(default_factory=bytearray)
    error: tuple[str, str] | None = None
    mallocs: int = 0
    in_use_after: int = 0


@dataclass
class Pipes:
    src_w: socket.socket
    src_r: socket.socket
    dst_w: socket.socket
    dst_r: socket.socket

    @classmethod
    def open(cls) -> "Pipes":
        a, b = socket.socketpair()
        c, d = socket.socketpair()
        for s in (a, b, c, d):
            s.setblocking(False)
        return cls(src_w=a, src_r=b, dst_w=c, dst_r=d)

    def close(self) -> None:
        for s in (self.src_w, self.src_r, self.dst_w, self.dst_r):
            s.close()

    def drain(self, into: bytearray) -> None:
        while True:
            try:
                data = self.dst_r.recv(1 << 16)
            except BlockingIOError:
                return
            into.extend(data)


def drive(
    impl: tuple[type, type],
    data: bytes,
    *,
    step: int,
    untyped_first: bool = False,
    table: bytes = codes.CLIENT_TABLE,
    budget: int = 1 << 24,
    drop: Callable[[bytes], bool] = lambda m: False,
) -> Run:
    """Feed `data` in writes of at most `step` bytes; record everything."""
    pool_cls, framer_cls = impl
    pool = pool_cls(CHUNK, budget, 4 * CHUNK)
    framer = framer_cls(pool, table, MAX_MESSAGE, untyped_first)
    pipes = Pipes.open()
    run = Run()
    pos = 0
    shut = False
    try:
        while True:
            if pos < len(data):
                with contextlib.suppress(BlockingIOError):
                    pos += pipes.src_w.send(data[pos : pos + step])
            elif not shut:
                pipes.src_w.shutdown(socket.SHUT_WR)
                shut = True
            n = framer.recv(pipes.src_r.fileno())
            while (t := framer.next()) != codes.MORE:
                msg = bytes(framer.message())
                run.events.append((t, msg))
                if drop(msg):
                    while framer.send(pipes.dst_w.fileno()):
                        pipes.drain(run.output)
                    framer.drop()
                else:
                    framer.accept()
            while framer.send(pipes.dst_w.fileno()):
                pipes.drain(run.output)
            pipes.drain(run.output)
            if n == 0:
                break
    except (ProtocolViolation, BufferBudgetExhausted) as e:
        run.error = (type(e).__name__, str(e))
        # What was accepted before the error still goes through.
        while framer.send(pipes.dst_w.fileno()):
            pipes.drain(run.output)
        pipes.drain(run.output)
    finally:
        framer.close()
        run.mallocs = pool.mallocs
        run.in_use_after = pool.in_use
        pipes.close()
    return run


# -- strategies -------------------------------------------------------------

client_types = st.sampled_from([bytes([t]) for t in b"BCcfDEHFpPQSXd"])
bodies = st.one_of(
    st.binary(max_size=64),
    st.binary(min_size=CHUNK - 16, max_size=3 * CHUNK),
)
valid_message = st.builds(typed, client_types, bodies)
hostile = st.one_of(
    st.binary(min_size=1, max_size=16),  # garbage
    st.builds(lambda t, n: t + struct.pack("!I", n), client_types, st.integers(0, 3)),
    st.builds(
        lambda t, n: t + struct.pack("!I", n),
        client_types,
        st.integers(MAX_MESSAGE + 1, 0xFFFFFFFF),
    ),
)
streams = st.builds(
    lambda msgs, tail: b"".join(msgs) + tail,
    st.lists(valid_message, max_size=12),
    st.one_of(st.just(b""), hostile),
)


def drop_rule(msg: bytes) -> bool:
    return len(msg) % 3 == 0


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(data=streams)
def test_c_and_python_framers_agree_whole_and_byte_by_byte(data: bytes) -> None:
    c_impl, py_impl = (CPool, CFramer), (PyPool, PyFramer)
    for step in (1 << 20, 1):
        c = drive(c_impl, data, step=step, drop=drop_rule)
        py = drive(py_impl, data, step=step, drop=drop_rule)
        assert c == py
    whole = drive(c_impl, data, step=1 << 20, drop=drop_rule)
    bytewise = drive(c_impl, data, step=1, drop=drop_rule)
    assert (whole.events, whole.output, whole.error) == (
        bytewise.events,
        bytewise.output,
        bytewise.error,
    )
    assert whole.in_use_after == 0


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(msgs=st.lists(valid_message, max_size=10))
def test_valid_stream_is_forwarded_exactly_and_held_types_delivered(msgs: list[bytes]) -> None:
    data = b"".join(msgs)
    for impl in ((CPool, CFramer), (PyPool, PyFramer)):
        run = drive(impl, data, step=997)
        assert run.error is None
        assert bytes(run.output) == data
        assert [m for _, m in run.events] == [m for m in msgs if m[0:1] != b"d"]
        assert [t for t, _ in run.events] == [m[0] for m in msgs if m[0:1] != b"d"]


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(msgs=st.lists(valid_message, min_size=1, max_size=10))
def test_dropped_messages_are_not_forwarded(msgs: list[bytes]) -> None:
    data = b"".join(msgs)
    expected = b"".join(m for m in msgs if m[0:1] == b"d" or not drop_rule(m))
    for impl in ((CPool, CFramer), (PyPool, PyFramer)):
        assert bytes(drive(impl, data, step=4000, drop=drop_rule).output) == expected


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(
    ("data", "error"),
    [
        (
            typed(b"Q", b"x")[:1] + struct.pack("!I", 3),
            "message length 3 is below the minimum of 4",
        ),
        (
            b"Q" + struct.pack("!I", 0x7FFFFFFF),
            f"message length 2147483647 exceeds the limit of {MAX_MESSAGE} bytes",
        ),
        (b"GET / HTTP/1.1\r\n", "unknown message type byte 0x47"),
        (b"\x00\x00\x00\x00", "unknown message type byte 0x00"),
    ],
)
def test_malformed_input_is_a_clear_protocol_error(
    impl: tuple[type, type], data: bytes, error: str
) -> None:
    run = drive(impl, typed(b"S", b"") + data + typed(b"S", b""), step=1 << 16)
    assert run.error == ("ProtocolViolation", error)
    assert bytes(run.output) == typed(b"S", b"")  # what came before the error went through
    assert run.in_use_after == 0


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(
    ("data", "error"),
    [
        (b"GET / HTTP/1.1\r\n", "startup packet length 1195725856 is outside 8..10000"),
        (struct.pack("!I", 7) + b"abc", "startup packet length 7 is outside 8..10000"),
        (struct.pack("!I", 10001), "startup packet length 10001 is outside 8..10000"),
    ],
)
def test_bad_startup_packet_is_a_clear_protocol_error(
    impl: tuple[type, type], data: bytes, error: str
) -> None:
    run = drive(impl, data, step=1 << 16, untyped_first=True)
    assert run.error == ("ProtocolViolation", error)
    assert run.events == []


@pytest.mark.parametrize("impl", IMPLS)
def test_untyped_first_message_then_typed(impl: tuple[type, type]) -> None:
    startup = untyped(196608, b"user\0u\0\0")
    run = drive(impl, startup + typed(b"Q", b"select 1\0"), step=3, untyped_first=True)
    assert run.events == [(codes.UNTYPED, startup), (ord("Q"), typed(b"Q", b"select 1\0"))]


@pytest.mark.parametrize("impl", IMPLS)
def test_streamed_message_larger_than_any_buffer_passes_without_growth(
    impl: tuple[type, type],
) -> None:
    big = typed(b"d", bytes(range(256)) * 200)  # 51 KB through 4 KiB buffers
    run = drive(impl, big, step=1 << 20)
    assert run.error is None and bytes(run.output) == big
    assert run.mallocs == 1  # one 4 KiB chunk, reused for every read


@pytest.mark.parametrize("impl", IMPLS)
def test_held_message_beyond_the_budget_is_refused(impl: tuple[type, type]) -> None:
    run = drive(impl, typed(b"Q", b"x" * 20000 + b"\0"), step=1 << 20, budget=16 * 1024)
    assert run.error == (
        "BufferBudgetExhausted",
        "proxy buffer budget exhausted: a buffer of 20006 bytes does not fit",
    )
    assert run.output == b""


def relay_rounds(impl: tuple[type, type], rounds: int, size: int) -> tuple[int, int]:
    """Relay `rounds` request messages; returns (mallocs, bytes in use) after."""
    pool_cls, framer_cls = impl
    pool = pool_cls(CHUNK, 1 << 24, 64 * CHUNK)
    framer = framer_cls(pool, codes.CLIENT_TABLE, MAX_MESSAGE, False)
    pipes = Pipes.open()
    msg = typed(b"Q", b"q" * (size - 6) + b"\0")
    sink = bytearray()
    try:
        for _ in range(rounds):
            pipes.src_w.send(msg)
            while framer.next() == codes.MORE:
                framer.recv(pipes.src_r.fileno())
            framer.accept()
            while framer.send(pipes.dst_w.fileno()):
                pass
            pipes.drain(sink)
        assert len(sink) == rounds * len(msg)
        return pool.mallocs, pool.in_use
    finally:
        framer.close()
        pipes.close()


@pytest.mark.parametrize("impl", IMPLS)
def test_steady_state_relay_allocates_no_buffers(impl: tuple[type, type]) -> None:
    assert relay_rounds(impl, 10, 100) == relay_rounds(impl, 1000, 100) == (1, 0)
    # Held messages bigger than a chunk reuse a cached larger buffer too.
    assert relay_rounds(impl, 10, 3 * CHUNK) == relay_rounds(impl, 500, 3 * CHUNK)


@pytest.mark.parametrize("impl", IMPLS)
def test_out_of_order_calls_are_misuse_not_corruption(impl: tuple[type, type]) -> None:
    pool_cls, framer_cls = impl
    framer = framer_cls(pool_cls(CHUNK, 1 << 20, 0), codes.CLIENT_TABLE, MAX_MESSAGE, False)
    with pytest.raises(FramerMisuse):
        framer.accept()
    with pytest.raises(FramerMisuse):
        framer.message()

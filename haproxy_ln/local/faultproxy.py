"""A fault-injecting TCP proxy: pass, blackhole (a partition), reset (tests and chaos).

How this works: `FaultProxy(target)` listens on a free loopback port and
forwards every connection to `target` from one thread running a selector
loop over plain non-blocking sockets, so it serves pytest tests of any kind
(trio or not) and agents that tests run as subprocesses (they only need the
port). Mode changes are handed to that thread through a socketpair and take
effect before the call returns:

- `heal()` / PASS: bytes flow both ways (the initial mode);
- `blackhole()`: a partition. Open connections stay open, but every byte
  read from either side is dropped, as is anything buffered; new
  connections are accepted and never forwarded. Nobody gets an error: the
  peers just stop hearing each other, as with a pulled cable. `heal()` lets
  open connections carry bytes again (what was dropped stays lost, so
  their protocol may be broken) and closes those accepted during the
  blackhole, whose peers then connect again;
- `reset()`: every connection is closed with a TCP reset, and new ones are
  reset as soon as they are accepted, until `heal()` (a crashed server).

Each direction buffers at most `BUFFER_LIMIT` bytes; beyond that the proxy
stops reading that side, so a slow reader slows its writer down as TCP would.
"""

from __future__ import annotations

import contextlib
import enum
import queue
import selectors
import socket
import struct
import threading
from dataclasses import dataclass, field
from types import TracebackType
from typing import Self

LOOPBACK = "127.0.0.1"
BUFFER_LIMIT = 1 << 20
_CHUNK = 1 << 16


class Mode(enum.Enum):
    PASS = "pass"
    BLACKHOLE = "blackhole"
    RESET = "reset"


@dataclass(eq=False)
class _Side:
    """One socket of a connection and the bytes waiting to be written to it."""

    sock: socket.socket
    outgoing: bytearray = field(default_factory=bytearray)
    connected: bool = True


@dataclass(eq=False)
class _Pair:
    """A client connection and its upstream connection (None: never forwarded)."""

    client: _Side
    upstream: _Side | None

    def sides(self) -> list[_Side]:
        return [self.client] if self.upstream is None else [self.client, self.upstream]

    def peer(self, side: _Side) -> _Side | None:
        return self.upstream if side is self.client else self.client


def _close(sock: socket.socket, *, rst: bool) -> None:
    if rst:  # linger 0: close sends RST instead of FIN
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


class FaultProxy:
    """A TCP proxy in front of `target` ("host:port" or (host, port)); see the module doc."""

    def __init__(self, target: str | tuple[str, int]) -> None:
        if isinstance(target, str):
            host, _, port = target.rpartition(":")
            target = (host.strip("[]"), int(port))
        self.target = target
        self._listener = socket.create_server((LOOPBACK, 0))
        self._listener.setblocking(False)
        self.port: int = self._listener.getsockname()[1]
        self._mode = Mode.PASS
        self._commands: queue.Queue[tuple[Mode, threading.Event]] = queue.Queue()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._selector = selectors.DefaultSelector()
        self._pairs: dict[socket.socket, tuple[_Pair, _Side]] = {}
        self._held: set[_Pair] = set()  # accepted during a blackhole
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=f"faultproxy-{self.port}")
        self.accepted = 0
        """Connections accepted so far."""
        self.forwarded = 0
        """Bytes written to either side so far."""

    # --- control (any thread) -----------------------------------------------------------------

    @property
    def endpoint(self) -> str:
        """Where to connect instead of the target, as "127.0.0.1:port"."""
        return f"{LOOPBACK}:{self.port}"

    @property
    def mode(self) -> Mode:
        return self._mode

    @property
    def open_connections(self) -> int:
        """Client connections currently open."""
        return sum(1 for pair, side in list(self._pairs.values()) if side is pair.client)

    def start(self) -> Self:
        self._selector.register(self._listener, selectors.EVENT_READ)
        self._selector.register(self._wake_r, selectors.EVENT_READ)
        self._thread.start()
        return self

    def heal(self) -> None:
        """Back to passing bytes; see the module docstring."""
        self._set(Mode.PASS)

    def blackhole(self) -> None:
        """Drop every byte both ways and forward no new connection, until `heal`."""
        self._set(Mode.BLACKHOLE)

    def reset(self) -> None:
        """Reset every connection, and each new one, until `heal`."""
        self._set(Mode.RESET)

    def stop(self) -> None:
        """Close every connection and the listener, and end the thread. Idempotent."""
        if self._thread.is_alive():
            self._stopping = True
            self._wake_w.send(b"x")
            self._thread.join(10)
        for sock in (self._listener, self._wake_r, self._wake_w):
            sock.close()
        self._selector.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _set(self, mode: Mode) -> None:
        done = threading.Event()
        self._commands.put((mode, done))
        self._wake_w.send(b"x")
        if not done.wait(10):
            raise RuntimeError(f"fault proxy on port {self.port} did not switch to {mode.value}")

    # --- the loop (proxy thread) --------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._stopping:
                for key, events in self._selector.select():
                    sock = key.fileobj
                    assert isinstance(sock, socket.socket)
                    if sock is self._wake_r:
                        self._apply_commands()
                    elif sock is self._listener:
                        self._accept()
                    elif sock in self._pairs:
                        self._service(sock, events)
        finally:
            for pair in {pair for pair, _ in self._pairs.values()}:
                self._drop(pair, rst=False)

    def _apply_commands(self) -> None:
        with contextlib.suppress(BlockingIOError):
            self._wake_r.recv(4096)
        while True:
            try:
                mode, done = self._commands.get_nowait()
            except queue.Empty:
                return
            previous, self._mode = self._mode, mode
            pairs = {pair for pair, _ in self._pairs.values()}
            if mode is Mode.RESET:
                for pair in pairs:
                    self._drop(pair, rst=True)
            elif mode is Mode.BLACKHOLE:
                for pair in pairs:
                    for side in pair.sides():
                        side.outgoing.clear()
                        self._watch(side)
            elif previous is Mode.BLACKHOLE:
                for pair in list(self._held):
                    self._drop(pair, rst=False)
            done.set()

    def _accept(self) -> None:
        try:
            sock, _ = self._listener.accept()
        except BlockingIOError:
            return
        self.accepted += 1
        if self._mode is Mode.RESET:
            _close(sock, rst=True)
            return
        sock.setblocking(False)
        client = _Side(sock)
        upstream = None
        if self._mode is Mode.PASS:
            up = socket.socket(socket.AF_INET6 if ":" in self.target[0] else socket.AF_INET)
            up.setblocking(False)
            up.connect_ex(self.target)
            upstream = _Side(up, connected=False)
        pair = _Pair(client, upstream)
        if upstream is None:
            self._held.add(pair)
        for side in pair.sides():
            self._pairs[side.sock] = (pair, side)
            self._selector.register(side.sock, self._events(pair, side))

    def _events(self, pair: _Pair, side: _Side) -> int:
        """What to wait for on `side`: writable while it has output, readable unless full."""
        if not side.connected:
            return selectors.EVENT_WRITE
        events = selectors.EVENT_WRITE if side.outgoing else 0
        peer = pair.peer(side)
        if peer is None or len(peer.outgoing) < BUFFER_LIMIT:
            events |= selectors.EVENT_READ
        return events or selectors.EVENT_READ

    def _watch(self, side: _Side) -> None:
        pair, _ = self._pairs[side.sock]
        self._selector.modify(side.sock, self._events(pair, side))

    def _service(self, sock: socket.socket, events: int) -> None:
        pair, side = self._pairs[sock]
        try:
            if not side.connected:
                error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if error:
                    raise ConnectionRefusedError(error)
                side.connected = True
            elif events & selectors.EVENT_READ and not self._read(pair, side):
                return
            if side.outgoing and self._mode is Mode.PASS:
                sent = sock.send(side.outgoing)
                del side.outgoing[:sent]
                self.forwarded += sent
        except BlockingIOError:
            pass
        except OSError:
            self._drop(pair, rst=True)
            return
        for each in pair.sides():
            self._watch(each)

    def _read(self, pair: _Pair, side: _Side) -> bool:
        """Read what `side` sent and queue it for its peer; False if the pair is gone."""
        data = side.sock.recv(_CHUNK)
        if not data:  # EOF: pass it on by closing both, as this proxy keeps no half-open state
            self._drop(pair, rst=False)
            return False
        peer = pair.peer(side)
        if self._mode is Mode.PASS and peer is not None:
            peer.outgoing += data
        return True

    def _drop(self, pair: _Pair, *, rst: bool) -> None:
        self._held.discard(pair)
        for side in pair.sides():
            if self._pairs.pop(side.sock, None) is not None:
                self._selector.unregister(side.sock)
                _close(side.sock, rst=rst)

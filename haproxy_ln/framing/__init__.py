"""Wire framing and session tracking: C when built, else the Python twins.

`DEFAULT` is the implementation in use (the C one when built); `NATIVE` says
which, and `native_problem` why the C one is missing. Set HAPROXY_LN_PURE=1 to force
the twin (the tests drive both explicitly). Both satisfy `FramerAPI`.
"""

import os
from dataclasses import dataclass
from typing import Protocol, cast

from haproxy_ln.framing.pure import PyFramer, PyPool
from haproxy_ln.pgwire.session import Session as PySession


class FramerAPI(Protocol):
    """What the proxy uses of a framer; see pure.PyFramer for each method."""

    def recv(self, fd: int) -> int: ...
    def next(self) -> int: ...
    def message(self) -> memoryview: ...
    def accept(self) -> None: ...
    def drop(self) -> None: ...
    def send(self, fd: int) -> int: ...
    def discard(self) -> None: ...
    def pending(self) -> int: ...
    def at_boundary(self) -> bool: ...
    def expect_untyped(self) -> None: ...
    def close(self) -> None: ...


@dataclass(frozen=True)
class Implementation:
    """A matching set of pool, framer and session classes."""

    name: str
    Pool: type[PyPool]
    Framer: type[PyFramer]
    Session: type[PySession]
    native: bool  # C structures the relay thread can run


PURE = Implementation("pure-Python", PyPool, PyFramer, PySession, native=False)
NATIVE_IMPL: Implementation | None = None
native_problem: str | None = None

if os.environ.get("HAPROXY_LN_PURE") == "1":
    native_problem = "disabled by HAPROXY_LN_PURE=1"
else:
    try:
        from haproxy_ln.framing.native import CFramer, CPool, CSession
    except ImportError as e:
        native_problem = f"C extension not importable: {e}"
    else:
        # The C classes mirror the Python ones method for method (the tests
        # hold them to identical behaviour), so they stand in for them.
        NATIVE_IMPL = Implementation(
            "native C",
            cast(type[PyPool], CPool),
            cast(type[PyFramer], CFramer),
            cast(type[PySession], CSession),
            native=True,
        )

DEFAULT = NATIVE_IMPL or PURE
NATIVE = NATIVE_IMPL is not None

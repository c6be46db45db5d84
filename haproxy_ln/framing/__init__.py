"""Wire framing: the C framer when built, else its pure-Python twin.

`Pool` and `Framer` are the implementation in use; `NATIVE` says which, and
`native_problem` why the C one is missing. Set HAPROXY_LN_PURE=1 to force
the twin (the tests drive both explicitly). Both satisfy `FramerAPI`.
"""

import os
from typing import Protocol

from haproxy_ln.framing.pure import PyFramer, PyPool


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


Pool: type[PyPool]
Framer: type[PyFramer]
native_problem: str | None

if os.environ.get("HAPROXY_LN_PURE") == "1":
    Pool, Framer, native_problem = PyPool, PyFramer, "disabled by HAPROXY_LN_PURE=1"
else:
    try:
        from haproxy_ln.framing.native import CFramer, CPool
    except ImportError as e:
        Pool, Framer, native_problem = PyPool, PyFramer, f"C extension not importable: {e}"
    else:
        Pool, Framer, native_problem = CPool, CFramer, None  # type: ignore[assignment]

NATIVE = native_problem is None

"""Wire framing and session tracking: C when built, else the Python twins.

`Pool`, `Framer` and `Session` are the implementations in use; `NATIVE` says which, and
`native_problem` why the C one is missing. Set HAPROXY_LN_PURE=1 to force
the twin (the tests drive both explicitly). Both satisfy `FramerAPI`.
"""

import os
from typing import Protocol

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


Pool: type[PyPool]
Framer: type[PyFramer]
Session: type[PySession]
native_problem: str | None

if os.environ.get("HAPROXY_LN_PURE") == "1":
    Pool, Framer, Session = PyPool, PyFramer, PySession
    native_problem = "disabled by HAPROXY_LN_PURE=1"
else:
    try:
        from haproxy_ln.framing.native import CFramer, CPool, CSession
    except ImportError as e:
        Pool, Framer, Session = PyPool, PyFramer, PySession
        native_problem = f"C extension not importable: {e}"
    else:
        Pool, Framer, Session = CPool, CFramer, CSession  # type: ignore[assignment]
        native_problem = None

NATIVE = native_problem is None

"""Wire framing: the C framer when built, else its pure-Python twin.

`Pool` and `Framer` are the implementation in use; `NATIVE` says which, and
`native_problem` why the C one is missing. Set HAPROXY_LN_PURE=1 to force
the twin (the tests drive both explicitly).
"""

import os

from haproxy_ln.framing.pure import PyFramer, PyPool

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

"""Per-connection session state, sans-IO: whole messages in, verdicts out.

How this works: the proxy shell hands every held client message to
`client_message` before forwarding it, and the backend's ReadyForQuery,
BackendKeyData and CopyInResponse to `server_message`. The session keeps
the requests that PostgreSQL has not answered yet as *groups*, oldest first:
a simple Query is one group; extended-protocol messages up to and including
Sync are one group. Each ReadyForQuery answers the oldest group and tells
the transaction status (`I`, `T`, `E`).

For every group the session decides, conservatively, whether executing it
*could commit a transaction*: a COMMIT-like statement anywhere in it, or
any execution that starts outside a transaction block (autocommit). While
such a group is in flight a cancel could release PostgreSQL's wait for the
synchronous standby, which commits locally without the replica, so
`cancel_is_safe` is False. Once a group's triggering message (the Query, the
Sync, or an Execute of a COMMIT) has been fully sent (`flushed`), the
backend may be inside that wait, so `must_keep_backend` says the backend
connection must stay open until the answer arrives, whoever disconnects.

It also refuses SQL that lowers synchronous_commit: the message is replaced
by a statement that makes PostgreSQL itself raise our error, so the error
arrives in order with pipelined answers and the transaction status moves
exactly as for any failing statement.
"""

from collections import deque
from dataclasses import dataclass
from typing import Protocol

from haproxy_ln.errors import ProtocolViolation
from haproxy_ln.pgwire import messages, sql

# Names of statements and portals whose text may commit are remembered, up to
# MAX_TRACKED_NAMES of each and MAX_TRACKED_NAME bytes long; past either
# bound every named statement is assumed to commit (safe, bounded memory).
MAX_TRACKED_NAMES = 16
MAX_TRACKED_NAME = 63
# Requests in flight at most: the pumps stop reading a client that pipelines
# more until answers come back, so a session's memory stays bounded.
MAX_IN_FLIGHT = 64

DURABILITY_SQLSTATE = "42501"
DURABILITY_HINT = (
    "haproxy-ln keeps every commit waiting until the standby has it, so a failover "
    "cannot roll channel state back; remove this setting from the daemon's "
    "database configuration."
)

_UNKNOWN = sql.COMMITS | sql.TXN_CONTROL

QUERY_UNTERMINATED = "Query is not terminated by a zero byte"
CLOSE_TOO_SHORT = "Close message is too short"
CLOSE_UNKNOWN_KIND = "Close message names unknown kind 0x{:02x}"
MALFORMED_RFQ = "malformed ReadyForQuery"


@dataclass
class _Group:
    start: bytes | None  # transaction status when it begins executing, if known
    flags: int = 0  # sql.COMMITS / sql.TXN_CONTROL of what it executes
    executes: bool = False  # runs a statement or function call
    closed: bool = False  # ends with Sync/Query: a ReadyForQuery will answer it
    triggered: bool = False  # holds a message that may start a commit
    armed: bool = False  # that message has been fully sent to PostgreSQL

    @property
    def could_commit(self) -> bool:
        if self.flags & sql.COMMITS:
            return True
        return self.executes and self.start not in (b"T", b"E")


class Session:
    """Transaction and request tracking for one client connection."""

    def __init__(self, proxy_secret: bytes | None = None) -> None:
        self.status = b"I"
        self.ready = False  # the first ReadyForQuery has arrived
        self.copy_in = False  # PostgreSQL is waiting for COPY data from us
        self.terminated = False  # the client sent Terminate
        self.answered = 0  # ReadyForQuery messages seen
        self.backend_key: tuple[int, bytes] | None = None
        self.proxy_secret = proxy_secret
        self._groups: deque[_Group] = deque()
        self._statements: dict[bytes, int] = {}
        self._portals: dict[bytes, int] = {}
        self._names_overflow = False

    # -- what the shell asks -----------------------------------------------

    @property
    def in_flight(self) -> int:
        """Requests sent (or being sent) that PostgreSQL has not answered."""
        return len(self._groups)

    @property
    def full(self) -> bool:
        """MAX_IN_FLIGHT requests are unanswered: read no more client messages."""
        return len(self._groups) >= MAX_IN_FLIGHT

    def cancel_is_safe(self) -> bool:
        """No request in flight could be waiting for the synchronous standby."""
        return not any(g.could_commit for g in self._groups)

    def must_keep_backend(self) -> bool:
        """A commit may be waiting for the standby inside the backend now."""
        return not self.copy_in and any(g.armed and g.could_commit for g in self._groups)

    def flushed(self) -> None:
        """Everything passed to client_message so far has reached PostgreSQL."""
        for g in self._groups:
            if g.triggered:
                g.armed = True

    # -- client messages -----------------------------------------------------

    def client_message(self, msg: bytes | memoryview) -> bytes | None:
        """Track one whole client message; returns its replacement, or None.

        Raises ProtocolViolation when the message contents are malformed.
        """
        t = msg[0]
        if t == ord("Q"):
            if msg[-1] != 0:
                raise ProtocolViolation(QUERY_UNTERMINATED)
            flags = sql.classify(msg[5:-1])
            g = self._new_group(flags)
            g.executes = g.closed = g.triggered = True
            if flags & sql.MENTIONS_SYNC_COMMIT:
                return durability_replacement(msg)
        elif t == ord("P"):
            name, i = messages.name_at(msg, 5)
            text, _ = messages.cstring(msg, i)
            flags = sql.classify(text)
            self._remember(self._statements, name, flags)
            self._open_group()
            if flags & sql.MENTIONS_SYNC_COMMIT:
                return durability_replacement(msg)
        elif t == ord("B"):
            portal, i = messages.name_at(msg, 5)
            statement, _ = messages.name_at(msg, i)
            self._remember(self._portals, portal, self._flags_of(self._statements, statement))
            self._open_group()
        elif t == ord("E"):
            portal, _ = messages.name_at(msg, 5)
            g = self._open_group()
            g.executes = True
            g.flags |= self._flags_of(self._portals, portal)
            g.triggered = g.triggered or bool(g.flags & sql.COMMITS)
        elif t == ord("F"):
            g = self._open_group()
            g.executes = True
            g.flags |= sql.TXN_CONTROL
        elif t == ord("S"):
            g = self._open_group()
            g.closed = g.triggered = True
        elif t == ord("C"):
            self._close_name(msg)
        elif t in (ord("c"), ord("f")):
            self.copy_in = False
        elif t == ord("X"):
            self.terminated = True
        return None

    def _new_group(self, flags: int) -> _Group:
        known = not self._groups or not any(g.flags & sql.TXN_CONTROL for g in self._groups)
        g = _Group(start=self.status if known else None, flags=flags)
        self._groups.append(g)
        return g

    def _open_group(self) -> _Group:
        if self._groups and not self._groups[-1].closed:
            return self._groups[-1]
        return self._new_group(0)

    def _flags_of(self, names: dict[bytes, int], name: bytes) -> int:
        if name and self._names_overflow:
            return _UNKNOWN
        return names.get(name, 0)

    def _remember(self, names: dict[bytes, int], name: bytes, flags: int) -> None:
        flags &= sql.COMMITS | sql.TXN_CONTROL
        if not flags:
            names.pop(name, None)
        elif name in names or (len(names) < MAX_TRACKED_NAMES and len(name) <= MAX_TRACKED_NAME):
            names[name] = flags
        else:
            self._names_overflow = True
            names.clear()

    def _close_name(self, msg: bytes | memoryview) -> None:
        if len(msg) < 7:
            raise ProtocolViolation(CLOSE_TOO_SHORT)
        kind = msg[5]
        name, _ = messages.name_at(msg, 6)
        if kind == ord("S"):
            self._statements.pop(name, None)
        elif kind == ord("P"):
            self._portals.pop(name, None)
        else:
            raise ProtocolViolation(CLOSE_UNKNOWN_KIND.format(kind))

    # -- server messages -----------------------------------------------------

    def server_message(self, msg: bytes | memoryview) -> bytes | None:
        """Track one held server message; returns its replacement, or None.

        Raises ProtocolViolation when the message contents are malformed.
        """
        t = msg[0]
        if t == ord("Z"):
            if len(msg) != 6 or msg[5] not in b"ITE":
                raise ProtocolViolation(MALFORMED_RFQ)
            self.status = bytes(msg[5:6])
            self.ready = True
            self.copy_in = False
            self.answered += 1
            if self._groups and self._groups[0].closed:
                self._groups.popleft()
        elif t == ord("K"):
            return remap_backend_key(self, msg)
        elif t in (ord("G"), ord("W")):
            self.copy_in = True
        return None


class KeyHolder(Protocol):
    backend_key: tuple[int, bytes] | None
    proxy_secret: bytes | None


def remap_backend_key(session: KeyHolder, msg: bytes | memoryview) -> bytes | None:
    """Record the backend's key; the client gets the proxy's secret instead.

    The pid stays the backend's own, so clients still recognise their own
    notifications and pg_backend_pid(); only the secret, which would let a
    client cancel behind the proxy's back, is replaced.
    """
    session.backend_key = messages.parse_backend_key_data(msg)
    if session.proxy_secret is None:
        return None
    return messages.backend_key_data(session.backend_key[0], session.proxy_secret)


def durability_replacement(msg: bytes | memoryview) -> bytes | None:
    """For a Query or Parse naming synchronous_commit: its refusal, if it lowers it."""
    if msg[0] == ord("Q"):
        name, text = None, bytes(msg[5:-1])
    else:
        name, i = messages.name_at(msg, 5)
        text, _ = messages.cstring(msg, i)
    problem = sql.durability_violation(text.decode(errors="replace"))
    if problem is None:
        return None
    if name is None:
        return messages.query(_refusal(problem))
    return messages.parse(name, _refusal(problem))


def _refusal(problem: str) -> str:
    """A statement that makes PostgreSQL raise our refusal in order."""
    text = f"haproxy-ln refused this statement: {problem}".replace("$", "").replace("'", "''")
    hint = DURABILITY_HINT.replace("'", "''")
    return (
        "DO $haproxy_ln$BEGIN RAISE EXCEPTION USING "
        f"ERRCODE = '{DURABILITY_SQLSTATE}', MESSAGE = '{text}', HINT = '{hint}'; "
        "END$haproxy_ln$"
    )

"""The gate: whether this node admits database clients right now.

The HA loop opens it only while this node holds the lease and its replica
is caught up; closing it turns new clients away with SQLSTATE 57P03 and
terminates every admitted client at once with 57P01, each time with the
reason and, when known, the node that is active instead.

A hold (`hold(key, reason)`) also turns new clients away, but leaves the
admitted ones alone: the replicator holds the gate from the moment its
stream from the local PostgreSQL breaks until the replica has everything
up to the WAL end it finds on reconnecting, because a restarted PostgreSQL
may show commits that never reached the replica (invariant 5). Clients
admitted before the break are not at risk: their backends did not restart.

While open, the gate also carries the leader's self-fence deadline
(`expires_at`, monotonic seconds): past it no client is admitted, even if
the HA loop has not run yet (after the process was paused, say), so the
gate never outlives the lease that justified opening it (invariant 1).
"""

import time
from typing import Protocol

from haproxy_ln.pgwire import messages


class Terminable(Protocol):
    def terminate(self, error: bytes) -> None: ...


class Gate:
    """Admission control shared by every client connection of a proxy."""

    def __init__(self, *, is_open: bool, reason: str = "starting") -> None:
        self._open = is_open
        self.reason = reason
        self.active_node: str | None = None
        self._members: set[Terminable] = set()
        self._holds: dict[str, str] = {}
        self.expires_at: float | None = None

    @property
    def opened(self) -> bool:
        """Whether the HA loop has opened the gate (holds and expiry aside)."""
        return self._open

    @property
    def is_open(self) -> bool:
        """Whether a client arriving now is admitted."""
        expired = self.expires_at is not None and time.monotonic() >= self.expires_at
        return self._open and not self._holds and not expired

    def hold(self, key: str, reason: str) -> None:
        """Turn new clients away for `reason` until `release(key)`."""
        self._holds[key] = reason

    def release(self, key: str) -> None:
        self._holds.pop(key, None)

    def open(self) -> None:
        self._open = True
        self.reason = "open"
        self.active_node = None

    def close(self, reason: str, active_node: str | None = None) -> None:
        """Stop admitting and terminate every admitted connection at once."""
        self._open = False
        self.reason = reason
        self.active_node = active_node
        error = messages.error_response(
            "57P01", self._describe("terminated by haproxy-ln"), fatal=True
        )
        for member in list(self._members):
            member.terminate(error)

    def refusal(self) -> bytes:
        """The ErrorResponse for a client that arrives while the gate is closed."""
        return messages.error_response(
            "57P03", self._describe("haproxy-ln is not admitting connections"), fatal=True
        )

    def _describe(self, what: str) -> str:
        if not self._open:
            reason = self.reason
        elif self._holds:
            reason = "; ".join(self._holds.values())
        else:
            reason = "the lease that made this node active could not be renewed in time"
        text = f"{what}: {reason}"
        if self.active_node:
            text += f"; the active node is {self.active_node}"
        return text

    def admit(self, member: Terminable) -> bool:
        """Register an admitted connection; False when the gate is closed."""
        if not self.is_open:
            return False
        self._members.add(member)
        return True

    def leave(self, member: Terminable) -> None:
        self._members.discard(member)

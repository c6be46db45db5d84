"""The gate: whether this node admits database clients right now.

The HA loop opens it only while this node holds the lease and its replica
is caught up; closing it turns new clients away with SQLSTATE 57P03 and
terminates every admitted client at once with 57P01, each time with the
reason and, when known, the node that is active instead.
"""

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

    @property
    def is_open(self) -> bool:
        return self._open

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
        text = f"{what}: {self.reason}"
        if self.active_node:
            text += f"; the active node is {self.active_node}"
        return text

    def admit(self, member: Terminable) -> bool:
        """Register an admitted connection; False when the gate is closed."""
        if not self._open:
            return False
        self._members.add(member)
        return True

    def leave(self, member: Terminable) -> None:
        self._members.discard(member)

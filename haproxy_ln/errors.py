"""The error tree.

Errors split as in h11: the peer broke the protocol (`ProtocolViolation`), or
we did (`FramerMisuse`, a bug). Every message says what was wrong in terms an
operator can act on; none ever carries a secret.
"""


class HaproxyLnError(Exception):
    """Base of every error haproxy-ln raises on purpose."""


class ConfigError(HaproxyLnError):
    """The configuration file is unreadable or invalid; `problems` lists each."""

    def __init__(self, path: str, problems: list[str]) -> None:
        self.path = path
        self.problems = problems
        super().__init__(f"{path}: " + "; ".join(problems))


class ProtocolViolation(HaproxyLnError):
    """A peer sent bytes that are not valid PostgreSQL wire protocol."""


class BufferBudgetExhausted(HaproxyLnError):
    """The proxy's shared buffer budget cannot fit one more buffer."""


class ListenError(HaproxyLnError):
    """An address to serve on cannot be bound: in use, not local, or not permitted."""


class FramerMisuse(RuntimeError):
    """The framer was driven out of order: a bug in haproxy-ln, not the peer."""


class ReplicationError(HaproxyLnError):
    """Replication cannot go on as configured; the message says what to do."""


class SetupError(ReplicationError):
    """Replication cannot start and will not by retrying: an operator must act."""


class ServerError(ReplicationError):
    """PostgreSQL answered a replication or bootstrap command with an ErrorResponse."""

    def __init__(self, sqlstate: str, message: str, detail: str | None = None) -> None:
        self.sqlstate = sqlstate
        self.detail = detail
        super().__init__(f"{message} (SQLSTATE {sqlstate})")


class StaleEpoch(SetupError):
    """The replica store's fence is above the writer's epoch: a newer leader exists."""

    def __init__(self, writer_epoch: int, fence_epoch: int) -> None:
        self.writer_epoch = writer_epoch
        self.fence_epoch = fence_epoch
        super().__init__(
            f"the replica store is fenced at epoch {fence_epoch}; this writer's epoch "
            f"{writer_epoch} is stale, so a newer leader exists and nothing was applied"
        )


class CoordError(HaproxyLnError):
    """etcd refused a request (credentials, permissions, a value we cannot read)."""


class CoordUnavailable(CoordError):
    """No etcd endpoint answered within the request timeout, or none could be reached."""


class LeaseLost(CoordError):
    """The etcd lease has expired or was revoked: nothing attached to it exists any more."""


class KeyCustodyError(HaproxyLnError):
    """Keys cannot be opened, materialized or destroyed as configured; never holds secret bytes."""


class SealedFileError(KeyCustodyError):
    """A sealed secret file cannot be opened: unreadable, not sealed, wrong KEK, or altered."""

    def __init__(self, path: str, problem: str) -> None:
        self.path = path
        self.problem = problem
        super().__init__(f"sealed file {path}: {problem}")


class LndError(KeyCustodyError):
    """lnd answered its gRPC interface with an error, or the answer made no sense."""


class LndUnreachable(LndError):
    """lnd's gRPC interface did not answer: not running, not listening yet, or hung."""


class WrongWalletPassword(LndError):
    """lnd refused the wallet password: its wallet stays locked."""


class DaemonFailed(HaproxyLnError):
    """The Lightning daemon did not start, stop or die as asked; the message says why."""


class SimulatorError(HaproxyLnError):
    """The Lightning daemon simulator cannot start, or must stop as a real daemon would."""


class DataVersionConflict(SimulatorError):
    """The simulator's optimistic data_version check failed: another writer got in."""


class DatabaseLost(SimulatorError):
    """The simulator lost its database connection (a real daemon crashes then)."""

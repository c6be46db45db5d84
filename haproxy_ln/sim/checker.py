"""The checker: were acknowledged channel states lost, or acknowledged twice differently?

How this works: every `ack` line in the journals is a state some run of the
simulated daemon told its peer about: (mode, channel, commitment number, HTLC
digest). Afterwards the database of whichever node is active is read once,
in one snapshot: each channel's current commitment number and the HTLC
digest of every commitment it keeps a record of (cln: `commitment_secrets`;
lnd: the channel's revocation log). Then, purely (`compare`):

- an acknowledged state is **lost** when the channel is missing, its current
  commitment number is below the acknowledged one, or the record of that
  commitment is missing or has another HTLC digest. A daemon restarted on
  that database would sign an older (revoked) state: its peer could take the
  whole channel.
- a (channel, commitment number) acknowledged with two different digests,
  in one journal or across several (runs before and after a failover, on two
  nodes), is a **split brain**: two daemons signed different states at the
  same height.

`unknown` lines (COMMIT outcome unknown) are counted apart and are neither.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import psycopg

from haproxy_ln.errors import SimulatorError
from haproxy_ln.sim import cln, lnd
from haproxy_ln.sim.db import connect, describe_target, first_line
from haproxy_ln.sim.journal import JournalRecord, read_journal
from haproxy_ln.sim.model import ChannelHistory

__all__ = ["CheckResult", "Finding", "check", "compare", "read_databases"]

LOST = "lost"
SPLIT_BRAIN = "split_brain"


@dataclass(frozen=True, slots=True)
class Finding:
    """One lost write or split brain, at one (mode, channel, commitment)."""

    kind: str  # LOST or SPLIT_BRAIN
    mode: str
    channel: str  # hex
    commitment: int
    message: str


@dataclass(frozen=True, slots=True)
class CheckResult:
    """acked: distinct acknowledged states; lost: those the database does not hold;
    split_brain: (channel, commitment) pairs acknowledged with different HTLC sets."""

    acked: int
    unknown: int
    lost: int
    split_brain: int
    details: tuple[Finding, ...]

    @property
    def ok(self) -> bool:
        return self.lost == 0 and self.split_brain == 0

    def to_dict(self) -> dict[str, object]:
        return {
            "ok": self.ok,
            "acked": self.acked,
            "unknown": self.unknown,
            "lost": self.lost,
            "split_brain": self.split_brain,
            "details": [
                {
                    "kind": f.kind,
                    "mode": f.mode,
                    "channel": f.channel,
                    "commitment": f.commitment,
                    "message": f.message,
                }
                for f in self.details
            ],
        }


def _who(records: list[JournalRecord]) -> str:
    return ", ".join(sorted({f"{r.node} (run {r.run})" for r in records}))


def compare(
    records: Iterable[JournalRecord], databases: Mapping[str, Mapping[bytes, ChannelHistory]]
) -> CheckResult:
    """Check the acknowledged states in `records` against `databases` (mode -> channels)."""
    acked: dict[tuple[str, bytes, int], dict[bytes, list[JournalRecord]]] = {}
    unknown: set[tuple[str, bytes | None, int | None, bytes | None]] = set()
    for r in records:
        if r.kind == "unknown":
            unknown.add((r.mode, r.channel, r.commitment, r.htlcs))
        elif r.kind == "ack":
            assert r.channel is not None and r.commitment is not None and r.htlcs is not None
            acked.setdefault((r.mode, r.channel, r.commitment), {}).setdefault(r.htlcs, []).append(
                r
            )
    findings: list[Finding] = []
    lost = 0
    for (mode, channel, commitment), states in sorted(acked.items()):
        where = f"channel {channel.hex()[:16]} commitment {commitment}"
        if len(states) > 1:
            told = "; ".join(
                f"htlcs {d.hex()[:16]} by {_who(rs)}" for d, rs in sorted(states.items())
            )
            findings.append(
                Finding(
                    SPLIT_BRAIN,
                    mode,
                    channel.hex(),
                    commitment,
                    f"{where} was acknowledged with {len(states)} different HTLC sets: {told}",
                )
            )
        history = databases.get(mode, {}).get(channel)
        for digest, rs in sorted(states.items()):
            problem = _missing(history, commitment, digest)
            if problem is not None:
                lost += 1
                findings.append(
                    Finding(
                        LOST,
                        mode,
                        channel.hex(),
                        commitment,
                        f"{where} (htlcs {digest.hex()[:16]}, acknowledged by {_who(rs)}) "
                        f"is lost: {problem}",
                    )
                )
    return CheckResult(
        acked=sum(len(states) for states in acked.values()),
        unknown=len(unknown),
        lost=lost,
        split_brain=sum(1 for states in acked.values() if len(states) > 1),
        details=tuple(sorted(findings, key=lambda f: (f.kind, f.mode, f.channel, f.commitment))),
    )


def _missing(history: ChannelHistory | None, commitment: int, digest: bytes) -> str | None:
    """Why the database does not hold this acknowledged state, or None if it does."""
    if history is None:
        return "the channel is not in the database"
    if history.commitment < commitment:
        return f"the database is at commitment {history.commitment}"
    kept = history.digests.get(commitment)
    if kept is None:
        return "the database has no record of that commitment"
    if kept != digest:
        return f"the database has htlcs {kept.hex()[:16]} for that commitment"
    return None


def read_databases(dsn: str, timeout: float = 5.0) -> dict[str, dict[bytes, ChannelHistory]]:
    """Each mode's channels in the database at `dsn`, read in one snapshot.

    Raises SimulatorError (DatabaseLost if it cannot be reached).
    """
    conn = connect(dsn, application_name="haproxy-ln-sim-check", timeout=timeout, prepare=False)
    try:
        conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        found = {"cln": cln.read_history(conn), "lnd": lnd.read_history(conn)}
        conn.execute("COMMIT")
        return found
    except psycopg.Error as e:
        raise SimulatorError(
            f"cannot read the channels in {describe_target(dsn)}: {first_line(e)}"
        ) from None
    finally:
        conn.close()


def check(journals: Sequence[Path], dsn: str, timeout: float = 5.0) -> CheckResult:
    """Compare the journals with the database at `dsn` (the node active now).

    Raises SimulatorError if a journal or the database cannot be read.
    """
    records = [r for path in journals for r in read_journal(path)]
    return compare(records, read_databases(dsn, timeout))

"""Whether a node that holds nothing may take the leader key (invariant 2: no rollback).

How this works: every leader writes the sync record for its own epoch (naming
nobody) before it acknowledges any commit, and names its replica only once
PostgreSQL waits for it. So the record always describes the newest epoch in
which anything was acknowledged, and a node may take over when it provably
holds every acknowledged commit of that epoch:

1. no sync record was ever written: a brand-new pair, whoever takes the key first leads;
2. the record names this node, for an epoch no older than any this node knows of;
3. this node itself led the newest epoch it knows of (its own store was the primary
   then, e.g. a leader that ran alone and restarted): its store has everything;
4. an operator forces it, with the data-loss flag, naming the newest epoch.

A fresh successor record (planned switchover) naming another node makes every
other node wait for that one, so the old leader does not take the key back.
"""

from __future__ import annotations

from dataclasses import dataclass

from haproxy_ln.ha.model import Snapshot

__all__ = ["Verdict", "may_promote", "newest_epoch"]


@dataclass(frozen=True, slots=True)
class Verdict:
    """Whether promoting is allowed, and why (a stable sentence)."""

    allowed: bool
    reason: str


def newest_epoch(snapshot: Snapshot, highest_seen: int) -> int:
    """The newest epoch this node knows of: leader keys seen, sync record, own store's fence."""
    epochs = [highest_seen]
    if snapshot.sync_record is not None:
        epochs.append(snapshot.sync_record.epoch)
    if snapshot.store_fence is not None:
        epochs.append(snapshot.store_fence.epoch)
    return max(epochs)


def _refusal(snapshot: Snapshot, newest: int) -> str:
    record = snapshot.sync_record
    assert record is not None  # no record allows promotion
    if record.node is None:
        return f"waiting: sync record names no node for epoch {record.epoch}"
    if record.node != snapshot.node:
        return f"waiting: sync record names {record.node} for epoch {record.epoch}, not us"
    return f"waiting: sync record names us for epoch {record.epoch}, but epoch {newest} is newer"


def may_promote(snapshot: Snapshot, highest_seen: int) -> Verdict:
    """Whether this node may try to take the (absent) leader key now. Raises nothing."""
    me = snapshot.node
    newest = newest_epoch(snapshot, highest_seen)
    successor = snapshot.successor
    if successor is not None and successor.after_epoch >= newest and successor.node != me:
        return Verdict(
            False, f"waiting: epoch {successor.after_epoch} was handed over to {successor.node}"
        )
    record = snapshot.sync_record
    if record is None:
        return Verdict(True, "no sync record: a new pair, the first node to take the key leads")
    if record.node == me and record.epoch >= newest:
        return Verdict(True, f"sync record names us for epoch {record.epoch}")
    fence = snapshot.store_fence
    if fence is not None and fence.node == me and fence.epoch >= newest:
        return Verdict(True, f"this node led epoch {fence.epoch}, the newest: it has every commit")
    refusal = _refusal(snapshot, newest)
    force = snapshot.force_promotion
    if force is None:
        return Verdict(False, refusal)
    if not force.accept_data_loss:
        return Verdict(False, f"{refusal}; forced promotion needs the data-loss flag")
    if force.epoch != newest:
        return Verdict(
            False,
            f"{refusal}; forced promotion names epoch {force.epoch}, the newest is {newest}",
        )
    return Verdict(
        True,
        f"forced by the operator, who accepted data loss ({refusal.removeprefix('waiting: ')})",
    )

"""The replicator: the local primary's committed changes, made durable on the peer.

How this works: a session connects to the local primary over the
replication protocol (walsender.py), bootstraps the primary and seeds the
replica store if it is empty (store.copy; both asyncpg, through
store.bridge), then opens an apply session to the replica store (our own
pgwire client, so the commit path crosses no bridge) and starts streaming
from the position the replica store holds. Four tasks then share the session:

- the reader decodes XLogData into pgoutput messages, assembles one Record
  per source transaction and queues it; keepalives tell `Confirmation`
  how far the server vouches, and are answered at once when asked;
- the applier takes everything queued (group commit: commits that arrive
  while the replica is busy form the next batch), applies it in one replica
  transaction, and only then confirms the new position upstream, which
  releases the commits waiting in PostgreSQL's synchronous replication;
- a watcher ends the session when an apply stalls (`_watch_apply`);
- a ticker confirms the position every second so the server keeps the
  stream open, and has the applier ping the replica store when nothing was
  applied for a second, so an idle replicator notices a lost replica.

Any failure ends the session; `run` starts a new one after a short backoff.
A stale epoch (the replica store is fenced above ours) is final: it means a
newer leader exists, and replicating on would be wrong.

From the moment a session ends until a new one has confirmed everything up
to the WAL end the server reported on reconnecting, the replicator holds
the gate (new database clients are turned away): the local PostgreSQL may
have restarted and show commits the replica lacks (invariant 5).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import trio

from haproxy_ln import metrics
from haproxy_ln.config import ReplicationConfig
from haproxy_ln.errors import ProtocolViolation, ReplicationError, SetupError
from haproxy_ln.pgwire.dsn import PgTarget
from haproxy_ln.pgwire.sql import quote_literal
from haproxy_ln.proxy.gate import Gate
from haproxy_ln.replication import pgoutput, stream
from haproxy_ln.replication.record import Assembler, Record
from haproxy_ln.replication.stream import Confirmation, format_lsn, parse_lsn
from haproxy_ln.replicator.pgclient import PgConnection
from haproxy_ln.replicator.walsender import WalSenderConnection
from haproxy_ln.store import bridge, primary
from haproxy_ln.store.apply import Applier
from haproxy_ln.store.copy import CopyProgress, ReplicaStatus, initial_copy, replica_status
from haproxy_ln.store.schema import PUBLICATION, SCHEMA

log = logging.getLogger(__name__)

GATE_KEY = "replicator"
STATUS_INTERVAL = 1.0
PRUNE_INTERVAL = 60.0
QUEUE_RECORDS = 10_000
# The apply session: values parse as the stream prints them, no trigger or rule of
# the daemon's fires, our DDL trigger skips us, type names come qualified.
APPLY_SETTINGS = {
    **bridge.SESSION_SETTINGS,
    "search_path": "pg_catalog",
    "session_replication_role": "replica",
}
BACKOFF_MIN, BACKOFF_MAX = 0.1, 2.0
# Retried after a backoff. A database that refuses (a full disk, crash recovery, an
# administrator's shutdown) is among them: it escaped the replicator and ended the
# whole agent (found by the chaos suite, fill-standby-disk).
_TRANSIENT = (
    ReplicationError,
    ProtocolViolation,
    OSError,
    trio.BrokenResourceError,
    bridge.PostgresError,
    *bridge.CONNECTION_LOST,
)


def targets(config: ReplicationConfig) -> tuple[PgTarget, PgTarget]:
    """(source, replica) with their passwords. Raises SetupError without a replica."""
    replica = config.replica_target()
    if replica is None:
        raise SetupError("[replication] replica is not set: nowhere to replicate to")
    return config.source_target(), replica


@dataclass
class ReplicatorStatus:
    streaming: bool = False
    durable_lsn: int = 0
    caught_up: bool = False
    transactions: int = 0
    batches: int = 0
    last_error: str | None = None


class Replicator:
    """Replicates the local primary to the replica store until cancelled."""

    def __init__(
        self,
        config: ReplicationConfig,
        *,
        node: str,
        epoch: int,
        gate: Gate | None = None,
        progress: CopyProgress | None = None,
    ) -> None:
        """Raises SetupError when `config` names no replica store."""
        self.config = config
        self.node = node
        self.epoch = epoch
        self.gate = gate
        # Whether the replica's completeness protects the gate (invariant 5). The HA
        # loop clears it while the pair runs degraded: the node then serves alone, and
        # holding the gate for an unreachable replica would only stop the service.
        self.guards_gate = True
        self.progress = progress
        self.status = ReplicatorStatus()
        self._sent = -1
        self._catch_up_to = 0  # WAL end the server reported when this session began
        self._applying_since: float | None = None  # trio time the running apply began
        self._source, self._replica = targets(config)

    def _hold(self, reason: str) -> None:
        self.status.caught_up = False
        if self.gate is not None and self.guards_gate:
            self.gate.hold(GATE_KEY, reason)

    def stop_guarding(self) -> None:
        """Let the gate go: the pair runs degraded (see `guards_gate`)."""
        self.guards_gate = False
        if self.gate is not None:
            self.gate.release(GATE_KEY)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Replicate until cancelled; `task_status.started()` once streaming.

        Raises SetupError (StaleEpoch among them) for what retrying cannot
        fix: bad settings, a diverged replica, a newer leader. Everything
        else (a database restarting, a network break) is retried.
        """
        backoff = BACKOFF_MIN
        started = False

        def on_streaming() -> None:
            nonlocal started, backoff
            backoff = BACKOFF_MIN
            if not started:
                started = True
                task_status.started()

        while True:
            self._hold("the replicator is (re)connecting to the local PostgreSQL")
            try:
                await self._session(on_streaming)
            except* SetupError:
                raise
            except* _TRANSIENT as group:
                error = _first_leaf(group)
                self.status.last_error = str(error)
                log.warning("replication interrupted: %s; retrying in %.1f s", error, backoff)
            finally:
                self.status.streaming = False
            await trio.sleep(backoff)
            backoff = min(backoff * 2, BACKOFF_MAX)

    async def _session(self, on_streaming: Callable[[], None]) -> None:
        source, replica = self._source, self._replica
        timeout = self.config.connect_timeout
        wal = await WalSenderConnection.open(source, self.config.sync_name, timeout=timeout)
        try:
            system = await wal.identify_system()
            self._catch_up_to = parse_lsn(system.wal_flush)
            # Bootstrap must not wait for a replicator that is not streaming yet: us.
            conn = await bridge.connect(
                source, timeout=timeout, settings={"synchronous_commit": "local"}
            )
            try:
                await bridge.call(primary.bootstrap, conn)
            finally:
                await bridge.close(conn)
            conn = await bridge.connect(replica, timeout=timeout)
            try:
                await bridge.call(primary.ensure_store, conn)
                status = await bridge.call(replica_status, conn)
            finally:
                await bridge.close(conn)
            await self._prepare(wal, status, system.system_id)
            store = await PgConnection.connect(replica, APPLY_SETTINGS, timeout=timeout)
            try:
                await self._stream(wal, store, on_streaming)
            finally:
                await store.aclose()
        finally:
            await wal.aclose()

    async def _prepare(
        self, wal: WalSenderConnection, status: ReplicaStatus | None, system_id: str
    ) -> None:
        """Seed the replica store if it is empty or half copied; raises SetupError if it
        follows another primary or the slot it needs is gone."""
        slot_rows = await wal.query(
            "SELECT 1 FROM pg_replication_slots WHERE slot_name = "
            f"{quote_literal(self.config.slot)} AND database = current_database()"
        )
        if status is None or status.copying:
            await initial_copy(
                wal,
                self._source,
                self._replica,
                slot=self.config.slot,
                epoch=self.epoch,
                node=self.node,
                system_id=system_id,
                workers=self.config.copy_workers,
                progress=self.progress,
            )
        elif status.source_system != system_id:
            raise SetupError(
                f"the replica store follows another primary (system {status.source_system}, "
                f"not {system_id}): run haproxy-ln reseed"
            )
        elif not slot_rows:
            raise SetupError(
                f"replication slot {self.config.slot!r} is missing on the primary, so changes "
                "since the replica's position may be lost: run haproxy-ln reseed"
            )

    async def _stream(
        self, wal: WalSenderConnection, store: PgConnection, on_streaming: Callable[[], None]
    ) -> None:
        applier = Applier(store, self.epoch, self.node)
        await applier.check_fence()
        position = await applier.load_position()
        await wal.start_replication(self.config.slot, format_lsn(position), PUBLICATION)
        confirmation = Confirmation(position)
        self.status.streaming = True
        self._sent = -1
        log.info("streaming from %s to the replica store", format_lsn(position))
        on_streaming()
        # Records for the apply task; None asks it to ping the replica store.
        send, receive = trio.open_memory_channel[Record | None](QUEUE_RECORDS)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._read, wal, confirmation, send)
            nursery.start_soon(self._apply, wal, applier, store, confirmation, receive)
            nursery.start_soon(self._watch_apply, store.server_pid)
            nursery.start_soon(self._tick, wal, confirmation, send.clone())

    async def _confirm(
        self, wal: WalSenderConnection, confirmation: Confirmation, *, force: bool = False
    ) -> None:
        """Send the durable position upstream if it moved (or when asked to)."""
        durable = confirmation.durable
        self.status.durable_lsn = durable
        metrics.REPLICA_LSN.set(durable)
        if durable >= self._catch_up_to and not self.status.caught_up:
            self.status.caught_up = True
            if self.gate is not None:
                self.gate.release(GATE_KEY)
            log.info("replica caught up to %s", format_lsn(durable))
        if durable == self._sent and not force:
            return
        await wal.send(stream.status_update(durable, time.time_ns() // 1000))
        self._sent = durable

    async def _read(
        self,
        wal: WalSenderConnection,
        confirmation: Confirmation,
        send: trio.MemorySendChannel[Record | None],
    ) -> None:
        assembler = Assembler(self.epoch, self.node)
        while True:
            message = stream.decode(memoryview(await wal.receive()))
            if isinstance(message, stream.Keepalive):
                confirmation.received(message.wal_end)
                await self._confirm(wal, confirmation, force=message.reply_requested)
                continue
            decoded = pgoutput.decode(message.payload)
            if isinstance(decoded, pgoutput.Begin):
                confirmation.received(message.start, opens=True)
            record = assembler.feed(decoded)
            if record is not None:
                try:  # without a trip through the scheduler while there is room
                    send.send_nowait(record)
                except trio.WouldBlock:
                    await send.send(record)

    async def _ping(self, store: PgConnection) -> None:
        """Raises ReplicationError when the replica store does not answer in time, so an
        idle replicator notices a lost replica (and the HA loop can degrade)."""
        with trio.move_on_after(self.config.connect_timeout):
            await store.query("SELECT 1")
            return
        raise ReplicationError(
            f"the replica store did not answer within {self.config.connect_timeout} s"
        )

    async def _apply(
        self,
        wal: WalSenderConnection,
        applier: Applier,
        store: PgConnection,
        confirmation: Confirmation,
        receive: trio.MemoryReceiveChannel[Record | None],
    ) -> None:
        next_prune = time.monotonic()
        while True:
            first = await receive.receive()
            if first is None:  # idle (see _tick): make sure the replica store is still there
                await self._ping(store)
                continue
            batch = [first]
            # DDL ends a batch: its effects may only be usable once committed
            # (ALTER TYPE ... ADD VALUE), and PostgreSQL applied the later
            # source transactions after that commit too.
            while len(batch) < self.config.max_batch and not batch[-1].has_ddl:
                try:
                    record = receive.receive_nowait()
                except trio.WouldBlock:
                    break
                if record is None:  # a ping asked for while busy: not needed
                    break
                batch.append(record)
            started = time.perf_counter()
            self._applying_since = trio.current_time()
            try:
                await applier.apply_batch(batch)
            finally:
                self._applying_since = None
            applied = time.perf_counter()
            for record in batch:
                confirmation.applied(record.end_lsn)
            await self._confirm(wal, confirmation)  # the waiting commits go first
            confirmed = time.time()
            metrics.REPLICATION_APPLY_SECONDS.observe(applied - started)
            metrics.REPLICATION_BATCH_SIZE.observe(len(batch))
            metrics.REPLICATED_TRANSACTIONS.inc(len(batch))
            self.status.transactions += len(batch)
            self.status.batches += 1
            for record in batch:  # commit_time: the primary's commit timestamp, in µs
                metrics.COMMIT_WAIT_SECONDS.observe(max(0.0, confirmed - record.commit_time / 1e6))
            if self.config.txlog_retention_days and time.monotonic() >= next_prune:
                next_prune = time.monotonic() + PRUNE_INTERVAL
                await store.query(
                    f"DELETE FROM {SCHEMA}.txlog WHERE commit_time < now() - "
                    f"{float(self.config.txlog_retention_days)!r} * interval '1 day'"
                )

    async def _watch_apply(self, pid: int) -> None:
        """Raises ReplicationError when an apply has run for connect_timeout and the
        replica store stops answering or its session `pid` stalls, instead of letting
        the apply wait forever.

        Over a link that drops packets (a partition, a firewall) nothing ever
        errors: the apply waited forever, so the replicator still counted as
        streaming, the HA loop never degraded and every commit waited (found
        by the chaos suite, partition-replica-link). Bytes dropped before a
        heal leave the session waiting for an answer that will not come. A
        slow apply is still allowed: see `_stalled`. One task watches every
        apply by looking four times per connect_timeout, so an apply costs
        no task of its own.
        """
        timeout = self.config.connect_timeout
        watched, next_check = None, 0.0
        while True:
            await trio.sleep(timeout / 4)
            since = self._applying_since
            if since is None:
                continue
            if since != watched:
                watched, next_check = since, since + timeout
            if trio.current_time() < next_check:
                continue
            stalled = await self._stalled(pid)
            if stalled is not None and self._applying_since == since:
                raise ReplicationError(stalled)
            next_check = trio.current_time() + timeout

    async def _stalled(self, pid: int) -> str | None:
        """Why the apply session `pid` cannot finish, or None while it may: asked on a
        fresh connection, the replica store must answer within connect_timeout, and the
        session must be working (`active`, perhaps waiting for a lock) or have been
        waiting for us for less than connect_timeout."""
        timeout = self.config.connect_timeout
        try:
            conn = await bridge.connect(self._replica, timeout=timeout)
        except ReplicationError as e:
            return f"the replica store stopped answering during an apply: {e}"
        try:
            with trio.move_on_after(timeout):
                row = await bridge.call(
                    conn.fetchrow,
                    "SELECT state, extract(epoch FROM now() - state_change)::float8 AS waited "
                    "FROM pg_stat_activity WHERE pid = $1",
                    pid,
                )
                if row is None:
                    return "the replica store's apply session is gone"
                if row["state"] != "active" and row["waited"] > timeout:
                    return (
                        f"the replica store's apply session has waited {row['waited']:.1f} s "
                        f"for us ({row['state']}): our messages or its answers were lost"
                    )
                return None
            return f"the replica store did not answer within {timeout} s during an apply"
        except (bridge.PostgresError, *bridge.CONNECTION_LOST) as e:
            return f"the replica store failed during an apply: {e}"
        finally:
            await bridge.close(conn)

    async def _tick(
        self,
        wal: WalSenderConnection,
        confirmation: Confirmation,
        apply: trio.MemorySendChannel[Record | None],
    ) -> None:
        """Every STATUS_INTERVAL: a status update upstream, and when no batch was applied
        since the last one, a ping of the replica store by the apply task. (The apply
        task used to wait for records with a timeout for that: a cancel scope per
        batch, 7% of the replicator's CPU under load.)"""
        batches = -1
        while True:
            await trio.sleep(STATUS_INTERVAL)
            await self._confirm(wal, confirmation, force=True)
            if self.status.batches == batches:
                with contextlib.suppress(trio.WouldBlock):  # full: far from idle
                    apply.send_nowait(None)
            batches = self.status.batches


def _first_leaf(error: BaseException) -> BaseException:
    while isinstance(error, BaseExceptionGroup):
        error = error.exceptions[0]
    return error

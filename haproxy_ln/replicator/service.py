"""The replicator: the local primary's committed changes, made durable on the peer.

How this works: a session connects to the local primary over the
replication protocol (walsender.py) and to the replica store (asyncpg,
through store.bridge), bootstraps the primary, seeds the replica if it is
empty (store.copy), and starts streaming from the position the replica
store holds. Three tasks then share the session:

- the reader decodes XLogData into pgoutput messages, assembles one Record
  per source transaction and queues it; keepalives tell `Confirmation`
  how far the server vouches, and are answered at once when asked;
- the applier takes everything queued (group commit: commits that arrive
  while the replica is busy form the next batch), applies it in one replica
  transaction, and only then confirms the new position upstream, which
  releases the commits waiting in PostgreSQL's synchronous replication;
- a ticker confirms the position every second so the server keeps the
  stream open.

Any failure ends the session; `run` starts a new one after a short backoff.
A stale epoch (the replica store is fenced above ours) is final: it means a
newer leader exists, and replicating on would be wrong.

From the moment a session ends until a new one has confirmed everything up
to the WAL end the server reported on reconnecting, the replicator holds
the gate (new database clients are turned away): the local PostgreSQL may
have restarted and show commits the replica lacks (invariant 5).
"""

from __future__ import annotations

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
from haproxy_ln.replicator.walsender import WalSenderConnection
from haproxy_ln.store import bridge, primary
from haproxy_ln.store.apply import Applier
from haproxy_ln.store.copy import CopyProgress, initial_copy, replica_status
from haproxy_ln.store.schema import PUBLICATION

log = logging.getLogger(__name__)

GATE_KEY = "replicator"
STATUS_INTERVAL = 1.0
PRUNE_INTERVAL = 60.0
QUEUE_RECORDS = 10_000
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
        self._send_lock = trio.Lock()
        self._sent = -1
        self._catch_up_to = 0  # WAL end the server reported when this session began
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
        wal = await WalSenderConnection.connect(source, self.config.sync_name, timeout=timeout)
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
            store = await bridge.connect(
                replica,
                timeout=timeout,
                settings={"search_path": "pg_catalog", "session_replication_role": "replica"},
            )
            try:
                await self._stream(wal, store, system.system_id, on_streaming)
            finally:
                await bridge.close(store)
        finally:
            await wal.aclose()

    async def _stream(
        self,
        wal: WalSenderConnection,
        store: bridge.Connection,
        system_id: str,
        on_streaming: Callable[[], None],
    ) -> None:
        await bridge.call(primary.ensure_store, store)
        status = await bridge.call(replica_status, store)
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
        applier = Applier(store, self.epoch, self.node)
        await bridge.call(applier.check_fence)
        position = await bridge.call(applier.load_position)
        await wal.start_replication(self.config.slot, format_lsn(position), PUBLICATION)
        confirmation = Confirmation(position)
        self.status.streaming = True
        self._sent = -1
        log.info("streaming from %s to the replica store", format_lsn(position))
        on_streaming()
        send, receive = trio.open_memory_channel[Record](QUEUE_RECORDS)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._read, wal, confirmation, send)
            nursery.start_soon(self._apply, wal, applier, store, confirmation, receive)
            nursery.start_soon(self._tick, wal, confirmation)

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
        async with self._send_lock:
            await wal.send(stream.status_update(durable, time.time_ns() // 1000))
            self._sent = durable

    async def _read(
        self,
        wal: WalSenderConnection,
        confirmation: Confirmation,
        send: trio.MemorySendChannel[Record],
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
                await send.send(record)

    async def _ping(self, store: bridge.Connection) -> None:
        """Raises ReplicationError when the replica store does not answer in time, so an
        idle replicator notices a lost replica (and the HA loop can degrade)."""
        with trio.move_on_after(self.config.connect_timeout):
            await bridge.call(store.fetchval, "SELECT 1")
            return
        raise ReplicationError(
            f"the replica store did not answer within {self.config.connect_timeout} s"
        )

    async def _apply(
        self,
        wal: WalSenderConnection,
        applier: Applier,
        store: bridge.Connection,
        confirmation: Confirmation,
        receive: trio.MemoryReceiveChannel[Record],
    ) -> None:
        next_prune = time.monotonic()
        while True:
            batch: list[Record] = []
            with trio.move_on_after(STATUS_INTERVAL):
                batch = [await receive.receive()]
            if not batch:  # idle: make sure the replica store is still there
                await self._ping(store)
                continue
            # DDL ends a batch: its effects may only be usable once committed
            # (ALTER TYPE ... ADD VALUE), and PostgreSQL applied the later
            # source transactions after that commit too.
            while len(batch) < self.config.max_batch and not batch[-1].has_ddl:
                try:
                    batch.append(receive.receive_nowait())
                except trio.WouldBlock:
                    break
            started = time.perf_counter()
            await self._apply_watched(applier, store, batch)
            metrics.REPLICATION_APPLY_SECONDS.observe(time.perf_counter() - started)
            metrics.REPLICATION_BATCH_SIZE.observe(len(batch))
            metrics.REPLICATED_TRANSACTIONS.inc(len(batch))
            self.status.transactions += len(batch)
            self.status.batches += 1
            for record in batch:
                confirmation.applied(record.end_lsn)
            await self._confirm(wal, confirmation)
            confirmed = time.time()
            for record in batch:  # commit_time: the primary's commit timestamp, in µs
                metrics.COMMIT_WAIT_SECONDS.observe(max(0.0, confirmed - record.commit_time / 1e6))
            if self.config.txlog_retention_days and time.monotonic() >= next_prune:
                next_prune = time.monotonic() + PRUNE_INTERVAL
                await bridge.call(_prune_txlog, store, self.config.txlog_retention_days)

    async def _apply_watched(
        self, applier: Applier, store: bridge.Connection, batch: list[Record]
    ) -> None:
        """Apply `batch`, watched: raises ReplicationError if the replica store stops
        answering or its session stalls, instead of waiting forever.

        Over a link that drops packets (a partition, a firewall) nothing ever
        errors: the apply waited forever, so the replicator still counted as
        streaming, the HA loop never degraded and every commit waited (found
        by the chaos suite, partition-replica-link). Bytes dropped before a
        heal leave the session waiting for an answer that will not come. A
        slow apply is still allowed: see `_stalled`.
        """
        pid = store.get_server_pid()
        async with trio.open_nursery() as nursery:

            async def watch() -> None:
                while True:
                    await trio.sleep(self.config.connect_timeout)
                    stalled = await self._stalled(pid)
                    if stalled is not None:
                        raise ReplicationError(stalled)

            nursery.start_soon(watch)
            await bridge.call(applier.apply_batch, batch)
            nursery.cancel_scope.cancel()

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

    async def _tick(self, wal: WalSenderConnection, confirmation: Confirmation) -> None:
        while True:
            await trio.sleep(STATUS_INTERVAL)
            await self._confirm(wal, confirmation, force=True)


def _first_leaf(error: BaseException) -> BaseException:
    while isinstance(error, BaseExceptionGroup):
        error = error.exceptions[0]
    return error


async def _prune_txlog(store: bridge.Connection, days: float) -> None:
    await store.execute(
        "DELETE FROM haproxy_ln.txlog WHERE commit_time < now() - $1 * interval '1 day'", days
    )

"""Concurrent writers like LND's, through the synchronous replicator.

Eight writers (four on an asyncpg pool, four on their own psycopg connections)
run SERIALIZABLE read-modify-write transactions on shared rows of an
LND-style key/value table (`kvdb`: buckets with a sequence, children keyed by
(parent_id, key)) and a few counters, retrying serialization failures and
deadlocks as LND does. Every commit waits for the replica store, so the
applier sees concurrent commits and groups them into batches. Once every
writer is done, the replica must equal the primary at once, and the counters
must add up to the increments that committed: none lost, none doubled.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
from psycopg import errors
from replication_harness import ReplicatorProcess, rows_digest

from haproxy_ln.local import PostgresCluster

Pair = tuple[PostgresCluster, PostgresCluster]

ASYNC_WORKERS = 4
SYNC_WORKERS = 4
TRANSACTIONS = 100  # committed per writer
COUNTERS = 3
BUCKETS = 4
CHILD_KEYS = 12  # per bucket: children are overwritten and deleted often
DEADLINE = 120.0  # seconds for all writers; far more than they need

SCHEMA = f"""
CREATE TABLE kv (
    id bigserial PRIMARY KEY,
    key bytea NOT NULL,
    value bytea,
    parent_id bigint REFERENCES kv (id) ON DELETE CASCADE,
    sequence bigint
);
CREATE UNIQUE INDEX kv_top_key ON kv (key) WHERE parent_id IS NULL;
CREATE UNIQUE INDEX kv_child_key ON kv (parent_id, key) WHERE parent_id IS NOT NULL;
CREATE TABLE counters (name text PRIMARY KEY, n bigint NOT NULL);
INSERT INTO counters SELECT 'c' || g, 0 FROM generate_series(0, {COUNTERS - 1}) g;
INSERT INTO kv (key, sequence)
    SELECT convert_to('bucket' || g, 'UTF8'), 0 FROM generate_series(0, {BUCKETS - 1}) g;
"""

RETRIED = (
    asyncpg.exceptions.SerializationError,
    asyncpg.exceptions.DeadlockDetectedError,
    errors.SerializationFailure,
    errors.DeadlockDetected,
)


@dataclass(frozen=True)
class Plan:
    """What one transaction does: increment a counter and a bucket's sequence (both read
    first, written from what was read), put a child, maybe delete another."""

    counter: str
    bucket: bytes
    put_key: bytes
    put_value: bytes
    delete_key: bytes | None

    @classmethod
    def draw(cls, rnd: random.Random) -> Plan:
        size = rnd.choice([0, 8, 32, 200, 5000])  # 5000 random bytes are TOASTed
        return cls(
            counter=f"c{rnd.randrange(COUNTERS)}",
            bucket=f"bucket{rnd.randrange(BUCKETS)}".encode(),
            put_key=f"k{rnd.randrange(CHILD_KEYS)}".encode(),
            put_value=rnd.randbytes(size),
            delete_key=f"k{rnd.randrange(CHILD_KEYS)}".encode() if rnd.random() < 0.3 else None,
        )


@dataclass
class Tally:
    """Increments that committed, per counter and per bucket; retried attempts."""

    counters: Counter[str] = field(default_factory=Counter)
    buckets: Counter[bytes] = field(default_factory=Counter)
    retries: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def committed(self, plan: Plan) -> None:
        with self.lock:
            self.counters[plan.counter] += 1
            self.buckets[plan.bucket] += 1

    def retried(self) -> None:
        with self.lock:
            self.retries += 1


GET_COUNTER = "SELECT n FROM counters WHERE name = {}"
SET_COUNTER = "UPDATE counters SET n = {} WHERE name = {}"
GET_BUCKET = "SELECT id, sequence FROM kv WHERE parent_id IS NULL AND key = {}"
COUNT_CHILDREN = "SELECT count(*) FROM kv WHERE parent_id = {}"
SET_SEQUENCE = "UPDATE kv SET sequence = {} WHERE id = {}"
PUT_CHILD = (
    "INSERT INTO kv (key, value, parent_id) VALUES ({}, {}, {}) "
    "ON CONFLICT (parent_id, key) WHERE parent_id IS NOT NULL DO UPDATE SET value = excluded.value"
)
DELETE_CHILD = "DELETE FROM kv WHERE parent_id = {} AND key = {}"


def _asyncpg(query: str) -> str:
    return query.format(*(f"${i}" for i in range(1, query.count("{}") + 1)))


def _psycopg(query: str) -> str:
    return query.format(*(["%s"] * query.count("{}")))


async def _run_async(conn: asyncpg.Connection, plan: Plan) -> None:
    n = await conn.fetchval(_asyncpg(GET_COUNTER), plan.counter)
    bucket_id, sequence = await conn.fetchrow(_asyncpg(GET_BUCKET), plan.bucket)
    await conn.fetchval(_asyncpg(COUNT_CHILDREN), bucket_id)
    await conn.execute(_asyncpg(SET_COUNTER), n + 1, plan.counter)
    await conn.execute(_asyncpg(SET_SEQUENCE), sequence + 1, bucket_id)
    await conn.execute(_asyncpg(PUT_CHILD), plan.put_key, plan.put_value, bucket_id)
    if plan.delete_key is not None:
        await conn.execute(_asyncpg(DELETE_CHILD), bucket_id, plan.delete_key)


def _run_sync(conn: psycopg.Connection[Any], plan: Plan) -> None:
    row = conn.execute(_psycopg(GET_COUNTER), (plan.counter,)).fetchone()
    assert row is not None
    n = row[0]
    row = conn.execute(_psycopg(GET_BUCKET), (plan.bucket,)).fetchone()
    assert row is not None
    bucket_id, sequence = row
    conn.execute(_psycopg(COUNT_CHILDREN), (bucket_id,)).fetchone()
    conn.execute(_psycopg(SET_COUNTER), (n + 1, plan.counter))
    conn.execute(_psycopg(SET_SEQUENCE), (sequence + 1, bucket_id))
    conn.execute(_psycopg(PUT_CHILD), (plan.put_key, plan.put_value, bucket_id))
    if plan.delete_key is not None:
        conn.execute(_psycopg(DELETE_CHILD), (bucket_id, plan.delete_key))


async def async_writers(dsn: str, tally: Tally, stop: threading.Event) -> None:
    async def writer(pool: asyncpg.Pool, seed: int) -> None:
        rnd = random.Random(seed)
        done = 0
        while done < TRANSACTIONS and not stop.is_set():
            plan = Plan.draw(rnd)
            try:
                async with pool.acquire() as conn, conn.transaction(isolation="serializable"):
                    await _run_async(conn, plan)
            except RETRIED:
                tally.retried()
                continue
            tally.committed(plan)
            done += 1

    async with asyncpg.create_pool(dsn, min_size=ASYNC_WORKERS, max_size=ASYNC_WORKERS) as pool:
        await asyncio.gather(*(writer(pool, seed) for seed in range(ASYNC_WORKERS)))


def sync_writer(dsn: str, seed: int, tally: Tally, stop: threading.Event) -> None:
    rnd = random.Random(seed)
    done = 0
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.isolation_level = psycopg.IsolationLevel.SERIALIZABLE
        while done < TRANSACTIONS and not stop.is_set():
            plan = Plan.draw(rnd)
            try:
                with conn.transaction():
                    _run_sync(conn, plan)
            except RETRIED:
                tally.retried()
                continue
            tally.committed(plan)
            done += 1


class Watchdog(threading.Thread):
    """Ends the run instead of hanging if the replicator dies, fails to apply (it would
    retry forever: nothing here is a fault to recover from) or the writers overrun
    `DEADLINE`: it stops the writers and releases the primary's synchronous wait."""

    def __init__(self, primary: PostgresCluster, rep: ReplicatorProcess, stop: threading.Event):
        super().__init__(daemon=True)
        self.primary, self.rep, self.stop = primary, rep, stop
        self.offset = len(rep.log())
        self.done = threading.Event()
        self.fired: str | None = None

    def _problem(self, started: float) -> str | None:
        if self.rep.proc is not None and self.rep.proc.poll() is not None:
            return f"the replicator exited with code {self.rep.proc.returncode}"
        for line in self.rep.log()[self.offset :].splitlines():
            if "replication interrupted" in line:
                return f"the replicator failed to apply: {line}"
        if time.monotonic() - started > DEADLINE:
            return f"the writers did not finish within {DEADLINE} s"
        return None

    def run(self) -> None:
        started = time.monotonic()
        while not self.done.wait(0.1):
            problem = self._problem(started)
            if problem is not None:
                self.fired = problem
                self.stop.set()
                self.primary.psql(
                    "ALTER SYSTEM RESET synchronous_standby_names;\nSELECT pg_reload_conf();"
                )
                return


def test_concurrent_serializable_writers_replicate_exactly(pg_pair: Pair, tmp_path: Path) -> None:
    primary, replica = pg_pair
    rep = ReplicatorProcess(primary, replica, tmp_path / "rep.log").start()
    try:
        primary.psql(SCHEMA)  # replicated as DDL and rows
        tally, stop = Tally(), threading.Event()
        failures: list[BaseException] = []

        def guarded(seed: int) -> None:
            try:
                sync_writer(primary.dsn(), seed, tally, stop)
            except BaseException as e:
                failures.append(e)
                stop.set()

        watchdog = Watchdog(primary, rep, stop)
        watchdog.start()
        threads = [
            threading.Thread(target=guarded, args=(seed,), daemon=True)
            for seed in range(ASYNC_WORKERS, ASYNC_WORKERS + SYNC_WORKERS)
        ]
        for thread in threads:
            thread.start()
        try:
            asyncio.run(async_writers(primary.dsn(), tally, stop))
        finally:
            stop_waiting = time.monotonic() + DEADLINE
            for thread in threads:
                thread.join(max(0.0, stop_waiting - time.monotonic()))
            watchdog.done.set()
            watchdog.join()
        assert watchdog.fired is None, f"{watchdog.fired}\n{rep.log()[-3000:]}"
        assert not failures, f"a psycopg writer failed: {failures[0]!r}"
        assert not any(thread.is_alive() for thread in threads)

        # Every commit waited for the replica: it must be equal now, without waiting.
        on_primary, on_replica = rows_digest(primary), rows_digest(replica)
        assert on_replica == on_primary
        writers = ASYNC_WORKERS + SYNC_WORKERS
        assert sum(tally.counters.values()) == writers * TRANSACTIONS
        assert tally.retries > 0, "no transaction was retried: the writers did not contend"
        for cluster in (primary, replica):
            rows = cluster.psql("SELECT name, n FROM counters ORDER BY name").split()
            counters = {name: int(n) for name, n in (row.split("|") for row in rows)}
            assert counters == {f"c{i}": tally.counters[f"c{i}"] for i in range(COUNTERS)}
            assert sum(counters.values()) == writers * TRANSACTIONS
            rows = cluster.psql(
                "SELECT convert_from(key, 'UTF8'), sequence FROM kv "
                "WHERE parent_id IS NULL ORDER BY key"
            ).split()
            sequences = {key.encode(): int(n) for key, n in (row.split("|") for row in rows)}
            assert sequences == {
                f"bucket{i}".encode(): tally.buckets[f"bucket{i}".encode()] for i in range(BUCKETS)
            }
    finally:
        code = rep.stop()
    assert code == 0, rep.log()

"""The one bridge between trio and asyncio: every asyncpg call crosses here.

How this works: `open_bridge()` runs an asyncio event loop inside the trio
run (trio-asyncio) for as long as the service needs the stores. The modules
of `store/` are written as plain asyncio coroutines over asyncpg
connections; trio code runs them with `call(fn, *args)`, one crossing per
unit of work (a whole batch of records is one call), so the bridge costs a
few tens of microseconds per batch, not per row. Cancelling the trio side
cancels the asyncio coroutine. Connections are closed shielded, so a
cancelled service still ends its replica sessions cleanly.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, ParamSpec, TypeVar

import asyncpg
import trio
import trio_asyncio

from haproxy_ln.errors import ReplicationError
from haproxy_ln.pgwire.dsn import PgTarget
from haproxy_ln.replication.record import TEXT_SETTINGS

Connection = asyncpg.Connection
PostgresError = asyncpg.PostgresError
# What a store connection raises when its server goes away or restarts.
CONNECTION_LOST = (asyncpg.InterfaceError, asyncpg.PostgresConnectionError, ConnectionError)
P = ParamSpec("P")
T = TypeVar("T")

# Our sessions parse and print values exactly as the replication stream does,
# and are skipped by the DDL trigger.
SESSION_SETTINGS = {**TEXT_SETTINGS, "haproxy_ln.internal": "on"}


@asynccontextmanager
async def open_bridge() -> AsyncIterator[None]:
    """Run an asyncio loop for the stores until the block ends.

    Errors nobody awaits (asyncio's "Task was destroyed but it is pending!",
    "Task exception was never retrieved": grpc.aio leaves such tasks behind
    when an etcd member dies under a stream) are logged, not raised:
    trio-asyncio's default handler raises them into the loop's nursery,
    which ended the whole agent (found by the chaos suite, kill-etcd-leader).
    Errors of the calls we make still reach their callers through `call`.
    """
    async with trio_asyncio.open_loop() as loop:
        loop.set_exception_handler(_log_unawaited)
        yield


def _log_unawaited(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    asyncio.BaseEventLoop.default_exception_handler(loop, context)  # type: ignore[arg-type]


async def call(fn: Callable[P, Awaitable[T]], *args: P.args, **kwargs: P.kwargs) -> T:
    """Run the asyncio coroutine function `fn` from trio and return its result."""
    return await trio_asyncio.aio_as_trio(fn)(*args, **kwargs)  # type: ignore[no-any-return]


async def aio_connect(
    target: PgTarget, settings: dict[str, str] | None = None, timeout: float = 60
) -> asyncpg.Connection:
    """asyncio side: an asyncpg connection to `target` with our session settings."""
    return await asyncpg.connect(
        **target.asyncpg_kwargs(),
        timeout=timeout,
        server_settings={**SESSION_SETTINGS, **(settings or {})},
    )


async def connect(
    target: PgTarget, *, timeout: float, settings: dict[str, str] | None = None
) -> asyncpg.Connection:
    """An asyncpg connection to `target` with our session settings.

    Raises ReplicationError naming the target (never its password) when it
    cannot be reached or refuses us.
    """
    try:
        with trio.fail_after(timeout):
            return await call(aio_connect, target, settings, timeout)
    except trio.TooSlowError:
        raise ReplicationError(f"cannot connect to {target}: timed out after {timeout} s") from None
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as e:
        raise ReplicationError(f"cannot connect to {target}: {e}") from e


async def close(conn: asyncpg.Connection) -> None:
    """Close `conn`, even when the caller is being cancelled."""
    with trio.CancelScope(shield=True), trio.move_on_after(5):
        try:
            await call(conn.close, timeout=5)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
            conn.terminate()

"""The connection to etcd: endpoints, TLS, auth, failover, and a bound on every request.

How this works: etcd is spoken through etcd3aio (gRPC on grpc.aio) inside
the one trio-asyncio bridge (`store.bridge`). Each configured endpoint gets
its own gRPC channel, made when first used, so a name in the config is
resolved and its TLS certificate checked against that name. `request(op, fn)`
runs one asyncio function `fn(member, timeout)` against the current endpoint
and:

- bounds the whole request, every endpoint tried included, by
  `request_timeout`, both as a trio deadline (cancelling the trio side
  cancels the gRPC call) and as the gRPC deadline sent to etcd;
- on an unavailable endpoint (refused, reset, etcd without a leader) tries
  the next one at once, and later requests start from the last one that
  answered; a request that used up the time raises `CoordUnavailable`, and
  the endpoint's channel is replaced, so a dead connection is not reused;
- with a user configured, authenticates on each channel before its first
  request and again, once, when etcd says the token is no longer valid;
- turns every other gRPC status into `CoordError` (or `LeaseLost` for a lease
  etcd no longer knows), with etcd's own words and never a password or token.

etcd3aio's own retries are switched off (`max_attempts=1`): a retried write
could be applied twice without the caller knowing, so retrying is left to
the operations, which are written to make a second try safe.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

import grpc
import grpc.aio
import trio
from etcd3aio import (
    EtcdConnectionError,
    EtcdError,
    EtcdPermissionDeniedError,
    EtcdTransientError,
    EtcdUnauthenticatedError,
)
from etcd3aio.auth import AuthService
from etcd3aio.kv import KVService
from etcd3aio.lease import LeaseService
from etcd3aio.watch import WatchService

from haproxy_ln.config import EtcdConfig, HostPort
from haproxy_ln.errors import CoordError, CoordUnavailable, LeaseLost
from haproxy_ln.store import bridge

T = TypeVar("T")

# gRPC retries a failed connection after a backoff that by default grows to
# two minutes; etcd coming back must be noticed within a lease TTL. gRPC also
# uses the "min" value as the time a connection attempt (TCP, TLS, HTTP/2
# settings) may take, so that one stays at a second.
_CHANNEL_OPTIONS: list[tuple[str, int]] = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 1000),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.enable_retries", 0),
]
_CLOSE_TIMEOUT = 1.0


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """The PEM bytes of the configured TLS files (None: TLS off)."""

    ca: bytes
    cert: bytes | None
    key: bytes | None


async def read_tls(config: EtcdConfig) -> TlsFiles | None:
    """The TLS files `config` names, read; raises CoordError for one that cannot be read."""
    if config.ca_file is None:
        return None

    async def read(key: str, path: str | None) -> bytes | None:
        if path is None:
            return None
        try:
            return await trio.Path(path).read_bytes()
        except OSError as e:
            raise CoordError(f"cannot read etcd {key} {path}: {e.strerror or e}") from None

    ca = await read("ca_file", config.ca_file)
    assert ca is not None
    return TlsFiles(
        ca, await read("cert_file", config.cert_file), await read("key_file", config.key_file)
    )


@dataclass(eq=False)
class Member:
    """One endpoint's channel and the etcd3aio services on it (asyncio side)."""

    endpoint: HostPort
    channel: grpc.aio.Channel
    kv: KVService
    lease: LeaseService
    watch: WatchService
    auth: AuthService
    token: str | None = field(default=None, repr=False)

    def set_token(self, token: str | None) -> None:
        self.token = token
        for service in (self.kv, self.lease, self.watch, self.auth):
            service.set_token(token)


async def _open_member(endpoint: HostPort, tls: TlsFiles | None) -> Member:
    """asyncio side: a channel to `endpoint` (connected lazily by gRPC)."""
    target = str(endpoint)
    if tls is None:
        channel = grpc.aio.insecure_channel(target, options=_CHANNEL_OPTIONS)
    else:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=tls.ca, private_key=tls.key, certificate_chain=tls.cert
        )
        channel = grpc.aio.secure_channel(target, credentials, options=_CHANNEL_OPTIONS)
    return Member(
        endpoint=endpoint,
        channel=channel,
        kv=KVService(channel, max_attempts=1),
        lease=LeaseService(channel, max_attempts=1),
        watch=WatchService(channel, max_attempts=1),
        auth=AuthService(channel, max_attempts=1),
    )


class _Unavailable(Exception):
    """This endpoint did not answer (the message says how); try the next one.

    `stale`: the connection may be dead (a deadline passed), so drop the channel.
    """

    def __init__(self, message: str, *, stale: bool) -> None:
        super().__init__(message)
        self.stale = stale


def _status(exc: BaseException) -> tuple[grpc.StatusCode | None, str]:
    """The gRPC status code and etcd's message behind an etcd3aio or gRPC error."""
    cause = exc if isinstance(exc, grpc.aio.AioRpcError) else exc.__cause__
    if isinstance(cause, grpc.aio.AioRpcError):
        return cause.code(), cause.details() or ""
    return None, str(exc)


def _stale_token(exc: BaseException) -> bool:
    """Whether etcd refused `exc`'s request for an expired or unknown auth token."""
    code, message = _status(exc)
    return code == grpc.StatusCode.UNAUTHENTICATED and "token" in message


class EtcdClient:
    """Requests to the etcd cluster `config` names; see the module docstring."""

    def __init__(self, config: EtcdConfig, tls: TlsFiles | None) -> None:
        self._config = config
        self._tls = tls
        self._members: dict[HostPort, Member] = {}
        self._closing: set[asyncio.Task[None]] = set()  # channels being closed
        self._current = 0
        self.timeout = config.request_timeout

    @property
    def endpoints(self) -> list[HostPort]:
        return self._config.endpoints

    async def request(self, operation: str, fn: Callable[[Member, float], Awaitable[T]]) -> T:
        """Run `fn(member, seconds_left)` on the asyncio side against an answering endpoint.

        Raises CoordUnavailable when no endpoint answered within the request
        timeout, LeaseLost when etcd no longer knows a lease the request
        named, CoordError when etcd refused the request.
        """
        deadline = trio.current_time() + self.timeout
        problems: list[str] = []
        for _ in range(len(self.endpoints)):
            endpoint = self.endpoints[self._current]
            left = deadline - trio.current_time()
            if left <= 0:
                break
            try:
                with trio.fail_after(left):
                    return await self._attempt(operation, endpoint, fn, deadline)
            except trio.TooSlowError:
                problems.append(f"{endpoint}: no answer")
                await self._discard(endpoint)
            except _Unavailable as e:
                problems.append(f"{endpoint}: {e}")
                if e.stale:
                    await self._discard(endpoint)
            self._current = (self._current + 1) % len(self.endpoints)
        tried = "; ".join(problems) or "no time left to try"
        raise CoordUnavailable(f"etcd did not answer {operation} within {self.timeout} s ({tried})")

    async def stream(self, operation: str, fn: Callable[[Member], Awaitable[T]]) -> T:
        """Run `fn(member)` on the asyncio side against an answering endpoint, unbounded.

        For a watch: the caller bounds it. Raises CoordUnavailable when no
        endpoint answers or the stream breaks, CoordError when etcd refuses.
        """

        async def ready(member: Member, timeout: float) -> Member:
            return member

        for fresh_token in (False, True):
            member = await self.request(operation, ready)  # connected and authenticated
            try:
                return await bridge.call(fn, member)
            except (asyncio.CancelledError, grpc.aio.UsageError):  # channel closed, see _attempt
                raise CoordUnavailable(
                    f"etcd at {member.endpoint} broke off {operation}: the connection was closed"
                ) from None
            except (EtcdError, grpc.aio.AioRpcError, TimeoutError) as e:
                if _stale_token(e) and not fresh_token:
                    member.set_token(None)  # `request` authenticates again
                    continue
                error = self._error(operation, member.endpoint, e)
                if isinstance(error, _Unavailable):
                    raise CoordUnavailable(
                        f"etcd at {member.endpoint} broke off {operation}: {error}"
                    ) from None
                raise error from None
        raise AssertionError("unreachable")

    async def _attempt(
        self,
        operation: str,
        endpoint: HostPort,
        fn: Callable[[Member, float], Awaitable[T]],
        deadline: float,
    ) -> T:
        member = self._members.get(endpoint)
        if member is None:
            member = await bridge.call(_open_member, endpoint, self._tls)
            self._members[endpoint] = member
        for fresh_token in (False, True):
            if self._config.user is not None and (member.token is None or fresh_token):
                try:
                    await self._authenticate(member, deadline)
                except (EtcdError, grpc.aio.AioRpcError, TimeoutError) as e:
                    raise self._error("authentication", endpoint, e) from None
            try:
                return await bridge.call(fn, member, max(deadline - trio.current_time(), 0.001))
            except (asyncio.CancelledError, grpc.aio.UsageError):
                # Not our cancellation (trio's arrives as trio.Cancelled): another task
                # closed this endpoint's channel (`_discard`) under or before the request.
                raise _Unavailable("the connection was closed", stale=False) from None
            except (EtcdError, grpc.aio.AioRpcError, TimeoutError) as e:
                if _stale_token(e) and member.token is not None and not fresh_token:
                    continue  # tokens expire (etcd --auth-token-ttl): get a new one, once
                raise self._error(operation, endpoint, e) from None
        raise AssertionError("unreachable")

    async def _authenticate(self, member: Member, deadline: float) -> None:
        user, password = self._config.user, self._config.password
        assert user is not None and password is not None  # EtcdConfig requires both
        member.set_token(None)
        timeout = max(deadline - trio.current_time(), 0.001)
        answer = await bridge.call(
            member.auth.authenticate, user, password.get_secret_value(), timeout=timeout
        )
        member.set_token(str(answer.token))

    def _error(self, operation: str, endpoint: HostPort, exc: BaseException) -> Exception:
        """What `exc`, raised by etcd3aio or gRPC during `operation`, means for the caller."""
        code, message = _status(exc)
        if isinstance(exc, TimeoutError) or code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return _Unavailable("no answer", stale=True)
        if code == grpc.StatusCode.UNAVAILABLE or isinstance(exc, EtcdConnectionError):
            return _Unavailable(f"unavailable: {message}", stale=False)
        if isinstance(exc, EtcdTransientError):
            return _Unavailable(message, stale=True)
        if code == grpc.StatusCode.INTERNAL and (
            "Stream removed" in message or "RST_STREAM" in message
        ):
            # The HTTP/2 stream was reset under the call (a connection cut or closed): the
            # transport broke, etcd did not refuse. As a CoordError it ended the agent
            # from its lease keepalive (found by the chaos suite, partition-active-etcd).
            return _Unavailable(f"the connection broke: {message}", stale=True)
        if code == grpc.StatusCode.NOT_FOUND and "lease" in message:
            return LeaseLost(f"etcd no longer knows the lease ({message})")
        if self._config.user is None and "user name is empty" in message:
            return CoordError(
                f"etcd at {endpoint} refused {operation}: it requires a user "
                f"([etcd] user and password) ({message})"
            )
        if operation == "authentication":
            return CoordError(f"etcd at {endpoint} refused user {self._config.user!r}: {message}")
        if isinstance(exc, EtcdUnauthenticatedError) or code == grpc.StatusCode.UNAUTHENTICATED:
            who = f"user {self._config.user!r}" if self._config.user else "no user configured"
            return CoordError(f"etcd at {endpoint} refused {operation} ({who}): {message}")
        if isinstance(exc, EtcdPermissionDeniedError) or code == grpc.StatusCode.PERMISSION_DENIED:
            return CoordError(
                f"etcd at {endpoint} refused {operation}: user {self._config.user!r} may not "
                f"use {self._config.prefix}/ ({message})"
            )
        name = code.name if code else type(exc).__name__
        return CoordError(f"etcd at {endpoint} refused {operation}: {name}: {message}")

    async def _discard(self, endpoint: HostPort) -> None:
        """Drop `endpoint`'s channel: its connection may be dead without knowing it.

        It is closed in the background, so the request that gave up on it
        ends on time; calls still on it end with "the connection was closed".
        """
        member = self._members.pop(endpoint, None)
        if member is not None:
            with trio.CancelScope(shield=True):  # returns at once
                await bridge.call(self._close_soon, member)

    async def _close_soon(self, member: Member) -> None:
        """asyncio side: start closing `member`'s channel and return."""
        task = asyncio.get_running_loop().create_task(_close_channel(member))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def aclose(self) -> None:
        """Close every channel, even when the caller is being cancelled."""
        members, self._members = list(self._members.values()), {}
        with trio.CancelScope(shield=True), trio.move_on_after(_CLOSE_TIMEOUT):
            for member in members:
                await bridge.call(self._close_soon, member)
            if self._closing:
                await bridge.call(asyncio.wait, set(self._closing))


async def _close_channel(member: Member) -> None:
    """asyncio side: close `member`'s channel, cancelling the calls still on it."""
    with contextlib.suppress(grpc.aio.UsageError, RuntimeError):
        await member.channel.close(None)

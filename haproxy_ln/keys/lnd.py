"""lnd: nothing on disk; lnd starts locked and the active node unlocks it over gRPC.

How this works: lnd serves two services before its wallet is open, both over
TLS with its own self-signed tls.cert and without macaroons: `State.GetState`
(how far lnd has come) and `WalletUnlocker.UnlockWallet` (the password).
`lnd_state` is one GetState call; the daemon supervisor uses it as lnd's
readiness probe. `LndCustody.unlock()` waits for LOCKED, then sends the
password from the sealed file.

Calls use grpcio's blocking stub in a worker thread, with a gRPC deadline, so
the trio loop never blocks and an abandoned call still ends on its own.

Events: for lnd, "keys.materialized" is emitted just before the password is
sent (from then on lnd may hold its keys) and "keys.destroyed" once lnd is
shown to be stopped (its port refuses connections) or locked again. A
refused password also ends the interval, since the wallet stayed locked; a
call that fails in any other way leaves `held` true, because lnd may have
unlocked, until `destroy()` proves otherwise.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import grpc
import trio

from haproxy_ln.config import HostPort
from haproxy_ln.errors import KeyCustodyError, LndError, LndUnreachable, WrongWalletPassword
from haproxy_ln.events import EventLog
from haproxy_ln.keys.lnrpc import (
    GET_STATE,
    UNLOCK_WALLET,
    WalletState,
    decode_empty,
    decode_get_state_response,
    encode_unlock_request,
)
from haproxy_ln.keys.sealing import KekSource, Secret, open_sealed

__all__ = ["PASSWORD_ROLE", "LndCustody", "lnd_state", "unlock_wallet"]

log = logging.getLogger(__name__)

PASSWORD_ROLE = "lnd-wallet-password"  # the role the wallet password must be sealed for
_MAX_CERT_SIZE = 1024 * 1024
_MAX_DETAILS = 200
# btcwallet's words when the password does not open the wallet (gRPC code UNKNOWN).
_REFUSED = "invalid passphrase"


def _read_cert(path: Path) -> bytes:
    try:
        with path.open("rb") as f:
            data = f.read(_MAX_CERT_SIZE + 1)
    except OSError as e:
        raise LndError(f"cannot read lnd's TLS certificate {path}: {e.strerror}") from None
    if len(data) > _MAX_CERT_SIZE or b"-----BEGIN CERTIFICATE-----" not in data:
        raise LndError(f"{path} is not a PEM certificate (lnd's tls.cert)")
    return data


def _scrub(text: str, secret: Secret | None) -> str:
    """`text` from lnd, shortened, with the secret cut out should lnd ever echo it."""
    if secret is not None and len(secret) > 0:
        with contextlib.suppress(UnicodeDecodeError):  # not text: lnd cannot have echoed it
            text = text.replace(secret.reveal().decode(), "<redacted>")
    return text if len(text) <= _MAX_DETAILS else text[: _MAX_DETAILS - 3] + "..."


def _call_sync(rpc: HostPort, cert: bytes, method: str, request: bytes, timeout: float) -> bytes:
    credentials = grpc.ssl_channel_credentials(root_certificates=cert)
    with grpc.secure_channel(str(rpc), credentials) as channel:
        # bytes in, bytes out: lnrpc.py does the encoding
        call: grpc.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(method)
        return call(request, timeout=timeout)


async def _call(
    rpc: HostPort,
    tls_cert: Path,
    method: str,
    request: bytes,
    timeout: float,
    secret: Secret | None = None,
) -> bytes:
    """One unary call to lnd; raises LndUnreachable, WrongWalletPassword or LndError."""
    cert = await trio.to_thread.run_sync(_read_cert, tls_cert)
    name = method.rpartition("/")[2]
    try:
        # abandon_on_cancel: a cancelled caller moves on; the gRPC deadline ends the thread.
        return await trio.to_thread.run_sync(
            partial(_call_sync, rpc, cert, method, request, timeout), abandon_on_cancel=True
        )
    except grpc.RpcError as e:
        code = e.code() if isinstance(e, grpc.Call) else grpc.StatusCode.UNKNOWN
        details = _scrub(str(e.details() if isinstance(e, grpc.Call) else ""), secret)
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        raise LndUnreachable(f"lnd at {rpc} did not answer {name} within {timeout} s")
    if code == grpc.StatusCode.UNAVAILABLE:
        raise LndUnreachable(f"lnd at {rpc} is unreachable: {details}")
    if method == UNLOCK_WALLET and _REFUSED in details:
        raise WrongWalletPassword(
            f"lnd at {rpc} refused the wallet password ({details}); its wallet stays locked"
        )
    raise LndError(f"lnd at {rpc} answered {name} with {code.name}: {details}")


async def lnd_state(rpc: HostPort, tls_cert: Path, timeout: float) -> WalletState:
    """lnd's wallet state (GetState), within `timeout` seconds.

    Raises LndUnreachable when lnd does not answer (not running, still
    starting, hung, or the TLS certificate does not match), LndError when it
    answers with an error or a state this version does not know.
    """
    response = await _call(rpc, tls_cert, GET_STATE, b"", timeout)
    try:
        return decode_get_state_response(response)
    except ValueError as e:
        raise LndError(f"lnd at {rpc} sent an unusable GetState answer: {e}") from None


async def unlock_wallet(rpc: HostPort, tls_cert: Path, password: Secret, timeout: float) -> None:
    """Send the wallet password to lnd (UnlockWallet), within `timeout` seconds.

    Raises WrongWalletPassword when lnd refuses it, LndUnreachable when lnd
    does not answer, LndError otherwise. No error carries the password.
    """
    request = encode_unlock_request(password.reveal())
    response = await _call(rpc, tls_cert, UNLOCK_WALLET, request, timeout, secret=password)
    try:
        decode_empty(response)
    except ValueError as e:
        raise LndError(f"lnd at {rpc} sent an unusable UnlockWallet answer: {e}") from None


async def port_refuses(rpc: HostPort, timeout: float) -> bool:
    """Whether every address of `rpc` refuses a TCP connection (nothing listens there)."""
    try:
        with trio.fail_after(timeout):
            addresses = await trio.socket.getaddrinfo(
                rpc.host, rpc.port, type=trio.socket.SOCK_STREAM
            )
            for family, kind, proto, _, address in addresses:
                sock = trio.socket.socket(family, kind, proto)
                with sock:
                    try:
                        await sock.connect(address)
                    except ConnectionRefusedError:
                        continue
                    return False  # something answers (or tried to): not proven stopped
    except (OSError, trio.TooSlowError):
        return False
    return True


@dataclass(frozen=True, slots=True)
class LndSettings:
    rpc: HostPort
    tls_cert: Path
    sealed_password: Path
    timeout: float
    poll_interval: float = 0.2


class LndCustody:
    """Key custody for lnd: unlock after start, proven destroyed once lnd is stopped."""

    adapter = "lnd"

    def __init__(self, settings: LndSettings, kek: KekSource, events: EventLog) -> None:
        self._settings = settings
        self._kek = kek
        self._events = events
        self._held = False
        self._lock = trio.Lock()

    @property
    def held(self) -> bool:
        """Whether lnd may have its wallet unlocked by us (from just before the unlock)."""
        return self._held

    def __repr__(self) -> str:
        return f"LndCustody(rpc={self._settings.rpc}, held={self._held})"

    def _open_password(self) -> Secret:
        return open_sealed(self._settings.sealed_password, self._kek.load(), PASSWORD_ROLE)

    def cleanup_at_start(self) -> None:
        """Check that the sealed password opens with the KEK; lnd leaves nothing on disk.

        Raises KeyCustodyError (SealedFileError) if it does not.
        """
        self._open_password()

    async def materialize(self) -> None:
        """Check that the sealed password opens; lnd needs nothing before it starts.

        Raises KeyCustodyError if it does not. The keys are held only after unlock().
        """
        await trio.to_thread.run_sync(self._open_password)

    async def _wait_until_locked(self) -> WalletState:
        s = self._settings
        last = "no answer"
        with trio.move_on_after(s.timeout):
            while True:
                try:
                    state = await lnd_state(s.rpc, s.tls_cert, s.timeout)
                except LndUnreachable as e:
                    last = str(e)
                else:
                    if state == WalletState.NON_EXISTING:
                        raise LndError(
                            f"lnd at {s.rpc} has no wallet yet: create it once with "
                            "`lncli create` before haproxy-ln manages it"
                        )
                    if state == WalletState.LOCKED or state.holds_keys:
                        return state
                    last = f"state {state.name}"
                await trio.sleep(s.poll_interval)
        raise LndUnreachable(
            f"lnd at {s.rpc} was not ready for its wallet password within {s.timeout} s "
            f"(last: {last})"
        )

    async def unlock(self) -> None:
        """Unlock lnd's wallet, once lnd has started and waits for it (state LOCKED).

        Emits "keys.materialized" before the password is sent. If an lnd we
        unlocked is LOCKED again (it was restarted), "keys.destroyed" is
        recorded first and the password sent again. Raises
        WrongWalletPassword (then "keys.destroyed": the wallet stayed locked),
        LndUnreachable if lnd is not ready within the timeout, LndError,
        KeyCustodyError if the sealed password does not open.
        """
        s = self._settings
        async with self._lock:
            password = await trio.to_thread.run_sync(self._open_password)
            state = await self._wait_until_locked()
            if self._held:
                if state.holds_keys:
                    return  # the lnd we unlocked is still running
                # LOCKED: the lnd we unlocked is gone (it crashed and was started again
                # without destroy()), and its keys with it; the new one needs the password.
                # This returned at once, so the restarted lnd stayed locked for good (found
                # by the chaos suite: kill -9 of the active PostgreSQL in lnd mode).
                await trio.to_thread.run_sync(
                    partial(
                        self._events.emit, "keys.destroyed", adapter="lnd", reason="lnd restarted"
                    )
                )
                self._held = False
            if state.holds_keys:
                # lnd opened its wallet without us (wallet-unlock-password-file?): it holds keys.
                log.warning("lnd at %s was already unlocked (%s)", s.rpc, state.name)
                await trio.to_thread.run_sync(
                    partial(self._events.emit, "keys.materialized", adapter="lnd", already=True)
                )
                self._held = True
                return
            await trio.to_thread.run_sync(
                partial(self._events.emit, "keys.materialized", adapter="lnd")
            )
            self._held = True
            try:
                await unlock_wallet(s.rpc, s.tls_cert, password, s.timeout)
            except WrongWalletPassword:
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(
                        partial(
                            self._events.emit,
                            "keys.destroyed",
                            adapter="lnd",
                            reason="password refused",
                        )
                    )
                    self._held = False
                raise
            log.info("lnd at %s unlocked", s.rpc)

    async def _proven_stopped(self) -> bool:
        s = self._settings
        probe_timeout = min(s.timeout, 2.0)
        try:
            state = await lnd_state(s.rpc, s.tls_cert, probe_timeout)
        except LndUnreachable:
            return await port_refuses(s.rpc, probe_timeout)
        return not state.holds_keys

    async def destroy(self) -> None:
        """Record that lnd no longer holds its keys, after proving it: call it once the
        daemon is stopped. Runs to the end even if the caller is cancelled.

        Raises KeyCustodyError while lnd still answers unlocked, or cannot be
        shown stopped (it answers nothing yet its port accepts connections).
        """
        s = self._settings
        with trio.CancelScope(shield=True):
            async with self._lock:
                if not self._held:
                    return
                if not await self._proven_stopped():
                    raise KeyCustodyError(
                        f"lnd at {s.rpc} may still hold its keys (it is unlocked or does not "
                        "answer while its port is open): stop the daemon before destroy()"
                    )
                await trio.to_thread.run_sync(
                    partial(self._events.emit, "keys.destroyed", adapter="lnd")
                )
                self._held = False

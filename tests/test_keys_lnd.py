"""lnd custody against an in-process gRPC server over TLS that behaves like lnd's unlocker.

`FakeLnd` serves lnrpc.State/GetState and lnrpc.WalletUnlocker/UnlockWallet
the way lnd does before its wallet is open: LOCKED until the right password
arrives (then RPC_ACTIVE), "invalid passphrase for master public key" (gRPC
UNKNOWN) for a wrong one. Its TLS certificate is made here, self-signed like
lnd's tls.cert.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import trio

from haproxy_ln.config import HostPort, KeysConfig
from haproxy_ln.errors import KeyCustodyError, LndError, LndUnreachable, WrongWalletPassword
from haproxy_ln.events import EventLog, read_events
from haproxy_ln.keys import PASSWORD_ROLE, LndCustody, WalletState, custody_from_config, lnd_state
from haproxy_ln.keys.lnd import LndSettings
from haproxy_ln.keys.lnrpc import decode_unlock_request, encode_get_state_response
from haproxy_ln.keys.sealing import Kek, KekSource, seal
from haproxy_ln.sim.wallet import self_signed

PASSWORD = b"correct horse battery staple 42"


@dataclass(frozen=True)
class TlsIdentity:
    cert_pem: bytes
    key_pem: bytes


def make_tls_identity() -> TlsIdentity:
    """A self-signed certificate for localhost and 127.0.0.1, like lnd's tls.cert."""
    return TlsIdentity(*self_signed([]))


class FakeLnd:
    """lnd before its wallet is open: the State and WalletUnlocker services over TLS."""

    def __init__(self, identity: TlsIdentity, password: bytes = PASSWORD) -> None:
        self.password = password
        self.state = WalletState.LOCKED
        self.unlock_attempts = 0
        self.delay = 0.0  # seconds each call takes, to show the trio loop keeps running
        self.ready_after = 0  # GetState calls answered UNAVAILABLE first, like a starting lnd
        self._lock = threading.Lock()
        self._server = grpc.server(ThreadPoolExecutor(max_workers=4))
        self._server.add_generic_rpc_handlers(
            (
                grpc.method_handlers_generic_handler(
                    "lnrpc.State", {"GetState": grpc.unary_unary_rpc_method_handler(self._state)}
                ),
                grpc.method_handlers_generic_handler(
                    "lnrpc.WalletUnlocker",
                    {"UnlockWallet": grpc.unary_unary_rpc_method_handler(self._unlock)},
                ),
            )
        )
        credentials = grpc.ssl_server_credentials([(identity.key_pem, identity.cert_pem)])
        port = self._server.add_secure_port("127.0.0.1:0", credentials)
        self.rpc = HostPort("127.0.0.1", port)

    def start(self) -> FakeLnd:
        self._server.start()
        return self

    def stop(self) -> None:
        self._server.stop(grace=None).wait()

    def _state(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        time.sleep(self.delay)
        with self._lock:
            if self.ready_after > 0:
                self.ready_after -= 1
                context.abort(grpc.StatusCode.UNAVAILABLE, "lnd is starting")
            return encode_get_state_response(self.state)

    def _unlock(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        time.sleep(self.delay)
        password = decode_unlock_request(request)
        with self._lock:
            self.unlock_attempts += 1
            if self.state != WalletState.LOCKED:
                context.abort(
                    grpc.StatusCode.UNKNOWN,
                    "wallet already unlocked, WalletUnlocker service is no longer available",
                )
            if password != self.password:
                context.abort(grpc.StatusCode.UNKNOWN, "invalid passphrase for master public key")
            self.state = WalletState.RPC_ACTIVE
        return b""


@pytest.fixture(scope="module")
def identity() -> TlsIdentity:
    return make_tls_identity()


@pytest.fixture
def tls_cert(tmp_path: Path, identity: TlsIdentity) -> Path:
    path = tmp_path / "tls.cert"
    path.write_bytes(identity.cert_pem)
    return path


@pytest.fixture
def lnd(identity: TlsIdentity) -> Iterator[FakeLnd]:
    server = FakeLnd(identity).start()
    try:
        yield server
    finally:
        server.stop()


class Node:
    """The custody's side: KEK, sealed password and event log, for one fake lnd."""

    def __init__(self, tmp_path: Path, lnd: FakeLnd, tls_cert: Path, password: bytes) -> None:
        kek = Kek.generate()
        self.kek_file = tmp_path / "kek"
        self.kek_file.write_bytes(kek.to_text())
        self.kek_file.chmod(0o400)
        self.sealed = tmp_path / "wallet-password.sealed"
        self.sealed.write_bytes(seal(password, kek, PASSWORD_ROLE))
        self.events_path = tmp_path / "events.jsonl"
        cfg = KeysConfig.model_validate(
            {
                "adapter": "lnd",
                "kek_file": str(self.kek_file),
                "lnd_rpc": str(lnd.rpc),
                "lnd_tls_cert": str(tls_cert),
                "lnd_wallet_password": str(self.sealed),
                "lnd_timeout": 5.0,
            }
        )
        custody = custody_from_config(cfg, EventLog(self.events_path, "a"))
        assert isinstance(custody, LndCustody)
        self.custody = custody

    def kinds(self) -> list[str]:
        if not self.events_path.exists():
            return []
        return [e.kind for e in read_events(self.events_path)]


def make_node(tmp_path: Path, lnd: FakeLnd, tls_cert: Path, password: bytes = PASSWORD) -> Node:
    return Node(tmp_path, lnd, tls_cert, password)


async def test_state_of_a_locked_lnd(lnd: FakeLnd, tls_cert: Path) -> None:
    assert await lnd_state(lnd.rpc, tls_cert, 5.0) == WalletState.LOCKED
    lnd.state = WalletState.SERVER_ACTIVE
    assert await lnd_state(lnd.rpc, tls_cert, 5.0) == WalletState.SERVER_ACTIVE


async def test_unlock_with_the_right_password_makes_lnd_active(
    tmp_path: Path, lnd: FakeLnd, tls_cert: Path
) -> None:
    node = make_node(tmp_path, lnd, tls_cert)
    node.custody.cleanup_at_start()
    await node.custody.materialize()
    assert not node.custody.held  # nothing is held before lnd is unlocked
    await node.custody.unlock()
    assert node.custody.held
    assert await lnd_state(lnd.rpc, tls_cert, 5.0) == WalletState.RPC_ACTIVE
    assert node.kinds() == ["keys.materialized"]
    assert read_events(node.events_path)[0].fields == {"adapter": "lnd"}
    await node.custody.unlock()  # already held: no second attempt
    assert lnd.unlock_attempts == 1


async def test_wrong_password_is_reported_without_echoing_it(
    tmp_path: Path,
    lnd: FakeLnd,
    tls_cert: Path,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    caplog.set_level(logging.DEBUG)
    wrong = b"wrong password 1234"
    node = make_node(tmp_path, lnd, tls_cert, password=wrong)
    with pytest.raises(WrongWalletPassword) as info:
        await node.custody.unlock()
    text = str(info.value)
    assert "refused the wallet password" in text and "wallet stays locked" in text
    assert not node.custody.held
    assert lnd.state == WalletState.LOCKED
    assert node.kinds() == ["keys.materialized", "keys.destroyed"]
    out, err = capfd.readouterr()
    blob = "\n".join([text, repr(info.value), caplog.text, out, err, node.events_path.read_text()])
    for password in (wrong, PASSWORD):
        assert password.decode() not in blob
        assert password.hex() not in blob


async def test_unlock_waits_for_a_starting_lnd(
    tmp_path: Path, lnd: FakeLnd, tls_cert: Path
) -> None:
    lnd.ready_after = 3  # lnd answers UNAVAILABLE while it starts
    node = make_node(tmp_path, lnd, tls_cert)
    settings = LndSettings(lnd.rpc, tls_cert, node.sealed, timeout=5.0, poll_interval=0.01)
    custody = LndCustody(settings, KekSource(file=node.kek_file), EventLog(None, "a"))
    await custody.unlock()
    assert lnd.state == WalletState.RPC_ACTIVE
    assert lnd.ready_after == 0


async def test_unlock_of_an_lnd_without_wallet_says_to_create_one(
    tmp_path: Path, lnd: FakeLnd, tls_cert: Path
) -> None:
    lnd.state = WalletState.NON_EXISTING
    node = make_node(tmp_path, lnd, tls_cert)
    with pytest.raises(LndError, match="has no wallet yet: create it once with `lncli create`"):
        await node.custody.unlock()
    assert not node.custody.held and node.kinds() == []


async def test_already_unlocked_lnd_counts_as_holding_keys(
    tmp_path: Path, lnd: FakeLnd, tls_cert: Path
) -> None:
    lnd.state = WalletState.SERVER_ACTIVE
    node = make_node(tmp_path, lnd, tls_cert)
    await node.custody.unlock()
    assert node.custody.held
    assert lnd.unlock_attempts == 0
    assert read_events(node.events_path)[0].fields == {"adapter": "lnd", "already": True}


async def test_destroy_refuses_while_lnd_is_still_unlocked(
    tmp_path: Path, lnd: FakeLnd, tls_cert: Path
) -> None:
    node = make_node(tmp_path, lnd, tls_cert)
    await node.custody.unlock()
    with pytest.raises(KeyCustodyError, match="may still hold its keys"):
        await node.custody.destroy()
    assert node.custody.held
    assert node.kinds() == ["keys.materialized"]


async def test_destroy_records_the_end_once_lnd_is_stopped(
    tmp_path: Path, lnd: FakeLnd, tls_cert: Path
) -> None:
    node = make_node(tmp_path, lnd, tls_cert)
    await node.custody.unlock()
    lnd.stop()  # the daemon supervisor stopped lnd: its port now refuses connections
    await node.custody.destroy()
    assert not node.custody.held
    assert node.kinds() == ["keys.materialized", "keys.destroyed"]


async def test_destroy_accepts_an_lnd_that_restarted_locked(
    tmp_path: Path, lnd: FakeLnd, tls_cert: Path
) -> None:
    node = make_node(tmp_path, lnd, tls_cert)
    await node.custody.unlock()
    lnd.state = WalletState.LOCKED
    await node.custody.destroy()
    assert node.kinds() == ["keys.materialized", "keys.destroyed"]


async def test_destroy_refuses_when_lnd_hangs_with_its_port_open(
    tmp_path: Path, lnd: FakeLnd, tls_cert: Path
) -> None:
    node = make_node(tmp_path, lnd, tls_cert)
    lnd.stop()
    with trio.socket.socket() as hung:  # accepts connections, never answers: a stopped process
        await hung.bind(("127.0.0.1", lnd.rpc.port))
        hung.listen()
        settings = LndSettings(lnd.rpc, tls_cert, node.sealed, timeout=0.3)
        custody = LndCustody(settings, KekSource(file=node.kek_file), EventLog(None, "a"))
        custody._held = True  # as after unlock(); the hung lnd cannot be unlocked again
        with pytest.raises(KeyCustodyError, match="does not answer while its port is open"):
            await custody.destroy()
        assert custody.held


async def test_unreachable_lnd_is_reported_as_such(tmp_path: Path, tls_cert: Path) -> None:
    with trio.socket.socket() as sock:  # a port that is surely closed: bound, never listening
        await sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        with pytest.raises(LndUnreachable, match=f"lnd at 127.0.0.1:{port} is unreachable"):
            await lnd_state(HostPort("127.0.0.1", port), tls_cert, 5.0)


async def test_certificate_of_another_lnd_is_refused(
    tmp_path: Path, lnd: FakeLnd, identity: TlsIdentity
) -> None:
    other = tmp_path / "other.cert"
    other.write_bytes(make_tls_identity().cert_pem)
    with pytest.raises(LndUnreachable):
        await lnd_state(lnd.rpc, other, 5.0)


async def test_missing_tls_cert_is_named(tmp_path: Path, lnd: FakeLnd) -> None:
    with pytest.raises(LndError, match=r"cannot read lnd's TLS certificate .*nope\.cert"):
        await lnd_state(lnd.rpc, tmp_path / "nope.cert", 5.0)


async def test_slow_lnd_hits_the_deadline(lnd: FakeLnd, tls_cert: Path) -> None:
    lnd.delay = 1.0
    with pytest.raises(LndUnreachable, match=r"did not answer GetState within 0\.2 s"):
        await lnd_state(lnd.rpc, tls_cert, 0.2)


async def test_calls_do_not_block_the_trio_loop(lnd: FakeLnd, tls_cert: Path) -> None:
    lnd.delay = 0.3
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await trio.sleep(0.01)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(ticker)
        await lnd_state(lnd.rpc, tls_cert, 5.0)
        nursery.cancel_scope.cancel()
    assert ticks > 1  # other tasks ran while the call was in flight


async def test_sealed_password_that_does_not_open_fails_at_start(
    tmp_path: Path, lnd: FakeLnd, tls_cert: Path
) -> None:
    node = make_node(tmp_path, lnd, tls_cert)
    node.sealed.write_bytes(seal(PASSWORD, Kek.generate(), PASSWORD_ROLE))
    with pytest.raises(KeyCustodyError, match="sealed under another KEK"):
        node.custody.cleanup_at_start()
    with pytest.raises(KeyCustodyError, match="sealed under another KEK"):
        await node.custody.materialize()
    assert lnd.unlock_attempts == 0

"""`lnd` mode's wallet: the gRPC services lnd serves before and after its wallet opens.

How this works: like lnd, the simulator starts locked. It serves
`lnrpc.State/GetState` and `lnrpc.WalletUnlocker/UnlockWallet` over TLS with a
self-signed certificate (lnd's tls.cert: written to the configured path, with
its key next to it, and reused if both exist), using the message encoders in
haproxy_ln/keys/lnrpc.py. The wallet password is compared in constant time
with the one read from the simulator's password file (the same secret
haproxy-ln seals and sends). A wrong one gets lnd's own answer (gRPC UNKNOWN,
"invalid passphrase for master public key"), which haproxy-ln's client turns
into WrongWalletPassword. Only after the right one does the runner touch the
database; the state then goes UNLOCKED -> RPC_ACTIVE (database open) ->
SERVER_ACTIVE (updating channels), which haproxy-ln's `lnd` readiness probe
waits for.
"""

from __future__ import annotations

import datetime
import hmac
import ipaddress
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from haproxy_ln.config import HostPort
from haproxy_ln.errors import SimulatorError
from haproxy_ln.keys.lnrpc import (
    WalletState,
    decode_unlock_request,
    encode_get_state_response,
)

__all__ = ["WalletServer", "load_or_create_tls", "self_signed"]

_CERT_DAYS = 365 * 10  # lnd's default validity is 14 months; a drill tool can keep its own


def self_signed(hosts: list[str]) -> tuple[bytes, bytes]:
    """A self-signed P-256 certificate for localhost and `hosts`, like lnd's tls.cert:
    (certificate PEM, key PEM)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "haproxy-ln simulated lnd")])
    names: list[x509.GeneralName] = []
    for host in dict.fromkeys(["localhost", "127.0.0.1", "::1", *hosts]):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=_CERT_DAYS))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def _write_new(path: Path, data: bytes, mode: int) -> None:
    temp = path.with_name(f".{path.name}.tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temp, path)


def load_or_create_tls(cert_path: Path, key_path: Path, host: str) -> tuple[bytes, bytes]:
    """(certificate, key) in PEM: read from the paths if both exist, else created and written.

    Raises SimulatorError if they cannot be read or written.
    """
    try:
        if cert_path.exists() and key_path.exists():
            return cert_path.read_bytes(), key_path.read_bytes()
        cert, key = self_signed([host])
        _write_new(key_path, key, 0o600)
        _write_new(cert_path, cert, 0o644)
        return cert, key
    except OSError as e:
        raise SimulatorError(f"cannot set up the TLS certificate {cert_path}: {e}") from None


class WalletServer:
    """GetState and UnlockWallet over TLS; `unlocked` is set once the right password came."""

    def __init__(self, rpc: HostPort, cert: bytes, key: bytes, password: bytes) -> None:
        """Bind `rpc` (port 0: any free port; see `address`).

        Raises SimulatorError if the address cannot be bound or the TLS files are unusable.
        """
        self._password = password
        self._lock = threading.Lock()
        self._state = WalletState.LOCKED
        self.unlocked = threading.Event()
        self.unlock_attempts = 0
        self._server = grpc.server(ThreadPoolExecutor(max_workers=2, thread_name_prefix="wallet"))
        self._server.add_generic_rpc_handlers(
            (
                grpc.method_handlers_generic_handler(
                    "lnrpc.State",
                    {"GetState": grpc.unary_unary_rpc_method_handler(self._get_state)},
                ),
                grpc.method_handlers_generic_handler(
                    "lnrpc.WalletUnlocker",
                    {"UnlockWallet": grpc.unary_unary_rpc_method_handler(self._unlock)},
                ),
            )
        )
        try:
            credentials = grpc.ssl_server_credentials([(key, cert)])
            port = self._server.add_secure_port(str(rpc), credentials)
        except (RuntimeError, ValueError) as e:
            raise SimulatorError(f"cannot serve lnd's gRPC interface on {rpc}: {e}") from None
        if port == 0:
            raise SimulatorError(f"cannot serve lnd's gRPC interface on {rpc}: address in use?")
        self.address = HostPort(rpc.host, port)

    def __repr__(self) -> str:
        return f"WalletServer({self.address}, {self._state.name})"

    @property
    def state(self) -> WalletState:
        with self._lock:
            return self._state

    def advance(self, state: WalletState) -> None:
        """Report `state` from now on (RPC_ACTIVE, SERVER_ACTIVE once running)."""
        with self._lock:
            self._state = state

    def start(self) -> WalletServer:
        self._server.start()
        return self

    def stop(self) -> None:
        self._server.stop(grace=None).wait()

    def _get_state(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        return encode_get_state_response(self.state)

    def _unlock(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        try:
            password = decode_unlock_request(request)
        except Exception:  # protobuf's DecodeError: a garbled request
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "not an UnlockWalletRequest")
        with self._lock:
            self.unlock_attempts += 1
            if self._state != WalletState.LOCKED:
                context.abort(
                    grpc.StatusCode.UNKNOWN,
                    "wallet already unlocked, WalletUnlocker service is no longer available",
                )
            if not hmac.compare_digest(password, self._password):
                context.abort(grpc.StatusCode.UNKNOWN, "invalid passphrase for master public key")
            self._state = WalletState.UNLOCKED
        self.unlocked.set()
        return b""

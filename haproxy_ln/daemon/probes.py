"""Readiness probes: is the started daemon ready to do its work?

How this works: a probe is one small class with `check()`, which answers a
`ProbeResult` (ready or not, and a short reason) within the probe's timeout
and never raises for a daemon that is merely not ready yet. The supervisor
calls it every `probe_interval` until it says ready or the start times out.
Adding a kind of probe is one subclass plus one case in `probe_for`, as
`LndProbe` shows.
"""

from __future__ import annotations

import abc
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import trio

from haproxy_ln.config import DaemonConfig, HostPort
from haproxy_ln.daemon.commands import run_command
from haproxy_ln.errors import LndError

__all__ = [
    "CommandProbe",
    "LndProbe",
    "NoProbe",
    "Probe",
    "ProbeResult",
    "TcpProbe",
    "probe_for",
]


@dataclass(frozen=True, slots=True)
class ProbeResult:
    """One probe's answer; `detail` says why, for logs and errors (never a secret)."""

    ready: bool
    detail: str


class Probe(abc.ABC):
    """Tells whether the daemon is ready."""

    @abc.abstractmethod
    async def check(self) -> ProbeResult:
        """Probe once; returns within the probe's own timeout, never raises for "not ready"."""

    @abc.abstractmethod
    def describe(self) -> str:
        """What is probed, e.g. "tcp 127.0.0.1:9735"."""


class NoProbe(Probe):
    """Ready as soon as the daemon has been started."""

    async def check(self) -> ProbeResult:
        return ProbeResult(True, "no readiness probe configured")

    def describe(self) -> str:
        return "none"


class TcpProbe(Probe):
    """Ready when `address` accepts a TCP connection (closed again at once)."""

    def __init__(self, address: HostPort, timeout: float) -> None:
        self.address = address
        self.timeout = timeout

    async def check(self) -> ProbeResult:
        with trio.move_on_after(self.timeout):
            try:
                stream = await trio.open_tcp_stream(self.address.host, self.address.port)
            except OSError as e:
                return ProbeResult(False, f"{self.address}: {_connect_error(e)}")
            await stream.aclose()
            return ProbeResult(True, f"{self.address} accepts connections")
        return ProbeResult(False, f"{self.address}: no connection within {self.timeout:g} s")

    def describe(self) -> str:
        return f"tcp {self.address}"


def _connect_error(error: OSError) -> str:
    """Why a connection failed, e.g. "connection refused" (trio groups one error per address)."""
    cause = error.__cause__
    if isinstance(cause, BaseExceptionGroup):
        inner = [e for e in cause.exceptions if isinstance(e, OSError) and e.errno]
        if inner:
            error = inner[-1]
    return os.strerror(error.errno).lower() if error.errno else str(error)


class CommandProbe(Probe):
    """Ready when `argv` exits 0 within the timeout."""

    def __init__(self, argv: Sequence[str], timeout: float) -> None:
        self.argv = tuple(argv)
        self.timeout = timeout

    async def check(self) -> ProbeResult:
        outcome = await run_command(self.argv, self.timeout)
        return ProbeResult(outcome.ok, str(outcome))

    def describe(self) -> str:
        return f"command {os.path.basename(self.argv[0])}"


class LndProbe(Probe):
    """Ready when lnd's State.GetState says RPC_ACTIVE or SERVER_ACTIVE.

    lnd starts locked, so it gets there only once the keys adapter has
    unlocked it: run the unlock alongside `start()`, not after it.
    """

    def __init__(self, rpc: HostPort, tls_cert: Path, timeout: float) -> None:
        self.rpc = rpc
        self.tls_cert = tls_cert
        self.timeout = timeout

    async def check(self) -> ProbeResult:
        # Imported here: grpc is heavy, and only lnd users need it.
        from haproxy_ln.keys.lnd import lnd_state
        from haproxy_ln.keys.lnrpc import WalletState

        try:
            state = await lnd_state(self.rpc, self.tls_cert, self.timeout)
        except LndError as e:
            return ProbeResult(False, str(e))
        ready = state in (WalletState.RPC_ACTIVE, WalletState.SERVER_ACTIVE)
        return ProbeResult(ready, f"lnd at {self.rpc} is {state.name}")

    def describe(self) -> str:
        return f"lnd {self.rpc}"


def probe_for(config: DaemonConfig) -> Probe:
    """The probe `config` asks for (config validation guarantees its settings)."""
    if config.probe == "tcp":
        assert config.probe_address is not None
        return TcpProbe(config.probe_address, config.probe_timeout)
    if config.probe == "command":
        assert config.probe_command is not None
        return CommandProbe(config.probe_command, config.probe_timeout)
    if config.probe == "lnd":
        assert config.probe_address is not None and config.probe_tls_cert is not None
        return LndProbe(config.probe_address, Path(config.probe_tls_cert), config.probe_timeout)
    return NoProbe()

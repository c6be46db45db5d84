"""The typed per-node configuration: one TOML file, validated into frozen models.

`load` reads and validates a file and raises `ConfigError` listing every
problem, each as one sentence naming the key, what was given and what is
allowed; values of secret keys (`SecretStr`, `SecretBytes`, `Secret`) are never
shown. `render` writes the effective configuration back as TOML that `load`
accepts again.

To add a section: write one `_Section` subclass and add it as a field of
`Config`; errors and rendering pick it up without further changes.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
import types
import typing
from dataclasses import dataclass
from typing import Annotated, Any, Literal, TypeVar

import pydantic
import tomli_w
from pydantic import (
    AfterValidator,
    BaseModel,
    ByteSize,
    ConfigDict,
    Field,
    GetCoreSchemaHandler,
    GetJsonSchemaHandler,
    SecretBytes,
    SecretStr,
    ValidationError,
    ValidationInfo,
    ValidatorFunctionWrapHandler,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import ErrorDetails, PydanticCustomError, core_schema

from haproxy_ln.errors import ConfigError
from haproxy_ln.ha.model import Timing
from haproxy_ln.pgwire.dsn import PgTarget

__all__ = [
    "Config",
    "DaemonConfig",
    "EtcdConfig",
    "HaConfig",
    "HealthConfig",
    "HostPort",
    "KeysConfig",
    "NodeConfig",
    "ProxyConfig",
    "ReplicationConfig",
    "format_problems",
    "load",
    "load_model",
    "render",
]

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

REDACTED = "<redacted>"
# pydantic.Secret[T] exists from pydantic 2.7 on; SecretStr and SecretBytes always.
_SECRET_TYPES: tuple[type, ...] = tuple(
    t for t in (SecretStr, SecretBytes, getattr(pydantic, "Secret", None)) if t is not None
)

M = TypeVar("M", bound=BaseModel)


# --- value types ---------------------------------------------------------------------------

_HOSTNAME_LABEL = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")
_HOST_PORT_EXPECTED = "HOST:PORT with port 1..65535"


def _host_port_error(reason: str) -> PydanticCustomError:
    return PydanticCustomError(
        "host_port",
        "expected {expected}; {reason}",
        {"expected": _HOST_PORT_EXPECTED, "reason": reason},
    )


def _is_ipv4(host: str) -> bool:
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        return False
    return True


def _is_hostname(host: str) -> bool:
    labels = host.removesuffix(".").split(".")
    return (
        len(host) <= 253
        and all(_HOSTNAME_LABEL.match(label) for label in labels)
        and not labels[-1].isdigit()  # all-numeric: a malformed IPv4 address, not a name
    )


@dataclass(frozen=True, slots=True)
class HostPort:
    """An address to listen on or connect to; written `host:port` or `[ipv6]:port`."""

    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @classmethod
    def parse(cls, value: object) -> HostPort:
        """Parse `host:port` or `[ipv6]:port`; raises PydanticCustomError saying why not."""
        if isinstance(value, HostPort):
            return value
        if not isinstance(value, str):
            raise _host_port_error("not a string")
        host, colon, port_text = value.rpartition(":")
        if not colon or (value.startswith("[") and value.endswith("]")):
            raise _host_port_error("no ':PORT' given")
        if not re.fullmatch(r"[0-9]+", port_text):
            raise _host_port_error(f"the port {port_text!r} is not a number")
        if len(port_text) > 5 or not 1 <= int(port_text) <= 65535:
            raise _host_port_error(f"port {port_text} is out of range")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
            try:
                ipaddress.IPv6Address(host)
            except ValueError:
                raise _host_port_error(f"{host!r} is not an IPv6 address") from None
        elif ":" in host:
            raise _host_port_error("an IPv6 host must be in brackets, e.g. [::1]:6432")
        elif not host:
            raise _host_port_error("the host is empty")
        elif not _is_ipv4(host) and not _is_hostname(host):
            raise _host_port_error(f"{host!r} is neither an IPv4 address nor a hostname")
        return cls(host, int(port_text))

    @classmethod
    def __get_pydantic_core_schema__(
        cls, source: type[Any], handler: GetCoreSchemaHandler
    ) -> core_schema.CoreSchema:
        return core_schema.no_info_plain_validator_function(
            cls.parse,
            serialization=core_schema.plain_serializer_function_ser_schema(str, when_used="json"),
        )

    @classmethod
    def __get_pydantic_json_schema__(
        cls, schema: core_schema.CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        return {"type": "string", "description": _HOST_PORT_EXPECTED}


_UNITS = (("GiB", GiB), ("MiB", MiB), ("KiB", KiB))


def _size_toml(n: int) -> int | str:
    """How a size is written to TOML: "64MiB" when a binary unit divides it, else int bytes."""
    for unit, factor in _UNITS:
        if n >= factor and n % factor == 0:
            return f"{n // factor}{unit}"
    return n


def _size_text(n: int) -> str:
    """`n` bytes for a message, e.g. "64MiB" or "1073741823 bytes (1GiB - 1)"."""
    text = _size_toml(n)
    if isinstance(text, str):
        return text
    just_below = _size_toml(n + 1)
    return f"{n} bytes" + (f" ({just_below} - 1)" if isinstance(just_below, str) else "")


@dataclass(frozen=True, slots=True)
class SizeRange:
    """Constrains a `ByteSize` field to lo..hi bytes (and optionally powers of two).

    Use as `Annotated[ByteSize, SizeRange(lo, hi)]`; renders as "64MiB" when exact.
    """

    lo: int
    hi: int
    power_of_two: bool = False

    @property
    def expected(self) -> str:
        kind = "a power-of-two size" if self.power_of_two else "a size"
        return (
            f"{kind} from {_size_text(self.lo)} to {_size_text(self.hi)}, "
            'as an integer number of bytes or a string like "16KiB" or "64MiB"'
        )

    def _validate(self, value: object, handler: ValidatorFunctionWrapHandler) -> ByteSize:
        try:
            if isinstance(value, bool | float):  # ByteSize would take true as 1, 8192.7 as 8192
                raise ValueError(value)
            size: ByteSize = handler(value)
        except (ValueError, ValidationError):
            error = PydanticCustomError("size", "expected {expected}", {"expected": self.expected})
            raise error from None
        reason = None
        if not self.lo <= size <= self.hi:
            reason = f"{size} bytes is out of range"
        elif self.power_of_two and size & (size - 1):
            reason = f"{size} bytes is not a power of two"
        if reason is not None:
            raise PydanticCustomError(
                "size",
                "expected {expected}; {reason}",
                {"expected": self.expected, "reason": reason},
            )
        return size

    def __get_pydantic_core_schema__(
        self, source: type[Any], handler: GetCoreSchemaHandler
    ) -> core_schema.CoreSchema:
        return core_schema.no_info_wrap_validator_function(
            self._validate,
            handler(source),
            serialization=core_schema.plain_serializer_function_ser_schema(
                _size_toml, when_used="json"
            ),
        )


# --- sections --------------------------------------------------------------------------------


class _Section(BaseModel):
    """Base of every section: immutable, unknown keys rejected, no type coercion."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)


class NodeConfig(_Section):
    """[node]: who this node is."""

    name: str = Field(
        pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$",
        description='this node\'s name in the pair, e.g. "a"',
    )
    peer: str | None = Field(
        default=None,
        pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$",
        description='the other node\'s name, e.g. "b" (unset: no peer, this node runs alone)',
    )
    peer_health: HostPort | None = Field(
        default=None,
        description="HOST:PORT of the peer's health server ([health] listen there), which "
        "`haproxy-ln status` asks for the peer's /status (unset: the peer is shown from etcd only)",
    )
    event_log: str = Field(
        default="/var/lib/haproxy-ln/events.jsonl",
        min_length=1,
        description="file the agent appends its safety events to (keys, daemon, lease, "
        "fencing), one JSON line each, for audits and the one-signer checker",
    )


class ProxyConfig(_Section):
    """[proxy]: the PostgreSQL wire proxy in front of the local database."""

    listen: HostPort = Field(
        default=HostPort("127.0.0.1", 6432),
        description="HOST:PORT the proxy listens on for the Lightning daemon",
    )
    upstream: HostPort = Field(
        default=HostPort("127.0.0.1", 5432),
        description="HOST:PORT of the local PostgreSQL",
    )
    max_message_size: Annotated[ByteSize, SizeRange(8 * KiB, GiB - 1)] = Field(
        default=ByteSize(64 * MiB),
        description="largest accepted length field of a client message, in bytes",
    )
    buffer_chunk: Annotated[ByteSize, SizeRange(4 * KiB, MiB, power_of_two=True)] = Field(
        default=ByteSize(16 * KiB),
        description="size of the standard pooled buffer",
    )
    buffer_budget: Annotated[ByteSize, SizeRange(MiB, 64 * GiB)] = Field(
        default=ByteSize(256 * MiB),
        description="total bytes all connection buffers may use together",
    )
    max_client_connections: int = Field(
        default=1000, ge=1, le=100_000, description="most client connections at once"
    )
    startup_timeout: float = Field(
        default=10.0,
        gt=0,
        le=600,
        description="seconds a new client has to finish its startup message",
    )
    connect_timeout: float = Field(
        default=5.0, gt=0, le=600, description="seconds to connect to upstream"
    )

    @field_validator("buffer_budget")
    @classmethod
    def _budget_fits_one_message(cls, budget: ByteSize, info: ValidationInfo) -> ByteSize:
        # Absent when invalid themselves. A held message needs its own buffer
        # (rounded up to whole chunks) plus the chunk being read when it began.
        max_message = info.data.get("max_message_size")
        chunk = info.data.get("buffer_chunk")
        if max_message is None or chunk is None:
            return budget
        needed = max_message + 2 * chunk
        if budget < needed:
            raise PydanticCustomError(
                "budget_below_message",
                "expected {expected}; {reason}",
                {
                    "expected": "at least max_message_size + 2 x buffer_chunk "
                    f"({_size_text(needed)})",
                    "reason": "one message of max_message_size must fit in the budget: "
                    "raise buffer_budget or lower max_message_size",
                },
            )
        return budget


def _check_pg_url(value: str) -> str:
    try:
        PgTarget.parse(value)
    except ValueError as e:
        raise PydanticCustomError(
            "pg_url",
            "expected {expected}; {reason}",
            {"expected": "a URL like postgresql://user@host:5432/dbname", "reason": str(e)},
        ) from None
    return value


PgUrl = Annotated[str, AfterValidator(_check_pg_url)]
_PG_NAME = r"^[a-z_][a-z0-9_]{0,62}$"


class ReplicationConfig(_Section):
    """[replication]: synchronous logical replication of the local primary to the peer."""

    source: PgUrl = Field(
        default="postgresql://postgres@127.0.0.1:5432/lightning",
        description="the local PostgreSQL and database to capture, as a superuser "
        "with REPLICATION (bootstrap creates a publication and an event trigger)",
    )
    source_password: SecretStr | None = Field(
        default=None, description="password for `source`, if it needs one"
    )
    replica: PgUrl | None = Field(
        default=None, description="the peer's PostgreSQL and database: the replica store"
    )
    replica_password: SecretStr | None = Field(
        default=None, description="password for `replica`, if it needs one"
    )
    sync_name: str = Field(
        default="haproxy_ln",
        pattern=_PG_NAME,
        description="application_name of the replication connection, the name put in "
        "synchronous_standby_names",
    )
    slot: str = Field(
        default="haproxy_ln", pattern=_PG_NAME, description="logical replication slot name"
    )
    mode: Literal["sync", "strict"] = Field(
        default="sync",
        description='"sync": degrade to running alone when the replica is lost; '
        '"strict": never, commits wait for the replica',
    )
    max_batch: int = Field(
        default=1000, ge=1, le=100_000, description="most source transactions per replica commit"
    )
    copy_workers: int = Field(
        default=2, ge=1, le=64, description="tables copied in parallel by an initial copy"
    )
    txlog_retention_days: float = Field(
        default=7.0, ge=0, le=36500, description="days the replica keeps txlog records (0: forever)"
    )
    connect_timeout: float = Field(
        default=5.0, gt=0, le=600, description="seconds to connect to either database"
    )

    def source_target(self) -> PgTarget:
        """`source` with its password attached, for connecting."""
        return _target(self.source, self.source_password)

    def replica_target(self) -> PgTarget | None:
        """`replica` with its password attached; None when no replica is configured."""
        return None if self.replica is None else _target(self.replica, self.replica_password)


def _target(url: str, password: SecretStr | None) -> PgTarget:
    return PgTarget.parse(url).with_password(password.get_secret_value() if password else None)


def _pair_error(expected: str, given: str, absent: str) -> PydanticCustomError:
    return PydanticCustomError(
        "pair",
        "expected {expected}; {reason}",
        {"expected": expected, "reason": f"{given} is set but {absent} is not"},
    )


class EtcdConfig(_Section):
    """[etcd]: the etcd cluster that decides which node of the pair is active."""

    endpoints: list[HostPort] = Field(
        default_factory=lambda: [HostPort("127.0.0.1", 2379)],
        min_length=1,
        max_length=16,
        description="HOST:PORT of each etcd member; a request that finds one unavailable "
        "tries the next",
    )
    prefix: str = Field(
        default="/haproxy-ln/default",
        pattern=r"^(/[A-Za-z0-9_-][A-Za-z0-9._-]{0,62}){1,8}$",
        description="etcd key prefix of this pair, the same on both nodes",
    )
    request_timeout: float = Field(
        default=0.5,
        gt=0,
        le=60,
        description="seconds one etcd request may take, all endpoints tried included",
    )
    ca_file: str | None = Field(
        default=None,
        min_length=1,
        description="PEM file of the CA that signed etcd's certificates; setting it turns TLS on",
    )
    cert_file: str | None = Field(
        default=None, min_length=1, description="PEM client certificate, for client-cert auth"
    )
    key_file: str | None = Field(
        default=None,
        min_length=1,
        validate_default=True,
        description="PEM private key of cert_file",
    )
    user: str | None = Field(default=None, min_length=1, description="etcd user name")
    password: SecretStr | None = Field(
        default=None, validate_default=True, description="password of the etcd user"
    )

    @field_validator("key_file")
    @classmethod
    def _client_cert_complete(cls, key_file: str | None, info: ValidationInfo) -> str | None:
        if "cert_file" not in info.data or "ca_file" not in info.data:  # invalid themselves
            return key_file
        cert_file = info.data["cert_file"]
        if cert_file is None and key_file is not None:
            raise _pair_error(
                "cert_file and key_file together, or neither", "key_file", "cert_file"
            )
        if cert_file is not None and key_file is None:
            raise _pair_error(
                "cert_file and key_file together, or neither", "cert_file", "key_file"
            )
        if cert_file is not None and info.data["ca_file"] is None:
            # a client certificate only means something over TLS, which ca_file turns on
            raise _pair_error("ca_file with a client certificate", "cert_file", "ca_file")
        return key_file

    @field_validator("password")
    @classmethod
    def _credentials_complete(
        cls, password: SecretStr | None, info: ValidationInfo
    ) -> SecretStr | None:
        if "user" not in info.data:  # invalid itself
            return password
        if info.data["user"] is None and password is not None:
            raise _pair_error("user and password together, or neither", "password", "user")
        if info.data["user"] is not None and password is None:
            raise _pair_error("user and password together, or neither", "user", "password")
        return password


# A TOML array of strings; kept as a tuple so the frozen model stays hashable.
Argv = Annotated[tuple[str, ...], Field(strict=False)]
_ARGV_MODES = {"command": "child", "start": "command", "stop": "command", "kill": "command"}
_PROBE_SETTINGS = {
    "probe_address": ("tcp", "lnd"),
    "probe_tls_cert": ("lnd",),
    "probe_command": ("command",),
}


class DaemonConfig(_Section):
    """[daemon]: how the Lightning daemon is started, awaited, stopped and killed."""

    mode: Literal["none", "child", "command"] = Field(
        default="none",
        description='"child": run `command` as a child process; "command": run the `start`, '
        '`stop` and `kill` commands (e.g. systemctl); "none": haproxy-ln runs no daemon',
    )
    command: Argv | None = Field(
        default=None,
        validate_default=True,
        description='the daemon\'s program and arguments; required when mode = "child", '
        'e.g. ["lightningd", "--conf=/etc/lightning/config"]',
    )
    start: Argv | None = Field(
        default=None,
        validate_default=True,
        description='command that starts the daemon; required when mode = "command", '
        'e.g. ["systemctl", "start", "lightningd.service"]',
    )
    stop: Argv | None = Field(
        default=None,
        validate_default=True,
        description="command that stops the daemon gracefully and waits; required when mode = "
        '"command", e.g. ["systemctl", "stop", "lightningd.service"]',
    )
    kill: Argv | None = Field(
        default=None,
        validate_default=True,
        description='command that kills the daemon at once; required when mode = "command", '
        'e.g. ["systemctl", "kill", "--signal=SIGKILL", "lightningd.service"]',
    )
    status: Argv | None = Field(
        default=None,
        validate_default=True,
        description='optional, mode = "command" only: exits 0 while any of the daemon runs, '
        "non-zero once it is wholly stopped",
    )
    probe: Literal["none", "tcp", "command", "lnd"] = Field(
        default="none",
        description='readiness probe: "tcp" (probe_address accepts a connection), "command" '
        '(probe_command exits 0), "lnd" (lnd\'s State.GetState at probe_address says '
        'RPC_ACTIVE or SERVER_ACTIVE) or "none" (ready once started)',
    )
    probe_address: HostPort | None = Field(
        default=None,
        validate_default=True,
        description="HOST:PORT the daemon listens on once ready (lnd: its gRPC interface); "
        'required when probe = "tcp" or "lnd"',
    )
    probe_tls_cert: str | None = Field(
        default=None,
        validate_default=True,
        description='absolute path of lnd\'s tls.cert; required when probe = "lnd"',
    )
    probe_command: Argv | None = Field(
        default=None,
        validate_default=True,
        description="command that exits 0 once the daemon is ready; required when probe = "
        '"command"',
    )
    start_timeout: float = Field(
        default=60.0,
        gt=0,
        le=3600,
        description="seconds from start to ready; after that start has failed and the daemon "
        "is killed",
    )
    stop_timeout: float = Field(
        default=30.0,
        gt=0,
        le=3600,
        description="seconds a graceful stop may take before the daemon is killed",
    )
    kill_timeout: float = Field(
        default=10.0,
        gt=0,
        le=600,
        description="seconds a kill may take (the kill command, or the processes to be gone)",
    )
    probe_interval: float = Field(
        default=0.5,
        gt=0,
        le=60,
        validate_default=True,
        description="seconds between readiness probes",
    )
    probe_timeout: float = Field(
        default=5.0,
        gt=0,
        le=600,
        validate_default=True,
        description="seconds one readiness probe may take",
    )

    @field_validator("command", "start", "stop", "kill", "status")
    @classmethod
    def _argv_fits_mode(
        cls, argv: tuple[str, ...] | None, info: ValidationInfo
    ) -> tuple[str, ...] | None:
        mode, key = info.data.get("mode"), info.field_name or ""
        if mode is None:  # itself invalid
            return argv
        if argv is not None and (not argv or not argv[0]):
            raise PydanticCustomError(
                "argv",
                "expected {expected}",
                {
                    "expected": 'a program and its arguments, e.g. ["lightningd"]; the program '
                    "is empty"
                },
            )
        used_in = _ARGV_MODES.get(key, "command")
        _check_only_when(argv, key, "mode", mode, used_in, required=key in _ARGV_MODES)
        return argv

    @field_validator("probe_address", "probe_tls_cert", "probe_command")
    @classmethod
    def _probe_setting_fits_probe(cls, value: Any, info: ValidationInfo) -> Any:
        probe, key = info.data.get("probe"), info.field_name or ""
        if probe is None:
            return value
        _check_only_when(value, key, "probe", probe, _PROBE_SETTINGS[key], required=True)
        if key == "probe_tls_cert" and value is not None and not value.startswith("/"):
            raise PydanticCustomError(
                "abs_path", "expected {expected}", {"expected": "an absolute path"}
            )
        return value

    @field_validator("probe_interval", "probe_timeout")
    @classmethod
    def _probe_fits_start_timeout(cls, seconds: float, info: ValidationInfo) -> float:
        start_timeout = info.data.get("start_timeout")
        if start_timeout is not None and seconds >= start_timeout:
            raise PydanticCustomError(
                "below_start_timeout",
                "expected {expected}; {reason}",
                {
                    "expected": f"less than start_timeout ({start_timeout})",
                    "reason": "a probe must fit in the time a start may take",
                },
            )
        return seconds


def _check_only_when(
    value: object,
    key: str,
    switch: str,
    chosen: str,
    used_in: str | tuple[str, ...],
    *,
    required: bool,
) -> None:
    """Raises PydanticCustomError, saying what to set, unless `value` suits `switch` = `chosen`."""
    used_in = (used_in,) if isinstance(used_in, str) else used_in
    if chosen in used_in and value is None and required:
        raise PydanticCustomError("missing", f"required when {switch} = {chosen!r}")
    if chosen not in used_in and value is not None:
        choices = " or ".join(f'"{c}"' for c in used_in)
        raise PydanticCustomError(
            "unused_setting",
            "expected {expected}; {reason}",
            {
                "expected": f"no {key}: it is used only when {switch} = {choices}",
                "reason": f'{switch} is "{chosen}"',
            },
        )


def _check_abs_path(value: str) -> str:
    if not value.startswith("/") or "\0" in value:
        raise PydanticCustomError(
            "abs_path", "expected {expected}", {"expected": "an absolute path, e.g. /etc/x"}
        )
    return value


AbsPath = Annotated[str, AfterValidator(_check_abs_path)]
KeysAdapter = Literal["none", "cln", "eclair", "command", "lnd"]
_FILE_ADAPTERS = ("cln", "eclair", "command")
_KEYS_USED_IN: dict[str, tuple[str, ...]] = {  # key -> the adapters it belongs to
    "target_dir": ("cln", "eclair"),
    "owner": _FILE_ADAPTERS,
    "cln_hsm_secret": ("cln",),
    "eclair_seeds": ("eclair",),
    "command_files": ("command",),
    "lnd_rpc": ("lnd",),
    "lnd_tls_cert": ("lnd",),
    "lnd_wallet_password": ("lnd",),
}
_KEYS_REQUIRED = (
    "cln_hsm_secret",
    "eclair_seeds",
    "command_files",
    "lnd_rpc",
    "lnd_tls_cert",
    "lnd_wallet_password",
)


class SecretFileConfig(_Section):
    """One secret file of the "command" adapter: the sealed file and where it is written."""

    sealed: AbsPath = Field(description="the sealed file, made with `haproxy-ln keys seal`")
    target: AbsPath = Field(
        description="where the secret is written while this node is active; it must have been "
        "sealed for the role that is the target's file name"
    )


class KeysConfig(_Section):
    """[keys]: custody of the Lightning node's secrets; only the active node holds them."""

    adapter: KeysAdapter = Field(
        default="none",
        description='"cln" (hsm_secret), "eclair" (seed files), "command" (any files), "lnd" '
        '(unlock over gRPC) or "none" (haproxy-ln holds no keys)',
    )
    kek_file: AbsPath | None = Field(
        default=None,
        description="file holding the key-encryption key (mode 0400); or use kek_credential",
    )
    kek_credential: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,254}$",
        validate_default=True,
        description="name of the systemd credential holding the key-encryption key; "
        'required (or kek_file) unless adapter = "none"',
    )
    runtime_dir: AbsPath = Field(
        default="/run/haproxy-ln/keys",
        description="private directory (mode 0700, created if missing) for secrets while active",
    )
    target_dir: AbsPath | None = Field(
        default=None,
        validate_default=True,
        description="cln and eclair: existing directory the files are written to instead of "
        "runtime_dir, e.g. the lightning dir",
    )
    owner: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,31}(:[A-Za-z0-9_][A-Za-z0-9._-]{0,31})?$",
        validate_default=True,
        description='"user" or "user:group" the written files and runtime_dir belong to '
        "(the daemon's user)",
    )
    cln_hsm_secret: AbsPath | None = Field(
        default=None,
        validate_default=True,
        description='sealed hsm_secret; required when adapter = "cln"',
    )
    eclair_seeds: Annotated[tuple[AbsPath, ...], Field(strict=False)] | None = Field(
        default=None,
        validate_default=True,
        description="sealed seed files named <name>.sealed, e.g. node_seed.dat.sealed; "
        'required when adapter = "eclair"',
    )
    command_files: Annotated[tuple[SecretFileConfig, ...], Field(strict=False)] | None = Field(
        default=None,
        validate_default=True,
        description="secret files as {sealed = ..., target = ...}; required when adapter = "
        '"command"',
    )
    lnd_rpc: HostPort | None = Field(
        default=None,
        validate_default=True,
        description='HOST:PORT of lnd\'s gRPC interface; required when adapter = "lnd"',
    )
    lnd_tls_cert: AbsPath | None = Field(
        default=None,
        validate_default=True,
        description='lnd\'s tls.cert; required when adapter = "lnd"',
    )
    lnd_wallet_password: AbsPath | None = Field(
        default=None,
        validate_default=True,
        description='sealed wallet password; required when adapter = "lnd"',
    )
    lnd_timeout: float = Field(
        default=10.0,
        gt=0,
        le=600,
        description="seconds each lnd call may take, and lnd may take to be ready to unlock",
    )

    @field_validator("kek_credential")
    @classmethod
    def _one_kek(cls, credential: str | None, info: ValidationInfo) -> str | None:
        if "adapter" not in info.data or "kek_file" not in info.data:  # invalid themselves
            return credential
        kek_file = info.data["kek_file"]
        if kek_file is not None and credential is not None:
            raise PydanticCustomError(
                "one_kek",
                "expected {expected}; {reason}",
                {"expected": "one of kek_file and kek_credential", "reason": "both are set"},
            )
        if kek_file is None and credential is None and info.data["adapter"] != "none":
            raise PydanticCustomError("missing", "required unless kek_file is set")
        return credential

    @field_validator(*_KEYS_USED_IN)
    @classmethod
    def _fits_adapter(cls, value: Any, info: ValidationInfo) -> Any:
        adapter, key = info.data.get("adapter"), info.field_name or ""
        if adapter is None:  # itself invalid
            return value
        _check_only_when(
            value, key, "adapter", adapter, _KEYS_USED_IN[key], required=key in _KEYS_REQUIRED
        )
        if key == "eclair_seeds" and value is not None:
            _check_eclair_seeds(value)
        if key == "command_files" and value is not None:
            _check_command_files(value)
        return value


def _check_eclair_seeds(seeds: tuple[str, ...]) -> None:
    names = [seed.rpartition("/")[2].removesuffix(".sealed") for seed in seeds]
    if not seeds or not all(s.endswith(".sealed") for s in seeds) or not all(names):
        raise PydanticCustomError(
            "eclair_seeds",
            "expected {expected}",
            {
                "expected": "one or more sealed files named <name>.sealed, e.g. "
                "/etc/haproxy-ln/node_seed.dat.sealed"
            },
        )
    if len(set(names)) != len(names):
        raise PydanticCustomError(
            "eclair_seeds",
            "expected {expected}; {reason}",
            {"expected": "sealed files of distinct names", "reason": "two give the same name"},
        )


def _check_command_files(files: tuple[SecretFileConfig, ...]) -> None:
    targets = [f.target for f in files]
    if not files or len(set(targets)) != len(targets):
        raise PydanticCustomError(
            "command_files",
            "expected {expected}",
            {"expected": "one or more {sealed = ..., target = ...} tables, each target once"},
        )


def _seconds(value: float) -> str:
    return f"{round(value, 3):g} s"


class HaConfig(_Section):
    """[ha]: the etcd lease, self-fencing and degrading (`[replication].mode` says whether)."""

    lease_ttl: float = Field(
        default=2.0,
        ge=1,
        le=300,
        description="seconds the etcd lease lives without a keepalive: a leader that dies "
        "is replaced after about this long",
    )
    keepalive_interval: float | None = Field(
        default=None, gt=0, description="seconds between lease keepalives; unset: lease_ttl / 3"
    )
    safety_margin: float = Field(
        default=0.5,
        gt=0,
        validate_default=True,  # the rule below involves the other keys
        description="seconds before the lease could expire at which a leader that could not "
        "renew it has killed the daemon, destroyed the keys and closed the gate",
    )
    degrade_after: float = Field(
        default=5.0,
        gt=0,
        le=3600,
        description="seconds the replica may be unreachable before the active runs on alone "
        '(mode "sync" only)',
    )
    primary_lost_after: float = Field(
        default=5.0,
        gt=0,
        le=3600,
        description="seconds the local PostgreSQL may be unreachable before the active node "
        "gives up leading, so that a standby named in the sync record takes over",
    )

    @field_validator("lease_ttl")
    @classmethod
    def _whole_seconds(cls, ttl: float) -> float:
        if ttl != int(ttl):
            raise PydanticCustomError(
                "whole_seconds",
                "expected {expected}; {reason}",
                {
                    "expected": "a whole number of seconds >= 1 and <= 300",
                    "reason": "etcd grants leases in whole seconds",
                },
            )
        return ttl

    @field_validator("keepalive_interval")
    @classmethod
    def _keepalive_within_ttl(cls, interval: float | None, info: ValidationInfo) -> float | None:
        ttl = info.data.get("lease_ttl")  # absent when invalid itself
        if interval is not None and ttl is not None and interval >= ttl:
            raise PydanticCustomError(
                "keepalive_too_slow",
                "expected {expected}; {reason}",
                {
                    "expected": f"a number of seconds below lease_ttl ({_seconds(ttl)})",
                    "reason": "the lease would expire between keepalives: "
                    "lower keepalive_interval or raise lease_ttl",
                },
            )
        return interval

    @field_validator("safety_margin")
    @classmethod
    def _renewal_fits_before_deadline(cls, margin: float, info: ValidationInfo) -> float:
        # The leader fences itself at last keepalive sent + lease_ttl - safety_margin;
        # the next keepalive, due keepalive_interval after the last, must come before.
        ttl = info.data.get("lease_ttl")
        if ttl is None or "keepalive_interval" not in info.data:  # invalid themselves
            return margin
        interval = info.data["keepalive_interval"]
        interval = ttl / 3 if interval is None else interval
        if margin >= ttl - interval:
            unset = " (unset: lease_ttl / 3)" if info.data["keepalive_interval"] is None else ""
            raise PydanticCustomError(
                "margin_leaves_no_renewal",
                "expected {expected}; {reason}",
                {
                    "expected": "a number of seconds below lease_ttl - keepalive_interval "
                    f"({_seconds(ttl)} - {_seconds(interval)}{unset} = "
                    f"{_seconds(ttl - interval)})",
                    "reason": "a leader must be able to renew its lease at least once before "
                    "it fences itself: lower safety_margin or keepalive_interval, "
                    "or raise lease_ttl",
                },
            )
        return margin

    def timing(self) -> Timing:
        """The timing the HA state machine follows."""
        interval = self.keepalive_interval
        if interval is None:
            interval = self.lease_ttl / 3
        return Timing(
            self.lease_ttl,
            interval,
            self.safety_margin,
            self.degrade_after,
            self.primary_lost_after,
        )


class HealthConfig(_Section):
    """[health]: the HTTP server for load balancers and monitoring (docs/health.md)."""

    listen: HostPort = Field(
        default=HostPort("0.0.0.0", 8008),
        description="HOST:PORT of the health and metrics server (/health, /active, /standby, "
        "/status, /metrics); it changes nothing on the node, but /status tells who is active",
    )


class Config(_Section):
    """One node's whole configuration file."""

    node: NodeConfig = Field(description='the [node] table, e.g. [node] name = "a"')
    proxy: ProxyConfig = Field(default_factory=ProxyConfig, description="the [proxy] table")
    replication: ReplicationConfig = Field(
        default_factory=ReplicationConfig, description="the [replication] table"
    )
    daemon: DaemonConfig = Field(default_factory=DaemonConfig, description="the [daemon] table")
    etcd: EtcdConfig = Field(default_factory=EtcdConfig, description="the [etcd] table")
    keys: KeysConfig = Field(default_factory=KeysConfig, description="the [keys] table")
    ha: HaConfig = Field(default_factory=HaConfig, description="the [ha] table")
    health: HealthConfig = Field(default_factory=HealthConfig, description="the [health] table")

    @model_validator(mode="after")
    def _keepalive_answered_before_fence(self) -> Config:
        # Runs only once every section is valid. The keepalive due keepalive_interval
        # after the last acknowledged one is bounded by [etcd] request_timeout; an answer
        # that etcd may take that long to give must still come before the leader fences
        # itself at last keepalive sent + lease_ttl - safety_margin.
        timing = self.ha.timing()
        window = timing.lease_ttl - timing.safety_margin - timing.keepalive_interval
        timeout = self.etcd.request_timeout
        if timeout < window:
            return self
        unset = " (unset: lease_ttl / 3)" if self.ha.keepalive_interval is None else ""
        error = PydanticCustomError(
            "keepalive_answer_too_late",
            "expected {expected}; {reason}",
            {
                "expected": "a number of seconds below [ha] lease_ttl - safety_margin - "
                f"keepalive_interval ({_seconds(timing.lease_ttl)} - "
                f"{_seconds(timing.safety_margin)} - {_seconds(timing.keepalive_interval)}"
                f"{unset} = {_seconds(window)})",
                "reason": "a keepalive that etcd answers within request_timeout must still "
                "renew the lease before the leader fences itself: lower request_timeout, "
                "safety_margin or keepalive_interval, or raise lease_ttl",
            },
        )
        raise ValidationError.from_exception_data(
            "Config", [{"type": error, "loc": ("etcd", "request_timeout"), "input": timeout}]
        )


# --- errors ----------------------------------------------------------------------------------


def _unwrap(tp: Any) -> Any:
    """Strip Annotated and Optional from a type annotation."""
    while True:
        origin = typing.get_origin(tp)
        if origin is Annotated:
            tp = typing.get_args(tp)[0]
        elif origin in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(tp) if a is not type(None)]
            if len(args) != 1:
                return tp
            tp = args[0]
        else:
            return tp


def _is_model(tp: Any) -> typing.TypeGuard[type[BaseModel]]:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def _contains_secret(tp: Any, seen: frozenset[Any] = frozenset()) -> bool:
    """Whether a value of type `tp` is, or may hold, a secret."""
    tp = _unwrap(tp)
    base = typing.get_origin(tp) or tp
    if isinstance(base, type) and issubclass(base, _SECRET_TYPES):
        return True
    if _is_model(tp):
        return tp not in seen and any(
            _contains_secret(f.annotation, seen | {tp}) for f in tp.model_fields.values()
        )
    return any(_contains_secret(a, seen) for a in typing.get_args(tp))


def _resolve(model_cls: type[BaseModel], loc: tuple[int | str, ...]) -> FieldInfo | None:
    """The field that `loc` points into, or None if it cannot be followed."""
    tp: Any = model_cls
    field = None
    for part in loc:
        tp = _unwrap(tp)
        if _is_model(tp) and isinstance(part, str) and part in tp.model_fields:
            field = tp.model_fields[part]
            tp = field.annotation
        elif isinstance(part, int) and typing.get_args(tp):
            tp = typing.get_args(tp)[-1]  # list[X], tuple[X, ...], dict[K, X]
        else:
            return None
    return field


def _given(value: object) -> str:
    if isinstance(value, dict):
        return "a table with keys " + ", ".join(map(str, value)) if value else "an empty table"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


_EXPECTED = {  # pydantic error type -> what is allowed; {names} come from the error's ctx
    "int_type": "an integer",
    "int_parsing": "an integer",
    "int_from_float": "an integer",
    "float_type": "a number",
    "float_parsing": "a number",
    "string_type": "a string",
    "bool_type": "true or false",
    "bool_parsing": "true or false",
    "model_type": "a table",
    "model_attributes_type": "a table",
    "dict_type": "a table",
    "list_type": "an array",
    "tuple_type": "an array",
    "string_pattern_mismatch": "a string matching {pattern}",
    "string_too_short": "a string of length at least {min_length}",
    "string_too_long": "a string of length at most {max_length}",
    "too_short": "a value of length at least {min_length}",
    "too_long": "a value of length at most {max_length}",
    "literal_error": "one of {expected}",
    "enum": "one of {expected}",
}
_BOUNDS = (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<="))
_NUMBER_KINDS: dict[object, str] = {int: "an integer", float: "a number"}


def _expected(err: ErrorDetails, field: FieldInfo | None, secret: bool) -> str:
    """What is allowed where `err` happened, from pydantic's error type and context."""
    kind, ctx = err["type"], err.get("ctx", {})
    if "expected" in ctx and kind not in _EXPECTED:  # our own errors say it, maybe with why
        return str(ctx["expected"]) + (f"; {ctx['reason']}" if "reason" in ctx else "")
    if kind.startswith(("int_", "float_", "greater_than", "less_than")):  # say the whole range
        number = _NUMBER_KINDS.get(_unwrap(field.annotation)) if field else None
        metadata = field.metadata if field else []
        bounds = [f"{op} {getattr(m, k)}" for m in metadata for k, op in _BOUNDS if hasattr(m, k)]
        bounds = bounds or [f"{op} {ctx[k]}" for k, op in _BOUNDS if k in ctx]
        what = number or _EXPECTED.get(kind, "a value")
        return " ".join([what, " and ".join(bounds)]).strip()
    if kind in _EXPECTED:
        return _EXPECTED[kind].format_map(ctx)
    if secret:  # pydantic's own message may describe the input
        return "a valid value"
    return err["msg"][:1].lower() + err["msg"][1:]


def _problem(model_cls: type[BaseModel], err: ErrorDetails) -> str:
    """One pydantic error as one sentence: the key, what was given, what is allowed."""
    loc = err["loc"]
    key = ".".join(map(str, loc)) or "(top level)"
    field = _resolve(model_cls, loc)
    if err["type"] == "extra_forbidden":
        parent = _resolve(model_cls, loc[:-1])
        owner = model_cls if not loc[:-1] else _unwrap(parent.annotation) if parent else None
        where = f"in [{'.'.join(map(str, loc[:-1]))}]" if loc[:-1] else "at top level"
        allowed = ", ".join(sorted(owner.model_fields)) if _is_model(owner) else "none"
        return f"{key}: unknown key; allowed keys {where}: {allowed}"
    if err["type"] == "missing":
        why = f" ({field.description})" if field and field.description else ""
        return f"{key}: missing; required{why}"
    secret = field is None or _contains_secret(field.annotation)  # unsure counts as secret
    given = REDACTED if secret else _given(err["input"])
    return f"{key}: got {given}; expected {_expected(err, field, secret)}"


def format_problems(model_cls: type[BaseModel], exc: ValidationError) -> list[str]:
    """Every error in `exc` (from validating `model_cls`) as one operator-facing sentence.

    Never contains the value given for a secret field.
    """
    return [_problem(model_cls, err) for err in exc.errors(include_url=False)]


# --- load and render -------------------------------------------------------------------------


def _read_toml(name: str) -> dict[str, Any]:
    try:
        with open(name, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        problem = "file not found"
    except IsADirectoryError:
        problem = "is a directory, not a file"
    except OSError as e:
        problem = f"cannot read file: {e.strerror or e}"
    except UnicodeDecodeError as e:
        problem = f"not UTF-8 text (bad byte at offset {e.start})"
    except tomllib.TOMLDecodeError as e:
        m = re.fullmatch(r"(?s)(.*) \(at line (\d+), column (\d+)\)", str(e))
        if m:
            problem = f"invalid TOML at line {m[2]}, column {m[3]}: {m[1]}"
        else:
            problem = f"invalid TOML: {e}"
    raise ConfigError(name, [problem])


def load_model(path: str | os.PathLike[str], model_cls: type[M]) -> M:
    """Read the TOML file at `path` into `model_cls`; raises ConfigError listing all problems."""
    name = os.fspath(path)
    data = _read_toml(name)
    try:
        return model_cls.model_validate(data)
    except ValidationError as exc:
        # `from None`: the ValidationError's text would show the raw input, secrets included
        raise ConfigError(name, format_problems(model_cls, exc)) from None


def load(path: str | os.PathLike[str]) -> Config:
    """Read and validate one node's configuration file; raises ConfigError."""
    return load_model(path, Config)


def _redact(value: object, dumped: Any) -> Any:
    """`dumped` (the JSON-mode dump of `value`) with every secret replaced by REDACTED."""
    if isinstance(value, _SECRET_TYPES):
        return REDACTED
    if isinstance(value, BaseModel) and isinstance(dumped, dict):
        return {k: _redact(getattr(value, k, None), v) for k, v in dumped.items()}
    if isinstance(value, dict) and isinstance(dumped, dict):
        return {k: _redact(value.get(k), d) for k, d in dumped.items()}
    if isinstance(value, list | tuple) and isinstance(dumped, list):
        return [_redact(v, d) for v, d in zip(value, dumped, strict=False)]
    return dumped


def render(model: BaseModel) -> str:
    """The effective configuration, defaults included, as TOML that loads back equal.

    Secrets are written as "<redacted>"; keys whose value is None are left out.
    """
    dumped = model.model_dump(mode="json", exclude_none=True)
    return tomli_w.dumps(_redact(model, dumped))

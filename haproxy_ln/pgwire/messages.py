"""PostgreSQL wire messages the proxy reads or writes itself.

Everything else is relayed as framed bytes and never decoded. Parsers take
a whole message (type byte and length included, as the framer delivers
it) and raise ProtocolViolation when its contents are malformed; builders
return bytes ready to send.
"""

import re
import struct
from collections.abc import Iterable
from dataclasses import dataclass

from haproxy_ln.errors import ProtocolViolation

PROTOCOL_3 = 3 << 16
SSL_REQUEST = 80877103
GSSENC_REQUEST = 80877104
CANCEL_REQUEST = 80877102

SSL_REFUSED = b"N"

_NUL = re.compile(b"\0")
_MAX_NAME = 1024  # statement and portal names longer than this are not names

FIELD_UNTERMINATED = "message field is not terminated by a zero byte"
NAME_MALFORMED = "statement or portal name is unterminated or too long"


@dataclass(frozen=True)
class SSLRequest:
    pass


@dataclass(frozen=True)
class GSSENCRequest:
    pass


@dataclass(frozen=True)
class CancelRequest:
    pid: int
    secret: bytes


@dataclass(frozen=True)
class StartupMessage:
    version: int
    params: dict[str, str]


FirstMessage = SSLRequest | GSSENCRequest | CancelRequest | StartupMessage


def parse_first(msg: bytes | memoryview) -> FirstMessage:
    """Decode the untyped first message of a connection.

    Raises ProtocolViolation for an unknown request code or bad contents.
    """
    (code,) = struct.unpack_from("!I", msg, 4)
    if code == SSL_REQUEST and len(msg) == 8:
        return SSLRequest()
    if code == GSSENC_REQUEST and len(msg) == 8:
        return GSSENCRequest()
    if code == CANCEL_REQUEST and 16 <= len(msg) <= 16 + 252:
        (pid,) = struct.unpack_from("!I", msg, 8)
        return CancelRequest(pid, bytes(msg[12:]))
    if code >> 16 == 3:
        return StartupMessage(code, _startup_params(bytes(msg[8:])))
    raise ProtocolViolation(
        f"unsupported protocol version or request code {code >> 16}.{code & 0xFFFF}"
    )


def _startup_params(body: bytes) -> dict[str, str]:
    if not body.endswith(b"\0"):
        raise ProtocolViolation("startup message is not terminated by a zero byte")
    parts = body[:-1].split(b"\0")
    if parts and parts[-1] == b"":
        parts.pop()
    if len(parts) % 2:
        raise ProtocolViolation("startup message has a parameter name without a value")
    try:
        words = [p.decode() for p in parts]
    except UnicodeDecodeError as e:
        raise ProtocolViolation("startup message parameters are not valid UTF-8") from e
    params = dict(zip(words[::2], words[1::2], strict=True))
    if "user" not in params:
        raise ProtocolViolation('startup message has no "user" parameter')
    return params


def cstring(msg: bytes | memoryview, start: int) -> tuple[bytes, int]:
    """The zero-terminated string at `start` and the offset after it.

    Raises ProtocolViolation when no terminator follows within bounds.
    """
    m = _NUL.search(msg, start)
    if m is None:
        raise ProtocolViolation(FIELD_UNTERMINATED)
    return bytes(msg[start : m.start()]), m.end()


def name_at(msg: bytes | memoryview, start: int) -> tuple[bytes, int]:
    """A statement or portal name: a short zero-terminated string."""
    m = _NUL.search(msg, start, start + _MAX_NAME + 1)
    if m is None:
        raise ProtocolViolation(NAME_MALFORMED)
    return bytes(msg[start : m.start()]), m.end()


def build(mtype: bytes, body: bytes) -> bytes:
    return mtype + struct.pack("!I", len(body) + 4) + body


def error_response(sqlstate: str, message: str, *, fatal: bool, hint: str | None = None) -> bytes:
    """An ErrorResponse; FATAL ones are followed by closing the connection."""
    severity = b"FATAL" if fatal else b"ERROR"
    fields = [b"S" + severity, b"V" + severity, b"C" + sqlstate.encode(), b"M" + message.encode()]
    if hint:
        fields.append(b"H" + hint.encode())
    return build(b"E", b"\0".join(fields) + b"\0\0")


def error_fields(body: bytes) -> dict[str, str]:
    """The fields of an ErrorResponse or NoticeResponse body, keyed by field code."""
    return {chr(f[0]): f[1:].decode(errors="replace") for f in body.split(b"\0") if f}


def ready_for_query(status: bytes) -> bytes:
    return build(b"Z", status)


def query(sql: str) -> bytes:
    return build(b"Q", sql.encode() + b"\0")


TEXT_OID, BYTEA_OID = 25, 17
SYNC = build(b"S", b"")
_EXECUTE_ALL = build(b"E", b"\0\0\0\0\0")  # unnamed portal, no row limit


def parse(name: bytes, sql: str, param_types: Iterable[int] = ()) -> bytes:
    """A Parse message preparing `sql` as statement `name` (b"" for the unnamed one)."""
    types = tuple(param_types)
    return build(
        b"P",
        name + b"\0" + sql.encode() + b"\0" + struct.pack(f"!H{len(types)}I", len(types), *types),
    )


def bind_execute(name: bytes, params: Iterable[bytes | None], binary: Iterable[bool] = ()) -> bytes:
    """Bind `params` to statement `name` in the unnamed portal and execute it all.

    Parameters are sent in text format, except where `binary` says True;
    results come back in text format.
    """
    formats = tuple(1 if b else 0 for b in binary)
    parts = [b"\0" + name + b"\0", struct.pack(f"!H{len(formats)}H", len(formats), *formats)]
    values = list(params)
    parts.append(struct.pack("!H", len(values)))
    for value in values:
        if value is None:
            parts.append(b"\xff\xff\xff\xff")
        else:
            parts.append(struct.pack("!i", len(value)))
            parts.append(value)
    parts.append(b"\0\0")  # every result column in text format
    return build(b"B", b"".join(parts)) + _EXECUTE_ALL


def close_statement(name: bytes) -> bytes:
    """Close prepared statement `name`; closing one that does not exist is no error."""
    return build(b"C", b"S" + name + b"\0")


def backend_key_data(pid: int, secret: bytes) -> bytes:
    return build(b"K", struct.pack("!I", pid) + secret)


def parse_backend_key_data(msg: bytes | memoryview) -> tuple[int, bytes]:
    """(pid, secret) of a BackendKeyData message.

    Raises ProtocolViolation when it is too short.
    """
    if len(msg) < 13:
        raise ProtocolViolation("BackendKeyData is too short")
    (pid,) = struct.unpack_from("!I", msg, 5)
    return pid, bytes(msg[9:])


def cancel_request(pid: int, secret: bytes) -> bytes:
    body = struct.pack("!II", CANCEL_REQUEST, pid) + secret
    return struct.pack("!I", len(body) + 4) + body


def data_row(payload: bytes) -> tuple[str | None, ...]:
    """The values of a DataRow body (all in text format); None for NULL."""
    (n,) = struct.unpack_from("!H", payload)
    pos, values = 2, list[str | None]()
    for _ in range(n):
        (size,) = struct.unpack_from("!i", payload, pos)
        pos += 4
        if size < 0:
            values.append(None)
        else:
            values.append(payload[pos : pos + size].decode())
            pos += size
    return tuple(values)

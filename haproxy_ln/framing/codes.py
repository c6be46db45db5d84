"""Result codes shared by the C framer and its pure-Python twin.

The values mirror native/pgframe.h. Both implementations turn a code into the
same exception through `raise_for`, so their behaviour can be compared
exactly, message text included.
"""

from typing import NoReturn

from haproxy_ln.errors import BufferBudgetExhausted, FramerMisuse, ProtocolViolation

MORE = -1
ERR_SHORT = -2
ERR_LONG = -3
ERR_TYPE = -4
ERR_STARTUP = -5
ERR_NOMEM = -6
ERR_STATE = -7
ERR_IO = -8

UNTYPED = 0
UNTYPED_MIN = 8
UNTYPED_MAX = 10000  # PostgreSQL's MAX_STARTUP_PACKET_LENGTH
CLASSES = 7  # pooled sizes: chunk << 0 .. chunk << 6; larger ones are exact

ALLOW = 1
HOLD = 2

# Why the relay thread handed a connection back (native/pgrelay.h).
RELAY_EOF = 1
RELAY_ERROR = 2
RELAY_ESCALATE = 3
RELAY_REQUESTED = 4


def raise_for(code: int, value: int, max_message: int) -> NoReturn:
    """Raise the exception for a negative result code (other than MORE)."""
    if code == ERR_SHORT:
        raise ProtocolViolation(f"message length {value} is below the minimum of 4")
    if code == ERR_LONG:
        raise ProtocolViolation(f"message length {value} exceeds the limit of {max_message} bytes")
    if code == ERR_TYPE:
        raise ProtocolViolation(f"unknown message type byte 0x{value:02x}")
    if code == ERR_STARTUP:
        raise ProtocolViolation(
            f"startup packet length {value} is outside {UNTYPED_MIN}..{UNTYPED_MAX}"
        )
    if code == ERR_NOMEM:
        raise BufferBudgetExhausted(
            f"proxy buffer budget exhausted: a buffer of {value} bytes does not fit"
        )
    if code == ERR_IO:
        raise OSError(value, "socket error")
    raise FramerMisuse(f"framer driven out of order (code {code})")


def type_table(allowed: bytes, hold: bytes) -> bytes:
    """A 256-entry flag table: ALLOW for each type in `allowed`, HOLD for `hold`."""
    table = bytearray(256)
    for t in allowed:
        table[t] |= ALLOW
    for t in hold:
        table[t] |= HOLD | ALLOW
    return bytes(table)


# Frontend messages: every type is delivered whole for inspection except
# CopyData, which streams (COPY IN of any size through a fixed buffer).
CLIENT_TABLE = type_table(allowed=b"d", hold=b"BCcfDEHFpPQSX")
# Backend messages: only the ones the session tracks are held; rows, copy
# data, notices and notifications stream.
SERVER_TABLE = type_table(allowed=b"R23CdcHDIEVvnNAtS1sT", hold=b"ZKGW")
SERVER_MAX_MESSAGE = 0x7FFFFFFF

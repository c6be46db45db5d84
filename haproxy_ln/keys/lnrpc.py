"""The few lnd gRPC messages haproxy-ln needs, built at import time (no generated code).

How this works: the message types are described with protobuf's own
descriptor messages (`descriptor_pb2`), the way protoc would describe the
relevant slice of lnd's lnrpc/walletunlocker.proto and lnrpc/stateservice.proto,
added to a private descriptor pool (so a generated `lnrpc` elsewhere in the
process cannot clash), and turned into classes by `message_factory`. Field
numbers and enum values are lnd's wire contract:

    service WalletUnlocker { rpc UnlockWallet(UnlockWalletRequest) returns (UnlockWalletResponse); }
    UnlockWalletRequest: bytes wallet_password = 1; int32 recovery_window = 2;
        (channel_backups = 3 is left out: we never send it); bool stateless_init = 4;
    service State { rpc GetState(GetStateRequest) returns (GetStateResponse); }
    GetStateResponse: WalletState state = 1;
    enum WalletState: NON_EXISTING 0, LOCKED 1, UNLOCKED 2, RPC_ACTIVE 3, SERVER_ACTIVE 4,
        WAITING_TO_START 255

Only this module touches protobuf; callers use the functions below and the
`WalletState` enum. A built request holds the password: never repr or log it.
"""

from __future__ import annotations

import enum
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import DecodeError

__all__ = [
    "GET_STATE",
    "UNLOCK_WALLET",
    "WalletState",
    "decode_empty",
    "decode_get_state_response",
    "decode_unlock_request",
    "encode_empty",
    "encode_get_state_response",
    "encode_unlock_request",
]

UNLOCK_WALLET = "/lnrpc.WalletUnlocker/UnlockWallet"
GET_STATE = "/lnrpc.State/GetState"


class WalletState(enum.IntEnum):
    """lnd's lnrpc.WalletState: how far lnd has come since it started."""

    NON_EXISTING = 0  # no wallet created yet
    LOCKED = 1  # waiting for UnlockWallet
    UNLOCKED = 2  # password accepted, RPC server not up yet
    RPC_ACTIVE = 3  # RPC server up, not fully ready
    SERVER_ACTIVE = 4  # ready for calls
    WAITING_TO_START = 255  # lnd's own cluster mode: waiting to become leader

    @property
    def holds_keys(self) -> bool:
        """Whether lnd has decrypted its wallet in this state."""
        return self in (WalletState.UNLOCKED, WalletState.RPC_ACTIVE, WalletState.SERVER_ACTIVE)


_F = descriptor_pb2.FieldDescriptorProto


def _file() -> descriptor_pb2.FileDescriptorProto:
    proto = descriptor_pb2.FileDescriptorProto(
        name="haproxy_ln/keys/lnrpc_subset.proto", package="lnrpc", syntax="proto3"
    )
    states = proto.enum_type.add(name="WalletState")
    for state in WalletState:
        states.value.add(name=state.name, number=state.value)

    def message(name: str, *fields: tuple[str, int, Any, str]) -> None:
        described = proto.message_type.add(name=name)
        for field_name, number, kind, type_name in fields:
            field = described.field.add(
                name=field_name, number=number, type=kind, label=_F.LABEL_OPTIONAL
            )
            if type_name:  # only enums and messages name a type
                field.type_name = type_name

    message(
        "UnlockWalletRequest",
        ("wallet_password", 1, _F.TYPE_BYTES, ""),
        ("recovery_window", 2, _F.TYPE_INT32, ""),
        ("stateless_init", 4, _F.TYPE_BOOL, ""),
    )
    message("UnlockWalletResponse")
    message("GetStateRequest")
    message("GetStateResponse", ("state", 1, _F.TYPE_ENUM, ".lnrpc.WalletState"))
    return proto


_POOL = descriptor_pool.DescriptorPool()
_POOL.Add(_file())


def _message_class(name: str) -> Any:
    return message_factory.GetMessageClass(_POOL.FindMessageTypeByName(f"lnrpc.{name}"))


_UnlockWalletRequest = _message_class("UnlockWalletRequest")
_UnlockWalletResponse = _message_class("UnlockWalletResponse")
_GetStateResponse = _message_class("GetStateResponse")


def encode_unlock_request(password: bytes, recovery_window: int = 0) -> bytes:
    """An UnlockWalletRequest on the wire (holds the password: never log it)."""
    request = _UnlockWalletRequest(wallet_password=password, recovery_window=recovery_window)
    return bytes(request.SerializeToString())


def decode_unlock_request(data: bytes) -> bytes:
    """The wallet password in an UnlockWalletRequest (for test servers that act as lnd)."""
    return bytes(_UnlockWalletRequest.FromString(data).wallet_password)


def encode_empty(_: object = None) -> bytes:
    """UnlockWalletResponse, GetStateRequest: messages with no fields encode as no bytes."""
    return b""


def decode_empty(data: bytes) -> None:
    """Parse a message that has no fields (unknown fields from a newer lnd are ignored).

    Raises ValueError when `data` is not a protobuf message.
    """
    try:
        _UnlockWalletResponse.FromString(data)
    except DecodeError as e:
        raise ValueError(f"not a protobuf message: {e}") from None


def encode_get_state_response(state: WalletState) -> bytes:
    """A GetStateResponse (for test servers that act as lnd)."""
    return bytes(_GetStateResponse(state=int(state)).SerializeToString())


def decode_get_state_response(data: bytes) -> WalletState:
    """The state in a GetStateResponse.

    Raises ValueError for garbage or a state this version of haproxy-ln does not know.
    """
    try:
        state = int(_GetStateResponse.FromString(data).state)
    except DecodeError as e:
        raise ValueError(f"not a GetStateResponse: {e}") from None
    return WalletState(state)

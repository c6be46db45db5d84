"""The sans-IO session, driven with plain message bytes."""

import struct

import pytest

from haproxy_ln.errors import ProtocolViolation
from haproxy_ln.pgwire import session as session_mod
from haproxy_ln.pgwire.session import Session


def msg(t: bytes, body: bytes) -> bytes:
    return t + struct.pack("!I", len(body) + 4) + body


def Q(sql: str) -> bytes:
    return msg(b"Q", sql.encode() + b"\0")


def P(name: str, sql: str) -> bytes:
    return msg(b"P", name.encode() + b"\0" + sql.encode() + b"\0\0\0")


def B(portal: str, stmt: str) -> bytes:
    return msg(b"B", portal.encode() + b"\0" + stmt.encode() + b"\0" + b"\0\0\0\0\0\0")


def E(portal: str = "") -> bytes:
    return msg(b"E", portal.encode() + b"\0\0\0\0\0")


S = msg(b"S", b"")


def Z(status: bytes) -> bytes:
    return msg(b"Z", status)


def ready(status: bytes = b"I") -> Session:
    s = Session(proxy_key=(7, b"abcd"))
    s.server_message(Z(status))
    return s


def in_transaction() -> Session:
    s = ready()
    s.client_message(Q("BEGIN"))
    s.flushed()
    s.server_message(Z(b"T"))
    return s


def test_ready_for_query_tracks_status_and_answers_oldest_request() -> None:
    s = ready()
    s.client_message(Q("BEGIN"))
    s.client_message(Q("SELECT 1"))
    assert s.in_flight == 2
    s.server_message(Z(b"T"))
    assert (s.status, s.in_flight) == (b"T", 1)
    s.server_message(Z(b"E"))
    assert (s.status, s.in_flight, s.answered) == (b"E", 0, 3)


def test_cancel_is_unsafe_for_a_statement_outside_a_transaction_block() -> None:
    s = ready()
    s.client_message(Q("SELECT pg_sleep(10)"))
    assert not s.cancel_is_safe()


def test_cancel_is_safe_for_a_statement_inside_a_transaction_block() -> None:
    s = in_transaction()
    s.client_message(Q("SELECT pg_sleep(10)"))
    assert s.cancel_is_safe()


def test_cancel_is_unsafe_while_commit_in_flight() -> None:
    s = in_transaction()
    s.client_message(Q("COMMIT"))
    assert not s.cancel_is_safe()
    s.server_message(Z(b"I"))
    assert s.cancel_is_safe()


def test_pipelined_request_after_transaction_control_has_unknown_start() -> None:
    s = in_transaction()
    s.client_message(Q("ROLLBACK"))  # may leave the block: what follows may autocommit
    s.client_message(Q("SELECT pg_sleep(10)"))
    s.server_message(Z(b"I"))
    assert not s.cancel_is_safe()


def test_named_commit_statement_executed_later_is_recognised() -> None:
    s = ready()
    s.client_message(P("c", "COMMIT"))
    s.client_message(S)
    s.server_message(Z(b"I"))
    s = s  # same connection, now inside a block
    s.client_message(Q("BEGIN"))
    s.server_message(Z(b"T"))
    s.client_message(B("", "c"))
    s.client_message(E())
    assert not s.cancel_is_safe()


def test_closed_statement_is_forgotten() -> None:
    s = in_transaction()
    s.client_message(P("c", "COMMIT"))
    s.client_message(msg(b"C", b"Sc\0"))
    s.client_message(B("", "c"))
    s.client_message(E())
    assert s.cancel_is_safe()


def test_backend_kept_only_once_commit_trigger_was_sent() -> None:
    s = in_transaction()
    s.client_message(Q("COMMIT"))
    assert not s.must_keep_backend()  # not yet sent: PostgreSQL cannot be waiting
    s.flushed()
    assert s.must_keep_backend()
    s.server_message(Z(b"I"))
    assert not s.must_keep_backend()


def test_extended_group_without_sync_cannot_be_committing() -> None:
    s = ready()
    s.client_message(P("", "INSERT INTO t VALUES (1)"))
    s.client_message(B("", ""))
    s.client_message(E())
    s.flushed()
    assert not s.cancel_is_safe()  # it will commit at Sync
    assert not s.must_keep_backend()  # but cannot be waiting before Sync arrives
    s.client_message(S)
    s.flushed()
    assert s.must_keep_backend()


def test_backend_waiting_for_copy_data_is_not_committing() -> None:
    s = ready()
    s.client_message(Q("COPY t FROM STDIN"))
    s.flushed()
    assert s.must_keep_backend()
    s.server_message(msg(b"G", b"\0\0\0"))
    assert not s.must_keep_backend()
    s.client_message(msg(b"c", b""))
    s.flushed()
    assert s.must_keep_backend()


def test_backend_key_is_remapped() -> None:
    s = Session(proxy_key=(7, b"abcd"))
    out = s.server_message(msg(b"K", struct.pack("!I", 4242) + b"wxyz"))
    assert s.backend_key == (4242, b"wxyz")
    assert out == msg(b"K", struct.pack("!I", 7) + b"abcd")


def test_durability_lowering_query_is_replaced_by_an_in_order_error() -> None:
    s = ready()
    out = s.client_message(Q("SET synchronous_commit = off"))
    assert out is not None and out.startswith(b"Q")
    text = out[5:-1].decode()
    assert text.startswith("DO $haproxy_ln$BEGIN RAISE EXCEPTION")
    assert "synchronous_commit would be set to ''off''" in text
    assert s.in_flight == 1  # PostgreSQL answers the replacement like any query


def test_durability_lowering_parse_keeps_its_statement_name() -> None:
    s = ready()
    out = s.client_message(P("s1", "SET LOCAL synchronous_commit TO local"))
    assert out is not None and out.startswith(b"P") and out[5:8] == b"s1\0"


def test_harmless_statements_are_forwarded_unchanged() -> None:
    s = ready()
    assert s.client_message(Q("SHOW synchronous_commit")) is None
    assert s.client_message(P("", "SELECT 1")) is None


def test_name_table_overflow_assumes_named_statements_commit() -> None:
    s = in_transaction()
    for i in range(session_mod.MAX_TRACKED_NAMES + 1):
        s.client_message(P(f"c{i}", "COMMIT"))
    s.client_message(S)
    s.server_message(Z(b"T"))
    s.client_message(B("", "anything"))
    s.client_message(E())
    assert not s.cancel_is_safe()


@pytest.mark.parametrize(
    "bad",
    [
        msg(b"P", b"unterminated"),
        msg(b"C", b"Xname\0"),
        msg(b"E", b"x" * 2000),
    ],
)
def test_malformed_client_messages_are_protocol_violations(bad: bytes) -> None:
    with pytest.raises(ProtocolViolation):
        ready().client_message(bad)


def test_malformed_ready_for_query_is_a_protocol_violation() -> None:
    with pytest.raises(ProtocolViolation):
        Session().server_message(msg(b"Z", b"X"))

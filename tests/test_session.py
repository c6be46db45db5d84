"""The sans-IO session and its C twin, driven with plain message bytes.

Every behaviour test runs against both implementations; a property test
drives both with the same random message sequences and requires the same
state after every message.
"""

import struct
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from haproxy_ln._native import ffi, lib
from haproxy_ln.errors import ProtocolViolation
from haproxy_ln.framing.native import CSession
from haproxy_ln.pgwire import session as session_mod
from haproxy_ln.pgwire import sql
from haproxy_ln.pgwire.session import Session

AnySession = Session | CSession


@pytest.fixture(params=[Session, CSession], ids=["py", "c"])
def impl(request: pytest.FixtureRequest) -> type[AnySession]:
    return request.param  # type: ignore[no-any-return]


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


def ready(impl: type[AnySession], status: bytes = b"I") -> AnySession:
    s = impl(proxy_secret=b"abcd")
    s.server_message(Z(status))
    return s


def in_transaction(impl: type[AnySession]) -> AnySession:
    s = ready(impl)
    s.client_message(Q("BEGIN"))
    s.flushed()
    s.server_message(Z(b"T"))
    return s


def test_ready_for_query_tracks_status_and_answers_oldest_request(impl: type[AnySession]) -> None:
    s = ready(impl)
    s.client_message(Q("BEGIN"))
    s.client_message(Q("SELECT 1"))
    assert s.in_flight == 2
    s.server_message(Z(b"T"))
    assert (s.status, s.in_flight) == (b"T", 1)
    s.server_message(Z(b"E"))
    assert (s.status, s.in_flight, s.answered) == (b"E", 0, 3)


def test_cancel_is_unsafe_for_a_statement_outside_a_transaction_block(
    impl: type[AnySession],
) -> None:
    s = ready(impl)
    s.client_message(Q("SELECT pg_sleep(10)"))
    assert not s.cancel_is_safe()


def test_cancel_is_safe_for_a_statement_inside_a_transaction_block(impl: type[AnySession]) -> None:
    s = in_transaction(impl)
    s.client_message(Q("SELECT pg_sleep(10)"))
    assert s.cancel_is_safe()


def test_cancel_is_unsafe_while_commit_in_flight(impl: type[AnySession]) -> None:
    s = in_transaction(impl)
    s.client_message(Q("COMMIT"))
    assert not s.cancel_is_safe()
    s.server_message(Z(b"I"))
    assert s.cancel_is_safe()


def test_pipelined_request_after_transaction_control_has_unknown_start(
    impl: type[AnySession],
) -> None:
    s = in_transaction(impl)
    s.client_message(Q("ROLLBACK"))  # may leave the block: what follows may autocommit
    s.client_message(Q("SELECT pg_sleep(10)"))
    s.server_message(Z(b"I"))
    assert not s.cancel_is_safe()


def test_named_commit_statement_executed_later_is_recognised(impl: type[AnySession]) -> None:
    s = ready(impl)
    s.client_message(P("c", "COMMIT"))
    s.client_message(S)
    s.server_message(Z(b"I"))
    s.client_message(Q("BEGIN"))
    s.server_message(Z(b"T"))
    s.client_message(B("", "c"))
    s.client_message(E())
    assert not s.cancel_is_safe()


def test_closed_statement_is_forgotten(impl: type[AnySession]) -> None:
    s = in_transaction(impl)
    s.client_message(P("c", "COMMIT"))
    s.client_message(msg(b"C", b"Sc\0"))
    s.client_message(B("", "c"))
    s.client_message(E())
    assert s.cancel_is_safe()


def test_backend_kept_only_once_commit_trigger_was_sent(impl: type[AnySession]) -> None:
    s = in_transaction(impl)
    s.client_message(Q("COMMIT"))
    assert not s.must_keep_backend()  # not yet sent: PostgreSQL cannot be waiting
    s.flushed()
    assert s.must_keep_backend()
    s.server_message(Z(b"I"))
    assert not s.must_keep_backend()


def test_extended_group_without_sync_cannot_be_committing(impl: type[AnySession]) -> None:
    s = ready(impl)
    s.client_message(P("", "INSERT INTO t VALUES (1)"))
    s.client_message(B("", ""))
    s.client_message(E())
    s.flushed()
    assert not s.cancel_is_safe()  # it will commit at Sync
    assert not s.must_keep_backend()  # but cannot be waiting before Sync arrives
    s.client_message(S)
    s.flushed()
    assert s.must_keep_backend()


def test_backend_waiting_for_copy_data_is_not_committing(impl: type[AnySession]) -> None:
    s = ready(impl)
    s.client_message(Q("COPY t FROM STDIN"))
    s.flushed()
    assert s.must_keep_backend()
    s.server_message(msg(b"G", b"\0\0\0"))
    assert not s.must_keep_backend()
    s.client_message(msg(b"c", b""))
    s.flushed()
    assert s.must_keep_backend()


def test_backend_key_is_remapped(impl: type[AnySession]) -> None:
    s = impl(proxy_secret=b"abcd")
    out = s.server_message(msg(b"K", struct.pack("!I", 4242) + b"wxyz"))
    assert s.backend_key == (4242, b"wxyz")
    assert out == msg(b"K", struct.pack("!I", 4242) + b"abcd")  # the backend's pid, our secret


def test_durability_lowering_query_is_replaced_by_an_in_order_error(impl: type[AnySession]) -> None:
    s = ready(impl)
    out = s.client_message(Q("SET synchronous_commit = off"))
    assert out is not None and out.startswith(b"Q")
    text = out[5:-1].decode()
    assert text.startswith("DO $haproxy_ln$BEGIN RAISE EXCEPTION")
    assert "synchronous_commit would be set to ''off''" in text
    assert s.in_flight == 1  # PostgreSQL answers the replacement like any query


def test_durability_lowering_parse_keeps_its_statement_name(impl: type[AnySession]) -> None:
    s = ready(impl)
    out = s.client_message(P("s1", "SET LOCAL synchronous_commit TO local"))
    assert out is not None and out.startswith(b"P") and out[5:8] == b"s1\0"


def test_harmless_statements_are_forwarded_unchanged(impl: type[AnySession]) -> None:
    s = ready(impl)
    assert s.client_message(Q("SHOW synchronous_commit")) is None
    assert s.client_message(P("", "SELECT 1")) is None


def test_name_table_overflow_assumes_named_statements_commit(impl: type[AnySession]) -> None:
    s = in_transaction(impl)
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
def test_malformed_client_messages_are_protocol_violations(
    impl: type[AnySession], bad: bytes
) -> None:
    with pytest.raises(ProtocolViolation):
        ready(impl).client_message(bad)


def test_malformed_ready_for_query_is_a_protocol_violation(impl: type[AnySession]) -> None:
    with pytest.raises(ProtocolViolation):
        impl().server_message(msg(b"Z", b"X"))


# -- the C session is the Python session's exact twin -------------------------


def state_of(s: AnySession) -> dict[str, Any]:
    """Everything either implementation remembers, in one comparable form."""
    common = {
        "status": s.status,
        "ready": s.ready,
        "copy_in": s.copy_in,
        "terminated": s.terminated,
        "answered": s.answered,
        "in_flight": s.in_flight,
        "cancel_is_safe": s.cancel_is_safe(),
        "must_keep_backend": s.must_keep_backend(),
    }
    if isinstance(s, Session):
        groups = [
            (
                {b"I": 0, b"T": 1, b"E": 2, None: 3}[g.start],
                bool(g.flags & 1),
                bool(g.flags & 2),
                g.executes,
                g.closed,
                g.triggered,
                g.armed,
            )
            for g in s._groups
        ]
        names = (dict(s._statements), dict(s._portals), s._names_overflow)
    else:
        c = s._s
        raw = [c.groups[(c.head + i) % len(c.groups)] for i in range(c.count)]
        groups = [(g & 3, *(bool(g & bit) for bit in (4, 8, 16, 32, 64, 128))) for g in raw]

        def table(entries: Any, n: int) -> dict[bytes, int]:
            return {ffi.unpack(e.name, e.len): e.flags for e in entries[0:n]}

        names = (
            table(c.statements, c.n_statements),
            table(c.portals, c.n_portals),
            bool(c.overflow),
        )
    return {**common, "groups": groups, "names": names}


KEYWORDS = ["commit", "end", "prepare", "begin", "start", "rollback", "abort"]
MENTIONS = ["synchronous_commit", "pg_settings"]
sql_words = st.one_of(
    st.sampled_from(KEYWORDS + MENTIONS),
    st.sampled_from(KEYWORDS + MENTIONS).map(str.upper),
    st.sampled_from(KEYWORDS).map(lambda k: "x_" + k),  # not a keyword: inside a word
    st.sampled_from(KEYWORDS).map(lambda k: k + "1"),
    st.sampled_from(
        [
            "select 1",
            "SET synchronous_commit = off",
            "set synchronous_commit to on",
            ";",
            " ",
            "'",
            "\n",
            "(",
            "insert into t values (1)",
            "é",
        ]
    ),
)
sql_texts = st.lists(sql_words, max_size=4).map("".join) | st.lists(sql_words, max_size=4).map(
    " ".join
)
names = st.sampled_from([b"", b"a", b"b", b"c" * 63, b"d" * 64, *(b"n%d" % i for i in range(20))])


def cstr(b: bytes) -> bytes:
    return b + b"\0"


client_msgs = st.one_of(
    st.builds(lambda t: msg(b"Q", cstr(t.encode())), sql_texts),
    st.builds(lambda n, t: msg(b"P", cstr(n) + cstr(t.encode()) + b"\0\0"), names, sql_texts),
    st.builds(lambda p, n: msg(b"B", cstr(p) + cstr(n) + b"\0\0\0\0\0\0"), names, names),
    st.builds(lambda p: msg(b"E", cstr(p) + b"\0\0\0\0"), names),
    st.builds(lambda k, n: msg(b"C", k + cstr(n)), st.sampled_from([b"S", b"P", b"X"]), names),
    st.sampled_from(
        [
            S,
            msg(b"F", b"\0\0\0\1"),
            msg(b"c", b""),
            msg(b"f", b"x\0"),
            msg(b"X", b""),
            msg(b"D", b"S\0"),
            msg(b"H", b""),
            msg(b"Q", b"no nul"),
        ]
    ),
    st.binary(max_size=12).map(lambda b: msg(st_type(b), b)),
)


def st_type(b: bytes) -> bytes:
    return b"PBEC"[len(b) % 4 : len(b) % 4 + 1]


server_msgs = st.one_of(
    st.sampled_from([Z(b"I"), Z(b"T"), Z(b"E"), msg(b"G", b"\0\0\0"), msg(b"Z", b"Q")]),
)
steps = st.lists(
    st.one_of(
        st.tuples(st.just("client"), client_msgs),
        st.tuples(st.just("server"), server_msgs),
        st.tuples(st.just("flushed"), st.just(b"")),
    ),
    max_size=40,
)


def apply(s: AnySession, kind: str, m: bytes) -> object:
    try:
        if kind == "client":
            return s.client_message(m)
        if kind == "server":
            return s.server_message(m)
        s.flushed()
        return None
    except ProtocolViolation as e:
        return ("ProtocolViolation", str(e))


@settings(max_examples=400, deadline=None)
@given(steps=steps)
def test_c_session_matches_python_session_after_every_message(
    steps: list[tuple[str, bytes]],
) -> None:
    py, c = Session(proxy_secret=b"abcd"), CSession(proxy_secret=b"abcd")
    for kind, m in steps:
        if kind == "client" and py.full:
            continue  # the pumps never feed a full session
        assert apply(py, kind, m) == apply(c, kind, m), (kind, m)
        assert state_of(py) == state_of(c), (kind, m)


@settings(max_examples=300, deadline=None)
@given(text=st.binary(max_size=60) | sql_texts.map(str.encode))
def test_c_classification_matches_python(text: bytes) -> None:
    assert lib.pgs_classify(text, len(text)) == sql.classify(text)

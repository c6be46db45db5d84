"""Health endpoints, /status, /metrics and `haproxy-ln status` (issue 7).

How this works: the 200/503 rules are pure, so most tests build a
`NodeReport` by hand for each role and state and check the verdict. The
ASGI app is driven directly with ASGI messages, and once through a real
hypercorn server on a free port (malformed requests, HEAD, keep-alive).
The last test runs two real agents against a real etcd, as
tests/test_agent_ha.py does, and asks their health servers and the CLI.
"""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import trio
from agent_harness import Node, first, pair_of, wait_for
from click.testing import CliRunner
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import CollectorRegistry
from test_purity import FORBIDDEN, imported_by, module_file, with_parents

from haproxy_ln.cli import main
from haproxy_ln.config import HostPort, ReplicationConfig
from haproxy_ln.errors import ListenError
from haproxy_ln.ha import Role
from haproxy_ln.health import rules
from haproxy_ln.health.app import HealthApp
from haproxy_ln.health.metrics import AgentCollector
from haproxy_ln.health.model import (
    DaemonFacts,
    EtcdFacts,
    GateFacts,
    LeaderFacts,
    NodeReport,
    ProxyFacts,
    ReplicationFacts,
    SyncRecordFacts,
)
from haproxy_ln.health.server import serve_app
from haproxy_ln.health.status import NodeStatus, PairStatus, render_table
from haproxy_ln.health.store import StoreProbe
from haproxy_ln.local import EtcdServer, PostgresCluster
from haproxy_ln.local.ports import free_port
from haproxy_ln.store import bridge

# --- reports built by hand -------------------------------------------------------------------

PROXY = ProxyFacts(
    connections=2,
    connections_total=7,
    rejected_gate=3,
    rejected_limit=0,
    cancels_forwarded=1,
    cancels_withheld=4,
    cancels_unmatched=0,
    protocol_errors=0,
    bytes_to_server=1234,
    bytes_to_client=56789,
    framing="native C",
    native=True,
    native_problem=None,
    relay_thread=True,
)
STREAMING = ReplicationFacts(
    confirmed_lsn=0x1_0000_0100,
    lag_bytes=0,
    lag_seconds=0.0,
    sync_state="sync",
    store_reachable=True,
    store_status="streaming",
    applied_lsn=0x1_0000_0100,
)


def active_report() -> NodeReport:
    """Node a, leading epoch 7 with b synchronous: every /active condition holds."""
    return NodeReport(
        node="a",
        peer="b",
        role=Role.ACTIVE,
        epoch=7,
        reason="leading, synchronous with b",
        healthy=True,
        loop_age_s=0.1,
        etcd=EtcdFacts(True, 42, LeaderFacts("a", 7), SyncRecordFacts(7, "b"), False),
        lease_id=99,
        lease_remaining_s=1.2,
        sync_mode="sync",
        replication=replace(STREAMING, store_status=None, applied_lsn=None),
        daemon=DaemonFacts("ready", "probe answered", 1234, None),
        gate=GateFacts(True, True, "open", None),
        proxy=PROXY,
        last_failover={"detected": 0.0, "gate opened": 0.4},
    )


def standby_report() -> NodeReport:
    """Node b, standing by for a's epoch 7 and named in its sync record."""
    return replace(
        active_report(),
        node="b",
        peer="a",
        role=Role.STANDBY,
        epoch=None,
        reason="following a",
        lease_remaining_s=None,
        replication=STREAMING,
        daemon=DaemonFacts("stopped", "not started", None, None),
        gate=GateFacts(False, False, "this node is not the active node", "a"),
    )


def with_replication(report: NodeReport, **changes: Any) -> NodeReport:
    return replace(report, replication=replace(report.replication, **changes))


def with_etcd(report: NodeReport, **changes: Any) -> NodeReport:
    return replace(report, etcd=replace(report.etcd, **changes))


# --- the rules ---------------------------------------------------------------------------------


def test_health_is_200_while_the_loop_steps_and_503_once_it_stalls() -> None:
    assert rules.health(active_report()).code == 200
    assert rules.health(standby_report()).code == 200
    stalled = replace(standby_report(), healthy=False, loop_age_s=3.5)
    verdict = rules.health(stalled)
    assert verdict.code == 503 and "3.5 s" in verdict.reason


def test_active_is_200_on_the_leaseholder_with_daemon_ready_and_gate_open() -> None:
    verdict = rules.active(active_report())
    assert verdict.code == 200, verdict.reason
    assert "epoch 7" in verdict.reason


@pytest.mark.parametrize(
    ("change", "why"),
    [
        (lambda r: replace(r, healthy=False, loop_age_s=9.0), "has not stepped"),
        (lambda r: replace(r, role=Role.STANDBY), "not active: standby"),
        (lambda r: replace(r, role=Role.CANDIDATE), "not active: candidate"),
        (lambda r: replace(r, role=Role.FENCED), "not active: fenced"),
        (lambda r: replace(r, role=Role.DEMOTING), "not active: demoting"),
        (lambda r: with_etcd(r, leader=LeaderFacts("b", 8)), "leader key"),
        (lambda r: with_etcd(r, leader=LeaderFacts("a", 6)), "leader key"),
        (lambda r: with_etcd(r, leader=None), "leader key"),
        (
            lambda r: replace(r, daemon=DaemonFacts("starting", "probing", 5, None)),
            "daemon is starting",
        ),
        (lambda r: replace(r, daemon=DaemonFacts("failed", "exited", None, 1)), "failed"),
        (
            lambda r: replace(r, gate=GateFacts(False, False, "switching over", "b")),
            "closed: switching over",
        ),
        (lambda r: replace(r, gate=GateFacts(True, False, "open", None)), "held"),
    ],
)
def test_active_is_503_when_any_condition_fails(change: Any, why: str) -> None:
    verdict = rules.active(change(active_report()))
    assert verdict.code == 503
    assert why in verdict.reason


def test_standby_is_200_when_named_in_the_sync_record_of_the_leaders_epoch() -> None:
    verdict = rules.standby(standby_report())
    assert verdict.code == 200, verdict.reason
    assert "a's epoch 7" in verdict.reason


@pytest.mark.parametrize(
    ("change", "why"),
    [
        (lambda r: replace(r, healthy=False), "has not stepped"),
        (lambda r: replace(r, role=Role.ACTIVE), "not a standby: active"),
        (lambda r: replace(r, role=Role.STARTING), "not a standby: starting"),
        (lambda r: replace(r, role=Role.CANDIDATE), "not a standby: candidate"),
        (lambda r: with_etcd(r, reachable=False), "etcd is unreachable"),
        (lambda r: with_etcd(r, leader=None), "no node is active"),
        (lambda r: with_etcd(r, leader=LeaderFacts("b", 7)), "names this node"),
        (lambda r: with_etcd(r, sync_record=None), "names nobody"),
        (lambda r: with_etcd(r, sync_record=SyncRecordFacts(7, None)), "names nobody"),
        (lambda r: with_etcd(r, sync_record=SyncRecordFacts(7, "c")), "names c"),
        (lambda r: with_etcd(r, sync_record=SyncRecordFacts(6, "b")), "at epoch 6"),
        (
            lambda r: with_replication(r, store_reachable=False, problem="connection refused"),
            "unreachable: connection refused",
        ),
        (lambda r: with_replication(r, store_status="copying"), "is copying"),
        (lambda r: with_replication(r, store_status=None), "not a replica store"),
    ],
)
def test_standby_is_503_when_any_condition_fails(change: Any, why: str) -> None:
    verdict = rules.standby(change(standby_report()))
    assert verdict.code == 503
    assert why in verdict.reason


def test_max_lag_in_bytes_compares_the_lag_in_bytes() -> None:
    behind = with_replication(standby_report(), lag_bytes=2_000_000, lag_seconds=0.0)
    assert rules.standby(behind, rules.LagLimit(bytes=2_000_000)).code == 200
    verdict = rules.standby(behind, rules.LagLimit(bytes=1_048_576))
    assert verdict.code == 503 and "2000000 bytes behind" in verdict.reason
    # The lag in seconds does not count for a limit in bytes, and the other way round.
    assert rules.standby(behind, rules.LagLimit(seconds=1.0)).code == 200


def test_max_lag_in_seconds_compares_the_lag_in_seconds() -> None:
    slow = with_replication(standby_report(), lag_bytes=0, lag_seconds=6.5)
    assert rules.standby(slow, rules.LagLimit(seconds=7.0)).code == 200
    verdict = rules.standby(slow, rules.LagLimit(seconds=5.0))
    assert verdict.code == 503 and "6.500 s behind" in verdict.reason


def test_an_unknown_lag_never_meets_a_limit() -> None:
    unknown = with_replication(
        standby_report(), lag_bytes=None, lag_seconds=None, problem="the primary is unreachable"
    )
    assert rules.standby(unknown).code == 200  # no limit asked: the sync record suffices
    for limit in (rules.LagLimit(bytes=10**12), rules.LagLimit(seconds=3600.0)):
        verdict = rules.standby(unknown, limit)
        assert verdict.code == 503 and "the primary is unreachable" in verdict.reason


@pytest.mark.parametrize(
    ("text", "limit"),
    [
        ("1048576", rules.LagLimit(bytes=1_048_576)),
        ("0", rules.LagLimit(bytes=0)),
        ("5s", rules.LagLimit(seconds=5.0)),
        ("0.25s", rules.LagLimit(seconds=0.25)),
        ("500ms", rules.LagLimit(seconds=0.5)),
    ],
)
def test_max_lag_forms(text: str, limit: rules.LagLimit) -> None:
    assert rules.parse_max_lag(text) == limit


@pytest.mark.parametrize("text", ["", "-1", "1e6", "5 s", "5m", "1MiB", "s", "1" * 19])
def test_max_lag_refuses_other_forms(text: str) -> None:
    with pytest.raises(ValueError, match="neither a number of bytes"):
        rules.parse_max_lag(text)


def forbidden_from(module: str) -> list[str]:
    """Each forbidden import reachable from `module` (see tests/test_purity.py)."""
    found: list[str] = []
    seen: set[str] = set()
    todo = [(step, [step]) for step in with_parents(module)]
    while todo:
        name, chain = todo.pop()
        path = module_file(name)
        if name in seen or path is None:
            continue
        seen.add(name)
        for imported in imported_by(name, path):
            top = imported.split(".")[0]
            if top in FORBIDDEN:
                found.append(" -> ".join([*chain, imported]))
            elif top == "haproxy_ln":
                todo.extend((step, [*chain, step]) for step in with_parents(imported))
    return found


def test_the_report_and_rules_are_pure() -> None:
    assert forbidden_from("haproxy_ln.health.model") == []
    assert forbidden_from("haproxy_ln.health.rules") == []
    # The check can fail: the shell modules beside them reach trio.
    assert forbidden_from("haproxy_ln.health.store")


# --- the ASGI app ------------------------------------------------------------------------------


class FakeSource:
    """A ReportSource answering with a fixed report; counts the database reads."""

    def __init__(self, report: NodeReport | None) -> None:
        self.value = report
        self.reads = 0

    async def report(self, *, replication: bool = True) -> NodeReport:
        self.reads += replication
        return self.report_now()

    def report_now(self) -> NodeReport:
        if self.value is None:
            raise RuntimeError("the agent is in a bad way")
        return self.value


def make_app(report: NodeReport | None) -> HealthApp:
    registry = CollectorRegistry()
    source = FakeSource(report)
    registry.register(AgentCollector(source))
    return HealthApp(source, registry)


async def call(
    app: HealthApp, path: str, method: str = "GET", query: bytes = b""
) -> tuple[int, dict[bytes, bytes], bytes]:
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": method, "path": path, "query_string": query, "headers": []}
    await app(scope, receive, send)
    start, body = sent
    return start["status"], dict(start["headers"]), body["body"]


@pytest.mark.parametrize(
    ("path", "on_active", "on_standby"),
    [
        ("/health", 200, 200),
        ("/active", 200, 503),
        ("/standby", 503, 200),
        ("/status", 200, 200),
        ("/metrics", 200, 200),
        ("/nope", 404, 404),
        ("/health/", 404, 404),
    ],
)
async def test_each_path_answers_by_role(path: str, on_active: int, on_standby: int) -> None:
    assert (await call(make_app(active_report()), path))[0] == on_active
    assert (await call(make_app(standby_report()), path))[0] == on_standby


async def test_only_a_standbys_checks_and_the_reports_read_the_databases() -> None:
    for report, path, reads in (
        (active_report(), "/health", 0),
        (active_report(), "/active", 0),
        (active_report(), "/standby", 0),
        (standby_report(), "/active", 0),
        (standby_report(), "/standby", 1),
        (active_report(), "/status", 1),
        (active_report(), "/metrics", 1),
    ):
        source = FakeSource(report)
        await call(HealthApp(source, CollectorRegistry()), path)
        assert source.reads == reads, (report.role, path)


async def test_head_answers_like_get_without_a_body() -> None:
    app = make_app(standby_report())
    for path in ("/health", "/active", "/standby", "/status", "/metrics"):
        code, headers, body = await call(app, path)
        head_code, head_headers, head_body = await call(app, path, "HEAD")
        assert head_code == code
        assert head_body == b""
        assert body
        assert head_headers[b"content-type"] == headers[b"content-type"]
        if path != "/status":  # the JSON carries the time of the report
            assert head_headers[b"content-length"] == headers[b"content-length"]


async def test_methods_that_could_change_something_are_refused() -> None:
    app = make_app(active_report())
    for method in ("POST", "PUT", "DELETE", "PATCH"):
        code, headers, _ = await call(app, "/active", method)
        assert code == 405 and headers[b"allow"] == b"GET, HEAD"


async def test_standby_max_lag_from_the_query() -> None:
    app = make_app(with_replication(standby_report(), lag_bytes=5000, lag_seconds=2.0))
    assert (await call(app, "/standby", query=b"max_lag=5000"))[0] == 200
    assert (await call(app, "/standby", query=b"max_lag=4999"))[0] == 503
    assert (await call(app, "/standby", query=b"max_lag=2s&other=1"))[0] == 200
    assert (await call(app, "/standby", query=b"max_lag=1500ms"))[0] == 503


@pytest.mark.parametrize("query", [b"max_lag=lots", b"max_lag=", b"max_lag=1&max_lag=2"])
async def test_a_bad_max_lag_is_503_saying_why(query: bytes) -> None:
    code, _, body = await call(make_app(standby_report()), "/standby", query=query)
    assert code == 503
    assert b"max_lag" in body


async def test_a_failing_report_is_503_not_a_crash() -> None:
    app = make_app(None)
    for path in ("/health", "/active", "/standby", "/status", "/metrics"):
        code, _, body = await call(app, path)
        assert code == 503 and b"internal error" in body


async def test_status_is_503_while_the_loop_stalls_and_still_reports() -> None:
    code, _, body = await call(make_app(replace(active_report(), healthy=False)), "/status")
    assert code == 503
    assert json.loads(body)["healthy"] is False


async def test_status_json_has_every_field() -> None:
    code, headers, body = await call(make_app(standby_report()), "/status")
    assert code == 200 and headers[b"content-type"] == b"application/json"
    status = json.loads(body)
    assert status["node"] == "b" and status["role"] == "standby"
    assert status["leader"] == {"node": "a", "epoch": 7}
    assert status["lease"] == {"id": 99, "remaining_s": None}
    assert status["sync"] == {
        "mode": "sync",
        "record": {"epoch": 7, "node": "b"},
        "synchronous": True,
    }
    replication = status["replication"]
    assert replication["confirmed_lsn"] == "1/100" and replication["applied_lsn"] == "1/100"
    assert replication["lag_bytes"] == 0 and replication["lag_seconds"] == 0.0
    assert status["daemon"]["state"] == "stopped"
    assert status["gate"] == {
        "opened": False,
        "admitting": False,
        "reason": "this node is not the active node",
        "active_node": "a",
    }
    assert status["proxy"]["connections"] == 2 and status["proxy"]["cancels_withheld"] == 4
    assert status["proxy"]["native"] is True and status["proxy"]["native_problem"] is None
    assert status["last_failover"] == {"detected": 0.0, "gate opened": 0.4}
    assert status["reason"] == "following a"


async def test_metrics_parse_and_carry_the_report() -> None:
    code, headers, body = await call(make_app(active_report()), "/metrics")
    assert code == 200 and headers[b"content-type"].startswith(b"text/plain")
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
    }
    assert samples[("haproxy_ln_role", (("role", "active"),))] == 1
    assert samples[("haproxy_ln_role", (("role", "standby"),))] == 0
    assert samples[("haproxy_ln_epoch", ())] == 7
    assert samples[("haproxy_ln_gate_open", ())] == 1
    assert samples[("haproxy_ln_synchronous", ())] == 1
    assert samples[("haproxy_ln_replication_lag_bytes", ())] == 0
    assert samples[("haproxy_ln_proxy_connections", ())] == 2
    assert samples[("haproxy_ln_proxy_rejected_total", (("reason", "gate"),))] == 3
    assert samples[("haproxy_ln_proxy_cancels_total", (("outcome", "withheld"),))] == 4
    assert samples[("haproxy_ln_native_framing", ())] == 1


async def test_an_unknown_lag_is_absent_from_metrics_not_zero() -> None:
    app = make_app(with_replication(standby_report(), lag_bytes=None, lag_seconds=None))
    _, _, body = await call(app, "/metrics")
    names = {s.name for f in text_string_to_metric_families(body.decode()) for s in f.samples}
    assert "haproxy_ln_replication_lag_bytes" not in names
    assert "haproxy_ln_role" in names


# --- through a real hypercorn server -----------------------------------------------------------


async def raw_exchange(port: int, request: bytes) -> bytes:
    """Send `request` as is and read until the server closes or 2 s pass."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(request)
        data = b""
        with trio.move_on_after(2):
            while chunk := await stream.receive_some(65536):
                data += chunk
    return data


async def test_the_server_survives_bad_requests_and_answers_head() -> None:
    port = free_port()
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_app, make_app(standby_report()), HostPort("127.0.0.1", port))
        for garbage in (
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(64),  # a TLS hello
            b"GET /health HTTP/1.1\r\nHost: x\r\nContent-Length: banana\r\n\r\n",
            b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n",  # beyond the head limit
            b"NOT HTTP AT ALL\r\n\r\n",
        ):
            answer = await raw_exchange(port, garbage)
            assert answer.startswith((b"HTTP/1.1 400", b"HTTP/1.1 431")), answer[:100]
        head = await raw_exchange(
            port, b"HEAD /standby HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        assert head.startswith(b"HTTP/1.1 200"), head
        assert head.endswith(b"\r\n\r\n")  # headers only
        two = await raw_exchange(
            port,
            b"GET /active HTTP/1.1\r\nHost: x\r\n\r\n"
            b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        assert two.startswith(b"HTTP/1.1 503") and b"HTTP/1.1 200" in two
        nursery.cancel_scope.cancel()


async def test_an_address_in_use_is_a_clear_error() -> None:
    port = free_port()
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_app, make_app(active_report()), HostPort("127.0.0.1", port))
        with pytest.raises(BaseExceptionGroup) as info:
            async with trio.open_nursery() as second:
                await second.start(
                    serve_app, make_app(active_report()), HostPort("127.0.0.1", port)
                )
        errors = info.value.subgroup(ListenError)
        assert errors is not None, info.value
        assert f"[health] listen 127.0.0.1:{port}" in str(errors.exceptions[0])
        nursery.cancel_scope.cancel()


# --- replication facts from real PostgreSQL -------------------------------------------------


async def test_store_probe_says_what_is_unknown_without_urls(pg_session: PostgresCluster) -> None:
    closed_port = free_port()
    config = ReplicationConfig.model_validate(
        {
            "source": pg_session.dsn(),
            "replica": f"postgresql://someone@127.0.0.1:{closed_port}/lightning",
            "connect_timeout": 2.0,
        }
    )
    async with bridge.open_bridge():
        probe = StoreProbe(config, timeout=1.0)
        try:
            standing_by = await probe.facts(leading=False)
            leading = await probe.facts(leading=True)
        finally:
            await probe.close()
    # The session cluster is no replica store, and the peer's database is not there.
    assert standing_by.store_reachable and standing_by.store_status is None
    assert standing_by.lag_bytes is None and standing_by.lag_seconds is None
    assert standing_by.problem is not None
    assert f"127.0.0.1:{closed_port}/lightning" in standing_by.problem
    assert "postgresql://" not in standing_by.problem and "someone" not in standing_by.problem
    # Leading, the primary is this database, where no replicator is connected.
    assert leading.lag_bytes is None
    assert leading.problem == "the replicator (haproxy_ln) is not connected to the primary"


# --- haproxy-ln status as a table --------------------------------------------------------------


def test_status_table_shows_both_nodes_and_who_cannot_be_asked() -> None:
    pair = PairStatus(
        {"reachable": True, "leader": {"node": "a", "epoch": 7}, "sync_record": None},
        (
            NodeStatus("a", HostPort("127.0.0.1", 8008), 200, active_report().as_json()),
            NodeStatus("b", None, error="[node] peer_health is not set"),
        ),
    )
    lines = render_table(pair).splitlines()
    assert lines[0] == "etcd: leader a (epoch 7); sync record: none"
    assert lines[1].split()[:5] == ["NODE", "ROLE", "EPOCH", "DAEMON", "GATE"]
    assert lines[2].split()[:5] == ["a", "active", "7", "ready", "open"]
    assert lines[3].split()[:2] == ["b", "unreachable"]
    assert lines[3].endswith("[node] peer_health is not set")


def test_status_table_shows_a_forced_promotion_request() -> None:
    etcd = {
        "reachable": True,
        "leader": None,
        "sync_record": {"epoch": 7, "node": None},
        "force": {"node": "b", "epoch": 7},
    }
    lines = render_table(PairStatus(etcd, ())).splitlines()
    assert lines[0] == "etcd: leader none; sync record: nobody for epoch 7"
    assert lines[1] == (
        "etcd: forced promotion of b in place of epoch 7 requested (data loss accepted)"
    )


def test_status_cli_says_what_it_could_not_reach_and_exits_1_without_etcd(
    tmp_path: Path,
) -> None:
    config = tmp_path / "node.toml"
    config.write_text(
        '[node]\nname = "a"\npeer = "b"\n'
        f'[etcd]\nendpoints = ["127.0.0.1:{free_port()}"]\nrequest_timeout = 0.2\n'
        f'[health]\nlisten = "0.0.0.0:{free_port()}"\n'
    )
    result = CliRunner().invoke(main, ["status", "--config", str(config)])
    assert result.exit_code == 1, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith("etcd: unreachable: ")
    assert lines[2].split()[:2] == ["a", "unreachable"] and "http://127.0.0.1:" in lines[2]
    assert lines[3].split()[:2] == ["b", "unreachable"]
    assert lines[3].endswith("[node] peer_health is not set")
    as_json = CliRunner().invoke(main, ["status", "--config", str(config), "--json"])
    shown = json.loads(as_json.output)
    assert shown["etcd"]["reachable"] is False
    assert [(n["node"], n["reachable"]) for n in shown["nodes"]] == [("a", False), ("b", False)]


# --- two real agents ----------------------------------------------------------------------------

ACTIVE_WITHIN = 60.0


@pytest.fixture
def pair(
    tmp_path: Path, etcd: EtcdServer, pg_pair: tuple[PostgresCluster, PostgresCluster]
) -> Iterator[tuple[Node, Node]]:
    with pair_of(tmp_path, pg_pair, (etcd.endpoint, etcd.endpoint)) as nodes:
        yield nodes


def get(node: Node, path: str, method: str = "GET") -> tuple[int, bytes]:
    request = urllib.request.Request(node.health_url + path, method=method)
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except OSError:
        return 0, b""


def answers(node: Node, path: str) -> int:
    return get(node, path)[0]


@pytest.mark.slow
def test_two_agents_health_endpoints_status_and_cli(pair: tuple[Node, Node]) -> None:
    a, b = pair
    a.start()
    wait_for("a's daemon", lambda: first(a, "daemon.ready") is not None, ACTIVE_WITHIN, a)
    b.start()
    wait_for(
        "a /active and b /standby",
        lambda: answers(a, "/active") == 200 and answers(b, "/standby") == 200,
        ACTIVE_WITHIN,
        a,
        b,
    )
    # Exactly one node is active, and the other is the standby.
    assert [answers(n, "/active") for n in (a, b)] == [200, 503]
    assert [answers(n, "/standby") for n in (a, b)] == [503, 200]
    assert [answers(n, "/health") for n in (a, b)] == [200, 200]
    assert get(a, "/active", "HEAD") == (200, b"")
    assert get(b, "/active", "HEAD") == (503, b"")
    assert answers(b, "/standby?max_lag=1048576") == 200
    assert answers(b, "/standby?max_lag=5s") == 200
    assert answers(b, "/standby?max_lag=soon") == 503

    status = {n.name: json.loads(get(n, "/status")[1]) for n in (a, b)}
    epoch = status["a"]["epoch"]
    assert isinstance(epoch, int) and epoch > 0
    for name, role in (("a", "active"), ("b", "standby")):
        s = status[name]
        assert s["node"] == name and s["role"] == role and s["healthy"] is True
        assert s["leader"] == {"node": "a", "epoch": epoch}
        assert s["sync"]["record"] == {"epoch": epoch, "node": "b"}
        assert s["sync"]["synchronous"] is True and s["sync"]["mode"] == "sync"
        assert isinstance(s["replication"]["lag_bytes"], int), s["replication"]
        assert isinstance(s["replication"]["lag_seconds"], float), s["replication"]
        assert s["replication"]["confirmed_lsn"], s["replication"]
        assert isinstance(s["proxy"]["native"], bool)
        assert s["reason"]
    assert status["a"]["lease"]["remaining_s"] > 0
    assert status["a"]["daemon"]["state"] == "ready"
    assert status["a"]["gate"]["admitting"] is True
    assert status["b"]["daemon"]["state"] == "stopped"
    assert status["b"]["gate"]["admitting"] is False
    assert status["b"]["replication"]["store_status"] == "streaming"
    assert status["b"]["replication"]["applied_lsn"]
    texts = json.dumps(status)
    assert "postgresql://" not in texts and "kek" not in texts  # no URLs, no key paths

    code, body = get(a, "/metrics")
    assert code == 200
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
    }
    assert samples[("haproxy_ln_role", (("role", "active"),))] == 1
    assert samples[("haproxy_ln_takeovers_total", ())] == 1
    assert samples[("haproxy_ln_daemon_ready", ())] == 1
    assert ("haproxy_ln_replicated_transactions_total", ()) in samples

    cli = subprocess.run(
        [sys.executable, "-m", "haproxy_ln", "status", "--config", str(b.config_path), "--json"],
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert cli.returncode == 0, cli.stderr.decode()
    shown = json.loads(cli.stdout)
    assert shown["etcd"]["leader"] == {"node": "a", "epoch": epoch}
    assert shown["etcd"]["sync_record"] == {"epoch": epoch, "node": "b"}
    roles = {n["node"]: n["status"]["role"] for n in shown["nodes"] if n["reachable"]}
    assert roles == {"b": "standby", "a": "active"}
    table = subprocess.run(
        [sys.executable, "-m", "haproxy_ln", "status", "--config", str(a.config_path)],
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert table.returncode == 0, table.stderr.decode()
    rows = [line.split()[:2] for line in table.stdout.decode().splitlines()[2:]]
    assert rows == [["a", "active"], ["b", "standby"]], table.stdout.decode()

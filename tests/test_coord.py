"""The etcd coordination shell against a real etcd: leases, the leader key, sync, watch, faults."""

from __future__ import annotations

import contextlib
import itertools
import shutil
import subprocess
import tempfile
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import pytest
import trio
from faultproxy import FaultProxy

from haproxy_ln.config import EtcdConfig
from haproxy_ln.coord import Coord, Lease, Successor, SyncRecord, open_coord
from haproxy_ln.coord.model import (
    ForceRequest,
    Keys,
    decode_force,
    decode_successor,
    decode_sync,
    encode_force,
    encode_successor,
    encode_sync,
)
from haproxy_ln.errors import CoordError, CoordUnavailable, LeaseLost
from haproxy_ln.local import EtcdServer
from haproxy_ln.local.ports import free_port

TIMEOUT = 2.0  # request timeout where etcd is reachable: generous, the machine is shared
SHORT = 0.3  # request timeout where etcd is cut off: the test waits about this long
SLACK = 1.5  # scheduling slack on top of a bound that must hold
_prefixes = itertools.count()
T = TypeVar("T")


@pytest.fixture(scope="module")
def shared_etcd(local_servers_dir: Path) -> Iterator[EtcdServer]:
    """One etcd for the module; each test uses its own key prefix."""
    server = EtcdServer(Path(tempfile.mkdtemp(prefix="etcd-coord-", dir=local_servers_dir)))
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture
def config(shared_etcd: EtcdServer) -> EtcdConfig:
    return make_config([shared_etcd.endpoint])


def make_config(endpoints: list[str], timeout: float = TIMEOUT, **more: Any) -> EtcdConfig:
    """An [etcd] section with a prefix no other test uses."""
    prefix = f"/test/pair-{next(_prefixes)}"
    return EtcdConfig.model_validate(
        {"endpoints": endpoints, "prefix": prefix, "request_timeout": timeout, **more}
    )


@asynccontextmanager
async def node(config: EtcdConfig, name: str, ttl: int = 2) -> AsyncIterator[tuple[Coord, Lease]]:
    """`name`'s Coord and a fresh lease of `ttl` s, revoked at the end if etcd answers."""
    async with open_coord(config, name) as coord:
        lease = await coord.grant_lease(ttl)
        try:
            yield coord, lease
        finally:
            with trio.move_on_after(TIMEOUT), contextlib.suppress(CoordError):
                await coord.revoke(lease)


# --- the leader key ------------------------------------------------------------------------


async def test_of_two_nodes_campaigning_at_once_exactly_one_wins(config: EtcdConfig) -> None:
    async with node(config, "a") as (a, lease_a), node(config, "b") as (b, lease_b):
        results: dict[str, int | None] = {}

        async def campaign(coord: Coord, lease: Lease) -> None:
            results[coord.node] = await coord.campaign(lease)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(campaign, a, lease_a)
            nursery.start_soon(campaign, b, lease_b)

        winners = [name for name, epoch in results.items() if epoch is not None]
        assert len(winners) == 1
        leader = await a.leader()
        assert leader is not None
        assert leader.node == winners[0]
        assert leader.epoch == results[winners[0]]
        assert leader.lease_id == (lease_a if winners[0] == "a" else lease_b).id


async def test_epoch_is_the_create_revision_and_grows_after_resign(config: EtcdConfig) -> None:
    async with node(config, "a") as (a, lease_a), node(config, "b") as (b, lease_b):
        first = await a.campaign(lease_a)
        assert first is not None
        view = await b.view()
        assert view.leader is not None and view.leader.epoch == first
        assert view.revision == first  # created by the last write, so at that revision
        assert await b.campaign(lease_b) is None
        assert await a.resign(first) is True
        assert await a.leader() is None
        second = await b.campaign(lease_b)
        assert second is not None and second > first
        third_try = await a.campaign(lease_a)
        assert third_try is None


async def test_campaign_tried_again_on_the_same_lease_returns_the_same_epoch(
    config: EtcdConfig,
) -> None:
    # What a retry after a timeout with unknown outcome does.
    async with node(config, "a") as (a, lease):
        epoch = await a.campaign(lease)
        assert epoch is not None
        assert await a.campaign(lease) == epoch


async def test_same_node_name_on_another_lease_does_not_take_over(config: EtcdConfig) -> None:
    # An agent restarted while its old lease lives must wait: the old process may still run.
    async with node(config, "a") as (old, old_lease), node(config, "a") as (new, new_lease):
        assert await old.campaign(old_lease) is not None
        assert await new.campaign(new_lease) is None


async def test_resign_with_a_stale_epoch_leaves_the_key(config: EtcdConfig) -> None:
    async with node(config, "a") as (a, lease):
        epoch = await a.campaign(lease)
        assert epoch is not None
        assert await a.resign(epoch - 1) is False
        assert await a.resign(epoch + 1, successor="b") is False
        view = await a.view()
        assert view.leader is not None and view.leader.epoch == epoch
        assert view.successor is None


# --- leases --------------------------------------------------------------------------------


async def test_lease_expiry_deletes_the_leader_key_after_the_ttl_not_before(
    config: EtcdConfig,
) -> None:
    async with node(config, "a", ttl=2) as (a, lease), open_coord(config, "b") as b:
        assert lease.ttl >= 2
        started = trio.current_time()
        epoch = await a.campaign(lease)
        assert epoch is not None
        view = await b.view()
        await trio.sleep_until(started + lease.ttl * 0.75)
        assert await b.leader() is not None
        assert await b.wait_change(view.revision, lease.ttl + 3 * SLACK) is True
        assert await b.leader() is None
        assert trio.current_time() - started >= lease.ttl * 0.75
        with pytest.raises(LeaseLost):
            await a.keepalive(lease)


async def test_keepalive_keeps_the_leader_key_past_the_ttl(config: EtcdConfig) -> None:
    async with node(config, "a", ttl=2) as (a, lease):
        epoch = await a.campaign(lease)
        assert epoch is not None
        end = trio.current_time() + 2 * lease.ttl
        while trio.current_time() < end:
            assert await a.keepalive(lease) == lease.ttl
            await trio.sleep(lease.ttl / 4)
        leader = await a.leader()
        assert leader is not None and leader.epoch == epoch


async def test_a_revoked_lease_is_lost_for_keepalive_and_campaign(config: EtcdConfig) -> None:
    async with node(config, "a") as (a, lease):
        assert await a.campaign(lease) is not None
        await a.revoke(lease)
        assert await a.leader() is None  # revoking deleted the key
        with pytest.raises(LeaseLost):
            await a.keepalive(lease)
        with pytest.raises(LeaseLost):
            await a.campaign(lease)
        await a.revoke(lease)  # again: already gone is fine


async def test_lease_ttl_below_one_second_is_refused(config: EtcdConfig) -> None:
    async with open_coord(config, "a") as a:
        with pytest.raises(ValueError, match="whole number of seconds"):
            await a.grant_lease(0)


# --- the sync record -----------------------------------------------------------------------


async def test_sync_record_is_written_only_by_the_holder_of_that_epoch(
    config: EtcdConfig,
) -> None:
    async with node(config, "a") as (a, lease_a), node(config, "b") as (b, lease_b):
        assert await a.read_sync() is None
        epoch = await a.campaign(lease_a)
        assert epoch is not None
        assert await a.write_sync(epoch, "b") is True
        assert await b.read_sync() == SyncRecord(epoch=epoch, node="b")
        assert await b.write_sync(epoch, None) is False  # not the holder
        assert await a.write_sync(epoch - 1, None) is False  # not the epoch
        assert await a.write_sync(epoch, None) is True
        assert await b.read_sync() == SyncRecord(epoch=epoch, node=None)

        assert await a.resign(epoch, successor="b") is True
        new_epoch = await b.campaign(lease_b)
        assert new_epoch is not None
        assert await a.write_sync(epoch, "a") is False  # a deposed leader's late write
        assert await b.read_sync() == SyncRecord(epoch=epoch, node=None)  # outlives the leader
        assert await b.write_sync(new_epoch, "a") is True
        assert await a.read_sync() == SyncRecord(epoch=new_epoch, node="a")


# --- switchover ----------------------------------------------------------------------------


async def test_resign_with_a_successor_blocks_others_and_lets_the_successor_in(
    config: EtcdConfig,
) -> None:
    async with (
        node(config, "a") as (a, lease_a),
        node(config, "b") as (b, lease_b),
        node(config, "c") as (c, lease_c),
    ):
        epoch = await a.campaign(lease_a)
        assert epoch is not None
        assert await a.resign(epoch, successor="b") is True
        view = await c.view()
        assert view.leader is None
        assert view.successor == Successor(node="b", after_epoch=epoch)
        assert await a.campaign(lease_a) is None
        assert await c.campaign(lease_c) is None
        new_epoch = await b.campaign(lease_b)
        assert new_epoch is not None and new_epoch > epoch
        assert await b.campaign(lease_b) == new_epoch
        view = await c.view()
        assert view.successor is None  # taking the key used up the handover
        assert view.leader is not None and view.leader.node == "b"


async def test_a_successor_that_never_comes_blocks_the_others_only_until_it_expires(
    config: EtcdConfig,
) -> None:
    # a's own lease outlives the record: it is the record's expiry that lets a in
    async with node(config, "a", ttl=10) as (a, lease_a), open_coord(config, "c") as c:
        epoch = await a.campaign(lease_a)
        assert epoch is not None
        handed_over = trio.current_time()
        assert await a.resign(epoch, successor="b", successor_ttl=2) is True
        assert await a.campaign(lease_a) is None
        view = await c.view()
        assert await c.wait_change(view.revision, 2 + 3 * SLACK) is True  # the record expired
        assert (await c.view()).successor is None
        assert trio.current_time() - handed_over >= 1.5
        assert await a.campaign(lease_a) is not None


# --- forced promotion ----------------------------------------------------------------------


async def test_a_forced_promotion_is_written_only_while_no_node_leads(config: EtcdConfig) -> None:
    async with node(config, "a") as (a, lease_a), open_coord(config, "b") as b:
        with pytest.raises(CoordError, match="no sync record"):
            await b.force_promotion("b")
        epoch = await a.campaign(lease_a)
        assert epoch is not None
        assert await a.write_sync(epoch, None) is True  # a runs degraded
        with pytest.raises(CoordError, match="a is active"):
            await b.force_promotion("b")
        assert (await b.view()).force is None
        assert await a.resign(epoch, None) is True  # a is gone
        request = await b.force_promotion("b")
        assert request == ForceRequest(node="b", epoch=epoch)
        assert (await a.view()).force == request
        assert await b.drop_force(ForceRequest(node="b", epoch=epoch + 1)) is False
        assert await b.drop_force(request) is True
        assert (await a.view()).force is None


# --- values ------------------------------------------------------------------------------


def test_records_read_back_as_written() -> None:
    keys = Keys("/p")
    for record in (SyncRecord(epoch=7, node="b"), SyncRecord(epoch=7, node=None)):
        assert decode_sync(keys.sync, encode_sync(record)) == record
    handover = Successor(node="b", after_epoch=9)
    assert decode_successor(keys.successor, encode_successor(handover)) == handover


@pytest.mark.parametrize(
    "value",
    [
        b"not json",
        b"[1, 2]",
        b'{"epoch": 7}',
        b'{"epoch": 7, "node": "b", "extra": 1}',
        b'{"epoch": true, "node": "b"}',
        b'{"epoch": "7", "node": "b"}',
        b'{"epoch": 0, "node": "b"}',
        b'{"epoch": 7, "node": 5}',
        b'{"epoch": 7, "node": ""}',
    ],
)
def test_a_sync_record_haproxy_ln_could_not_have_written_is_refused(value: bytes) -> None:
    with pytest.raises(CoordError, match="etcd key /p/sync "):
        decode_sync(Keys("/p").sync, value)


def test_a_forced_promotion_reads_back_and_must_accept_data_loss() -> None:
    keys = Keys("/p")
    request = ForceRequest(node="b", epoch=7)
    assert decode_force(keys.force, encode_force(request)) == request
    with pytest.raises(CoordError, match="does not accept data loss"):
        decode_force(keys.force, b'{"accept_data_loss": false, "epoch": 7, "node": "b"}')


def test_a_successor_record_without_a_node_is_refused() -> None:
    with pytest.raises(CoordError, match="has no node name"):
        decode_successor(Keys("/p").successor, b'{"after_epoch": 3, "node": null}')


async def test_a_foreign_value_under_the_prefix_is_reported_not_misread(
    config: EtcdConfig, shared_etcd: EtcdServer
) -> None:
    etcdctl(shared_etcd, "put", f"{config.prefix}/sync", "hello")
    async with open_coord(config, "a") as a:
        with pytest.raises(CoordError, match=f"etcd key {config.prefix}/sync is not JSON"):
            await a.view()
        with pytest.raises(CoordError, match="is not JSON"):
            await a.read_sync()


# --- waiting for a change ------------------------------------------------------------------


async def test_wait_change_sees_the_leader_key_deleted(config: EtcdConfig) -> None:
    async with node(config, "a") as (a, lease), open_coord(config, "b") as b:
        epoch = await a.campaign(lease)
        assert epoch is not None
        view = await b.view()
        seen: list[bool] = []

        async def wait() -> None:
            seen.append(await b.wait_change(view.revision, 10))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(wait)
            await trio.sleep(0.2)
            assert seen == []
            await a.resign(epoch)
        assert seen == [True]


async def test_wait_change_sees_a_change_made_before_it_began(config: EtcdConfig) -> None:
    async with node(config, "a") as (a, lease):
        epoch = await a.campaign(lease)
        assert epoch is not None
        view = await a.view()
        await a.resign(epoch)
        with trio.fail_after(TIMEOUT):
            assert await a.wait_change(view.revision, 30) is True


async def test_wait_change_without_a_change_returns_false_after_the_timeout(
    config: EtcdConfig,
) -> None:
    async with node(config, "a") as (a, lease), node(config, "x") as (_, other_lease):
        assert await a.campaign(lease) is not None
        view = await a.view()
        # a write elsewhere in etcd moves the revision but is not a change of this pair
        other_config = make_config(config.endpoints and [str(config.endpoints[0])])
        async with open_coord(other_config, "x") as elsewhere:
            assert await elsewhere.campaign(other_lease) is not None
        started = trio.current_time()
        assert await a.wait_change(view.revision, 0.3) is False
        assert trio.current_time() - started >= 0.3


async def eventually(call: Callable[[], Awaitable[T]]) -> T:
    """`call()`'s result once etcd answers again: gRPC reconnects after a short backoff."""
    with trio.fail_after(TIMEOUT + SLACK):
        while True:
            with contextlib.suppress(CoordUnavailable):
                return await call()
            await trio.sleep(0.05)


# --- faults --------------------------------------------------------------------------------


async def test_every_call_through_a_partition_raises_unavailable_within_its_timeout(
    shared_etcd: EtcdServer,
) -> None:
    with FaultProxy(shared_etcd.endpoint) as proxy:
        config = make_config([proxy.endpoint], timeout=SHORT)
        async with node(config, "a", ttl=30) as (a, lease):  # outlives the partition
            epoch = await a.campaign(lease)
            assert epoch is not None
            revision = (await a.view()).revision
            proxy.blackhole()
            calls = {
                "grant_lease": lambda: a.grant_lease(2),
                "keepalive": lambda: a.keepalive(lease),
                "campaign": lambda: a.campaign(lease),
                "leader": a.leader,
                "view": a.view,
                "resign": lambda: a.resign(epoch, successor="b"),
                "write_sync": lambda: a.write_sync(epoch, None),
                "read_sync": a.read_sync,
                "revoke": lambda: a.revoke(lease),
                "wait_change": lambda: a.wait_change(revision, 0.2),
            }
            for name, call in calls.items():
                bound = SHORT + (0.2 if name == "wait_change" else 0) + SLACK
                with trio.fail_after(bound), pytest.raises(CoordUnavailable) as raised:
                    await call()
                assert "did not answer" in str(raised.value), name
            proxy.heal()
            leader = await eventually(a.leader)  # on a new connection, after a short backoff
            assert leader is not None and leader.epoch == epoch


async def test_a_reset_connection_is_unavailable_and_recovers_after_heal(
    shared_etcd: EtcdServer,
) -> None:
    with FaultProxy(shared_etcd.endpoint) as proxy:
        config = make_config([proxy.endpoint], timeout=SHORT)
        async with node(config, "a") as (a, lease):
            assert await a.campaign(lease) is not None
            proxy.reset()
            with trio.fail_after(SHORT + SLACK), pytest.raises(CoordUnavailable):
                await a.leader()
            proxy.heal()
            assert await eventually(lambda: a.keepalive(lease)) > 0


async def test_a_refused_endpoint_fails_over_to_the_next_at_once(shared_etcd: EtcdServer) -> None:
    with FaultProxy(shared_etcd.endpoint) as proxy:
        proxy.reset()  # refuses like a stopped member
        config = make_config([proxy.endpoint, shared_etcd.endpoint], timeout=TIMEOUT)
        async with node(config, "a") as (a, lease):
            assert await a.campaign(lease) is not None
            assert await a.leader() is not None


async def test_a_partitioned_endpoint_costs_one_request_then_the_next_is_used(
    shared_etcd: EtcdServer,
) -> None:
    with FaultProxy(shared_etcd.endpoint) as proxy:
        proxy.blackhole()
        config = make_config([proxy.endpoint, shared_etcd.endpoint], timeout=SHORT)
        async with open_coord(config, "a") as a:
            # The first request may use up its time on the partitioned member
            # (or fail over within it, if gRPC gives up connecting first) ...
            with contextlib.suppress(CoordUnavailable):
                await a.leader()
            # ... but from then on requests go to the member that answers.
            assert await a.leader() is None
            lease = await a.grant_lease(2)
            assert await a.campaign(lease) is not None


async def test_etcd_down_is_reported_by_the_first_request_not_by_open(
    shared_etcd: EtcdServer,
) -> None:
    with FaultProxy(shared_etcd.endpoint) as proxy:
        proxy.reset()
        config = make_config([proxy.endpoint], timeout=SHORT)
        async with open_coord(config, "a") as a:
            with trio.fail_after(SHORT + SLACK), pytest.raises(CoordUnavailable):
                await a.grant_lease(2)


# --- credentials ---------------------------------------------------------------------------


def etcdctl(server: EtcdServer, *args: str) -> None:
    subprocess.run(
        ["etcdctl", f"--endpoints={server.endpoint}", *args],
        check=True,
        capture_output=True,
        timeout=30,
    )


@pytest.fixture
def etcd_with_auth(etcd: EtcdServer) -> EtcdServer:
    """A fresh etcd with auth on: user "ln" may use /test/, user "nobody" nothing."""
    etcdctl(etcd, "user", "add", "root:root-pw")
    etcdctl(etcd, "user", "add", "ln:ln-secret-pw")
    etcdctl(etcd, "user", "add", "nobody:nobody-secret-pw")
    etcdctl(etcd, "role", "add", "ln")
    etcdctl(etcd, "role", "grant-permission", "ln", "--prefix=true", "readwrite", "/test/")
    etcdctl(etcd, "user", "grant-role", "ln", "ln")
    etcdctl(etcd, "auth", "enable")
    return etcd


async def test_auth_credentials_are_used_and_refusals_never_show_the_password(
    etcd_with_auth: EtcdServer,
) -> None:
    endpoints = [etcd_with_auth.endpoint]
    good = make_config(endpoints, user="ln", password="ln-secret-pw")
    async with node(good, "a") as (a, lease):
        epoch = await a.campaign(lease)
        assert epoch is not None
        assert await a.keepalive(lease) > 0
        assert await a.write_sync(epoch, "b") is True
        view = await a.view()
        assert await a.resign(epoch) is True
        assert await a.wait_change(view.revision, 5) is True  # the watch is authenticated too

    refused = {
        "wrong password": make_config(endpoints, user="ln", password="wrong-secret-pw"),
        "no credentials": make_config(endpoints),
        "no permission": make_config(endpoints, user="nobody", password="nobody-secret-pw"),
    }
    for case, config in refused.items():
        async with open_coord(config, "a") as coord:
            with pytest.raises(CoordError) as raised:
                await coord.leader()
        message = str(raised.value)
        assert not isinstance(raised.value, CoordUnavailable), case
        shown = "".join(traceback.format_exception(raised.value))
        assert "secret-pw" not in shown, case
        assert {
            "wrong password": "refused user 'ln'",
            "no credentials": "requires a user",
            "no permission": "user 'nobody' may not use /test/",
        }[case] in message


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=cwd, timeout=60)


def make_certs(directory: Path) -> None:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, all signed by it."""
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
            "-subj", "/CN=haproxy-ln test CA", cwd=directory)  # fmt: skip
    (directory / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    for name in ("server", "client"):
        openssl("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr",
                "-subj", f"/CN={name}", cwd=directory)  # fmt: skip
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                "-CAcreateserial", "-out", f"{name}.pem", "-days", "2",
                "-extfile", "san.ext", cwd=directory)  # fmt: skip


class TlsEtcd(EtcdServer):
    """etcd serving plain HTTP for its health check and TLS, client certificates required."""

    def __init__(self, base_dir: Path, certs: Path) -> None:
        super().__init__(base_dir)
        self.certs = certs
        self.tls_port = free_port()

    @property
    def tls_endpoint(self) -> str:
        return f"127.0.0.1:{self.tls_port}"

    def _args(self) -> list[str]:
        args = [
            f"--listen-client-urls={self.client_url},https://{self.tls_endpoint}"
            if a.startswith("--listen-client-urls=")
            else a
            for a in super()._args()
        ]
        return [
            *args,
            f"--cert-file={self.certs / 'server.pem'}",
            f"--key-file={self.certs / 'server.key'}",
            f"--trusted-ca-file={self.certs / 'ca.pem'}",
            "--client-cert-auth",
        ]


@pytest.fixture
def tls_etcd(local_servers_dir: Path, tmp_path: Path) -> Iterator[TlsEtcd]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed: cannot make test certificates")
    make_certs(tmp_path)
    server = TlsEtcd(Path(tempfile.mkdtemp(prefix="etcd-tls-", dir=local_servers_dir)), tmp_path)
    try:
        server.start()
        yield server
    finally:
        server.stop()


async def test_tls_with_a_client_certificate_is_used(tls_etcd: TlsEtcd) -> None:
    certs = tls_etcd.certs
    files = {
        "ca_file": str(certs / "ca.pem"),
        "cert_file": str(certs / "client.pem"),
        "key_file": str(certs / "client.key"),
    }
    async with node(make_config([tls_etcd.tls_endpoint], **files), "a") as (a, lease):
        assert await a.campaign(lease) is not None
    # without the client certificate etcd ends the handshake
    ca_only = make_config([tls_etcd.tls_endpoint], timeout=SHORT, ca_file=files["ca_file"])
    async with open_coord(ca_only, "a") as coord:
        with pytest.raises(CoordUnavailable):
            await coord.leader()
    # and in plain text nothing answers
    async with open_coord(make_config([tls_etcd.tls_endpoint], timeout=SHORT), "a") as coord:
        with pytest.raises(CoordUnavailable):
            await coord.leader()


async def test_an_unreadable_tls_file_is_reported_when_opening(tmp_path: Path) -> None:
    config = make_config(["127.0.0.1:2379"], ca_file=str(tmp_path / "missing.pem"))
    with pytest.raises(CoordError, match=r"cannot read etcd ca_file .*missing\.pem"):
        async with open_coord(config, "a"):
            pass

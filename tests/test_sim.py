"""The Lightning daemon simulator and its checker, against real PostgreSQL.

Each test gets a database of its own in the session cluster. Runs happen in
this process (Simulator.run, in a thread when the test must act meanwhile)
or through the `haproxy-ln sim` command when the exit code and message are
the point.
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest
import trio
from harness import ProxyThread

from haproxy_ln.config import HostPort
from haproxy_ln.errors import DatabaseLost, DataVersionConflict, SimulatorError, WrongWalletPassword
from haproxy_ln.keys.lnd import lnd_state, unlock_wallet
from haproxy_ln.keys.lnrpc import WalletState
from haproxy_ln.keys.sealing import Secret
from haproxy_ln.local import PostgresCluster
from haproxy_ln.sim.checker import LOST, SPLIT_BRAIN, check
from haproxy_ln.sim.journal import Journal, read_journal
from haproxy_ln.sim.model import ChannelState, Pacer, decode_state, encode_state, next_update
from haproxy_ln.sim.runner import LndWallet, Mode, SimReport, SimSettings, Simulator

HSM_SECRET = bytes(range(32))
PASSWORD = b"simulated wallet password"


def new_database(cluster: PostgresCluster) -> str:
    name = f"sim_{uuid.uuid4().hex[:12]}"
    cluster.create_database(name, "postgres")
    return cluster.dsn(dbname=name)


@pytest.fixture
def dsn(pg_session: PostgresCluster) -> str:
    return new_database(pg_session)


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    path = tmp_path / "hsm_secret"
    path.write_bytes(HSM_SECRET)
    return path


def cln_settings(dsn: str, journal: Path, key_file: Path, **kw: Any) -> SimSettings:
    values: dict[str, Any] = {"node": "a", "rate": 0.0, "channels": 2, "count": 10, **kw}
    return SimSettings(mode=Mode.CLN, dsn=dsn, journal=journal, key_file=key_file, **values)


def acks(journal: Path) -> list[tuple[bytes, int, bytes]]:
    return [
        (r.channel, r.commitment, r.htlcs)  # type: ignore[misc]
        for r in read_journal(journal)
        if r.kind == "ack"
    ]


def sql(dsn: str, query: str, *params: object) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        cur = conn.execute(query, params or None)
        return cur.fetchall() if cur.description else []


def wait_for(condition: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.02)


class Background:
    """A Simulator running in a thread; `result()` returns its report or raises its error."""

    def __init__(self, settings: SimSettings) -> None:
        self.sim = Simulator(settings)
        self._report: SimReport | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._report = self.sim.run()
        except BaseException as e:
            self._error = e

    def result(self, timeout: float = 30.0) -> SimReport:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "the simulator did not stop"
        if self._error is not None:
            raise self._error
        assert self._report is not None
        return self._report

    def stop(self) -> None:
        self.sim.request_stop()
        self._thread.join(30)


# -- pure parts ------------------------------------------------------------


def test_pacer_keeps_the_rate_and_stops_at_the_count() -> None:
    pacer = Pacer(rate=10, count=3, start=100.0, deadline=None)
    taken = [pacer.take(100.0), pacer.take(100.0), pacer.take(100.0)]
    assert taken == pytest.approx([100.0, 100.1, 100.2])
    assert pacer.take(200.0) is None
    assert pacer.ended_by == "count"


def test_pacer_does_not_burst_after_a_stall_and_stops_at_the_deadline() -> None:
    pacer = Pacer(rate=10, count=None, start=0.0, deadline=5.0)
    assert pacer.take(0.0) == 0.0
    assert pacer.take(3.0) == pytest.approx(2.9)  # late: due at once, one interval of slack
    assert pacer.take(3.0) == pytest.approx(3.0)
    assert pacer.take(3.0) == pytest.approx(3.1)
    assert pacer.take(4.95) == pytest.approx(4.85)
    assert pacer.take(4.96) == pytest.approx(4.95)
    assert pacer.take(4.97) is None  # the next would be due at 5.05, past the deadline
    assert pacer.ended_by == "duration"


def test_every_update_moves_to_the_next_commitment_with_another_htlc_set() -> None:
    rng = random.Random(7)
    state = ChannelState.opened(b"\x01" * 32)
    for _ in range(200):
        update = next_update(state, rng, max_htlcs=3)
        assert update.after.commitment == state.commitment + 1
        assert update.after.digest != state.digest
        assert len(update.after.htlcs) <= 3
        assert decode_state(state.channel_id, encode_state(update.after)) == update.after
        state = update.after


def test_a_torn_last_journal_line_is_ignored_but_a_bad_middle_line_is_an_error(
    tmp_path: Path,
) -> None:
    path = tmp_path / "journal"
    journal = Journal(path, "a", "cln", "r1")
    journal.ack(ChannelState.opened(b"\x02" * 32))
    journal.close()
    with path.open("ab") as f:
        f.write(b'{"v":1,"kind":"ack","no')
    assert [r.kind for r in read_journal(path)] == ["ack"]
    with path.open("ab") as f:
        f.write(b"\n")
    with pytest.raises(SimulatorError, match="line 2 is not a journal line"):
        read_journal(path)


# -- cln mode --------------------------------------------------------------


def test_cln_writes_through_the_proxy_and_the_checker_finds_nothing_lost(
    tmp_path: Path, pg_session: PostgresCluster, proxy: ProxyThread, key_file: Path
) -> None:
    direct = new_database(pg_session)
    through = proxy.dsn(dbname=direct.rsplit("/", 1)[1])
    journal = tmp_path / "journal"
    report = Simulator(cln_settings(through, journal, key_file, count=30, channels=3)).run()

    assert (report.updates, report.stopped_by) == (30, "count")
    assert len(acks(journal)) == 30
    result = check([journal], direct)
    assert (result.acked, result.lost, result.split_brain, result.details) == (30, 0, 0, ())
    # Every write transaction passed the data_version check: 30 updates + opening the channels.
    assert sql(direct, "SELECT intval FROM vars WHERE name = 'data_version'") == [(31,)]
    assert sql(direct, "SELECT count(*) FROM commitment_secrets") == [(30,)]


def test_a_rolled_back_commitment_is_reported_as_exactly_that_lost_write(
    tmp_path: Path, dsn: str, key_file: Path
) -> None:
    journal = tmp_path / "journal"
    Simulator(cln_settings(dsn, journal, key_file, count=12)).run()
    channel, commitment, _ = acks(journal)[-1]
    # Roll the channel back one commitment, as a database restored from an old copy would be.
    sql(
        dsn,
        "DELETE FROM commitment_secrets WHERE commitment_number = %s AND channel_id ="
        " (SELECT id FROM channels WHERE channel_id = %s)",
        commitment,
        channel,
    )
    sql(
        dsn,
        "UPDATE channels SET next_index_local = next_index_local - 1 WHERE channel_id = %s",
        channel,
    )

    result = check([journal], dsn)

    assert (result.acked, result.lost, result.split_brain) == (12, 1, 0)
    (finding,) = result.details
    assert (finding.kind, finding.channel, finding.commitment) == (LOST, channel.hex(), commitment)
    assert f"database is at commitment {commitment - 1}" in finding.message


def test_a_commitment_kept_with_other_htlcs_is_a_lost_write(
    tmp_path: Path, dsn: str, key_file: Path
) -> None:
    journal = tmp_path / "journal"
    Simulator(cln_settings(dsn, journal, key_file, count=6, channels=1)).run()
    sql(dsn, "UPDATE commitment_secrets SET htlc_digest = '\\x00' WHERE commitment_number = 2")

    result = check([journal], dsn)

    assert [(f.kind, f.commitment) for f in result.details] == [(LOST, 2)]
    assert "has htlcs 00" in result.details[0].message


def test_two_journals_with_conflicting_states_are_a_split_brain(
    tmp_path: Path, pg_session: PostgresCluster, key_file: Path
) -> None:
    # Two nodes that both acted as active, each on its own copy of the database.
    first_db, second_db = new_database(pg_session), new_database(pg_session)
    first, second = tmp_path / "a.journal", tmp_path / "b.journal"
    Simulator(cln_settings(first_db, first, key_file, count=5, channels=1, seed=1)).run()
    Simulator(
        cln_settings(second_db, second, key_file, count=5, channels=1, seed=2, node="b")
    ).run()

    result = check([first, second], first_db)

    assert (result.acked, result.split_brain, result.lost) == (10, 5, 5)
    split = [f for f in result.details if f.kind == SPLIT_BRAIN]
    assert [f.commitment for f in split] == [1, 2, 3, 4, 5]
    assert "a (run" in split[0].message and "b (run" in split[0].message
    # The survivor holds the first node's states: what is lost is what the second acknowledged.
    assert check([first], first_db).ok


def test_a_restart_continues_the_numbering_in_the_same_journal(
    tmp_path: Path, dsn: str, key_file: Path
) -> None:
    journal = tmp_path / "journal"
    for _ in range(2):
        Simulator(cln_settings(dsn, journal, key_file, count=4, channels=1)).run()

    records = read_journal(journal)
    assert [r.commitment for r in records if r.kind == "ack"] == list(range(1, 9))
    assert [r.kind for r in records].count("start") == 2
    assert len({r.run for r in records}) == 2
    assert check([journal], dsn).ok
    assert sql(dsn, "SELECT version FROM version") == [(1,)]  # migrations ran once


def test_a_second_writer_makes_the_data_version_check_fail_and_nothing_more_is_acked(
    tmp_path: Path, dsn: str, key_file: Path
) -> None:
    journal = tmp_path / "journal"
    running = Background(cln_settings(dsn, journal, key_file, count=None, rate=50.0))
    wait_for(lambda: journal.exists() and len(acks(journal)) >= 3)

    sql(dsn, "UPDATE vars SET intval = intval + 1 WHERE name = 'data_version'")

    with pytest.raises(DataVersionConflict, match="another writer"):
        running.result()
    records = read_journal(journal)
    assert records[-1].kind == "exit" and "optimistic lock" in (records[-1].reason or "")
    # The update that hit the conflict was rolled back: the database holds exactly what was acked.
    committed = sql(dsn, "SELECT sum(next_index_local) FROM channels")[0][0]
    assert committed == len(acks(journal))
    assert check([journal], dsn).ok


def test_a_lost_database_connection_stops_the_simulator(
    tmp_path: Path, dsn: str, key_file: Path
) -> None:
    journal = tmp_path / "journal"
    running = Background(cln_settings(dsn, journal, key_file, count=None, rate=50.0))
    wait_for(lambda: journal.exists() and len(acks(journal)) >= 2)

    sql(
        dsn,
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
        " WHERE application_name = 'haproxy-ln-sim-cln'",
    )

    with pytest.raises(DatabaseLost, match="connection lost"):
        running.result()
    assert check([journal], dsn).ok


# -- the command -----------------------------------------------------------


def haproxy_ln(*args: str) -> list[str]:
    return [sys.executable, "-m", "haproxy_ln", "sim", *args]


def test_cln_refuses_to_start_without_its_key_file(tmp_path: Path, dsn: str) -> None:
    journal = tmp_path / "journal"
    missing = tmp_path / "hsm_secret"
    done = subprocess.run(
        haproxy_ln(
            "run", "--mode", "cln", "--dsn", dsn, "--journal", str(journal),
            "--key-file", str(missing), "--count", "3",
        ),
        capture_output=True,
        text=True,
        timeout=60,
    )  # fmt: skip

    assert done.returncode == 1
    assert f"the key file {missing} does not exist: refusing to start" in done.stderr
    assert not journal.exists()
    assert sql(dsn, "SELECT to_regclass('vars')") == [(None,)]  # the database was not touched


def test_the_command_stops_cleanly_on_sigterm_and_check_prints_json(
    tmp_path: Path, dsn: str, key_file: Path
) -> None:
    journal = tmp_path / "journal"
    proc = subprocess.Popen(
        haproxy_ln(
            "run", "--mode", "cln", "--dsn", dsn, "--journal", str(journal),
            "--key-file", str(key_file), "--rate", "50", "--node", "cli",
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        wait_for(lambda: journal.exists() and len(acks(journal)) >= 3, timeout=30)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0, stderr
    assert "stopped by stop requested" in stderr
    last = read_journal(journal)[-1]
    assert (last.kind, last.node) == ("exit", "cli")

    done = subprocess.run(
        haproxy_ln("check", "--dsn", dsn, "--json", str(journal)),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    printed = json.loads(done.stdout)
    assert printed["ok"] is True and printed["lost"] == 0
    assert printed["acked"] == len(acks(journal))


def test_check_exits_1_and_names_the_lost_write(tmp_path: Path, dsn: str, key_file: Path) -> None:
    journal = tmp_path / "journal"
    Simulator(cln_settings(dsn, journal, key_file, count=3, channels=1)).run()
    sql(dsn, "DELETE FROM commitment_secrets WHERE commitment_number = 3")
    sql(dsn, "UPDATE channels SET next_index_local = 2")

    done = subprocess.run(
        haproxy_ln("check", "--dsn", dsn, str(journal)), capture_output=True, text=True, timeout=60
    )

    assert done.returncode == 1
    assert "acknowledged 3, unknown 0, lost 1, split brain 0: PROBLEMS FOUND" in done.stdout
    assert "commitment 3" in done.stdout


# -- lnd mode --------------------------------------------------------------


@pytest.fixture
def lnd_wallet(tmp_path: Path) -> LndWallet:
    password_file = tmp_path / "wallet-password"
    password_file.write_bytes(PASSWORD)
    return LndWallet(
        password_file, tmp_path / "tls.cert", tmp_path / "tls.key", HostPort("127.0.0.1", 0)
    )


def lnd_settings(dsn: str, journal: Path, wallet: LndWallet, **kw: Any) -> SimSettings:
    values: dict[str, Any] = {"node": "a", "rate": 0.0, "channels": 2, "count": 10, **kw}
    return SimSettings(mode=Mode.LND, dsn=dsn, journal=journal, wallet=wallet, **values)


async def wait_listening(sim: Simulator) -> HostPort:
    assert await trio.to_thread.run_sync(sim.listening.wait, 15)
    assert sim.wallet is not None
    return sim.wallet.address


async def test_lnd_stays_off_the_database_until_unlocked_over_grpc(
    tmp_path: Path, pg_session: PostgresCluster, proxy: ProxyThread, lnd_wallet: LndWallet
) -> None:
    dsn = new_database(pg_session)
    journal = tmp_path / "journal"
    through = proxy.dsn(dbname=dsn.rsplit("/", 1)[1])
    running = Background(lnd_settings(through, journal, lnd_wallet, count=20))
    rpc = await wait_listening(running.sim)
    cert = lnd_wallet.tls_cert

    assert await lnd_state(rpc, cert, 5.0) == WalletState.LOCKED
    with pytest.raises(WrongWalletPassword):
        await unlock_wallet(rpc, cert, Secret(b"not the password"), 5.0)
    await trio.sleep(0.3)
    assert await lnd_state(rpc, cert, 5.0) == WalletState.LOCKED
    assert sql(dsn, "SELECT to_regclass('channeldb_kv')") == [(None,)]
    assert not journal.exists()

    await unlock_wallet(rpc, cert, Secret(PASSWORD), 5.0)
    report = await trio.to_thread.run_sync(running.result)

    assert report.updates == 20
    assert len(acks(journal)) == 20
    result = check([journal], dsn)
    assert (result.acked, result.lost, result.split_brain) == (20, 0, 0)
    # and the checker reads lnd's revocation log: one entry gone is one lost write
    channel, commitment, digest = acks(journal)[-1]
    sql(
        dsn,
        "DELETE FROM channeldb_kv WHERE key = %s AND value = %s",
        commitment.to_bytes(8, "big"),
        digest,
    )
    (finding,) = check([journal], dsn).details
    assert (finding.kind, finding.channel, finding.commitment) == (LOST, channel.hex(), commitment)


async def test_lnd_reports_server_active_while_running_and_stops_on_request(
    tmp_path: Path, dsn: str, lnd_wallet: LndWallet
) -> None:
    journal = tmp_path / "journal"
    running = Background(lnd_settings(dsn, journal, lnd_wallet, count=None, rate=20.0))
    rpc = await wait_listening(running.sim)
    await unlock_wallet(rpc, lnd_wallet.tls_cert, Secret(PASSWORD), 5.0)
    assert await trio.to_thread.run_sync(running.sim.running.wait, 15)
    with trio.fail_after(10):
        while await lnd_state(rpc, lnd_wallet.tls_cert, 5.0) != WalletState.SERVER_ACTIVE:
            await trio.sleep(0.05)

    running.sim.request_stop()
    report = await trio.to_thread.run_sync(running.result)

    assert report.stopped_by == "stop requested"
    assert check([journal], dsn).ok


async def run_unlocked(settings: SimSettings) -> SimReport:
    assert settings.wallet is not None
    running = Background(settings)
    rpc = await wait_listening(running.sim)
    await unlock_wallet(rpc, settings.wallet.tls_cert, Secret(PASSWORD), 5.0)
    return await trio.to_thread.run_sync(running.result)


async def test_lnd_retries_serialization_failures_between_its_pooled_connections(
    tmp_path: Path, dsn: str, lnd_wallet: LndWallet
) -> None:
    # Four connections updating one channel at full speed collide all the time.
    journal = tmp_path / "journal"
    report = await run_unlocked(
        lnd_settings(dsn, journal, lnd_wallet, count=60, channels=1, pool=4)
    )

    assert report.updates == 60
    assert report.retries > 0
    # SERIALIZABLE with retries: every commitment number acknowledged exactly once, none lost.
    assert sorted(c for _, c, _ in acks(journal)) == list(range(1, 61))
    assert check([journal], dsn).ok


async def test_an_lnd_restart_continues_the_numbering_and_keeps_its_tls_certificate(
    tmp_path: Path, dsn: str, lnd_wallet: LndWallet
) -> None:
    journal = tmp_path / "journal"
    settings = lnd_settings(dsn, journal, lnd_wallet, count=5, channels=1, pool=2)
    await run_unlocked(settings)
    cert = lnd_wallet.tls_cert.read_bytes()
    await run_unlocked(settings)

    runs: dict[str, list[int]] = {}
    for r in read_journal(journal):
        if r.kind == "ack":
            runs.setdefault(r.run, []).append(r.commitment)  # type: ignore[arg-type]
    first, second = runs.values()  # (workers may journal out of commit order within a run)
    assert sorted(first) == [1, 2, 3, 4, 5] and sorted(second) == [6, 7, 8, 9, 10]
    assert lnd_wallet.tls_cert.read_bytes() == cert
    assert check([journal], dsn).ok


def test_lnd_refuses_to_start_without_its_password_file(
    tmp_path: Path, dsn: str, lnd_wallet: LndWallet
) -> None:
    (lnd_wallet.password_file).unlink()
    with pytest.raises(SimulatorError, match=r"wallet password file .* does not exist"):
        Simulator(lnd_settings(dsn, tmp_path / "journal", lnd_wallet)).run()

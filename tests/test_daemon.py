"""The daemon supervisor with real processes: a tiny Python TCP server plays the daemon.

Child mode is tested end to end (readiness, start timeout, SIGTERM then
SIGKILL, kill, a death noticed, the daemon's helpers killed with it, no
daemon outliving a supervisor killed with SIGKILL); command mode through a
small controller script that starts the daemon detached, as systemctl would.
Every test also reads the safety event log back.
"""

from __future__ import annotations

import functools
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import trio

from haproxy_ln.config import DaemonConfig, HostPort
from haproxy_ln.daemon import (
    DaemonState,
    DaemonStatus,
    SystemdNotifier,
    open_supervisor,
    run_watchdog,
    watchdog_period,
)
from haproxy_ln.daemon._helper import EXIT_NOT_STARTED
from haproxy_ln.daemon.child import PYTHON
from haproxy_ln.daemon.probes import ProbeResult, probe_for
from haproxy_ln.errors import DaemonFailed
from haproxy_ln.events import Event, EventLog, read_events
from haproxy_ln.keys.lnrpc import WalletState
from haproxy_ln.local.ports import free_port, pid_alive

# The "Lightning daemon": options as key=value. pidfile= is written once it runs;
# helper= starts a grandchild and writes its pid there; delay= waits before
# writing the file ready= and listening on port=; term=ignore ignores SIGTERM;
# exit=N exits with N after exit_after= seconds.
FAKE_DAEMON = r"""
import os, signal, socket, subprocess, sys, time

def write(path, text):
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.rename(path + ".tmp", path)

args = dict(a.split("=", 1) for a in sys.argv[1:])
if args.get("term") == "ignore":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
if "helper" in args:
    helper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    write(args["helper"], str(helper.pid))
if "pidfile" in args:
    write(args["pidfile"], str(os.getpid()))
time.sleep(float(args.get("delay", "0")))
if "ready" in args:
    write(args["ready"], "")
if "port" in args:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", int(args["port"])))
    s.listen(16)
if "exit" in args:
    time.sleep(float(args.get("exit_after", "0")))
    sys.exit(int(args["exit"]))
while True:
    time.sleep(60)
"""

# A stand-in for systemctl: start runs the daemon detached and returns; stop
# sends SIGTERM and waits; kill sends SIGKILL and returns at once; status
# exits 0 while the daemon's pid lives. `fail-start` makes start fail.
CONTROLLER = r"""
import os, signal, subprocess, sys, time
state, action, *daemon_args = sys.argv[1:]
pidfile = os.path.join(state, "pid")

def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False

def pid():
    try:
        with open(pidfile) as f:
            return int(f.read())
    except (OSError, ValueError):
        return None

if action == "start":
    if os.path.exists(os.path.join(state, "fail-start")):
        sys.exit(1)
    p = subprocess.Popen([sys.executable, *daemon_args], start_new_session=True,
                         stdin=subprocess.DEVNULL)
    with open(pidfile + ".tmp", "w") as f:
        f.write(str(p.pid))
    os.rename(pidfile + ".tmp", pidfile)
elif action in ("stop", "kill"):
    p = pid()
    if p is not None and alive(p):
        os.kill(p, signal.SIGTERM if action == "stop" else signal.SIGKILL)
        while action == "stop" and alive(p):
            time.sleep(0.02)
elif action == "status":
    p = pid()
    sys.exit(0 if p is not None and alive(p) else 3)
"""


@pytest.fixture
def fake_daemon(tmp_path: Path) -> Path:
    path = tmp_path / "fake_daemon.py"
    path.write_text(FAKE_DAEMON)
    return path


@pytest.fixture
def events_path(tmp_path: Path) -> Path:
    return tmp_path / "events.jsonl"


@pytest.fixture
def events(events_path: Path) -> EventLog:
    return EventLog(events_path, "a")


def child_config(
    daemon: Path,
    *args: str,
    port: int | None = None,
    probe_port: int | None = None,
    **settings: object,
) -> DaemonConfig:
    """Child mode running the fake daemon, listening on `port` and probed there if given
    (or probed on `probe_port`, where it never listens)."""
    argv = (sys.executable, str(daemon), *args, *([f"port={port}"] if port else []))
    probe: dict[str, object] = {"probe": "none"}
    if port or probe_port:
        probe = {"probe": "tcp", "probe_address": HostPort("127.0.0.1", port or probe_port or 0)}
    values = {"mode": "child", "command": argv, "probe_interval": 0.05, **probe, **settings}
    return DaemonConfig.model_validate(values)


def kinds(path: Path) -> list[str]:
    return [e.kind for e in read_events(path)]


def the(path: Path, kind: str) -> Event:
    (event,) = [e for e in read_events(path) if e.kind == kind]
    return event


async def wait_for(condition: Callable[[], bool], seconds: float = 5.0) -> None:
    with trio.fail_after(seconds):
        while not condition():
            await trio.sleep(0.02)


def read_pid(path: Path) -> int:
    return int(path.read_text())


def connects(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


# --- child mode --------------------------------------------------------------------------------


async def test_start_returns_only_once_the_daemon_accepts_connections(
    fake_daemon: Path, events: EventLog, events_path: Path, tmp_path: Path
) -> None:
    port = free_port()
    pidfile = tmp_path / "pid"
    config = child_config(fake_daemon, "delay=0.5", f"pidfile={pidfile}", port=port)
    async with open_supervisor(config, events) as supervisor:
        assert supervisor.state is DaemonState.STOPPED
        await supervisor.start()
        assert connects(port)
        status = supervisor.status()
        assert status.state is DaemonState.READY
        assert status.pid == read_pid(pidfile)  # the launcher exec'd the daemon in place
        await supervisor.stop()
    assert kinds(events_path) == [
        "daemon.started",
        "daemon.ready",
        "daemon.stopping",
        "daemon.stopped",
    ]
    assert the(events_path, "daemon.started").fields["pid"] == status.pid
    assert the(events_path, "daemon.ready").fields["seconds"] >= 0.5  # type: ignore[operator]


async def test_a_daemon_never_ready_fails_start_after_start_timeout_and_is_killed(
    fake_daemon: Path, events: EventLog, events_path: Path, tmp_path: Path
) -> None:
    pidfile = tmp_path / "pid"
    config = child_config(
        fake_daemon,
        f"pidfile={pidfile}",
        "term=ignore",
        probe_port=free_port(),
        start_timeout=1.0,
        probe_timeout=0.5,
    )
    async with open_supervisor(config, events) as supervisor:
        with pytest.raises(DaemonFailed, match=r"not ready within 1 s; last probe: .*refused"):
            await supervisor.start()
        assert supervisor.state is DaemonState.FAILED
        assert supervisor.status().exit_code == -signal.SIGKILL
        assert not pid_alive(read_pid(pidfile))
    assert kinds(events_path) == [
        "daemon.started",
        "daemon.start_failed",
        "daemon.killed",
        "daemon.stopped",
    ]
    stopped = the(events_path, "daemon.stopped")
    assert stopped.fields["cause"] == "start_failed"
    assert stopped.fields["pid"] == read_pid(pidfile)


async def test_stop_escalates_to_sigkill_when_the_daemon_ignores_sigterm(
    fake_daemon: Path, events: EventLog, events_path: Path
) -> None:
    config = child_config(fake_daemon, "term=ignore", port=free_port(), stop_timeout=0.5)
    async with open_supervisor(config, events) as supervisor:
        await supervisor.start()
        await supervisor.stop()
        status = supervisor.status()
        assert status.state is DaemonState.STOPPED
        assert status.exit_code == -signal.SIGKILL
        assert not pid_alive(status.pid or 0)
    assert kinds(events_path)[2:] == ["daemon.stopping", "daemon.killed", "daemon.stopped"]
    assert the(events_path, "daemon.stopped").fields["cause"] == "stop"


async def test_stop_asks_with_sigterm_first(fake_daemon: Path, events: EventLog) -> None:
    config = child_config(fake_daemon, port=free_port())
    async with open_supervisor(config, events) as supervisor:
        await supervisor.start()
        await supervisor.stop()
        assert supervisor.status().exit_code == -signal.SIGTERM


async def test_kill_never_asks_the_daemon_to_stop(
    fake_daemon: Path, events: EventLog, events_path: Path
) -> None:
    config = child_config(fake_daemon, "term=ignore", port=free_port(), stop_timeout=600)
    async with open_supervisor(config, events) as supervisor:
        await supervisor.start()
        await supervisor.kill("lease lost")
        status = supervisor.status()
        assert (status.state, status.exit_code) == (DaemonState.STOPPED, -signal.SIGKILL)
    assert kinds(events_path) == [
        "daemon.started",
        "daemon.ready",
        "daemon.killed",
        "daemon.stopped",
    ]
    assert the(events_path, "daemon.killed").fields["reason"] == "lease lost"
    assert the(events_path, "daemon.stopped").fields["cause"] == "kill"


async def test_a_daemon_that_dies_on_its_own_is_noticed_with_its_exit_code(
    fake_daemon: Path, events: EventLog, events_path: Path
) -> None:
    seen: list[DaemonStatus] = []
    config = child_config(fake_daemon, "exit=3", "exit_after=0.3", port=free_port())
    async with open_supervisor(config, events, on_change=seen.append) as supervisor:
        await supervisor.start()
        with trio.fail_after(5):
            status = await supervisor.wait_until(DaemonState.FAILED)
        assert status.exit_code == 3
        assert "exited with code 3 on its own" in status.reason
        await supervisor.stop()  # nothing runs: stop only settles the state
        assert supervisor.state is DaemonState.STOPPED
    assert [s.state for s in seen] == [
        DaemonState.STARTING,
        DaemonState.READY,
        DaemonState.FAILED,
        DaemonState.STOPPED,
    ]
    stopped = the(events_path, "daemon.stopped")
    assert (stopped.fields["cause"], stopped.fields["code"]) == ("exited", 3)


async def test_a_daemon_exiting_before_ready_fails_start_at_once(
    fake_daemon: Path, events: EventLog
) -> None:
    config = child_config(fake_daemon, "exit=2", port=free_port(), start_timeout=600)
    async with open_supervisor(config, events) as supervisor:
        with trio.fail_after(10), pytest.raises(DaemonFailed, match="exited with code 2 before"):
            await supervisor.start()
        assert supervisor.status().exit_code == 2


async def test_a_missing_program_is_a_clear_error(
    events: EventLog, events_path: Path, tmp_path: Path
) -> None:
    missing = tmp_path / "no-such-lightningd"
    config = DaemonConfig(mode="child", command=(str(missing),))
    async with open_supervisor(config, events) as supervisor:
        with pytest.raises(DaemonFailed, match=f"cannot run '{missing}': No such file"):
            await supervisor.start()
    assert kinds(events_path) == ["daemon.started", "daemon.stopped", "daemon.start_failed"]
    assert the(events_path, "daemon.stopped").fields["code"] == 127


async def test_events_pair_started_and_stopped_with_the_real_pids(
    fake_daemon: Path, events: EventLog, events_path: Path, tmp_path: Path
) -> None:
    pids = []
    for run in range(2):
        pidfile = tmp_path / f"pid{run}"
        config = child_config(fake_daemon, f"pidfile={pidfile}", port=free_port())
        async with open_supervisor(config, events) as supervisor:
            await supervisor.start()
            await supervisor.stop()
        pids.append(read_pid(pidfile))
    ends = [e for e in read_events(events_path) if e.kind in ("daemon.started", "daemon.stopped")]
    assert [(e.kind, e.fields["pid"]) for e in ends] == [
        ("daemon.started", pids[0]),
        ("daemon.stopped", pids[0]),
        ("daemon.started", pids[1]),
        ("daemon.stopped", pids[1]),
    ]
    assert [e.mono for e in ends] == sorted(e.mono for e in ends)


async def test_the_daemons_helpers_are_killed_with_it(
    fake_daemon: Path, events: EventLog, tmp_path: Path
) -> None:
    helper = tmp_path / "helper"
    config = child_config(fake_daemon, f"helper={helper}", port=free_port())
    async with open_supervisor(config, events) as supervisor:
        await supervisor.start()
        assert pid_alive(read_pid(helper))
        await supervisor.stop()
        await wait_for(lambda: not pid_alive(read_pid(helper)))


async def test_kill_interrupts_a_start_under_way(
    fake_daemon: Path, events: EventLog, events_path: Path, tmp_path: Path
) -> None:
    pidfile = tmp_path / "pid"
    config = child_config(fake_daemon, f"pidfile={pidfile}", "delay=600", port=free_port())
    async with open_supervisor(config, events) as supervisor, trio.open_nursery() as nursery:
        failures: list[DaemonFailed] = []

        async def start() -> None:
            try:
                await supervisor.start()
            except DaemonFailed as e:
                failures.append(e)

        nursery.start_soon(start)
        await wait_for(pidfile.exists)
        await supervisor.kill("fenced")
        assert not pid_alive(read_pid(pidfile))
        await wait_for(lambda: bool(failures))
        assert "start interrupted by kill (fenced)" in str(failures[0])
        assert supervisor.state is DaemonState.STOPPED
    assert kinds(events_path) == ["daemon.started", "daemon.killed", "daemon.stopped"]


async def test_stop_interrupts_a_start_under_way(
    fake_daemon: Path, events: EventLog, events_path: Path, tmp_path: Path
) -> None:
    pidfile = tmp_path / "pid"
    config = child_config(fake_daemon, f"pidfile={pidfile}", "delay=600", port=free_port())
    async with open_supervisor(config, events) as supervisor, trio.open_nursery() as nursery:
        failures: list[DaemonFailed] = []

        async def start() -> None:
            try:
                await supervisor.start()
            except DaemonFailed as e:
                failures.append(e)

        nursery.start_soon(start)
        await wait_for(pidfile.exists)
        await supervisor.stop()
        assert supervisor.status().exit_code == -signal.SIGTERM
        await wait_for(lambda: bool(failures))
        assert "start interrupted by stop()" in str(failures[0])
    assert kinds(events_path) == ["daemon.started", "daemon.stopping", "daemon.stopped"]


async def test_a_cancelled_start_leaves_no_daemon_running(
    fake_daemon: Path, events: EventLog, events_path: Path
) -> None:
    config = child_config(fake_daemon, "delay=600", port=free_port())
    async with open_supervisor(config, events) as supervisor:
        with trio.move_on_after(0.5) as scope:
            await supervisor.start()
        assert scope.cancelled_caught
        status = supervisor.status()
        assert status.pid is not None and not pid_alive(status.pid)
        assert (status.state, status.exit_code) == (DaemonState.STOPPED, -signal.SIGKILL)
    assert kinds(events_path) == ["daemon.started", "daemon.killed", "daemon.stopped"]
    assert the(events_path, "daemon.killed").fields["reason"] == "start was cancelled"


async def test_a_start_cancelled_before_the_spawn_runs_and_records_nothing(
    fake_daemon: Path, events: EventLog, events_path: Path
) -> None:
    async with open_supervisor(child_config(fake_daemon), events) as supervisor:
        with trio.CancelScope() as scope:
            scope.cancel()
            await supervisor.start()
        assert supervisor.state is DaemonState.STOPPED
        assert supervisor.status().pid is None
    assert not events_path.exists()


async def test_leaving_the_supervisor_kills_a_running_daemon(
    fake_daemon: Path, events: EventLog, events_path: Path, tmp_path: Path
) -> None:
    pidfile = tmp_path / "pid"
    config = child_config(fake_daemon, f"pidfile={pidfile}", port=free_port())
    async with open_supervisor(config, events) as supervisor:
        await supervisor.start()
    assert not pid_alive(read_pid(pidfile))
    assert the(events_path, "daemon.stopped").fields["cause"] == "kill"


SUPERVISOR_SCRIPT = """
import sys
from pathlib import Path
import trio
from haproxy_ln.config import DaemonConfig
from haproxy_ln.daemon import open_supervisor
from haproxy_ln.events import EventLog

async def main():
    config = DaemonConfig.model_validate_json(sys.argv[1])
    async with open_supervisor(config, EventLog(Path(sys.argv[2]), "a")) as supervisor:
        await supervisor.start()
        print(supervisor.status().pid, flush=True)
        await trio.sleep_forever()

trio.run(main)
"""


def test_no_daemon_survives_its_supervisor_killed_with_sigkill(
    fake_daemon: Path, events_path: Path, tmp_path: Path
) -> None:
    helper = tmp_path / "helper"
    config = child_config(fake_daemon, f"helper={helper}", port=free_port())
    agent = subprocess.Popen(
        [sys.executable, "-c", SUPERVISOR_SCRIPT, config.model_dump_json(), str(events_path)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert agent.stdout is not None
        daemon_pid = int(agent.stdout.readline())
        helper_pid = read_pid(helper)
        assert pid_alive(daemon_pid) and pid_alive(helper_pid)
    finally:
        agent.kill()
        agent.wait()
    deadline = time.monotonic() + 10
    while (pid_alive(daemon_pid) or pid_alive(helper_pid)) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not pid_alive(daemon_pid)
    assert not pid_alive(helper_pid)
    assert kinds(events_path) == ["daemon.started", "daemon.ready"]  # no stop was recorded


def test_the_launcher_runs_nothing_unless_told_to_go(tmp_path: Path) -> None:
    ran = tmp_path / "ran"
    go_r, go_w = os.pipe()
    status_r, status_w = os.pipe()
    launcher = subprocess.Popen(
        [*PYTHON, "launch", str(go_r), str(status_w), "--", "touch", str(ran)],
        pass_fds=(go_r, status_w),
    )
    os.close(go_r)
    os.close(status_w)
    os.close(go_w)  # the agent died before recording the start
    assert launcher.wait(timeout=10) == EXIT_NOT_STARTED
    os.close(status_r)
    assert not ran.exists()


async def test_a_command_probe_waits_until_the_command_succeeds(
    fake_daemon: Path, events: EventLog, tmp_path: Path
) -> None:
    ready = tmp_path / "ready"
    config = child_config(
        fake_daemon,
        "delay=0.5",
        f"ready={ready}",
        probe="command",
        probe_command=(
            sys.executable,
            "-c",
            f"import os, sys; sys.exit(not os.path.exists({str(ready)!r}))",
        ),
    )
    async with open_supervisor(config, events) as supervisor:
        await supervisor.start()
        assert ready.exists()
        assert "exited with code 0" in supervisor.status().reason


# --- command mode ------------------------------------------------------------------------------


@pytest.fixture
def controller(tmp_path: Path) -> Path:
    path = tmp_path / "controller.py"
    path.write_text(CONTROLLER)
    (tmp_path / "state").mkdir()
    return path


def command_config(
    controller: Path, daemon: Path, *args: str, status: bool = True, **settings: object
) -> tuple[DaemonConfig, int, Path]:
    """Command mode through the controller; returns the config, the port, the pid file."""
    state = controller.parent / "state"
    ctl = (sys.executable, str(controller), str(state))
    port = free_port()
    values = {
        "mode": "command",
        "start": (*ctl, "start", str(daemon), f"port={port}", *args),
        "stop": (*ctl, "stop"),
        "kill": (*ctl, "kill"),
        "status": (*ctl, "status") if status else None,
        "probe": "tcp",
        "probe_address": HostPort("127.0.0.1", port),
        "probe_interval": 0.05,
        **settings,
    }
    return DaemonConfig.model_validate(values), port, state / "pid"


async def test_command_mode_starts_and_stops_through_its_commands(
    controller: Path, fake_daemon: Path, events: EventLog, events_path: Path
) -> None:
    config, port, pidfile = command_config(controller, fake_daemon, "delay=0.3")
    async with open_supervisor(config, events) as supervisor:
        await supervisor.start()
        assert connects(port)
        pid = read_pid(pidfile)
        await supervisor.stop()
        assert not pid_alive(pid)
        assert "status command exited with code 3" in supervisor.status().reason
    assert kinds(events_path) == [
        "daemon.started",
        "daemon.ready",
        "daemon.stopping",
        "daemon.stopped",
    ]
    started = the(events_path, "daemon.started")
    assert started.fields == {"pid": None, "mode": "command"}
    assert the(events_path, "daemon.stopped").fields["cause"] == "stop"


async def test_command_mode_kill_counts_only_once_the_status_command_says_gone(
    controller: Path, fake_daemon: Path, events: EventLog, events_path: Path
) -> None:
    config, _, pidfile = command_config(controller, fake_daemon, "term=ignore")
    async with open_supervisor(config, events) as supervisor:
        await supervisor.start()
        pid = read_pid(pidfile)
        await supervisor.kill("fenced")
        assert not pid_alive(pid)
    assert kinds(events_path)[2:] == ["daemon.killed", "daemon.stopped"]
    stopped = the(events_path, "daemon.stopped")
    assert stopped.fields["cause"] == "kill"
    assert "status command exited with code 3" in str(stopped.fields["detail"])


async def test_command_mode_stop_escalates_to_the_kill_command(
    controller: Path, fake_daemon: Path, events: EventLog, events_path: Path
) -> None:
    config, _, pidfile = command_config(controller, fake_daemon, "term=ignore", stop_timeout=0.5)
    async with open_supervisor(config, events) as supervisor:
        await supervisor.start()
        await supervisor.stop()  # the stop command waits forever for a daemon ignoring SIGTERM
        assert not pid_alive(read_pid(pidfile))
    assert kinds(events_path)[2:] == ["daemon.stopping", "daemon.killed", "daemon.stopped"]


async def test_command_mode_a_failed_start_command_is_followed_by_the_kill_command(
    controller: Path, fake_daemon: Path, events: EventLog, events_path: Path
) -> None:
    config, _, _ = command_config(controller, fake_daemon)
    (controller.parent / "state" / "fail-start").touch()
    async with open_supervisor(config, events) as supervisor:
        with pytest.raises(DaemonFailed, match=r"start command failed: python.* code 1"):
            await supervisor.start()
        assert supervisor.state is DaemonState.FAILED
    assert kinds(events_path) == [
        "daemon.started",
        "daemon.start_failed",
        "daemon.killed",
        "daemon.stopped",
    ]


async def test_command_mode_notices_a_death_through_the_status_command(
    controller: Path, fake_daemon: Path, events: EventLog, events_path: Path
) -> None:
    config, _, _ = command_config(controller, fake_daemon, "exit=3", "exit_after=0.3")
    async with open_supervisor(config, events) as supervisor:
        await supervisor.start()
        with trio.fail_after(5):
            status = await supervisor.wait_until(DaemonState.FAILED)
        assert "status command exited with code 3 on its own" in status.reason
    assert the(events_path, "daemon.stopped").fields["cause"] == "exited"


async def test_mode_none_runs_nothing_and_records_nothing(
    events: EventLog, events_path: Path
) -> None:
    async with open_supervisor(DaemonConfig(), events) as supervisor:
        await supervisor.start()
        assert supervisor.state is DaemonState.READY
        await supervisor.stop()
        assert supervisor.status().state is DaemonState.STOPPED
    assert not events_path.exists()


# --- systemd notify ----------------------------------------------------------------------------


def notify_socket(address: str) -> socket.socket:
    """A datagram socket standing in for systemd's, bound at `address` ("\\0..." abstract)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(5)
    return sock


def test_notifications_reach_a_socket_at_a_path(tmp_path: Path) -> None:
    path = str(tmp_path / "notify")
    with notify_socket(path) as systemd:
        notifier = SystemdNotifier.from_env({"NOTIFY_SOCKET": path})
        assert notifier.enabled
        assert notifier.ready("active, epoch 7")
        assert notifier.status("standby\nin sync")
        assert notifier.watchdog()
        assert notifier.stopping()
        received = [systemd.recv(4096) for _ in range(4)]
        notifier.close()
    assert received == [
        b"READY=1\nSTATUS=active, epoch 7",
        b"STATUS=standby in sync",
        b"WATCHDOG=1",
        b"STOPPING=1",
    ]


def test_notifications_reach_an_abstract_socket() -> None:
    name = f"haproxy-ln-test-{os.getpid()}-{time.monotonic_ns()}"
    with notify_socket("\0" + name) as systemd:
        notifier = SystemdNotifier.from_env({"NOTIFY_SOCKET": "@" + name})
        assert notifier.ready()
        assert systemd.recv(4096) == b"READY=1"
        notifier.close()


def test_without_notify_socket_notifying_does_nothing(tmp_path: Path) -> None:
    notifier = SystemdNotifier.from_env({})
    assert not notifier.enabled
    assert not notifier.ready()
    unheard = SystemdNotifier.from_env({"NOTIFY_SOCKET": str(tmp_path / "nobody")})
    assert not unheard.watchdog()  # logged, never raised


@pytest.mark.parametrize(
    ("env", "period"),
    [
        ({}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "bogus"}, None),
        ({"WATCHDOG_USEC": "3000000"}, 0.5),  # capped by max_period
        ({"WATCHDOG_USEC": "600000"}, 0.3),  # half of the watchdog time
        ({"WATCHDOG_USEC": "600000", "WATCHDOG_PID": str(os.getpid())}, 0.3),
        ({"WATCHDOG_USEC": "600000", "WATCHDOG_PID": "1"}, None),  # meant for another process
    ],
)
def test_watchdog_period_is_half_the_watchdog_time_at_most_max_period(
    env: dict[str, str], period: float | None
) -> None:
    assert watchdog_period(0.5, env) == period


async def test_watchdog_pings_only_while_healthy(tmp_path: Path) -> None:
    path = str(tmp_path / "notify")
    healthy = False
    with notify_socket(path) as sync_systemd:
        systemd = trio.socket.from_stdlib_socket(sync_systemd)
        env = {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "40000"}
        notifier = SystemdNotifier.from_env(env)
        async with trio.open_nursery() as nursery:
            period = await nursery.start(
                functools.partial(
                    run_watchdog, notifier, 10.0, healthy=lambda: healthy, environ=env
                )
            )
            assert period == 0.02
            with trio.move_on_after(0.2):
                assert await systemd.recv(4096) == b"", "pinged while unhealthy"
            healthy = True
            with trio.fail_after(5):
                pings = [await systemd.recv(4096) for _ in range(3)]
            nursery.cancel_scope.cancel()
        notifier.close()
    assert pings == [b"WATCHDOG=1"] * 3


# --- lnd readiness -----------------------------------------------------------------------------


async def test_an_lnd_probe_is_ready_only_once_lnd_is_unlocked(
    fake_daemon: Path, events: EventLog, tmp_path: Path
) -> None:
    from test_keys_lnd import FakeLnd, make_tls_identity  # lnd's unlocker, served by grpc

    identity = make_tls_identity()
    cert = tmp_path / "tls.cert"
    cert.write_bytes(identity.cert_pem)
    lnd = FakeLnd(identity).start()
    try:
        config = child_config(
            fake_daemon, probe="lnd", probe_address=lnd.rpc, probe_tls_cert=str(cert)
        )
        probe = probe_for(config)
        assert await probe.check() == ProbeResult(False, f"lnd at {lnd.rpc} is LOCKED")
        async with open_supervisor(config, events) as supervisor, trio.open_nursery() as nursery:
            nursery.start_soon(supervisor.start)
            await trio.sleep(0.3)
            assert supervisor.state is DaemonState.STARTING  # locked lnd is not ready
            lnd.state = WalletState.RPC_ACTIVE  # as if the keys adapter had unlocked it
            with trio.fail_after(5):
                status = await supervisor.wait_until(DaemonState.READY)
            assert status.reason.endswith(f"lnd at {lnd.rpc} is RPC_ACTIVE")
    finally:
        lnd.stop()
    result = await probe.check()
    assert not result.ready
    assert "unreachable" in result.detail

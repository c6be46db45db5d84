"""The systemd units in systemd/: systemd's own verifier, hardening, and what they promise.

How the units are verified here: `systemd-analyze verify` loads each unit
offline (no systemd needs to run as PID 1) and reports unknown directives,
bad values, dependencies on units it cannot find, and commands that do not
exist or are not executable. The last check would fail on any machine that
is not a deployed node: /usr/local/bin/lightningd, lnd, eclair-node.sh and
haproxy-ln itself are not installed at those paths here. So the units are
copied to a temporary directory in which only the program path of each
Exec*= line is replaced by an executable stub of the same name; every other
byte of every unit is unchanged (the copy is compared line by line), and the
copy's directory, drop-ins included, is what systemd loads. Any output of the
verifier, warning or error, fails the test.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from haproxy_ln.config import Config, KeysConfig, NodeConfig, load

ROOT = Path(__file__).resolve().parent.parent
SYSTEMD = ROOT / "systemd"
AGENT = "haproxy-ln.service"
DAEMON_UNITS = {"cln": "lightningd.service", "lnd": "lnd.service", "eclair": "eclair.service"}
EXAMPLES = sorted((ROOT / "config").glob("*/*.toml"))
POLKIT_RULE = SYSTEMD / "50-haproxy-ln.rules"
# systemd arms the watchdog timer with its default accuracy, so it may fire this late.
SYSTEMD_TIMER_SLACK = 0.25
_EXEC = re.compile(r"^(Exec\w*=[-@:+!]*)(/\S+)(.*)$")


def systemd_analyze() -> str:
    found = shutil.which("systemd-analyze")
    if found is None:
        pytest.skip("systemd-analyze is not installed (tools/setup.sh installs systemd)")
    return found


# --- reading units ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Unit:
    """A unit file as systemd reads it: sections of directives, a directive may repeat."""

    sections: dict[str, dict[str, list[str]]]

    @classmethod
    def read(cls, path: Path) -> Unit:
        sections: dict[str, dict[str, list[str]]] = {}
        current: dict[str, list[str]] | None = None
        for raw in path.read_text().splitlines():
            line = raw.strip()
            if not line or line.startswith(("#", ";")):
                continue
            if line.startswith("[") and line.endswith("]"):
                current = sections.setdefault(line[1:-1], {})
                continue
            assert current is not None, f"{path.name}: directive outside a section: {line}"
            key, _, value = line.partition("=")
            current.setdefault(key.strip(), []).append(value.strip())
        return cls(sections)

    def values(self, section: str, key: str) -> list[str]:
        """Every value of `key` in `section`; an empty assignment resets the list, as in
        systemd."""
        result: list[str] = []
        for value in self.sections.get(section, {}).get(key, []):
            result = [] if value == "" else [*result, *value.split()]
        return result

    def one(self, section: str, key: str) -> str:
        values = self.sections.get(section, {}).get(key, [])
        assert len(values) == 1, f"[{section}] {key}: expected one value, found {values}"
        return values[0]


def unit(name: str) -> Unit:
    return Unit.read(SYSTEMD / name)


def seconds(timespan: str) -> float:
    """A systemd time span such as "1s", "1500ms", "1min 30s" or "2" (seconds)."""
    units = {"ms": 0.001, "s": 1.0, "sec": 1.0, "min": 60.0, "m": 60.0, "h": 3600.0}
    total = 0.0
    for number, suffix in re.findall(r"([0-9.]+)\s*([a-z]*)", timespan):
        total += float(number) * units[suffix or "s"]
    return total


def examples() -> list[Config]:
    return [load(path) for path in EXAMPLES]


def example_id(path: Path | None) -> str:
    return "defaults" if path is None else f"{path.parent.name}/{path.name}"


# --- systemd-analyze -------------------------------------------------------------------------


@pytest.fixture
def unit_copy(tmp_path: Path) -> Iterator[Path]:
    """systemd/ copied to tmp_path/units, each Exec*= program replaced by a stub."""
    stubs = tmp_path / "bin"
    stubs.mkdir()
    units = tmp_path / "units"
    shutil.copytree(SYSTEMD, units)
    for path in sorted(units.glob("*.service")):
        original = path.read_text().splitlines()
        rewritten = []
        for line in original:
            match = _EXEC.match(line)
            if match:
                stub = stubs / Path(match[2]).name
                stub.write_text("#!/bin/sh\nexit 0\n")
                stub.chmod(0o755)
                line = f"{match[1]}{stub}{match[3]}"
            rewritten.append(line)
        changed = [(a, b) for a, b in zip(original, rewritten, strict=True) if a != b]
        assert changed, f"{path.name} has no Exec line"
        for before, after in changed:  # only the program's directory differs
            assert _EXEC.sub(r"\1\3", before) == _EXEC.sub(r"\1\3", after)
            assert Path(_EXEC.sub(r"\2", before)).name == Path(_EXEC.sub(r"\2", after)).name
        path.write_text("\n".join(rewritten) + "\n")
    yield units


def verify(units: Path) -> str:
    """Everything `systemd-analyze verify` says about all units in `units`, loaded together
    (so that BindsTo= and Conflicts= find each other); "" when it has nothing to say."""
    paths = sorted(str(p) for p in units.glob("*.service"))
    result = subprocess.run(
        [systemd_analyze(), "verify", *paths],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=units,
    )
    output = (result.stdout + result.stderr).strip()
    if result.returncode != 0 and not output:
        output = f"exit code {result.returncode}"
    return output


def test_every_unit_passes_systemd_analyze_verify_without_a_warning(unit_copy: Path) -> None:
    names = sorted(p.name for p in unit_copy.glob("*.service"))
    assert names == [
        "eclair.service",
        "haproxy-ln-proxy.service",
        "haproxy-ln.service",
        "lightningd.service",
        "lnd.service",
    ]
    assert verify(unit_copy) == ""


def test_verify_reports_a_misspelt_directive(unit_copy: Path) -> None:
    agent = unit_copy / AGENT
    agent.write_text(agent.read_text().replace("WatchdogSec=", "WatchdogSecs="))
    assert "Unknown key 'WatchdogSecs' in section [Service]" in verify(unit_copy)


def test_verify_reads_the_drop_in_too(unit_copy: Path) -> None:
    drop_in = unit_copy / f"{AGENT}.d" / "keys-owner.conf"
    drop_in.write_text(drop_in.read_text().replace("@chown", "@no-such-group"))
    assert "@no-such-group" in verify(unit_copy)


def test_verify_reports_a_missing_program(unit_copy: Path) -> None:
    daemon = unit_copy / "lnd.service"
    daemon.write_text(re.sub(r"ExecStart=\S+", "ExecStart=/nonexistent/lnd", daemon.read_text()))
    assert "/nonexistent/lnd" in verify(unit_copy)


@pytest.mark.parametrize(
    ("name", "most"),
    [(AGENT, 2.5), ("haproxy-ln-proxy.service", 4.0)]
    + [(name, 4.0) for name in sorted(DAEMON_UNITS.values())],
)
def test_hardening_keeps_the_exposure_low(unit_copy: Path, name: str, most: float) -> None:
    # systemd's own score (0 = locked down, 10 = fully exposed); the agent's counts its
    # keys-owner drop-in, which adds the three capabilities file adapters need.
    result = subprocess.run(
        [
            systemd_analyze(),
            "security",
            "--offline=true",
            f"--threshold={int(most * 10)}",
            "--no-pager",
            str(unit_copy / name),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    score = re.search(r"Overall exposure level for \S+: ([0-9.]+)", result.stdout)
    assert score is not None, result.stdout + result.stderr
    assert float(score[1]) <= most
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr


# --- the agent's unit ------------------------------------------------------------------------


def test_agent_unit_is_a_notify_service_restarted_on_failure() -> None:
    agent = unit(AGENT)
    assert agent.one("Service", "Type") == "notify"
    assert agent.one("Service", "NotifyAccess") == "main"
    assert agent.one("Service", "Restart") == "on-failure"
    assert agent.one("Service", "ExecStart").endswith(
        " run --config /etc/haproxy-ln/haproxy-ln.toml"
    )
    assert agent.values("Install", "WantedBy") == ["multi-user.target"]


def test_agent_unit_keys_directory_is_the_default_runtime_dir_on_tmpfs() -> None:
    agent = unit(AGENT)
    assert "/run/" + agent.one("Service", "RuntimeDirectory") == KeysConfig().runtime_dir
    assert agent.one("Service", "RuntimeDirectoryMode") == "0700"
    # removed with the secrets in it whenever the agent stops, also between restarts
    assert agent.values("Service", "RuntimeDirectoryPreserve") in ([], ["no"])


def test_agent_unit_loads_the_credential_the_examples_name() -> None:
    name, _, source = unit(AGENT).one("Service", "LoadCredential").partition(":")
    assert source.startswith("/etc/haproxy-ln/")
    assert {config.keys.kek_credential for config in examples()} == {name}


def test_agent_unit_writes_only_the_event_log_directory() -> None:
    agent = unit(AGENT)
    event_log_dir = str(Path(NodeConfig(name="a").event_log).parent)
    assert agent.values("Service", "ReadWritePaths") == [event_log_dir]
    assert agent.values("Service", "StateDirectory") == [Path(event_log_dir).name]
    assert {str(Path(config.node.event_log).parent) for config in examples()} == {event_log_dir}
    assert agent.one("Service", "ProtectSystem") == "strict"
    for key in ("NoNewPrivileges", "ProtectHome", "PrivateTmp"):
        assert agent.one("Service", key) == "yes"


def test_agent_unit_has_no_capabilities_unless_the_drop_in_adds_them() -> None:
    agent = unit(AGENT)
    assert agent.values("Service", "CapabilityBoundingSet") == []
    assert agent.values("Service", "AmbientCapabilities") == []
    drop_in = Unit.read(SYSTEMD / f"{AGENT}.d" / "keys-owner.conf")
    wanted = ["CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FOWNER"]
    assert drop_in.values("Service", "CapabilityBoundingSet") == wanted
    assert drop_in.values("Service", "AmbientCapabilities") == wanted
    assert drop_in.values("Service", "SystemCallFilter") == ["@chown"]
    # exactly the examples whose files go to the daemon's user need it
    owners = {config.keys.adapter: config.keys.owner for config in examples()}
    assert owners == {"cln": "lightning", "eclair": "eclair", "lnd": None}


@pytest.mark.parametrize("path", [*EXAMPLES, None], ids=example_id)
def test_watchdog_kills_a_paused_agent_before_its_lease_can_expire(path: Path | None) -> None:
    # Paused just after a keepalive sent at t, the agent's lease may expire in etcd from
    # t + lease_ttl - keepalive_interval on; its last watchdog ping was at most at t,
    # and systemd kills it by WatchdogSec (+ its timer's slack) after that ping.
    config = Config(node=NodeConfig(name="a")) if path is None else load(path)
    timing = config.ha.timing()
    watchdog = seconds(unit(AGENT).one("Service", "WatchdogSec"))
    assert watchdog + SYSTEMD_TIMER_SLACK <= timing.lease_ttl - timing.keepalive_interval
    # the agent pings every min(WatchdogSec / 2, keepalive_interval): one lost ping is fine
    assert min(watchdog / 2, timing.keepalive_interval) < watchdog
    assert unit(AGENT).one("Service", "WatchdogSignal") == "SIGKILL"


def test_watchdog_rule_fails_for_a_longer_watchdog() -> None:
    timing = Config(node=NodeConfig(name="a")).ha.timing()
    assert (
        not seconds("1500ms") + SYSTEMD_TIMER_SLACK <= timing.lease_ttl - timing.keepalive_interval
    )


def test_seconds_reads_systemd_time_spans() -> None:
    assert [seconds(s) for s in ("1s", "1500ms", "1min 30s", "2", "0.5s")] == [
        1.0,
        1.5,
        90.0,
        2.0,
        0.5,
    ]


# --- the daemons' units ----------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(DAEMON_UNITS.values()))
def test_daemon_unit_is_bound_to_the_agent_and_never_enabled(name: str) -> None:
    daemon = unit(name)
    assert AGENT in daemon.values("Unit", "BindsTo")
    assert AGENT in daemon.values("Unit", "After")
    assert "Install" not in daemon.sections  # `systemctl enable` refuses such a unit
    assert daemon.one("Service", "Restart") == "no"  # only the agent restarts it
    assert daemon.one("Service", "Type") == "exec"
    assert daemon.values("Service", "KillMode") in ([], ["control-group"])


@pytest.mark.parametrize("path", EXAMPLES, ids=example_id)
def test_example_drives_its_daemon_unit(path: Path) -> None:
    config = load(path)
    name = DAEMON_UNITS[config.keys.adapter]
    daemon = unit(name)
    assert config.daemon.mode == "command"
    assert config.daemon.start == ("systemctl", "start", "--job-mode=fail", name)
    assert config.daemon.stop == ("systemctl", "stop", name)
    assert config.daemon.kill == ("systemctl", "kill", "--signal=SIGKILL", name)
    assert config.daemon.status is not None and name in config.daemon.status[-1]
    # systemd escalates to SIGKILL before the agent gives up on the stop command
    assert seconds(daemon.one("Service", "TimeoutStopSec")) < config.daemon.stop_timeout


@pytest.mark.parametrize("path", EXAMPLES, ids=example_id)
def test_daemon_unit_refuses_to_start_without_the_materialized_keys(path: Path) -> None:
    config = load(path)
    asserted = unit(DAEMON_UNITS[config.keys.adapter]).values("Unit", "AssertPathExists")
    if config.keys.adapter == "cln":
        assert [Path(p).name for p in asserted] == ["hsm_secret"]
    elif config.keys.adapter == "eclair":
        seeds = config.keys.eclair_seeds or ()
        names = [Path(s).name.removesuffix(".sealed") for s in seeds]
        assert sorted(Path(p).name for p in asserted) == sorted(names)
    else:  # lnd keeps nothing on disk and starts locked
        assert asserted == []


def test_proxy_alone_excludes_the_agent() -> None:
    assert AGENT in unit("haproxy-ln-proxy.service").values("Unit", "Conflicts")


# --- the polkit rule -------------------------------------------------------------------------

POLKIT_HARNESS = """
const fs = require("fs");
const rules = [];
const polkit = {
  Result: {YES: "yes", NO: "no", NOT_HANDLED: null},
  addRule: (rule) => rules.push(rule),
};
new Function("polkit", fs.readFileSync(process.argv[1], "utf8"))(polkit);
const cases = JSON.parse(process.argv[2]);
const answers = cases.map(([id, user, unit, verb]) => {
  const action = {id: id, lookup: (key) => ({unit: unit, verb: verb})[key]};
  for (const rule of rules) {
    const result = rule(action, {user: user});
    if (result !== null && result !== undefined) return result;
  }
  return "not handled";
});
console.log(JSON.stringify(answers));
"""
MANAGE = "org.freedesktop.systemd1.manage-units"


def polkit_answers(cases: list[tuple[str, str, str, str]]) -> list[str]:
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed: the polkit rule's JavaScript is not run")
    result = subprocess.run(
        [node, "-e", POLKIT_HARNESS, str(POLKIT_RULE), json.dumps(cases)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    answers: list[str] = json.loads(result.stdout)
    return answers


def test_polkit_rule_lets_the_agent_drive_exactly_its_daemon_units() -> None:
    allowed = [
        (MANAGE, "haproxy-ln", unit_name, verb)
        for unit_name in sorted(DAEMON_UNITS.values())
        for verb in ("start", "stop", "kill")
    ]
    refused = [
        (MANAGE, "haproxy-ln", "lightningd.service", "restart"),
        (MANAGE, "haproxy-ln", "haproxy-ln.service", "stop"),
        (MANAGE, "haproxy-ln", "ssh.service", "start"),
        (MANAGE, "lightning", "lightningd.service", "start"),
        ("org.freedesktop.systemd1.manage-unit-files", "haproxy-ln", "lnd.service", "start"),
    ]
    assert polkit_answers(allowed) == ["yes"] * len(allowed)
    assert polkit_answers(refused) == ["not handled"] * len(refused)


@pytest.mark.parametrize("path", EXAMPLES, ids=example_id)
def test_polkit_rule_allows_what_the_example_runs(path: Path) -> None:
    config = load(path)
    verbs = [config.daemon.start, config.daemon.stop, config.daemon.kill]
    cases = [(MANAGE, "haproxy-ln", argv[-1], argv[1]) for argv in verbs if argv is not None]
    assert polkit_answers(cases) == ["yes"] * 3


def test_examples_exist_for_each_daemon_and_node() -> None:
    assert [f"{p.parent.name}/{p.name}" for p in EXAMPLES] == [
        "cln/a.toml",
        "cln/b.toml",
        "eclair/a.toml",
        "eclair/b.toml",
        "lnd/a.toml",
        "lnd/b.toml",
    ]
    for path in EXAMPLES:
        tomllib.loads(path.read_text())

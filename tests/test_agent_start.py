"""`haproxy-ln run` that cannot start says why in one line, without a traceback."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

from haproxy_ln.local.ports import LOOPBACK, free_port

HAPROXY_LN = str(Path(sys.executable).with_name("haproxy-ln"))


def write_config(path: Path, *, event_log: Path, proxy_port: int) -> Path:
    # Nothing listens on the PostgreSQL and etcd ports: the agent must fail before it
    # needs them.
    path.write_text(
        f'[node]\nname = "a"\nevent_log = "{event_log}"\n'
        f'[proxy]\nlisten = "{LOOPBACK}:{proxy_port}"\nupstream = "{LOOPBACK}:{free_port()}"\n'
        f'[replication]\nsource = "postgresql://postgres@{LOOPBACK}:{free_port()}/x"\n'
        f'replica = "postgresql://postgres@{LOOPBACK}:{free_port()}/x"\n'
        f'[etcd]\nendpoints = ["{LOOPBACK}:{free_port()}"]\n'
        '[keys]\nadapter = "none"\n[daemon]\nmode = "none"\n'
        f'[health]\nlisten = "{LOOPBACK}:{free_port()}"\n'
    )
    return path


def run_agent(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [HAPROXY_LN, "run", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_a_proxy_port_in_use_is_a_clear_error(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind((LOOPBACK, 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = write_config(tmp_path / "a.toml", event_log=tmp_path / "ev", proxy_port=port)
        result = run_agent(config)
    assert result.returncode == 1
    assert f"error: [proxy] listen {LOOPBACK}:{port}: " in result.stderr
    assert "Address already in use" in result.stderr
    assert "Traceback" not in result.stderr


def test_an_event_log_in_a_missing_directory_is_a_clear_error(tmp_path: Path) -> None:
    missing = tmp_path / "missing" / "events.jsonl"
    config = write_config(tmp_path / "a.toml", event_log=missing, proxy_port=free_port())
    result = run_agent(config)
    assert result.returncode == 1
    assert f"error: [node] event_log: cannot write {missing}: No such file" in result.stderr
    assert "Traceback" not in result.stderr

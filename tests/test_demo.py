"""The README's main job: `haproxy-ln demo` runs pgbench through the proxy."""

import re
import subprocess
import sys
from pathlib import Path


def test_demo_runs_pgbench_through_the_proxy_without_failures() -> None:
    exe = Path(sys.executable).with_name("haproxy-ln")
    result = subprocess.run(
        [str(exe), "demo", "--seconds", "2", "--clients", "2"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "number of failed transactions: 0 (0.000%)" in result.stdout
    processed = re.search(r"actually processed: (\d+)", result.stdout)
    assert processed and int(processed.group(1)) > 0
    assert "proxy: 3 client connections, 0 protocol errors" in result.stdout
    assert "haproxy-ln proxy listens on 127.0.0.1:" in result.stderr

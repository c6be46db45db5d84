"""The README's main job: `haproxy-ln demo` fails over, rejoins, switches back, checks itself."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def test_demo_short_mode_passes_its_own_checks(tmp_path: Path) -> None:
    exe = Path(sys.executable).with_name("haproxy-ln")
    chart = tmp_path / "timeline.svg"
    result = subprocess.run(
        [str(exe), "demo", "--seconds", "2", "--json", "--chart", str(chart)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-5000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["ok"] is True
    assert summary["lost_writes"] == 0 and summary["split_brain"] == 0
    assert summary["acked_writes"] > 0
    assert 0 < summary["failover_s"] < 30 and 0 < summary["switchover_s"] < 30
    assert "b: takeover.timeline" in result.stdout
    assert chart.read_text().startswith("<svg")

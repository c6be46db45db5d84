"""Deployment files: systemd units verify without a warning; the Dockerfile lints clean."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNITS = sorted((Path(__file__).parent.parent / "systemd").glob("*.service"))
INSTALLED = "/usr/local/bin/haproxy-ln"


@pytest.mark.parametrize("unit", UNITS, ids=[u.name for u in UNITS])
def test_unit_verifies_without_warnings(unit: Path, tmp_path: Path) -> None:
    assert shutil.which("systemd-analyze"), "systemd-analyze is missing (apt-get install systemd)"
    text = unit.read_text()
    assert INSTALLED in text
    # Point ExecStart at this checkout's command, which exists here.
    copy = tmp_path / unit.name
    copy.write_text(text.replace(INSTALLED, str(Path(sys.executable).with_name("haproxy-ln"))))
    result = subprocess.run(
        ["systemd-analyze", "verify", str(copy)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr


def test_there_are_units_to_verify() -> None:
    assert UNITS


def test_dockerfile_passes_hadolint() -> None:
    hadolint = Path(sys.executable).with_name("hadolint")
    dockerfile = Path(__file__).parent.parent / "Dockerfile"
    result = subprocess.run(
        [str(hadolint), "--no-color", str(dockerfile)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr

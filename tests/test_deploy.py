"""deploy/dispatcher.service: systemd accepts it and rates its hardening OK or better.

Checked with the real `systemd-analyze` (.ci/run installs it), on a copy of the unit whose
ExecStart points at this checkout's `dispatcher` script, since verify insists it exists.
"""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.daemon import ROOT

UNIT = ROOT / "deploy" / "dispatcher.service"
INSTALLED = "/opt/dispatcher/venv/bin/dispatcher"
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")

pytestmark = pytest.mark.skipif(
    SYSTEMD_ANALYZE is None,
    reason="systemd-analyze is not installed (.ci/run installs the Debian package systemd)",
)


@pytest.fixture
def unit(tmp_path: Path) -> Path:
    """The shipped unit, named as installed, running this checkout's console script."""
    script = Path(sys.executable).parent / "dispatcher"
    assert script.is_file(), "pip install -e . creates the console script next to python"
    text = UNIT.read_text()
    assert f"ExecStart={INSTALLED} " in text
    copy = tmp_path / "dispatcher.service"
    copy.write_text(text.replace(INSTALLED, str(script)))
    return copy


def analyze(*args: str) -> subprocess.CompletedProcess[str]:
    assert SYSTEMD_ANALYZE is not None
    return subprocess.run(
        [SYSTEMD_ANALYZE, *args], capture_output=True, text=True, timeout=120, check=False
    )


def test_the_unit_verifies_cleanly(unit: Path) -> None:
    result = analyze("verify", str(unit))
    assert result.returncode == 0, result.stderr
    complaints = [line for line in result.stderr.splitlines() if unit.name in line]
    assert complaints == []


def test_the_unit_is_rated_ok_or_better(unit: Path) -> None:
    result = analyze("security", "--offline=yes", str(unit))
    assert result.returncode == 0, result.stderr
    found = re.search(r"Overall exposure level for \S+: ([\d.]+) (\w+)", result.stdout)
    assert found, result.stdout
    score, rating = float(found[1]), found[2]
    # systemd's scale: PERFECT 0, SAFE < 1, OK < 5, MEDIUM, EXPOSED, UNSAFE, DANGEROUS.
    assert rating in ("PERFECT", "SAFE", "OK") and score < 5.0, result.stdout


def test_the_stop_timeout_covers_the_graceful_shutdown() -> None:
    from dispatcher.service import SHUTDOWN_GRACE

    settings = dict(
        line.split("=", 1) for line in UNIT.read_text().splitlines() if re.match(r"^\w+=", line)
    )
    assert settings["Type"] == "notify" and settings["KillSignal"] == "SIGTERM"
    # In-flight sends get SHUTDOWN_GRACE, then each connection up to 5 s to say QUIT.
    assert int(settings["TimeoutStopSec"]) > SHUTDOWN_GRACE + 5

"""
trial does not report a green run of this pytest suite: it finds only the
Twisted mixin TestCases, so the suite refuses it with a message.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_trialIsRefused(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "twisted.trial",
            f"--temp-directory={tmp_path / '_trial_temp'}",
            "tests",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "PASSED" not in output
    assert "udpdst's tests are a pytest suite" in output
    assert "python -m pytest tests" in output

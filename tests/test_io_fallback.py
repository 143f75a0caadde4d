"""
A port that starts on the pure-Python I/O path because the C extension is
missing says so once, naming the fix; not when C{UDPDST_IO=python} asked for
that path, and not where the extension runs.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

#: Two ports started and stopped, then a third: the warning, if any, comes
#: once.  The extension is hidden when asked, as if it had not been built.
SCRIPT = """
import sys
if sys.argv[1] == "hide":
    sys.modules["udpdst._mmsg"] = None
from twisted.internet import reactor
from twisted.internet.protocol import DatagramProtocol
import udpdst
for _ in range(3):
    port = udpdst.listenUDP(0, DatagramProtocol(), interface="127.0.0.1", reactor=reactor)
    port.stopListening()
print(udpdst.port.IO_PATH)
"""


def run(extension: str, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if k != "UDPDST_IO"}
    return subprocess.run(
        [sys.executable, "-c", SCRIPT, extension],
        env=dict(environ, **env),
        capture_output=True,
        text=True,
        timeout=60,
        cwd="/",
    )


def test_missingExtensionWarnsOnce() -> None:
    result = run("hide")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "recvmsg\n"
    (line,) = [line for line in result.stderr.splitlines() if "udpdst" in line]
    assert "RuntimeWarning: udpdst: the C extension udpdst._mmsg is not built" in line
    assert "install a C compiler and the Python headers" in line
    assert "UDPDST_IO=python" in line
    assert result.stderr.count("Warning") == 1, result.stderr


def test_askedForPythonPath() -> None:
    result = run("hide", UDPDST_IO="python")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "recvmsg\n"
    assert result.stderr == ""


def test_extensionRuns() -> None:
    from udpdst import io

    if io.BATCHED is None:
        pytest.skip("the C extension is not built in this install")
    result = run("keep")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "recvmmsg\n"
    assert result.stderr == ""

"""
The echo service under faults a careful operator worries about, for real:
C{twistd udpdst} in a server namespace, load from a client namespace (see
L{tests.netns.Pair} and L{tests._netns_load}).

- Address churn under load: addresses added, removed and re-added, the link
  set down and up, while a client keeps asking; afterwards every current
  address answers from itself.
- A flood of spoofed sources (raw sockets): the service's peak memory stays
  under the README's bound and a legitimate client keeps being answered.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests._service_helpers import TWISTD, Twistd
from tests.netns import REPO, Pair, unavailableReason

pytestmark = pytest.mark.netns

LOAD_SCRIPT = Path(__file__).resolve().parent / "_netns_load.py"
PORT = 12345

#: The README's bound on what a flood of spoofed sources adds to the
#: service's peak memory (rate limiter at max_sources, loop guard, caches).
FLOOD_MEMORY_BOUND = 15 * 2**20


@pytest.fixture
def pair() -> Iterator[Pair]:
    reason = unavailableReason()
    if reason is not None:
        pytest.skip(reason)
    built = Pair.create()
    try:
        yield built
    finally:
        built.delete()


@pytest.fixture
def service(pair: Pair) -> Iterator[Twistd]:
    """
    C{twistd udpdst} with its defaults, on C{[::]:12345} in the server
    namespace.
    """
    assert pair.server is not None
    process = Twistd(
        [],
        REPO,
        command=pair.server.argv(
            TWISTD,
            "-n",
            "--pidfile=",
            "udpdst",
            "--listen",
            f"[::]:{PORT}",
            "--stats-interval",
            "0",
        ),
    )
    try:
        process.listening()
        yield process
    finally:
        process.kill()


def load(pair: Pair, mode: str, spec: dict[str, Any], timeout: float) -> Any:
    assert pair.client is not None
    proc = subprocess.run(
        pair.client.argv(sys.executable, str(LOAD_SCRIPT), mode, json.dumps(spec)),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def startLoad(pair: Pair, mode: str, spec: dict[str, Any]) -> subprocess.Popen[str]:
    assert pair.client is not None
    return subprocess.Popen(
        pair.client.argv(sys.executable, str(LOAD_SCRIPT), mode, json.dumps(spec)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def memory(pid: int) -> dict[str, int]:
    """
    The process's resident and peak resident memory, in bytes.
    """
    found = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            found[key] = int(value.split()[0]) * 1024
    return found


def assertCleanLog(process: Twistd) -> None:
    output = process.output()
    assert "Traceback" not in output, output
    assert "Unhandled" not in output, output


def test_spoofedSourceFlood(pair: Pair, service: Twistd) -> None:
    """
    100,000 datagrams from distinct spoofed sources (more than max_sources,
    so the rate limiter evicts) raise the service's peak memory by less than
    the README says, and a legitimate client asking between every 100 of
    them gets every answer.
    """
    assert pair.server is not None
    # Replies to the spoofed sources go back over the link (and are
    # dropped there), not into send errors.
    pair.server.ip("route", "add", "10.200.0.0/14", "via", Pair.CLIENT_V4)
    warm = load(
        pair,
        "ask",
        {"targets": [[Pair.SERVER_V4, PORT]], "duration": 0.5, "wait": 2.0},
        timeout=30,
    )
    assert warm[Pair.SERVER_V4]["answered"] > 0
    before = memory(service.proc.pid)
    result = load(
        pair,
        "flood",
        {
            "target": [Pair.SERVER_V4, PORT],
            "base": "10.200.0.0",
            "sources": 100_000,
            "batch": 100,
            "wait": 2.0,
        },
        timeout=600,
    )
    after = memory(service.proc.pid)
    assert result["spoofed"] == 100_000
    assert result["answered"] == result["asked"] == 1000
    grown = after["VmHWM"] - before["VmHWM"]
    print(f"flood: peak memory {before['VmHWM']} -> {after['VmHWM']} (+{grown})")
    assert grown < FLOOD_MEMORY_BOUND
    assert service.stop() == -signal.SIGTERM
    assertCleanLog(service)

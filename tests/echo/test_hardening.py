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
import random
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests._service_helpers import TWISTD, Twistd
from tests.netns import HERE, REPO, Pair, builtPair
from udpdst.echo.protocol import REFUSAL_REASONS
from udpdst.port import PortCounters

pytestmark = pytest.mark.netns

LOAD_SCRIPT = HERE / "_netns_load.py"
PORT = 12345

#: The README's bound on what a flood of spoofed sources adds to the
#: service's peak memory (rate limiter at max_sources, loop guard, caches).
FLOOD_MEMORY_BOUND = 20 * 2**20


@pytest.fixture
def pair() -> Iterator[Pair]:
    yield from builtPair()


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


def currentAddresses(pair: Pair) -> list[str]:
    """
    The server's unicast addresses on its veth, as the kernel has them now.
    """
    assert pair.server is not None
    shown = json.loads(
        pair.server.ip("-j", "addr", "show", "dev", Pair.SERVER_IF).stdout
    )
    return [a["local"] for a in shown[0].get("addr_info", []) if a["scope"] == "global"]


def test_addressChurnUnderLoad(pair: Pair, service: Twistd) -> None:
    """
    While a client keeps asking, 200 times an address (IPv4 or IPv6) is
    added or removed, or the link goes down and up, in a seeded random
    order; afterwards every address the server has answers from itself, and
    the service logged no error.
    """
    server = pair.server
    assert server is not None
    spare = [f"10.1.2.{i}" for i in range(10, 16)] + [
        f"fd00:1:2::{i:x}" for i in range(0x10, 0x16)
    ]
    asked = [Pair.SERVER_V4, Pair.SERVER_V6, *spare]
    client = startLoad(
        pair,
        "ask",
        {"targets": [[a, PORT] for a in asked], "duration": 5.0, "wait": 0.01},
    )
    rng = random.Random(9)
    present: set[str] = set()
    flaps = 0
    for _ in range(200):
        choice = rng.random()
        if choice < 0.08:
            server.ip("link", "set", Pair.SERVER_IF, "down")
            server.ip("link", "set", Pair.SERVER_IF, "up")
            flaps += 1
            # The kernel drops IPv6 addresses when a link goes down.
            present = set(currentAddresses(pair)) & set(spare)
            continue
        address = rng.choice(spare)
        prefix = "64" if ":" in address else "24"
        if address in present:
            server.ip("addr", "del", f"{address}/{prefix}", "dev", Pair.SERVER_IF)
            present.discard(address)
        else:
            extra = ["nodad"] if ":" in address else []
            server.ip(
                "addr", "add", f"{address}/{prefix}", "dev", Pair.SERVER_IF, *extra
            )
            present.add(address)
    out, err = client.communicate(timeout=60)
    assert client.returncode == 0, err
    during = json.loads(out)
    assert flaps > 0
    # The primary IPv4 address was there all along (a link going down
    # drops IPv6 addresses, not IPv4 ones).
    assert during[Pair.SERVER_V4]["answered"] > 0

    server.ip("link", "set", Pair.SERVER_IF, "up")
    pair.waitUntilReady()
    addresses = currentAddresses(pair)
    print(f"churn: {flaps} flaps; now {addresses}; during {during}")
    assert Pair.SERVER_V4 in addresses
    assert set(present) <= set(addresses)
    results = pair.query(
        *[{"host": a, "port": PORT, "timeout": 2.0} for a in addresses]
    )
    for address, result in zip(addresses, results, strict=True):
        assert result["ok"], result
        assert result["source"] == [address, PORT], result
    assert service.stop() == -signal.SIGTERM
    assertCleanLog(service)


def test_statsLineAddsUp(pair: Pair, tmp_path: Path) -> None:
    """
    The service's final stats line (JSON log) after a mixed load, send
    errors included (replies to a source the server has an unreachable route
    to): every port counter and every refusal reason is in it, and
    received = replied + refused + send errors.
    """
    server, client = pair.server, pair.client
    assert server is not None and client is not None
    unreachable, denied = "10.1.2.99", "10.1.2.98"
    server.sysctl("net.ipv4.conf.all.rp_filter", "0")
    server.sysctl(f"net.ipv4.conf.{Pair.SERVER_IF}.rp_filter", "0")
    server.ip("route", "add", "unreachable", f"{unreachable}/32")
    for address in (unreachable, denied):
        client.ip("addr", "add", f"{address}/24", "dev", Pair.CLIENT_IF)
    config = tmp_path / "udpdst.toml"
    config.write_text(
        f'[[listen]]\naddress = "::"\nport = {PORT}\nmax_packet_size = 1000\n'
        f'[limits]\ndeny = ["{denied}/32"]\nper_source_rate = 0.01\n'
        "per_source_burst = 5\n"
    )
    process = Twistd(
        [],
        REPO,
        command=server.argv(
            TWISTD,
            "-n",
            "--pidfile=",
            "--logger",
            "udpdst.echo.jsonLogObserver",
            "udpdst",
            "--config",
            str(config),
        ),
    )
    try:
        process.listening()

        def ask(count: int, **options: Any) -> list[dict[str, Any]]:
            return pair.query(
                *[
                    {"host": Pair.SERVER_V4, "port": PORT, "timeout": 0.3, **options}
                    for _ in range(count)
                ]
            )

        assert [r["ok"] for r in ask(5)] == [True] * 5
        assert not any(r["ok"] for r in ask(4, bind=Pair.CLIENT_V4))  # rate
        assert not any(r["ok"] for r in ask(4, bind=unreachable))
        assert not any(r["ok"] for r in ask(2, bind=denied))
        assert not any(r["ok"] for r in ask(1, payload="x" * 2000))
        assert process.stop() == -signal.SIGTERM
    finally:
        process.kill()
    assertCleanLog(process)
    (final,) = [
        json.loads(line)
        for line in process.out
        if line.startswith("{") and '"final": true' in line and '"received"' in line
    ]
    for name in PortCounters.__dataclass_fields__:
        assert "{" + name + "}" in final["log_format"], name
    assert set(final["refusedBy"]) == set(REFUSAL_REASONS)
    assert final["sendErrors"] == 4
    assert final["oversized"] == 1
    assert final["refusedBy"]["denied"] == 2
    assert final["refusedBy"]["rate"] == 4
    assert final["received"] == 5 + 4 + 4 + 2
    assert final["received"] == (
        final["replied"] + final["refused"] + final["sendErrors"]
    )
    # The rate limiter's figures are reported too: the two sources that got
    # past the access list (denied ones never reach it).
    (limiter,) = [
        json.loads(line)
        for line in process.out
        if '"final stats"' in line and '"limiterEvictions"' in line
    ]
    assert (limiter["rateLimitedSources"], limiter["limiterEvictions"]) == (2, 0)

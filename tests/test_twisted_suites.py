"""
Twisted's own UDP, multicast and DNS test suites pass with udpdst's ports in
place of Twisted's, under every reactor udpdst offers, exactly as they pass
on stock Twisted.

Each run is a subprocess (L{tests._twisted_suites}) that installs a reactor
as C{trial --reactor NAME} does and runs C{twisted.test.test_udp} (ports,
multicast) and C{twisted.names} (its UDP servers and resolvers) on the
global reactor.  A udpdst reactor is patched by its plugin, so every
C{reactor.listenUDP} and C{reactor.listenMulticast} in those tests builds
one of our ports; the run counts the ports started by class, which proves
it.  Each is compared with the stock reactor of the same kind, run once per
module: the same tests pass, the same skip, none fails.

No test of these suites depends on the Twisted behaviours udpdst
deliberately changes (a reply to a secondary address leaves from the
primary one; an IPv6 peer's scope id is dropped): those differences are
shown by C{tests/test_reactors.py} (C{test_stockTwistdDNSFailsThroughSecondaryAddress})
and C{tests/test_netns.py} (link-local peers), so nothing here is excluded.
C{twisted.internet.test.test_udp} builds reactors of its own rather than
using the global one; C{tests/test_twisted_mixins.py} runs its mixins on our
port.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from tests._service_helpers import REPO
from udpdst.port import IO_PATH

#: The test modules run, as trial names them.
MODULES = ("twisted.test.test_udp", "twisted.names")

#: Each udpdst reactor, and the stock Twisted reactor it is patched from.
REACTORS = {
    "udpdst": "epoll",
    "udpdst-asyncio": "asyncio",
    "udpdst-poll": "poll",
    "udpdst-select": "select",
}

#: Our port classes, and the Twisted classes they stand in for.
OURS = ("DestinationPort", "DestinationMulticastPort")
STOCK = ("Port", "MulticastPort")

#: Bound on one run of the suites (they take a few seconds): a hang, not a
#: timing assertion.
RUN_TIMEOUT = 120


def runSuites(reactorName: str, workDir: Path) -> dict[str, Any]:
    """
    Run L{MODULES} under C{reactorName} in a subprocess on this process's
    I/O path; return what L{tests._twisted_suites} recorded.
    """
    workDir.mkdir(parents=True)
    resultPath = workDir / "result.json"
    proc = subprocess.run(
        [sys.executable, "-m", "tests._twisted_suites", reactorName]
        + [str(resultPath), str(workDir / "_trial_temp"), *MODULES],
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        cwd=REPO,
    )
    if not resultPath.exists():
        raise AssertionError(
            f"{reactorName}: no result (exit {proc.returncode})\n"
            f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
        )
    result: dict[str, Any] = json.loads(resultPath.read_text())
    result["output"] = proc.stdout[-20000:] + proc.stderr[-4000:]
    return result


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """
    The results of every udpdst reactor and every stock one, by reactor
    name; two runs at a time (one per core).
    """
    base = tmp_path_factory.mktemp("twisted-suites")
    names = [*REACTORS, *REACTORS.values()]
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = pool.map(lambda name: runSuites(name, base / name), names)
        return dict(zip(names, results, strict=True))


def byOutcome(outcomes: dict[str, str]) -> dict[str, set[str]]:
    grouped: dict[str, set[str]] = {}
    for testId, outcome in outcomes.items():
        grouped.setdefault(outcome, set()).add(testId)
    return grouped


@pytest.mark.parametrize("ours", list(REACTORS))
def test_sameOutcomesAsStockTwisted(runs: dict[str, dict[str, Any]], ours: str) -> None:
    """
    Under C{--reactor ours}, Twisted's suites started only udpdst's ports,
    of each kind they start on stock Twisted, on the I/O path under test;
    and every test ends as it does on the stock reactor of the same kind,
    where none fails.
    """
    patched, stock = runs[ours], runs[REACTORS[ours]]
    assert patched["reactor"] == stock["reactor"]
    assert patched["ioPath"] == IO_PATH

    ports = Counter(patched["ports"])
    stockPorts = Counter(stock["ports"])
    assert ports["DestinationPort"] > 0, ports
    assert not any(ports[name] for name in STOCK), ports
    assert not any(stockPorts[name] for name in OURS), stockPorts
    # Ours of each kind where Twisted's own run started its own of that kind
    # (no multicast ports where the stack has no multicast: Twisted skips
    # those tests).
    started = [ports[name] > 0 for name in OURS]
    assert started == [stockPorts[name] > 0 for name in STOCK], (ports, stockPorts)

    expected = byOutcome(stock["outcomes"])
    got = byOutcome(patched["outcomes"])
    assert set(expected) <= {"success", "skip"}, stock["output"]
    for module in MODULES:
        assert any(t.startswith(module + ".") for t in expected["success"]), module
    failed = {k: sorted(v) for k, v in got.items() if k not in ("success", "skip")}
    assert not failed, patched["output"]
    assert got == expected

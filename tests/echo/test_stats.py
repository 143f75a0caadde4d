"""
Tests for udpdst.echo.stats (the one snapshot of every counter) and for the stats
lines a real C{twistd udpdst} logs from it.
"""

from __future__ import annotations

import json
import re
import signal
import socket
from pathlib import Path

import pytest

from tests._service_helpers import Twistd, echo
from udpdst.echo.protocol import REFUSAL_REASONS, EchoCounters
from udpdst.echo.stats import ListenerStats, Snapshot, portFigures, takeSnapshot
from udpdst.port import SOCKET_FIGURES, PortCounters


def listener(**counters: int) -> ListenerStats:
    return ListenerStats(
        {"received": 0, "replied": 0, **counters}, dict.fromkeys(REFUSAL_REASONS, 0)
    )


def test_portFiguresHasEveryPortCounter() -> None:
    """
    Every field of the port's counters is in the snapshot, under the
    contract's names, whatever the port adds later.
    """
    figures = portFigures(PortCounters())
    assert set(PortCounters().asDict()) == set(figures)
    for name in ("received", "replied", "sendErrors", "oversized", "controlTruncated"):
        assert name in figures


def test_portFiguresBeforeListening() -> None:
    assert set(portFigures(None)) == set(portFigures(PortCounters()))
    assert all(v == 0 for v in portFigures(None).values())


def test_takeSnapshot() -> None:
    port = PortCounters()
    port.kernelDrops = 3
    port.controlTruncated = 2
    counters = EchoCounters()
    counters.refused["rate"] = 4

    class Limiter:
        evictions = 5

        def __len__(self) -> int:
            return 7

    snapshot = takeSnapshot([("127.0.0.1:7", port, counters)], Limiter())
    stats = snapshot.listeners["127.0.0.1:7"]
    assert stats.counters["kernelDrops"] == 3
    assert stats.counters["controlTruncated"] == 2
    assert stats.refused == dict(counters.refused)
    assert stats.refusedTotal == 4
    assert (snapshot.rateLimitedSources, snapshot.limiterEvictions) == (7, 5)
    # A snapshot is a copy: what is counted later does not change it.
    port.kernelDrops = 100
    counters.refused["rate"] = 100
    assert stats.counters["kernelDrops"] == 3
    assert stats.refused["rate"] == 4


def test_snapshotIsImmutable() -> None:
    snapshot = Snapshot({"a": listener(received=1)}, 1, 2)
    with pytest.raises(TypeError):
        snapshot.listeners["b"] = listener()  # type: ignore[index]
    with pytest.raises(TypeError):
        snapshot.listeners["a"].counters["received"] = 5  # type: ignore[index]
    with pytest.raises(AttributeError):
        snapshot.rateLimitedSources = 3  # type: ignore[misc]


def test_snapshotsAddUp() -> None:
    """
    Workers' snapshots sum: the same listener's counters add up, other
    listeners are kept, and the limiter figures add up.
    """
    a = Snapshot({"[::]:7": listener(received=2, replied=1, kernelDrops=1)}, 3, 1)
    b = Snapshot(
        {
            "[::]:7": listener(received=5, replied=5, newCounter=4),
            "0.0.0.0:9": listener(received=1),
        },
        2,
        0,
    )
    total = a + b
    assert dict(total.listeners["[::]:7"].counters) == {
        "received": 7,
        "replied": 6,
        "kernelDrops": 1,
        "newCounter": 4,
    }
    assert total.listeners["0.0.0.0:9"] == b.listeners["0.0.0.0:9"]
    assert (total.rateLimitedSources, total.limiterEvictions) == (5, 1)
    assert a + Snapshot() == a


def test_socketFiguresDoNotAddUpAcrossProcesses() -> None:
    """
    The kernel's drops are the socket's count, which every process serving
    that socket sees whole: processes' snapshots keep the largest (the
    latest), while two sockets of one address in one process add up.
    """
    assert SOCKET_FIGURES == {"kernelDrops"}
    parent = Snapshot({"[::]:7": listener(received=0, kernelDrops=9)})
    worker1 = Snapshot({"[::]:7": listener(received=4, kernelDrops=7)})
    worker2 = Snapshot({"[::]:7": listener(received=5, kernelDrops=9)})
    total = parent + worker1 + worker2
    assert dict(total.listeners["[::]:7"].counters) == {
        "received": 9,
        "replied": 0,
        "kernelDrops": 9,
    }
    one, two = PortCounters(), PortCounters()
    one.kernelDrops, two.kernelDrops = 2, 3
    echoes = EchoCounters()
    snapshot = takeSnapshot([("[::]:7", one, echoes), ("[::]:7", two, echoes)])
    assert snapshot.listeners["[::]:7"].counters["kernelDrops"] == 5


def test_snapshotRoundTripsThroughJSON() -> None:
    """
    asDict is plain data (what a worker sends its parent), fromDict rebuilds
    the same snapshot.
    """
    refused = dict.fromkeys(REFUSAL_REASONS, 0)
    refused["rate"] = 9
    snapshot = Snapshot(
        {"[::1]:7": ListenerStats({"received": 10, "replied": 1}, refused)}, 4, 2
    )
    data = json.loads(json.dumps(snapshot.asDict()))
    assert Snapshot.fromDict(data) == snapshot
    with pytest.raises(KeyError):
        Snapshot.fromDict({"listeners": {}})


# The stats lines of a real twistd udpdst.


def test_statsLinesReportEveryCounter(tmp_path: Path) -> None:
    """
    The final stats line names every counter the port has (control
    truncated included) and the refusals; the rate limiter's line shows
    the sources it tracks and those it evicted.
    """
    config = tmp_path / "udpdst.toml"
    config.write_text(
        '[[listen]]\naddress = "127.0.0.1"\nport = 0\n'
        "[limits]\nmax_sources = 1\n[log]\nstats_interval = 0\n"
    )
    process = Twistd(["--config", str(config)], tmp_path)
    try:
        ((_, port),) = process.listening()
        # A one-source limiter keeps two generations of one source each: the
        # third and the fourth new source each drop the older generation.
        assert echo("127.0.0.1", port, b"one", source="127.0.0.2") == b"one"
        assert echo("127.0.0.1", port, b"two", source="127.0.0.3") == b"two"
        assert echo("127.0.0.1", port, b"four", source="127.0.0.5") == b"four"
        # Refused: source port 7 (loop protection), answered by nothing.
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind(("127.0.0.4", 7))
            s.sendto(b"loop", ("127.0.0.1", port))
        assert echo("127.0.0.1", port, b"three", source="127.0.0.2") == b"three"
    except BaseException:
        process.kill()
        raise
    code = process.stop()
    output = process.output()
    assert code == -signal.SIGTERM, output  # twistd ends by the signal it got
    line = re.search(r"final stats 127\.0\.0\.1:\d+: (.*)", output)
    assert line is not None, output
    text = line.group(1)
    assert text.startswith(
        "received 5, replied 4, refused 1 (source-port=1), send errors 0, "
        "kernel drops 0, "
    ), text
    for name in portFigures(PortCounters()):
        if name not in ("received", "replied"):
            words = re.sub(r"[A-Z]", lambda m: " " + m.group().lower(), name)
            assert f"{words} 0" in text, (words, text)
    assert "control truncated 0" in text
    assert "final stats rate limiter: 2 sources tracked, 2 evicted" in output

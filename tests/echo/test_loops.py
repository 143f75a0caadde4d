"""
Tests for the end of echo loops (udpdst.echo.limits.LoopGuard in the echo): two
echo ports, and two C{twistd udpdst} services, with one spoofed datagram
between them on real loopback sockets; a loop through a slow peer; and
clients that repeat themselves, which must keep their answers.
"""

from __future__ import annotations

import json
import signal
import time
import tracemalloc
from typing import Any

import pytest
from twisted.internet.protocol import DatagramProtocol
from twisted.logger import LogLevel, globalLogPublisher

from tests._raw import requiresRawSockets, spoof
from tests._service_helpers import DEADLINE, Twistd, freePort
from tests.clients import client, echo, send
from tests.echo._helpers import portCounters, run, server, until
from tests.netns import REPO
from udpdst.address import Destination, PeerAddress
from udpdst.echo.config import LimitsConfig
from udpdst.echo.limits import LoopGuard
from udpdst.echo.protocol import EchoProtocol


@pytest.fixture
def infoEvents() -> Any:
    captured: list[dict[str, Any]] = []

    def observer(event: dict[str, Any]) -> None:
        if event.get("log_namespace") == "udpdst.echo":
            captured.append(event)

    globalLogPublisher.addObserver(observer)
    try:
        yield captured
    finally:
        globalLogPublisher.removeObserver(observer)


@requiresRawSockets
@pytest.mark.parametrize("rate", [0.0, 1000.0], ids=["unlimited", "default-rate"])
@pytest.mark.parametrize(
    "prefixes",
    [(b"", b""), (b"a> ", b""), (b"a> ", b"bb> ")],
    ids=["no-prefix", "one-prefix", "two-prefixes"],
)
def test_loopBetweenTwoEchoPortsEnds(
    epollReactor: Any,
    infoEvents: list[dict[str, Any]],
    rate: float,
    prefixes: tuple[bytes, bytes],
) -> None:
    """
    One datagram spoofed from echo port A to echo port B sets off a loop
    (each answers the other's reply); it ends after a bounded number of
    bounces, is counted once under C{loop} and logged once at info level,
    and both ports then answer clients as before.
    """
    limits = LimitsConfig(per_source_rate=rate)
    a, portA = server(epollReactor, "::", EchoProtocol.fromConfig(prefixes[0], limits))
    b, portB = server(
        epollReactor, "0.0.0.0", EchoProtocol.fromConfig(prefixes[1], limits)
    )
    echoes = (a, b)

    def loops() -> int:
        return sum(p.counters.refused["loop"] for p in echoes)

    def received() -> list[int]:
        return [portCounters(p).received for p in echoes]

    async def scenario() -> None:
        spoof(("127.0.0.1", portA), ("127.0.0.1", portB), b"set off a loop")
        await until(epollReactor, lambda: loops() > 0)
        # No datagram of the loop is left in flight: two rounds of one
        # client datagram to each port move the counters by exactly those.
        for _ in range(2):
            before = received()
            for port in (portA, portB):
                c = client(epollReactor, "127.0.0.1", "127.0.0.2", port)
                send(c, b"marker")
                await c.waitFor(1)
                assert c.received[0][0].endswith(b"marker")
            assert received() == [n + 1 for n in before]

    run(epollReactor, scenario)
    assert loops() == 1
    bounces = sum(portCounters(p).replied for p in echoes) - 4
    assert 2 <= bounces <= 2 * LoopGuard.maxBounces + 2
    stopped = [e for e in infoEvents if "echo loop" in e["log_format"]]
    assert len(stopped) == 1
    assert stopped[0]["log_level"] == LogLevel.info
    for p in echoes:
        counters = portCounters(p)
        assert counters.received == counters.replied + p.counters.refusedTotal


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_clientRepeatingOnceASecondIsNeverRefused(epollReactor: Any) -> None:
    """
    A client sending the same payload from one socket once a second (the
    clock is stepped, the datagrams are real) gets every answer.
    """
    clock = Clock()
    proto, port = server(epollReactor, "::", EchoProtocol(clock=clock))

    async def scenario() -> None:
        c = client(epollReactor, "127.0.0.1", "127.0.0.2", port)
        for i in range(200):
            send(c, b"are you there?")
            await c.waitFor(i + 1)
            clock.now += 1.0

    run(epollReactor, scenario)
    assert proto.counters.refusedTotal == 0
    assert portCounters(proto).replied == 200


def test_loadTestWithDifferentDatagramsIsNeverRefused(epollReactor: Any) -> None:
    """
    A client at full speed (the clock does not move at all) whose datagrams
    differ, many in flight, gets every answer.
    """
    proto, port = server(epollReactor, "::", EchoProtocol(clock=lambda: 5.0))

    async def scenario() -> None:
        c = client(epollReactor, "127.0.0.1", "127.0.0.2", port)
        for burst in range(20):
            for i in range(32):
                send(c, b"%d %08d" % (burst, i) + b"\0" * 48)
            await c.waitFor(32 * (burst + 1))

    run(epollReactor, scenario)
    assert proto.counters.refusedTotal == 0


def test_identicalDatagramsAtFullSpeed() -> None:
    """
    What the README documents for a client that repeats one payload from one
    port at full speed: one datagram in maxBounces + 1 is refused; slower
    than that, one each maxDuration seconds; from another port, none.
    """
    guard = LoopGuard()
    peer = ("10.1.2.5", 40000)
    answered = [guard.allow(peer, b"same", b"same", 0.0) for _ in range(650)]
    assert answered.count(False) == 650 // (LoopGuard.maxBounces + 1)
    assert answered[LoopGuard.maxBounces] is False

    guard = LoopGuard()
    every = 0.1
    answered = [guard.allow(peer, b"same", b"same", i * every) for i in range(100)]
    # 10 s: one refused each maxDuration (plus the datagram after it starts a
    # new streak).
    refused = answered.count(False)
    assert (
        10 / (LoopGuard.maxDuration + 2 * every)
        <= refused
        <= 10 / LoopGuard.maxDuration
    )

    guard = LoopGuard()
    assert all(
        guard.allow(("10.1.2.5", 40000 + i), b"same", b"same", 0.0) for i in range(650)
    )


def test_slowLoopEndsByDuration() -> None:
    """
    A loop with a long round trip (0.3 s, below the window) ends after
    maxDuration, with one prefix growing the datagram each time.
    """
    guard = LoopGuard()
    peer = ("10.1.2.5", 7007)
    data = b"x"
    now = 0.0
    bounces = 0
    while guard.allow(peer, data, b"a> " + data, now):
        data = b"a> " + data  # the peer echoes our reply unchanged
        now += 0.3
        bounces += 1
        assert bounces < 10
    assert now <= LoopGuard.maxDuration + 0.3


def test_loopAcrossPeerPrefix() -> None:
    """
    A peer that puts its own prefix before our reply is still a loop, and a
    reply longer than exactUpTo (remembered by hash) is matched too.
    """
    for size in (10, LoopGuard.exactUpTo + 1000):
        guard = LoopGuard()
        peer = ("2001:db8::5", 9)
        data = b"y" * size
        for _ in range(LoopGuard.maxBounces):
            assert guard.allow(peer, data, data, 0.0)
            data = b"peer: " + data
        assert not guard.allow(peer, data, data, 0.0)
        assert len(guard) == 0


def test_notABounceWhenSlowOrDifferent() -> None:
    guard = LoopGuard()
    peer = ("10.1.2.5", 9)
    for i in range(1000):
        # Same payload but each after the window; different payload at once.
        assert guard.allow(peer, b"same", b"same", i * LoopGuard.window)
        assert guard.allow(peer, b"%d" % i, b"%d" % i, i * LoopGuard.window)


def test_memoryBounded() -> None:
    """
    At most maxPeers peers, and the README's 2.5 MB at worst: IPv6 peers
    with a destination each, replies of exactUpTo bytes kept whole.
    """
    guard = LoopGuard()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(3 * LoopGuard.maxPeers):
            host = f"2001:db8:1234:5678:9abc:def0:{i >> 16:x}:{i & 0xFFFF:x}"
            dst = Destination("2001:db8::1", 12345, 2, "2001:db8::1")
            reply = bytes(bytearray(LoopGuard.exactUpTo))
            guard.allow(PeerAddress(host, 40000, dst), b"x", reply, 0.0)
            assert len(guard) <= LoopGuard.maxPeers
        peak = tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()
    assert peak < 2.5e6


def test_echoRefusesTheBounce() -> None:
    """
    The echo asks the guard with the reply it would send (prefix included)
    and counts the refusal under C{loop}.
    """
    sent: list[bytes] = []

    class Transport:
        def write(self, data: bytes, addr: Any, dst: Any) -> None:
            sent.append(data)

        def getHost(self) -> Any:
            return None

    proto = EchoProtocol(b"p", clock=lambda: 0.0)
    proto.makeConnection(Transport())  # type: ignore[arg-type]
    dst = Destination("10.1.2.3", 7, 2, "10.1.2.3")
    data = b"d"
    while proto.counters.refused["loop"] == 0:
        proto.datagramReceived(data, PeerAddress("10.1.2.5", 7007), dst)
        data = sent[-1]
        assert len(sent) <= LoopGuard.maxBounces + 1
    # The first reply, then maxBounces - 1 more; the maxBounces-th bounce is
    # refused.
    assert len(sent) == LoopGuard.maxBounces


class SlowEcho(DatagramProtocol):
    """
    Another service on a slow path: it answers every datagram with the same
    bytes, 0.1 s later.
    """

    delay = 0.1

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor
        self.seen = 0

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        self.seen += 1
        self.reactor.callLater(self.delay, self.transport.write, data, addr)  # type: ignore[union-attr]


def test_slowLoopEndsOnRealSockets(epollReactor: Any) -> None:
    """
    A loop through a peer that takes 0.1 s to answer (far below the rate
    limit, too slow for maxBounces to matter) ends once it has gone on for
    maxDuration.
    """
    proto, port = server(epollReactor, "::", EchoProtocol())
    peer = SlowEcho(epollReactor)
    listening = epollReactor.listenUDP(0, peer, interface="127.0.0.1")

    async def scenario() -> None:
        listening.write(b"start", ("127.0.0.2", port))
        await until(epollReactor, lambda: proto.counters.refused["loop"] > 0)

    run(epollReactor, scenario)
    # At least maxDuration / 0.1 s bounces, far fewer than maxBounces.
    assert 4 <= peer.seen < LoopGuard.maxBounces
    assert portCounters(proto).replied == peer.seen


@requiresRawSockets
@pytest.mark.parametrize("workers", ["1", "2"])
def test_loopBetweenTwoServicesEnds(workers: str) -> None:
    """
    Two C{twistd udpdst} services with their default limits on two ports,
    one spoofed datagram between them: the loop ends, counted once under
    C{loop} and logged once at info level, and both still answer.  With two
    workers sharing each socket, consecutive bounces reach either worker;
    each still sees its own reply come back (or one it also sent).
    """
    ports = [freePort(), freePort()]
    services = [
        Twistd(
            [
                "--listen",
                f"127.0.0.1:{p}",
                "--stats-interval",
                "0",
                "--workers",
                workers,
            ],
            REPO,
            twistdArgs=["-n", "--pidfile=", "--logger", "udpdst.echo.jsonLogObserver"],
        )
        for p in ports
    ]
    try:
        for service in services:
            service.listening()
        spoof(("127.0.0.1", ports[0]), ("127.0.0.1", ports[1]), b"set off a loop")
        # Whichever stops it logs it; wait for that line.
        deadline = time.monotonic() + DEADLINE
        while not any("echo loop" in s.output() for s in services):
            assert time.monotonic() < deadline, [s.output() for s in services]
            time.sleep(0.05)
        for p in ports:
            assert echo("127.0.0.1", p, b"still there") == b"still there"
        for service in services:
            assert service.stop() == -signal.SIGTERM
    finally:
        for service in services:
            service.kill()
    finals = [
        json.loads(line)
        for service in services
        for line in service.out
        if '"final": true' in line and '"refusedBy"' in line
    ]
    assert sum(f["refusedBy"]["loop"] for f in finals) == 1
    stopped = [
        json.loads(line)
        for service in services
        for line in service.out
        if "echo loop" in line
    ]
    assert len(stopped) == 1
    assert stopped[0]["log_level"]["name"] == "info"
    for f in finals:
        assert f["received"] == f["replied"] + f["refused"] + f["sendErrors"]

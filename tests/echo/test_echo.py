"""
Tests for udpdst.echo over real loopback sockets: replies from the address
asked, the prefix, whole datagrams, and each security check (each test fails
if its check is removed).
"""

from __future__ import annotations

import errno
import ipaddress
import os
from typing import Any

import pytest
from twisted.internet.error import InvalidAddressError, MessageLengthError
from twisted.logger import LogLevel, globalLogPublisher

from tests.clients import Client, client, send
from tests.conftest import requiresIPv6
from tests.echo._helpers import portCounters, run, server
from udpdst import listenUDP
from udpdst.address import Destination, PeerAddress
from udpdst.echo import logs
from udpdst.echo.config import LimitsConfig
from udpdst.echo.limits import AccessList, RateLimiter
from udpdst.echo.protocol import REFUSAL_REASONS, EchoProtocol

net = ipaddress.ip_network
EVERYONE = (net("0.0.0.0/0"), net("::/0"))
requiresRoot = pytest.mark.skipif(os.geteuid() != 0, reason="binding port 7 needs root")


# Replies


@pytest.mark.parametrize("interface", ["0.0.0.0", "::"])
def test_replyFromTheAddressAsked(epollReactor: Any, interface: str) -> None:
    """
    Clients connected to secondary addresses (127.0.0.2, 127.0.0.3) of a
    wildcard listener get their echo, from the address they sent to.
    """
    proto, port = server(epollReactor, interface)

    async def scenario() -> None:
        c2 = client(epollReactor, "127.0.0.1", "127.0.0.2", port)
        c3 = client(epollReactor, "127.0.0.1", "127.0.0.3", port)
        free = client(epollReactor, "127.0.0.1", None, port)
        send(c2, b"to two")
        send(c3, b"to three")
        send(free, b"unconnected", ("127.0.0.3", port))
        await c2.waitFor(1)
        await c3.waitFor(1)
        await free.waitFor(1)
        assert c2.received == [(b"to two", ("127.0.0.2", port))]
        assert c3.received == [(b"to three", ("127.0.0.3", port))]
        assert free.received == [(b"unconnected", ("127.0.0.3", port))]

    run(epollReactor, scenario)
    assert portCounters(proto).replied == 3
    assert proto.counters.refusedTotal == 0


@requiresIPv6
def test_replyOverIPv6(epollReactor: Any) -> None:
    proto, port = server(epollReactor, "::")

    async def scenario() -> None:
        c = client(epollReactor, "::1", "::1", port)
        send(c, b"six")
        await c.waitFor(1)
        assert c.received == [(b"six", ("::1", port))]

    run(epollReactor, scenario)


def test_prefix(epollReactor: Any) -> None:
    proto, port = server(epollReactor, "::", EchoProtocol("héllo> ".encode()))

    async def scenario() -> None:
        c = client(epollReactor, "127.0.0.1", "127.0.0.2", port)
        send(c, b"abc")
        await c.waitFor(1)
        assert c.received[0][0] == "héllo> ".encode() + b"abc"

    run(epollReactor, scenario)
    assert proto.amplification == len("héllo> ".encode())


def test_wholeDatagramsUpToTheUdpMaximum(epollReactor: Any) -> None:
    """
    The largest IPv4 UDP payload (65,507 bytes) comes back whole, and an
    empty datagram comes back empty.
    """
    proto, port = server(epollReactor, "::")
    big = os.urandom(65507)

    async def scenario() -> None:
        c = client(epollReactor, "127.0.0.1", "127.0.0.2", port)
        send(c, big)
        send(c, b"")
        await c.waitFor(2)
        assert [len(d) for d, _ in c.received] == [65507, 0]
        assert c.received[0][0] == big

    run(epollReactor, scenario)


@requiresIPv6
def test_wholeDatagramsUpToTheIPv6Maximum(epollReactor: Any) -> None:
    proto, port = server(epollReactor, "::")
    big = os.urandom(65527)

    async def scenario() -> None:
        c = client(epollReactor, "::1", "::1", port)
        send(c, big)
        await c.waitFor(1)
        assert c.received[0][0] == big

    run(epollReactor, scenario)


# Security checks. A refused datagram gets no reply: each test sends the
# refused datagrams first and then one that is answered (from another
# client); once that answer is in, the refused ones have been handled, so
# their absence is checked without waiting for a timeout.


async def refusedThenMarker(
    refused: Client, marker: Client, count: int = 1, data: bytes = b"refuse me"
) -> None:
    for _ in range(count):
        send(refused, data)
    expected = len(marker.received) + 1
    send(marker, b"marker")
    await marker.waitFor(expected)
    assert marker.received[-1][0].endswith(b"marker")
    assert refused.received == []
    assert not refused.pending()


@requiresRoot
@pytest.mark.parametrize("sourcePort", [7, 19])
def test_loopProtectionSourcePorts(epollReactor: Any, sourcePort: int) -> None:
    """
    No reply to source ports of services that answer anything (echo 7,
    chargen 19, ...).
    """
    proto, port = server(epollReactor, "0.0.0.0")

    async def scenario() -> None:
        refused = client(epollReactor, "127.0.0.5", "127.0.0.2", port, sourcePort)
        marker = client(epollReactor, "127.0.0.6", "127.0.0.2", port)
        await refusedThenMarker(refused, marker)

    run(epollReactor, scenario)
    assert proto.counters.refused["source-port"] == 1
    assert portCounters(proto).replied == 1


@requiresRoot
def test_loopProtectionIsConfigurable(epollReactor: Any) -> None:
    proto, port = server(epollReactor, "0.0.0.0", EchoProtocol(denySourcePorts=[]))

    async def scenario() -> None:
        c = client(epollReactor, "127.0.0.5", "127.0.0.2", port, 7)
        send(c, b"from seven")
        await c.waitFor(1)

    run(epollReactor, scenario)
    assert proto.counters.refused["source-port"] == 0


def test_loopProtectionSamePort(epollReactor: Any) -> None:
    """
    No reply to a datagram from the port it was sent to: another echo
    service on the same port would bounce it back forever.
    """
    proto = EchoProtocol()
    port = listenUDP(0, proto, "127.0.0.1", 65535, epollReactor).getHost().port

    async def scenario() -> None:
        refused = client(epollReactor, "127.0.0.5", "127.0.0.1", port, port)
        marker = client(epollReactor, "127.0.0.6", "127.0.0.1", port)
        await refusedThenMarker(refused, marker)

    run(epollReactor, scenario)
    assert proto.counters.refused["same-port"] == 1


def test_portZeroAlwaysRefused() -> None:
    """
    Source port 0 is refused even with an empty deny_source_ports (a real
    socket cannot send from port 0, hence a fake transport).
    """
    transport = FakeTransport()
    proto = EchoProtocol(denySourcePorts=[])
    proto.makeConnection(transport)
    proto.datagramReceived(b"x", PeerAddress("10.1.2.5", 0), DST)
    proto.datagramReceived(b"y", PeerAddress("10.1.2.5", 1), DST)
    assert proto.counters.refused["source-port"] == 1
    assert transport.sent == [(b"y", ("10.1.2.5", 1), DST)]


@pytest.mark.parametrize("interface", ["0.0.0.0", "::"])
def test_denyNetwork(epollReactor: Any, interface: str) -> None:
    """
    A denied source gets no reply; on a dual-stack socket the IPv4 client
    (::ffff:127.0.0.5) is matched by the IPv4 network.
    """
    access = AccessList(EVERYONE, [net("127.0.0.5/32")])
    proto, port = server(epollReactor, interface, EchoProtocol(access=access))

    async def scenario() -> None:
        refused = client(epollReactor, "127.0.0.5", "127.0.0.2", port)
        marker = client(epollReactor, "127.0.0.6", "127.0.0.2", port)
        await refusedThenMarker(refused, marker)

    run(epollReactor, scenario)
    assert proto.counters.refused["denied"] == 1


@pytest.mark.parametrize("interface", ["0.0.0.0", "::"])
def test_allowNetwork(epollReactor: Any, interface: str) -> None:
    """
    Only allowed sources get a reply; IPv4 networks match IPv4 clients of a
    dual-stack socket.
    """
    access = AccessList([net("127.0.0.6/32")])
    proto, port = server(epollReactor, interface, EchoProtocol(access=access))

    async def scenario() -> None:
        refused = client(epollReactor, "127.0.0.5", "127.0.0.2", port)
        marker = client(epollReactor, "127.0.0.6", "127.0.0.2", port)
        await refusedThenMarker(refused, marker)

    run(epollReactor, scenario)
    assert proto.counters.refused["not-allowed"] == 1
    assert portCounters(proto).replied == 1


def test_rateLimit(epollReactor: Any) -> None:
    """
    A source gets its burst, then no more while its bucket is empty; other
    sources are not affected.
    """
    limiter = RateLimiter(rate=1, burst=3, maxSources=100)
    proto, port = server(
        epollReactor, "::", EchoProtocol(rateLimiter=limiter, clock=lambda: 1000.0)
    )

    async def scenario() -> None:
        flooder = client(epollReactor, "127.0.0.5", "127.0.0.2", port)
        marker = client(epollReactor, "127.0.0.6", "127.0.0.2", port)
        for i in range(10):
            send(flooder, b"%d" % i)
        send(marker, b"marker")
        await marker.waitFor(1)
        await flooder.waitFor(3)
        assert [d for d, _ in flooder.received] == [b"0", b"1", b"2"]
        assert not flooder.pending()

    run(epollReactor, scenario)
    assert proto.counters.refused["rate"] == 7
    assert portCounters(proto).replied == 4


def test_rateLimitSharesIPv4AndMappedForms() -> None:
    """
    An IPv4 client has one bucket whether it comes as 10.1.2.5 or
    ::ffff:10.1.2.5.
    """
    transport = FakeTransport()
    proto = EchoProtocol(rateLimiter=RateLimiter(1, 2, 10), clock=lambda: 5.0)
    proto.makeConnection(transport)
    proto.datagramReceived(b"a", PeerAddress("10.1.2.5", 1000), DST)
    proto.datagramReceived(b"b", PeerAddress("::ffff:10.1.2.5", 1000), DST)
    proto.datagramReceived(b"c", PeerAddress("10.1.2.5", 1000), DST)
    assert proto.counters.refused["rate"] == 1


def test_rateLimitMemoryBoundedUnderManySources(epollReactor: Any) -> None:
    """
    Real datagrams from more distinct sources than max_sources: the limiter
    keeps max_sources buckets, and every source is still answered.
    """
    limiter = RateLimiter(rate=1, burst=1, maxSources=16)
    proto, port = server(epollReactor, "0.0.0.0", EchoProtocol(rateLimiter=limiter))
    sources = [f"127.0.{i // 200 + 10}.{i % 200 + 1}" for i in range(50)]

    async def scenario() -> None:
        for source in sources:
            c = client(epollReactor, source, "127.0.0.2", port)
            send(c, b"hi")
            await c.waitFor(1)
            assert len(limiter) <= 16

    run(epollReactor, scenario)
    assert 8 <= len(limiter) <= 16
    assert limiter.evictions == 50 - len(limiter)
    assert portCounters(proto).replied == 50


def test_amplificationBound(epollReactor: Any) -> None:
    """
    With a prefix, a reply is larger only by the prefix, and one that would
    exceed the largest UDP payload is not sent.
    """
    proto, port = server(epollReactor, "::", EchoProtocol(b"ab"))

    async def scenario() -> None:
        refused = client(epollReactor, "127.0.0.5", "127.0.0.2", port)
        marker = client(epollReactor, "127.0.0.6", "127.0.0.2", port)
        await refusedThenMarker(refused, marker, data=b"x" * 65506)
        send(marker, b"y" * 65505)
        await marker.waitFor(2)
        assert marker.received[1][0] == b"ab" + b"y" * 65505

    run(epollReactor, scenario)
    assert proto.counters.refused["too-large"] == 1


def test_amplificationBoundPerFamily() -> None:
    transport = FakeTransport()
    proto = EchoProtocol(b"ab")
    proto.makeConnection(transport)
    proto.datagramReceived(b"x" * 65506, PeerAddress("::ffff:10.1.2.5", 9), DST)
    proto.datagramReceived(b"x" * 65525, PeerAddress("2001:db8::5", 9), DST)
    proto.datagramReceived(b"x" * 65526, PeerAddress("2001:db8::5", 9), DST)
    assert proto.counters.refused["too-large"] == 2
    assert [len(data) for data, _, _ in transport.sent] == [65527]


def test_noPrefixReplyIsTheRequest() -> None:
    transport = FakeTransport()
    proto = EchoProtocol()
    proto.makeConnection(transport)
    for size in (0, 1, 1000, 65507):
        data = os.urandom(size)
        proto.datagramReceived(data, PeerAddress("10.1.2.5", 9), DST)
        assert transport.sent[-1][0] is data


# Errors and logs


DST = Destination("10.1.2.3", 12345, 2, "10.1.2.3")


class FakeTransport:
    def __init__(self, error: BaseException | None = None) -> None:
        self.sent: list[tuple[bytes, Any, Any]] = []
        self.error = error

    def write(self, data: bytes, addr: Any, dst: Any = None) -> None:
        if self.error is not None:
            raise self.error
        self.sent.append((data, addr, dst))

    def getHost(self) -> Any:
        return None


@pytest.mark.parametrize(
    "error",
    [
        OSError(errno.ENOBUFS, "No buffer space available"),
        BlockingIOError(errno.EAGAIN, "Resource temporarily unavailable"),
        MessageLengthError("message too long"),
        InvalidAddressError("fe80::5%gone0", "no such interface"),
    ],
)
def test_sendErrorsDoNotStopTheEcho(error: BaseException) -> None:
    """
    A write that raises is not a refusal (the port counts it as a send
    error) and the next datagram is answered.
    """
    transport = FakeTransport(error)
    proto = EchoProtocol()
    proto.makeConnection(transport)  # type: ignore[arg-type]
    proto.datagramReceived(b"x", PeerAddress("10.1.2.5", 9), DST)
    transport.error = None
    proto.datagramReceived(b"y", PeerAddress("10.1.2.5", 9), DST)
    assert proto.counters.refusedTotal == 0
    assert transport.sent == [(b"y", ("10.1.2.5", 9), DST)]


@pytest.fixture
def events() -> Any:
    captured: list[dict[str, Any]] = []

    def observer(event: dict[str, Any]) -> None:
        if event.get("log_namespace", "").startswith("udpdst.echo"):
            captured.append(event)

    globalLogPublisher.addObserver(observer)
    try:
        yield captured
    finally:
        globalLogPublisher.removeObserver(observer)
        logs.setLogLevel("info")


def test_debugLogsEachDatagram(epollReactor: Any, events: list[dict[str, Any]]) -> None:
    """
    At debug level: one line per datagram with peer and destination, refused
    ones with their reason.
    """
    from twisted.logger import formatEvent

    logs.setLogLevel("debug")
    access = AccessList(EVERYONE, [net("127.0.0.5/32")])
    proto, port = server(epollReactor, "0.0.0.0", EchoProtocol(access=access))
    ports: list[int] = []

    async def scenario() -> None:
        refused = client(epollReactor, "127.0.0.5", "127.0.0.2", port)
        marker = client(epollReactor, "127.0.0.6", "127.0.0.2", port)
        ports.extend(
            [refused.transport.getHost().port, marker.transport.getHost().port]
        )  # type: ignore[union-attr]
        send(marker, b"x" * 42)
        await marker.waitFor(1)
        await refusedThenMarker(refused, marker)

    run(epollReactor, scenario)
    lines = [formatEvent(e) for e in events]
    assert lines == [
        f"127.0.0.6:{ports[1]} -> 127.0.0.2:{port}, 42 bytes",
        f"127.0.0.5:{ports[0]} -> 127.0.0.2:{port}, 9 bytes: refused (denied)",
        f"127.0.0.6:{ports[1]} -> 127.0.0.2:{port}, 6 bytes",
    ]
    assert all(e["log_level"] == LogLevel.debug for e in events)
    assert events[0]["peer"] == f"127.0.0.6:{ports[1]}"
    assert events[0]["destination"] == f"127.0.0.2:{port}"
    assert events[0]["size"] == 42
    assert events[1]["reason"] == "denied"


def test_infoLogsNothingPerDatagram(
    epollReactor: Any, events: list[dict[str, Any]]
) -> None:
    """
    Above debug level neither answers nor refusals are logged per datagram:
    a flood must not flood the log.
    """
    logs.setLogLevel("info")
    limiter = RateLimiter(rate=1, burst=1, maxSources=10)
    proto, port = server(
        epollReactor, "::", EchoProtocol(rateLimiter=limiter, clock=lambda: 0.0)
    )

    async def scenario() -> None:
        refused = client(epollReactor, "127.0.0.5", "127.0.0.2", port)
        marker = client(epollReactor, "127.0.0.6", "127.0.0.2", port)
        send(refused, b"first")
        await refused.waitFor(1)
        for _ in range(50):
            send(refused, b"again")
        send(marker, b"marker")
        await marker.waitFor(1)

    run(epollReactor, scenario)
    assert proto.counters.refused["rate"] == 50
    assert events == []


def test_fromConfig() -> None:
    limits = LimitsConfig(
        per_source_rate=1,
        per_source_burst=1,
        deny=(net("10.9.0.0/16"),),
        deny_source_ports=(0, 53),
        deny_same_port=False,
    )
    transport = FakeTransport()
    proto = EchoProtocol.fromConfig(b"p", limits, clock=lambda: 0.0)
    proto.makeConnection(transport)
    for host, port in [
        ("10.1.2.5", 53),
        ("10.1.2.5", 12345),
        ("10.9.2.5", 1000),
        ("10.1.2.5", 1000),
        ("10.1.2.5", 1001),
    ]:
        proto.datagramReceived(b"x", PeerAddress(host, port), DST)
    refused = {k: v for k, v in proto.counters.refused.items() if v}
    # The bucket is per source address, whatever the source port.
    assert refused == {"source-port": 1, "denied": 1, "rate": 2}
    assert [(d, a) for d, a, _ in transport.sent] == [(b"px", ("10.1.2.5", 12345))]
    assert set(proto.counters.refused) == set(REFUSAL_REASONS)

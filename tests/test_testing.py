"""
udpdst.testing: the fake transport and peer addresses that protocol authors
test with, checked against what a real port does; and listenUDP with
Twisted's memory reactors.
"""

from __future__ import annotations

import socket
from typing import Any

import pytest
from twisted.internet import error
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import DatagramProtocol
from twisted.internet.testing import MemoryReactor, MemoryReactorClock
from zope.interface.verify import verifyObject

import udpdst
from tests.conftest import requiresIPv6
from tests.reactors import runUntil
from udpdst import Destination, PeerAddress
from udpdst.testing import FakeDestinationTransport, peer


class PlainEcho(DatagramProtocol):
    started = 0
    stopped = 0

    def startProtocol(self) -> None:
        self.started += 1

    def stopProtocol(self) -> None:
        self.stopped += 1

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        self.transport.write(data, addr)


class AwareEcho(udpdst.DestinationDatagramProtocol):
    def __init__(self) -> None:
        self.seen: list[tuple[bytes, PeerAddress, Destination | None]] = []

    def datagramReceived(
        self, data: bytes, addr: PeerAddress, dst: Destination | None
    ) -> None:
        self.seen.append((data, addr, dst))
        self.transport.write(data, addr, dst)


# The fake transport


def test_providesTheInterfaces() -> None:
    transport = FakeDestinationTransport()
    assert verifyObject(udpdst.IDestinationTransport, transport)
    assert verifyObject(IListeningPort, transport)
    assert isinstance(transport, udpdst.DestinationPort)


def test_connectedProtocolStarts() -> None:
    """
    A protocol given to the transport, or connected with
    C{makeConnection} as in Twisted's own tests, gets C{startProtocol} once.
    """
    given = PlainEcho()
    transport = FakeDestinationTransport(given)
    assert given.transport is transport and given.started == 1
    other = PlainEcho()
    other.makeConnection(FakeDestinationTransport())
    assert other.started == 1


def test_plainProtocolRepliesFromCarriedDestination() -> None:
    """
    A plain protocol writing back to the peer it got: C{written} shows the
    destination the real port would reply from; C{counters} count both ways.
    """
    transport = FakeDestinationTransport(PlainEcho())
    client = peer("10.0.0.5", 40000, "10.1.2.3:12345")
    transport.deliver(b"hi", client)
    assert transport.written == [
        (b"hi", ("10.0.0.5", 40000), Destination("10.1.2.3", 12345, 0, "10.1.2.3"))
    ]
    assert transport.counters.received == 1
    assert transport.counters.replied == 1


def test_awareProtocolGetsDestination() -> None:
    protocol = AwareEcho()
    transport = FakeDestinationTransport(protocol, interface="::")
    dst = Destination("ff02::1:2", 547, 2, "::")
    client = peer("fe80::5%2", 546, dst)
    transport.deliver(b"solicit", client)
    assert protocol.seen == [(b"solicit", client, dst)]
    assert transport.written == [(b"solicit", client, dst)]


def test_writtenDestinationRules() -> None:
    """
    The explicit C{dst} wins, then the one a L{PeerAddress} carries; a
    rebuilt tuple carries none.
    """
    transport = FakeDestinationTransport()
    carried = Destination("10.1.2.3", 53, 0, "10.1.2.3")
    explicit = Destination("10.1.2.4", 53, 0, "10.1.2.4")
    client = peer("10.0.0.5", 40000, carried)
    transport.write(b"a", client)
    transport.write(b"b", client, explicit)
    transport.write(b"c", ("10.0.0.5", 40000))
    transport.writeSequence([b"d", b"e"], ("10.0.0.6", 1), explicit)
    assert [(data, dst) for data, _, dst in transport.written] == [
        (b"a", carried),
        (b"b", explicit),
        (b"c", None),
        (b"de", explicit),
    ]


@pytest.mark.parametrize(
    "interface, addr",
    [
        ("", None),
        ("", ("example.com", 53)),
        ("", ("2001:db8::1", 53)),
        ("::", ("10.0.0.5", 53)),
    ],
)
def test_writeRefusesWhatARealPortRefuses(
    interface: str, addr: tuple[str, int] | None
) -> None:
    transport = FakeDestinationTransport(interface=interface)
    with pytest.raises(error.InvalidAddressError):
        transport.write(b"x", addr)
    assert transport.written == []
    assert transport.counters.sendErrors == 1


def test_connectedWrite() -> None:
    transport = FakeDestinationTransport(PlainEcho())
    transport.connect("10.0.0.9", 99)
    transport.write(b"x")
    assert transport.written == [(b"x", ("10.0.0.9", 99), None)]
    with pytest.raises(RuntimeError):
        transport.connect("10.0.0.9", 100)


def test_getHost() -> None:
    assert FakeDestinationTransport(port=53).getHost() == IPv4Address(
        "UDP", "0.0.0.0", 53
    )
    assert FakeDestinationTransport(interface="::").getHost() == IPv6Address(
        "UDP", "::", 12345
    )


def test_stoppingIsRecorded() -> None:
    """
    C{stopListening} and C{loseConnection} are recorded; the protocol is
    stopped once, as by a real port.
    """
    protocol = PlainEcho()
    transport = FakeDestinationTransport(protocol)
    d = transport.stopListening()
    assert isinstance(d, Deferred) and d.called
    transport.loseConnection()
    assert transport.stopCalls == ["stopListening", "loseConnection"]
    assert protocol.stopped == 1
    with pytest.raises(RuntimeError):
        transport.deliver(b"late", peer("10.0.0.5", 1))


# peer()


@pytest.mark.parametrize(
    "text, expected",
    [
        ("10.1.2.3:12345", Destination("10.1.2.3", 12345, 0, "10.1.2.3")),
        ("[2001:db8::3]:53", Destination("2001:db8::3", 53, 0, "2001:db8::3")),
        ("[fe80::1%7]:53", Destination("fe80::1", 53, 7, "fe80::1")),
        ("[::ffff:10.1.2.3]:53", Destination("10.1.2.3", 53, 0, "10.1.2.3")),
    ],
)
def test_peerFromText(text: str, expected: Destination) -> None:
    address = peer("10.0.0.5", 40000, text)
    assert address == ("10.0.0.5", 40000)
    assert type(address) is PeerAddress
    assert address.destination == expected


def test_peerZoneByName() -> None:
    """
    A zone names an interface of this host (C{lo} exists everywhere).
    """
    address = peer("fe80::5%lo", 546, "[fe80::1%lo]:547")
    assert address.destination == Destination(
        "fe80::1", 547, socket.if_nametoindex("lo"), "fe80::1"
    )


def test_peerWithDestinationOrNone() -> None:
    dst = Destination("255.255.255.255", 67, 2, "10.1.2.2")
    assert peer("0.0.0.0", 68, dst).destination is dst
    assert peer("10.0.0.5", 1).destination is None


@pytest.mark.parametrize(
    "text, why",
    [
        ("10.1.2.3", "is not ADDRESS:PORT"),
        ("10.1.2.3:0", "is not ADDRESS:PORT"),
        ("10.1.2.3:65536", "is not ADDRESS:PORT"),
        ("2001:db8::3:53", "put an IPv6 address in brackets"),
        ("www.example.test:53", "is not an IP address"),
        ("239.1.2.3:53", "build a Destination"),
        ("255.255.255.255:67", "build a Destination"),
        ("[ff02::1:2]:547", "build a Destination"),
        ("[fe80::1%nosuchif0]:53", "no interface named 'nosuchif0'"),
        ("10.1.2.3%2:53", "IPv4 addresses have no zone"),
    ],
)
def test_peerRefusesBadText(text: str, why: str) -> None:
    with pytest.raises(ValueError, match=why) as caught:
        peer("10.0.0.5", 1, text)
    assert "\n" not in str(caught.value)


class Recorder(DatagramProtocol):
    def __init__(self) -> None:
        self.got: Deferred[PeerAddress] = Deferred()

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        self.got.callback(addr)


@pytest.mark.parametrize(
    "interface, client, target, text",
    [
        ("0.0.0.0", "127.0.0.1", "127.0.0.2", "127.0.0.2:{port}"),
        pytest.param("::", "::1", "::1", "[::1]:{port}", marks=requiresIPv6, id="ipv6"),
        pytest.param(
            "::",
            "127.0.0.1",
            "127.0.0.3",
            "[::ffff:127.0.0.3]:{port}",
            marks=requiresIPv6,
            id="mapped",
        ),
    ],
)
def test_peerMatchesARealPort(
    epollReactor: Any, interface: str, client: str, target: str, text: str
) -> None:
    """
    What C{peer()} builds from text equals what a real port delivers, but
    for C{ifindex}, which only the kernel knows.
    """
    recorder = Recorder()
    port = udpdst.listenUDP(0, recorder, interface, reactor=epollReactor)
    number = port.getHost().port
    family = socket.AF_INET6 if ":" in target else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.bind((client, 0))
        s.sendto(b"x", (target, number))
        source = s.getsockname()
    try:
        real = runUntil(epollReactor, lambda: recorder.got)
    finally:
        port.stopListening()
    host = real[0]
    built = peer(host, source[1], text.format(port=number))
    assert built == real
    assert real.destination is not None and built.destination is not None
    assert real.destination.ifindex != 0
    assert built.destination == Destination(
        real.destination.host,
        real.destination.port,
        0,
        real.destination.replyFrom,
    )


# Memory reactors


@pytest.mark.parametrize("reactorType", [MemoryReactor, MemoryReactorClock])
def test_listenUDPWithMemoryReactor(reactorType: type[MemoryReactor]) -> None:
    """
    No socket is opened (a port number held by a real socket is accepted);
    the call is recorded in C{udpServers}; the port returned is a fake with
    the protocol started, whose writes are recorded.
    """
    reactor = reactorType()
    protocol = PlainEcho()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as held:
        held.bind(("", 0))
        number = held.getsockname()[1]
        port = udpdst.listenUDP(
            number, protocol, "", 512, reactor=reactor, reusePort=True
        )
    assert reactor.udpServers == [(number, protocol, "", 512)]  # type: ignore[attr-defined]
    assert isinstance(port, FakeDestinationTransport)
    assert port.getHost() == IPv4Address("UDP", "0.0.0.0", number)
    assert port.reusePort is True
    assert protocol.started == 1 and protocol.transport is port
    port.deliver(b"hi", peer("10.0.0.5", 1, "10.1.2.3:53"))
    assert port.written[0][2] == Destination("10.1.2.3", 53, 0, "10.1.2.3")
    port.stopListening()
    assert protocol.stopped == 1


def test_memoryReactorStillRefusesBadOptions() -> None:
    with pytest.raises(TypeError):
        udpdst.listenUDP(53, PlainEcho(), reactor=MemoryReactor(), bogus=True)


def test_adoptDatagramPortWithMemoryReactor() -> None:
    reactor = MemoryReactor()
    protocol = PlainEcho()
    port = udpdst.adoptDatagramPort(99, socket.AF_INET6, protocol, reactor=reactor)
    assert reactor.adoptedPorts == [(99, socket.AF_INET6, protocol, 8192)]
    assert port.getHost() == IPv6Address("UDP", "::", 1234)
    assert protocol.started == 1


def test_patchedMemoryReactor() -> None:
    """
    Code that calls C{reactor.listenUDP} on a patched memory reactor (which
    has no C{listenUDP} of its own) gets the fake port too.
    """
    reactor = MemoryReactorClock()
    undo = udpdst.patchReactor(reactor)
    try:
        port = reactor.listenUDP(53, PlainEcho())  # type: ignore[attr-defined]
    finally:
        undo()
    assert isinstance(port, FakeDestinationTransport)
    assert reactor.udpServers == [(53, port.protocol, "", 8192)]  # type: ignore[attr-defined]
    assert not hasattr(reactor, "listenUDP")


def test_listenMulticastRefusesMemoryReactor() -> None:
    """
    Twisted's memory reactors have no C{listenMulticast}; udpdst's says
    clearly that there is no socket to be had, and what to use instead.
    """
    with pytest.raises(error.CannotListenError, match="FakeDestinationTransport"):
        udpdst.listenMulticast(5353, PlainEcho(), reactor=MemoryReactor())

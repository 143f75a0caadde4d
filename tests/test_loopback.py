"""
The port on real loopback sockets, under each reactor kind: replies leave from
the address the client used (127.0.0.2, 127.0.0.3, ::1), while stock
C{reactor.listenUDP} is shown failing the same case.
"""

from __future__ import annotations

import pickle
import socket
from typing import Any

import pytest
from twisted.internet import defer, error
from twisted.internet.defer import Deferred
from twisted.internet.protocol import DatagramProtocol

import udpdst
from tests.clients import ask
from tests.conftest import requiresIPv6
from tests.kernel import flood, memInfo, rowOf
from tests.reactors import runUntil
from udpdst import Destination, DestinationPort, PeerAddress


class PlainEcho(DatagramProtocol):
    """
    An unchanged, destination-unaware echo.
    """

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        self.transport.write(data, addr)


class AwareEcho(udpdst.DestinationDatagramProtocol):
    """
    Echo that records and reports each destination.
    """

    def __init__(self) -> None:
        self.seen: list[tuple[Any, Destination | None]] = []

    def datagramReceived(self, data: bytes, addr: Any, dst: Destination | None) -> None:
        self.seen.append((addr, dst))
        self.transport.write(
            data + b" " + (dst.host if dst else "?").encode(), addr, dst
        )


def askAll(
    reactor: Any, targets: list[str], port: int
) -> Deferred[dict[str, bytes | None]]:
    @defer.inlineCallbacks
    def run() -> Any:
        results = {}
        for target in targets:
            results[target] = yield ask(reactor, target, port, b"ping")
        return results

    return run()


V4_TARGETS = ["127.0.0.1", "127.0.0.2", "127.0.0.3"]


@pytest.mark.parametrize(
    "interface, targets",
    [
        ("0.0.0.0", V4_TARGETS),
        ("", V4_TARGETS),
        pytest.param("::", V4_TARGETS + ["::1"], marks=requiresIPv6),
    ],
)
def test_plainProtocolRepliesFromEachAddress(
    anyReactor: Any, interface: str, targets: list[str]
) -> None:
    """
    An unchanged C{DatagramProtocol} on the port answers clients connected to
    every loopback address, on a wildcard IPv4 and a dual-stack socket.
    """
    port = udpdst.listenUDP(0, PlainEcho(), interface, reactor=anyReactor)
    try:
        results = runUntil(
            anyReactor, lambda: askAll(anyReactor, targets, port.getHost().port)
        )
    finally:
        port.stopListening()
    assert results == {t: b"ping" for t in targets}
    assert port.counters.received == len(targets)
    assert port.counters.replied == len(targets)


@pytest.mark.parametrize(
    "interface, targets",
    [
        ("0.0.0.0", V4_TARGETS),
        pytest.param("::", V4_TARGETS + ["::1"], marks=requiresIPv6),
    ],
)
def test_awareProtocolSeesDestination(
    anyReactor: Any, interface: str, targets: list[str]
) -> None:
    """
    A destination-aware protocol is told each address the client used, and
    its reply leaves from there.
    """
    proto = AwareEcho()
    port = udpdst.listenUDP(0, proto, interface, reactor=anyReactor)
    portNumber = port.getHost().port
    try:
        results = runUntil(anyReactor, lambda: askAll(anyReactor, targets, portNumber))
    finally:
        port.stopListening()
    assert results == {t: b"ping " + t.encode() for t in targets}
    # The clients' sockets are independent: their datagrams may arrive in
    # any order.
    seen = {dst.host: (addr, dst) for addr, dst in proto.seen}
    assert len(proto.seen) == len(targets)
    for target in targets:
        addr, dst = seen[target]
        assert isinstance(addr, PeerAddress)
        assert dst == Destination(target, portNumber, 1, target)
        if interface == "::" and ":" not in target:
            # IPv4 client of a dual-stack socket: mapped peer, plain IPv4 dst.
            assert addr.host == "::ffff:127.0.0.1"


def test_stockTwistedRepliesFromTheWrongAddress(epollReactor: Any) -> None:
    """
    The bug udpdst fixes, shown with the same client: stock
    C{reactor.listenUDP} on 0.0.0.0 answers 127.0.0.1 but its reply to
    127.0.0.2 leaves from 127.0.0.1 and is dropped.
    """
    port = epollReactor.listenUDP(0, PlainEcho(), interface="0.0.0.0")
    assert not isinstance(port, DestinationPort)
    try:
        results = runUntil(
            epollReactor,
            lambda: askAll(
                epollReactor, ["127.0.0.1", "127.0.0.2"], port.getHost().port
            ),
        )
    finally:
        port.stopListening()
    assert results == {"127.0.0.1": b"ping", "127.0.0.2": None}


def test_specificAddress(epollReactor: Any) -> None:
    """
    Bound to one address, the port needs no control data and reports that
    address as every datagram's destination.
    """
    proto = AwareEcho()
    port = udpdst.listenUDP(0, proto, "127.0.0.2", reactor=epollReactor)
    portNumber = port.getHost().port
    try:
        results = runUntil(
            epollReactor, lambda: askAll(epollReactor, ["127.0.0.2"], portNumber)
        )
    finally:
        port.stopListening()
    assert results == {"127.0.0.2": b"ping 127.0.0.2"}
    assert proto.seen[0][1] == Destination("127.0.0.2", portNumber, 0, "127.0.0.2")


@requiresIPv6
def test_dualStackIsExplicit(epollReactor: Any) -> None:
    """
    C{"::"} sets C{IPV6_V6ONLY=0} itself; C{v6Only=True} sets 1 and IPv4
    clients are not served.
    """
    dual = udpdst.listenUDP(0, PlainEcho(), "::", reactor=epollReactor)
    only = udpdst.listenUDP(0, PlainEcho(), "::", reactor=epollReactor, v6Only=True)
    try:
        assert dual.getHandle().getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 0
        assert only.getHandle().getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 1
        results = runUntil(
            epollReactor,
            lambda: askAll(epollReactor, ["127.0.0.2", "::1"], only.getHost().port),
        )
    finally:
        dual.stopListening()
        only.stopListening()
    assert results == {"127.0.0.2": None, "::1": b"ping"}


def test_oversizedDatagramIsCountedNotDelivered(epollReactor: Any) -> None:
    """
    A datagram larger than C{maxPacketSize} is counted and dropped, never
    delivered cut; the next good datagram is delivered whole.
    """
    proto = AwareEcho()
    port = udpdst.listenUDP(
        0, proto, "0.0.0.0", maxPacketSize=100, reactor=epollReactor
    )
    portNumber = port.getHost().port

    @defer.inlineCallbacks
    def run() -> Any:
        big = yield ask(epollReactor, "127.0.0.2", portNumber, b"x" * 101)
        small = yield ask(epollReactor, "127.0.0.2", portNumber, b"y" * 100)
        return big, small

    try:
        big, small = runUntil(epollReactor, run)
    finally:
        port.stopListening()
    assert big is None
    assert small == b"y" * 100 + b" 127.0.0.2"
    assert port.counters.oversized == 1
    assert port.counters.received == 1


def test_controlTruncationIsCountedAndFallsBack(epollReactor: Any) -> None:
    """
    When the control data does not fit (here: a deliberately tiny buffer),
    the datagram is still delivered, with an unknown destination, and
    counted; the reply goes from the kernel's choice.
    """
    proto = AwareEcho()
    port = udpdst.listenUDP(0, proto, "0.0.0.0", reactor=epollReactor)
    port.ancillaryBufferSize = socket.CMSG_SPACE(4)
    try:
        results = runUntil(
            epollReactor,
            lambda: askAll(epollReactor, ["127.0.0.1"], port.getHost().port),
        )
    finally:
        port.stopListening()
    assert results == {"127.0.0.1": b"ping ?"}
    assert proto.seen[0][1] is None
    assert port.counters.controlTruncated == 1


def _queue(port: int, count: int, payload: bytes = b"") -> socket.socket:
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sender.connect(("127.0.0.1", port))
    for _ in range(count):
        sender.send(payload)
    return sender


class Collector(DatagramProtocol):
    def __init__(self) -> None:
        self.got: list[bytes] = []

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        self.got.append(data)


def test_readPassIsBoundedInDatagrams(epollReactor: Any) -> None:
    """
    One read pass handles at most C{maxDatagramsPerRead} datagrams, even
    empty ones (stock Twisted counts only bytes and drains them all).
    """
    proto = Collector()
    port = udpdst.listenUDP(0, proto, "0.0.0.0", reactor=epollReactor)
    port.maxDatagramsPerRead = 10
    sender = _queue(port.getHost().port, 25)
    try:
        port.doRead()
        assert len(proto.got) == 10
        port.doRead()
        assert len(proto.got) == 20
        port.doRead()
        assert len(proto.got) == 25
    finally:
        sender.close()
        port.stopListening()


def test_readPassStopsWhenProtocolStops(epollReactor: Any) -> None:
    """
    A protocol that stops the port, or pauses reading, gets no further
    datagrams from the same read pass.
    """

    class StopAfterOne(Collector):
        def datagramReceived(self, data: bytes, addr: Any) -> None:
            Collector.datagramReceived(self, data, addr)
            self.transport.stopReading()

    proto = StopAfterOne()
    port = udpdst.listenUDP(0, proto, "0.0.0.0", reactor=epollReactor)
    sender = _queue(port.getHost().port, 5, b"d")
    try:
        port.doRead()
        assert proto.got == [b"d"]
        port.startReading()
        port.doRead()
        assert proto.got == [b"d", b"d"]
    finally:
        sender.close()
        port.stopListening()

    class StopListening(Collector):
        def datagramReceived(self, data: bytes, addr: Any) -> None:
            Collector.datagramReceived(self, data, addr)
            self.transport.stopListening()

    proto2 = StopListening()
    port2 = udpdst.listenUDP(0, proto2, "0.0.0.0", reactor=epollReactor)
    sender = _queue(port2.getHost().port, 5, b"e")
    try:
        port2.doRead()
        assert proto2.got == [b"e"]
    finally:
        sender.close()


def test_protocolErrorIsLoggedAndReadingGoesOn(epollReactor: Any) -> None:
    """
    An exception from the protocol is logged; the next datagram is still
    delivered.
    """

    class Fragile(Collector):
        def datagramReceived(self, data: bytes, addr: Any) -> None:
            Collector.datagramReceived(self, data, addr)
            if data == b"bad":
                raise ValueError("boom")

    proto = Fragile()
    port = udpdst.listenUDP(0, proto, "0.0.0.0", reactor=epollReactor)
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sender.connect(("127.0.0.1", port.getHost().port))
    sender.send(b"bad")
    sender.send(b"good")
    try:
        port.doRead()
    finally:
        sender.close()
        port.stopListening()
    assert proto.got == [b"bad", b"good"]


class LateEcho(DatagramProtocol):
    """
    A plain protocol that rebuilds the address tuple and answers later, so
    only the port's peer map can know the destination.
    """

    def __init__(self, reactor: Any, rebuild: bool, delay: float) -> None:
        self.reactor = reactor
        self.rebuild = rebuild
        self.delay = delay

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        target = (addr[0], addr[1]) if self.rebuild else addr
        if self.delay:
            self.reactor.callLater(self.delay, self.transport.write, data, target)
        else:
            self.transport.write(data, target)


@pytest.mark.parametrize("rebuild, delay", [(True, 0), (False, 0.05), (True, 0.05)])
def test_plainProtocolFallbacks(epollReactor: Any, rebuild: bool, delay: float) -> None:
    """
    Replies from the right address also when a plain protocol replies with
    a rebuilt C{(host, port)} tuple (the datagram being dispatched, or the
    peer map) or answers after a delay (the address carries its destination).
    """
    port = udpdst.listenUDP(
        0, LateEcho(epollReactor, rebuild, delay), "0.0.0.0", reactor=epollReactor
    )
    try:
        results = runUntil(
            epollReactor,
            lambda: askAll(
                epollReactor, ["127.0.0.2", "127.0.0.3"], port.getHost().port
            ),
        )
    finally:
        port.stopListening()
    assert results == {"127.0.0.2": b"ping", "127.0.0.3": b"ping"}


def test_peerMapIsBounded(epollReactor: Any) -> None:
    """
    The peer-to-destination map keeps at most C{peerMapSize} peers.
    """
    port = udpdst.listenUDP(0, Collector(), "0.0.0.0", reactor=epollReactor)
    port.peerMapSize = 4
    senders = [_queue(port.getHost().port, 1) for _ in range(10)]
    try:
        port.doRead()
        assert port.counters.received == 10
        assert len(port._peerDestinations) == 4
        assert set(port._peerDestinations) == {s.getsockname() for s in senders[-4:]}
    finally:
        for s in senders:
            s.close()
        port.stopListening()


def test_sendFallbackWhenSourceUnusable(epollReactor: Any) -> None:
    """
    If the source address cannot be used (here: not local at all), the reply
    is sent once more without control data, and counted.
    """
    port = udpdst.listenUDP(0, Collector(), "0.0.0.0", reactor=epollReactor)
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    receiver.bind(("127.0.0.1", 0))
    receiver.settimeout(2)
    try:
        gone = Destination("192.0.2.1", port.getHost().port, 0, "192.0.2.1")
        port.write(b"still", receiver.getsockname(), gone)
        data, source = receiver.recvfrom(100)
    finally:
        receiver.close()
        port.stopListening()
    assert data == b"still"
    assert source == ("127.0.0.1", port.getHost().port)
    assert port.counters.sendFallbacks == 1
    assert port.counters.replied == 1


def test_writeChecksAddresses(epollReactor: Any) -> None:
    """
    Addresses that are not IP literals of the port's family are refused as
    Twisted does; a datagram larger than UDP allows is a MessageLengthError.
    """
    port4 = udpdst.listenUDP(0, Collector(), "0.0.0.0", reactor=epollReactor)
    try:
        with pytest.raises(error.InvalidAddressError):
            port4.write(b"x", ("example.invalid", 1))
        with pytest.raises(error.InvalidAddressError):
            port4.write(b"x", ("::1", 1))
        with pytest.raises(error.MessageLengthError):
            port4.write(b"x" * 70000, ("127.0.0.1", 9))
    finally:
        port4.stopListening()


def test_portInUse(epollReactor: Any) -> None:
    """
    Binding a port in use is a CannotListenError, as in Twisted.
    """
    holder = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    holder.bind(("0.0.0.0", 0))
    try:
        with pytest.raises(error.CannotListenError):
            udpdst.listenUDP(
                holder.getsockname()[1], Collector(), "0.0.0.0", reactor=epollReactor
            )
    finally:
        holder.close()


def test_reusePort(epollReactor: Any) -> None:
    """
    With C{reusePort}, two ports share one port number.
    """
    first = udpdst.listenUDP(
        0, Collector(), "0.0.0.0", reactor=epollReactor, reusePort=True
    )
    try:
        second = udpdst.listenUDP(
            first.getHost().port,
            Collector(),
            "0.0.0.0",
            reactor=epollReactor,
            reusePort=True,
        )
        second.stopListening()
    finally:
        first.stopListening()


@pytest.mark.parametrize("asSocket", [False, True])
def test_adoptDatagramPort(epollReactor: Any, asSocket: bool) -> None:
    """
    An already bound (blocking, as systemd hands it over) dual-stack socket
    is adopted, its options enabled, and replies leave from the right
    address; the caller's own descriptor may be closed.
    """
    family = socket.AF_INET6 if socket.has_ipv6 else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    sock.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", 0))
    proto = AwareEcho()
    port = udpdst.adoptDatagramPort(
        sock if asSocket else sock.fileno(), family, proto, reactor=epollReactor
    )
    sock.close()
    assert isinstance(port, DestinationPort)
    try:
        results = runUntil(
            epollReactor,
            lambda: askAll(epollReactor, ["127.0.0.3"], port.getHost().port),
        )
    finally:
        port.stopListening()
    assert results == {"127.0.0.3": b"ping 127.0.0.3"}


def test_adoptRejectsOtherFamilies(epollReactor: Any) -> None:
    with pytest.raises(error.UnsupportedAddressFamily):
        udpdst.adoptDatagramPort(0, socket.AF_UNIX, Collector(), reactor=epollReactor)


def test_patchReactor(epollReactor: Any) -> None:
    """
    C{patchReactor} makes the reactor's own C{listenUDP} build our port, until
    undone.
    """
    undo = udpdst.patchReactor(epollReactor)
    port = epollReactor.listenUDP(0, PlainEcho(), interface="0.0.0.0")
    try:
        assert isinstance(port, DestinationPort)
        results = runUntil(
            epollReactor,
            lambda: askAll(epollReactor, ["127.0.0.2"], port.getHost().port),
        )
    finally:
        port.stopListening()
        undo()
    assert results == {"127.0.0.2": b"ping"}
    plain = epollReactor.listenUDP(0, PlainEcho())
    assert not isinstance(plain, DestinationPort)
    plain.stopListening()


def test_peerAddressIsATuple() -> None:
    """
    A L{PeerAddress} equals, hashes and pickles like the plain tuple, and
    keeps its destination through a pickle round trip.
    """
    dst = Destination("127.0.0.2", 53, 1, "127.0.0.2")
    peer = PeerAddress("127.0.0.1", 4000, dst)
    assert peer == ("127.0.0.1", 4000)
    assert hash(peer) == hash(("127.0.0.1", 4000))
    assert {("127.0.0.1", 4000): 1}[peer] == 1
    host, port = peer
    assert (host, port) == (peer.host, peer.port)
    assert repr(peer) == "('127.0.0.1', 4000)"
    again = pickle.loads(pickle.dumps(peer))
    assert again == peer and again.destination == dst
    with pytest.raises(AttributeError):
        dst.host = "x"  # type: ignore[misc]
    assert str(dst) == "127.0.0.2:53"
    assert str(Destination("::1", 53)) == "[::1]:53"


def test_kernelDropsAreCounted(epollReactor: Any) -> None:
    """
    Datagrams the kernel dropped because the receive buffer was full show up
    in C{counters.kernelDrops} (from C{SO_RXQ_OVFL}), consistent with what
    was sent and read.  The kernel stamps the count on a datagram when it is
    queued, so it shows with the first datagram queued after the drops.
    """
    proto = Collector()
    port = udpdst.listenUDP(
        0, proto, "0.0.0.0", reactor=epollReactor, receiveBufferSize=4096
    )
    sent = 200
    sender = _queue(port.getHost().port, sent, b"z" * 512)

    def drain() -> None:
        while True:
            before = len(proto.got)
            port.doRead()
            if len(proto.got) == before:
                return

    try:
        drain()
        survived = len(proto.got)
        assert port.counters.kernelDrops == 0
        sender.send(b"after")
        drain()
    finally:
        sender.close()
        port.stopListening()
    assert 0 < survived < sent
    assert proto.got[-1] == b"after"
    assert port.counters.kernelDrops == sent - survived


@pytest.mark.parametrize(
    "interface",
    [
        "127.0.0.1",
        "0.0.0.0",
        pytest.param("::1", marks=requiresIPv6),
        pytest.param("::", marks=requiresIPv6),
    ],
)
def test_everyDropIsCountedOnEverySocket(epollReactor: Any, interface: str) -> None:
    """
    On a socket bound to one address as on a wildcard one, C{kernelDrops}
    agrees with the kernel's own count (C{/proc/net/udp}'s C{drops} column and
    C{SO_MEMINFO}): at once through C{refreshCounters}, before any datagram
    has reported the drops; from C{SO_RXQ_OVFL} alone as datagrams are read;
    and when the port closes.  The figure never goes back, though the
    datagrams read after a refresh carry older counts.
    """
    proto = Collector()
    port = udpdst.listenUDP(
        0, proto, interface, reactor=epollReactor, receiveBufferSize=4096
    )
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(interface, interface)
    target = (host, port.getHost().port)
    sender = socket.socket(
        socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM
    )
    server = port.socket

    def drain() -> None:
        while True:
            before = len(proto.got)
            port.doRead()
            if len(proto.got) == before:
                return

    sent = 200
    try:
        flood(sender, target, sent, b"z" * 512, lambda: memInfo(server))
        first = rowOf(server).drops
        assert 0 < first < sent
        # Not one datagram has reported them yet.
        assert port.counters.kernelDrops == 0
        assert port.refreshCounters().kernelDrops == first == memInfo(server)[1]
        drain()
        assert len(proto.got) == sent - first
        assert port.counters.kernelDrops == first
        # Overflow again; now only SO_RXQ_OVFL tells: the survivors were
        # queued before the drops, the next datagram after them.
        flood(sender, target, sent, b"z" * 512, lambda: memInfo(server))
        second = rowOf(server).drops
        assert second > first
        drain()
        assert port.counters.kernelDrops == first
        flood(sender, target, 1, b"after", lambda: memInfo(server))
        drain()
        assert proto.got[-1] == b"after"
        assert port.counters.kernelDrops == second == memInfo(server)[1]
        # Drops no datagram reports, counted when the port closes.
        flood(sender, target, sent, b"z" * 512, lambda: memInfo(server))
        third = rowOf(server).drops
        assert third > second
    finally:
        sender.close()
        runUntil(epollReactor, port.stopListening)
    assert port.counters.kernelDrops == third
    assert port.counters.received == len(proto.got)


def test_floodOfBadDatagramsLogsSparsely(epollReactor: Any) -> None:
    """
    Per-datagram trouble (here 20 oversized datagrams) is counted each time
    but logged only for the 1st, 2nd, 4th, 8th, 16th...: a flood cannot
    flood the log.
    """
    from twisted.logger import globalLogPublisher

    events: list[dict[str, Any]] = []

    def observe(event: dict[str, Any]) -> None:
        if "maxPacketSize" in event.get("log_format", ""):
            events.append(event)

    port = udpdst.listenUDP(
        0, Collector(), "0.0.0.0", maxPacketSize=10, reactor=epollReactor
    )
    sender = _queue(port.getHost().port, 20, b"x" * 11)
    globalLogPublisher.addObserver(observe)
    try:
        port.doRead()
    finally:
        globalLogPublisher.removeObserver(observe)
        sender.close()
        port.stopListening()
    assert port.counters.oversized == 20
    assert [e["count"] for e in events] == [1, 2, 4, 8, 16]


@requiresIPv6
def test_scopedAddressWithUnknownInterface(epollReactor: Any) -> None:
    """
    A scoped IPv6 address naming no interface is an InvalidAddressError, not
    a send to the wrong link.
    """
    port = udpdst.listenUDP(0, Collector(), "::", reactor=epollReactor)
    try:
        with pytest.raises(error.InvalidAddressError):
            port.write(b"x", ("fe80::1%udpdst-none", 9))
    finally:
        port.stopListening()

"""
Test helpers for authors of protocols that run on udpdst's ports: a fake
destination-aware transport, and the peer addresses a real port delivers, so
a protocol is tested without sockets.

    transport = FakeDestinationTransport(MyProtocol())
    transport.deliver(b"ping", peer("10.0.0.5", 40000, "10.1.2.3:53"))
    assert transport.written == [
        (b"pong", ("10.0.0.5", 40000), Destination("10.1.2.3", 53, 0, "10.1.2.3"))
    ]
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Any

from twisted.internet import defer, error
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IListeningPort, IReactorFDSet
from zope.interface import implementer

from udpdst._memory import isMemoryReactor  # noqa: F401 - part of this module's API
from udpdst.address import Destination, PeerAddress, interfaceIndex, splitHostPort
from udpdst.interfaces import IDestinationDatagramProtocol, IDestinationTransport
from udpdst.port import DestinationPort
from udpdst.protocol import AnyDatagramProtocol, asTwistedProtocol

_LIMITED_BROADCAST = ipaddress.IPv4Address("255.255.255.255")


def _unicastDestination(text: str) -> Destination:
    """
    The L{Destination} a real port reports for a unicast datagram sent to
    C{text} (C{"10.1.2.3:53"}, C{"[2001:db8::3]:53"}, C{"[fe80::1%eth0]:53"}).

    @raise ValueError: C{text} is not C{ADDRESS:PORT}, names a broadcast or
        multicast address, or a zone that is no interface here.
    """
    host, portText = splitHostPort(text)
    if not portText.isdigit() or not 0 < int(portText) < 65536:
        raise ValueError(f"{text!r} is not ADDRESS:PORT (a port from 1 to 65535)")
    bare, _, zone = host.partition("%")
    try:
        ip = ipaddress.ip_address(bare)
    except ValueError:
        raise ValueError(f"{text!r}: {bare!r} is not an IP address") from None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        # A dual-stack port reports IPv4 destinations in dotted form.
        ip = ip.ipv4_mapped
    if ip.is_multicast or ip == _LIMITED_BROADCAST:
        raise ValueError(
            f"{text!r} is a multicast or broadcast address, whose reply "
            "source only the kernel knows: build a Destination(host, port, "
            "ifindex, replyFrom) instead"
        )
    ifindex = 0
    if zone:
        if ip.version == 4:
            raise ValueError(f"{text!r}: IPv4 addresses have no zone")
        try:
            ifindex = interfaceIndex(zone)
        except OSError:
            raise ValueError(
                f"{text!r}: no interface named {zone!r} here; give its "
                "index instead ([fe80::1%2]:53)"
            ) from None
    return Destination(str(ip), int(portText), ifindex, str(ip))


def peer(host: str, port: int, dst: Destination | str | None = None) -> PeerAddress:
    """
    The peer address a real port delivers for a datagram from C{(host,
    port)} to C{dst}.

    @param host: The peer's address as text; IPv4 peers of a dual-stack port
        are C{"::ffff:a.b.c.d"}, link-local ones keep their zone
        (C{"fe80::5%eth0"}).
    @param dst: Where the datagram went: a L{Destination}, or unicast text
        (C{"10.1.2.3:12345"}, C{"[2001:db8::3]:53"}, C{"[fe80::1%eth0]:53"})
        from which the destination a real port reports is built, with
        C{replyFrom} equal to the host and C{ifindex} from the zone (else
        C{0}).  Broadcast and multicast destinations are given as
        L{Destination} values, e.g. C{Destination("255.255.255.255", 67, 2,
        "10.1.2.2")} (C{replyFrom}: a unicast address of the receiving
        interface) or C{Destination("ff02::1:2", 547, 2, "::")}.
    @raise ValueError: C{dst} is text that a real port would never report.
    """
    if isinstance(dst, str):
        dst = _unicastDestination(dst)
    return PeerAddress(host, port, dst)


@implementer(IDestinationTransport, IListeningPort)
class FakeDestinationTransport(DestinationPort):
    """
    A L{DestinationPort} with no socket, for testing protocols: it records
    what is written instead of sending it.

    Connected to a protocol (given here, or by L{startListening}), the
    protocol gets C{makeConnection} and C{startProtocol} as from a real port;
    L{deliver} then hands it datagrams the way a real port does.

    @ivar written: C{(data, addr, dst)} per datagram written, in order; C{dst}
        is what a real port replies from: the explicit C{dst}, else the
        L{Destination} a L{PeerAddress} carries, else L{None} (the kernel's
        choice).
    @ivar stopCalls: The names of the stopping methods called
        (C{"stopListening"}, C{"loseConnection"}), in order.
    @ivar counters: The L{udpdst.port.PortCounters}: C{received} counts
        delivered datagrams, C{replied} written ones, C{sendErrors} writes
        that raised.
    """

    def __init__(
        self,
        protocol: AnyDatagramProtocol | None = None,
        *,
        port: int = 12345,
        interface: str = "",
        maxPacketSize: int = 8192,
        reactor: IReactorFDSet | None = None,
        **options: Any,
    ) -> None:
        """
        @param protocol: If given, connected at once.
        @param port: The port number L{getHost} reports.
        @param interface: The address the port pretends to be bound to; it
            decides the family that L{write} accepts, as on a real port.
        @param reactor: Kept for the protocol to find; a
            L{twisted.internet.testing.MemoryReactor} if L{None}, so that no
            global reactor is installed.
        @param options: The port's keyword options, kept as on a real port
            (see L{DestinationPort.__init__}).
        """
        if reactor is None:
            from twisted.internet.testing import MemoryReactor

            reactor = MemoryReactor()
        DestinationPort.__init__(
            self,
            port,
            asTwistedProtocol(protocol),  # type: ignore[arg-type]
            interface,
            maxPacketSize,
            reactor,
            **options,
        )
        self.written: list[tuple[bytes, tuple[str, int], Destination | None]] = []
        self.stopCalls: list[str] = []
        self._broadcastAllowed = False
        if protocol is not None:
            self.startListening()

    def startListening(self) -> None:
        """
        Connect the protocol, as a real port does once bound.
        """
        if self.connected:
            return
        self.connected = 1
        self._realPortNumber = self.port
        self._destinationAware = IDestinationDatagramProtocol.providedBy(self.protocol)
        self.protocol.makeConnection(self)

    def deliver(self, data: bytes, addr: tuple[str, int]) -> None:
        """
        Hand the protocol a datagram as a real port does: C{datagramReceived(
        data, addr, dst)} to a destination-aware protocol, with C{dst} the
        one C{addr} carries, else C{datagramReceived(data, addr)}.

        @param addr: Usually a L{peer}.
        """
        if not self.connected:
            raise RuntimeError("deliver() on a transport with no protocol connected")
        self.counters.received += 1
        if self._destinationAware:
            self.protocol.datagramReceived(
                data, addr, getattr(addr, "destination", None)
            )
        else:
            self.protocol.datagramReceived(data, addr)

    def write(
        self,
        datagram: bytes,
        addr: tuple[str, int] | None = None,
        dst: Destination | None = None,
    ) -> None:
        """
        Record a datagram; raise what a real port raises for a missing,
        malformed or wrong-family address.
        """
        if addr is None:
            addr = self._connectedAddr
        try:
            if addr is None:
                raise error.InvalidAddressError(None, "write() needs an address")
            if type(addr) is not PeerAddress:
                self._checkAddress(addr)
        except error.InvalidAddressError:
            self.counters.sendErrors += 1
            raise
        if dst is None:
            dst = getattr(addr, "destination", None)
        self.written.append((bytes(datagram), addr, dst))
        self.counters.replied += 1

    def connect(self, host: str, port: int) -> None:
        if self._connectedAddr:
            raise RuntimeError(
                "already connected, reconnecting is not currently supported"
            )
        self._connectedAddr = (host, port)

    def getHost(self) -> IPv4Address | IPv6Address:
        if self.addressFamily == socket.AF_INET6:
            return IPv6Address("UDP", self.interface, self.port)
        return IPv4Address("UDP", self.interface or "0.0.0.0", self.port)

    def setBroadcastAllowed(self, enabled: bool) -> None:
        self._broadcastAllowed = bool(enabled)

    def getBroadcastAllowed(self) -> bool:
        return self._broadcastAllowed

    def startReading(self) -> None:
        self._outbox.reading = True

    def stopReading(self) -> None:
        self._outbox.reading = False

    def stopListening(self) -> defer.Deferred[None]:
        """
        Record the call; stop the protocol (C{stopProtocol}) if it was
        connected.

        @return: An already fired Deferred.
        """
        self.stopCalls.append("stopListening")
        self._stop()
        return defer.succeed(None)

    def loseConnection(self) -> None:
        self.stopCalls.append("loseConnection")
        self._stop()

    def _stop(self) -> None:
        if self.connected:
            self.connected = 0
            self._realPortNumber = None
            self.protocol.doStop()

    def logPrefix(self) -> str:
        return "FakeDestinationTransport"

    def fileno(self) -> int:
        return -1

    def doRead(self) -> None:
        pass

"""
A Twisted UDP port that knows where each datagram was sent to and replies
from there.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

from twisted.internet import error, udp
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.interfaces import IReactorFDSet
from twisted.internet.protocol import AbstractDatagramProtocol
from twisted.logger import Logger
from zope.interface import implementer

from udpdst import _linux as L
from udpdst.address import Destination, PeerAddress
from udpdst.cmsg import (
    enable_destination_options,
    is_link_local_v6,
    parse_destination,
    reply_control,
)
from udpdst.interfaces import IDestinationDatagramProtocol, IDestinationTransport

_WILDCARDS = frozenset({"", "0.0.0.0", "::"})

# A send whose chosen source address is gone (removed, or IPv6 still
# tentative) fails with one of these; the reply then goes without control data.
_SOURCE_VANISHED = frozenset({errno.EINVAL, errno.EADDRNOTAVAIL, errno.ENETUNREACH})

_READ_IGNORE = frozenset(udp._sockErrReadIgnore)
_READ_REFUSE = frozenset(udp._sockErrReadRefuse)


@dataclass(slots=True)
class PortCounters:
    """
    What a L{DestinationPort} has seen, for the service layer's stats.

    @ivar received: Datagrams read from the socket (truncated ones included).
    @ivar replied: Datagrams sent through C{write}.
    @ivar sendFallbacks: Sends retried without control data because the
        source address could not be used (it vanished, or is tentative).
    @ivar truncated: Datagrams larger than C{maxPacketSize}, dropped.
    @ivar controlTruncated: Datagrams whose control data did not fit; they
        were delivered with an unknown destination.
    @ivar kernelDrops: Datagrams the kernel dropped on this socket (receive
        buffer full), as last reported by C{SO_RXQ_OVFL}.  The kernel stamps
        the count on a datagram as it queues it, so drops show with the next
        datagram that gets through.
    """

    received: int = 0
    replied: int = 0
    sendFallbacks: int = 0
    truncated: int = 0
    controlTruncated: int = 0
    kernelDrops: int = 0

    def asDict(self) -> dict[str, int]:
        return asdict(self)


def _sparse(count: int) -> bool:
    """
    Whether the C{count}th occurrence of a per-datagram event is logged: the
    1st, 2nd, 4th, 8th...  A remote flood then costs log2(n) lines, not n
    (twistd shows debug events by default).
    """
    return count & (count - 1) == 0


# Interface names and indexes, both ways; renamed interfaces are rare enough
# that these small caches are not invalidated.
_scopeNames: dict[int, str] = {}
_scopeIndexes: dict[str, int] = {}


def _scopedHost(host: str, scope: int) -> str:
    """
    C{host} with its zone (C{"fe80::5%eth0"}), which C{sendmsg} accepts and
    Twisted's address checks allow.
    """
    name = _scopeNames.get(scope)
    if name is None:
        try:
            name = socket.if_indextoname(scope)
        except OSError:
            name = str(scope)
        if len(_scopeNames) < 1024:
            _scopeNames[scope] = name
    return f"{host}%{name}"


def _sockaddr(addr: tuple[str, int]) -> Any:
    """
    The address to give C{sendto}/C{sendmsg}: a scoped IPv6 host
    (C{"fe80::5%eth0"}) becomes C{(host, port, 0, ifindex)}, because Python
    takes the scope only from a 4-tuple and ignores the zone in the text.
    """
    host = addr[0]
    if "%" not in host or len(addr) != 2:
        return addr
    bare, zone = host.split("%", 1)
    scope = _scopeIndexes.get(zone)
    if scope is None:
        if zone.isdigit():
            scope = int(zone)
        else:
            try:
                scope = socket.if_nametoindex(zone)
            except OSError:
                raise error.InvalidAddressError(host, "no such interface") from None
            if len(_scopeIndexes) < 1024:
                _scopeIndexes[zone] = scope
    return (bare, addr[1], 0, scope)


@implementer(IDestinationTransport)
class DestinationPort(udp.Port):
    """
    A L{udp.Port} whose wildcard socket reports each datagram's destination
    (C{IP_PKTINFO}, C{IPV6_RECVPKTINFO}, C{*_ORIGDSTADDR}) and names the
    source of each reply, so replies leave from the address the client used.

    Runs on any L{IReactorFDSet} reactor.  Protocols providing
    L{IDestinationDatagramProtocol} get C{datagramReceived(data, addr, dst)};
    others get C{datagramReceived(data, addr)} with an C{addr} that carries
    the destination, so their C{transport.write(data, addr)} replies from it.

    @ivar counters: The L{PortCounters}.
    @ivar maxDatagramsPerRead: The most datagrams one C{doRead} handles before
        it yields to the reactor (also bounded by C{maxThroughput} bytes).
    @ivar peerMapSize: How many peers' last destinations are remembered for
        plain protocols that reply later to an address they rebuilt.
    @ivar ancillaryBufferSize: Room for control data per datagram; sized for
        every message that can arrive together.
    """

    maxDatagramsPerRead = 256
    peerMapSize = 8192
    ancillaryBufferSize = L.ANCILLARY_BUFFER_SIZE
    _log = Logger()

    def __init__(
        self,
        port: int,
        proto: AbstractDatagramProtocol,
        interface: str = "",
        maxPacketSize: int = 8192,
        reactor: IReactorFDSet | None = None,
        *,
        reusePort: bool = False,
        receiveBufferSize: int | None = None,
        v6Only: bool = False,
    ) -> None:
        """
        @param port: The port number to bind; C{0} for any.
        @param proto: The protocol to connect.
        @param interface: The address to bind: C{""} or C{"0.0.0.0"} for all
            IPv4 addresses, C{"::"} for all IPv6 and (unless C{v6Only}) IPv4
            addresses, or one address.
        @param maxPacketSize: The largest datagram delivered; larger ones are
            counted in C{counters.truncated} and dropped.
        @param reactor: The reactor; the global one if L{None}.
        @param reusePort: Set C{SO_REUSEPORT}, so several processes can share
            the port.
        @param receiveBufferSize: C{SO_RCVBUF} in bytes, if given.
        @param v6Only: With C{"::"}, serve IPv6 only.
        """
        udp.Port.__init__(self, port, proto, interface, maxPacketSize, reactor)
        self.reusePort = reusePort
        self.receiveBufferSize = receiveBufferSize
        self.v6Only = v6Only
        self.counters = PortCounters()
        self._wildcard = False
        self._fixedDestination: Destination | None = None
        self._reading = False
        self._destinations: dict[
            tuple[Any, ...], tuple[Destination | None, int | None]
        ] = {}
        self._replyControls: dict[
            tuple[Destination, bool], list[tuple[int, int, bytes]]
        ] = {}
        self._peerDestinations: dict[tuple[str, int], Destination] = {}
        self._dispatchPeer: tuple[str, int] | None = None
        self._dispatchDestination: Destination | None = None
        self._destinationAware = False
        self._family6 = False

    def __repr__(self) -> str:
        if self._realPortNumber is not None:
            return (
                f"<{self.__class__.__name__} {self.protocol.__class__.__name__}"
                f" on {self.interface or '0.0.0.0'}:{self._realPortNumber}>"
            )
        return f"<{self.__class__.__name__} {self.protocol.__class__.__name__} not listening>"

    # Socket set-up

    def createInternetSocket(self) -> socket.socket:
        skt: socket.socket = udp.Port.createInternetSocket(self)
        if self.addressFamily == socket.AF_INET6 and self.interface == "::":
            # Dual-stack unless asked otherwise; never left to the sysctl.
            skt.setsockopt(L.SOL_IPV6, L.IPV6_V6ONLY, int(self.v6Only))
        if self.reusePort:
            skt.setsockopt(socket.SOL_SOCKET, L.SO_REUSEPORT, 1)
        if self.receiveBufferSize:
            skt.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.receiveBufferSize)
        return skt

    def _bindSocket(self) -> None:
        udp.Port._bindSocket(self)
        sockname = self.socket.getsockname()
        host = sockname[0]
        self._family6 = self.socket.family == socket.AF_INET6
        if host in _WILDCARDS:
            self._wildcard = True
            refused = enable_destination_options(self.socket)
            if refused:
                self._log.warn(
                    "{port}: the kernel refused {options}; replies may leave "
                    "from the wrong address",
                    port=self,
                    options=", ".join(refused),
                )
        else:
            # Bound to one address: every datagram went there and every
            # reply leaves from it, with no control data needed.
            ifindex = sockname[3] if len(sockname) > 3 else 0
            self._fixedDestination = Destination(host, sockname[1], ifindex, host)

    def _connectToProtocol(self) -> None:
        self._destinationAware = IDestinationDatagramProtocol.providedBy(self.protocol)
        udp.Port._connectToProtocol(self)

    def startReading(self) -> None:
        self._reading = True
        udp.Port.startReading(self)

    def stopReading(self) -> None:
        self._reading = False
        udp.Port.stopReading(self)

    # Reading

    def doRead(self) -> None:
        """
        Read what is queued, up to C{maxDatagramsPerRead} datagrams or
        C{maxThroughput} bytes, and stop at once when the protocol stops
        reading or stops the port.
        """
        recvmsg = self.socket.recvmsg
        size = self.maxPacketSize
        counters = self.counters
        family6 = self._family6
        wildcard = self._wildcard
        fixed = self._fixedDestination
        cache = self._destinations
        boundPort = self._realPortNumber or 0
        deliver = (
            self.protocol.datagramReceived
            if self._destinationAware
            else self._deliverPlain
        )
        ancSize = self.ancillaryBufferSize if wildcard else 0
        budget = self.maxThroughput
        remaining = self.maxDatagramsPerRead
        while remaining > 0 and budget > 0 and self._reading:
            remaining -= 1
            try:
                data, ancdata, flags, addr = recvmsg(size, ancSize)
            except OSError as se:
                no = se.args[0]
                if no in _READ_IGNORE:
                    return
                if no in _READ_REFUSE:
                    if self._connectedAddr:
                        self.protocol.connectionRefused()
                    return
                raise
            budget -= len(data) + 64
            counters.received += 1
            if flags & L.MSG_TRUNC:
                counters.truncated += 1
                if _sparse(counters.truncated):
                    self._log.debug(
                        "{port}: dropped a datagram from {peer} larger than "
                        "maxPacketSize={size} ({count} so far)",
                        port=self,
                        peer=addr,
                        size=size,
                        count=counters.truncated,
                    )
                continue
            if not wildcard:
                dst = fixed
            elif flags & L.MSG_CTRUNC:
                counters.controlTruncated += 1
                dst = None
            else:
                key = tuple(ancdata)
                parsed = cache.get(key)
                if parsed is None:
                    parsed = parse_destination(ancdata, boundPort)
                    if len(cache) >= 4096:
                        cache.clear()
                    cache[key] = parsed
                dst, drops = parsed
                if drops is not None:
                    counters.kernelDrops = drops
            if family6:
                host, peerPort, _flow, scope = addr
                if scope:
                    host = _scopedHost(host, scope)
                peer = PeerAddress(host, peerPort, dst)
            else:
                peer = PeerAddress(addr[0], addr[1], dst)
            try:
                deliver(data, peer, dst)
            except BaseException:
                self._log.failure(
                    "{port}: {protocol} failed on a datagram from {peer}",
                    port=self,
                    protocol=self.protocol,
                    peer=peer,
                )

    def _deliverPlain(
        self, data: bytes, peer: PeerAddress, dst: Destination | None
    ) -> None:
        if dst is not None and self._wildcard:
            peers = self._peerDestinations
            if len(peers) >= self.peerMapSize and peer not in peers:
                # Evict the oldest entry: memory stays bounded under a flood
                # of sources, and active peers are re-added on their next
                # datagram.
                del peers[next(iter(peers))]
            peers[peer] = dst
        self._dispatchPeer = peer
        self._dispatchDestination = dst
        try:
            self.protocol.datagramReceived(data, peer)
        finally:
            self._dispatchPeer = None
            self._dispatchDestination = None

    # Writing

    def write(  # type: ignore[override]
        self,
        datagram: bytes,
        addr: tuple[str, int] | None = None,
        dst: Destination | None = None,
    ) -> None:
        """
        Send a datagram; see L{IDestinationTransport.write}.
        """
        if self._connectedAddr:
            return udp.Port.write(self, datagram, addr)  # type: ignore[no-any-return]
        if addr is None:
            raise error.InvalidAddressError(None, "write() needs an address")
        if type(addr) is not PeerAddress:
            self._checkAddress(addr)
        control: list[tuple[int, int, bytes]] = []
        if self._wildcard:
            if dst is None:
                dst = self._destinationFor(addr)
            if dst is not None:
                host = addr[0]
                key = (dst, self._family6 and is_link_local_v6(host))
                cached = self._replyControls.get(key)
                if cached is None:
                    cached = reply_control(self.addressFamily, dst, host)
                    if len(self._replyControls) >= 4096:
                        self._replyControls.clear()
                    self._replyControls[key] = cached
                control = cached
        self._send(datagram, addr, control)

    def _destinationFor(self, addr: tuple[str, int]) -> Destination | None:
        """
        The destination a reply to C{addr} should leave from, when the caller
        named none: the one C{addr} carries, the one of the datagram being
        dispatched from that peer, or the last one that peer sent to.
        """
        carried = getattr(addr, "destination", None)
        if carried is not None:
            return carried  # type: ignore[no-any-return]
        if self._dispatchPeer is not None and addr == self._dispatchPeer:
            return self._dispatchDestination
        return self._peerDestinations.get(addr)  # type: ignore[call-overload,no-any-return]

    def _checkAddress(self, addr: tuple[str, int]) -> None:
        host = addr[0]
        v4 = isIPAddress(host) or host == "<broadcast>"
        if not v4 and not isIPv6Address(host):
            raise error.InvalidAddressError(
                host, "write() only accepts IP addresses, not hostnames"
            )
        if v4 and self.addressFamily == socket.AF_INET6:
            raise error.InvalidAddressError(
                host, "IPv6 port write() called with IPv4 or broadcast address"
            )
        if not v4 and self.addressFamily == socket.AF_INET:
            raise error.InvalidAddressError(
                host, "IPv4 port write() called with IPv6 address"
            )

    def _send(
        self,
        datagram: bytes,
        addr: tuple[str, int],
        control: list[tuple[int, int, bytes]],
    ) -> None:
        target = _sockaddr(addr)
        while True:
            try:
                if control:
                    self.socket.sendmsg((datagram,), control, 0, target)
                else:
                    self.socket.sendto(datagram, target)
            except OSError as se:
                no = se.args[0]
                if no == errno.EINTR:
                    continue
                if no == errno.EMSGSIZE:
                    raise error.MessageLengthError("message too long") from se
                if no == errno.ECONNREFUSED:
                    # An ICMP error from an earlier datagram; not this one's.
                    return
                if control and no in _SOURCE_VANISHED:
                    self.counters.sendFallbacks += 1
                    if _sparse(self.counters.sendFallbacks):
                        self._log.debug(
                            "{port}: could not send from {control!r} to {peer} "
                            "({error}); sent from the kernel's choice "
                            "({count} so far)",
                            port=self,
                            control=control,
                            peer=addr,
                            error=errno.errorcode.get(no, no),
                            count=self.counters.sendFallbacks,
                        )
                    control = []
                    continue
                raise
            self.counters.replied += 1
            return

    def writeSequence(  # type: ignore[override]
        self,
        seq: Iterable[bytes],
        addr: tuple[str, int] | None = None,
        dst: Destination | None = None,
    ) -> None:
        self.write(b"".join(seq), addr, dst)

    def connectionLost(self, reason: Any = None) -> None:
        self._reading = False
        self._destinations.clear()
        self._replyControls.clear()
        self._peerDestinations.clear()
        udp.Port.connectionLost(self, reason)

"""
A destination-aware multicast port, IPv4 and IPv6: the counterpart of
C{reactor.listenMulticast}, whose replies to a datagram sent to a group leave
from a unicast address of the interface it arrived on.
"""

from __future__ import annotations

import socket
import struct
from typing import Any

from twisted.internet import defer, error
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.interfaces import (
    IMulticastTransport,
    IReactorCore,
    IReactorFDSet,
)
from zope.interface import implementer

from udpdst import _linux as L
from udpdst._memory import isMemoryReactor
from udpdst.address import interfaceIndex
from udpdst.port import DestinationPort
from udpdst.protocol import AnyDatagramProtocol, asTwistedProtocol

_IP_MREQN = struct.Struct("=4s4si")  # group, local address, ifindex
_IPV6_MREQ = struct.Struct("=16sI")  # group, ifindex
_V4_ANY = b"\0\0\0\0"


def _interfaceIndex(interface: str | int) -> int | None:
    """
    The index of an interface given by index or name (C{2}, C{"2"},
    C{"eth0"}), or by a local IPv6 address (C{"fd00::2"},
    C{"fe80::2%eth0"}); L{None} if C{interface} is none of these here.
    """
    if isinstance(interface, int):
        return interface
    host, _, zone = interface.partition("%")
    if not zone and isIPv6Address(host):
        return _indexOfAddress(host)
    try:
        return interfaceIndex(zone or interface)
    except OSError:
        return None


def _indexOfAddress(host: str) -> int | None:
    """
    The index of the interface that has the IPv6 address C{host}, from
    C{/proc/net/if_inet6} (the standard library has no C{getifaddrs}).
    """
    wanted = socket.inet_pton(socket.AF_INET6, host).hex()
    try:
        with open("/proc/net/if_inet6") as table:
            for line in table:
                fields = line.split()
                if len(fields) >= 2 and fields[0] == wanted:
                    return int(fields[1], 16)
    except OSError:
        pass
    return None


@implementer(IMulticastTransport)
class DestinationMulticastPort(DestinationPort):
    """
    A L{DestinationPort} with Twisted's L{IMulticastTransport}, for IPv4 and
    IPv6 groups.

    A port on C{"::"} serves both families (Twisted's joins IPv6 groups
    only): it joins IPv4 groups with C{IP_ADD_MEMBERSHIP} and IPv6 groups
    with C{IPV6_JOIN_GROUP}, and sets the TTL and loopback mode for both.
    Interfaces are given as Twisted does for IPv4 (a local address, or a
    host name resolved through the reactor), or by name or index
    (C{"eth0"}, C{2}), or, for IPv6, by a local address (C{"fe80::2%eth0"}).
    """

    def __init__(
        self,
        port: int,
        proto: AnyDatagramProtocol,
        interface: str = "",
        maxPacketSize: int = 8192,
        reactor: IReactorFDSet | None = None,
        listenMultiple: bool = False,
        **options: Any,
    ) -> None:
        """
        As L{DestinationPort.__init__}, and:

        @param listenMultiple: Let other sockets bind the same port
            (C{SO_REUSEADDR}, C{SO_REUSEPORT}), as Twisted's does.
        """
        DestinationPort.__init__(
            self,
            port,
            asTwistedProtocol(proto),
            interface,
            maxPacketSize,
            reactor,
            **options,
        )
        self.listenMultiple = listenMultiple

    def createInternetSocket(self) -> socket.socket:
        skt = DestinationPort.createInternetSocket(self)
        if self.listenMultiple:
            skt.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            skt.setsockopt(socket.SOL_SOCKET, L.SO_REUSEPORT, 1)
        return skt

    def _levels(self) -> list[tuple[int, int, int]]:
        """
        C{(level, TTL option, loopback option)} for each family this socket
        sends: IPv4; IPv6; or both for a dual-stack socket.
        """
        v4 = (L.SOL_IP, socket.IP_MULTICAST_TTL, socket.IP_MULTICAST_LOOP)
        v6 = (L.SOL_IPV6, socket.IPV6_MULTICAST_HOPS, socket.IPV6_MULTICAST_LOOP)
        if self.addressFamily == socket.AF_INET:
            return [v4]
        if self.socket.getsockopt(L.SOL_IPV6, L.IPV6_V6ONLY):
            return [v6]
        return [v6, v4]

    # IMulticastTransport

    def getTTL(self) -> int:
        level, ttl, _ = self._levels()[0]
        return self.socket.getsockopt(level, ttl)

    def setTTL(self, ttl: int) -> None:
        """
        Set the TTL (IPv4) and hop limit (IPv6) of datagrams sent to groups.
        """
        for level, option, _ in self._levels():
            self.socket.setsockopt(level, option, ttl)

    def getLoopbackMode(self) -> bool:
        level, _, loop = self._levels()[0]
        return bool(self.socket.getsockopt(level, loop))

    def setLoopbackMode(self, mode: int) -> None:
        """
        Whether datagrams sent to a group are delivered to this host's
        members too.
        """
        for level, _, option in self._levels():
            self.socket.setsockopt(level, option, int(bool(mode)))

    def getOutgoingInterface(self) -> str | int:
        """
        The interface datagrams to groups leave by: its address on an IPv4
        port (as Twisted's), its index on an IPv6 port (C{0}: by route).
        """
        if self.addressFamily == socket.AF_INET:
            packed = self.socket.getsockopt(L.SOL_IP, socket.IP_MULTICAST_IF, 4)
            return socket.inet_ntoa(packed)
        return int(self.socket.getsockopt(L.SOL_IPV6, socket.IPV6_MULTICAST_IF))

    def setOutgoingInterface(self, addr: str | int) -> defer.Deferred[int]:
        """
        Send datagrams to groups out of the interface C{addr}: its IPv4
        address or a host name that resolves to it (as in Twisted), its name
        or index, or (not on an IPv4 port) one of its IPv6 addresses.

        @return: A Deferred that fires with C{1}; or fails with
            L{error.MulticastJoinError} if C{addr} names no interface this
            port can use, with the resolver's error (C{DNSLookupError}) if a
            host name does not resolve, or with the kernel's L{OSError} if
            it refuses the interface, as Twisted's port does.
        """
        return defer.Deferred.fromCoroutine(self._setOutgoingInterface(addr))

    async def _setOutgoingInterface(self, addr: str | int) -> int:
        local, index, family = await self._interface(addr)
        levels = [level for level, _, _ in self._levels()]
        if family == socket.AF_INET6 and L.SOL_IPV6 not in levels:
            raise error.MulticastJoinError(
                addr,
                "an IPv4 port needs an IPv4 address, or an interface name or index",
            )
        if L.SOL_IPV6 in levels:
            if index == 0 and L.SOL_IP not in levels:
                raise error.MulticastJoinError(
                    addr, "an IPv6-only port needs an interface, not an IPv4 address"
                )
            if index:
                self.socket.setsockopt(L.SOL_IPV6, socket.IPV6_MULTICAST_IF, index)
        if L.SOL_IP in levels:
            request = _IP_MREQN.pack(_V4_ANY, local, index)
            self.socket.setsockopt(L.SOL_IP, socket.IP_MULTICAST_IF, request)
        return 1

    def joinGroup(self, addr: str, interface: str | int = "") -> defer.Deferred[None]:
        """
        Join the IPv4 or IPv6 group C{addr} on C{interface}: C{""} lets the
        kernel choose by route; else, for IPv4 groups, the interface's IPv4
        address or a host name that resolves to it (as in Twisted); its name
        or index; or, for IPv6 groups, one of its IPv6 addresses.

        @return: A Deferred that fires when joined; or fails with
            L{error.MulticastJoinError} (no such group or interface, a group
            of a family this port does not serve, an interface address of
            the other family, or the kernel refused), or with the resolver's
            error (C{DNSLookupError}) if a host name does not resolve, as
            Twisted's port does.
        """
        return defer.Deferred.fromCoroutine(self._joinLeave(addr, interface, True))

    def leaveGroup(self, addr: str, interface: str | int = "") -> defer.Deferred[None]:
        """
        Leave a group joined with L{joinGroup}; the same arguments.
        """
        return defer.Deferred.fromCoroutine(self._joinLeave(addr, interface, False))

    async def _joinLeave(self, addr: str, interface: str | int, join: bool) -> None:
        group = await _maybeResolve(self.reactor, addr)
        local, index, family = await self._interface(interface)
        levels = [level for level, _, _ in self._levels()]
        if isIPAddress(group):
            if L.SOL_IP not in levels:
                raise error.MulticastJoinError(
                    addr, interface, "an IPv6-only port cannot join an IPv4 group"
                )
            if family == socket.AF_INET6:
                raise error.MulticastJoinError(
                    addr,
                    interface,
                    "give an IPv4 group an IPv4 address, or an interface name or index",
                )
            option = socket.IP_ADD_MEMBERSHIP if join else socket.IP_DROP_MEMBERSHIP
            request = _IP_MREQN.pack(socket.inet_aton(group), local, index)
            self._setsockopt(L.SOL_IP, option, request, addr, interface)
            return
        if L.SOL_IPV6 not in levels:
            raise error.MulticastJoinError(
                addr, interface, "an IPv4 port cannot join an IPv6 group"
            )
        if family == socket.AF_INET:
            raise error.MulticastJoinError(
                addr, interface, "give an IPv6 group an interface name or index"
            )
        option = socket.IPV6_JOIN_GROUP if join else socket.IPV6_LEAVE_GROUP
        request = _IPV6_MREQ.pack(socket.inet_pton(socket.AF_INET6, group), index)
        self._setsockopt(L.SOL_IPV6, option, request, addr, interface)

    async def _interface(self, interface: str | int) -> tuple[bytes, int, int]:
        """
        C{(IPv4 address, index, family)} of an interface: given by IPv4
        address, C{(address, 0, AF_INET)}; by name or index,
        C{(0.0.0.0, index, 0)}; by IPv6 address, C{(0.0.0.0, index,
        AF_INET6)}; C{""} is C{(0.0.0.0, 0, 0)}: the kernel chooses.  A
        string that is none of these is a host name, resolved through the
        reactor's resolver as Twisted's port does (an interface name is
        never looked up).

        @raise error.MulticastJoinError: No interface here has that IPv6
            address, or the resolver gave no IP address.
        @raise twisted.internet.error.DNSLookupError: (Or whatever the
            reactor's resolver fails with) a host name that does not resolve.
        """
        if interface == "":
            return _V4_ANY, 0, 0
        if isinstance(interface, str):
            if isIPAddress(interface):
                return socket.inet_aton(interface), 0, socket.AF_INET
            if isIPv6Address(interface):
                index = _interfaceIndex(interface)
                if index is None:
                    raise error.MulticastJoinError(
                        interface, "no interface has this address here"
                    )
                return _V4_ANY, index, socket.AF_INET6
        index = _interfaceIndex(interface)
        if index is not None:
            return _V4_ANY, index, 0
        assert isinstance(interface, str)
        resolved = await _maybeResolve(self.reactor, interface)
        if not isIPAddress(resolved):
            raise error.MulticastJoinError(
                interface, f"resolved to {resolved!r}, not an IPv4 address"
            )
        return socket.inet_aton(resolved), 0, socket.AF_INET

    def _setsockopt(
        self, level: int, option: int, value: int | bytes, *about: object
    ) -> None:
        try:
            self.socket.setsockopt(level, option, value)
        except OSError as e:
            raise error.MulticastJoinError(*about, *e.args) from e


def _maybeResolve(reactor: object, host: str) -> defer.Deferred[str]:
    """
    C{host} as an IP address: as given, or resolved (IPv4) through the
    reactor's resolver, as Twisted's multicast port resolves names; the
    resolver's failure (C{DNSLookupError}) is passed on, as there.
    """
    if isIPAddress(host) or isIPv6Address(host):
        return defer.succeed(host)
    resolved: defer.Deferred[str] = IReactorCore(reactor).resolve(host)
    return resolved


def listenMulticast(
    port: int,
    protocol: AnyDatagramProtocol,
    interface: str = "",
    maxPacketSize: int = 8192,
    reactor: IReactorFDSet | None = None,
    listenMultiple: bool = False,
    **options: Any,
) -> DestinationMulticastPort:
    """
    Like C{reactor.listenMulticast}, with a L{DestinationMulticastPort}
    (IPv4 and IPv6 groups); join groups with its C{joinGroup}.

    @param interface: The address to bind, as for L{udpdst.listenUDP}:
        C{""} for IPv4, C{"::"} for IPv6 and IPv4 groups.
    @param options: The port's keyword options; see
        L{DestinationPort.__init__}.
    @raise twisted.internet.error.CannotListenError: the bind failed; or
        C{reactor} is one of Twisted's memory reactors, which have no
        sockets (and no C{listenMulticast} of their own).
    @return: The listening port.
    """
    if isMemoryReactor(reactor):
        raise error.CannotListenError(
            interface,
            port,
            "a memory reactor has no sockets; test the protocol with "
            "udpdst.testing.FakeDestinationTransport",
        )
    p = DestinationMulticastPort(
        port, protocol, interface, maxPacketSize, reactor, listenMultiple, **options
    )
    p.startListening()
    return p

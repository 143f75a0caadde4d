"""
udpdst.listenMulticast and its port's IMulticastTransport, on loopback: the
options it sets, the errors it gives, and patchReactor covering it.  Group
traffic itself is tested in network namespaces (test_multicast_netns.py).
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Iterator
from typing import Any

import pytest
from twisted.internet import error
from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.internet.interfaces import IMulticastTransport, IResolverSimple
from twisted.internet.protocol import DatagramProtocol
from twisted.python.failure import Failure
from zope.interface import implementer
from zope.interface.verify import verifyObject

import udpdst
from tests.conftest import requiresIPv6
from tests.reactors import runUntil
from udpdst import _linux as L

LO = socket.if_nametoindex("lo")


def result(d: Deferred[Any]) -> Any:
    """
    The result of a Deferred that has fired; its failure is raised.
    """
    outcome: list[Any] = []
    d.addBoth(outcome.append)
    assert outcome, f"{d} has not fired"
    if isinstance(outcome[0], Failure):
        outcome[0].raiseException()
    return outcome[0]


@pytest.fixture
def ports(epollReactor: Any) -> Iterator[list[Any]]:
    """
    Ports a test opens; all are closed at its end.
    """
    opened: list[Any] = []
    yield opened
    if opened:
        runUntil(
            epollReactor,
            lambda: Deferred.fromCoroutine(_stopAll(opened)),
        )


async def _stopAll(opened: list[Any]) -> None:
    for port in opened:
        await maybeDeferred(port.stopListening)


def listen(
    reactor: Any, ports: list[Any], interface: str = "", **kwargs: Any
) -> udpdst.DestinationMulticastPort:
    port = udpdst.listenMulticast(
        0, DatagramProtocol(), interface, reactor=reactor, **kwargs
    )
    ports.append(port)
    return port


@pytest.mark.parametrize(
    "interface", ["", pytest.param("::", marks=requiresIPv6)], ids=["v4", "v6"]
)
def test_providesTheInterfaces(
    epollReactor: Any, ports: list[Any], interface: str
) -> None:
    port = listen(epollReactor, ports, interface)
    assert verifyObject(IMulticastTransport, port)
    assert verifyObject(udpdst.IDestinationTransport, port)
    assert isinstance(port, udpdst.DestinationPort)


def test_ttlAndLoopbackIPv4(epollReactor: Any, ports: list[Any]) -> None:
    port = listen(epollReactor, ports)
    port.setTTL(5)
    assert port.getTTL() == 5
    port.setLoopbackMode(0)
    assert port.getLoopbackMode() is False
    port.setLoopbackMode(1)
    assert port.getLoopbackMode() is True


@requiresIPv6
def test_ttlAndLoopbackDualStack(epollReactor: Any, ports: list[Any]) -> None:
    """
    On a dual-stack port the hop limit and loopback mode are set for both
    families.
    """
    port = listen(epollReactor, ports, "::")
    handle = port.getHandle()
    port.setTTL(7)
    assert port.getTTL() == 7
    assert handle.getsockopt(L.SOL_IP, socket.IP_MULTICAST_TTL) == 7
    assert handle.getsockopt(L.SOL_IPV6, socket.IPV6_MULTICAST_HOPS) == 7
    port.setLoopbackMode(0)
    assert port.getLoopbackMode() is False
    assert handle.getsockopt(L.SOL_IP, socket.IP_MULTICAST_LOOP) == 0


def test_outgoingInterfaceIPv4(epollReactor: Any, ports: list[Any]) -> None:
    port = listen(epollReactor, ports)
    assert result(port.setOutgoingInterface("127.0.0.1")) == 1
    assert port.getOutgoingInterface() == "127.0.0.1"


@requiresIPv6
@pytest.mark.parametrize("how", ["lo", LO, str(LO), "::1"])
def test_outgoingInterfaceIPv6(
    epollReactor: Any, ports: list[Any], how: str | int
) -> None:
    """
    An IPv6 port takes the interface by name, index or one of its IPv6
    addresses (::1 is on lo).
    """
    port = listen(epollReactor, ports, "::", v6Only=True)
    assert result(port.setOutgoingInterface(how)) == 1
    assert port.getOutgoingInterface() == LO


def test_joinAndLeaveIPv4(epollReactor: Any, ports: list[Any]) -> None:
    port = listen(epollReactor, ports)
    assert result(port.joinGroup("239.1.2.3", "127.0.0.1")) is None
    assert result(port.leaveGroup("239.1.2.3", "127.0.0.1")) is None
    with pytest.raises(error.MulticastJoinError):
        result(port.leaveGroup("239.1.2.3", "127.0.0.1"))


@requiresIPv6
@pytest.mark.parametrize("group", ["ff15::1234", "239.1.2.3"])
def test_joinAndLeaveOnDualStack(
    epollReactor: Any, ports: list[Any], group: str
) -> None:
    """
    A port on :: joins IPv6 and IPv4 groups.
    """
    port = listen(epollReactor, ports, "::")
    assert result(port.joinGroup(group, "lo")) is None
    assert result(port.leaveGroup(group, "lo")) is None


@pytest.mark.parametrize(
    "interface, kwargs, group, joinOn, why",
    [
        ("", {}, "ff15::1234", "", "an IPv4 port cannot join an IPv6 group"),
        pytest.param(
            "::",
            {"v6Only": True},
            "239.1.2.3",
            "",
            "IPv6-only port",
            marks=requiresIPv6,
        ),
        pytest.param(
            "::",
            {},
            "ff15::1234",
            "127.0.0.1",
            "interface name or index",
            marks=requiresIPv6,
        ),
        ("", {}, "239.1.2.3", "::1", "give an IPv4 group an IPv4 address"),
        pytest.param(
            "::", {}, "ff15::1234", "fd00:dead::1", "no interface", marks=requiresIPv6
        ),
        ("", {}, "10.1.2.3", "", "Invalid argument"),
    ],
)
def test_joinErrors(
    epollReactor: Any,
    ports: list[Any],
    interface: str,
    kwargs: dict[str, Any],
    group: str,
    joinOn: str,
    why: str,
) -> None:
    """
    What cannot be joined fails the Deferred with a MulticastJoinError
    that says why.
    """
    port = listen(epollReactor, ports, interface, **kwargs)
    with pytest.raises(error.MulticastJoinError, match=why):
        result(port.joinGroup(group, joinOn))


@implementer(IResolverSimple)
class HostsResolver:
    """
    A resolver that knows only the names given, and records every name it
    is asked: the port's host-name lookups go through the reactor's
    resolver, and none reaches the network.
    """

    def __init__(self, hosts: dict[str, str]) -> None:
        self.hosts = hosts
        self.asked: list[str] = []

    def getHostByName(self, name: str, timeout: Any = None) -> Deferred[str]:
        self.asked.append(name)
        if name in self.hosts:
            return succeed(self.hosts[name])
        return fail(error.DNSLookupError(name))


@pytest.fixture
def resolver(epollReactor: Any) -> HostsResolver:
    hosts = HostsResolver({"server.test": "127.0.0.1"})
    epollReactor.installResolver(hosts)
    return hosts


def test_interfaceByHostName(
    epollReactor: Any, ports: list[Any], resolver: HostsResolver
) -> None:
    """
    An IPv4 port takes an interface by a host name, resolved through the
    reactor's resolver, as Twisted's does; a name that does not resolve
    fails with the resolver's error, as there.  Interface names and
    indexes are not looked up.
    """
    port = listen(epollReactor, ports)
    assert result(port.setOutgoingInterface("server.test")) == 1
    assert port.getOutgoingInterface() == "127.0.0.1"
    assert result(port.joinGroup("239.1.2.3", "server.test")) is None
    assert result(port.leaveGroup("239.1.2.3", "server.test")) is None
    assert result(port.joinGroup("239.1.2.3", "lo")) is None
    assert result(port.setOutgoingInterface(str(LO))) == 1
    with pytest.raises(error.DNSLookupError):
        result(port.joinGroup("239.1.2.4", "nosuchif0"))
    with pytest.raises(error.DNSLookupError):
        result(port.setOutgoingInterface("nosuchif0"))
    assert resolver.asked == ["server.test"] * 3 + ["nosuchif0"] * 2


def test_outgoingInterfaceErrors(epollReactor: Any, ports: list[Any]) -> None:
    """
    On an IPv4 port an IPv6 address is no interface (as in Twisted); an
    address the kernel refuses fails with its L{OSError}, as Twisted's does.
    """
    port = listen(epollReactor, ports)
    with pytest.raises(error.MulticastJoinError, match="an IPv4 port needs"):
        result(port.setOutgoingInterface("::1"))
    with pytest.raises(OSError) as refused:
        result(port.setOutgoingInterface("192.0.2.1"))
    assert refused.value.errno == errno.EADDRNOTAVAIL


def test_listenMultiple(epollReactor: Any, ports: list[Any]) -> None:
    first = listen(epollReactor, ports, listenMultiple=True)
    number = first.getHost().port
    second = udpdst.listenMulticast(
        number, DatagramProtocol(), reactor=epollReactor, listenMultiple=True
    )
    ports.append(second)
    assert second.getHost().port == number
    with pytest.raises(error.CannotListenError):
        udpdst.listenMulticast(number, DatagramProtocol(), reactor=epollReactor)


def test_patchReactorCoversListenMulticast(epollReactor: Any, ports: list[Any]) -> None:
    undo = udpdst.patchReactor(epollReactor)
    try:
        port = epollReactor.listenMulticast(0, DatagramProtocol(), listenMultiple=True)
        ports.append(port)
    finally:
        undo()
    assert isinstance(port, udpdst.DestinationMulticastPort)
    assert port.listenMultiple is True

"""
How destination-aware ports are built and started: the counterparts of
C{reactor.listenUDP} and C{reactor.adoptDatagramPort}, and the patch that
makes a reactor's own methods (those two and C{listenMulticast}) build them.

A port's options are named once, by L{DestinationPort.__init__}; everything
here passes them through.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from functools import partial
from typing import Any, cast

from twisted.internet import error
from twisted.internet.interfaces import IReactorFDSet

from udpdst._memory import isMemoryReactor
from udpdst.multicast import listenMulticast
from udpdst.port import DestinationPort
from udpdst.protocol import AnyDatagramProtocol, asTwistedProtocol
from udpdst.transparent import DEFAULT_IDLE_TIMEOUT, DEFAULT_SIZE


def listenUDP(
    port: int,
    protocol: AnyDatagramProtocol,
    interface: str = "",
    maxPacketSize: int = 8192,
    reactor: IReactorFDSet | None = None,
    **options: Any,
) -> DestinationPort:
    """
    Like C{reactor.listenUDP}, with a L{DestinationPort}.

    @param options: The port's keyword-only options (C{reusePort},
        C{receiveBufferSize}, C{v6Only}, C{transparent}, C{replySockets},
        C{replySocketIdleTimeout}); see L{DestinationPort.__init__}.
    @raise twisted.internet.error.CannotListenError: the bind failed (port
        in use, no permission, address not local), or C{transparent=True}
        without C{CAP_NET_ADMIN} or C{CAP_NET_RAW} (the message says so).
    @raise twisted.internet.error.InvalidAddressError: C{interface} is not
        an IP address.
    @return: The listening port.  With one of Twisted's memory reactors
        (C{MemoryReactor}, C{MemoryReactorClock}) no socket is opened: the
        call is recorded in the reactor's C{udpServers} list as
        C{(port, protocol, interface, maxPacketSize)}, as those reactors
        record C{listenTCP} in C{tcpServers}, and the port returned is a
        L{udpdst.testing.FakeDestinationTransport} with the protocol
        connected.
    """
    if isMemoryReactor(reactor):
        from udpdst.testing import FakeDestinationTransport

        reactor.__dict__.setdefault("udpServers", []).append(
            (port, protocol, interface, maxPacketSize)
        )
        return FakeDestinationTransport(
            protocol,
            port=port,
            interface=interface,
            maxPacketSize=maxPacketSize,
            reactor=reactor,
            **options,
        )
    p = DestinationPort(
        port, asTwistedProtocol(protocol), interface, maxPacketSize, reactor, **options
    )
    p.startListening()
    return p


def adoptDatagramPort(
    fileDescriptor: int | socket.socket,
    addressFamily: int,
    protocol: AnyDatagramProtocol,
    maxPacketSize: int = 8192,
    reactor: IReactorFDSet | None = None,
    *,
    transparent: bool = False,
    replySockets: int = DEFAULT_SIZE,
    replySocketIdleTimeout: float = DEFAULT_IDLE_TIMEOUT,
) -> DestinationPort:
    """
    Like C{reactor.adoptDatagramPort}: wrap an already bound datagram socket
    (e.g. one inherited from systemd) in a L{DestinationPort} and start it.

    The descriptor is duplicated; the caller keeps (and may close) its own.
    The destination options are enabled on it; datagrams queued before that
    arrive with an unknown destination and are answered from the kernel's
    choice.

    A socket that has C{IP_TRANSPARENT} (or C{IPV6_TRANSPARENT}) set is
    served as a port made with C{transparent=True} (see
    L{DestinationPort.__init__}); C{transparent=True} sets the option on one
    that has not.

    With one of Twisted's memory reactors nothing is touched: the call is
    recorded in the reactor's C{adoptedPorts}, as those reactors do, and the
    port returned is a L{udpdst.testing.FakeDestinationTransport} (on
    C{0.0.0.0} or C{::}, port 1234, as Twisted's fake) with the protocol
    connected.

    @raise twisted.internet.error.UnsupportedAddressFamily: not IPv4 or IPv6.
    @raise twisted.internet.error.CannotListenError: C{transparent=True}
        without C{CAP_NET_ADMIN} or C{CAP_NET_RAW}.
    """
    if addressFamily not in (socket.AF_INET, socket.AF_INET6):
        raise error.UnsupportedAddressFamily(addressFamily)
    if isMemoryReactor(reactor):
        from udpdst.testing import FakeDestinationTransport

        reactor.adoptedPorts.append(  # type: ignore[union-attr]
            (fileDescriptor, addressFamily, protocol, maxPacketSize)
        )
        return FakeDestinationTransport(
            protocol,
            port=1234,
            interface="::" if addressFamily == socket.AF_INET6 else "0.0.0.0",
            maxPacketSize=maxPacketSize,
            reactor=reactor,
        )
    if isinstance(fileDescriptor, socket.socket):
        fileDescriptor = fileDescriptor.fileno()
    if reactor is None:
        from twisted.internet import reactor as globalReactor

        reactor = globalReactor
    p = cast(
        DestinationPort,
        DestinationPort._fromListeningDescriptor(
            reactor,
            fileDescriptor,
            addressFamily,
            asTwistedProtocol(protocol),
            maxPacketSize,
        ),
    )
    p.transparent = transparent
    p.replySockets = replySockets
    p.replySocketIdleTimeout = replySocketIdleTimeout
    # systemd hands over blocking sockets; the reactor needs non-blocking.
    cast(socket.socket, p._preexistingSocket).setblocking(False)
    p.startListening()
    return p


#: The reactor methods that L{patchReactor} replaces, and what builds the port.
_PATCHED: dict[str, Callable[..., DestinationPort]] = {
    "listenUDP": listenUDP,
    "adoptDatagramPort": adoptDatagramPort,
    "listenMulticast": listenMulticast,
}


def patchReactor(reactor: IReactorFDSet) -> Callable[[], None]:
    """
    Make C{reactor.listenUDP}, C{reactor.adoptDatagramPort} and
    C{reactor.listenMulticast} build destination-aware ports (the last a
    L{udpdst.multicast.DestinationMulticastPort}), for code that calls the
    reactor directly.

    Opt-in and per reactor instance.  The patched methods take the
    reactor's own arguments (and the port's keyword options) unchanged.

    @return: A function that undoes the patch.
    """
    saved = {
        name: reactor.__dict__[name] for name in _PATCHED if name in reactor.__dict__
    }
    for name, build in _PATCHED.items():
        setattr(reactor, name, partial(build, reactor=reactor))

    def undo() -> None:
        for name in _PATCHED:
            reactor.__dict__.pop(name, None)
        reactor.__dict__.update(saved)

    return undo

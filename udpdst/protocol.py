"""
A base class for protocols that want each datagram's destination.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from twisted.internet.protocol import AbstractDatagramProtocol, DatagramProtocol
from zope.interface import implementer

from udpdst.address import Destination, PeerAddress
from udpdst.interfaces import IDestinationDatagramProtocol

if TYPE_CHECKING:
    from udpdst.port import DestinationPort

    class _DatagramProtocolBase:
        """
        What type checkers see of C{DatagramProtocol}: everything but its
        two-argument C{datagramReceived}, which no three-argument override
        can match (a type checker compares an override with every base
        class), and a C{transport} that can reply from a destination.
        """

        transport: DestinationPort
        noisy: bool
        numPorts: int

        def makeConnection(self, transport: DestinationPort) -> None: ...
        def doStart(self) -> None: ...
        def doStop(self) -> None: ...
        def startProtocol(self) -> None: ...
        def stopProtocol(self) -> None: ...
        def connectionRefused(self) -> None: ...
        def logPrefix(self) -> str: ...

else:
    _DatagramProtocolBase = DatagramProtocol


@implementer(IDestinationDatagramProtocol)
class DestinationDatagramProtocol(_DatagramProtocolBase):
    """
    Subclass and override L{datagramReceived}; reply with
    C{self.transport.write(data, addr, dst)}.

    At run time this is a C{DatagramProtocol}.  Type checkers see it without
    C{DatagramProtocol}'s two-argument C{datagramReceived}, so that an
    override with C{dst} type-checks, and with C{transport} typed as a
    L{DestinationPort} (the port, the multicast port and
    L{udpdst.testing.FakeDestinationTransport} all are), so that
    C{self.transport.write(data, addr, dst)} type-checks with or without
    the C{mypy_zope} plugin.
    """

    def datagramReceived(
        self, datagram: bytes, addr: PeerAddress, dst: Destination | None
    ) -> None:
        """
        Called for each datagram; see L{IDestinationDatagramProtocol}.
        """


#: What udpdst's ports take as their protocol: any of Twisted's datagram
#: protocols, or a L{DestinationDatagramProtocol}.
AnyDatagramProtocol = AbstractDatagramProtocol | DestinationDatagramProtocol


def asTwistedProtocol(protocol: AnyDatagramProtocol) -> AbstractDatagramProtocol:
    """
    C{protocol} typed as Twisted's ports take it.  At run time every
    L{DestinationDatagramProtocol} is a C{DatagramProtocol}; only type
    checkers see it otherwise (see there).
    """
    return protocol  # type: ignore[return-value]

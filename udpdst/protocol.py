"""
A base class for protocols that want each datagram's destination.
"""

from __future__ import annotations

from twisted.internet.protocol import DatagramProtocol
from zope.interface import implementer

from udpdst.address import Destination, PeerAddress
from udpdst.interfaces import IDestinationDatagramProtocol


@implementer(IDestinationDatagramProtocol)
class DestinationDatagramProtocol(DatagramProtocol):
    """
    Subclass and override L{datagramReceived}; reply with
    C{self.transport.write(data, addr, dst)}.
    """

    def datagramReceived(  # type: ignore[override]
        self, datagram: bytes, addr: PeerAddress, dst: Destination | None
    ) -> None:
        """
        Called for each datagram; see L{IDestinationDatagramProtocol}.
        """

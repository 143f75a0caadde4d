"""
The contracts of udpdst: protocols that want each datagram's destination, and
the transport that can reply from it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from twisted.internet.interfaces import IUDPTransport
from zope.interface import Attribute, Interface

if TYPE_CHECKING:
    from collections.abc import Iterable

    from udpdst.address import Destination, PeerAddress


class IDestinationDatagramProtocol(Interface):
    """
    A datagram protocol that is told where each datagram was sent to.

    A port decides once, when the protocol is connected, whether the protocol
    provides this interface; if not, it is called as a plain
    C{DatagramProtocol} with C{datagramReceived(data, addr)}.
    """

    def datagramReceived(
        data: bytes, addr: PeerAddress, dst: Destination | None
    ) -> None:
        """
        A datagram arrived.

        @param data: The datagram, whole (a datagram larger than the port's
            C{maxPacketSize} is counted as oversized and never delivered).
        @param addr: The peer, a L{udpdst.address.PeerAddress}: C{(host, port)}
            with the scope kept for IPv6 link-local peers.
        @param dst: The L{udpdst.address.Destination} the peer sent to, or
            L{None} when the kernel did not say (control data truncated, or a
            datagram queued before the port enabled its options).
        @return: L{None}; exceptions are logged and do not stop the port.
        """


class IDestinationTransport(IUDPTransport):
    """
    A UDP transport that can choose the source address of each datagram.
    """

    counters = Attribute("A L{udpdst.port.PortCounters} of this port.")

    def write(
        packet: bytes,
        addr: tuple[str, int] | None = None,
        dst: Destination | None = None,
    ) -> None:
        """
        Send a datagram.

        @param packet: The datagram.
        @param addr: The peer; a L{udpdst.address.PeerAddress} received from
            this port brings its destination along.
        @param dst: The L{udpdst.address.Destination} to reply from; L{None}
            means: the one C{addr} carries, else the one of the datagram being
            dispatched from that peer, else the last one that peer sent to,
            else the kernel's choice.
        @raise twisted.internet.error.InvalidAddressError: C{addr} is not an IP
            address of this port's family.
        @raise twisted.internet.error.MessageLengthError: the datagram is too
            large to send.
        """

    def writeSequence(
        seq: Iterable[bytes],
        addr: tuple[str, int] | None = None,
        dst: Destination | None = None,
    ) -> None:
        """
        Send a datagram made of the concatenation of C{seq}; as L{write}.
        """

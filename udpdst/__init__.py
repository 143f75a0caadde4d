"""
udpdst: destination-aware UDP ports for Twisted, whose replies leave from the
address the client sent to.
"""

from udpdst.address import Destination, PeerAddress
from udpdst.interfaces import IDestinationDatagramProtocol, IDestinationTransport
from udpdst.port import (
    DestinationPort,
    PortCounters,
    adoptDatagramPort,
    listenUDP,
    patchReactor,
)
from udpdst.protocol import DestinationDatagramProtocol

__all__ = [
    "Destination",
    "DestinationDatagramProtocol",
    "DestinationPort",
    "IDestinationDatagramProtocol",
    "IDestinationTransport",
    "PeerAddress",
    "PortCounters",
    "adoptDatagramPort",
    "listenUDP",
    "patchReactor",
]

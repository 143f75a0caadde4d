"""
udpdst: destination-aware UDP ports for Twisted, whose replies leave from the
address the client sent to.

The names below load their modules on first use, so that importing a
submodule (as C{twistd udpdst --help} imports L{udpdst.echo.tap}) does not pull in
the port.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from udpdst._lazy import lazyNames

if TYPE_CHECKING:
    __version__: str
    from udpdst.address import Destination, PeerAddress
    from udpdst.application import UDPServer
    from udpdst.interfaces import IDestinationDatagramProtocol, IDestinationTransport
    from udpdst.listening import adoptDatagramPort, listenUDP, patchReactor
    from udpdst.multicast import DestinationMulticastPort, listenMulticast
    from udpdst.port import DestinationPort, PortCounters
    from udpdst.protocol import DestinationDatagramProtocol

_HOMES = {
    "Destination": "udpdst.address",
    "PeerAddress": "udpdst.address",
    "UDPServer": "udpdst.application",
    "IDestinationDatagramProtocol": "udpdst.interfaces",
    "IDestinationTransport": "udpdst.interfaces",
    "DestinationPort": "udpdst.port",
    "PortCounters": "udpdst.port",
    "adoptDatagramPort": "udpdst.listening",
    "listenUDP": "udpdst.listening",
    "patchReactor": "udpdst.listening",
    "DestinationMulticastPort": "udpdst.multicast",
    "listenMulticast": "udpdst.multicast",
    "DestinationDatagramProtocol": "udpdst.protocol",
}

__all__ = [
    "__version__",
    "Destination",
    "DestinationDatagramProtocol",
    "DestinationMulticastPort",
    "DestinationPort",
    "IDestinationDatagramProtocol",
    "IDestinationTransport",
    "PeerAddress",
    "PortCounters",
    "UDPServer",
    "adoptDatagramPort",
    "listenMulticast",
    "listenUDP",
    "patchReactor",
]
assert sorted(__all__) == sorted([*_HOMES, "__version__"])


def _version() -> str:
    """
    The installed distribution's version: pyproject.toml says it, once.
    """
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("udpdst")
    except PackageNotFoundError:
        # Imported from a checkout that was never installed.
        return "0+unknown"


__getattr__, __dir__ = lazyNames(globals(), _HOMES, {"__version__": _version})

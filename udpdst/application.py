"""
A service that listens with a destination-aware port, for C{.tac} files and
service trees: the counterpart of C{twisted.application.internet.UDPServer}.

Its base, L{ListeningService} (bind before twistd drops privileges, close at
stop), serves any service that holds one listening port.
"""

from __future__ import annotations

from typing import Any, Generic, Protocol, TypeVar

from twisted.application import service
from twisted.internet import defer
from twisted.internet.interfaces import IReactorFDSet

from udpdst.listening import listenUDP
from udpdst.port import DestinationPort
from udpdst.protocol import AnyDatagramProtocol


class _StopListening(Protocol):
    """
    What L{ListeningService} needs of a port: C{stopListening}.
    """

    def stopListening(self) -> Any: ...


_Port = TypeVar("_Port", bound=_StopListening)


class ListeningService(service.Service, Generic[_Port]):
    """
    A service that holds one listening port: bound in
    C{privilegedStartService} (before twistd drops privileges), or in
    C{startService} if not yet, and closed in C{stopService}.  Subclasses say
    how to listen, in L{_listen}.

    @ivar listeningPort: The port while the service runs, else L{None}.
    """

    listeningPort: _Port | None = None

    def _listen(self) -> _Port:
        """
        Bind, and return the listening port.
        """
        raise NotImplementedError

    def privilegedStartService(self) -> None:
        """
        Bind the port.

        @raise Exception: whatever L{_listen} raises when it cannot bind.
        """
        service.Service.privilegedStartService(self)
        if self.listeningPort is None:
            self.listeningPort = self._listen()

    def startService(self) -> None:
        """
        Start; bind the port unless L{privilegedStartService} already did.
        """
        service.Service.startService(self)
        if self.listeningPort is None:
            self.listeningPort = self._listen()

    def stopService(self) -> defer.Deferred[None] | None:
        """
        Stop listening.

        @return: A Deferred that fires when the port is closed, or L{None} if
            it was not listening.
        """
        service.Service.stopService(self)
        port, self.listeningPort = self.listeningPort, None
        if port is None:
            return None
        return defer.maybeDeferred(port.stopListening)


class UDPServer(ListeningService[DestinationPort]):
    """
    Like C{internet.UDPServer}, with a L{DestinationPort}: binds in
    C{privilegedStartService} (before twistd drops privileges) and stops
    listening in C{stopService}.

    @ivar listeningPort: The L{DestinationPort} while the service runs, else
        L{None}.
    """

    def __init__(
        self,
        port: int,
        protocol: AnyDatagramProtocol,
        interface: str = "",
        maxPacketSize: int = 8192,
        reactor: IReactorFDSet | None = None,
        **options: Any,
    ) -> None:
        """
        Takes L{udpdst.listenUDP}'s arguments, including the port's keyword
        options; nothing is bound until the service starts.
        """
        self.port = port
        self.protocol = protocol
        self.interface = interface
        self.maxPacketSize = maxPacketSize
        self.reactor = reactor
        self.options = options

    def _listen(self) -> DestinationPort:
        return listenUDP(
            self.port,
            self.protocol,
            self.interface,
            self.maxPacketSize,
            reactor=self.reactor,
            **self.options,
        )

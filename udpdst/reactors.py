"""
Reactors for C{twistd --reactor udpdst...}: Twisted's own reactors whose
C{listenUDP}, C{adoptDatagramPort} and C{listenMulticast} build udpdst's
destination-aware ports, so unchanged twistd plugins and C{.tac} files reply
from the address each datagram was sent to.

Importing this module is cheap (twistd imports it while scanning plugins);
the reactor and the port are imported only by L{DestinationReactor.install}.
"""

from __future__ import annotations

from twisted.application.reactors import IReactorInstaller, Reactor
from twisted.logger import Logger
from twisted.plugin import IPlugin
from zope.interface import implementer

_log = Logger()


@implementer(IPlugin, IReactorInstaller)
class DestinationReactor(Reactor):
    """
    A reactor plugin: Twisted's reactor from C{moduleName}, installed as the
    global reactor, then patched with L{udpdst.patchReactor}.

    C{moduleName} names Twisted's reactor module, so that
    C{twistd --help-reactors} marks this reactor unavailable exactly where
    Twisted's own is.
    """

    def __init__(self, shortName: str, kind: str) -> None:
        """
        @param shortName: The name given to C{twistd --reactor}.
        @param kind: Twisted's reactor: C{"epoll"}, C{"asyncio"}, C{"poll"}
            or C{"select"} (its module is C{twisted.internet.<kind>reactor}).
        """
        self.kind = kind
        Reactor.__init__(
            self,
            shortName,
            f"twisted.internet.{kind}reactor",
            f"{kind} reactor; UDP ports reply from the address asked (udpdst)",
        )

    def install(self) -> None:
        """
        Install and patch the reactor, and say so in the log once it runs
        (twistd's own line names only Twisted's reactor class).
        """
        Reactor.install(self)
        from twisted.internet import reactor

        from udpdst.listening import patchReactor
        from udpdst.port import IO_PATH

        patchReactor(reactor)
        reactor.callWhenRunning(  # type: ignore[attr-defined]
            _log.info,
            "udpdst: destination-aware UDP ports are on (--reactor {shortName}: "
            "Twisted's {kind} reactor, I/O path {ioPath}); listenUDP, "
            "adoptDatagramPort and listenMulticast reply from the address each "
            "datagram was sent to",
            shortName=self.shortName,
            kind=self.kind,
            ioPath=IO_PATH,
        )

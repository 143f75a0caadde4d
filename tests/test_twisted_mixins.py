"""
Twisted's own UDP port tests run against L{udpdst.DestinationPort}, on every
reactor L{ReactorBuilder} can build here, for ports made by
L{udpdst.listenUDP} and for sockets adopted by L{udpdst.adoptDatagramPort}.

The tests come from C{twisted.internet.test.test_udp} (L{UDPPortTestsMixin},
L{DatagramTransportTestsMixin}); only C{getListeningPort} and
C{buildReactor} change.  The generated classes are trial
L{SynchronousTestCase}s, which pytest collects as unittest classes.

L{ReactorBuilder} points the I{global} reactor's C{__dict__} and
C{__class__} at the reactor it builds until the test's clean-up runs, so
L{udpdst.patchReactor} on the built reactor also patches the global name for
that long; its undo runs before the builder restores the global reactor.
"""

from __future__ import annotations

import signal
import socket
from typing import TYPE_CHECKING, Any

from twisted.internet.interfaces import IReactorFDSet
from twisted.internet.protocol import AbstractDatagramProtocol, DatagramProtocol
from twisted.internet.test.reactormixins import ReactorBuilder
from twisted.internet.test.test_udp import (
    DatagramTransportTestsMixin,
    UDPPortTestsMixin,
)

import udpdst
from udpdst import DestinationPort

if TYPE_CHECKING:
    # What makeTestCaseClasses() mixes in, for the type checker only.
    from twisted.trial.unittest import SynchronousTestCase as _TestCase
else:
    _TestCase = object

# No test of the mixins is excluded: every one Twisted runs against its own
# UDP port applies to ours and passes.  Were one ever to be, it would be
# overridden here with a skip whose reason says why it cannot apply.

#: The reactors this suite must really run on here (not skip).
REQUIRED_REACTORS = (
    "SelectReactor",
    "PollReactor",
    "EPollReactor",
    "AsyncioSelectorReactor",
    "ThreadedSelectReactor",
)


_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGCHLD)


def _saveSignals() -> tuple[dict[int, Any], int]:
    wakeup = signal.set_wakeup_fd(-1)
    signal.set_wakeup_fd(wakeup)
    return {signum: signal.getsignal(signum) for signum in _SIGNALS}, wakeup


def _restoreSignals(saved: tuple[dict[int, Any], int]) -> None:
    handlers, wakeup = saved
    for signum, handler in handlers.items():
        # None: a handler not set from Python, which cannot be put back.
        if handler is not None:
            signal.signal(signum, handler)
    signal.set_wakeup_fd(wakeup)


class _DestinationPortBuilder(ReactorBuilder, _TestCase):
    """
    What both builders share: a reactor whose C{listenUDP} and
    C{adoptDatagramPort} build L{DestinationPort}s, and a check that every
    port a test gets is one.
    """

    # Our port needs file-descriptor readiness, not the reactor's own UDP
    # or socket-adoption support.
    requiredInterfaces = (IReactorFDSet,)

    def buildReactor(self) -> Any:
        # reactor.run() points SIGINT and SIGTERM at the built reactor and
        # never puts them back (twisted/twisted#11761), and on stopping sets
        # the signal wakeup fd to -1: a global reactor that pytest-twisted
        # runs would then never hear SIGCHLD, and never reap a child that
        # has no pipes.  Registered before the builder's clean-up, so it
        # runs after it.
        self.addCleanup(_restoreSignals, _saveSignals())
        reactor = ReactorBuilder.buildReactor(self)
        # Tests such as test_invalidInterface call reactor.listenUDP directly.
        # Cleanups run last-in first-out: this undo runs before the
        # builder's own clean-up restores the global reactor.
        self.addCleanup(udpdst.patchReactor(reactor))
        return reactor

    def _makePort(
        self,
        reactor: Any,
        protocol: AbstractDatagramProtocol,
        port: int,
        interface: str,
        maxPacketSize: int,
    ) -> DestinationPort:
        raise NotImplementedError()

    def getListeningPort(
        self,
        reactor: Any,
        protocol: AbstractDatagramProtocol,
        port: int = 0,
        interface: str = "",
        maxPacketSize: int = 8192,
    ) -> DestinationPort:
        listening = self._makePort(reactor, protocol, port, interface, maxPacketSize)
        # Without this the suite could pass while testing stock Twisted.
        assert isinstance(listening, DestinationPort), listening
        return listening

    def test_destinationPort(self) -> None:
        """
        The ports the mixins' tests get, and those the built reactor's
        C{listenUDP} and C{adoptDatagramPort} make, are L{DestinationPort}s
        on that reactor; once the test is over, neither that reactor nor the
        global one is patched.
        """
        built: list[Any] = []

        def unpatched() -> None:
            from twisted.internet import reactor as globalReactor

            for r in (built[0], globalReactor):
                self.assertNotIn("listenUDP", r.__dict__)
                self.assertNotIn("adoptDatagramPort", r.__dict__)

        # Cleanups run last-in first-out: this one runs after the builder's.
        self.addCleanup(unpatched)
        reactor = self.buildReactor()
        built.append(reactor)
        ports = [self.getListeningPort(reactor, DatagramProtocol())]
        ports.append(reactor.listenUDP(0, DatagramProtocol(), interface="127.0.0.1"))
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind(("127.0.0.1", 0))
            s.setblocking(False)
            ports.append(
                reactor.adoptDatagramPort(s.fileno(), s.family, DatagramProtocol())
            )
        for p in ports:
            self.assertIsInstance(p, DestinationPort)
            self.assertIs(p.reactor, reactor)
            # Still reading, so the builder's disconnectAll() closes it.
            self.assertIn(p, reactor.getReaders())


class DestinationUDPServerTestsBuilder(
    _DestinationPortBuilder, UDPPortTestsMixin, DatagramTransportTestsMixin
):
    """
    Twisted's UDP port tests on ports from L{udpdst.listenUDP}.
    """

    def _makePort(
        self,
        reactor: Any,
        protocol: AbstractDatagramProtocol,
        port: int,
        interface: str,
        maxPacketSize: int,
    ) -> DestinationPort:
        return udpdst.listenUDP(
            port,
            protocol,
            interface=interface,
            maxPacketSize=maxPacketSize,
            reactor=reactor,
        )


class DestinationUDPFDServerTestsBuilder(
    _DestinationPortBuilder, UDPPortTestsMixin, DatagramTransportTestsMixin
):
    """
    Twisted's UDP port tests on sockets adopted by
    L{udpdst.adoptDatagramPort}, set up as Twisted's
    C{UDPFDServerTestsBuilder} does.
    """

    def _makePort(
        self,
        reactor: Any,
        protocol: AbstractDatagramProtocol,
        port: int,
        interface: str,
        maxPacketSize: int,
    ) -> DestinationPort:
        if ":" in interface:
            domain = socket.AF_INET6
            address = socket.getaddrinfo(interface, port)[0][4]
        else:
            domain = socket.AF_INET
            address = (interface, port)
        portSock = socket.socket(domain, socket.SOCK_DGRAM)
        try:
            portSock.bind(address)
            portSock.setblocking(False)
            return udpdst.adoptDatagramPort(
                portSock.fileno(),
                portSock.family,
                protocol,
                maxPacketSize,
                reactor=reactor,
            )
        finally:
            # The port holds its own duplicate; ours must still be open
            # (fileno() raises if the adoption closed it) and is not needed.
            portSock.fileno()
            portSock.close()


_BUILDERS = (DestinationUDPServerTestsBuilder, DestinationUDPFDServerTestsBuilder)

for _builder in _BUILDERS:
    globals().update(_builder.makeTestCaseClasses())
del _builder


def test_generatedClasses() -> None:
    """
    Each builder yields a test case class per reactor L{ReactorBuilder}
    knows, and those this suite must run on are built, not skipped.
    """
    for builder in _BUILDERS:
        generated = builder.makeTestCaseClasses()
        assert set(generated) <= set(globals())
        for reactorName in REQUIRED_REACTORS:
            name = f"{builder.__name__}_{reactorName}Tests"
            assert name in generated, name
            cls = generated[name]
            skip = getattr(cls, "skip", None)
            assert skip is None, (name, skip)
            assert getattr(cls, "reactorFactory", None) is not None, name

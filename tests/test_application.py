"""
udpdst.UDPServer, the service counterpart of C{internet.UDPServer}: it binds
in C{privilegedStartService}, answers through secondary addresses, and
returns the closing Deferred from C{stopService}.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

from twisted.application import service
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.protocol import DatagramProtocol

import udpdst
from tests._service_helpers import freePort, twistd
from tests.clients import ask, echo, replyOrNone
from tests.reactors import runUntil


class Echo(DatagramProtocol):
    def datagramReceived(self, data: bytes, addr: Any) -> None:
        self.transport.write(data, addr)


def test_bindsInPrivilegedStartService(epollReactor: Any) -> None:
    """
    C{privilegedStartService} binds (before twistd drops privileges);
    C{startService} then keeps that port, which answers through 127.0.0.2;
    C{stopService} returns a Deferred that fires once the port is closed.
    """
    server = udpdst.UDPServer(0, Echo(), reactor=epollReactor)
    assert server.listeningPort is None
    server.privilegedStartService()
    port = server.listeningPort
    assert isinstance(port, udpdst.DestinationPort)
    assert not server.running
    server.startService()
    assert server.running and server.listeningPort is port
    number = port.getHost().port
    stopped: list[object] = []

    def askThenStop() -> Deferred[bytes | None]:
        def stop(reply: bytes | None) -> Deferred[bytes | None]:
            d = server.stopService()
            stopped.append(d)
            assert isinstance(d, Deferred)
            return d.addCallback(lambda _: reply)

        return ask(epollReactor, "127.0.0.2", number, b"hi", wait=10.0).addCallback(
            stop
        )

    assert runUntil(epollReactor, askThenStop) == b"hi"
    assert len(stopped) == 1
    assert server.listeningPort is None and not server.running
    assert not port.connected
    # The port number is free again.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("", number))


def test_startServiceAloneBindsAndOptionsPassThrough(epollReactor: Any) -> None:
    """
    Started without C{privilegedStartService} (as a child of a running
    parent), it binds in C{startService}; the port's keyword options reach
    the port.
    """
    parent = service.MultiService()
    server = udpdst.UDPServer(
        0,
        Echo(),
        "::",
        maxPacketSize=512,
        reactor=epollReactor,
        v6Only=True,
        receiveBufferSize=65536,
    )
    parent.startService()
    server.setServiceParent(parent)
    port = server.listeningPort
    assert port is not None
    try:
        assert port.maxPacketSize == 512
        assert port.getHandle().getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY)
    finally:
        runUntil(epollReactor, lambda: maybeDeferred(parent.stopService))
    assert server.listeningPort is None


def test_stopServiceNotListening(epollReactor: Any) -> None:
    """
    Stopping a service that never bound returns L{None}, as Twisted's does
    when it has no port.
    """
    server = udpdst.UDPServer(0, Echo(), reactor=epollReactor)
    server.running = True
    assert server.stopService() is None


TAC = """
from twisted.application import service
from twisted.internet.protocol import DatagramProtocol

import udpdst


class Echo(DatagramProtocol):
    def datagramReceived(self, data, addr):
        self.transport.write(b"tac " + data, addr)


application = service.Application("echo")
udpdst.UDPServer({port}, Echo()).setServiceParent(application)
"""


def test_tacWithUdpdstUDPServer(tmp_path: Path) -> None:
    """
    A C{.tac} that changed one line (C{udpdst.UDPServer} for
    C{internet.UDPServer}) answers through 127.0.0.2 under plain
    C{twistd -ny}.
    """
    port = freePort("::")
    tac = tmp_path / "app.tac"
    tac.write_text(TAC.format(port=port))
    with twistd(tmp_path, "-y", str(tac)) as server:
        server.waitAnswering(
            lambda: replyOrNone("127.0.0.1", port, b"up?", 0.5) == b"tac up?"
        )
        reply = echo("127.0.0.2", port, b"hello", timeout=10.0)
        assert reply == b"tac hello", server.output()

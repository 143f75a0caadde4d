"""
The tests' one UDP client: it sends from a socket I{connected} to the server
address it asks, so that the kernel drops a reply from any other source, as
it does for a real client.

Two forms of the same client:

  - L{echo}, blocking, for servers in another process (C{twistd udpdst}, a
    namespace): built on the deployment check's L{udpdst.check.Probe}, whose
    catcher socket lets a wrong-source reply fail the test with its source
    named, instead of as a bare timeout;
  - L{Client} / L{client} / L{send} / L{ask}, in a reactor, for servers in the
    test's own reactor.
"""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.protocol import DatagramProtocol

from udpdst.check import Answer, Probe, askAll

#: How long a blocking client waits for a reply: a bound on a hung test, not
#: a timing assertion (a test that expects no reply waits this long).
REPLY_TIMEOUT = 10.0


def _exchange(
    target: str,
    port: int,
    data: bytes,
    source: str | None,
    sourcePort: int,
    timeout: float,
) -> Answer | None:
    with Probe(target, port, source, sourcePort) as probe:
        (answer,) = askAll([probe], [data], timeout, attempts=1, echoed=False)
    return answer


def echo(
    target: str,
    port: int,
    data: bytes,
    source: str | None = None,
    sourcePort: int = 0,
    timeout: float = REPLY_TIMEOUT,
) -> bytes:
    """
    Send C{data} once from a socket bound to C{source}:C{sourcePort} (the
    kernel's choice by default) and connected to C{target}:C{port}; return
    the reply.

    @raise TimeoutError: No reply within C{timeout} seconds.
    @raise AssertionError: The reply came from another source.
    """
    answer = _exchange(target, port, data, source, sourcePort, timeout)
    if answer is None:
        raise TimeoutError(f"no reply from {target}:{port} in {timeout} s")
    assert answer.fromTarget, (
        f"reply to {target}:{port} came from {answer.source[0]}:{answer.source[1]}"
    )
    return answer.data


def replyOrNone(
    target: str, port: int, data: bytes, timeout: float = REPLY_TIMEOUT
) -> bytes | None:
    """
    Like L{echo}, but L{None} when no reply came from C{target}:C{port}
    within C{timeout} seconds, as a connected client sees it: for polling a
    server that may not be up yet.
    """
    answer = _exchange(target, port, data, None, 0, timeout)
    return answer.data if answer is not None and answer.fromTarget else None


class Client(DatagramProtocol):
    """
    A client in a reactor: collects what it receives, with the address each
    came from; L{waitFor} fires once it has C{n} datagrams.
    """

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor
        # The listening port, kept: an ICMP error makes the reactor drop the
        # port (and the transport with it) on some reactors (epoll).
        self.port: Any = None
        self.received: list[tuple[bytes, Any]] = []
        self._waiting: list[tuple[int, Deferred[None]]] = []

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        self.received.append((data, addr))
        for entry in list(self._waiting):
            count, d = entry
            if len(self.received) >= count:
                self._waiting.remove(entry)
                d.callback(None)

    def connectionRefused(self) -> None:
        """
        Nothing listens there (ICMP): no reply will come; L{waitFor}'s
        timeout says so.
        """

    def waitFor(self, n: int, timeout: float | None = None) -> Deferred[None]:
        """
        Fire once C{n} datagrams have come in all, or, with C{timeout}, when
        that many seconds have passed, whichever is first (then look at
        L{received} to see what came).
        """
        d: Deferred[None] = Deferred()
        entry = (n, d)
        if len(self.received) >= n:
            d.callback(None)
            return d
        self._waiting.append(entry)
        if timeout is not None:

            def expire() -> None:
                if entry in self._waiting:
                    self._waiting.remove(entry)
                    d.callback(None)

            call = self.reactor.callLater(timeout, expire)
            d.addBoth(lambda result: (call.active() and call.cancel(), result)[1])
        return d

    def pending(self) -> bool:
        """
        Whether a datagram is queued on the socket that was not read yet.
        """
        try:
            self.transport.socket.recv(1, socket.MSG_DONTWAIT | socket.MSG_PEEK)  # type: ignore[union-attr]
        except BlockingIOError:
            return False
        return True


def client(
    reactor: Any,
    source: str,
    target: str | None,
    port: int,
    sourcePort: int = 0,
) -> Client:
    """
    A L{Client} on a stock Twisted port bound to C{source}:C{sourcePort}
    (C{""} or C{"::"} for any address) and connected to C{target}:C{port},
    unless C{target} is L{None}.
    """
    c = Client(reactor)
    c.port = reactor.listenUDP(sourcePort, c, interface=source, maxPacketSize=70000)
    if target is not None:
        c.port.connect(target, port)
    return c


def send(c: Client, data: bytes, addr: tuple[str, int] | None = None) -> None:
    """
    Send C{data} from C{c}: to where it is connected, or to C{addr}.
    """
    c.transport.write(data, addr)  # type: ignore[union-attr]


def ask(
    reactor: Any, target: str, port: int, payload: bytes = b"ping", wait: float = 1.0
) -> Deferred[bytes | None]:
    """
    Send C{payload} from a new connected L{Client}; fire with the reply, or
    L{None} if none came within C{wait} seconds.  The client's port is closed
    before the result is given.
    """
    c = client(reactor, "::" if ":" in target else "", target, port)
    send(c, payload)

    def done(_: None) -> Deferred[bytes | None]:
        data = c.received[0][0] if c.received else None
        return maybeDeferred(c.port.stopListening).addCallback(lambda _: data)

    return c.waitFor(1, wait).addCallback(done)

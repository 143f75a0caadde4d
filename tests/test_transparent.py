"""
Transparent ports and their reply sockets (L{udpdst.transparent}) on
loopback: the options a port sets and recognises, replies from a local pair
(free: sent and released; held by another socket: refused), the cache's
order and idle timeout.  Redirected traffic needs a TPROXY rule: that is in
L{tests.test_transparent_netns}.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from typing import Any

import pytest
from twisted.internet.protocol import DatagramProtocol
from twisted.internet.testing import MemoryReactorClock

import udpdst
from tests.clients import ask
from tests.conftest import requiresIPv6
from tests.reactors import runUntil
from udpdst import _linux as L
from udpdst.address import Destination
from udpdst.port import PortCounters
from udpdst.transparent import ReplySockets, isTransparent, makeTransparent

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="IP_TRANSPARENT needs CAP_NET_ADMIN (run as root)"
)


class PlainEcho(DatagramProtocol):
    def datagramReceived(self, data: bytes, addr: Any) -> None:
        self.transport.write(data, addr)


@pytest.fixture
def receiver() -> Iterator[socket.socket]:
    """
    A socket on 127.0.0.1 that the reply sockets send to.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.settimeout(5)
        yield sock


def freePort(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]  # type: ignore[no-any-return]


def replies(clock: Any = None, size: int = 4) -> tuple[ReplySockets, PortCounters]:
    counters = PortCounters()
    return (
        ReplySockets(clock or MemoryReactorClock(), counters, "test", size, 10.0),
        counters,
    )


def test_limitsAreChecked() -> None:
    with pytest.raises(ValueError, match="size"):
        ReplySockets(MemoryReactorClock(), PortCounters(), "test", 0)
    with pytest.raises(ValueError, match="idleTimeout"):
        ReplySockets(MemoryReactorClock(), PortCounters(), "test", 1, 0)


def test_optionIsSetAndRecognised() -> None:
    """
    L{makeTransparent} sets the option on both families of an IPv6 socket;
    L{isTransparent} sees it.
    """
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as sock:
        assert not isTransparent(sock)
        makeTransparent(sock)
        assert isTransparent(sock)
        assert sock.getsockopt(L.SOL_IP, L.IP_TRANSPARENT) == 1
        assert sock.getsockopt(L.SOL_IPV6, L.IPV6_TRANSPARENT) == 1


def test_freeLocalPairIsAnsweredAndReleased(receiver: socket.socket) -> None:
    """
    A reply from one of the host's own addresses, on a port nothing holds,
    leaves from that pair through a socket closed right after: the pair is
    free again at once, for a service that wants it.
    """
    cache, counters = replies()
    pair = ("127.0.0.2", freePort("127.0.0.2"))
    cache.send(
        b"hello", cache.route(receiver.getsockname(), Destination(*pair, 0, pair[0]))
    )
    data, source = receiver.recvfrom(100)
    assert (data, source) == (b"hello", pair)
    assert len(cache) == 0
    assert (counters.replySocketsOpened, counters.replied) == (1, 1)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as service:
        service.bind(pair)


@pytest.mark.parametrize("wildcard", [False, True], ids=["same-address", "wildcard"])
def test_heldLocalPairIsRefused(receiver: socket.socket, wildcard: bool) -> None:
    """
    A pair another socket holds (on that address, or on the wildcard) is
    never bound: the reply is refused and counted, and the holder keeps
    receiving its datagrams.
    """
    cache, counters = replies()
    port = freePort("127.0.0.2")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as service:
        service.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        service.bind(("0.0.0.0" if wildcard else "127.0.0.2", port))
        service.settimeout(5)
        cache.send(
            b"hello",
            cache.route(receiver.getsockname(), Destination("127.0.0.2", port, 0)),
        )
        receiver.sendto(b"for the service", ("127.0.0.2", port))
        assert service.recvfrom(100)[0] == b"for the service"
    assert (counters.replySocketsRefused, counters.replied) == (1, 0)
    assert counters.replySocketsOpened == 0
    receiver.setblocking(False)
    with pytest.raises(BlockingIOError):
        receiver.recv(100)


def test_mappedPeerIsAnsweredOverIPv4(receiver: socket.socket) -> None:
    """
    An IPv4 client of a dual-stack port (C{::ffff:a.b.c.d}) is answered
    from an IPv4 reply socket.
    """
    cache, counters = replies()
    pair = ("127.0.0.3", freePort("127.0.0.3"))
    host, port = receiver.getsockname()
    route = cache.route(("::ffff:" + host, port, 0, 0), Destination(*pair, 0, pair[0]))
    cache.send(b"hi", route)
    assert receiver.recvfrom(100) == (b"hi", pair)
    assert counters.replied == 1


class _Opened:
    """
    Stands in for the opening of sockets bound to foreign addresses, which
    loopback has none of (the real ones: L{tests.test_transparent_netns}):
    each pair gets a real loopback socket, kept.
    """

    def __init__(self) -> None:
        self.opened: list[tuple[Any, ...]] = []

    def __call__(
        self, family: int, local: tuple[Any, ...], dst: Destination
    ) -> tuple[socket.socket, bool]:
        self.opened.append(local[:2])
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("127.0.0.1", 0))
        return sock, True


def test_cacheKeepsTheMostRecentlyUsed(
    receiver: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    """
    The cache holds at most C{size} sockets; the least recently used one is
    closed to make room, and a socket used again moves to the back.
    """
    cache, counters = replies(size=2)
    opened = _Opened()
    monkeypatch.setattr(cache, "_open", opened)
    peer = receiver.getsockname()
    a, b, c = (Destination("198.51.100.1", p, 0) for p in (1, 2, 3))
    for dst in (a, b, a, c, a, b):
        cache.send(b"x", cache.route(peer, dst))
    # a, b opened; a reused; c evicts b (least recent); a reused; b evicts c.
    assert opened.opened == [
        ("198.51.100.1", 1),
        ("198.51.100.1", 2),
        ("198.51.100.1", 3),
        ("198.51.100.1", 2),
    ]
    assert (
        counters.replySocketsOpened,
        counters.replySocketsReused,
        counters.replySocketsEvicted,
        counters.replied,
    ) == (4, 2, 2, 6)
    assert len(cache) == 2
    cache.close()
    assert len(cache) == 0


def test_idleSocketsAreClosed(
    receiver: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    """
    A socket unused for C{idleTimeout} seconds is closed (counted as
    evicted); one used meanwhile stays; closing the cache stops the timer.
    """
    clock = MemoryReactorClock()
    cache, counters = replies(clock)
    monkeypatch.setattr(cache, "_open", _Opened())
    peer = receiver.getsockname()
    old, busy = Destination("198.51.100.1", 1, 0), Destination("198.51.100.1", 2, 0)
    cache.send(b"x", cache.route(peer, old))
    clock.advance(6)
    cache.send(b"x", cache.route(peer, busy))
    clock.advance(5)
    assert (len(cache), counters.replySocketsEvicted) == (1, 1)
    clock.advance(5)
    assert (len(cache), counters.replySocketsEvicted) == (0, 2)
    assert not clock.getDelayedCalls()
    cache.send(b"x", cache.route(peer, old))
    cache.close()
    assert not clock.getDelayedCalls()


def test_portIsTransparent(epollReactor: Any) -> None:
    """
    C{transparent=True} sets the option before binding (and on both
    families of a dual-stack socket), and the port still answers datagrams
    sent to its own port from the address they went to.
    """
    port = udpdst.listenUDP(
        0, PlainEcho(), "0.0.0.0", reactor=epollReactor, transparent=True
    )
    try:
        assert port.transparent and isTransparent(port.getHandle())
        number = port.getHost().port
        got = runUntil(
            epollReactor, lambda: ask(epollReactor, "127.0.0.2", number, b"x")
        )
    finally:
        port.stopListening()
    assert got == b"x"
    assert port.counters.replySocketsOpened == 0


@requiresIPv6
def test_dualStackPortIsTransparentForBoth(epollReactor: Any) -> None:
    port = udpdst.listenUDP(
        0, PlainEcho(), "::", reactor=epollReactor, transparent=True
    )
    try:
        sock = port.getHandle()
        assert sock.getsockopt(L.SOL_IP, L.IP_TRANSPARENT) == 1
        assert sock.getsockopt(L.SOL_IPV6, L.IPV6_TRANSPARENT) == 1
    finally:
        port.stopListening()


@pytest.mark.parametrize(
    "preset, asked", [(True, False), (False, True), (False, False)]
)
def test_adoptedSocket(epollReactor: Any, preset: bool, asked: bool) -> None:
    """
    An adopted socket that has C{IP_TRANSPARENT} is served as transparent
    without being asked; asked, the port sets it; neither, it is not.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    if preset:
        makeTransparent(sock)
    sock.bind(("127.0.0.1", 0))
    sock.setblocking(False)
    port = udpdst.adoptDatagramPort(
        sock.fileno(),
        socket.AF_INET,
        PlainEcho(),
        reactor=epollReactor,
        transparent=asked,
    )
    sock.close()
    try:
        assert port.transparent is (preset or asked)
        assert isTransparent(port.getHandle()) is (preset or asked)
    finally:
        port.stopListening()


def test_udpServerPassesTheOption(epollReactor: Any) -> None:
    server = udpdst.UDPServer(
        0,
        PlainEcho(),
        "127.0.0.1",
        reactor=epollReactor,
        transparent=True,
        replySockets=8,
    )
    server.privilegedStartService()
    try:
        port = server.listeningPort
        assert port is not None and port.transparent and port.replySockets == 8
        assert isTransparent(port.getHandle())
    finally:
        server.stopService()

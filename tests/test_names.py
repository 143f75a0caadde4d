"""
An unchanged C{twisted.names} DNS server on the port answers through a
secondary address, also when its answer comes later (after a Deferred).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.names import authority, common, dns, server

import udpdst
from tests.clients import client, send
from tests.conftest import requiresIPv6
from tests.reactors import runUntil

ZONE = """
zone = [
    SOA('example.test', mname='ns1.example.test', rname='hostmaster.example.test',
        serial=1, refresh=3600, retry=600, expire=86400, minimum=300),
    A('www.example.test', '192.0.2.80'),
]
"""


class SlowResolver(common.ResolverBase):
    """
    Answers from C{inner} after C{delay} seconds, as a forwarding resolver
    would.
    """

    def __init__(self, reactor: Any, inner: Any, delay: float) -> None:
        common.ResolverBase.__init__(self)
        self.reactor = reactor
        self.inner = inner
        self.delay = delay

    def _lookup(self, name: bytes, cls: int, type: int, timeout: Any) -> Deferred[Any]:
        return deferLater(
            self.reactor, self.delay, self.inner._lookup, name, cls, type, timeout
        )


def startServer(reactor: Any, tmp: Path, interface: str, delay: float) -> Any:
    zoneFile = tmp / "zone.py"
    zoneFile.write_text(ZONE)
    zone = authority.PySourceAuthority(str(zoneFile))
    if delay:
        factory = server.DNSServerFactory(clients=[SlowResolver(reactor, zone, delay)])
    else:
        factory = server.DNSServerFactory(authorities=[zone])
    protocol = dns.DNSDatagramProtocol(factory, reactor=reactor)
    return udpdst.listenUDP(0, protocol, interface, reactor=reactor)


def query(ident: int) -> bytes:
    message = dns.Message(id=ident, recDes=True)
    message.addQuery(b"www.example.test", dns.A)
    return message.toStr()  # type: ignore[no-any-return]


def askDNS(
    reactor: Any, asks: list[tuple[int, str]], port: int, connectTo: str | None
) -> Deferred[Any]:
    """
    Send one query per C{(id, address)}; with C{connectTo} from a socket
    connected there, else from one unconnected socket.  Fire with the replies
    that came within two seconds, by query id: the address each came from
    and its A records.
    """
    family6 = ":" in (connectTo or asks[0][1])
    c = client(reactor, "::1" if family6 else "", connectTo, port)
    for ident, target in asks:
        send(c, query(ident), None if connectTo else (target, port))

    def finish(_: None) -> Deferred[Any]:
        replies = {}
        for data, addr in c.received:
            message = dns.Message()
            message.fromStr(data)
            answers = [
                a.payload.dottedQuad() for a in message.answers if a.type == dns.A
            ]
            replies[message.id] = (addr, answers)
        return defer.maybeDeferred(c.port.stopListening).addCallback(lambda _: replies)

    return c.waitFor(len(asks), 2.0).addCallback(finish)


@pytest.mark.parametrize("delay", [0, 0.2], ids=["authority", "delayed-resolver"])
@pytest.mark.parametrize(
    "interface, target",
    [("0.0.0.0", "127.0.0.2"), pytest.param("::", "127.0.0.3", marks=requiresIPv6)],
)
def test_dnsThroughSecondaryAddress(
    epollReactor: Any, tmp_path: Path, interface: str, target: str, delay: float
) -> None:
    """
    A client connected to a secondary address gets the server's answer, from
    an authority at once or from a resolver after a delay.
    """
    port = startServer(epollReactor, tmp_path, interface, delay)
    portNumber = port.getHost().port
    try:
        replies = runUntil(
            epollReactor,
            lambda: askDNS(epollReactor, [(7, target)], portNumber, target),
        )
    finally:
        port.stopListening()
    assert replies == {7: ((target, portNumber), ["192.0.2.80"])}


def test_stockDNSServerFailsThroughSecondaryAddress(
    epollReactor: Any, tmp_path: Path
) -> None:
    """
    The same server on stock C{reactor.listenUDP}: no answer through 127.0.0.2.
    """
    zoneFile = tmp_path / "zone.py"
    zoneFile.write_text(ZONE)
    factory = server.DNSServerFactory(
        authorities=[authority.PySourceAuthority(str(zoneFile))]
    )
    port = epollReactor.listenUDP(
        0, dns.DNSDatagramProtocol(factory, reactor=epollReactor)
    )
    try:
        replies = runUntil(
            epollReactor,
            lambda: askDNS(
                epollReactor, [(7, "127.0.0.2")], port.getHost().port, "127.0.0.2"
            ),
        )
    finally:
        port.stopListening()
    assert replies == {}


@pytest.mark.parametrize("delay", [0, 0.2], ids=["authority", "delayed-resolver"])
def test_oneSocketTwoAddressesAlternately(
    epollReactor: Any, tmp_path: Path, delay: float
) -> None:
    """
    One client socket asks 127.0.0.2 and 127.0.0.3 alternately, all queries
    in flight at once; each answer comes from the address its query went to,
    although the server sees the same peer address for all of them.
    """
    port = startServer(epollReactor, tmp_path, "0.0.0.0", delay)
    portNumber = port.getHost().port
    asks = [(i, "127.0.0.2" if i % 2 else "127.0.0.3") for i in range(1, 9)]
    try:
        replies = runUntil(
            epollReactor, lambda: askDNS(epollReactor, asks, portNumber, None)
        )
    finally:
        port.stopListening()
    assert replies == {i: ((target, portNumber), ["192.0.2.80"]) for i, target in asks}

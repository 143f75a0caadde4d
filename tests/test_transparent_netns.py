"""
Transparent delivery: an nftables C{TPROXY} rule hands one socket datagrams
sent to many C{(address, port)} pairs, and each reply must leave from the pair
its datagram went to, or the client's connected socket drops it.

The server namespace redirects (L{tests.netns.Pair.redirect}) everything the
client sends to 198.51.100.0/24 and 2001:db8:77::/64 (addresses nobody has;
the client routes them to the server), and to the server's own primary
addresses on ports L{FREE} and L{HELD}, to the listener on L{LISTEN}.  The
echo server (L{tests._netns_server}) says in each reply which destination it
saw and its counters at the time.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.netns import (
    CLIENT_SCRIPT,
    NetnsError,
    Pair,
    ServerProcess,
    nftUnavailableReason,
)

pytestmark = pytest.mark.netns

P = Pair

#: The listener's port, where TPROXY delivers.
LISTEN = 7000
#: A port on the server's own address that nothing else binds.
FREE = 5300
#: A port on the server's own address that a local service holds.
HELD = 5301

REPLY_TIMEOUT = 2.0


@pytest.fixture(scope="module")
def pair() -> Iterator[Pair]:
    reason = nftUnavailableReason()
    if reason is not None:
        pytest.skip(reason)
    built = Pair.create()
    try:
        built.redirect(LISTEN, (FREE, HELD))
        yield built
    finally:
        built.delete()


@pytest.fixture
def startServer(pair: Pair) -> Iterator[Callable[..., ServerProcess]]:
    started: list[ServerProcess] = []

    def start(*args: str) -> ServerProcess:
        server = pair.startServer("--port", str(LISTEN), *args)
        started.append(server)
        return server

    try:
        yield start
    finally:
        for server in started:
            server.stop()


def q(host: str, port: int, payload: str = "query") -> dict[str, Any]:
    return {
        "host": host,
        "port": port,
        "timeout": REPLY_TIMEOUT,
        "payload": payload,
    }


def assertFrom(result: dict[str, Any], host: str, port: int) -> dict[str, Any]:
    """
    The connected client accepted a reply from C{host}:C{port}, whose
    server saw that destination; return the server's report.
    """
    assert result["ok"], f"no reply to {result['query']}: {result['error']}"
    assert result["source"] == [host, port], result
    reply = result["reply"]
    assert reply["dst"]["host"] == host, reply
    assert reply["dst"]["port"] == port, reply
    return reply  # type: ignore[no-any-return]


FAMILIES = pytest.mark.parametrize(
    "interface, foreign, own",
    [
        ("0.0.0.0", "198.51.100.", P.SERVER_V4),
        ("::", "198.51.100.", P.SERVER_V4),
        ("::", "2001:db8:77::", P.SERVER_V6),
    ],
    ids=["ipv4", "ipv4-on-dualstack", "ipv6"],
)


@FAMILIES
@pytest.mark.parametrize("how", ["listen", "adopt"])
@pytest.mark.parametrize("protocol", ["dst", "plain"])
def test_repliesFromEachRedirectedPair(
    pair: Pair,
    startServer: Callable[..., ServerProcess],
    interface: str,
    foreign: str,
    own: str,
    how: str,
    protocol: str,
) -> None:
    """
    Connected clients sending to three redirected pairs (two foreign
    addresses, on a well-known and an ordinary port, and the server's own
    address on another port) accept every reply; a datagram to the
    listener's own port on the same socket is answered as ever.  Foreign
    pairs get a cached reply socket; the own address gets one for that
    reply only.
    """
    server = startServer(
        "--interface", interface, "--transparent", how, "--protocol", protocol
    )
    targets = [(foreign + "7", 5353), (foreign + "8", 123), (own, FREE), (own, LISTEN)]
    results = pair.query(*(q(h, p) for h, p in targets))
    for result, (host, port) in zip(results, targets, strict=True):
        assertFrom(result, host, port)
    again = pair.query(q(foreign + "7", 5353, "again"))
    counters = assertFrom(again[0], foreign + "7", 5353)["counters"]
    assert {
        k: counters[k]
        for k in (
            "replySocketsOpened",
            "replySocketsReused",
            "replySocketsFailed",
            "replySocketsRefused",
            "sendErrors",
        )
    } == {
        "replySocketsOpened": 3,
        "replySocketsReused": 0,
        "replySocketsFailed": 0,
        "replySocketsRefused": 0,
        "sendErrors": 0,
    }, counters
    final = server.stop()
    assert final is not None
    assert final["replySocketsReused"] == 1, final
    assert final["replied"] == 5, final


@FAMILIES
def test_moreDestinationsThanTheCacheHolds(
    pair: Pair,
    startServer: Callable[..., ServerProcess],
    interface: str,
    foreign: str,
    own: str,
) -> None:
    """
    With room for 4 reply sockets, 12 distinct foreign pairs (and the first
    ones again, after they were evicted) are all answered from themselves;
    the cache never holds more than its size.
    """
    server = startServer(
        "--interface", interface, "--transparent", "listen", "--reply-sockets", "4"
    )
    targets = [(foreign + str(10 + i), 6000 + i) for i in range(12)]
    targets += targets[:2]
    results = pair.query(*(q(h, p) for h, p in targets))
    for result, (host, port) in zip(results, targets, strict=True):
        assertFrom(result, host, port)
    final = server.stop()
    assert final is not None
    assert final["replySocketsOpened"] == 14, final
    assert final["replySocketsEvicted"] == 10, final
    assert final["replied"] == 14, final


def test_idleReplySocketsAreClosed(
    pair: Pair, startServer: Callable[..., ServerProcess]
) -> None:
    """
    A reply socket unused for the idle timeout is closed (counted as
    evicted); the next reply from its pair opens another.
    """
    server = startServer(
        "--interface", "::", "--transparent", "listen", "--reply-idle", "0.2"
    )
    first = pair.query(q("198.51.100.30", 5353))
    assertFrom(first[0], "198.51.100.30", 5353)
    # Wait (bounded) until the sweep has run, asking the listener's own port
    # (no reply socket): its replies report the counters.
    for _ in range(50):
        later = pair.query(q(P.SERVER_V4, LISTEN, "later"))
        counters = assertFrom(later[0], P.SERVER_V4, LISTEN)["counters"]
        if counters["replySocketsEvicted"] >= 1:
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"no idle reply socket closed: {counters}")
    again = pair.query(q("198.51.100.30", 5353, "again"))
    assertFrom(again[0], "198.51.100.30", 5353)
    final = server.stop()
    assert final is not None
    # The pair's one socket was closed, and its next reply opened another.
    assert final["replySocketsOpened"] == 2, final
    assert final["replySocketsReused"] == 0, final
    assert final["replySocketsEvicted"] >= 1, final


def _localQuery(pair: Pair, host: str, port: int) -> dict[str, Any]:
    """
    Ask C{host}:C{port} from inside the server namespace (not redirected).
    """
    assert pair.server is not None
    out = pair.server.run(
        sys.executable, str(CLIENT_SCRIPT), json.dumps([q(host, port, "local")])
    )
    return json.loads(out)[0]  # type: ignore[no-any-return]


_SERVICE = """
import os, socket, sys, threading
family = socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET
s = socket.socket(family, socket.SOCK_DGRAM)
s.bind((sys.argv[1], int(sys.argv[2])))
def watch():
    while os.read(0, 4096):
        pass
    print("COUNTERS {}", flush=True)
    os._exit(0)
threading.Thread(target=watch, daemon=True).start()
print("READY", sys.argv[2], flush=True)
while True:
    data, peer = s.recvfrom(2048)
    s.sendto(b'"service"', peer)
"""


@pytest.mark.parametrize("own", [P.SERVER_V4, P.SERVER_V6], ids=["ipv4", "ipv6"])
def test_localServiceKeepsItsDatagrams(
    pair: Pair, startServer: Callable[..., ServerProcess], own: str
) -> None:
    """
    A local service bound to the server's own address on L{HELD} keeps
    receiving (and answering) its own traffic while redirected datagrams to
    that pair reach udpdst: udpdst refuses to reply from a pair another
    socket holds (a reply socket there would take the service's datagrams),
    and counts it.  A free pair (L{FREE}) is answered, and left free: the
    service can bind it right after.
    """
    assert pair.server is not None
    server = startServer("--interface", "::", "--transparent", "listen")
    service = ServerProcess(
        pair.server.argv(sys.executable, "-c", _SERVICE, own, str(HELD))
    )
    try:
        service.waitReady(10)
        redirected = pair.query(q(own, HELD))[0]
        assert not redirected["ok"], redirected
        local = _localQuery(pair, own, HELD)
        assert local["ok"], local
        assert local["source"] == [own, HELD] and local["reply"] == "service", local
        answered = pair.query(q(own, FREE))[0]
        assertFrom(answered, own, FREE)
    finally:
        service.stop()
    free = ServerProcess(
        pair.server.argv(sys.executable, "-c", _SERVICE, own, str(FREE))
    )
    try:
        free.waitReady(10)
    finally:
        free.stop()
    final = server.stop()
    assert final is not None
    assert final["replySocketsRefused"] == 1, final
    assert final["replySocketsOpened"] == 1, final
    assert final["received"] == 2, final


def test_refusedWithoutCapability(pair: Pair) -> None:
    """
    Without CAP_NET_ADMIN and CAP_NET_RAW, C{transparent=True} fails at
    start with one line naming the capability.
    """
    assert pair.server is not None
    argv = pair.server.argv(
        "setpriv",
        "--bounding-set=-net_admin,-net_raw",
        "--inh-caps=-net_admin,-net_raw",
        sys.executable,
        "-c",
        "from udpdst import listenUDP\n"
        "from twisted.internet.protocol import DatagramProtocol\n"
        "from twisted.internet.error import CannotListenError\n"
        "try:\n"
        "    listenUDP(7100, DatagramProtocol(), '::', transparent=True)\n"
        "except CannotListenError as e:\n"
        "    print(e)\n",
    )
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    if proc.returncode != 0 and "setpriv" in proc.stderr:
        raise NetnsError(proc.stderr)
    lines = proc.stdout.splitlines()
    assert len(lines) == 1, proc
    assert "CAP_NET_ADMIN" in lines[0] and "7100" in lines[0], lines

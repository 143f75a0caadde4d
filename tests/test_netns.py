"""
Replies leave from the address the client used, in the cases loopback cannot
show: secondary and late addresses, link-local IPv6, broadcast, IPv6
multicast, a VIP on lo (direct server return), and a source address that
vanishes before the reply.

Each test runs the echo server (L{tests._netns_server}) in a server
namespace and the client (L{tests._netns_client}) in a client namespace,
joined by a veth pair (see L{tests.netns.Pair}).  Clients use connected
sockets wherever a reply can only come from the address they sent to, so a
reply from the wrong address is dropped by the client's kernel and shows as a
timeout; the server's reply says which destination it saw, and the tests check
that too.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.netns import NetnsError, Pair, ServerProcess, builtPair

pytestmark = pytest.mark.netns

#: Bound on each reply the client waits for.
REPLY_TIMEOUT = 2.0

P = Pair  # the addresses


@pytest.fixture(scope="module")
def pair() -> Iterator[Pair]:
    """
    One namespace pair for the tests that do not change it.
    """
    yield from builtPair()


@pytest.fixture
def ownPair() -> Iterator[Pair]:
    """
    A namespace pair of the test's own, for tests that add or remove
    addresses.
    """
    yield from builtPair()


@pytest.fixture
def startServer() -> Iterator[Callable[..., ServerProcess]]:
    """
    Start the echo server in a pair's server namespace; every server started
    is stopped when the test ends.
    """
    started: list[ServerProcess] = []

    def start(on: Pair, *args: str) -> ServerProcess:
        server = on.startServer(*args)
        started.append(server)
        return server

    try:
        yield start
    finally:
        for server in started:
            server.stop()


def q(host: str, port: int, **options: Any) -> dict[str, Any]:
    """
    A client query: connected unless told otherwise, bounded wait.
    """
    return {"host": host, "port": port, "timeout": REPLY_TIMEOUT, **options}


def assertAnswered(
    result: dict[str, Any],
    *,
    source: str,
    port: int,
    dstHost: str,
    replyFrom: str,
    ifindex: int,
    peer: str | None = None,
) -> dict[str, Any]:
    """
    The query got a reply from C{source}:C{port}, and the server saw the
    destination it should have.  Return the server's report.
    """
    assert result["ok"], f"no reply to {result['query']}: {result['error']}"
    assert result["source"] == [source, port], result
    reply = result["reply"]
    dst = reply["dst"]
    assert dst is not None, f"server saw no destination: {reply}"
    assert dst == {
        "host": dstHost,
        "port": port,
        "ifindex": ifindex,
        "replyFrom": replyFrom,
    }, reply
    if peer is not None:
        assert reply["peer"] == [peer, result["local"][1]], reply
    assert reply["peerType"] == "PeerAddress", reply
    return reply  # type: ignore[no-any-return]


def assertEachFromItself(
    pair: Pair,
    results: list[dict[str, Any]],
    targets: list[str],
    port: int,
    peers: list[str] | None = None,
) -> None:
    """
    Each unicast query was answered from the address it went to, which the
    server saw as destination and reply source, arriving on its veth.
    """
    for i, (result, address) in enumerate(zip(results, targets, strict=True)):
        assertAnswered(
            result,
            source=address,
            port=port,
            dstHost=address,
            replyFrom=address,
            ifindex=pair.serverIfindex,
            peer=None if peers is None else peers[i],
        )


def assertCounters(server: ServerProcess, **expected: int) -> None:
    counters = server.stop()
    assert counters is not None, f"no counters from the server: {server.seen}"
    assert {k: counters[k] for k in expected} == expected, counters


PROTOCOLS = pytest.mark.parametrize("protocol", ["dst", "plain"])


# 1. Secondary IPv4 address


@PROTOCOLS
@pytest.mark.parametrize("interface", ["0.0.0.0", "", "::"])
def test_secondaryIPv4(
    pair: Pair, startServer: Callable[..., ServerProcess], interface: str, protocol: str
) -> None:
    """
    A server on an IPv4 or dual-stack wildcard answers queries to its primary
    and secondary IPv4 addresses from the address each query went to.
    """
    server = startServer(pair, "--interface", interface, "--protocol", protocol)
    port = server.port
    assert port is not None
    peer = P.CLIENT_V4 if interface != "::" else "::ffff:" + P.CLIENT_V4
    results = pair.query(q(P.SERVER_V4, port), q(P.SERVER_V4_SECONDARY, port))
    targets = [P.SERVER_V4, P.SERVER_V4_SECONDARY]
    assertEachFromItself(pair, results, targets, port, [peer, peer])
    assertCounters(server, received=2, replied=2, sendFallbacks=0, controlTruncated=0)


# 2. Secondary IPv6 address


@PROTOCOLS
@pytest.mark.parametrize("v6only", [False, True], ids=["dualstack", "v6only"])
def test_secondaryIPv6(
    pair: Pair, startServer: Callable[..., ServerProcess], v6only: bool, protocol: str
) -> None:
    """
    A server on C{::} answers queries to its primary and secondary IPv6
    addresses from the address each query went to.
    """
    args = ["--interface", "::", "--protocol", protocol] + (
        ["--v6only"] if v6only else []
    )
    server = startServer(pair, *args)
    port = server.port
    assert port is not None
    results = pair.query(q(P.SERVER_V6, port), q(P.SERVER_V6_SECONDARY, port))
    targets = [P.SERVER_V6, P.SERVER_V6_SECONDARY]
    assertEachFromItself(pair, results, targets, port, [P.CLIENT_V6] * 2)
    assertCounters(server, received=2, replied=2, sendFallbacks=0)


# 3. IPv6 link-local


@PROTOCOLS
def test_linkLocalIPv6(
    pair: Pair, startServer: Callable[..., ServerProcess], protocol: str
) -> None:
    """
    A query to the server's link-local address is answered from it: the
    server sees the peer with its scope (C{fe80::5%veth0}) and the reply goes
    out on that link.
    """
    server = startServer(pair, "--interface", "::", "--protocol", protocol)
    port = server.port
    assert port is not None
    (result,) = pair.query(q(f"{P.SERVER_LL}%{P.CLIENT_IF}", port))
    assertAnswered(
        result,
        source=P.SERVER_LL,
        port=port,
        dstHost=P.SERVER_LL,
        replyFrom=P.SERVER_LL,
        ifindex=pair.serverIfindex,
        peer=f"{P.CLIENT_LL}%{P.SERVER_IF}",
    )
    assert result["sourceScope"] == pair.clientIfindex
    assertCounters(server, received=1, replied=1, sendFallbacks=0)


# 4. IPv4 clients of a dual-stack socket


def test_ipv4ClientsOnDualStack(
    pair: Pair, startServer: Callable[..., ServerProcess]
) -> None:
    """
    On one C{::} socket, IPv4 clients (seen as C{::ffff:10.1.2.5}) and IPv6
    clients, interleaved, are each answered from the address they used; the
    destination of IPv4 clients is reported in dotted form.
    """
    server = startServer(pair, "--interface", "::")
    port = server.port
    assert port is not None
    targets = [P.SERVER_V4_SECONDARY, P.SERVER_V6_SECONDARY, P.SERVER_V4, P.SERVER_V6]
    results = pair.query(*(q(t, port) for t in targets))
    peers = [P.CLIENT_V6 if ":" in t else "::ffff:" + P.CLIENT_V4 for t in targets]
    assertEachFromItself(pair, results, targets, port, peers)
    assertCounters(server, received=4, replied=4, sendFallbacks=0)


# 5. Broadcast


@PROTOCOLS
@pytest.mark.parametrize("interface", ["0.0.0.0", "::"])
@pytest.mark.parametrize(
    "broadcast", [P.BROADCAST_V4, "255.255.255.255"], ids=["subnet", "limited"]
)
def test_broadcast(
    pair: Pair,
    startServer: Callable[..., ServerProcess],
    interface: str,
    broadcast: str,
    protocol: str,
) -> None:
    """
    A broadcast query is answered from the receiving interface's primary
    address (the kernel's C{spec_dst}), not from the broadcast address; the
    server reports the broadcast address as the destination.

    The client cannot connect (the reply comes from another address than the
    one it sent to), so it checks the reply's source itself.
    """
    server = startServer(pair, "--interface", interface, "--protocol", protocol)
    port = server.port
    assert port is not None
    # Bound to its address so that the limited broadcast has a way out.
    (result,) = pair.query(
        q(broadcast, port, connected=False, broadcast=True, bind=P.CLIENT_V4)
    )
    assertAnswered(
        result,
        source=P.SERVER_V4,
        port=port,
        dstHost=broadcast,
        replyFrom=P.SERVER_V4,
        ifindex=pair.serverIfindex,
        peer=P.CLIENT_V4 if interface != "::" else "::ffff:" + P.CLIENT_V4,
    )
    assertCounters(server, received=1, replied=1, sendFallbacks=0)


# 6. An address added after the server started


def test_addressAddedAfterStart(
    ownPair: Pair, startServer: Callable[..., ServerProcess]
) -> None:
    """
    Addresses added while the server runs are answered from at once, with no
    restart and no rebinding.
    """
    server = startServer(ownPair, "--interface", "::")
    port = server.port
    assert port is not None
    assert ownPair.server is not None
    ownPair.server.ip("addr", "add", f"{P.SERVER_V4_LATE}/24", "dev", P.SERVER_IF)
    ownPair.server.ip(
        "addr", "add", f"{P.SERVER_V6_LATE}/64", "dev", P.SERVER_IF, "nodad"
    )
    results = ownPair.query(q(P.SERVER_V4_LATE, port), q(P.SERVER_V6_LATE, port))
    assertEachFromItself(
        ownPair,
        results,
        [P.SERVER_V4_LATE, P.SERVER_V6_LATE],
        port,
        ["::ffff:" + P.CLIENT_V4, P.CLIENT_V6],
    )
    assertCounters(server, received=2, replied=2, sendFallbacks=0)


# 7. A VIP on lo, as in direct server return


@pytest.mark.parametrize("interface", ["0.0.0.0", "::"])
def test_vipOnLoopback(
    pair: Pair, startServer: Callable[..., ServerProcess], interface: str
) -> None:
    """
    A query routed by the client to a VIP that lives on the server's C{lo}
    arrives on the veth and is answered from the VIP.
    """
    server = startServer(pair, "--interface", interface)
    port = server.port
    assert port is not None
    targets = [P.VIP_V4] + ([P.VIP_V6] if interface == "::" else [])
    results = pair.query(*(q(t, port) for t in targets))
    # The helper expects the veth's ifindex: the VIP lives on lo, but the
    # query arrived on the veth.
    assertEachFromItself(pair, results, targets, port)
    assertCounters(server, received=len(targets), replied=len(targets), sendFallbacks=0)


# 8. IPv6 multicast


@PROTOCOLS
@pytest.mark.parametrize("group", ["ff02::1:2345", "ff15::1234"])
def test_ipv6Multicast(
    pair: Pair, startServer: Callable[..., ServerProcess], group: str, protocol: str
) -> None:
    """
    A query to a group the server joined on its veth is answered from a
    unicast address of the server on that link (the reply names C{::} and
    the interface, the kernel picks the address), never from the group.
    """
    server = startServer(
        pair,
        "--interface",
        "::",
        "--protocol",
        protocol,
        "--join",
        f"{group}%{P.SERVER_IF}",
    )
    port = server.port
    assert port is not None
    (result,) = pair.query(q(group, port, connected=False, multicastIf=P.CLIENT_IF))
    assert result["ok"], f"no reply to {result['query']}: {result['error']}"
    unicast = {P.SERVER_V6, P.SERVER_V6_SECONDARY, P.SERVER_LL}
    assert result["source"][0] in unicast, result
    assert result["source"][1] == port, result
    reply = result["reply"]
    assert reply["dst"] == {
        "host": group,
        "port": port,
        "ifindex": pair.serverIfindex,
        "replyFrom": "::",
    }, reply
    if result["source"][0] == P.SERVER_LL:
        # The client sent from its link-local address; the reply to it must
        # come from the same link.
        assert reply["peer"][0] == f"{P.CLIENT_LL}%{P.SERVER_IF}", reply
        assert result["sourceScope"] == pair.clientIfindex, result
    assertCounters(server, received=1, replied=1, sendFallbacks=0)


@PROTOCOLS
@pytest.mark.parametrize("interface", ["0.0.0.0", "::"])
def test_ipv4Multicast(
    pair: Pair, startServer: Callable[..., ServerProcess], interface: str, protocol: str
) -> None:
    """
    A query to an IPv4 group the server joined on its veth is answered from
    the unicast C{spec_dst} of that interface (its primary address), never
    from the group; C{dst} reports the group.
    """
    group = "239.1.2.3"
    server = startServer(
        pair,
        "--interface",
        interface,
        "--protocol",
        protocol,
        "--join",
        f"{group}%{P.SERVER_IF}",
    )
    port = server.port
    assert port is not None
    (result,) = pair.query(
        q(group, port, connected=False, multicastIf=P.CLIENT_IF, bind=P.CLIENT_V4)
    )
    assert result["ok"], f"no reply to {result['query']}: {result['error']}"
    assert result["source"] == [P.SERVER_V4, port], result
    assert result["reply"]["dst"] == {
        "host": group,
        "port": port,
        "ifindex": pair.serverIfindex,
        "replyFrom": P.SERVER_V4,
    }, result["reply"]
    assertCounters(server, received=1, replied=1, sendFallbacks=0)


# 9. The bug itself, with Twisted's own port


def test_stockTwistedFailsSecondaryIPv4(
    pair: Pair, startServer: Callable[..., ServerProcess]
) -> None:
    """
    Twisted's C{reactor.listenUDP} on C{0.0.0.0} answers a query to the
    secondary address from the primary: a connected client drops it (its
    catcher sees the wrong source), an unconnected one takes it.  This shows
    that the namespace set-up reproduces the bug udpdst fixes.
    """
    server = startServer(pair, "--impl", "stock", "--interface", "0.0.0.0")
    port = server.port
    assert port is not None
    primary, secondary, unconnected = pair.query(
        q(P.SERVER_V4, port),
        q(P.SERVER_V4_SECONDARY, port),
        q(P.SERVER_V4_SECONDARY, port, connected=False),
    )
    assert primary["ok"] and primary["source"] == [P.SERVER_V4, port], primary
    assert not secondary["ok"] and secondary["error"] == "wrong source", secondary
    assert secondary["source"] == [P.SERVER_V4, port], secondary
    assert unconnected["ok"], unconnected
    assert unconnected["source"] == [P.SERVER_V4, port], unconnected
    # All three were received and answered: the second reply was dropped by
    # the client, not lost by the server.
    server.waitForCount("SENT", 3, timeout=5.0)


def test_stockTwistedFailsSecondaryIPv6(
    pair: Pair, startServer: Callable[..., ServerProcess]
) -> None:
    """
    Twisted's port on C{::} answers both IPv6 addresses from the one the
    kernel prefers, so exactly one of the two connected queries times out.
    """
    server = startServer(pair, "--impl", "stock", "--interface", "::")
    port = server.port
    assert port is not None
    results = pair.query(q(P.SERVER_V6, port), q(P.SERVER_V6_SECONDARY, port))
    assert sorted(r["ok"] for r in results) == [False, True], (results, server.seen)
    server.waitForCount("SENT", 2, timeout=5.0)


def test_stockTwistedFailsLinkLocal(
    pair: Pair, startServer: Callable[..., ServerProcess]
) -> None:
    """
    Twisted's port drops the scope of a link-local peer, so its reply is
    routed by the main table: out through the decoy link, never reaching the
    client.
    """
    server = startServer(pair, "--impl", "stock", "--interface", "::")
    port = server.port
    assert port is not None
    (result,) = pair.query(q(f"{P.SERVER_LL}%{P.CLIENT_IF}", port))
    assert not result["ok"] and result["error"] == "timeout", result
    (received,) = server.waitForCount("RECV", 1, timeout=5.0)
    assert '"peer": ["fe80::5", ' in received, received


# 10. The source address vanishes between request and reply


@pytest.mark.parametrize(
    "interface, secondary, primary",
    [
        ("0.0.0.0", P.SERVER_V4_SECONDARY, P.SERVER_V4),
        ("::", P.SERVER_V4_SECONDARY, P.SERVER_V4),
        ("::", P.SERVER_V6_SECONDARY, P.SERVER_V6),
    ],
    ids=["ipv4", "ipv4-dualstack", "ipv6"],
)
def test_sendFallbackWhenSourceVanishes(
    ownPair: Pair,
    startServer: Callable[..., ServerProcess],
    interface: str,
    secondary: str,
    primary: str,
) -> None:
    """
    The server delays its reply; meanwhile the address the query went to is
    removed.  The reply is still sent, from the address the kernel picks, and
    counted in C{sendFallbacks}.
    """
    server = startServer(ownPair, "--interface", interface, "--delay", "0.5")
    port = server.port
    assert port is not None
    assert ownPair.server is not None
    client = ownPair.startQuery(q(secondary, port, connected=False, timeout=3.0))
    try:
        server.waitFor("RECV", timeout=3.0)
    except NetnsError:
        client.kill()
        client.communicate()
        raise
    prefix = "/64" if ":" in secondary else "/24"
    ownPair.server.ip("addr", "del", secondary + prefix, "dev", P.SERVER_IF)
    (result,) = ownPair.finishQuery(client)
    assert result["ok"], f"no reply after the address vanished: {result}"
    assert result["source"] == [primary, port], result
    assert result["reply"]["dst"]["host"] == secondary, result
    assert server.waitFor("SENT", timeout=2.0)
    assertCounters(server, received=1, replied=1, sendFallbacks=1)


def test_sendFallbackLinkLocal(
    ownPair: Pair, startServer: Callable[..., ServerProcess]
) -> None:
    """
    As L{test_sendFallbackWhenSourceVanishes}, for a link-local query: the
    link-local address the query went to is removed before the reply, which
    must still leave on the client's link, from the server's other
    link-local address there.  (That second address also keeps the
    fe80::/64 route of the link alive.)
    """
    assert ownPair.server is not None
    other = "fe80::3"
    ownPair.server.ip("addr", "add", f"{other}/64", "dev", P.SERVER_IF, "nodad")
    server = startServer(ownPair, "--interface", "::", "--delay", "0.5")
    port = server.port
    assert port is not None
    client = ownPair.startQuery(
        q(f"{P.SERVER_LL}%{P.CLIENT_IF}", port, connected=False, timeout=3.0)
    )
    try:
        server.waitFor("RECV", timeout=3.0)
    except NetnsError:
        client.kill()
        client.communicate()
        raise
    ownPair.server.ip("addr", "del", f"{P.SERVER_LL}/64", "dev", P.SERVER_IF)
    (result,) = ownPair.finishQuery(client)
    assert server.waitFor("SENT", timeout=2.0)
    counters = server.stop()
    assert counters is not None and counters["sendFallbacks"] == 1, counters
    assert result["ok"], f"no reply after the address vanished: {result}"
    assert result["source"] == [other, port], result
    assert result["sourceScope"] == ownPair.clientIfindex, result
    assert result["reply"]["dst"]["host"] == P.SERVER_LL, result

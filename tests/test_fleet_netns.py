"""
A fleet behind one VIP: anycast with ECMP, or a balancer in direct server
return mode, puts the service address on every host's C{lo} and lets each
host answer its share of the flows directly.  A wildcard server must reply
from the VIP, or the clients' connected sockets drop the replies.

A router namespace hashes client flows on addresses and ports over the hosts
(L{tests.netns.Fleet}); each host runs the namespace tests' echo server
(L{tests._netns_server}) on C{::}.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.netns import Fleet, unavailableReason

pytestmark = pytest.mark.netns

HOSTS = 2
FLOWS = 200
PORT = 5353
#: The clients' source ports are this and the next FLOWS - 1.
FIRST_SOURCE_PORT = 40000


@pytest.fixture
def fleet() -> Iterator[Fleet]:
    reason = unavailableReason()
    if reason is not None:
        pytest.skip(reason)
    built = Fleet.create(HOSTS)
    try:
        yield built
    finally:
        built.delete()


def flows(vip: str, count: int, timeout: float = 2.0) -> list[dict[str, Any]]:
    """
    C{count} queries to the VIP, each from a connected socket of its own on
    a source port of its own: a flow each.
    """
    return [
        {
            "host": vip,
            "port": PORT,
            "timeout": timeout,
            "payload": f"flow {i}",
            "sourcePort": FIRST_SOURCE_PORT + i,
        }
        for i in range(count)
    ]


def received(fleet: Fleet) -> list[int]:
    """
    Stop every host's server; return how many datagrams each received.
    """
    counts = []
    for proc in list(fleet._processes):
        counters = proc.stop()
        assert counters is not None, proc.seen
        counts.append(counters["received"])
    fleet._processes.clear()
    return counts


@pytest.mark.parametrize("vip", [Fleet.VIP_V4, Fleet.VIP_V6], ids=["ipv4", "ipv6"])
def test_everyFlowAnsweredFromTheVIP(fleet: Fleet, vip: str) -> None:
    """
    200 client flows are all answered from the VIP, and both hosts serve
    some of them; with one host withdrawn from the route, the survivor
    answers all of them.
    """
    for index in range(1, HOSTS + 1):
        fleet.startServer(
            index, "--interface", "::", "--port", str(PORT), "--protocol", "plain"
        )
    results = fleet.query(flows(vip, FLOWS))
    wrong = [r for r in results if not r["ok"] or r["source"] != [vip, PORT]]
    assert not wrong, wrong[:3]
    assert len({tuple(r["local"]) for r in results}) == FLOWS
    perHost = received(fleet)
    assert sum(perHost) == FLOWS, perHost
    assert all(perHost), f"a host served no flow: {perHost}"

    fleet.withdraw(1)
    for index in range(1, HOSTS + 1):
        fleet.startServer(
            index, "--interface", "::", "--port", str(PORT), "--protocol", "plain"
        )
    results = fleet.query(flows(vip, FLOWS))
    wrong = [r for r in results if not r["ok"] or r["source"] != [vip, PORT]]
    assert not wrong, wrong[:3]
    assert received(fleet) == [0, FLOWS]


def test_stockTwistedAnswersFromTheHostAddress(fleet: Fleet) -> None:
    """
    The same fleet with Twisted's own C{listenUDP}: the replies leave from
    each host's own address, and every connected client drops them.
    """
    for index in range(1, HOSTS + 1):
        fleet.startServer(
            index, "--interface", "0.0.0.0", "--port", str(PORT), "--impl", "stock"
        )
    results = fleet.query(flows(Fleet.VIP_V4, 20, timeout=1.0))
    assert not any(r["ok"] for r in results), results[:3]
    sources = {r.get("source", [None])[0] for r in results} - {None}
    hostAddresses = {Fleet.hostV4(i) for i in range(1, HOSTS + 1)}
    assert sources and sources <= hostAddresses, results[:3]

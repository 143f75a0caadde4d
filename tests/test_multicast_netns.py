"""
Multicast groups through udpdst.listenMulticast and a patched reactor's
listenMulticast, in network namespaces: IPv4 and IPv6 groups, plain and
destination-aware protocols.  A datagram sent to a group is answered from a
unicast address of the receiving interface, never from the group.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.netns import Pair, ServerProcess, builtPair

pytestmark = pytest.mark.netns

SCRIPT = Path(__file__).resolve().parent / "_netns_multicast_server.py"
P = Pair


@pytest.fixture(scope="module")
def pair() -> Iterator[Pair]:
    yield from builtPair()


@pytest.fixture
def server(pair: Pair) -> Iterator[Any]:
    """
    C{server(interface, protocol, via, group)} starts the multicast echo
    server in the server namespace, joined to C{group} on its veth; it is
    stopped (by its PID) when the test ends.
    """
    started: list[ServerProcess] = []

    def start(interface: str, protocol: str, via: str, group: str) -> ServerProcess:
        assert pair.server is not None
        args = ["--interface", interface, "--protocol", protocol, "--via", via]
        args += ["--join", f"{group}%{P.SERVER_IF}"]
        process = ServerProcess(pair.server.argv(sys.executable, str(SCRIPT), *args))
        started.append(process)
        process.waitReady(15.0)
        assert process.events("CLASS") == ["DestinationMulticastPort"]
        return process

    try:
        yield start
    finally:
        for process in started:
            process.stop()


def ask(pair: Pair, group: str, port: int) -> dict[str, Any]:
    """
    Send one datagram to C{group} out of the client's veth; the client
    waits for the reply from whatever address it comes.
    """
    query: dict[str, Any] = {
        "host": group,
        "port": port,
        "connected": False,
        "multicastIf": P.CLIENT_IF,
        "timeout": 3.0,
    }
    if ":" not in group:
        query["bind"] = P.CLIENT_V4
    (result,) = pair.query(query)
    assert result["ok"], f"no reply to {result['query']}: {result['error']}"
    return result  # type: ignore[no-any-return]


def assertCounted(server: ServerProcess) -> None:
    counters = server.stop()
    assert counters is not None
    assert counters["received"] == 1 and counters["replied"] == 1, counters


@pytest.mark.parametrize(
    "interface, protocol, via",
    [
        ("0.0.0.0", "plain", "listenMulticast"),
        ("0.0.0.0", "dst", "listenMulticast"),
        ("::", "dst", "listenMulticast"),
        ("0.0.0.0", "plain", "patchReactor"),
    ],
)
def test_ipv4Group(
    pair: Pair, server: Any, interface: str, protocol: str, via: str
) -> None:
    """
    An IPv4 group joined on the veth by name: the reply leaves from the
    interface's primary address (C{spec_dst}); C{dst} names the group.
    """
    group = "239.1.2.3"
    process = server(interface, protocol, via, group)
    result = ask(pair, group, process.port)
    assert result["source"] == [P.SERVER_V4, process.port], result
    assert result["reply"]["dst"] == {
        "host": group,
        "port": process.port,
        "ifindex": pair.serverIfindex,
        "replyFrom": P.SERVER_V4,
    }, result["reply"]
    assertCounted(process)


@pytest.mark.parametrize(
    "group, protocol, via",
    [
        ("ff15::1234", "plain", "listenMulticast"),
        ("ff15::1234", "dst", "listenMulticast"),
        ("ff02::1:2345", "dst", "listenMulticast"),
        ("ff15::1234", "plain", "patchReactor"),
    ],
)
def test_ipv6Group(
    pair: Pair, server: Any, group: str, protocol: str, via: str
) -> None:
    """
    An IPv6 group (site- and link-scoped) joined on the veth: the reply
    leaves from a unicast address of the server on that link, never from
    the group; C{dst} names the group, with C{replyFrom} C{::}.
    """
    process = server("::", protocol, via, group)
    result = ask(pair, group, process.port)
    unicast = {P.SERVER_V6, P.SERVER_V6_SECONDARY, P.SERVER_LL}
    assert result["source"][0] in unicast, result
    assert result["source"][1] == process.port, result
    assert result["reply"]["dst"] == {
        "host": group,
        "port": process.port,
        "ifindex": pair.serverIfindex,
        "replyFrom": "::",
    }, result["reply"]
    assertCounted(process)

"""
Interfaces that change under a running server (issue #9 item 1): re-created
under the same name (a new index), renamed, and an index reused by another
interface.  Link-local replies must keep leaving from the right address on
the right link, both to the address the port handed over and to one the
protocol rebuilt from text: nothing the port keeps about interfaces outlives
a change.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.netns import Pair, ServerProcess, builtPair

pytestmark = pytest.mark.netns

SERVER = Path(__file__).resolve().parent / "_io_netns_server.py"
P = Pair


@pytest.fixture
def ownPair() -> Iterator[Pair]:
    yield from builtPair()


def _relink(pair: Pair, old: str, new: str, index: int | None = None) -> int:
    """
    Replace the server end of the link (and so the client's) with a new veth
    pair whose server end is C{new}, optionally at interface C{index}; give
    both ends their link-local addresses again.  Return the new index.
    """
    assert pair.server is not None and pair.client is not None
    pair.server.ip("link", "del", old)
    extra = ["index", str(index)] if index is not None else []
    pair.server.ip(
        "link",
        "add",
        new,
        *extra,
        "type",
        "veth",
        "peer",
        "name",
        P.CLIENT_IF,
        "netns",
        pair.client.name,
    )
    for ns, ifname, ll in (
        (pair.server, new, P.SERVER_LL),
        (pair.client, P.CLIENT_IF, P.CLIENT_LL),
    ):
        ns.ip("link", "set", ifname, "addrgenmode", "none")
        ns.ip("addr", "add", f"{ll}/64", "dev", ifname, "nodad")
        ns.ip("link", "set", ifname, "up")
    pair.SERVER_IF = new  # type: ignore[misc]
    pair.waitUntilReady()
    return pair.ifindex(pair.server, new)


def _ask(pair: Pair, port: int) -> dict[str, Any]:
    (result,) = pair.query(
        {"host": f"{P.SERVER_LL}%{P.CLIENT_IF}", "port": port, "timeout": 3.0}
    )
    return result


def _assertAnsweredVia(result: dict[str, Any], port: int, ifname: str) -> None:
    assert result["ok"], result
    assert result["source"] == [P.SERVER_LL, port], result
    assert result["reply"]["peer"] == f"{P.CLIENT_LL}%{ifname}", result


@pytest.mark.parametrize("mode", ["given", "rebuilt"])
def test_interfaceChangesDoNotStopLinkLocalReplies(ownPair: Pair, mode: str) -> None:
    pair = ownPair
    assert pair.server is not None
    server = ServerProcess(pair.server.argv(sys.executable, str(SERVER), mode))
    try:
        server.waitReady(10)
        port = server.port
        assert port is not None
        _assertAnsweredVia(_ask(pair, port), port, "veth0")

        # Re-created under the same name: a new index.
        before = pair.ifindex(pair.server, "veth0")
        after = _relink(pair, "veth0", "veth0")
        assert after != before
        _assertAnsweredVia(_ask(pair, port), port, "veth0")

        # Renamed.
        pair.server.ip("link", "set", "veth0", "down")
        pair.server.ip("link", "set", "veth0", "name", "lan7")
        # (A link taken down loses its IPv6 addresses.)
        pair.server.ip("addr", "add", f"{P.SERVER_LL}/64", "dev", "lan7", "nodad")
        pair.server.ip("link", "set", "lan7", "up")
        pair.SERVER_IF = "lan7"  # type: ignore[misc]
        pair.waitUntilReady()
        _assertAnsweredVia(_ask(pair, port), port, "lan7")

        # The index reused by another interface, under another name, while
        # the old name now means a different index.
        reused = pair.ifindex(pair.server, "lan7")
        assert _relink(pair, "lan7", "wan3", index=reused) == reused
        pair.server.ip("link", "add", "lan7", "type", "veth", "peer", "name", "lan7p")
        _assertAnsweredVia(_ask(pair, port), port, "wan3")
    finally:
        counters = server.stop()
    assert counters is not None
    assert counters["sendErrors"] == 0, counters
    assert counters["replied"] == counters["received"] == 4, counters


#: Counts the replies to one datagram until the link has been quiet a while.
_BURST_CLIENT = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, 33, 1 << 22)  # SO_RCVBUFFORCE
s.connect((sys.argv[1], int(sys.argv[2])))
s.send(b"go")
s.settimeout(3.0)
count = 0
try:
    while True:
        s.recv(100)
        count += 1
except TimeoutError:
    pass
print(count)
"""


@pytest.mark.parametrize("path", ["recvmmsg", "recvmsg"])
def test_egressDropsAreSendErrors(ownPair: Pair, path: str) -> None:
    """
    Replies the kernel drops on the way out (a tiny C{tbf} queue on the
    server's link) are counted in C{sendErrors}, not as replied: every reply
    is one or the other, and the client got exactly those replied.
    """
    import os
    import subprocess

    from udpdst import io

    if path == "recvmmsg" and io.BATCHED is None:
        pytest.skip("udpdst._mmsg is not built")
    pair = ownPair
    assert pair.server is not None and pair.client is not None
    tc = subprocess.run(
        [
            "tc",
            "-n",
            pair.server.name,
            "qdisc",
            "add",
            "dev",
            P.SERVER_IF,
            "root",
            "tbf",
            "rate",
            "1mbit",
            "burst",
            "2000",
            "limit",
            "2000",
        ],
        capture_output=True,
        text=True,
        timeout=10,
    )
    if tc.returncode != 0:
        pytest.skip(f"tc cannot add a tbf qdisc: {tc.stderr.strip()}")
    env = {**os.environ}
    if path == "recvmsg":
        env["UDPDST_IO"] = "python"
    argv = pair.server.argv(sys.executable, str(SERVER), "burst")
    server = ServerProcess(
        ["env", *(f"{k}={v}" for k, v in env.items() if k == "UDPDST_IO"), *argv]
    )
    try:
        server.waitReady(10)
        client = subprocess.run(
            pair.client.argv(
                sys.executable, "-c", _BURST_CLIENT, P.SERVER_V4, str(server.port)
            ),
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert client.returncode == 0, client.stderr
        got = int(client.stdout)
    finally:
        counters = server.stop()
    assert counters is not None
    assert counters["replied"] + counters["sendErrors"] == 300, counters
    assert counters["sendErrors"] > 0, counters
    assert got == counters["replied"], (got, counters)

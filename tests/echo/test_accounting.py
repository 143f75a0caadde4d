"""
Every datagram is counted once: under a mixed load on real loopback sockets
(answered, refused for every reason, oversized, control data truncated,
dropped by the kernel) the echo's refusals and the port's counters add up
exactly: received = replied + refused + send errors.
"""

from __future__ import annotations

import fcntl
import ipaddress
import socket
import struct
import termios
from typing import Any

from tests._raw import requiresRawSockets, spoof
from tests.clients import Client, client, send
from tests.echo._helpers import run, until
from udpdst import listenUDP
from udpdst.echo.limits import AccessList, LoopGuard, NetworkLimiter, RateLimiter
from udpdst.echo.protocol import REFUSAL_REASONS, EchoProtocol

net = ipaddress.ip_network

SERVER = "127.0.0.2"
#: Short enough that every request here but the "tiny" one is answered (the
#: floor is its length less the 28 bytes of IPv4 and UDP headers).
PREFIX = b"p" * 34
MAX_PACKET = 65490
BURST = 500
#: Networks are /28 here (16 addresses): each client's network's bucket holds
#: what it sends, except the network flood's.
NETWORK_BURST = 600


@requiresRawSockets
def queued(handle: socket.socket) -> int:
    """
    The size of the next datagram queued on C{handle}; 0 if none.
    """
    return struct.unpack("i", fcntl.ioctl(handle, termios.FIONREAD, b"\0" * 4))[0]  # type: ignore[no-any-return]


def test_everyDatagramCountedOnce(epollReactor: Any) -> None:
    """
    received = replied + refused (by reason) + send errors, every reason
    counted exactly as provoked, oversized datagrams and the kernel's drops
    counted apart.  (Send errors are provoked in
    L{tests.echo.test_hardening.test_statsLineAddsUp}: loopback cannot fail a
    send.)
    """
    access = AccessList([net("127.0.0.0/25"), net("::/0")], [net("127.0.0.9/32")])
    limiter = RateLimiter(rate=1, burst=BURST, maxSources=1000)
    networks = NetworkLimiter(1, NETWORK_BURST, 1000, 28, 56)
    proto = EchoProtocol(
        PREFIX,
        access=access,
        rateLimiter=limiter,
        networkLimiter=networks,
        clock=lambda: 100.0,
    )
    port = listenUDP(0, proto, "0.0.0.0", MAX_PACKET, epollReactor)
    number = port.getHost().port
    expected = dict.fromkeys(REFUSAL_REASONS, 0)
    survived: list[int] = []
    markers = client(epollReactor, "127.0.0.1", SERVER, number)

    async def marker() -> None:
        """
        Once the marker is answered, everything sent before it was handled
        (one server socket, loopback delivers in order).
        """
        count = len(markers.received)
        send(markers, b"marker")
        await markers.waitFor(count + 1)

    async def answered(c: Client, payloads: list[bytes]) -> None:
        for payload in payloads:
            send(c, payload)
        await c.waitFor(len(payloads))
        assert [d for d, _ in c.received[-len(payloads) :]] == [
            PREFIX + p for p in payloads
        ]

    async def scenario() -> None:
        # Kernel drops: a small receive buffer and 200 datagrams sent
        # while the reactor does not read.
        handle = port.getHandle()
        handle.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        dropping = client(epollReactor, "127.0.0.30", SERVER, number)
        for i in range(200):
            send(dropping, b"%d" % i + b"z" * 512)
        # The marker itself would be dropped while the buffer is full.
        await until(epollReactor, lambda: queued(handle) == 0)
        await marker()
        survived.append(len(dropping.received))
        handle.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)

        # Answered.
        for i in range(10):
            await answered(
                client(epollReactor, f"127.0.0.{40 + i}", SERVER, number),
                [b"good %d %d" % (i, j) for j in range(3)],
            )

        # Refused, for every reason.
        broadcaster = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with broadcaster:
            broadcaster.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
            broadcaster.bind(("127.0.0.70", 0))
            broadcaster.sendto(b"to everyone", ("127.255.255.255", number))
        expected["broadcast"] += 1
        for sourcePort in (0, 19):
            spoof(("127.0.0.20", sourcePort), (SERVER, number), b"source port")
            expected["source-port"] += 1
        spoof(("127.0.0.21", number), (SERVER, number), b"same port")
        expected["same-port"] += 1
        denied = client(epollReactor, "127.0.0.9", SERVER, number)
        notAllowed = client(epollReactor, "127.0.0.200", SERVER, number)
        for i in range(3):
            send(denied, b"denied %d" % i)
            send(notAllowed, b"not allowed %d" % i)
        expected["denied"] += 3
        expected["not-allowed"] += 3
        flooder = client(epollReactor, "127.0.0.60", SERVER, number)
        for chunk in range(0, BURST + 100, 50):
            # In chunks, so that no buffer on the way overflows.
            for i in range(chunk, chunk + 50):
                send(flooder, b"flood %d" % i)
            await marker()
        expected["rate"] += 100
        # 16 sources of 127.0.0.112/28, 50 datagrams each: all within their
        # own bucket, the last 200 beyond their network's.
        neighbours = [
            client(epollReactor, f"127.0.0.{112 + i}", SERVER, number)
            for i in range(16)
        ]
        for i in range(50):
            for neighbour in neighbours:
                send(neighbour, b"neighbour %d" % i)
            await marker()
        expected["prefix-rate"] += 16 * 50 - NETWORK_BURST
        big = client(epollReactor, "127.0.0.61", SERVER, number)
        send(big, b"tiny")
        expected["too-small"] += 1
        send(big, b"t" * 65480)  # fits maxPacketSize, not with the prefix
        expected["too-large"] += 1
        # A peer that echoes our replies back (a loop).
        repeater = client(epollReactor, "127.0.0.62", SERVER, number)
        send(repeater, b"bounce")
        for i in range(LoopGuard.maxBounces):
            await repeater.waitFor(i + 1)
            send(repeater, repeater.received[-1][0])
        expected["loop"] += 1
        await marker()
        assert len(flooder.received) == BURST
        assert sum(len(n.received) for n in neighbours) == NETWORK_BURST
        assert len(repeater.received) == LoopGuard.maxBounces
        assert denied.received == notAllowed.received == big.received == []

        # Oversized: larger than maxPacketSize, dropped by the port.
        send(big, b"o" * (MAX_PACKET + 10))
        # Control data truncated: delivered with no destination, answered
        # from the kernel's choice (so to an unconnected client).
        port.ancillaryBufferSize = socket.CMSG_SPACE(4)
        loose = client(epollReactor, "127.0.0.63", None, number)
        for i in range(3):
            send(loose, b"loose %d" % i, ("127.0.0.1", number))
        await loose.waitFor(3)
        port.ancillaryBufferSize = type(port).ancillaryBufferSize
        await marker()

    run(epollReactor, scenario)
    counters = port.counters
    refused = proto.counters.refused
    assert refused == expected
    assert counters.oversized == 1
    assert counters.controlTruncated == 3
    assert 0 < survived[0] < 200
    assert counters.kernelDrops == 200 - survived[0]
    # The identity (oversized datagrams are counted apart, not received).
    assert counters.sendErrors == 0
    assert counters.received == (
        counters.replied + sum(refused.values()) + counters.sendErrors
    )
    replies = survived[0] + 30 + BURST + NETWORK_BURST + LoopGuard.maxBounces + 3
    assert counters.replied == replies + len(markers.received)

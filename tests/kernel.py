"""
What the kernel says about a UDP socket, read apart from udpdst's own code so
that tests can hold udpdst's counters against it: the rows of
C{/proc/net/udp} and C{/proc/net/udp6}, the socket's C{SO_MEMINFO}, and a
flood that overflows a receive buffer one settled datagram at a time.
"""

from __future__ import annotations

import os
import socket
import struct
import time
from collections.abc import Callable
from typing import NamedTuple

#: A bound on a hung test, not a timing assertion.
SETTLE_TIMEOUT = 10.0


class UdpRow(NamedTuple):
    """
    One socket's row of C{/proc/net/udp} or C{/proc/net/udp6}.
    """

    host: str
    port: int
    inode: int
    rxQueue: int
    drops: int


def udpRows() -> list[UdpRow]:
    """
    Every UDP socket of this network namespace, as C{/proc/net/udp{,6}} lists
    it (local address and port, inode, bytes queued to read, datagrams
    dropped).
    """
    rows = []
    for name in ("/proc/net/udp", "/proc/net/udp6"):
        try:
            with open(name, "rb") as table:
                # To the end: one read(2) gives at most a page of rows.
                lines = table.read().decode().splitlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            f = line.split()
            address, port = f[1].rsplit(":", 1)
            rows.append(
                UdpRow(
                    _host(address),
                    int(port, 16),
                    int(f[9]),
                    int(f[4].split(":")[1], 16),
                    int(f[12]),
                )
            )
    return rows


def _host(text: str) -> str:
    """
    An address as the table shows it: hex of the kernel's bytes, each 32-bit
    word in host order.
    """
    raw = bytes.fromhex(text)
    words = b"".join(
        struct.pack("=I", int.from_bytes(raw[i : i + 4], "big"))
        for i in range(0, len(raw), 4)
    )
    family = socket.AF_INET if len(words) == 4 else socket.AF_INET6
    return socket.inet_ntop(family, words)


def _theRow(match: Callable[[UdpRow], bool]) -> UdpRow:
    """
    The one row C{match} picks.  The kernel lists the table bucket by bucket
    while other sockets come and go, so a listing may show a row twice or
    miss it: read again until it shows once.
    """
    for _ in range(100):
        found = {r for r in udpRows() if match(r)}
        if len(found) == 1:
            return found.pop()
    raise AssertionError(f"no single row in /proc/net/udp: {found}")


def rowOf(sock: socket.socket) -> UdpRow:
    """
    C{sock}'s row, found by its inode.
    """
    inode = os.fstat(sock.fileno()).st_ino
    return _theRow(lambda r: r.inode == inode)


def rowOn(host: str, port: int) -> UdpRow:
    """
    The row of the UDP socket bound to C{host} and C{port}.
    """
    return _theRow(lambda r: (r.host, r.port) == (host, port))


def memInfo(sock: socket.socket) -> tuple[int, int]:
    """
    C{SK_MEMINFO_RMEM_ALLOC} (bytes queued) and C{SK_MEMINFO_DROPS}, the 1st
    and 9th u32 of C{getsockopt(SOL_SOCKET, SO_MEMINFO)}.
    """
    info = struct.unpack_from("=9I", sock.getsockopt(socket.SOL_SOCKET, 55, 9 * 4))
    return info[0], info[8]


def flood(
    sender: socket.socket,
    target: tuple[str, int],
    count: int,
    payload: bytes,
    queue: Callable[[], tuple[int, int]],
) -> None:
    """
    Send C{count} datagrams to C{target}, each after the one before it was
    queued or dropped: C{queue()} (bytes queued, drops) moves with each, so
    that what the receiver holds afterwards does not depend on when the
    kernel got round to delivering them.
    """
    for _ in range(count):
        before = queue()
        sender.sendto(payload, target)
        deadline = time.monotonic() + SETTLE_TIMEOUT
        while queue() == before:
            if time.monotonic() > deadline:
                raise AssertionError("a datagram on loopback was never delivered")
            time.sleep(0.0005)

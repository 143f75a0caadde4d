"""
Address values handed to protocols (a datagram's destination, and a peer
address that remembers it), and the facts about address text that the port,
the test doubles and the service all need: C{ADDRESS:PORT}, a zone's
interface index, the largest payload for a peer.
"""

from __future__ import annotations

import errno
import socket
from dataclasses import dataclass

#: The largest UDP payload to an IPv4 peer (also an IPv4-mapped one on a
#: dual-stack socket), and to an IPv6 peer.
MAX_UDP_PAYLOAD_V4 = 65507
MAX_UDP_PAYLOAD_V6 = 65527


def maxPayload(host: str) -> int:
    """
    The largest datagram that can be sent to C{host} (an IP literal, maybe
    IPv4-mapped or scoped).
    """
    if ":" in host and not (host.startswith("::ffff:") and "." in host):
        return MAX_UDP_PAYLOAD_V6
    return MAX_UDP_PAYLOAD_V4


def interfaceIndex(zone: str) -> int:
    """
    The interface index that the zone of C{"fe80::5%zone"} names: a number
    is itself, a name is asked of the kernel each time (an interface can be
    re-created with another index, or its index reused by another).

    @raise OSError: No interface has that name (a number above 2**32 - 1,
        which no index can be, included).
    """
    if zone.isdigit():
        index = int(zone)
        if index > 0xFFFFFFFF:
            raise OSError(errno.ENODEV, "no such interface", zone)
        return index
    return socket.if_nametoindex(zone)


def splitHostPort(text: str) -> tuple[str, str]:
    """
    C{ADDRESS:PORT}, with an IPv6 address in brackets (C{"[::1]:53"}), split
    into its address and port texts, neither checked further.

    @raise ValueError: C{text} has no port, or an IPv6 address without
        brackets.
    """
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]:")
        if not sep or ":" not in host:
            raise ValueError(f"{text!r} is not [IPV6]:PORT")
    else:
        host, sep, rest = text.rpartition(":")
        if not sep:
            raise ValueError(f"{text!r} is not ADDRESS:PORT")
        if ":" in host:
            raise ValueError(
                f"{text!r}: put an IPv6 address in brackets, as in [2001:db8::3]:53"
            )
    return host, rest


def formatHostPort(host: str, port: int) -> str:
    """
    C{host:port}, with IPv6 hosts in brackets (C{[::1]:53}), as in log lines.
    """
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass(frozen=True, slots=True)
class Destination:
    """
    Where a datagram was sent to, as the kernel reported it.

    @ivar host: The address the client sent to, as text: dotted IPv4 (also for
        IPv4 clients of a dual-stack socket) or IPv6.  For a broadcast or
        multicast datagram this is the broadcast or group address.
    @ivar port: The port the client sent to.
    @ivar ifindex: Index of the interface the datagram arrived on; C{0} if
        unknown.
    @ivar replyFrom: The address a reply must come from, so that the client
        accepts it: equal to C{host} for unicast, a unicast address of the
        receiving interface for IPv4 broadcast/multicast, C{"::"} for IPv6
        multicast (the kernel then picks a unicast source on C{ifindex}).
        L{None} when the kernel gave nothing usable; the kernel then chooses.
    """

    host: str
    port: int
    ifindex: int = 0
    replyFrom: str | None = None

    def __str__(self) -> str:
        return formatHostPort(self.host, self.port)


class PeerAddress(tuple):  # type: ignore[type-arg]
    """
    A peer's C{(host, port)} as received, carrying the datagram's
    L{Destination}.

    It is a 2-tuple and compares and hashes equal to the plain tuple, so
    existing protocols use it unchanged; passing it back to
    C{transport.write} makes the reply leave from C{destination.replyFrom}.
    IPv6 link-local hosts keep their scope (C{"fe80::5%eth0"}).
    """

    destination: Destination | None
    # Set by the port that made it: (port, its io.Outbox, target, control,
    # max length), what a reply needs, so that writing to this address costs
    # no lookups.
    _reply: tuple[object, object, object, object, int] | None = None

    def __new__(
        cls, host: str, port: int, destination: Destination | None = None
    ) -> PeerAddress:
        self = tuple.__new__(cls, (host, port))
        self.destination = destination
        return self

    def __getnewargs__(self) -> tuple[str, int, Destination | None]:  # type: ignore[override]
        return (self[0], self[1], self.destination)

    def __reduce__(
        self,
    ) -> tuple[type[PeerAddress], tuple[str, int, Destination | None]]:  # type: ignore[override]
        # Copies and pickles carry the destination, never the port's reply
        # state (a port cannot be pickled, and a copy may outlive it).
        return (PeerAddress, (self[0], self[1], self.destination))

    @property
    def host(self) -> str:
        return self[0]  # type: ignore[no-any-return]

    @property
    def port(self) -> int:
        return self[1]  # type: ignore[no-any-return]

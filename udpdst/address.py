"""
Address values handed to protocols: a datagram's destination, and a peer
address that remembers it.
"""

from __future__ import annotations

from dataclasses import dataclass


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
    # Set by the port that made it: (port, target, control, max length), what
    # a reply needs, so that writing to this address costs no lookups.
    _reply: tuple[object, object, object, int] | None = None

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

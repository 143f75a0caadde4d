"""
Parsing and building of the control messages that carry a datagram's
destination and a reply's source: pure functions, no sockets.

The reply-source rules live in L{replyControl} and nowhere else.

The names were snake_case before; those spellings (C{parse_destination},
C{reply_control}, C{enable_destination_options}, C{is_link_local_v6},
C{is_v4_multicast_or_broadcast}) stay as aliases for one release.
"""

from __future__ import annotations

import socket
from collections.abc import Iterable, Sequence

from udpdst import _linux as L
from udpdst.address import Destination

Ancillary = tuple[int, int, bytes]

_IN_PKTINFO = L.IN_PKTINFO
_IN6_PKTINFO = L.IN6_PKTINFO
_NET_PORT = L.NET_PORT

_V4_ANY = b"\0\0\0\0"
_V6_ANY = b"\0" * 16
_V4_MAPPED_PREFIX = b"\0" * 10 + b"\xff\xff"

_ntop4 = socket.inet_ntoa


def _ntop6(packed: bytes) -> str:
    return socket.inet_ntop(socket.AF_INET6, packed)


def isV4MulticastOrBroadcast(packed: bytes) -> bool:
    """
    Whether a packed IPv4 address is multicast (224/4), reserved (240/4) or
    the limited broadcast address (the last of 240/4): none of them can be
    a reply's source.  (A subnet broadcast looks like any unicast address;
    that is why replies use C{spec_dst}, which the kernel fills in.)
    """
    return packed[0] >= 224


def isLinkLocalV6(host: str) -> bool:
    """
    Whether C{host} (text, maybe with a C{%scope}) is in fe80::/10.
    """
    head = host[:5].lower()
    return (
        len(head) == 5 and head[:3] in _LL_HEADS and head[3] != ":" and head[4] == ":"
    )


_LL_HEADS = frozenset({"fe8", "fe9", "fea", "feb"})


def overflowCount(data: bytes) -> int | None:
    """
    The count an C{SO_RXQ_OVFL} message carries (datagrams the kernel
    dropped on the socket so far), or L{None} if C{data} is too short.
    """
    return L.U32.unpack_from(data)[0] if len(data) >= L.U32_SIZE else None


def parseDestination(
    ancdata: Iterable[Ancillary], boundPort: int
) -> Destination | None:
    """
    Read a datagram's destination out of its control messages.

    @param ancdata: C{recvmsg}'s ancillary data: C{(level, type, data)}
        triples.  Anything malformed or unknown is ignored; this never raises
        for any input.
    @param boundPort: The port the socket is bound to, used when no
        C{*_ORIGDSTADDR} message tells the original destination port.
    @return: The L{Destination}, or L{None} if no usable pktinfo arrived.
    """
    v4: tuple[int, bytes, bytes] | None = None
    v6: tuple[bytes, int] | None = None
    origPort: int | None = None
    origHost: str | None = None
    for item in ancdata:
        try:
            level, kind, data = item
        except (TypeError, ValueError):
            continue
        if not isinstance(data, bytes | bytearray | memoryview):
            continue
        size = len(data)
        if level == L.SOL_IP:
            if kind == L.IP_PKTINFO and size >= L.IN_PKTINFO_SIZE:
                v4 = _IN_PKTINFO.unpack_from(data)
            elif kind == L.IP_ORIGDSTADDR and size >= 8:
                # sockaddr_in: family (host order), port, address (network order)
                origPort = _NET_PORT.unpack_from(data, 2)[0]
                origHost = _ntop4(bytes(data[4:8]))
        elif level == L.SOL_IPV6:
            if kind == L.IPV6_PKTINFO and size >= L.IN6_PKTINFO_SIZE:
                v6 = _IN6_PKTINFO.unpack_from(data)
            elif kind == L.IPV6_ORIGDSTADDR and size >= 24:
                # sockaddr_in6: family, port, flowinfo, address, scope id
                origPort = _NET_PORT.unpack_from(data, 2)[0]
                origHost = _ntop6(bytes(data[8:24]))

    port = boundPort if origPort is None else origPort
    if v4 is not None:
        # IPv4, also an IPv4-mapped peer of a dual-stack socket: spec_dst is
        # the address to reply from (a unicast address of the receiving
        # interface for broadcast and multicast).
        ifindex, specDst, addr = v4
        if specDst != _V4_ANY:
            reply: str | None = _ntop4(specDst)
        elif addr != _V4_ANY and not isV4MulticastOrBroadcast(addr):
            # Queued before IP_PKTINFO was enabled: no spec_dst.
            reply = _ntop4(addr)
        else:
            reply = None
        host = _ntop4(addr) if addr != _V4_ANY else (origHost or reply)
        if host is None:
            return None
        return Destination(host, port, max(ifindex, 0), reply)
    if v6 is not None:
        addr6, ifindex6 = v6
        if addr6.startswith(_V4_MAPPED_PREFIX):
            host = _ntop4(addr6[12:])
            mappedReply = None if isV4MulticastOrBroadcast(addr6[12:]) else host
            return Destination(host, port, ifindex6, mappedReply)
        if addr6 == _V6_ANY:
            return None
        host = _ntop6(addr6)
        reply6 = "::" if addr6[0] == 0xFF else host
        return Destination(host, port, ifindex6, reply6)
    if origHost is not None:
        if origHost.startswith("::ffff:") and "." in origHost:
            origHost = origHost[7:]
        return Destination(origHost, port, 0, None)
    return None


def replyControl(
    family: int, dst: Destination | None, peerHost: str
) -> list[Ancillary]:
    """
    The control message that makes a reply to C{peer_host} leave from
    C{dst.replyFrom}: IPv4 from C{spec_dst} with ifindex 0 (also as
    C{::ffff:spec_dst} on a dual-stack socket), IPv6 from the destination
    with ifindex 0 except for link-local and multicast (source C{::}), which
    need the interface.

    @param family: The sending socket's family.
    @param dst: Where the request went; L{None} or no C{replyFrom} leaves
        the choice to the kernel (an empty list).
    @param peerHost: The peer the reply goes to, as text.
    @return: A list of zero or one C{(level, type, data)} for C{sendmsg}.
    """
    if dst is None or dst.replyFrom is None:
        return []
    source = dst.replyFrom
    if ":" not in source:
        try:
            packed4 = socket.inet_aton(source)
        except OSError:
            return []
        if family == socket.AF_INET6:
            # An IPv4-mapped peer on a dual-stack socket: an IPv6 source would
            # be EINVAL; the mapped form of spec_dst works.
            return [
                (
                    L.SOL_IPV6,
                    L.IPV6_PKTINFO,
                    _IN6_PKTINFO.pack(_V4_MAPPED_PREFIX + packed4, 0),
                )
            ]
        # ifindex 0: pinning the interface would bypass routing.
        return [(L.SOL_IP, L.IP_PKTINFO, _IN_PKTINFO.pack(0, packed4, _V4_ANY))]
    if family != socket.AF_INET6:
        return []
    try:
        packed6 = socket.inet_pton(socket.AF_INET6, source.split("%", 1)[0])
    except OSError:
        return []
    ifindex = 0
    if (
        packed6 == _V6_ANY
        or isLinkLocalV6(source)
        or isLinkLocalV6(dst.host)
        or isLinkLocalV6(peerHost)
    ):
        # Multicast (source "::": the kernel picks a unicast address on the
        # link) and link-local need the interface; nothing else gets it.
        ifindex = dst.ifindex
    return [(L.SOL_IPV6, L.IPV6_PKTINFO, _IN6_PKTINFO.pack(packed6, ifindex))]


def enableDestinationOptions(sock: socket.socket) -> list[str]:
    """
    Ask the kernel to report each datagram's destination on C{sock}.

    @return: The names of options the kernel refused (non-Linux, or an old
        kernel); the caller logs them.
    """
    wanted: Sequence[tuple[int, int, str]]
    if sock.family == socket.AF_INET6:
        wanted = (
            (L.SOL_IPV6, L.IPV6_RECVPKTINFO, "IPV6_RECVPKTINFO"),
            (L.SOL_IPV6, L.IPV6_RECVORIGDSTADDR, "IPV6_RECVORIGDSTADDR"),
            # For IPv4-mapped traffic on a dual-stack socket: spec_dst.
            (L.SOL_IP, L.IP_PKTINFO, "IP_PKTINFO"),
            (L.SOL_IP, L.IP_RECVORIGDSTADDR, "IP_RECVORIGDSTADDR"),
            (L.SOL_SOCKET, L.SO_RXQ_OVFL, "SO_RXQ_OVFL"),
        )
    else:
        wanted = (
            (L.SOL_IP, L.IP_PKTINFO, "IP_PKTINFO"),
            (L.SOL_IP, L.IP_RECVORIGDSTADDR, "IP_RECVORIGDSTADDR"),
            (L.SOL_SOCKET, L.SO_RXQ_OVFL, "SO_RXQ_OVFL"),
        )
    refused = []
    for level, option, name in wanted:
        try:
            sock.setsockopt(level, option, 1)
        except OSError:
            refused.append(name)
    return refused


def parse_destination(
    ancdata: Iterable[Ancillary], bound_port: int
) -> tuple[Destination | None, int | None]:
    """
    The former spelling of L{parseDestination}, which also returned the
    C{SO_RXQ_OVFL} count (L{overflowCount}): C{(destination, drops)}.
    Kept for one release.
    """
    items = list(ancdata)
    drops = None
    for item in items:
        try:
            level, kind, data = item
        except (TypeError, ValueError):
            continue
        if (
            level == L.SOL_SOCKET
            and kind == L.SO_RXQ_OVFL
            and isinstance(data, bytes | bytearray | memoryview)
        ):
            drops = overflowCount(data)
    return parseDestination(items, bound_port), drops


# The former names, kept for one release.
reply_control = replyControl
enable_destination_options = enableDestinationOptions
is_link_local_v6 = isLinkLocalV6
is_v4_multicast_or_broadcast = isV4MulticastOrBroadcast

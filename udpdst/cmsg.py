"""
Parsing and building of the control messages that carry a datagram's
destination and a reply's source: pure functions, no sockets.

The reply-source rules (listed in the README's "Reply-source rules") live in
L{reply_control} and nowhere else.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterable, Sequence

from udpdst import _linux as L
from udpdst.address import Destination

Ancillary = tuple[int, int, bytes]

_IN_PKTINFO = struct.Struct("=i4s4s")
_IN6_PKTINFO = struct.Struct("=16sI")
_U32 = struct.Struct("=I")
_NET_PORT = struct.Struct("!H")

_V4_ANY = b"\0\0\0\0"
_V6_ANY = b"\0" * 16
_V4_MAPPED_PREFIX = b"\0" * 10 + b"\xff\xff"

_ntop4 = socket.inet_ntoa


def _ntop6(packed: bytes) -> str:
    return socket.inet_ntop(socket.AF_INET6, packed)


def is_v4_multicast_or_broadcast(packed: bytes) -> bool:
    """
    Whether a packed IPv4 address is multicast (224/4) or the limited
    broadcast address.  (A subnet broadcast looks like any unicast address;
    that is why replies use C{spec_dst}, which the kernel fills in.)
    """
    return packed[0] >= 224


def is_link_local_v6(host: str) -> bool:
    """
    Whether C{host} (text, maybe with a C{%scope}) is in fe80::/10.
    """
    head = host[:5].lower()
    return (
        len(head) == 5 and head[:3] in _LL_HEADS and head[3] != ":" and head[4] == ":"
    )


_LL_HEADS = frozenset({"fe8", "fe9", "fea", "feb"})


def parse_destination(
    ancdata: Iterable[Ancillary], bound_port: int
) -> tuple[Destination | None, int | None]:
    """
    Read a datagram's destination out of its control messages.

    @param ancdata: C{recvmsg}'s ancillary data: C{(level, type, data)}
        triples.  Anything malformed or unknown is ignored; this never raises
        for any input.
    @param bound_port: The port the socket is bound to, used when no
        C{*_ORIGDSTADDR} message tells the original destination port.
    @return: C{(destination, kernel_drops)}: the L{Destination}, or L{None} if
        no usable pktinfo arrived; and the C{SO_RXQ_OVFL} count, or L{None}
        if that message was absent.
    """
    v4: tuple[int, bytes, bytes] | None = None
    v6: tuple[bytes, int] | None = None
    orig_port: int | None = None
    orig_host: str | None = None
    drops: int | None = None
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
                orig_port = _NET_PORT.unpack_from(data, 2)[0]
                orig_host = _ntop4(bytes(data[4:8]))
        elif level == L.SOL_IPV6:
            if kind == L.IPV6_PKTINFO and size >= L.IN6_PKTINFO_SIZE:
                v6 = _IN6_PKTINFO.unpack_from(data)
            elif kind == L.IPV6_ORIGDSTADDR and size >= 24:
                # sockaddr_in6: family, port, flowinfo, address, scope id
                orig_port = _NET_PORT.unpack_from(data, 2)[0]
                orig_host = _ntop6(bytes(data[8:24]))
        elif level == L.SOL_SOCKET and kind == L.SO_RXQ_OVFL and size >= 4:
            drops = _U32.unpack_from(data)[0]

    port = bound_port if orig_port is None else orig_port
    if v4 is not None:
        # IPv4, also an IPv4-mapped peer of a dual-stack socket: spec_dst is
        # the address to reply from (a unicast address of the receiving
        # interface for broadcast and multicast).
        ifindex, spec_dst, addr = v4
        if spec_dst != _V4_ANY:
            reply: str | None = _ntop4(spec_dst)
        elif addr != _V4_ANY and not is_v4_multicast_or_broadcast(addr):
            # Queued before IP_PKTINFO was enabled: no spec_dst.
            reply = _ntop4(addr)
        else:
            reply = None
        host = _ntop4(addr) if addr != _V4_ANY else (orig_host or reply)
        if host is None:
            return None, drops
        return Destination(host, port, max(ifindex, 0), reply), drops
    if v6 is not None:
        addr6, ifindex6 = v6
        if addr6.startswith(_V4_MAPPED_PREFIX):
            host = _ntop4(addr6[12:])
            mapped_reply = None if is_v4_multicast_or_broadcast(addr6[12:]) else host
            return Destination(host, port, ifindex6, mapped_reply), drops
        if addr6 == _V6_ANY:
            return None, drops
        host = _ntop6(addr6)
        reply6 = "::" if addr6[0] == 0xFF else host
        return Destination(host, port, ifindex6, reply6), drops
    if orig_host is not None:
        if orig_host.startswith("::ffff:") and "." in orig_host:
            orig_host = orig_host[7:]
        return Destination(orig_host, port, 0, None), drops
    return None, drops


def reply_control(
    family: int, dst: Destination | None, peer_host: str
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
    @param peer_host: The peer the reply goes to, as text.
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
        or is_link_local_v6(source)
        or is_link_local_v6(dst.host)
        or is_link_local_v6(peer_host)
    ):
        # Multicast (source "::": the kernel picks a unicast address on the
        # link) and link-local need the interface; nothing else gets it.
        ifindex = dst.ifindex
    return [(L.SOL_IPV6, L.IPV6_PKTINFO, _IN6_PKTINFO.pack(packed6, ifindex))]


def enable_destination_options(sock: socket.socket) -> list[str]:
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

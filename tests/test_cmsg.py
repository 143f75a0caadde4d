"""
The control-message functions alone: parsing what the kernel sends, building
what a reply needs, and never raising on garbage.
"""

from __future__ import annotations

import socket
import struct

import hypothesis.strategies as st
from hypothesis import given, settings

from udpdst import _linux as L
from udpdst import cmsg
from udpdst.address import Destination
from udpdst.cmsg import (
    enableDestinationOptions,
    isLinkLocalV6,
    overflowCount,
    parseDestination,
    replyControl,
)


def in_pktinfo(ifindex: int, spec_dst: str, addr: str) -> tuple[int, int, bytes]:
    return (
        L.SOL_IP,
        L.IP_PKTINFO,
        struct.pack(
            "=i4s4s", ifindex, socket.inet_aton(spec_dst), socket.inet_aton(addr)
        ),
    )


def in6_pktinfo(addr: str, ifindex: int) -> tuple[int, int, bytes]:
    return (
        L.SOL_IPV6,
        L.IPV6_PKTINFO,
        struct.pack("=16sI", socket.inet_pton(socket.AF_INET6, addr), ifindex),
    )


def orig4(addr: str, port: int) -> tuple[int, int, bytes]:
    return (
        L.SOL_IP,
        L.IP_ORIGDSTADDR,
        struct.pack("=H", socket.AF_INET)
        + struct.pack("!H", port)
        + socket.inet_aton(addr)
        + b"\0" * 8,
    )


def orig6(addr: str, port: int) -> tuple[int, int, bytes]:
    return (
        L.SOL_IPV6,
        L.IPV6_ORIGDSTADDR,
        struct.pack("=H", socket.AF_INET6)
        + struct.pack("!HI", port, 0)
        + socket.inet_pton(socket.AF_INET6, addr)
        + struct.pack("=I", 0),
    )


def ovfl(n: int) -> tuple[int, int, bytes]:
    return (L.SOL_SOCKET, L.SO_RXQ_OVFL, struct.pack("=I", n))


# What the kernel sent, captured on this machine, for an IPv4 client of a
# dual-stack socket sending to 127.0.0.2:49167.
CAPTURED_MAPPED = [
    (41, 50, bytes.fromhex("00000000000000000000ffff7f00000201000000")),
    (0, 8, bytes.fromhex("010000007f0000027f000002")),
    (0, 20, bytes.fromhex("0200c00f7f0000020000000000000000")),
]


def test_capturedMappedDatagram() -> None:
    dst = parseDestination(CAPTURED_MAPPED, 1)
    assert dst == Destination("127.0.0.2", 49167, 1, "127.0.0.2")


def test_unicastV4() -> None:
    dst = parseDestination(
        [in_pktinfo(2, "10.1.2.3", "10.1.2.3"), orig4("10.1.2.3", 12345)], 12345
    )
    assert dst == Destination("10.1.2.3", 12345, 2, "10.1.2.3")


def test_broadcastRepliesFromSpecDst() -> None:
    """
    For broadcast the destination is the broadcast address, the reply source
    the unicast C{spec_dst}.
    """
    dst = parseDestination([in_pktinfo(2, "10.1.2.2", "10.1.2.255")], 7)
    assert dst == Destination("10.1.2.255", 7, 2, "10.1.2.2")
    dst = parseDestination([in_pktinfo(2, "10.1.2.2", "255.255.255.255")], 7)
    assert dst == Destination("255.255.255.255", 7, 2, "10.1.2.2")


def test_noSpecDstFallsBackToUnicastAddr() -> None:
    """
    Without C{spec_dst} (a datagram queued before the option was set), a
    unicast destination is its own reply source; a broadcast or multicast one
    leaves the choice to the kernel.
    """
    dst = parseDestination([in_pktinfo(0, "0.0.0.0", "10.1.2.3")], 7)
    assert dst == Destination("10.1.2.3", 7, 0, "10.1.2.3")
    dst = parseDestination([in_pktinfo(0, "0.0.0.0", "255.255.255.255")], 7)
    assert dst == Destination("255.255.255.255", 7, 0, None)
    dst = parseDestination([in_pktinfo(0, "0.0.0.0", "239.1.2.3")], 7)
    assert dst is not None and dst.replyFrom is None


def test_v6UnicastAndMulticast() -> None:
    dst = parseDestination([in6_pktinfo("fd00::3", 4), orig6("fd00::3", 53)], 53)
    assert dst == Destination("fd00::3", 53, 4, "fd00::3")
    dst = parseDestination([in6_pktinfo("ff02::1:2345", 4)], 53)
    assert dst == Destination("ff02::1:2345", 53, 4, "::")


def test_origDstAddrGivesThePort() -> None:
    """
    The original destination port (e.g. after a redirect) comes from
    C{*_ORIGDSTADDR}; without it, the bound port.
    """
    dst = parseDestination(
        [in_pktinfo(1, "10.0.0.1", "10.0.0.1"), orig4("10.0.0.1", 53)], 5353
    )
    assert dst is not None and dst.port == 53
    dst = parseDestination([in_pktinfo(1, "10.0.0.1", "10.0.0.1")], 5353)
    assert dst is not None and dst.port == 5353
    dst = parseDestination([orig6("fd00::1", 53)], 5353)
    assert dst == Destination("fd00::1", 53, 0, None)


def test_kernelDrops() -> None:
    """
    The C{SO_RXQ_OVFL} count is read by L{overflowCount}, and is no part of
    a destination.
    """
    anc = [in_pktinfo(1, "127.0.0.1", "127.0.0.1"), ovfl(17)]
    assert parseDestination(anc, 9) == parseDestination(anc[:1], 9) is not None
    assert overflowCount(ovfl(17)[2]) == 17
    assert overflowCount(b"\1\2") is None
    assert parseDestination([ovfl(3)], 9) is None


def test_formerNames() -> None:
    """
    The snake_case names of the previous release still work: the same
    functions, and C{parse_destination} with its C{(destination, drops)}.
    """
    assert cmsg.reply_control is replyControl
    assert cmsg.enable_destination_options is enableDestinationOptions
    assert cmsg.is_link_local_v6 is isLinkLocalV6
    anc = [in_pktinfo(1, "127.0.0.1", "127.0.0.1"), ovfl(17)]
    assert cmsg.parse_destination(anc, 9) == (parseDestination(anc, 9), 17)
    assert cmsg.parse_destination([(0, 0, None), ovfl(3)], 9) == (None, 3)


def test_nothingUsable() -> None:
    assert parseDestination([], 9) is None
    assert parseDestination([in6_pktinfo("::", 1)], 9) is None


def test_shortMessagesAreIgnored() -> None:
    short = [
        (L.SOL_IP, L.IP_PKTINFO, b"\1\2"),
        (L.SOL_IPV6, L.IPV6_PKTINFO, b"\0" * 19),
        (L.SOL_SOCKET, L.SO_RXQ_OVFL, b""),
    ]
    assert parseDestination(short, 9) is None


ancillary = st.lists(
    st.one_of(
        st.tuples(
            st.sampled_from([L.SOL_IP, L.SOL_IPV6, L.SOL_SOCKET, 99]),
            st.sampled_from(
                [
                    L.IP_PKTINFO,
                    L.IP_ORIGDSTADDR,
                    L.IPV6_PKTINFO,
                    L.IPV6_ORIGDSTADDR,
                    L.SO_RXQ_OVFL,
                    0,
                ]
            ),
            st.binary(max_size=40),
        ),
        st.tuples(st.integers(), st.integers(), st.binary(max_size=64)),
        st.just(()),
        st.just((1, 2)),
        st.tuples(st.integers(), st.integers(), st.text(max_size=4)),
        st.none(),
    ),
    max_size=6,
)


@settings(max_examples=400, deadline=None)
@given(ancillary, st.integers(min_value=0, max_value=65535))
def test_parseNeverRaises(anc: list, port: int) -> None:  # type: ignore[type-arg]
    """
    Random and garbled control data never raises, and whatever comes out is
    a well-formed destination the reply builder accepts.
    """
    dst = parseDestination(anc, port)
    if dst is not None:
        assert 0 <= dst.port <= 65535
        assert dst.ifindex >= 0
        for family in (socket.AF_INET, socket.AF_INET6):
            assert isinstance(replyControl(family, dst, "::1"), list)


@settings(max_examples=200, deadline=None)
@given(
    st.sampled_from([L.IP_PKTINFO, L.IPV6_PKTINFO]),
    st.binary(min_size=20, max_size=20),
)
def test_parseAnyPktinfoBytes(kind: int, data: bytes) -> None:
    """
    Any pktinfo of its size gives the address it carries (an IPv4-mapped
    one as IPv4) with the interface it names, or nothing for the wildcard.
    """
    level = L.SOL_IP if kind == L.IP_PKTINFO else L.SOL_IPV6
    dst = parseDestination([(level, kind, data)], 1)
    if kind == L.IPV6_PKTINFO:
        addr, ifindex = struct.unpack_from("=16sI", data)
        if addr == b"\0" * 16:
            assert dst is None
            return
        mapped = addr.startswith(b"\0" * 10 + b"\xff\xff")
        host = (
            socket.inet_ntoa(addr[12:])
            if mapped
            else socket.inet_ntop(socket.AF_INET6, addr)
        )
    else:
        ifindex, _, addr = struct.unpack_from("=i4s4s", data)
        ifindex = max(ifindex, 0)
        if addr == b"\0" * 4:
            # No address: the destination is spec_dst or nothing.
            assert dst is None or dst.host == dst.replyFrom
            return
        host = socket.inet_ntoa(addr)
    assert dst is not None
    assert (dst.host, dst.port, dst.ifindex) == (host, 1, ifindex)


# The reply-source rules.


def test_replyV4UsesSpecDstWithoutIfindex() -> None:
    control = replyControl(
        socket.AF_INET, Destination("10.1.2.255", 7, 3, "10.1.2.2"), "10.1.2.5"
    )
    assert control == [
        (
            L.SOL_IP,
            L.IP_PKTINFO,
            struct.pack("=i4s4s", 0, socket.inet_aton("10.1.2.2"), b"\0" * 4),
        )
    ]


def test_replyToMappedPeerOnDualStack() -> None:
    control = replyControl(
        socket.AF_INET6, Destination("127.0.0.2", 7, 1, "127.0.0.2"), "::ffff:127.0.0.1"
    )
    mapped = b"\0" * 10 + b"\xff\xff" + socket.inet_aton("127.0.0.2")
    assert control == [(L.SOL_IPV6, L.IPV6_PKTINFO, struct.pack("=16sI", mapped, 0))]


def test_replyV6UnicastPinsNoInterface() -> None:
    control = replyControl(
        socket.AF_INET6, Destination("fd00::3", 7, 4, "fd00::3"), "fd00::5"
    )
    assert control == [in6_pktinfo("fd00::3", 0)]


def test_replyV6LinkLocalNeedsInterface() -> None:
    control = replyControl(
        socket.AF_INET6, Destination("fe80::1", 7, 4, "fe80::1"), "fe80::5%veth0"
    )
    assert control == [in6_pktinfo("fe80::1", 4)]
    # A link-local peer of a global address also needs it.
    control = replyControl(
        socket.AF_INET6, Destination("fd00::3", 7, 4, "fd00::3"), "fe80::5%4"
    )
    assert control == [in6_pktinfo("fd00::3", 4)]


def test_replyV6MulticastFromAnyOnTheLink() -> None:
    control = replyControl(
        socket.AF_INET6, Destination("ff02::1:2345", 7, 4, "::"), "fd00::5"
    )
    assert control == [in6_pktinfo("::", 4)]


def test_replyUnknownLeavesItToTheKernel() -> None:
    assert replyControl(socket.AF_INET, None, "10.0.0.1") == []
    assert (
        replyControl(socket.AF_INET, Destination("10.0.0.1", 7, 0, None), "10.0.0.1")
        == []
    )
    # An IPv6 source cannot be named on an IPv4 socket.
    assert (
        replyControl(socket.AF_INET, Destination("::1", 7, 0, "::1"), "10.0.0.1") == []
    )


def test_isLinkLocal() -> None:
    assert isLinkLocalV6("fe80::1")
    assert isLinkLocalV6("FEBF::1%eth0")
    assert not isLinkLocalV6("fec0::1")
    assert not isLinkLocalV6("fe8::1")
    assert not isLinkLocalV6("127.0.0.1")
    assert not isLinkLocalV6("")


def test_enableOptions() -> None:
    """
    On Linux every option is accepted, on both families.
    """
    for family in (socket.AF_INET, socket.AF_INET6):
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            assert enableDestinationOptions(s) == []
            assert s.getsockopt(L.SOL_SOCKET, L.SO_RXQ_OVFL) == 1
            assert s.getsockopt(L.SOL_IP, L.IP_PKTINFO) == 1

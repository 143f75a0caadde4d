"""
This host's addresses from the kernel's routing netlink (one C{RTM_GETADDR}
dump), for C{udpdst check}.

A hundred lines of C{struct} instead of a dependency: the check needs one
request and four attributes of its answer (the address, the local address of
a point-to-point link, the 32-bit flags and the interface index), and the
library's only runtime dependencies are Twisted and zope.interface.  The
message layouts are C{linux/netlink.h}, C{linux/rtnetlink.h} and
C{linux/if_addr.h}; tests compare the result with C{ip -json address}.
"""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass

# linux/netlink.h
_NETLINK_ROUTE = 0
_NLMSG_ERROR = 2
_NLMSG_DONE = 3
_NLM_F_REQUEST = 0x01
_NLM_F_DUMP = 0x300
_NLMSGHDR = struct.Struct("=IHHII")  # length, type, flags, sequence, port id

# linux/rtnetlink.h, linux/if_addr.h
_RTM_NEWADDR = 20
_RTM_GETADDR = 22
_IFADDRMSG = struct.Struct("=BBBBI")  # family, prefix length, flags, scope, index
_RTATTR = struct.Struct("=HH")  # length, type
_IFA_ADDRESS = 1
_IFA_LOCAL = 2
_IFA_FLAGS = 8


@dataclass(frozen=True, slots=True)
class Address:
    """
    One address of one interface, as the kernel reports it.

    @ivar family: C{AF_INET} or C{AF_INET6}.
    @ivar host: The address itself, without a scope.
    @ivar ifindex: The index of its interface.
    @ivar flags: Its C{IFA_F_*} flags.
    """

    family: int
    host: str
    ifindex: int
    flags: int


def _align(length: int) -> int:
    return (length + 3) & ~3


def _attributes(data: bytes, offset: int, end: int) -> Iterator[tuple[int, bytes]]:
    """
    The C{(type, payload)} of each C{rtattr} in C{data[offset:end]}.
    """
    while offset + _RTATTR.size <= end:
        length, kind = _RTATTR.unpack_from(data, offset)
        if length < _RTATTR.size or offset + length > end:
            return
        yield kind, data[offset + _RTATTR.size : offset + length]
        offset += _align(length)


def _parseAddress(data: bytes, offset: int, end: int) -> Address | None:
    """
    The address in one C{RTM_NEWADDR} message body, or L{None} if it is not
    an IPv4 or IPv6 address.
    """
    family, _, flags, _, ifindex = _IFADDRMSG.unpack_from(data, offset)
    if family not in (socket.AF_INET, socket.AF_INET6):
        return None
    found = dict(_attributes(data, offset + _IFADDRMSG.size, end))
    # IFA_LOCAL is the address itself; IFA_ADDRESS is the peer's on a
    # point-to-point IPv4 link (IPv6 has only IFA_ADDRESS).
    raw = found.get(_IFA_LOCAL) or found.get(_IFA_ADDRESS)
    if raw is None:
        return None
    extended = found.get(_IFA_FLAGS)
    if extended is not None and len(extended) == 4:
        # The 8-bit field in the header cannot hold the newer flags.
        (flags,) = struct.unpack("=I", extended)
    return Address(family, socket.inet_ntop(family, raw), ifindex, flags)


def addresses() -> list[Address]:
    """
    Every IPv4 and IPv6 address of every interface of this network namespace,
    in the kernel's order.

    @raise OSError: The netlink socket fails, or the kernel answers with an
        error.
    """
    sequence = int.from_bytes(os.urandom(4), "little") or 1
    header = _IFADDRMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0)
    request = (
        _NLMSGHDR.pack(
            _NLMSGHDR.size + len(header),
            _RTM_GETADDR,
            _NLM_F_REQUEST | _NLM_F_DUMP,
            sequence,
            0,
        )
        + header
    )
    found: list[Address] = []
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, _NETLINK_ROUTE) as s:
        s.bind((0, 0))
        s.send(request)
        while True:
            data = s.recv(1 << 16)
            if not data:
                raise OSError("netlink: the address dump ended without its end")
            offset = 0
            while offset + _NLMSGHDR.size <= len(data):
                length, kind, _, seq, _ = _NLMSGHDR.unpack_from(data, offset)
                if length < _NLMSGHDR.size or offset + length > len(data):
                    raise OSError("netlink: a truncated message in the address dump")
                body = offset + _NLMSGHDR.size
                if seq != sequence:
                    pass  # not an answer to this request
                elif kind == _NLMSG_DONE:
                    return found
                elif kind == _NLMSG_ERROR:
                    (error,) = struct.unpack_from("=i", data, body)
                    if error:
                        raise OSError(-error, os.strerror(-error))
                elif kind == _RTM_NEWADDR:
                    address = _parseAddress(data, body, offset + length)
                    if address is not None:
                        found.append(address)
                offset += _align(length)

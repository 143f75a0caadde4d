"""
Linux socket constants that Python's L{socket} module may lack, in one place.

Values are the Linux ABI (include/uapi/linux/in.h, in6.h, asm-generic/socket.h);
where the running Python defines a name we use its value instead.
"""

import socket
import struct

SOL_IP: int = getattr(socket, "SOL_IP", 0)
SOL_IPV6: int = getattr(socket, "SOL_IPV6", 41)
SOL_SOCKET: int = socket.SOL_SOCKET

IP_PKTINFO: int = getattr(socket, "IP_PKTINFO", 8)
IP_RECVORIGDSTADDR: int = getattr(socket, "IP_RECVORIGDSTADDR", 20)
IP_ORIGDSTADDR: int = IP_RECVORIGDSTADDR
IP_FREEBIND: int = getattr(socket, "IP_FREEBIND", 15)
IP_TRANSPARENT: int = getattr(socket, "IP_TRANSPARENT", 19)

IPV6_V6ONLY: int = getattr(socket, "IPV6_V6ONLY", 26)
IPV6_RECVPKTINFO: int = getattr(socket, "IPV6_RECVPKTINFO", 49)
IPV6_PKTINFO: int = getattr(socket, "IPV6_PKTINFO", 50)
IPV6_RECVORIGDSTADDR: int = getattr(socket, "IPV6_RECVORIGDSTADDR", 74)
IPV6_ORIGDSTADDR: int = IPV6_RECVORIGDSTADDR
IPV6_TRANSPARENT: int = getattr(socket, "IPV6_TRANSPARENT", 75)
IPV6_FREEBIND: int = getattr(socket, "IPV6_FREEBIND", 78)

IP_RECVERR: int = getattr(socket, "IP_RECVERR", 11)
IPV6_RECVERR: int = getattr(socket, "IPV6_RECVERR", 25)
MSG_ERRQUEUE: int = int(getattr(socket, "MSG_ERRQUEUE", 0x2000))

SO_RXQ_OVFL: int = getattr(socket, "SO_RXQ_OVFL", 40)
#: C{getsockopt(SOL_SOCKET, SO_MEMINFO)}: the socket's C{sk_meminfo}, an array
#: of u32 of which the C{SK_MEMINFO_DROPS}th is the count of datagrams the
#: kernel dropped on the socket (what C{SO_RXQ_OVFL} stamps on a datagram,
#: and the C{drops} column of C{/proc/net/udp}).
SO_MEMINFO: int = getattr(socket, "SO_MEMINFO", 55)
SK_MEMINFO_DROPS = 8
SO_REUSEPORT: int = getattr(socket, "SO_REUSEPORT", 15)

# Plain ints: socket's are MsgFlag enum members, and `flags & MSG_TRUNC` on
# those goes through the enum machinery (~0.4 µs a test, on the hot path).
MSG_TRUNC: int = int(getattr(socket, "MSG_TRUNC", 0x20))
MSG_CTRUNC: int = int(getattr(socket, "MSG_CTRUNC", 0x08))

#: The kernel's layouts that both I/O paths and the control-message parser
#: read: C{in_pktinfo} (int ifindex, in_addr spec_dst, in_addr addr),
#: C{in6_pktinfo} (in6_addr addr, unsigned ifindex), a port and a flow label
#: in network order, a C{u32} (a scope id, the C{SO_RXQ_OVFL} count) and an
#: address family in host order, and a C{cmsghdr} (size_t len, int level,
#: int type).
IN_PKTINFO = struct.Struct("=i4s4s")
IN6_PKTINFO = struct.Struct("=16sI")
NET_PORT = struct.Struct("!H")
NET_U32 = struct.Struct("!I")
U32 = struct.Struct("=I")
FAMILY = struct.Struct("=H")
CMSGHDR = struct.Struct("@Nii")

#: Payload sizes of the control messages we ask for.
IN_PKTINFO_SIZE = 12  # int ifindex, in_addr spec_dst, in_addr addr
IN6_PKTINFO_SIZE = 20  # in6_addr addr, unsigned int ifindex
SOCKADDR_IN_SIZE = 16
SOCKADDR_IN6_SIZE = 28
U32_SIZE = 4

#: Room for every control message that can arrive with one datagram on a
#: dual-stack socket (IPv4-mapped traffic brings both pktinfo kinds), with
#: slack so that a message we did not ask for does not truncate the ones we did.
ANCILLARY_BUFFER_SIZE: int = (
    socket.CMSG_SPACE(IN_PKTINFO_SIZE)
    + socket.CMSG_SPACE(IN6_PKTINFO_SIZE)
    + socket.CMSG_SPACE(SOCKADDR_IN_SIZE)
    + socket.CMSG_SPACE(SOCKADDR_IN6_SIZE)
    + socket.CMSG_SPACE(U32_SIZE)
    + 64
)

"""
A Twisted UDP port that knows where each datagram was sent to and replies
from there.
"""

from __future__ import annotations

import errno
import operator
import socket
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

from twisted.internet import error, udp
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.interfaces import IHalfCloseableDescriptor, IReactorFDSet
from twisted.internet.protocol import AbstractDatagramProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from udpdst import _linux as L
from udpdst import io
from udpdst.address import Destination, PeerAddress, interfaceIndex, maxPayload
from udpdst.cmsg import enableDestinationOptions, parseDestination, replyControl
from udpdst.interfaces import IDestinationDatagramProtocol, IDestinationTransport
from udpdst.transparent import (
    DEFAULT_IDLE_TIMEOUT,
    DEFAULT_SIZE,
    CapabilityError,
    ReplySockets,
    isTransparent,
    makeTransparent,
)

#: The I/O path this process runs: C{"recvmmsg"} (the C extension) or
#: C{"recvmsg"} (pure Python, also when C{UDPDST_IO=python}).
IO_PATH = io.IO_PATH

_WILDCARDS = frozenset({"", "0.0.0.0", "::"})

#: What C{"<broadcast>"} stands for as a destination host (Python's socket
#: module reads it so; Twisted's port passes it through).
_LIMITED_BROADCAST = "255.255.255.255"

# A send whose chosen source address is gone (removed, or IPv6 still
# tentative) fails with one of these; the reply then goes without control data.
_SOURCE_VANISHED = frozenset({errno.EINVAL, errno.EADDRNOTAVAIL, errno.ENETUNREACH})

_READ_IGNORE = frozenset(udp._sockErrReadIgnore)
_READ_REFUSE = frozenset(udp._sockErrReadRefuse)

# What an ICMP error about an earlier reply turns into (icmp_err_convert,
# icmpv6_err_convert): with IP_RECVERR on, the next receive fails once with it
# and the details wait in the error queue.
_ICMP_ERRORS = frozenset(
    {
        errno.ECONNREFUSED,
        errno.EHOSTUNREACH,
        errno.ENETUNREACH,
        errno.EHOSTDOWN,
        errno.ENONET,
        errno.ENOPROTOOPT,
        errno.EOPNOTSUPP,
        errno.EMSGSIZE,
        errno.EPROTO,
        errno.EACCES,
        errno.ETIMEDOUT,
    }
)

_TRUNCATED = L.MSG_TRUNC
_CONTROL_TRUNCATED = L.MSG_CTRUNC


#: The L{PortCounters} that count for the socket itself rather than for the
#: process reading it: every process that shares the socket sees all of it,
#: so these do not add up across processes.
SOCKET_FIGURES = frozenset({"kernelDrops"})


@dataclass(slots=True)
class PortCounters:
    """
    What a L{DestinationPort} has seen.

    Every field is an C{int}; consumers read them all through L{asDict}.

    @ivar received: Whole datagrams delivered to the protocol.
    @ivar oversized: Datagrams larger than C{maxPacketSize}, dropped (not in
        C{received}).
    @ivar replied: Datagrams the kernel accepted from C{write}.
    @ivar sendErrors: Writes that failed: raised at C{write} time
        (C{MessageLengthError}, C{InvalidAddressError}) or failed when sent
        (e.g. C{EAGAIN}, C{ENOBUFS}).
    @ivar sendFallbacks: Sends retried without control data because the
        source address could not be used (it vanished, or is tentative).
    @ivar unreadable: Datagrams dropped because their peer address could not
        be read (not in C{received}).
    @ivar icmpErrors: ICMP errors (e.g. port unreachable) that came back for
        replies already sent, read from the socket's error queue; the
        replies stay counted in C{replied}.
    @ivar controlTruncated: Datagrams whose control data did not fit; they
        were delivered with an unknown destination.
    @ivar kernelDrops: Datagrams the kernel dropped on this socket (receive
        buffer full, mostly): the count of C{/proc/net/udp}'s C{drops} column.
        Read as the port reads (C{SO_RXQ_OVFL}: the kernel stamps the count
        on a datagram as it queues it, so drops show with the next datagram
        that gets through), and at once by
        L{DestinationPort.refreshCounters} and when the port closes.  It is
        the socket's count: processes that share one socket each see all of
        it.
    @ivar replySocketsOpened: Transparent ports: reply sockets opened, to
        reply from a datagram's original address and port
        (L{udpdst.transparent}).
    @ivar replySocketsReused: Transparent ports: replies sent through a
        cached reply socket.
    @ivar replySocketsEvicted: Transparent ports: reply sockets closed to
        make room in the cache or because they were idle.
    @ivar replySocketsFailed: Transparent ports: reply sockets that could not
        be opened (no capability, no permission for the port); those replies
        were not sent.
    @ivar replySocketsRefused: Transparent ports: replies not sent because
        another socket on this host is bound to the original address and
        port, whose datagrams a reply socket there would take.
    """

    received: int = 0
    oversized: int = 0
    replied: int = 0
    sendErrors: int = 0
    sendFallbacks: int = 0
    controlTruncated: int = 0
    kernelDrops: int = 0
    unreadable: int = 0
    icmpErrors: int = 0
    replySocketsOpened: int = 0
    replySocketsReused: int = 0
    replySocketsEvicted: int = 0
    replySocketsFailed: int = 0
    replySocketsRefused: int = 0

    def asDict(self) -> dict[str, int]:
        return asdict(self)


def sparse(count: int) -> bool:
    """
    Whether the C{count}th occurrence of a per-datagram event is logged: the
    1st, 2nd, 4th, 8th...  A remote flood then costs log2(n) lines, not n
    (twistd shows debug events by default).
    """
    return count & (count - 1) == 0


def _enableSendErrors(sock: socket.socket) -> None:
    """
    Turn on C{IP_RECVERR} (and C{IPV6_RECVERR}): without it the kernel
    reports a reply dropped by a full queue on the way out (C{ENOBUFS}) to
    nobody, and the reply would count as replied.
    """
    options = [(L.SOL_IP, L.IP_RECVERR)]
    if sock.family == socket.AF_INET6:
        options.append((L.SOL_IPV6, L.IPV6_RECVERR))
    for level, option in options:
        try:
            sock.setsockopt(level, option, 1)
        except OSError:
            pass


def _socketDrops(sock: socket.socket) -> int | None:
    """
    The count of datagrams the kernel dropped on C{sock} so far
    (C{SO_MEMINFO}), or L{None} where it cannot be read (the socket is
    closed, or the kernel is older than 3.9).
    """
    size = (L.SK_MEMINFO_DROPS + 1) * L.U32_SIZE
    try:
        info = sock.getsockopt(socket.SOL_SOCKET, L.SO_MEMINFO, size)
    except OSError:
        return None
    if len(info) < size:
        return None
    drops: int = L.U32.unpack_from(info, L.SK_MEMINFO_DROPS * L.U32_SIZE)[0]
    return drops


def _interfaceName(index: int) -> str:
    """
    The name of interface C{index}, or the number as text if it has none
    (any more).  Asked of the kernel each time, never cached: an index can
    be re-created under another name, or reused by another interface.
    """
    try:
        return socket.if_indextoname(index)
    except OSError:
        return str(index)


def _scopeOf(zone: str, host: str) -> int:
    """
    The interface index that C{"fe80::5%zone"} names, asked of the kernel
    each time (see L{_interfaceName}).

    @raise error.InvalidAddressError: no interface has that name.
    """
    try:
        return interfaceIndex(zone)
    except OSError:
        raise error.InvalidAddressError(host, "no such interface") from None


@implementer(IDestinationTransport, IHalfCloseableDescriptor)
class DestinationPort(udp.Port):
    """
    A L{udp.Port} whose wildcard socket reports each datagram's destination
    (C{IP_PKTINFO}, C{IPV6_RECVPKTINFO}, C{*_ORIGDSTADDR}) and names the
    source of each reply, so replies leave from the address the client used.

    Runs on any L{IReactorFDSet} reactor.  Protocols providing
    L{IDestinationDatagramProtocol} get C{datagramReceived(data, addr, dst)};
    others get C{datagramReceived(data, addr)} with an C{addr} that carries
    the destination, so their C{transport.write(data, addr)} replies from it.

    A read pass receives a batch (L{udpdst.io}), classifies each datagram by
    its key (peer and control data: a cache hit gives the ready peer address
    and destination) and dispatches it, in C where the C path runs
    (C{io.Path.read}).  What the C path touches of the port is its
    L{io.Outbox}, C{_outbox}, and nothing else.  Replies written during a pass are queued and sent
    together when the batch is done, in order; a write
    outside a pass is sent at once.  Errors known at C{write} time raise;
    errors of the send itself are counted in C{counters.sendErrors} and
    logged sparsely, a reply written after the socket closed included
    (C{EBADF}).  C{IP_RECVERR} is on, so that replies the kernel drops
    on the way out (a full queue: C{ENOBUFS}) are counted there too rather
    than as replied; the ICMP errors it also reports are read off the error
    queue and counted in C{counters.icmpErrors}.

    A transparent port (C{transparent=True}, for C{TPROXY} rules) answers a
    datagram sent to another port than its own from that address and port,
    through the reply sockets of L{udpdst.transparent}.

    @ivar counters: The L{PortCounters}.
    @ivar maxDatagramsPerRead: The most datagrams one C{doRead} handles before
        it yields to the reactor (also bounded by C{maxThroughput} bytes).
    @ivar peerMapSize: How many peers' last destinations are remembered for
        plain protocols that reply later to an address they rebuilt.
    @ivar peerCacheSize: How many distinct (peer, destination) keys keep
        their ready peer address; the cache is emptied when full.  About
        0.8 kB a key: small enough that a flood of spoofed sources adds
        little to a server's peak memory.
    @ivar ancillaryBufferSize: Room for control data per datagram; sized for
        every message that can arrive together.  Every socket, also one
        bound to a single address, gets C{SO_RXQ_OVFL}, so every socket
        needs it.
    """

    #: The L{udpdst.io.Path} this port reads and writes with; set it (e.g. to
    #: L{udpdst.io.PLAIN}) before the port starts listening.
    ioPath: io.Path = io.DEFAULT
    maxDatagramsPerRead = 256
    peerMapSize = 8192
    peerCacheSize = 1024
    ancillaryBufferSize = L.ANCILLARY_BUFFER_SIZE
    _log = Logger()

    def __init__(
        self,
        port: int,
        proto: AbstractDatagramProtocol,
        interface: str = "",
        maxPacketSize: int = 8192,
        reactor: IReactorFDSet | None = None,
        *,
        reusePort: bool = False,
        receiveBufferSize: int | None = None,
        v6Only: bool = False,
        transparent: bool = False,
        replySockets: int = DEFAULT_SIZE,
        replySocketIdleTimeout: float = DEFAULT_IDLE_TIMEOUT,
    ) -> None:
        """
        @param port: The port number to bind; C{0} for any.
        @param proto: The protocol to connect.
        @param interface: The address to bind: C{""} or C{"0.0.0.0"} for all
            IPv4 addresses, C{"::"} for all IPv6 and (unless C{v6Only}) IPv4
            addresses, or one address.
        @param maxPacketSize: The largest datagram delivered; larger ones are
            counted in C{counters.oversized} and dropped.
        @param reactor: The reactor; the global one if L{None}.
        @param reusePort: Set C{SO_REUSEPORT}, so several processes can share
            the port.
        @param receiveBufferSize: C{SO_RCVBUF} in bytes, if given.
        @param v6Only: With C{"::"}, serve IPv6 only.
        @param transparent: Set C{IP_TRANSPARENT} (and C{IPV6_TRANSPARENT})
            before binding, so that C{TPROXY} rules deliver to this port, and
            reply to a datagram sent to another port than this one from that
            address and port (L{udpdst.transparent}).  Needs
            C{CAP_NET_ADMIN} or C{CAP_NET_RAW}, also after start: the reply
            sockets are opened as replies need them.  An adopted socket that
            has the option already is served so without being asked.
        @param replySockets: Transparent ports: the most reply sockets kept
            open (each a file descriptor).
        @param replySocketIdleTimeout: Transparent ports: seconds an unused
            reply socket stays open.
        """
        udp.Port.__init__(self, port, proto, interface, maxPacketSize, reactor)
        self.reusePort = reusePort
        self.receiveBufferSize = receiveBufferSize
        self.v6Only = v6Only
        self.transparent = transparent
        self.replySockets = replySockets
        self.replySocketIdleTimeout = replySocketIdleTimeout
        self.counters = PortCounters()
        # The reply sockets of a transparent port, once it listens.
        self._transparentReplies: ReplySockets | None = None
        self._wildcard = False
        self._fixedDestination: Destination | None = None
        # What the read pass and the writes in it share, also with C.
        self._outbox = io.Outbox(self._flush)
        # key -> (peer, destination); see _classify.
        self._peers: dict[Any, tuple[PeerAddress, Destination | None]] = {}
        self._peerDestinations: dict[tuple[str, int], Destination] = {}
        self._family6 = False
        # What is left of a batch when the protocol stopped reading in it.
        self._pending: io.Batch = []
        self._readHandlers: tuple[Any, io.Handlers] | None = None

    def __repr__(self) -> str:
        if self._realPortNumber is not None:
            return (
                f"<{self.__class__.__name__} {self.protocol.__class__.__name__}"
                f" on {self.interface or '0.0.0.0'}:{self._realPortNumber}>"
            )
        return f"<{self.__class__.__name__} {self.protocol.__class__.__name__} not listening>"

    # Socket set-up

    def createInternetSocket(self) -> socket.socket:
        skt: socket.socket = udp.Port.createInternetSocket(self)
        if self.addressFamily == socket.AF_INET6 and self.interface == "::":
            # Dual-stack unless asked otherwise; never left to the sysctl.
            skt.setsockopt(L.SOL_IPV6, L.IPV6_V6ONLY, int(self.v6Only))
        if self.reusePort:
            skt.setsockopt(socket.SOL_SOCKET, L.SO_REUSEPORT, 1)
        if self.receiveBufferSize:
            skt.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.receiveBufferSize)
        if self.transparent:
            self._makeTransparent(skt)
        return skt

    def _makeTransparent(self, skt: socket.socket) -> None:
        """
        Set the transparent options on C{skt}, before it is bound.

        @raise error.CannotListenError: the process lacks the capability; the
            message names it.
        """
        try:
            makeTransparent(skt)
        except CapabilityError as e:
            skt.close()
            raise error.CannotListenError(
                self.interface, self.port, e.strerror
            ) from None

    def _bindSocket(self) -> None:
        udp.Port._bindSocket(self)
        _enableSendErrors(self.socket)
        try:
            # Drops are counted on every socket, whatever it is bound to.
            self.socket.setsockopt(socket.SOL_SOCKET, L.SO_RXQ_OVFL, 1)
        except OSError:
            pass  # refreshCounters still reads the kernel's count
        if isTransparent(self.socket):
            # Asked for, or set on an adopted socket by whoever made it.
            self.transparent = True
        elif self.transparent:
            # An adopted socket, asked to be transparent: too late for
            # binding foreign addresses, in time for TPROXY and replies.
            self._makeTransparent(self.socket)
        if self.transparent:
            self._transparentReplies = ReplySockets(
                self.reactor,
                self.counters,
                self,
                self.replySockets,
                self.replySocketIdleTimeout,
            )
        sockname = self.socket.getsockname()
        host = sockname[0]
        self._family6 = self.socket.family == socket.AF_INET6
        if host in _WILDCARDS or self.transparent:
            # A transparent socket bound to one address is still sent
            # datagrams for others (TPROXY): it needs each destination too.
            self._wildcard = True
            refused = enableDestinationOptions(self.socket)
            if refused:
                self._log.warn(
                    "{port}: the kernel refused {options}; replies may leave "
                    "from the wrong address",
                    port=self,
                    options=", ".join(refused),
                )
        else:
            # Bound to one address: every datagram went there and every
            # reply leaves from it, with no control data needed.
            ifindex = sockname[3] if len(sockname) > 3 else 0
            self._fixedDestination = Destination(host, sockname[1], ifindex, host)

    def startReading(self) -> None:
        io.warnIfFallback()
        self._outbox.reading = True
        udp.Port.startReading(self)
        if self._pending:
            # Datagrams already read when the protocol paused: deliver them
            # now, as the kernel may have nothing more to wake the reactor.
            self.reactor.callLater(0, self._resume)  # type: ignore[attr-defined]

    def stopReading(self) -> None:
        self._outbox.reading = False
        udp.Port.stopReading(self)

    # Reading: receive -> classify -> dispatch

    def doRead(self) -> None:
        """
        Read what is queued, up to C{maxDatagramsPerRead} datagrams or
        C{maxThroughput} bytes, and stop at once when the protocol stops
        reading or stops the port; then send the replies written meanwhile.
        """
        outbox = self._outbox
        outbox.holdReplies = True
        try:
            if self._pending:
                batch, self._pending = self._pending, []
                if not self._delivered(*io.dispatch(batch, self._handlers())):
                    return
            remaining = self.maxDatagramsPerRead
            budget = self.maxThroughput
            size = self.maxPacketSize
            ancSize = self.ancillaryBufferSize
            counters = self.counters
            while remaining > 0 and budget > 0 and outbox.reading:
                want = min(io.BATCH, remaining)
                got = self._receive(want, size, ancSize, self._handlers())
                if got is None:
                    if remaining == self.maxDatagramsPerRead:
                        # Woken with nothing to read: maybe an error queue
                        # the select reactor reports as readable.
                        self._drainErrors()
                    return
                count, delivered, nbytes, drops, rest = got
                if drops > counters.kernelDrops:
                    # A datagram queued before a refreshCounters carries an
                    # older (smaller) count: the figure never goes back.
                    counters.kernelDrops = drops
                if not self._delivered(delivered, rest) or count < want:
                    return
                remaining -= want
                budget -= nbytes + 64 * want
        finally:
            outbox.holdReplies = False
            if outbox.queue:
                self._flush()

    def _resume(self) -> None:
        if self._pending and self._outbox.reading:
            self.doRead()

    def _handlers(self) -> io.Handlers:
        """
        What the next batch is handed to (see L{io.Handlers}), made again
        only when C{self.protocol} or its C{datagramReceived} changed (making
        them costs about a microsecond, which a pass of one datagram would
        pay each time): a server may replace the protocol (on reload, say), and a
        protocol may rebind its own C{datagramReceived}.
        """
        protocol = self.protocol
        deliver = protocol.datagramReceived
        made = self._readHandlers
        if made is None or made[0] is not protocol or made[1].deliver != deliver:
            made = self._readHandlers = (protocol, self._newHandlers(deliver))
        return made[1]

    def _newHandlers(self, deliver: Any) -> io.Handlers:
        # The protocol's kind is decided once, here, with providedBy.
        aware = IDestinationDatagramProtocol.providedBy(self.protocol)
        return io.Handlers(
            self._peers,
            self._classifyNew,
            deliver,
            None if aware else self._peerDestinations,
            self._rememberPeer,
            self._deliveryFailed,
            self._outbox,
        )

    def _delivered(self, delivered: int, rest: io.Batch | None) -> bool:
        """
        Count what a batch delivered; keep what the protocol did not read
        (it stopped reading) for when it reads again.

        @return: Whether the protocol is still reading.
        """
        self.counters.received += delivered
        if rest is None:
            return True
        if self.connected:
            # Before what a pass nested in the protocol's call left.
            self._pending = rest + self._pending
        return False

    def _deliveryFailed(self, peer: PeerAddress, reason: BaseException) -> None:
        self._log.failure(
            "{port}: {protocol} failed on a datagram from {peer}",
            Failure(reason),
            port=self,
            protocol=self.protocol,
            peer=peer,
        )

    def _receive(
        self, count: int, size: int, ancSize: int, handlers: io.Handlers
    ) -> tuple[int, int, int, int, io.Batch | None] | None:
        """
        Read a batch from the socket and hand it to the protocol
        (L{io.read}); L{None} when there is none (nothing queued, or an
        error that ends the pass).
        """
        for _attempt in range(2):
            try:
                got = self.ioPath.read(self.socket, count, size, ancSize, handlers)
            except OSError as se:
                no = se.args[0]
                if no in _READ_IGNORE:
                    return None
                if self._connectedAddr:
                    if no in _READ_REFUSE:
                        self.protocol.connectionRefused()
                        return None
                    raise
                if no not in _ICMP_ERRORS:
                    raise
                # About an earlier reply, not this read: read the details
                # off the error queue and go on.
                self._drainErrors()
                continue
            return got if got[0] else None
        return None

    def _drainErrors(self) -> None:
        """
        Read (and count) what waits in the socket's error queue: it takes
        room from the receive buffer, and makes pollers report an error.
        """
        recvmsg = self.socket.recvmsg
        for _ in range(self.maxDatagramsPerRead):
            try:
                recvmsg(0, 256, L.MSG_ERRQUEUE)
            except OSError:
                break
            self.counters.icmpErrors += 1

    def refreshCounters(self) -> PortCounters:
        """
        Read now what the kernel counts for this socket, so that C{counters}
        agree with C{/proc/net/udp} at this moment: C{kernelDrops} also
        covers drops no datagram has reported yet (C{SO_RXQ_OVFL} reports
        them only with the next datagram queued).  One system call; nothing
        changes once the port has closed.

        @return: C{counters}.
        """
        counters = self.counters
        sock = getattr(self, "socket", None)
        drops = _socketDrops(sock) if sock is not None else None
        if drops is not None and drops > counters.kernelDrops:
            counters.kernelDrops = drops
        return counters

    def readConnectionLost(self, reason: Any) -> None:
        """
        epoll and poll report a queued ICMP error as an error event with
        nothing to read, and Twisted takes that for the end of input; a UDP
        socket has no such end, so read the error queue and keep reading.
        """
        self._drainErrors()
        self.socket.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if self._outbox.reading and self.connected:
            udp.Port.startReading(self)

    def writeConnectionLost(self, reason: Any) -> None:
        pass

    def _classify(
        self, key: Any, useCache: bool
    ) -> tuple[PeerAddress, Destination | None] | None:
        """
        The peer address and destination a key stands for, built once per
        key and cached (peers on a link-local scope excepted: their address
        names the interface, and names are never cached).  L{None} if the
        peer address cannot be read; the datagram is then counted and dropped.
        """
        try:
            addr, ancdata, target = self.ioPath.decodeKey(key)
        except (ValueError, OSError):
            addr = None
        if addr is None or (len(addr) == 4) != self._family6:
            # The kernel gives a socket's own family; anything else is junk.
            self.counters.unreadable += 1
            return None
        if not self._wildcard:
            dst = self._fixedDestination
        elif useCache:
            dst = parseDestination(ancdata, self._realPortNumber or 0)
        else:
            dst = None
        host = addr[0]
        scoped = self._family6 and addr[3] != 0
        if scoped:
            host = f"{host}%{_interfaceName(addr[3])}"
        peer = PeerAddress(host, addr[1], dst)
        replies = self._transparentReplies
        if replies is not None and dst is not None and dst.port != self._realPortNumber:
            # Sent to another port (TPROXY): the reply goes through a reply
            # socket.  write's fast paths (QueuedWrite in C) see a _reply that
            # is not this port's and leave it to _writeSlow, which sends it.
            sockaddr = (addr[0], addr[1], 0, addr[3]) if self._family6 else addr
            route = replies.route(sockaddr, dst)
            peer._reply = (replies, None, route, None, maxPayload(host))
        else:
            control = (
                self.ioPath.packControl(replyControl(self.addressFamily, dst, host))
                if self._wildcard
                else self.ioPath.packControl(())
            )
            peer._reply = (self, self._outbox, target, control, maxPayload(host))
        entry = (peer, dst)
        if useCache and not scoped:
            peers = self._peers
            if len(peers) >= self.peerCacheSize:
                peers.clear()
            peers[key] = entry
        return entry

    def _classifyNew(
        self, key: Any, flags: int
    ) -> tuple[PeerAddress, Destination | None] | None:
        """
        Classify a datagram whose key is not cached, or that the kernel
        flagged: oversized ones are counted and dropped (L{None}); those whose
        control data was cut are delivered with an unknown destination (never
        guessed from what is left).
        """
        if not flags:
            return self._classify(key, True)
        if flags & _TRUNCATED:
            counters = self.counters
            counters.oversized += 1
            if sparse(counters.oversized):
                try:
                    peer: Any = self.ioPath.decodeKey(key)[0]
                except (ValueError, OSError):
                    peer = "?"
                self._log.debug(
                    "{port}: dropped a datagram from {peer} larger than "
                    "maxPacketSize={size} ({count} so far)",
                    port=self,
                    peer=peer,
                    size=self.maxPacketSize,
                    count=counters.oversized,
                )
            return None
        if flags & _CONTROL_TRUNCATED:
            self.counters.controlTruncated += 1
            return self._classify(key, False)
        return self._peers.get(key) or self._classify(key, True)

    def _rememberPeer(self, peer: PeerAddress, dst: Destination) -> None:
        peers = self._peerDestinations
        if len(peers) >= self.peerMapSize and peer not in peers:
            # Evict the oldest entry: memory stays bounded under a flood of
            # sources, and active peers are re-added on their next datagram.
            del peers[next(iter(peers))]
        peers[peer] = dst

    # Writing

    def write(  # type: ignore[override]
        self,
        datagram: bytes,
        addr: tuple[str, int] | None = None,
        dst: Destination | None = None,
    ) -> None:
        """
        Send a datagram; see L{IDestinationTransport.write}.

        During a read pass the datagram is queued and sent with the others
        when the pass ends; otherwise it is sent at once.  Where the C path
        runs, C{io.QueuedWrite} takes the fast path (the first branch below)
        before this method is called; what it leaves, this method decides.
        """
        if type(addr) is PeerAddress:
            reply = addr._reply
            if (
                reply is not None
                and reply[0] is self
                and (dst is None or dst is addr.destination)
            ):
                if len(datagram) > reply[4]:
                    self._tooLong()
                if type(datagram) is not bytes:
                    datagram = bytes(datagram)
                self._enqueue((datagram, reply[2], reply[3]))
                return
        self._writeSlow(datagram, addr, dst)

    def _writeSlow(
        self,
        datagram: bytes,
        addr: tuple[str, int] | None,
        dst: Destination | None,
    ) -> None:
        """
        L{write} to an address this port did not make (rebuilt, or from
        another port), or with another destination than it carries, or one
        that a reply socket answers (L{_classify}).
        """
        replies = self._transparentReplies
        if replies is not None and type(addr) is PeerAddress:
            reply = addr._reply
            if (
                reply is not None
                and reply[0] is replies
                and (dst is None or dst is addr.destination)
            ):
                if len(datagram) > reply[4]:
                    self._tooLong()
                replies.send(bytes(datagram), reply[2])  # type: ignore[arg-type]
                return
        if self._connectedAddr:
            try:
                udp.Port.write(self, datagram, addr)
            except (error.MessageLengthError, OSError):
                self.counters.sendErrors += 1
                raise
            self.counters.replied += 1
            return
        if addr is None:
            self.counters.sendErrors += 1
            raise error.InvalidAddressError(None, "write() needs an address")
        host = addr[0]
        try:
            self._checkAddress(addr)
            sockaddr = self._sockaddr(addr)
            target = self._pack(sockaddr)
        except error.InvalidAddressError:
            self.counters.sendErrors += 1
            raise
        if len(datagram) > maxPayload(host):
            self._tooLong()
        control: Any = ()
        if self._wildcard:
            if dst is None:
                dst = self._destinationFor(addr)
            replies = self._transparentReplies
            if (
                replies is not None
                and dst is not None
                and dst.port != self._realPortNumber
            ):
                replies.send(bytes(datagram), replies.route(sockaddr, dst))
                return
            control = replyControl(self.addressFamily, dst, host)
        if type(datagram) is not bytes:
            datagram = bytes(datagram)
        self._enqueue((datagram, target, self.ioPath.packControl(control)))

    def _tooLong(self) -> None:
        self.counters.sendErrors += 1
        raise error.MessageLengthError("message too long")

    def _sockaddr(self, addr: tuple[str, int]) -> tuple[Any, ...]:
        """
        C{addr} as C{sendto} takes it on this port's socket; a scoped IPv6
        host (C{"fe80::5%eth0"}) is sent with its interface index (Python
        would ignore the zone in the text), looked up now, so a re-created
        interface is found; C{"<broadcast>"} is the limited broadcast
        address, as Python's C{sendto} (and so Twisted's port) reads it.

        @raise error.InvalidAddressError: C{addr} cannot be sent to: its port
            is not 0-65535 (Twisted's C{write} lets C{sendto} raise
            C{OverflowError}) or its zone names no interface.
        """
        host = addr[0]
        try:
            port = operator.index(addr[1])
        except TypeError:
            port = -1
        if not 0 <= port <= 0xFFFF:
            raise error.InvalidAddressError(host, f"port {addr[1]!r} is not 0-65535")
        if self._family6:
            bare, _, zone = host.partition("%")
            scope = _scopeOf(zone, host) if zone else 0
            return (bare, port, 0, scope)
        return (_LIMITED_BROADCAST if host == "<broadcast>" else host, port)

    def _pack(self, sockaddr: tuple[Any, ...]) -> Any:
        """
        C{sockaddr} (from L{_sockaddr}) as L{io.send} takes it.

        @raise error.InvalidAddressError: its host is not an IP address.
        """
        try:
            return self.ioPath.packTarget(sockaddr)
        except (OSError, ValueError):
            raise error.InvalidAddressError(sockaddr[0], "not an IP address") from None

    def _destinationFor(self, addr: tuple[str, int]) -> Destination | None:
        """
        The destination a reply to C{addr} should leave from, when the caller
        named none: the one C{addr} carries, or the last one that peer sent
        to (also the datagram being dispatched: the map is updated first).
        """
        carried = getattr(addr, "destination", None)
        if carried is not None:
            return carried  # type: ignore[no-any-return]
        return self._peerDestinations.get(addr)  # type: ignore[call-overload,no-any-return]

    def _checkAddress(self, addr: tuple[str, int]) -> None:
        host = addr[0]
        v4 = isIPAddress(host) or host == "<broadcast>"
        if not v4 and not isIPv6Address(host):
            raise error.InvalidAddressError(
                host, "write() only accepts IP addresses, not hostnames"
            )
        if v4 and self.addressFamily == socket.AF_INET6:
            raise error.InvalidAddressError(
                host, "IPv6 port write() called with IPv4 or broadcast address"
            )
        if not v4 and self.addressFamily == socket.AF_INET:
            raise error.InvalidAddressError(
                host, "IPv4 port write() called with IPv6 address"
            )

    def _enqueue(self, item: tuple[bytes, Any, Any]) -> None:
        outbox = self._outbox
        queue = outbox.queue
        queue.append(item)
        if not outbox.holdReplies or len(queue) >= io.BATCH:
            self._flush()

    def _flush(self) -> None:
        """
        Send the queued replies, in order, as few system calls as the kernel
        allows; a reply that fails is retried without control data if its
        source vanished, otherwise counted (and logged sparsely).
        """
        outbox = self._outbox
        queue, outbox.queue = outbox.queue, []
        counters = self.counters
        start = 0
        total = len(queue)
        try:
            sock = self.socket
        except AttributeError:
            # The port has closed (Twisted deletes the socket): a reply
            # written since is counted as a send that failed, not raised, as
            # on a socket closed under the port (EBADF).
            for item in queue:
                self._sendFailed(item, errno.EBADF)
            return
        while start < total:
            sent, no = self.ioPath.send(sock, queue, start)
            counters.replied += sent
            start += sent
            if no:
                self._sendFailed(queue[start], no)
                start += 1

    def _sendFailed(self, item: tuple[bytes, Any, Any], no: int) -> None:
        """
        One reply failed with C{errno} C{no}: retry it once without control
        data if its source address vanished (or is tentative), or once more
        if the error belonged to an earlier datagram (C{ECONNREFUSED});
        otherwise count it.
        """
        data, target, control = item
        counters = self.counters
        if no == errno.ECONNREFUSED or (control and no in _SOURCE_VANISHED):
            retry = (data, target, self.ioPath.packControl(()))
            if control and no != errno.ECONNREFUSED:
                counters.sendFallbacks += 1
                if sparse(counters.sendFallbacks):
                    self._log.debug(
                        "{port}: could not send from the requested source "
                        "({error}); sent from the kernel's choice ({count} so far)",
                        port=self,
                        error=errno.errorcode.get(no, no),
                        count=counters.sendFallbacks,
                    )
            else:
                retry = item
            sent, no = self.ioPath.send(self.socket, [retry], 0)
            if sent:
                counters.replied += 1
                return
        counters.sendErrors += 1
        if sparse(counters.sendErrors):
            self._log.info(
                "{port}: a reply could not be sent ({error}; {count} so far)",
                port=self,
                error=errno.errorcode.get(no, no),
                count=counters.sendErrors,
            )

    def writeSequence(  # type: ignore[override]
        self,
        seq: Iterable[bytes],
        addr: tuple[str, int] | None = None,
        dst: Destination | None = None,
    ) -> None:
        self.write(b"".join(seq), addr, dst)

    def connectionLost(self, reason: Any = None) -> None:
        self._outbox.reading = False
        if self._outbox.queue:
            self._flush()
        # The socket's last word on drops, before it goes.
        self.refreshCounters()
        self._pending = []
        # The handlers refer back to the port: no cycle outlives the socket.
        self._readHandlers = None
        self._peers.clear()
        self._peerDestinations.clear()
        if self._transparentReplies is not None:
            self._transparentReplies.close()
            self._transparentReplies = None
        udp.Port.connectionLost(self, reason)


if io.QueuedWrite is not None:
    # A reply to an address the port made costs no Python frame (the C
    # twin of write's first branch); everything else still reaches write.
    DestinationPort.write = io.QueuedWrite(  # type: ignore[method-assign]
        DestinationPort.write, PeerAddress, io.BATCH
    )

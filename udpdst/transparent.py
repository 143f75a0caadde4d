"""
Replies from the original address I{and port} of datagrams delivered
transparently (an nftables/iptables C{TPROXY} rule, a BPF C{sk_lookup}
program): the reply sockets of a transparent L{udpdst.port.DestinationPort}.

C{IP_PKTINFO} names a reply's source address but never its port, so a reply
to a datagram sent to C{198.51.100.7:5353} and delivered to a socket on port
7000 must leave through a socket bound to C{198.51.100.7:5353}.  Such sockets
are opened lazily and kept, unconnected, in a bounded least-recently-used
cache with an idle timeout (a new socket per reply costs about four times a
cached one).

What the kernel does with a socket bound to a pair decides how it is opened
(checked on Linux 6.x):

  - The pair's address is not local (the usual C{TPROXY} case): only a
    transparent socket can bind it, and C{TPROXY} hands the datagrams it
    redirects to the listener, never to an unconnected socket, so the reply
    socket takes nothing from anyone.  It gets C{IP_TRANSPARENT} (or
    C{IPV6_TRANSPARENT}) and C{SO_REUSEADDR}, so that several processes
    serving one port can each hold one, and is cached.
  - The address is local and another socket is bound to that port (on it or
    on a wildcard): a reply socket bound there would take that socket's
    datagrams (the newest or most specific binding wins the lookup, with
    C{SO_REUSEADDR}; C{shutdown(SHUT_RD)} or a drop-all socket filter only
    lose them).  The reply is refused: counted in C{replySocketsRefused},
    logged sparsely.
  - The address is local and nothing else is bound to that port: the reply
    goes through a socket bound there for that one reply, without
    C{SO_REUSEADDR}, and closed at once, so it never holds a port that a
    local service may want to bind next.

A reply socket is never connected: C{TPROXY} would then hand it the client's
next datagrams.
"""

from __future__ import annotations

import errno
import socket
from typing import Any, NamedTuple

from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger

from udpdst import _linux as L
from udpdst.address import Destination, formatHostPort

#: How many reply sockets a port keeps, and how long an unused one stays
#: open, unless told otherwise (what transparent proxies commonly use).
DEFAULT_SIZE = 256
DEFAULT_IDLE_TIMEOUT = 60.0

_MAPPED = "::ffff:"


class CapabilityError(OSError):
    """
    The process may not set C{IP_TRANSPARENT}: it lacks C{CAP_NET_ADMIN}
    (and C{CAP_NET_RAW}).
    """


#: What a transparent socket needs, said once for every error that reports it.
NEEDS_CAPABILITY = (
    "transparent sockets need CAP_NET_ADMIN (or CAP_NET_RAW): run as root, "
    "or give the capability (systemd: AmbientCapabilities=CAP_NET_ADMIN)"
)


def makeTransparent(sock: socket.socket) -> None:
    """
    Set C{IP_TRANSPARENT} on C{sock}, and C{IPV6_TRANSPARENT} too if it is
    an IPv6 socket (both, so that a dual-stack socket is transparent for
    either family).

    @raise CapabilityError: the process lacks the capability.
    @raise OSError: the kernel refused the option for another reason.
    """
    options = [(L.SOL_IP, L.IP_TRANSPARENT)]
    if sock.family == socket.AF_INET6:
        options.append((L.SOL_IPV6, L.IPV6_TRANSPARENT))
    for level, option in options:
        try:
            sock.setsockopt(level, option, 1)
        except PermissionError as e:
            raise CapabilityError(e.errno, NEEDS_CAPABILITY) from None


def isTransparent(sock: socket.socket) -> bool:
    """
    Whether C{sock} already has C{IP_TRANSPARENT} (or C{IPV6_TRANSPARENT},
    the same flag in the kernel), e.g. set by whoever handed it over.
    """
    level, option = (
        (L.SOL_IPV6, L.IPV6_TRANSPARENT)
        if sock.family == socket.AF_INET6
        else (L.SOL_IP, L.IP_TRANSPARENT)
    )
    try:
        return bool(sock.getsockopt(level, option))
    except OSError:
        return False


class Route(NamedTuple):
    """
    How one peer's replies for one destination leave (see
    L{ReplySockets.route}).

    @ivar key: The reply socket's key in the cache: C{(host, port, scope)}.
    @ivar family: Its address family.
    @ivar local: The address it is bound to, as C{bind} takes it.
    @ivar peer: The peer, as C{sendto} on it takes it.
    @ivar dst: The destination replied for, for log lines.
    """

    key: tuple[str, int, int]
    family: int
    local: tuple[Any, ...]
    peer: tuple[Any, ...]
    dst: Destination


def _sparse(count: int) -> bool:
    # The 1st, 2nd, 4th, 8th... occurrence (see udpdst.port.sparse).
    return count & (count - 1) == 0


class ReplySockets:
    """
    The reply sockets of one transparent port, by the C{(address, port)}
    they are bound to: at most C{size} open at a time (the least recently
    used is closed to make room), each closed after C{idleTimeout} seconds
    unused.  A port holds at most C{size} + 1 descriptors for them.

    What happens is counted in the port's counters (L{udpdst.port.PortCounters}):
    C{replySocketsOpened}, C{replySocketsReused} (replies through a cached
    socket), C{replySocketsEvicted} (closed to make room or idle),
    C{replySocketsFailed} (could not be opened: no capability, no
    permission for the port) and C{replySocketsRefused} (the pair is
    another local socket's); and, as for every reply, C{replied} and
    C{sendErrors}.
    """

    _log = Logger()

    def __init__(
        self,
        reactor: Any,
        counters: Any,
        owner: object,
        size: int = DEFAULT_SIZE,
        idleTimeout: float = DEFAULT_IDLE_TIMEOUT,
    ) -> None:
        """
        @param reactor: An C{IReactorTime}, for the idle timeout.
        @param counters: The port's L{udpdst.port.PortCounters}.
        @param owner: What log lines name (the port).
        @param size: The most sockets kept open; at least 1.
        @param idleTimeout: Seconds an unused socket stays open; above 0.
        """
        if size < 1:
            raise ValueError(f"size must be at least 1, not {size}")
        if not idleTimeout > 0:
            raise ValueError(f"idleTimeout must be above 0, not {idleTimeout}")
        self._reactor = reactor
        self._counters = counters
        self._owner = owner
        self.size = size
        self.idleTimeout = idleTimeout
        # (host, port, scope) -> (socket, last used), least recently used first.
        self._sockets: dict[tuple[str, int, int], tuple[socket.socket, float]] = {}
        self._sweeping: IDelayedCall | None = None

    def __len__(self) -> int:
        return len(self._sockets)

    def route(self, peer: tuple[Any, ...], dst: Destination) -> Route:
        """
        How a reply to C{peer} for a datagram sent to C{dst} leaves: worked
        out once per peer and destination, and given to L{send}.

        @param peer: The peer as the port's socket addresses it:
            C{(host, port)}, or C{(host, port, flowinfo, scope)} for IPv6,
            with an IPv4-mapped host for an IPv4 peer of a dual-stack port.
        @param dst: Where the datagram being answered was sent.
        """
        host = dst.host
        if ":" in host:
            scope = dst.ifindex if host.lower().startswith("fe80:") else 0
            return Route(
                (host, dst.port, scope),
                socket.AF_INET6,
                (host, dst.port, 0, scope),
                peer,
                dst,
            )
        if peer[0].startswith(_MAPPED):
            peer = (peer[0][len(_MAPPED) :], peer[1])
        return Route((host, dst.port, 0), socket.AF_INET, (host, dst.port), peer, dst)

    def send(self, data: bytes, route: Route) -> None:
        """
        Send C{data} as C{route} (from L{route}) says; what fails is counted
        (and logged sparsely), never raised.
        """
        key = route.key
        entry = self._sockets.pop(key, None)
        if entry is None:
            self._sendNew(data, route)
            return
        sock = entry[0]
        self._counters.replySocketsReused += 1
        self._sockets[key] = (sock, self._reactor.seconds())
        try:
            sock.sendto(data, route.peer)
        except OSError as e:
            self._sendFailed(e, route)
        else:
            self._counters.replied += 1

    def _sendNew(self, data: bytes, route: Route) -> None:
        opened = self._open(route.family, route.local, route.dst)
        if opened is None:
            return
        sock, keep = opened
        self._counters.replySocketsOpened += 1
        if keep:
            if len(self._sockets) >= self.size:
                self._evict(next(iter(self._sockets)))
            self._sockets[route.key] = (sock, self._reactor.seconds())
            if self._sweeping is None:
                self._sweeping = self._reactor.callLater(self.idleTimeout, self._sweep)
        try:
            sock.sendto(data, route.peer)
        except OSError as e:
            self._sendFailed(e, route)
        else:
            self._counters.replied += 1
        finally:
            if not keep:
                sock.close()

    def _sendFailed(self, e: OSError, route: Route) -> None:
        counters = self._counters
        counters.sendErrors += 1
        if _sparse(counters.sendErrors):
            self._log.info(
                "{port}: a reply from {source} could not be sent "
                "({error}; {count} so far)",
                port=self._owner,
                source=str(route.dst),
                error=errno.errorcode.get(e.errno or 0, e.errno),
                count=counters.sendErrors,
            )

    def _open(
        self, family: int, local: tuple[Any, ...], dst: Destination
    ) -> tuple[socket.socket, bool] | None:
        """
        A socket bound to C{local}, and whether to keep it (see the module's
        docstring); L{None} if there is none (counted and logged).
        """
        counters = self._counters
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            try:
                # Neither transparent nor shared: this bind succeeds only if
                # the address is local and no other socket holds the port.
                sock.bind(local)
            except OSError as e:
                if e.errno == errno.EADDRINUSE:
                    sock.close()
                    counters.replySocketsRefused += 1
                    if _sparse(counters.replySocketsRefused):
                        self._log.warn(
                            "{port}: no reply from {source}: another socket "
                            "on this host is bound to it, and a reply socket "
                            "there would take its datagrams ({count} so far)",
                            port=self._owner,
                            source=str(dst),
                            count=counters.replySocketsRefused,
                        )
                    return None
                if e.errno != errno.EADDRNOTAVAIL:
                    raise
                makeTransparent(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind(local)
                return sock, True
            # Local and free.  Transparent if allowed, should the kernel let
            # anyone bind foreign addresses (ip_nonlocal_bind): sending from
            # them needs it; sending from the host's own does not.
            try:
                makeTransparent(sock)
            except OSError:
                pass
            return sock, False
        except OSError as e:
            sock.close()
            counters.replySocketsFailed += 1
            if _sparse(counters.replySocketsFailed):
                reason = (
                    NEEDS_CAPABILITY
                    if isinstance(e, CapabilityError)
                    else e.strerror or str(e)
                )
                self._log.warn(
                    "{port}: no reply socket for {source}: {reason} ({count} so far)",
                    port=self._owner,
                    source=formatHostPort(str(local[0]), int(local[1])),
                    reason=reason,
                    count=counters.replySocketsFailed,
                )
            return None

    def _evict(self, key: tuple[str, int, int]) -> None:
        sock, _ = self._sockets.pop(key)
        sock.close()
        self._counters.replySocketsEvicted += 1

    def _sweep(self) -> None:
        """
        Close the sockets unused for C{idleTimeout}; come back when the
        next one will be.
        """
        self._sweeping = None
        now = self._reactor.seconds()
        sockets = self._sockets
        while sockets:
            key = next(iter(sockets))
            idle = now - sockets[key][1]
            if idle < self.idleTimeout:
                self._sweeping = self._reactor.callLater(
                    self.idleTimeout - idle, self._sweep
                )
                return
            self._evict(key)

    def close(self) -> None:
        """
        Close every reply socket (not counted as evicted) and stop the timer.
        """
        if self._sweeping is not None:
            if self._sweeping.active():
                self._sweeping.cancel()
            self._sweeping = None
        sockets, self._sockets = self._sockets, {}
        for sock, _ in sockets.values():
            sock.close()


__all__ = [
    "DEFAULT_IDLE_TIMEOUT",
    "DEFAULT_SIZE",
    "NEEDS_CAPABILITY",
    "CapabilityError",
    "ReplySockets",
    "Route",
    "isTransparent",
    "makeTransparent",
]

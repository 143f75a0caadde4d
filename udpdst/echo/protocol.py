"""
The echo protocol (RFC 862) on a destination-aware port: each reply leaves
from the address its request was sent to, and an echo service's classic
abuses (loops, reflection, amplification) are refused and counted.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from twisted.internet.error import InvalidAddressError, MessageLengthError
from twisted.logger import Logger

from udpdst.address import (
    MAX_UDP_PAYLOAD_V4,
    Destination,
    PeerAddress,
    formatHostPort,
    maxPayload,
)
from udpdst.echo import logs
from udpdst.echo.config import LimitsConfig
from udpdst.echo.limits import (
    AccessList,
    LoopGuard,
    NetworkLimiter,
    RateLimiter,
    accessListFor,
    prefixLimiterFor,
    rateLimiterFor,
    sourceKey,
)
from udpdst.port import sparse
from udpdst.protocol import DestinationDatagramProtocol

#: Why a datagram got no reply, in the order the checks run.
REFUSAL_REASONS = (
    "broadcast",  # sent to a broadcast or multicast address (reflection)
    "source-port",  # a source port in deny_source_ports (loop protection)
    "same-port",  # source port equal to the listening port (echo-echo loop)
    "denied",  # a source in a denied network
    "not-allowed",  # a source in no allowed network
    "rate",  # the source's token bucket is empty
    "prefix-rate",  # the source network's token bucket is empty
    "too-small",  # a reply would be over twice the request (see HEADER_BYTES)
    "too-large",  # prefix + datagram exceeds the largest UDP payload
    "loop",  # the peer keeps sending our replies back (limits.LoopGuard)
)

#: The bytes of IPv4 and UDP headers around every datagram (IPv6 has 48): with
#: a prefix, a request is answered only if it is at least the prefix's length
#: less these, so that a reply is never more than twice its request as the
#: network carries them.
HEADER_BYTES = 28

_DEFAULT_LIMITS = LimitsConfig()

# The process's log level (changed in place on reload), bound once: the
# per-datagram path asks it whether debug lines are wanted.
_logLevel = logs.minimumLevel


@dataclass(slots=True)
class EchoCounters:
    """
    What only an L{EchoProtocol} knows: why it did not answer.  What came in,
    what went out and what failed to go out, the port counts
    (L{udpdst.port.PortCounters}), so that every datagram is counted once:
    C{received = replied + sum(refused) + sendErrors}.

    @ivar refused: Datagrams not answered, by reason (every reason of
        L{REFUSAL_REASONS}, 0 included).
    """

    refused: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys(REFUSAL_REASONS, 0)
    )

    @property
    def refusedTotal(self) -> int:
        return sum(self.refused.values())


def isBroadcast(dst: Destination) -> bool:
    """
    Whether a datagram sent to C{dst} went to a broadcast or multicast
    address.

    The kernel tells: a unicast datagram is answered from the address it was
    sent to (C{replyFrom == host}); for an IPv4 broadcast (subnet or limited)
    or multicast one it reports a unicast address of the receiving interface
    (C{spec_dst}) and for an IPv6 multicast one no address (C{"::"}).
    Without that report (C{replyFrom} is L{None}) the address decides:
    224/4 and 240/4 (255.255.255.255 included), ff00::/8.  (A subnet
    broadcast that was queued before the socket asked for the report looks
    like unicast; nothing in the datagram tells it apart.)
    """
    host = dst.host
    if dst.replyFrom == host:
        return False
    if dst.replyFrom is not None:
        return True
    if ":" in host:
        return host[:2].lower() == "ff"
    return int(host.partition(".")[0]) >= 224


def _hostPort(host: str, port: int) -> str:
    # IPv4 clients of a dual-stack socket are logged in IPv4 form.
    return formatHostPort(sourceKey(host), port)


class EchoProtocol(DestinationDatagramProtocol):
    """
    Reply to every datagram with C{prefix + datagram}, from the address the
    datagram was sent to, unless one of the checks refuses it.

    The checks, cheapest first: the destination (no answer to broadcast or
    multicast, unless C{answerBroadcast}), the source port (loop
    protection), the source network, the source's rate and its network's,
    the size of the request (with a prefix, at least the prefix's length
    less L{HEADER_BYTES}, so that a reply is at most twice its request on
    the wire) and of the reply, and whether the
    datagram is one of our replies bounced back by another service (an
    echo loop, L{LoopGuard}).  Refusals are counted by reason in
    C{counters} and logged per datagram only at debug level; a stopped loop
    is logged at info level, sparsely.

    @ivar counters: The L{EchoCounters}.
    """

    def __init__(
        self,
        prefix: bytes = b"",
        *,
        denySourcePorts: Iterable[int] = _DEFAULT_LIMITS.deny_source_ports,
        denySamePort: bool = True,
        access: AccessList | None = None,
        rateLimiter: RateLimiter | None = None,
        networkLimiter: NetworkLimiter | None = None,
        answerBroadcast: bool = False,
        loopGuard: LoopGuard | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """
        @param prefix: Bytes put before every reply.
        @param denySourcePorts: Source ports never answered; port 0 always is.
        @param denySamePort: Never answer a datagram whose source port is the
            port it was sent to (another echo service on the same port would
            bounce it back forever).
        @param access: Allowed and denied networks; L{None} allows all.
        @param rateLimiter: Per-source token buckets; L{None} for no limit.
        @param networkLimiter: Per-network token buckets, which a datagram
            must pass too; L{None} for no limit.
        @param answerBroadcast: Answer datagrams sent to broadcast and
            multicast addresses too (L{isBroadcast}).  Off, as each host on
            the link would answer one spoofed datagram ("fraggle").
        @param loopGuard: What ends echo loops; a new L{LoopGuard} if L{None}
            (one per protocol: a loop runs through one port).
        @param clock: Monotonic seconds, for the rate limiter and the loop
            guard.
        """
        self.prefix = prefix
        self.counters = EchoCounters()
        self._denyPorts = frozenset(denySourcePorts) | {0}
        self._denySamePort = denySamePort
        # What the checks look up per datagram, looked up once.
        self._refusals = (
            access.refusals if access is not None and not access.everyone else None
        )
        self._allowRate = (
            rateLimiter.allow
            if rateLimiter is not None and not rateLimiter.unlimited
            else None
        )
        self._allowNetwork = (
            networkLimiter.allow
            if networkLimiter is not None and not networkLimiter.unlimited
            else None
        )
        self._refuseBroadcast = not answerBroadcast
        self._allowLoop = (loopGuard if loopGuard is not None else LoopGuard()).allow
        self._loopsStopped = 0
        self._broadcastsRefused = 0
        self._clock = clock
        self._ownPort = 0
        self._log = Logger(namespace="udpdst.echo", source=self)

    @classmethod
    def fromConfig(
        cls,
        prefix: bytes,
        limits: LimitsConfig,
        clock: Callable[[], float] = time.monotonic,
        *,
        access: AccessList | None = None,
        rateLimiter: RateLimiter | None = None,
        networkLimiter: NetworkLimiter | None = None,
        answerBroadcast: bool = False,
    ) -> EchoProtocol:
        """
        Build an echo protocol from the C{[echo]} prefix and C{[limits]}: the
        one construction that C{twistd udpdst}, the tests and the benchmark
        share.

        @param access: An access list built from C{limits} to share between
            protocols; a new one if L{None}.
        @param rateLimiter: Likewise, a rate limiter to share, so that a
            source has one budget across listeners.
        @param networkLimiter: Likewise, the per-network limiter.
        @param answerBroadcast: C{[echo] answer_broadcast}.
        """
        if access is None:
            access = accessListFor(limits)
        if rateLimiter is None:
            rateLimiter = rateLimiterFor(limits)
        if networkLimiter is None:
            networkLimiter = prefixLimiterFor(limits)
        return cls(
            prefix,
            denySourcePorts=limits.deny_source_ports,
            denySamePort=limits.deny_same_port,
            access=access,
            rateLimiter=rateLimiter,
            networkLimiter=networkLimiter,
            answerBroadcast=answerBroadcast,
            clock=clock,
        )

    @property
    def amplification(self) -> int:
        """
        The most bytes by which a reply can be larger than its request (and
        no reply is more than twice as large as its request).
        """
        return len(self.prefix)

    def startProtocol(self) -> None:
        host = self.transport.getHost()  # type: ignore[union-attr]
        self._ownPort = getattr(host, "port", 0)

    def datagramReceived(  # type: ignore[override]
        self, datagram: bytes, addr: PeerAddress, dst: Destination | None
    ) -> None:
        # Runs per datagram: each attribute read once, and the address
        # indexed (unpacking a tuple subclass goes through an iterator).
        port = addr[1]
        if (
            dst is not None
            and dst.replyFrom != dst.host
            and self._refuseBroadcast
            and isBroadcast(dst)
        ):
            return self._refuseBroadcastDatagram(datagram, addr, dst)
        if port in self._denyPorts:
            return self._refuse("source-port", datagram, addr, dst)
        if (
            port == (dst.port if dst is not None else self._ownPort)
            and self._denySamePort
        ):
            return self._refuse("same-port", datagram, addr, dst)
        host = addr[0]
        refusals = self._refusals
        if refusals is not None:
            reason = refusals[host]
            if reason is not None:
                return self._refuse(reason, datagram, addr, dst)
        now = self._clock()
        allowRate = self._allowRate
        if allowRate is not None and not allowRate(host, now):
            return self._refuse("rate", datagram, addr, dst)
        allowNetwork = self._allowNetwork
        if allowNetwork is not None and not allowNetwork(host, now):
            return self._refuse("prefix-rate", datagram, addr, dst)
        prefix = self.prefix
        if prefix:
            if len(datagram) < len(prefix) - HEADER_BYTES:
                # A reply is never more than twice its request on the wire: a
                # spoofer's tiny requests would draw the most bytes per byte.
                return self._refuse("too-small", datagram, addr, dst)
            reply = prefix + datagram
            if len(reply) > MAX_UDP_PAYLOAD_V4 and len(reply) > maxPayload(host):
                return self._refuse("too-large", datagram, addr, dst)
        else:
            reply = datagram
        if not self._allowLoop(addr, datagram, reply, now):
            self._loopStopped(addr, dst)
            return self._refuse("loop", datagram, addr, dst)
        if _logLevel.debug:
            self._log.debug(
                "{peer} -> {destination}, {size} bytes",
                peer=_hostPort(host, port),
                destination=str(dst) if dst is not None else "unknown",
                size=len(datagram),
            )
        try:
            self.transport.write(reply, addr, dst)  # type: ignore[union-attr, call-arg, misc]
        except (OSError, MessageLengthError, InvalidAddressError) as e:
            # The port counts failed writes (sendErrors); a full buffer, a
            # vanished route or interface must not stop the service.
            if _logLevel.debug:
                self._log.debug(
                    "{peer}: reply not sent: {error}",
                    peer=_hostPort(host, port),
                    error=str(e),
                )

    def _loopStopped(self, addr: PeerAddress, dst: Destination | None) -> None:
        self._loopsStopped += 1
        count = self._loopsStopped
        # Loops set off by a flood of spoofed datagrams cost log2(n) lines.
        if sparse(count):
            self._log.info(
                "echo loop with {peer} stopped at {destination}: it sent our "
                "replies back, again and again; one was not answered "
                "({count} loops stopped so far)",
                peer=_hostPort(addr[0], addr[1]),
                destination=str(dst) if dst is not None else "unknown",
                count=count,
            )

    def _refuseBroadcastDatagram(
        self, datagram: bytes, addr: PeerAddress, dst: Destination
    ) -> None:
        self._refuse("broadcast", datagram, addr, dst)
        self._broadcastsRefused += 1
        count = self._broadcastsRefused
        # One spoofed flood costs log2(n) lines.
        if sparse(count):
            self._log.info(
                "{peer} -> {destination}: not answered, a broadcast or "
                "multicast address ({count} so far); [echo] answer_broadcast "
                "= true answers them",
                peer=_hostPort(addr[0], addr[1]),
                destination=str(dst),
                count=count,
            )

    def _refuse(
        self, reason: str, datagram: bytes, addr: PeerAddress, dst: Destination | None
    ) -> None:
        self.counters.refused[reason] += 1
        if _logLevel.debug:
            self._log.debug(
                "{peer} -> {destination}, {size} bytes: refused ({reason})",
                peer=_hostPort(addr[0], addr[1]),
                destination=str(dst) if dst is not None else "unknown",
                size=len(datagram),
                reason=reason,
            )

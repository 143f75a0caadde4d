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
    RateLimiter,
    accessListFor,
    rateLimiterFor,
    sourceKey,
)
from udpdst.port import sparse
from udpdst.protocol import DestinationDatagramProtocol

#: Why a datagram got no reply, in the order the checks run.
REFUSAL_REASONS = (
    "source-port",  # a source port in deny_source_ports (loop protection)
    "same-port",  # source port equal to the listening port (echo-echo loop)
    "denied",  # a source in a denied network
    "not-allowed",  # a source in no allowed network
    "rate",  # the source's token bucket is empty
    "too-large",  # prefix + datagram exceeds the largest UDP payload
    "loop",  # the peer keeps sending our replies back (limits.LoopGuard)
)

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


def _hostPort(host: str, port: int) -> str:
    # IPv4 clients of a dual-stack socket are logged in IPv4 form.
    return formatHostPort(sourceKey(host), port)


class EchoProtocol(DestinationDatagramProtocol):
    """
    Reply to every datagram with C{prefix + datagram}, from the address the
    datagram was sent to, unless one of the checks refuses it.

    The checks, cheapest first: the source port (loop protection), the
    source network, the source's rate, the size of the reply, and whether
    the datagram is one of our replies bounced back by another service (an
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
        self._allowLoop = (loopGuard if loopGuard is not None else LoopGuard()).allow
        self._loopsStopped = 0
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
    ) -> EchoProtocol:
        """
        Build an echo protocol from the C{[echo]} prefix and C{[limits]}: the
        one construction that C{twistd udpdst}, the tests and the benchmark
        share.

        @param access: An access list built from C{limits} to share between
            protocols; a new one if L{None}.
        @param rateLimiter: Likewise, a rate limiter to share, so that a
            source has one budget across listeners.
        """
        if access is None:
            access = accessListFor(limits)
        if rateLimiter is None:
            rateLimiter = rateLimiterFor(limits)
        return cls(
            prefix,
            denySourcePorts=limits.deny_source_ports,
            denySamePort=limits.deny_same_port,
            access=access,
            rateLimiter=rateLimiter,
            clock=clock,
        )

    @property
    def amplification(self) -> int:
        """
        The most bytes by which a reply can be larger than its request.
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
        prefix = self.prefix
        if prefix:
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

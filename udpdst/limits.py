"""
Who the echo service answers: source networks (allow/deny), source ports
(loop protection) and a per-source token bucket, each with bounded memory.

These are plain objects with no I/O and no clock of their own (the caller
passes the time), so they are cheap on the per-datagram path and easy to test.
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict
from collections.abc import Iterable

_Network = ipaddress.IPv4Network | ipaddress.IPv6Network
_Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def sourceAddress(host: str) -> _Address | None:
    """
    The address a peer host string stands for: IPv4-mapped IPv6 peers
    (C{"::ffff:10.1.2.5"}, IPv4 clients of a dual-stack socket) as IPv4, and
    the zone of a link-local peer (C{"fe80::5%eth0"}) dropped.

    @return: The address, or L{None} if C{host} is not an IP address.
    """
    try:
        address = ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def sourceKey(host: str) -> str:
    """
    The key under which a peer is rate-limited: its host string, with an
    IPv4-mapped IPv6 address written as IPv4, so that one client has one
    bucket whether it reaches a dual-stack or an IPv4 socket.
    """
    if host.startswith("::ffff:") and "." in host:
        return host[7:]
    return host


class AccessList:
    """
    Allowed and denied source networks.  A source is answered when it is in
    an allowed network and in no denied one (a deny match wins).

    Decisions are cached per host string in a dict of at most C{cacheSize}
    entries, cleared when full: a flood of distinct sources costs one lookup
    per datagram and bounded memory.

    @ivar everyone: Whether every source is allowed (nothing to check).
    """

    cacheSize = 8192

    def __init__(
        self, allow: Iterable[_Network], deny: Iterable[_Network] = ()
    ) -> None:
        self._allow = tuple(allow)
        self._deny = tuple(deny)
        self._cache: dict[str, str | None] = {}
        prefixes = {(n.version, n.prefixlen) for n in self._allow}
        self.everyone = not self._deny and {(4, 0), (6, 0)} <= prefixes

    def refusal(self, host: str) -> str | None:
        """
        Why C{host} must not be answered: C{"denied"} (in a denied network),
        C{"not-allowed"} (in no allowed network, or not an IP address), or
        L{None} if it may be answered.
        """
        if self.everyone:
            return None
        cache = self._cache
        try:
            return cache[host]
        except KeyError:
            pass
        reason = self._decide(host)
        if len(cache) >= self.cacheSize:
            cache.clear()
        cache[host] = reason
        return reason

    def _decide(self, host: str) -> str | None:
        address = sourceAddress(host)
        if address is None:
            return "not-allowed"
        for network in self._deny:
            if address.version == network.version and address in network:
                return "denied"
        for network in self._allow:
            if address.version == network.version and address in network:
                return None
        return "not-allowed"


class RateLimiter:
    """
    A token bucket per source: each source may send C{burst} datagrams at
    once and C{rate} per second on average; the rest are refused.

    Memory is bounded: at most C{maxSources} buckets are kept, in least
    recently used order.  A new source beyond that evicts the least recently
    seen one, which then starts again with a full bucket.  So a flood of
    spoofed sources costs C{maxSources} entries at most, and the only thing
    it can win is a fresh burst for a source it displaced: to reset one
    victim's bucket it must send C{maxSources} other sources' datagrams
    between two of the victim's, which bounds the rate at which a victim can
    be hit to C{burst} per C{maxSources} datagrams the attacker sends.
    """

    def __init__(self, rate: float, burst: int, maxSources: int) -> None:
        """
        @param rate: Tokens added per second; C{0} means no limit.
        @param burst: The bucket size (at least 1).
        @param maxSources: The most buckets kept (at least 1).
        """
        if burst < 1 or maxSources < 1 or rate < 0:
            raise ValueError("rate >= 0, burst >= 1 and maxSources >= 1 are needed")
        self.rate = rate
        self.burst = burst
        self.maxSources = maxSources
        self.unlimited = rate == 0
        self.evictions = 0
        # source -> [tokens, time of last update]
        self._buckets: OrderedDict[str, list[float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def __contains__(self, source: object) -> bool:
        return source in self._buckets

    def allow(self, source: str, now: float) -> bool:
        """
        Take a token from C{source}'s bucket.

        @param source: The source's key (see L{sourceKey}).
        @param now: The current time in seconds (monotonic).
        @return: Whether the datagram may be answered.
        """
        if self.unlimited:
            return True
        buckets = self._buckets
        bucket = buckets.get(source)
        if bucket is None:
            if len(buckets) >= self.maxSources:
                buckets.popitem(last=False)
                self.evictions += 1
            buckets[source] = [self.burst - 1.0, now]
            return True
        buckets.move_to_end(source)
        tokens = bucket[0]
        elapsed = now - bucket[1]
        if elapsed > 0:  # a clock that steps back adds nothing
            tokens += elapsed * self.rate
            if tokens > self.burst:
                tokens = self.burst
            bucket[1] = now
        if tokens < 1.0:
            bucket[0] = tokens
            return False
        bucket[0] = tokens - 1.0
        return True

"""
Who the echo service answers: source networks (allow/deny), a token bucket
per source and one per source network, and the end of echo loops, each with
bounded memory.

These are plain objects with no I/O and no clock of their own (the caller
passes the time), so they are cheap on the per-datagram path and easy to test.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Hashable, Iterable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from udpdst.echo.config import LimitsConfig

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


_V4_MAPPED = bytes(10) + b"\xff\xff"


def networkKey(host: str, prefixV4: int, prefixV6: int) -> Hashable:
    """
    The key of the network a peer is in, for a bucket per network: its
    address with all but the first C{prefixV4} (IPv4, IPv4-mapped IPv6
    included) or C{prefixV6} (IPv6) bits cleared, packed (4 or 16 bytes, so
    IPv4 and IPv6 networks never share a key).  A link-local peer's zone is
    dropped.

    @param host: The peer's host, as the port gives it.
    @return: The key; C{host} itself if it is not an IP address.
    """
    text = host.partition("%")[0]
    try:
        if ":" in text:
            packed = socket.inet_pton(socket.AF_INET6, text)
            if packed.startswith(_V4_MAPPED):
                packed, bits = packed[12:], prefixV4
            else:
                bits = prefixV6
        else:
            packed, bits = socket.inet_pton(socket.AF_INET, text), prefixV4
    except OSError:
        return host
    size = len(packed) * 8
    value = int.from_bytes(packed, "big") >> (size - bits) << (size - bits)
    return value.to_bytes(len(packed), "big")


class Memo(dict[str, Any]):
    """
    A bounded cache of a function of host strings: C{memo[host]} is
    C{function(host)}, computed on the first lookup and kept until the memo
    holds C{size} entries, when all are forgotten.  A hit is a plain dict
    lookup, without a Python call, and a flood of distinct hosts costs one
    computation per datagram and bounded memory.
    """

    def __init__(self, function: Callable[[str], Any], size: int) -> None:
        super().__init__()
        self.function = function
        self.size = size

    def __missing__(self, host: str) -> Any:
        value = self.function(host)
        if len(self) >= self.size:
            self.clear()
        self[host] = value
        return value


class AccessList:
    """
    Allowed and denied source networks.  A source is answered when it is in
    an allowed network and in no denied one (a deny match wins).

    @ivar everyone: Whether every source is allowed (nothing to check).
    @ivar refusals: The decisions of L{refusal} by host string, a L{Memo} of
        at most C{cacheSize} entries: what the echo looks up per datagram.
    """

    def __init__(
        self,
        allow: Iterable[_Network],
        deny: Iterable[_Network] = (),
        cacheSize: int = 8192,
    ) -> None:
        self._allow = tuple(allow)
        self._deny = tuple(deny)
        prefixes = {(n.version, n.prefixlen) for n in self._allow}
        self.everyone = not self._deny and {(4, 0), (6, 0)} <= prefixes
        self.refusals = Memo(self._decide, cacheSize)

    def refusal(self, host: str) -> str | None:
        """
        Why C{host} must not be answered: C{"denied"} (in a denied network),
        C{"not-allowed"} (in no allowed network, or not an IP address), or
        L{None} if it may be answered.
        """
        if self.everyone:
            return None
        return self.refusals[host]  # type: ignore[no-any-return]

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

    Each bucket is one number, the time at which it will be full again
    (the generic cell rate algorithm): a datagram is allowed if that time is
    at most C{(burst - 1) / rate} seconds ahead, and moves it C{1 / rate}
    further.

    Memory is bounded: buckets are kept in two generations of at most
    C{maxSources / 2} each.  New sources go into the recent one; a source
    found in the older one moves back into the recent one; when the recent
    one is full, the older one is dropped (its sources start again with a
    full bucket, counted in C{evictions}) and the recent one becomes the
    older.  So a flood of spoofed sources costs C{maxSources} buckets at
    most, and the only thing it can win is a fresh burst for a source it
    displaced: to reset one victim's bucket it must send C{maxSources / 2}
    other sources' datagrams between two of the victim's, which bounds the
    rate at which a victim can be hit to C{burst} per C{maxSources / 2}
    datagrams the attacker sends.  The bucket keys of IPv4-mapped hosts are
    memoised too, at most L{mappedKeys} of them.
    """

    mappedKeys = 4096

    def __init__(self, rate: float, burst: int, maxSources: int) -> None:
        """
        @param rate: Tokens added per second; C{0} means no limit.
        @param burst: The bucket size (at least 1).
        @param maxSources: The most buckets kept (at least 1; 1 keeps 2).
        """
        if burst < 1 or maxSources < 1 or rate < 0:
            raise ValueError("rate >= 0, burst >= 1 and maxSources >= 1 are needed")
        self.rate = rate
        self.burst = burst
        self.maxSources = maxSources
        self.unlimited = rate == 0
        self.evictions = 0
        self._interval = 1.0 / rate if rate else 0.0
        # A millionth of a token of slack, so that float rounding never
        # takes a token from a full bucket.
        self._tolerance = (burst - 1 + 1e-6) * self._interval
        self._generation = max(1, maxSources // 2)
        # source -> when its bucket is full again
        self._recent: dict[Hashable, float] = {}
        self._older: dict[Hashable, float] = {}
        self._keys = Memo(sourceKey, self.mappedKeys)

    def __len__(self) -> int:
        return len(self._recent) + len(self._older)

    def __contains__(self, source: object) -> bool:
        return source in self._recent or source in self._older

    def allow(self, source: str, now: float) -> bool:
        """
        Take a token from C{source}'s bucket.

        @param source: The peer's host; an IPv4-mapped IPv6 host
            (C{"::ffff:10.1.2.5"}) shares the bucket of its IPv4 address.
        @param now: The current time in seconds (monotonic).
        @return: Whether the datagram may be answered.
        """
        if self.unlimited:
            return True
        if ":" in source and "." in source:
            # Maybe IPv4-mapped: the key is memoised, as a new key string
            # would be hashed anew on each datagram.
            source = self._keys[source]
        full = self._recent.get(source)
        if full is None:
            full = self._admit(source, now)
        if full < now:
            full = now
        elif full - now > self._tolerance:
            return False
        self._recent[source] = full + self._interval
        return True

    def _admit(self, source: Hashable, now: float) -> float:
        """
        Put C{source}, not in the recent generation, into it: from the older
        generation, or with a full bucket, dropping the older generation if
        the recent one is full.

        @return: When its bucket is full again.
        """
        full = self._older.pop(source, now)
        recent = self._recent
        if len(recent) >= self._generation:
            self.evictions += len(self._older)
            self._older = recent
            self._recent = recent = {}
        recent[source] = full
        return full


class NetworkLimiter(RateLimiter):
    """
    A token bucket per source network (as DNS response-rate limiting does):
    the sources of one IPv4 C{/prefixV4} or IPv6 C{/prefixV6} share one
    bucket of C{burst} datagrams refilled at C{rate} per second, so that a
    spoofer rotating through the addresses of a network (its victim's) draws
    no more than one such bucket, however many addresses it uses.

    The buckets are kept in two generations as L{RateLimiter}'s, with the
    same memory bound (C{maxNetworks} buckets at most): a network not seen
    while C{maxNetworks / 2} new ones came is forgotten.  Each bucket is a
    one-item list (when it is full again), and the bucket of each host seen
    lately is memoised (at most L{hostsKept} hosts, and forgotten whenever a
    generation is), so that a datagram costs one lookup by host.
    """

    hostsKept = 8192

    def __init__(
        self, rate: float, burst: int, maxNetworks: int, prefixV4: int, prefixV6: int
    ) -> None:
        """
        @param rate: Tokens added per second; C{0} means no limit.
        @param burst: The bucket size (at least 1).
        @param maxNetworks: The most buckets kept (at least 1; 1 keeps 2).
        @param prefixV4: The length of an IPv4 network, 0..32.
        @param prefixV6: The length of an IPv6 network, 0..128.
        """
        if not (0 <= prefixV4 <= 32 and 0 <= prefixV6 <= 128):
            raise ValueError("prefixV4 in 0..32 and prefixV6 in 0..128 are needed")
        RateLimiter.__init__(self, rate, burst, maxNetworks)
        self.prefixV4 = prefixV4
        self.prefixV6 = prefixV6
        # network key -> [when its bucket is full again]
        self._recent: dict[Hashable, list[float]] = {}  # type: ignore[assignment]
        self._older: dict[Hashable, list[float]] = {}  # type: ignore[assignment]
        # host -> its network's bucket
        self._hosts: dict[str, list[float]] = {}

    def allow(self, source: str, now: float) -> bool:
        """
        Take a token from the bucket of C{source}'s network.

        @param source: The peer's host (an IPv4-mapped IPv6 host is in its
            IPv4 network).
        @param now: The current time in seconds (monotonic).
        @return: Whether the datagram may be answered.
        """
        if self.unlimited:
            return True
        bucket = self._hosts.get(source)
        if bucket is None:
            bucket = self._bucketOf(source, now)
        full = bucket[0]
        if full < now:
            full = now
        elif full - now > self._tolerance:
            return False
        bucket[0] = full + self._interval
        return True

    def _bucketOf(self, source: str, now: float) -> list[float]:
        """
        The bucket of C{source}'s network, put into the recent generation
        (from the older one, or new and full, dropping the older generation
        if the recent one is full), and memoised for C{source}.
        """
        network = networkKey(source, self.prefixV4, self.prefixV6)
        recent = self._recent
        bucket = recent.get(network)
        if bucket is None:
            bucket = self._older.pop(network, None)  # type: ignore[call-overload]
            if bucket is None:
                bucket = [now]
            if len(recent) >= self._generation:
                self.evictions += len(self._older)
                self._older = recent
                self._recent = recent = {}
                # Hosts may hold buckets of the generation just dropped.
                self._hosts.clear()
            recent[network] = bucket
        hosts = self._hosts
        if len(hosts) >= self.hostsKept:
            hosts.clear()
        hosts[source] = bucket
        return bucket


class LoopGuard:
    """
    Ends echo loops.  A loop is another service (an echo, or anything that
    answers every datagram) bouncing our replies back, set off by one spoofed
    datagram; it runs until one side stops answering.

    Content alone cannot tell a loop from a client that repeats itself, so a
    datagram is a I{bounce} when a peer (address and port) sends, less than
    L{window} seconds after our last reply to it, a datagram that ends with
    that reply (the other side may add a prefix, as ours may).  Bounces in a
    row are a loop once there are L{maxBounces} of them or they have gone on
    for L{maxDuration} seconds: that datagram gets no reply, which ends the
    loop, and the peer is forgotten, so its next datagram is answered.

    So every loop whose round trip is shorter than L{window} ends after
    L{maxBounces} round trips or L{maxDuration} seconds (and one round
    trip), whichever comes first: under a second.  A client that repeats the
    same payload from one port, each time less than L{window} after our
    reply (at full speed, or several in flight), loses one datagram in
    C{maxBounces + 1}, or one each L{maxDuration} seconds if slower; one
    that repeats it at longer intervals, or whose datagrams differ (a
    sequence number, a time stamp), is never refused, nor is any client of
    an echo with a prefix (its datagrams do not end with our replies).

    Memory is bounded: at most L{maxPeers} peers are remembered (all
    forgotten when full), each with its last reply if that is at most
    L{exactUpTo} bytes long, or else its length and hash.
    """

    window = 0.5
    maxBounces = 64
    maxDuration = 0.5
    maxPeers = 4096
    exactUpTo = 256

    def __init__(self) -> None:
        # Per-datagram reads of instance attributes are cheaper than of class
        # attributes.
        self._window = self.window
        self._exactUpTo = self.exactUpTo
        # peer -> [last reply (or its length and hash, if long), when it was
        #          sent, bounces in a row, when the first of them was sent]
        self._peers: dict[tuple[str, int], list[Any]] = {}

    def __len__(self) -> int:
        return len(self._peers)

    def allow(
        self, peer: tuple[str, int], datagram: bytes, reply: bytes, now: float
    ) -> bool:
        """
        Whether to answer C{datagram} from C{peer} with C{reply}; if so, the
        reply is remembered as sent at C{now}.

        @return: L{False} if C{datagram} is the bounce that makes a loop.
        """
        state = self._peers.get(peer)
        if state is None:
            self._remember(peer, reply, now)
            return True
        last = state[0]
        # Whether datagram ends with last, without a method call when they
        # are the same length or the datagram is shorter (the common cases).
        # A remembered hash (a 2-tuple) is never equal to a datagram, nor
        # the end of one of 2 bytes or less.
        if now - state[1] < self._window and (
            datagram == last
            or (
                len(datagram) > len(last)
                and (
                    datagram.endswith(last)
                    if type(last) is bytes
                    else _endsWithHashed(datagram, last)
                )
            )
        ):
            if not self._bounced(peer, state, now):
                return False
        elif state[2]:
            state[2] = 0
        state[0] = reply if len(reply) <= self._exactUpTo else _hashed(reply)
        state[1] = now
        return True

    def _remember(self, peer: tuple[str, int], reply: bytes, now: float) -> None:
        peers = self._peers
        if len(peers) >= self.maxPeers:
            peers.clear()
        # A plain tuple key: a port's peer address object keeps more (its
        # destination, its reply's socket address and control data).
        peers[(peer[0], peer[1])] = [
            reply if len(reply) <= self._exactUpTo else _hashed(reply),
            now,
            0,
            now,
        ]

    def _bounced(self, peer: tuple[str, int], state: list[Any], now: float) -> bool:
        """
        Count a bounce from C{peer}.

        @return: L{False} if it makes a loop (then C{peer} is forgotten).
        """
        if not state[2]:
            state[3] = state[1]
        state[2] += 1
        if state[2] >= self.maxBounces or now - state[3] >= self.maxDuration:
            del self._peers[peer]
            return False
        return True


def _hashed(reply: bytes) -> tuple[int, int]:
    """
    A reply longer than L{LoopGuard.exactUpTo} as the guard remembers it.
    """
    return (len(reply), hash(reply))


def _endsWithHashed(datagram: bytes, last: tuple[int, int]) -> bool:
    """
    Whether C{datagram} ends with the reply remembered by its length and
    hash.
    """
    length, digest = last
    size = len(datagram)
    if size < length:
        return False
    return hash(datagram if size == length else datagram[size - length :]) == digest


# Built from the configuration's [limits] table, here only.


def accessListFor(limits: LimitsConfig) -> AccessList:
    """
    The L{AccessList} of C{[limits] allow} and C{deny}.
    """
    return AccessList(limits.allow, limits.deny)


def rateSettings(limits: LimitsConfig) -> tuple[float, int, int]:
    """
    What a L{RateLimiter} is built from: C{(rate, burst, maxSources)}.  A
    reload that leaves these unchanged keeps the buckets.
    """
    return (limits.per_source_rate, limits.per_source_burst, limits.max_sources)


def rateLimiterFor(limits: LimitsConfig) -> RateLimiter:
    """
    The L{RateLimiter} of C{[limits] per_source_*} and C{max_sources}.
    """
    return RateLimiter(*rateSettings(limits))


def prefixSettings(limits: LimitsConfig) -> tuple[float, int, int, int, int]:
    """
    What a L{NetworkLimiter} is built from: C{(rate, burst, maxNetworks,
    prefixV4, prefixV6)}.  A reload that leaves these unchanged keeps the
    buckets.
    """
    return (
        limits.per_prefix_rate,
        limits.per_prefix_burst,
        limits.max_sources,
        limits.prefix_v4,
        limits.prefix_v6,
    )


def prefixLimiterFor(limits: LimitsConfig) -> NetworkLimiter:
    """
    The L{NetworkLimiter} of C{[limits] per_prefix_*}, C{prefix_v4},
    C{prefix_v6} and C{max_sources} (networks are tracked within the same
    bound as sources).
    """
    return NetworkLimiter(*prefixSettings(limits))

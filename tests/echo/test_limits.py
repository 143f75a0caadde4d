"""
Tests for udpdst.echo.limits: access lists, source keys and the per-source rate
limiter, including its memory bound under a flood of sources.
"""

from __future__ import annotations

import ipaddress
import tracemalloc

import pytest

from udpdst.echo.limits import (
    AccessList,
    Memo,
    NetworkLimiter,
    RateLimiter,
    networkKey,
    sourceAddress,
    sourceKey,
)

net = ipaddress.ip_network
EVERYONE = (net("0.0.0.0/0"), net("::/0"))


def test_sourceAddressMapsIPv4() -> None:
    assert sourceAddress("::ffff:10.1.2.5") == ipaddress.IPv4Address("10.1.2.5")
    assert sourceAddress("10.1.2.5") == ipaddress.IPv4Address("10.1.2.5")
    assert sourceAddress("fe80::5%eth0") == ipaddress.IPv6Address("fe80::5")
    assert sourceAddress("2001:db8::1") == ipaddress.IPv6Address("2001:db8::1")
    assert sourceAddress("example.com") is None


def test_sourceKeyMapsIPv4() -> None:
    assert sourceKey("::ffff:10.1.2.5") == "10.1.2.5"
    assert sourceKey("10.1.2.5") == "10.1.2.5"
    assert sourceKey("::1") == "::1"
    assert sourceKey("::ffff:a01:205") == "::ffff:a01:205"


def test_everyoneSkipsTheChecks() -> None:
    assert AccessList(EVERYONE).everyone
    assert not AccessList(EVERYONE, [net("10.0.0.0/8")]).everyone
    assert not AccessList([net("0.0.0.0/0")]).everyone


def test_denyWinsOverAllow() -> None:
    acl = AccessList(EVERYONE, [net("10.9.0.0/16"), net("2001:db8:9::/48")])
    assert acl.refusal("10.9.1.1") == "denied"
    assert acl.refusal("2001:db8:9::1") == "denied"
    assert acl.refusal("10.8.1.1") is None
    assert acl.refusal("2001:db8:8::1") is None


def test_allowRestricts() -> None:
    acl = AccessList([net("10.0.0.0/8"), net("2001:db8::/32")])
    assert acl.refusal("10.1.2.3") is None
    assert acl.refusal("2001:db8::1") is None
    assert acl.refusal("192.0.2.1") == "not-allowed"
    assert acl.refusal("2001:db9::1") == "not-allowed"
    assert acl.refusal("not-an-address") == "not-allowed"


def test_ipv6OnlyAllowDoesNotAdmitMappedIPv4() -> None:
    acl = AccessList([net("::/0")])
    assert acl.refusal("2001:db8::1") is None
    assert acl.refusal("::ffff:10.1.2.3") == "not-allowed"


def test_mappedPeerMatchedAsIPv4() -> None:
    """
    An IPv4 client of a dual-stack socket (::ffff:a.b.c.d) is matched by
    IPv4 networks, both in allow and in deny.
    """
    allow = AccessList([net("10.0.0.0/8")])
    assert allow.refusal("::ffff:10.1.2.3") is None
    assert allow.refusal("::ffff:192.0.2.1") == "not-allowed"
    deny = AccessList(EVERYONE, [net("10.0.0.0/8")])
    assert deny.refusal("::ffff:10.1.2.3") == "denied"


def test_scopedPeerMatched() -> None:
    acl = AccessList([net("fe80::/10")])
    assert acl.refusal("fe80::5%eth0") is None


def test_decisionCacheIsBounded() -> None:
    acl = AccessList([net("10.0.0.0/8")], cacheSize=100)
    for i in range(1000):
        host = f"10.0.{i // 256}.{i % 256}"
        assert acl.refusal(host) is None
        assert len(acl.refusals) <= 100
    # Decisions stay right after the cache was cleared.
    assert acl.refusal("192.0.2.1") == "not-allowed"
    assert acl.refusal("10.0.0.1") is None


def test_memoComputesOncePerHostAndIsBounded() -> None:
    calls: list[str] = []

    def function(host: str) -> str:
        calls.append(host)
        return host.upper()

    memo = Memo(function, 3)
    assert [memo["a"], memo["a"], memo["b"]] == ["A", "A", "B"]
    assert calls == ["a", "b"]
    for host in "cdefg":
        assert memo[host] == host.upper()
        assert len(memo) <= 3
    # Forgotten when full, then computed again.
    assert memo["a"] == "A"
    assert calls.count("a") == 2


def test_rateMappedKeysMemoBounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """
    The memo of IPv4-mapped hosts' bucket keys holds at most mappedKeys,
    holds no other host, and a mapped host keeps sharing its IPv4 bucket
    after the memo was cleared.
    """
    monkeypatch.setattr(RateLimiter, "mappedKeys", 10)
    limiter = RateLimiter(rate=1, burst=2, maxSources=1000)
    assert limiter.allow("::ffff:192.0.2.1", 0.0)
    for i in range(100):
        limiter.allow(f"::ffff:10.0.0.{i}", 0.0)
        limiter.allow(f"10.1.0.{i}", 0.0)
        limiter.allow(f"2001:db8::{i}", 0.0)
        assert len(limiter._keys) <= 10
    assert all(host.startswith("::ffff:") for host in limiter._keys)
    assert "192.0.2.1" in limiter and "::ffff:192.0.2.1" not in limiter
    assert limiter.allow("192.0.2.1", 0.0)
    assert not limiter.allow("::ffff:192.0.2.1", 0.0)


def test_rateBurstThenRefuse() -> None:
    limiter = RateLimiter(rate=10, burst=3, maxSources=10)
    assert [limiter.allow("a", 100.0) for _ in range(5)] == [True] * 3 + [False] * 2
    # Another source has its own bucket.
    assert limiter.allow("b", 100.0)


def test_rateRefills() -> None:
    limiter = RateLimiter(rate=8, burst=3, maxSources=10)
    for _ in range(3):
        assert limiter.allow("a", 100.0)
    assert not limiter.allow("a", 100.0)
    # 1/8 s at 8/s is one token.
    assert limiter.allow("a", 100.125)
    assert not limiter.allow("a", 100.125)
    # Refilling stops at the burst.
    assert [limiter.allow("a", 1000.0) for _ in range(4)] == [True] * 3 + [False]


def test_rateAverage() -> None:
    """
    Over a long run a source gets rate per second, plus the burst.
    """
    limiter = RateLimiter(rate=100, burst=20, maxSources=10)
    allowed = sum(limiter.allow("a", i / 1000) for i in range(10_000))  # 10 s at 1000/s
    assert 20 + 100 * 10 - 2 <= allowed <= 20 + 100 * 10 + 2


def test_rateClockSteppingBack() -> None:
    limiter = RateLimiter(rate=10, burst=2, maxSources=10)
    assert limiter.allow("a", 100.0)
    assert limiter.allow("a", 100.0)
    assert not limiter.allow("a", 50.0)
    assert not limiter.allow("a", 100.0)


def test_rateZeroIsUnlimited() -> None:
    limiter = RateLimiter(rate=0, burst=1, maxSources=1)
    assert all(limiter.allow(str(i % 3), 0.0) for i in range(10_000))
    assert len(limiter) == 0


def test_rateMemoryBoundedUnderManySources() -> None:
    """
    A flood of distinct (spoofed) sources keeps at most maxSources buckets.
    """
    limiter = RateLimiter(rate=1000, burst=2000, maxSources=1000)
    for i in range(50_000):
        limiter.allow(f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}", 1.0)
        assert len(limiter) <= 1000
    # Two generations of 500: the recent one full, the older one filling.
    assert 500 <= len(limiter) <= 1000
    assert limiter.evictions == 50_000 - len(limiter)


def test_rateMemoryFootprint() -> None:
    """
    The README's figure holds: with the default max_sources (65,536), a
    flood of distinct IPv6 sources (long address strings, kept as keys)
    peaks under 10 MB, about 140 bytes per source.
    """
    limiter = RateLimiter(rate=1000, burst=2000, maxSources=65_536)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(150_000):
            limiter.allow(
                f"2001:db8:1234:5678:9abc:def0:{i >> 16:x}:{i & 0xFFFF:x}", 1.0
            )
        peak = tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()
    assert 32_768 <= len(limiter) <= 65_536
    assert peak < 10_000_000
    assert peak / 65_536 < 145


def test_rateActiveSourceSurvivesAFlood() -> None:
    """
    A limited source that keeps sending stays limited while fewer than
    maxSources / 2 other new sources pass between two of its datagrams.
    """
    limiter = RateLimiter(rate=1, burst=2, maxSources=100)
    victim = "192.0.2.1"
    assert limiter.allow(victim, 0.0)
    assert limiter.allow(victim, 0.0)
    for round in range(10):
        for i in range(49):
            limiter.allow(f"10.0.{round}.{i}", 0.0)
        assert not limiter.allow(victim, 0.0)
        assert victim in limiter


def test_rateEvictedSourceStartsAfresh() -> None:
    limiter = RateLimiter(rate=1, burst=1, maxSources=2)
    assert limiter.allow("a", 0.0)
    assert not limiter.allow("a", 0.0)
    limiter.allow("b", 0.0)
    limiter.allow("c", 0.0)
    assert "a" not in limiter
    assert limiter.allow("a", 0.0)


@pytest.mark.parametrize("rate, burst, cap", [(-1, 1, 1), (1, 0, 1), (1, 1, 0)])
def test_rateBadArguments(rate: float, burst: int, cap: int) -> None:
    with pytest.raises(ValueError):
        RateLimiter(rate, burst, cap)


# Per network


def test_networkKey() -> None:
    """
    Hosts of one network share a key, whatever their form (IPv4-mapped,
    scoped); IPv4 and IPv6 networks never do.
    """
    key = networkKey("10.1.2.5", 24, 56)
    assert key == networkKey("10.1.2.250", 24, 56)
    assert key == networkKey("::ffff:10.1.2.7", 24, 56)
    assert key != networkKey("10.1.3.5", 24, 56)
    assert networkKey("10.1.2.5", 32, 56) != networkKey("10.1.2.6", 32, 56)
    assert networkKey("10.1.2.5", 0, 56) == networkKey("192.0.2.1", 0, 56)
    v6 = networkKey("2001:db8:1:ff::1", 24, 56)
    assert v6 == networkKey("2001:db8:1:0::2", 24, 56)
    assert v6 != networkKey("2001:db8:1:100::1", 24, 56)
    assert networkKey("fe80::5%eth0", 24, 64) == networkKey("fe80::6", 24, 64)
    # 0.0.0.0/0 and ::/0 differ: 4 and 16 bytes.
    assert networkKey("0.0.0.0", 0, 0) != networkKey("::", 0, 0)
    assert networkKey("not an address", 24, 56) == "not an address"


def test_networkSharesOneBucket() -> None:
    """
    The sources of one network draw from one bucket, beside their own;
    another network has its own.
    """
    limiter = NetworkLimiter(
        rate=1, burst=10, maxNetworks=100, prefixV4=24, prefixV6=56
    )
    allowed = [limiter.allow(f"10.1.2.{i}", 5.0) for i in range(1, 255)]
    assert allowed == [True] * 10 + [False] * 244
    assert limiter.allow("10.1.3.1", 5.0)
    assert not limiter.allow("::ffff:10.1.2.99", 5.0)
    # One token a second.
    assert limiter.allow("10.1.2.77", 6.0)
    assert not limiter.allow("10.1.2.78", 6.0)
    assert len(limiter) == 2


def test_networkBucketsMemoryBounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """
    A flood of distinct networks keeps at most maxNetworks buckets and
    hostsKept memoised hosts; a network active while fewer than
    maxNetworks / 2 new ones came keeps its (empty) bucket.
    """
    monkeypatch.setattr(NetworkLimiter, "hostsKept", 50)
    limiter = NetworkLimiter(rate=1, burst=2, maxNetworks=100, prefixV4=24, prefixV6=56)
    assert limiter.allow("192.0.2.1", 0.0)
    assert limiter.allow("192.0.2.2", 0.0)
    for i in range(5000):
        limiter.allow(f"10.{i >> 8 & 255}.{i & 255}.1", 0.0)
        assert len(limiter) <= 100
        assert len(limiter._hosts) <= 50
        if i % 40 == 0:
            assert not limiter.allow("192.0.2.3", 0.0)
    assert limiter.evictions == 5001 - len(limiter)


def test_networkMemoryFootprint() -> None:
    """
    The docs' figure holds: with the default max_sources (65,536), a flood
    of sources each in another IPv6 /56 peaks under 13 MB, about 190 bytes
    per network (its key, its bucket, and the memo of recent hosts).
    """
    limiter = NetworkLimiter(
        rate=2000, burst=4000, maxNetworks=65_536, prefixV4=24, prefixV6=56
    )
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(150_000):
            limiter.allow(f"2001:db8:{i >> 8:x}:{(i & 255) << 8:x}::1", 1.0)
        peak = tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()
    assert 32_768 <= len(limiter) <= 65_536
    print(f"network limiter: peak {peak} bytes, {peak / 65_536:.0f} per network")
    assert peak < 13_000_000
    assert peak / 65_536 < 200


@pytest.mark.parametrize(
    "rate, burst, cap, v4, v6",
    [
        (-1, 1, 1, 24, 56),
        (1, 0, 1, 24, 56),
        (1, 1, 0, 24, 56),
        (1, 1, 1, 33, 56),
        (1, 1, 1, 24, 129),
        (1, 1, 1, -1, 56),
    ],
)
def test_networkBadArguments(
    rate: float, burst: int, cap: int, v4: int, v6: int
) -> None:
    with pytest.raises(ValueError):
        NetworkLimiter(rate, burst, cap, v4, v6)

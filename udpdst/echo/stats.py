"""
One immutable snapshot of everything the udpdst service counts: read by the
stats log line, the final stats and the metrics, so that they never
disagree, and summed across worker processes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from udpdst.port import SOCKET_FIGURES, PortCounters


def _frozen(figures: Mapping[str, int]) -> Mapping[str, int]:
    return MappingProxyType({name: int(value) for name, value in figures.items()})


def _sum(a: Mapping[str, int], b: Mapping[str, int]) -> Mapping[str, int]:
    total = dict(a)
    for name, value in b.items():
        total[name] = total.get(name, 0) + value
    return _frozen(total)


@dataclass(frozen=True, slots=True)
class ListenerStats:
    """
    What one listener counted.

    @ivar counters: The port's counters by name (C{PortCounters.asDict()}:
        C{received}, C{replied}, C{sendErrors}, C{oversized}, ...), every
        field the port has, so that a new one is reported without edits here.
    @ivar refused: Datagrams the echo refused, by reason, every reason
        (0 included).
    """

    counters: Mapping[str, int] = field(default_factory=dict)
    refused: Mapping[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Copies behind read-only views: a snapshot never changes once taken.
        object.__setattr__(self, "counters", _frozen(self.counters))
        object.__setattr__(self, "refused", _frozen(self.refused))

    @property
    def refusedTotal(self) -> int:
        return sum(self.refused.values())

    def __add__(self, other: ListenerStats) -> ListenerStats:
        """
        Two sockets' figures together (two listeners of one address).
        """
        return ListenerStats(
            _sum(self.counters, other.counters), _sum(self.refused, other.refused)
        )

    def shared(self, other: ListenerStats) -> ListenerStats:
        """
        What two processes serving the same socket counted: the sum, except
        for the figures of the socket itself (C{kernelDrops}), which each
        process sees whole: the larger, the later, is kept.
        """
        counters = dict(_sum(self.counters, other.counters))
        for name in SOCKET_FIGURES:
            if name in self.counters and name in other.counters:
                counters[name] = max(self.counters[name], other.counters[name])
        return ListenerStats(counters, _sum(self.refused, other.refused))

    def asDict(self) -> dict[str, Any]:
        return {"counters": dict(self.counters), "refused": dict(self.refused)}

    @classmethod
    def fromDict(cls, data: Mapping[str, Any]) -> ListenerStats:
        return cls(data["counters"], data["refused"])


@dataclass(frozen=True, slots=True)
class Snapshot:
    """
    Everything the service counted, at one moment.

    @ivar listeners: L{ListenerStats} by listener address (C{[::]:12345}).
    @ivar rateLimitedSources: Sources whose rate the limiter tracks now.
    @ivar limiterEvictions: Sources the limiter forgot to make room.
    @ivar rateLimitedNetworks: Source networks whose rate the per-network
        limiter tracks now.
    @ivar networkEvictions: Networks that limiter forgot to make room.
    """

    listeners: Mapping[str, ListenerStats] = field(default_factory=dict)
    rateLimitedSources: int = 0
    limiterEvictions: int = 0
    rateLimitedNetworks: int = 0
    networkEvictions: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "listeners", MappingProxyType(dict(self.listeners)))

    def __add__(self, other: Snapshot) -> Snapshot:
        """
        Two processes' figures together: listeners of the same address are
        one socket that both served (workers), so their figures add up
        (L{ListenerStats.shared}); others are kept side by side.
        """
        listeners = dict(self.listeners)
        for address, stats in other.listeners.items():
            mine = listeners.get(address)
            listeners[address] = stats if mine is None else mine.shared(stats)
        return Snapshot(
            listeners,
            self.rateLimitedSources + other.rateLimitedSources,
            self.limiterEvictions + other.limiterEvictions,
            self.rateLimitedNetworks + other.rateLimitedNetworks,
            self.networkEvictions + other.networkEvictions,
        )

    def asDict(self) -> dict[str, Any]:
        """
        The snapshot as plain data (JSON-ready), for L{fromDict}.
        """
        return {
            "listeners": {a: s.asDict() for a, s in self.listeners.items()},
            "rateLimitedSources": self.rateLimitedSources,
            "limiterEvictions": self.limiterEvictions,
            "rateLimitedNetworks": self.rateLimitedNetworks,
            "networkEvictions": self.networkEvictions,
        }

    @classmethod
    def fromDict(cls, data: Mapping[str, Any]) -> Snapshot:
        """
        The snapshot L{asDict} returned.

        @raise KeyError: A field is missing.
        @raise TypeError, ValueError: A figure is not a number.
        """
        return cls(
            {a: ListenerStats.fromDict(s) for a, s in data["listeners"].items()},
            int(data["rateLimitedSources"]),
            int(data["limiterEvictions"]),
            int(data["rateLimitedNetworks"]),
            int(data["networkEvictions"]),
        )


def portFigures(port: PortCounters | None) -> dict[str, int]:
    """
    A listener's per-datagram counters: every field of the port's
    L{PortCounters} (all zeros before it listens).
    """
    return (port if port is not None else PortCounters()).asDict()


def takeSnapshot(
    listeners: Iterable[tuple[str, Any, Any]],
    limiter: Any = None,
    networkLimiter: Any = None,
) -> Snapshot:
    """
    Read every counter now.

    @param listeners: C{(address, portCounters, echoCounters)} per listener:
        the port's L{PortCounters} (L{None} before it listens) and the echo
        protocol's counters (their C{refused} by reason).
    @param limiter: The shared rate limiter (C{len()} and C{evictions}), or
        L{None}.
    @param networkLimiter: Likewise, the shared per-network limiter.
    """
    byAddress: dict[str, ListenerStats] = {}
    for address, port, echo in listeners:
        stats = ListenerStats(portFigures(port), echo.refused)
        mine = byAddress.get(address)
        # Two listeners of one address in one process are two sockets.
        byAddress[address] = stats if mine is None else mine + stats
    snapshot = Snapshot(byAddress)
    if limiter is not None:
        snapshot = snapshot + Snapshot({}, len(limiter), limiter.evictions)
    if networkLimiter is not None:
        snapshot = snapshot + Snapshot(
            {}, 0, 0, len(networkLimiter), networkLimiter.evictions
        )
    return snapshot

"""
A microbenchmark of the echo service's per-datagram checks: what
C{EchoProtocol} (default limits, as C{twistd udpdst} builds it, and the limits
of C{bench/run.py}'s service echo) costs over a bare destination-aware echo,
without sockets, so the figure is the Python work alone.  The variants run
interleaved; the best of the rounds is shown.

    python bench/echo_checks.py [--datagrams N] [--rounds R] [--peers P]

Each check's own cost is the difference between the default-limits variant
and the variant without that check (the broadcast check: answer_broadcast on;
the per-network bucket: per_prefix_rate = 0; and so on).

Every datagram differs (a sequence number, as in a load test), so nothing is
refused; the clock advances 1 ms per datagram so that the rate limit never
refuses either while every datagram still comes within the loop guard's
window of the last reply to its peer (the guard compares contents each time).
"""

from __future__ import annotations

import argparse
import ipaddress
import itertools
import time
from collections.abc import Callable
from functools import partial
from typing import Any

from udpdst.address import Destination, PeerAddress
from udpdst.echo.config import LimitsConfig
from udpdst.echo.limits import AccessList, NetworkLimiter, RateLimiter
from udpdst.echo.protocol import EchoProtocol
from udpdst.protocol import DestinationDatagramProtocol


class NullTransport:
    def write(self, data: bytes, addr: Any, dst: Any = None) -> None:
        pass

    def getHost(self) -> Any:
        return None


class BareEcho(DestinationDatagramProtocol):
    def datagramReceived(self, data: bytes, addr: Any, dst: Any) -> None:  # type: ignore[override]
        self.transport.write(data, addr, dst)  # type: ignore[union-attr, call-arg]


class OpenGuard:
    """
    A loop guard that allows everything: the service without loop checks.
    """

    def allow(self, peer: Any, datagram: bytes, reply: bytes, now: float) -> bool:
        return True


def _clock() -> Callable[[], float]:
    return partial(next, itertools.count(1000.0, 0.001))


#: The limits of bench/servers.py's service echo: a deny list engaged, a rate
#: limit that never refuses.
BENCH_LIMITS = LimitsConfig(
    per_source_rate=1e9,
    per_source_burst=10**9,
    per_prefix_rate=1e9,
    per_prefix_burst=10**9,
    deny=(ipaddress.ip_network("192.0.2.0/24"), ipaddress.ip_network("2001:db8::/32")),
)

#: Variants whose peers are IPv4 clients of a dual-stack socket
#: ("::ffff:127.0.0.1"), as in bench/run.py, where the service listens on ::.
MAPPED = {"EchoProtocol, bench limits, ::ffff: peers"}


def variants() -> dict[str, Callable[[], Any]]:
    limits = LimitsConfig()
    return {
        "bare aware echo": BareEcho,
        "EchoProtocol, bench limits, ::ffff: peers": lambda: EchoProtocol.fromConfig(
            b"", BENCH_LIMITS, clock=_clock()
        ),
        "EchoProtocol, default limits": lambda: EchoProtocol.fromConfig(
            b"", limits, clock=_clock()
        ),
        "EchoProtocol, default limits, no loop guard": lambda: EchoProtocol(
            denySourcePorts=limits.deny_source_ports,
            loopGuard=OpenGuard(),  # type: ignore[arg-type]
            clock=_clock(),
            **_shared(limits),
        ),
        "EchoProtocol, no broadcast check": lambda: EchoProtocol.fromConfig(
            b"", limits, clock=_clock(), answerBroadcast=True
        ),
        "EchoProtocol, no per-network limit": lambda: EchoProtocol.fromConfig(
            b"", LimitsConfig(per_prefix_rate=0), clock=_clock()
        ),
        "EchoProtocol, no per-source limit": lambda: EchoProtocol.fromConfig(
            b"", LimitsConfig(per_source_rate=0), clock=_clock()
        ),
        "EchoProtocol, no rate limits": lambda: EchoProtocol.fromConfig(
            b"", LimitsConfig(per_source_rate=0, per_prefix_rate=0), clock=_clock()
        ),
        "EchoProtocol, default limits, prefix": lambda: EchoProtocol.fromConfig(
            b"echo: ", limits, clock=_clock()
        ),
    }


def _shared(limits: LimitsConfig) -> dict[str, Any]:
    return {
        "access": AccessList(limits.allow, limits.deny),
        "rateLimiter": RateLimiter(
            limits.per_source_rate, limits.per_source_burst, limits.max_sources
        ),
        "networkLimiter": NetworkLimiter(
            limits.per_prefix_rate,
            limits.per_prefix_burst,
            limits.max_sources,
            limits.prefix_v4,
            limits.prefix_v6,
        ),
    }


def measure(
    factory: Callable[[], Any], datagrams: int, peers: int, mapped: bool = False
) -> float:
    """
    CPU ns per datagram through C{factory()}'s datagramReceived.
    """
    proto = factory()
    proto.makeConnection(NullTransport())
    dst = Destination("127.0.0.2", 12345, 1, "127.0.0.2")
    form = "::ffff:127.0.0.{}" if mapped else "127.0.0.{}"
    addrs = [
        PeerAddress(form.format(1 + i % 200), 40000 + i, dst) for i in range(peers)
    ]
    data = [b"%016d" % i + b"\0" * 48 for i in range(datagrams)]
    receive = proto.datagramReceived
    work = list(zip(data, itertools.cycle(addrs), strict=False))
    start = time.process_time()
    for datagram, addr in work:
        receive(datagram, addr, dst)
    return (time.process_time() - start) / datagrams * 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--datagrams", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--peers", type=int, default=64)
    options = parser.parse_args()
    found: dict[str, list[float]] = {}
    for _ in range(options.rounds):
        for name, factory in variants().items():
            found.setdefault(name, []).append(
                measure(factory, options.datagrams, options.peers, name in MAPPED)
            )
    base = min(found["bare aware echo"])
    full = min(found["EchoProtocol, default limits"])
    print(f"{'variant':<46} {'ns/datagram':>12} {'over bare':>10} {'vs default':>10}")
    for name, values in found.items():
        best = min(values)
        print(f"{name:<46} {best:12.0f} {best - base:+10.0f} {best - full:+10.0f}")


if __name__ == "__main__":
    main()

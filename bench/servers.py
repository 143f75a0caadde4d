"""
The Python echo servers the benchmark compares, one subcommand each.

    python bench/servers.py VARIANT ADDRESS PORT

VARIANT is one of:

  twisted        Twisted's own reactor.listenUDP with a DatagramProtocol echo
  asyncio        asyncio's create_datagram_endpoint echo (default event loop)
  udpdst-dst     udpdst.listenUDP with a DestinationDatagramProtocol echo
                 (replies with transport.write(data, addr, dst))
  udpdst-plain   udpdst.listenUDP with the same plain DatagramProtocol echo
                 as "twisted" (replies with transport.write(data, addr))
  udpdst-echo    udpdst.listenUDP with the service's udpdst.echo.EchoProtocol,
                 ACL and rate limiter engaged but set never to refuse

Twisted variants run on the epoll reactor.  PORT 0 picks a free port.
--transparent makes a udpdst variant's port transparent (listenUDP
transparent=True; bench/transparent.py runs it behind a TPROXY rule).

Every server speaks the same control protocol on stdin/stdout as
bench/cserver.c, so that bench/run.py reads the server's CPU time from inside
the server process, around the measured window:

  -> (stdout)  "ready PORT"                once listening
  <- "m"       -> "m UTIME STIME - -"       own rusage (seconds)
  <- "s"       -> "s JSON"                 extra facts (udpdst counters, rss_kb)
  <- "prof-start"                           start cProfile
  <- "prof-stop PATH"  -> "p PATH"          stop it and dump stats to PATH
  stdin closed: exit.

Nothing else runs in the server while it is measured: no counters are kept
in the echo path, so the stock variants are exactly what a user would write.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys


def _rssKb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def _rusage() -> str:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return f"m {ru.ru_utime:.6f} {ru.ru_stime:.6f} - -"


class _Control:
    """
    The control protocol, independent of the event loop that feeds it lines.
    """

    def __init__(self, stats, write, stop):
        self._stats = stats
        self._write = write
        self._stop = stop
        self._profile = None

    def line(self, line: str) -> None:
        words = line.split()
        if not words:
            return
        cmd = words[0]
        if cmd == "m":
            self._write(_rusage())
        elif cmd == "s":
            stats = {**self._stats(), "rss_kb": _rssKb()}
            self._write("s " + json.dumps(stats, default=str))
        elif cmd == "prof-start":
            import cProfile

            self._profile = cProfile.Profile()
            self._profile.enable()
        elif cmd == "prof-stop" and self._profile is not None:
            self._profile.disable()
            self._profile.dump_stats(words[1])
            self._profile = None
            self._write(f"p {words[1]}")
        elif cmd == "quit":
            self._stop()


def _counters(port) -> dict:
    """
    Whatever counters a udpdst port exposes, as a plain dict.
    """
    counters = getattr(port, "counters", None)
    if counters is None:
        return {}
    if hasattr(counters, "__dataclass_fields__"):
        import dataclasses

        return dataclasses.asdict(counters)
    if hasattr(counters, "asDict"):
        return dict(counters.asDict())
    return {
        k: v
        for k, v in vars(counters).items()
        if not k.startswith("_") and isinstance(v, int | float)
    }


def _runTwisted(
    variant: str, address: str, portNumber: int, transparent: bool = False
) -> None:
    from twisted.internet import epollreactor

    epollreactor.install()
    from twisted.internet import reactor, stdio
    from twisted.internet.protocol import DatagramProtocol
    from twisted.protocols.basic import LineOnlyReceiver

    class Echo(DatagramProtocol):
        def datagramReceived(self, data, addr):
            self.transport.write(data, addr)

    if variant == "twisted":
        port = reactor.listenUDP(portNumber, Echo(), interface=address)
    else:
        from udpdst import listenUDP

        if variant == "udpdst-plain":
            protocol = Echo()
        elif variant == "udpdst-dst":
            from udpdst import DestinationDatagramProtocol

            class DestinationEcho(DestinationDatagramProtocol):
                def datagramReceived(self, data, addr, dst):
                    self.transport.write(data, addr, dst)

            protocol = DestinationEcho()
        elif variant == "udpdst-echo":
            protocol = _serviceEcho(reactor)
        else:
            raise SystemExit(f"unknown variant {variant!r}")
        options = {"transparent": True} if transparent else {}
        port = listenUDP(
            portNumber, protocol, interface=address, reactor=reactor, **options
        )

    class ControlLines(LineOnlyReceiver):
        delimiter = b"\n"

        def connectionMade(self):
            self.control = _Control(
                lambda: {
                    "counters": _counters(port),
                    "protocol": _counters(port.protocol),
                },
                lambda text: self.sendLine(text.encode()),
                reactor.stop,
            )
            self.sendLine(f"ready {port.getHost().port}".encode())

        def lineReceived(self, line):
            self.control.line(line.decode())

        def connectionLost(self, reason):
            if reactor.running:
                reactor.stop()

    stdio.StandardIO(ControlLines(), reactor=reactor)
    reactor.run()


def _serviceEcho(reactor):
    """
    The service's echo protocol as the service builds it (C{fromConfig}), with
    its checks engaged but never refusing the benchmark's traffic: an ACL
    with a deny list that does not match loopback, per-source and
    per-network rate limits far above any rate reached here, and the
    broadcast check.  So the benchmark pays for the
    checks and measures every datagram.
    """
    import dataclasses
    import ipaddress

    from udpdst.echo.config import LimitsConfig
    from udpdst.echo.protocol import EchoProtocol

    settings: dict[str, object] = {
        "per_source_rate": 1e9,
        "per_source_burst": 10**9,
        "per_prefix_rate": 1e9,
        "per_prefix_burst": 10**9,
        "deny": (
            ipaddress.ip_network("192.0.2.0/24"),
            ipaddress.ip_network("2001:db8::/32"),
        ),
    }
    # Only the keys the measured tree has (--tree runs an older one too).
    known = {f.name for f in dataclasses.fields(LimitsConfig)}
    limits = LimitsConfig(**{k: v for k, v in settings.items() if k in known})
    return EchoProtocol.fromConfig(b"", limits, clock=reactor.seconds)


def _runAsyncio(address: str, portNumber: int) -> None:
    import asyncio

    class Echo(asyncio.DatagramProtocol):
        def connection_made(self, transport):
            self.transport = transport

        def datagram_received(self, data, addr):
            self.transport.sendto(data, addr)

    async def main():
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(
            Echo, local_addr=(address, portNumber)
        )
        done = loop.create_future()
        buf = bytearray()

        def write(text):
            sys.stdout.write(text + "\n")
            sys.stdout.flush()

        def stop():
            if not done.done():
                done.set_result(None)

        control = _Control(lambda: {}, write, stop)

        def readable():
            chunk = os.read(0, 4096)
            if not chunk:
                stop()
                return
            buf.extend(chunk)
            while b"\n" in buf:
                line, _, rest = bytes(buf).partition(b"\n")
                buf[:] = rest
                control.line(line.decode())

        loop.add_reader(0, readable)
        write(f"ready {transport.get_extra_info('sockname')[1]}")
        await done
        transport.close()

    asyncio.run(main())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    parser.add_argument(
        "variant",
        choices=["twisted", "asyncio", "udpdst-dst", "udpdst-plain", "udpdst-echo"],
    )
    parser.add_argument("address")
    parser.add_argument("port", type=int)
    parser.add_argument(
        "--transparent", action="store_true", help="udpdst variants: transparent=True"
    )
    args = parser.parse_args(argv)
    if args.variant == "asyncio":
        _runAsyncio(args.address, args.port)
    else:
        _runTwisted(args.variant, args.address, args.port, args.transparent)


if __name__ == "__main__":
    main()

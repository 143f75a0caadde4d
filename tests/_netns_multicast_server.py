"""
The namespace tests' echo server (L{tests._netns_server}) on a multicast
port: C{udpdst.listenMulticast}, or C{reactor.listenMulticast} of a reactor
patched with C{udpdst.patchReactor}, joining groups with C{joinGroup}.

Run inside a namespace; it speaks the same stdout lines (READY, RECV, SENT,
ERROR, COUNTERS), and C{CLASS <name>} of its port before READY; it stops
when stdin closes.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from tests._netns_server import _buildProtocol, _counters, _emit
from tests.netns import stopWhenStdinCloses


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--interface", default="")
    parser.add_argument("--protocol", choices=["dst", "plain"], default="dst")
    parser.add_argument(
        "--via",
        choices=["listenMulticast", "patchReactor"],
        default="listenMulticast",
    )
    parser.add_argument("--join", action="append", default=[], metavar="GROUP%IFNAME")
    parser.add_argument("--lifetime", type=float, default=30.0)
    options = parser.parse_args(argv)

    from twisted.internet import defer, reactor

    import udpdst

    protocol, holder = _buildProtocol(options.protocol, 0.0, reactor)
    port: Any
    if options.via == "patchReactor":
        udpdst.patchReactor(reactor)
        port = reactor.listenMulticast(0, protocol, interface=options.interface)
    else:
        port = udpdst.listenMulticast(
            0, protocol, interface=options.interface, reactor=reactor
        )
    holder["port"] = port

    stop = stopWhenStdinCloses(reactor)

    def failed(reason: Any) -> None:
        _emit("ERROR", f"join: {reason.getErrorMessage()}")
        stop()

    joins = []
    for spec in options.join:
        group, _, ifname = spec.partition("%")
        joins.append(port.joinGroup(group, ifname))
    ready = defer.gatherResults(joins, consumeErrors=True)

    def announce(_: object) -> None:
        _emit("CLASS", type(port).__name__)
        _emit("READY", port.getHost().port)

    ready.addCallback(announce)
    ready.addErrback(lambda f: failed(f.value.subFailure))

    reactor.callLater(options.lifetime, stop)
    reactor.run()
    _emit("COUNTERS", json.dumps(_counters(port)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

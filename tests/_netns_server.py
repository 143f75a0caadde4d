"""
A UDP echo server for the network-namespace tests: it answers each datagram
with JSON saying which destination it saw, so the tests can check both the
reply's source and the reported destination.

Run inside a namespace with C{ip netns exec NS python _netns_server.py ...}.
It talks to the test over stdout, one line per event::

    READY <port>            listening
    RECV <json>             a datagram arrived (peer, dst)
    SENT <json>             a reply was written
    ERROR <text>            writing a reply raised
    COUNTERS <json>         the port's counters, printed once when stopping

It stops when stdin is closed, on SIGTERM/SIGINT, or after C{--lifetime}
seconds, whichever comes first.
"""

from __future__ import annotations

import argparse
import json
import socket
import struct
import sys
from typing import Any

from tests.netns import stopWhenStdinCloses


def _emit(kind: str, payload: Any = None) -> None:
    line = kind if payload is None else f"{kind} {payload}"
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _counters(port: Any) -> dict[str, Any] | None:
    counters = getattr(port, "counters", None)
    if counters is None:
        return None
    return counters.asDict()  # type: ignore[no-any-return]


def _dstJSON(dst: Any) -> dict[str, Any] | None:
    if dst is None:
        return None
    return {
        "host": dst.host,
        "port": dst.port,
        "ifindex": dst.ifindex,
        "replyFrom": dst.replyFrom,
    }


def _buildProtocol(kind: str, delay: float, reactor: Any) -> Any:
    from twisted.internet.protocol import DatagramProtocol

    holder: dict[str, Any] = {}

    def answer(protocol: Any, data: bytes, addr: Any, dst: Any, withDst: bool) -> None:
        report = {
            "query": data.decode("utf-8", "replace"),
            "peer": [addr[0], addr[1]],
            "peerType": type(addr).__name__,
            "dst": _dstJSON(dst),
            "kind": kind,
        }
        _emit("RECV", json.dumps(report))

        def reply() -> None:
            report["counters"] = _counters(holder.get("port"))
            payload = json.dumps(report).encode()
            try:
                if withDst:
                    protocol.transport.write(payload, addr, dst)
                else:
                    protocol.transport.write(payload, addr)
            except Exception as e:  # reported to the test, which asserts on it
                _emit("ERROR", f"{type(e).__name__}: {e}")
            else:
                _emit("SENT", json.dumps({"peer": [addr[0], addr[1]]}))

        if delay > 0:
            reactor.callLater(delay, reply)
        else:
            reply()

    if kind == "dst":
        from udpdst import DestinationDatagramProtocol

        class DstEcho(DestinationDatagramProtocol):
            def datagramReceived(self, data: bytes, addr: Any, dst: Any) -> None:  # type: ignore[override]
                answer(self, data, addr, dst, True)

        return DstEcho(), holder

    class PlainEcho(DatagramProtocol):
        def datagramReceived(self, data: bytes, addr: Any) -> None:
            # A stock protocol: it only has addr; udpdst's PeerAddress may
            # carry the destination along.
            answer(self, data, addr, getattr(addr, "destination", None), False)

    return PlainEcho(), holder


def _join(port: Any, spec: str) -> None:
    group, _, ifname = spec.partition("%")
    ifindex = socket.if_nametoindex(ifname) if ifname else 0
    if ":" in group:
        mreq = socket.inet_pton(socket.AF_INET6, group) + struct.pack("@I", ifindex)
        port.getHandle().setsockopt(socket.IPPROTO_IPV6, socket.IPV6_JOIN_GROUP, mreq)
    else:
        # struct ip_mreqn: group, local address (any), interface index.
        mreqn = socket.inet_aton(group) + b"\0" * 4 + struct.pack("@i", ifindex)
        port.getHandle().setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, mreqn)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--interface", default="")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument(
        "--impl",
        choices=["udpdst", "stock"],
        default="udpdst",
        help="udpdst.listenUDP, or Twisted's own reactor.listenUDP",
    )
    parser.add_argument(
        "--protocol",
        choices=["dst", "plain"],
        default="dst",
        help="a DestinationDatagramProtocol, or a plain DatagramProtocol",
    )
    parser.add_argument(
        "--delay", type=float, default=0.0, help="seconds before replying"
    )
    parser.add_argument(
        "--join",
        action="append",
        default=[],
        metavar="GROUP%IFNAME",
        help="join a multicast group (IPv4 or IPv6) on an interface",
    )
    parser.add_argument("--v6only", action="store_true", help="listenUDP(v6Only=True)")
    parser.add_argument(
        "--transparent",
        choices=["no", "listen", "adopt"],
        default="no",
        help="listenUDP(transparent=True), or adoptDatagramPort of a socket "
        "this script made with IP_TRANSPARENT (the port is told nothing)",
    )
    parser.add_argument("--reply-sockets", type=int, default=256)
    parser.add_argument("--reply-idle", type=float, default=60.0)
    parser.add_argument("--lifetime", type=float, default=30.0)
    options = parser.parse_args(argv)

    from twisted.internet import reactor

    protocol, holder = _buildProtocol(
        "plain" if options.impl == "stock" else options.protocol, options.delay, reactor
    )
    if options.impl == "stock":
        port = reactor.listenUDP(options.port, protocol, interface=options.interface)
    elif options.transparent == "adopt":
        from udpdst import adoptDatagramPort

        family = socket.AF_INET6 if ":" in options.interface else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_IP, 19, 1)  # IP_TRANSPARENT
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind((options.interface, options.port))
        sock.setblocking(False)
        port = adoptDatagramPort(
            sock.fileno(),
            family,
            protocol,
            reactor=reactor,
            replySockets=options.reply_sockets,
            replySocketIdleTimeout=options.reply_idle,
        )
        sock.close()
    else:
        from udpdst import listenUDP

        port = listenUDP(
            options.port,
            protocol,
            interface=options.interface,
            reactor=reactor,
            v6Only=options.v6only,
            transparent=options.transparent == "listen",
            replySockets=options.reply_sockets,
            replySocketIdleTimeout=options.reply_idle,
        )
    holder["port"] = port
    for spec in options.join:
        _join(port, spec)

    stop = stopWhenStdinCloses(reactor)

    reactor.callLater(options.lifetime, stop)
    reactor.callWhenRunning(_emit, "READY", port.getHost().port)
    reactor.run()
    _emit("COUNTERS", json.dumps(_counters(port)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

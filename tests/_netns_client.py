"""
A UDP client for the network-namespace tests: sends queries, waits a bounded
time for each reply, and prints what came back (and from where) as JSON.

Run inside a namespace with C{ip netns exec NS python _netns_client.py QUERIES},
where QUERIES is a JSON list of objects::

    {"host": "10.1.2.3", "port": 12345,   # where to send; "fe80::2%veth1" works
     "connected": true,                   # connect(): a reply from any other
                                          #   address is dropped by the kernel
     "bind": "10.1.2.5",                  # optional local address
     "sourcePort": 40000,                 # optional local port (connected)
     "broadcast": false,                  # set SO_BROADCAST
     "multicastIf": "veth1",              # optional IP(V6)_MULTICAST_IF
     "timeout": 2.0, "payload": "q1"}

It prints one JSON list with, per query: ok, source [host, port] of the reply
(host without scope, the scope id separately), the reply decoded as JSON when
it is JSON, and error when there was no right reply: "timeout", "wrong
source" (a connected query answered from another address, which source
names: the tests' connected client, L{udpdst.check.Probe}, catches it), or
the exception.
"""

from __future__ import annotations

import json
import socket
import sys
import time
from typing import Any

from udpdst.check import Probe, askAll


def _query(spec: dict[str, Any]) -> dict[str, Any]:
    result: dict[str, Any] = {"query": spec, "ok": False, "error": None}
    payload = spec.get("payload", "query").encode()
    try:
        if spec.get("connected", True):
            _askConnected(spec, payload, result)
        else:
            _askUnconnected(spec, payload, result)
    except TimeoutError:
        result["error"] = "timeout"
    except OSError as e:
        result["error"] = f"{type(e).__name__}: {e}"
    return result


def _askConnected(spec: dict[str, Any], payload: bytes, result: dict[str, Any]) -> None:
    """
    Ask from the tests' connected client (L{udpdst.check.Probe}): a reply
    from another source is caught and reported as C{"wrong source"}.
    """
    with Probe(
        spec["host"],
        spec["port"],
        source=spec.get("bind"),
        sourcePort=spec.get("sourcePort", 0),
    ) as probe:
        result["local"] = list(probe.local)
        started = time.monotonic()
        (answer,) = askAll(
            [probe], [payload], spec.get("timeout", 2.0), attempts=1, echoed=False
        )
    if answer is None:
        raise TimeoutError
    host, _, scope = answer.source[0].partition("%")
    _report(result, answer.data, host, answer.source[1], scope, started)
    if not answer.fromTarget:
        result["ok"] = False
        result["error"] = "wrong source"


def _askUnconnected(
    spec: dict[str, Any], payload: bytes, result: dict[str, Any]
) -> None:
    host = spec["host"]
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sockaddr = socket.getaddrinfo(host, spec["port"], family, socket.SOCK_DGRAM)[0][
            4
        ]
        if spec.get("broadcast"):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        if spec.get("multicastIf"):
            ifindex = socket.if_nametoindex(spec["multicastIf"])
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, ifindex)
            else:
                # struct ip_mreqn: group (unused), local address, ifindex.
                mreqn = b"\0" * 8 + ifindex.to_bytes(4, sys.byteorder)
                sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, mreqn)
        if spec.get("bind"):
            bindaddr = socket.getaddrinfo(spec["bind"], 0, family, socket.SOCK_DGRAM)[
                0
            ][4]
            sock.bind(bindaddr)
        sock.sendto(payload, sockaddr)
        result["local"] = list(sock.getsockname()[:2])
        sock.settimeout(spec.get("timeout", 2.0))
        started = time.monotonic()
        data, source = sock.recvfrom(65535)
    scope = (
        socket.if_indextoname(source[3])
        if family == socket.AF_INET6 and source[3]
        else ""
    )
    _report(result, data, source[0].partition("%")[0], source[1], scope, started)


def _report(
    result: dict[str, Any],
    data: bytes,
    host: str,
    port: int,
    scope: str,
    started: float,
) -> None:
    """
    Record a reply: its source (host without scope, the scope id apart) and
    the reply, decoded as JSON when it is JSON.
    """
    result["elapsed"] = round(time.monotonic() - started, 4)
    result["ok"] = True
    result["source"] = [host, port]
    result["sourceScope"] = socket.if_nametoindex(scope) if scope else 0
    try:
        result["reply"] = json.loads(data)
    except ValueError:
        result["reply"] = data.decode("utf-8", "replace")


def main(argv: list[str]) -> int:
    queries = json.loads(argv[0])
    print(json.dumps([_query(q) for q in queries]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""
A UDP client for the network-namespace tests: sends queries, waits a bounded
time for each reply, and prints what came back (and from where) as JSON.

Run inside a namespace with C{ip netns exec NS python _netns_client.py QUERIES},
where QUERIES is a JSON list of objects::

    {"host": "10.1.2.3", "port": 12345,   # where to send; "fe80::2%veth1" works
     "connected": true,                   # connect(): a reply from any other
                                          #   address is dropped by the kernel
     "bind": "10.1.2.5",                  # optional local address
     "broadcast": false,                  # set SO_BROADCAST
     "multicastIf": "veth1",              # optional IP(V6)_MULTICAST_IF
     "timeout": 2.0, "payload": "q1"}

It prints one JSON list with, per query: ok, source [host, port] of the reply
(host without scope, the scope id separately), the reply decoded as JSON when
it is JSON, and error ("timeout" or the exception) when there was no reply.
Standard library only, so it starts fast.
"""

from __future__ import annotations

import json
import socket
import sys
import time
from typing import Any


def _query(spec: dict[str, Any]) -> dict[str, Any]:
    host = spec["host"]
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    result: dict[str, Any] = {"query": spec, "ok": False, "error": None}
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
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
        payload = spec.get("payload", "query").encode()
        if spec.get("connected", True):
            sock.connect(sockaddr)
            sock.send(payload)
        else:
            sock.sendto(payload, sockaddr)
        result["local"] = list(sock.getsockname()[:2])
        sock.settimeout(spec.get("timeout", 2.0))
        started = time.monotonic()
        data, source = sock.recvfrom(65535)
        result["elapsed"] = round(time.monotonic() - started, 4)
        result["ok"] = True
        result["source"] = [source[0].partition("%")[0], source[1]]
        result["sourceScope"] = source[3] if family == socket.AF_INET6 else 0
        try:
            result["reply"] = json.loads(data)
        except ValueError:
            result["reply"] = data.decode("utf-8", "replace")
    except TimeoutError:
        result["error"] = "timeout"
    except OSError as e:
        result["error"] = f"{type(e).__name__}: {e}"
    finally:
        sock.close()
    return result


def main(argv: list[str]) -> int:
    queries = json.loads(argv[0])
    print(json.dumps([_query(q) for q in queries]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""
Load for the hardening tests, run inside a client namespace with
C{ip netns exec NS python _netns_load.py MODE JSON}; it prints one JSON
object with what happened.  Standard library only, so it starts fast.

C{ask}: ask each of C{targets} (C{[host, port]} pairs) in turn from a
connected socket of its own (a reply from any other address is dropped by
the kernel) for C{duration} seconds, each query waiting at most C{wait}
seconds for its answer::

    {"targets": [["10.1.2.2", 12345], ...], "duration": 3.0, "wait": 0.05}
    -> {"10.1.2.2": {"sent": 40, "answered": 38}, ...}

C{flood}: send C{sources} datagrams to C{target}, each from another spoofed
IPv4 source (C{base} + i, a raw socket with our own IP header), in batches
of C{batch}; after each batch a legitimate query from a connected socket,
whose answer (at most C{wait} seconds) is awaited before the next batch, so
the flood never outruns the server::

    {"target": ["10.1.2.2", 12345], "base": "10.200.0.0", "sources": 100000,
     "batch": 100, "wait": 2.0}
    -> {"spoofed": 100000, "asked": 1000, "answered": 1000}

C{spread}: send one datagram to C{target} from each of C{sources} (local
addresses, each bound to a connected socket of its own), all at once, then
wait up to C{wait} seconds for the answers::

    {"target": ["127.0.0.1", 12345], "sources": ["127.0.7.1", ...],
     "wait": 1.0}
    -> {"sent": 254, "answered": ["127.0.7.1", ...]}

C{blast}: keep C{window} numbered datagrams in flight on each of C{sockets}
connected sockets for C{duration} seconds, a new one for each answer::

    {"target": ["127.0.0.2", 12345], "sockets": 4, "window": 32,
     "duration": 180.0, "wait": 2.0}
    -> {"sent": 5000000, "answered": 5000000, "lost": 0}
"""

from __future__ import annotations

import ipaddress
import json
import select
import socket
import struct
import sys
import time
from typing import Any


def _connected(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.connect((host, port))
    return sock


def _answer(sock: socket.socket, payload: bytes, wait: float) -> bool:
    """
    Whether C{sock} receives C{payload} back within C{wait} seconds (older
    answers that come late are skipped).
    """
    deadline = time.monotonic() + wait
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([sock], [], [], left)[0]:
            return False
        try:
            if sock.recv(65535) == payload:
                return True
        except OSError:
            # ICMP unreachable for an address that was just removed.
            return False


def ask(spec: dict[str, Any]) -> dict[str, Any]:
    sockets = [(host, _connected(host, port)) for host, port in spec["targets"]]
    results = {host: {"sent": 0, "answered": 0, "errors": 0} for host, _ in sockets}
    deadline = time.monotonic() + spec["duration"]
    serial = 0
    while time.monotonic() < deadline:
        for host, sock in sockets:
            serial += 1
            payload = b"ask %d" % serial
            try:
                sock.send(payload)
            except OSError:
                results[host]["errors"] += 1
                continue
            results[host]["sent"] += 1
            if _answer(sock, payload, spec["wait"]):
                results[host]["answered"] += 1
    return results


def _checksum(header: bytes) -> int:
    total = sum(struct.unpack("!10H", header))
    total = (total & 0xFFFF) + (total >> 16)
    total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _spoofed(source: bytes, target: bytes, port: int, payload: bytes) -> bytes:
    """
    An IPv4 + UDP datagram from C{source}:40000 to C{target}:C{port}.
    """
    length = 20 + 8 + len(payload)
    header = struct.pack(
        "!BBHHHBBH4s4s",
        0x45,
        0,
        length,
        0,
        0,
        64,
        socket.IPPROTO_UDP,
        0,
        source,
        target,
    )
    header = header[:10] + struct.pack("!H", _checksum(header)) + header[12:]
    udp = struct.pack("!HHHH", 40000, port, 8 + len(payload), 0)
    return header + udp + payload


def flood(spec: dict[str, Any]) -> dict[str, Any]:
    host, port = spec["target"]
    target = socket.inet_aton(host)
    base = int(ipaddress.IPv4Address(spec["base"]))
    raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    raw.setsockopt(socket.IPPROTO_IP, socket.IP_HDRINCL, 1)
    legit = _connected(host, port)
    sent = asked = answered = 0
    while sent < spec["sources"]:
        for _ in range(min(spec["batch"], spec["sources"] - sent)):
            source = (base + sent).to_bytes(4, "big")
            raw.sendto(_spoofed(source, target, port, b"spoofed"), (host, 0))
            sent += 1
        asked += 1
        payload = b"legit %d" % asked
        legit.send(payload)
        answered += _answer(legit, payload, spec["wait"])
    return {"spoofed": sent, "asked": asked, "answered": answered}


def blast(spec: dict[str, Any]) -> dict[str, Any]:
    """
    Keep C{window} datagrams in flight on each of C{sockets} connected
    sockets for C{duration} seconds, each datagram numbered, a new one sent
    for each answer; count what was sent, answered in order, and lost (not
    answered within C{wait} seconds).
    """
    host, port = spec["target"]
    socks = [_connected(host, port) for _ in range(spec["sockets"])]
    for sock in socks:
        sock.setblocking(False)
    payload = b"\0" * spec.get("size", 64)
    nextSeq = [0] * len(socks)
    expected = [0] * len(socks)
    sent = answered = lost = 0

    def send(i: int) -> None:
        nonlocal sent
        socks[i].send(nextSeq[i].to_bytes(8, "big") + payload)
        nextSeq[i] += 1
        sent += 1

    for i in range(len(socks)):
        for _ in range(spec["window"]):
            send(i)
    deadline = time.monotonic() + spec["duration"]
    last = time.monotonic()
    while True:
        now = time.monotonic()
        readable = select.select(socks, [], [], 0.2)[0]
        if not readable and now - last > spec["wait"]:
            # Nothing came back for a while: what is in flight is lost.
            lost += sum(n - e for n, e in zip(nextSeq, expected, strict=True))
            if now >= deadline:
                break
            expected = list(nextSeq)
            for i in range(len(socks)):
                for _ in range(spec["window"]):
                    send(i)
            last = now
            continue
        for sock in readable:
            i = socks.index(sock)
            while True:
                try:
                    data = sock.recv(65535)
                except BlockingIOError:
                    break
                end = len(data) - len(payload)  # after a prefix, if any
                seq = int.from_bytes(data[end - 8 : end], "big")
                if seq >= expected[i]:
                    lost += seq - expected[i]
                    expected[i] = seq + 1
                    answered += 1
                    last = now
                    if now < deadline:
                        send(i)
        if now >= deadline and expected == nextSeq:
            break
    return {"sent": sent, "answered": answered, "lost": lost}


def spread(spec: dict[str, Any]) -> dict[str, Any]:
    host, port = spec["target"]
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sockets: dict[socket.socket, str] = {}
    try:
        for source in spec["sources"]:
            sock = socket.socket(family, socket.SOCK_DGRAM)
            sockets[sock] = source
            sock.bind((source, 0))
            sock.connect((host, port))
        for sock, source in sockets.items():
            sock.send(b"from " + source.encode())
        answered: set[str] = set()
        deadline = time.monotonic() + spec["wait"]
        while len(answered) < len(sockets):
            left = deadline - time.monotonic()
            if left <= 0:
                break
            for sock in select.select(list(sockets), [], [], left)[0]:
                sock.recv(65535)
                answered.add(sockets[sock])
    finally:
        for sock in sockets:
            sock.close()
    return {"sent": len(sockets), "answered": sorted(answered)}


def main(argv: list[str]) -> int:
    mode, spec = argv[0], json.loads(argv[1])
    modes = {"ask": ask, "flood": flood, "blast": blast, "spread": spread}
    print(json.dumps(modes[mode](spec)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

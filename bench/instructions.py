"""
User-space instructions per echoed datagram, counted by valgrind's callgrind:
a figure that does not move with the machine's load, for A/B runs of the
Python and C work of the port (the kernel's share is not counted).

    python bench/instructions.py [--tree LABEL=PATH ...] [VARIANT ...]

VARIANT is C{dst6}, C{dst4}, C{plain4}, C{plain6} or C{echo6} (default: all),
as in C{bench/run.py}.  Each runs in one process: a port on the loopback
(through 127.0.0.2), 4 connected client sockets sending 64 datagrams each per
step with C{sendmmsg}, one C{doRead} pass after another until all are
echoed, the replies drained with C{recvmmsg}.  The script runs it twice under
callgrind, with 2,048 and 10,240 datagrams, and prints the difference per
datagram: start-up cancels out, the client's own share (a few hundred
instructions, the same for every variant) stays in.  C{PYTHONHASHSEED=0}
keeps the count the same from run to run.  Needs valgrind and the C
extension (the client uses it).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

#: variant -> (protocol, interface), as bench/servers.py names them.
VARIANTS = {
    "dst6": ("udpdst-dst", "::"),
    "dst4": ("udpdst-dst", "0.0.0.0"),
    "plain4": ("udpdst-plain", "0.0.0.0"),
    "plain6": ("udpdst-plain", "::"),
    "echo6": ("udpdst-echo", "::"),
}

SMALL, LARGE = 2048, 10240


def workload(variant: str, count: int) -> None:
    """
    Echo C{count} datagrams through one port, in this process.
    """
    sys.path.insert(0, str(ROOT / "bench"))
    from servers import _serviceEcho
    from twisted.internet import reactor
    from twisted.internet.protocol import DatagramProtocol

    import udpdst
    from udpdst import _mmsg  # type: ignore[attr-defined]

    kind, interface = VARIANTS[variant]

    class Echo(DatagramProtocol):
        def datagramReceived(self, data: bytes, addr: object) -> None:
            self.transport.write(data, addr)

    class DestinationEcho(udpdst.DestinationDatagramProtocol):
        def datagramReceived(self, data: bytes, addr: object, dst: object) -> None:
            self.transport.write(data, addr, dst)

    protocol = {
        "udpdst-plain": Echo,
        "udpdst-dst": DestinationEcho,
        "udpdst-echo": lambda: _serviceEcho(reactor),
    }[kind]()
    port = udpdst.listenUDP(
        0, protocol, interface=interface, reactor=reactor, receiveBufferSize=1 << 22
    )
    import socket

    clients = []
    for _ in range(4):
        c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        c.connect(("127.0.0.2", port.getHost().port))
        c.setblocking(False)
        c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
        clients.append(c)
    # Every datagram differs, as in a load test (the echo's loop guard).
    payloads = [b"x" * 56 + i.to_bytes(8, "big") for i in range(count + 256)]
    sent = 0
    while sent < count:
        for c in clients:
            _mmsg.send(c, [(payloads[sent + k], b"", b"") for k in range(64)], 0)
            sent += 64
        target = port.counters.received + 256
        while port.counters.received < target:
            port.doRead()
        for c in clients:
            while _mmsg.recv(c, 64, 2048, 0)[0]:
                pass
    if port.counters.replied != sent:
        raise SystemExit(f"{variant}: {port.counters.replied} of {sent} echoed")


def instructions(variant: str, count: int, tree: Path | None) -> int:
    env = dict(os.environ, PYTHONHASHSEED="0")
    env["PYTHONPATH"] = os.pathsep.join(
        [str(tree or ROOT), env.get("PYTHONPATH", "")]
    ).rstrip(os.pathsep)
    out = subprocess.run(
        [
            "valgrind",
            "--tool=callgrind",
            "--callgrind-out-file=/dev/null",
            sys.executable,
            __file__,
            "--child",
            variant,
            str(count),
        ],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    found = re.search(r"Collected : (\d+)", out.stderr)
    if found is None:
        raise SystemExit(f"no count from callgrind:\n{out.stderr[-2000:]}")
    return int(found.group(1))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    parser.add_argument("variants", nargs="*", metavar="VARIANT")
    parser.add_argument("--tree", action="append", default=[], metavar="LABEL=PATH")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        workload(args.child[0], int(args.child[1]))
        return 0
    unknown = set(args.variants) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variant(s) {', '.join(sorted(unknown))}")
    trees: list[tuple[str, Path | None]] = [("", None)]
    for item in args.tree:
        label, _, path = item.partition("=")
        trees.append((f"@{label}", Path(path).resolve()))
    for variant in args.variants or list(VARIANTS):
        for label, tree in trees:
            small = instructions(variant, SMALL, tree)
            large = instructions(variant, LARGE, tree)
            perDatagram = (large - small) / (LARGE - SMALL)
            print(f"{variant + label:<16} {perDatagram:8.0f} instructions/datagram")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""
Write to C{("<broadcast>", port)} from Twisted's UDP port and from udpdst's,
inside a namespace whose only link is C{lo}, for tests/test_broadcast.py;
print what happened as one JSON object.

    ip netns exec NS python _broadcast_netns.py

For each port (C{"twisted"}, C{"udpdst"}) on each interface (C{127.0.0.1},
and the wildcard), two writes to a receiver bound to C{0.0.0.0}: one before
C{setBroadcastAllowed(True)} and one after.  For each write: what C{write}
raised (C{null} or an errno name), what the receiver got (C{null} or its
data, source host and the destination the kernel reports), and udpdst's
C{sendErrors} count.
"""

from __future__ import annotations

import errno
import json
import socket
import struct
from typing import Any

_IN_PKTINFO = struct.Struct("=i4s4s")
_IP_PKTINFO = 8


def receive(receiver: socket.socket) -> dict[str, Any] | None:
    try:
        data, ancdata, _, source = receiver.recvmsg(100, 256)
    except TimeoutError:
        return None
    destination = None
    for level, kind, payload in ancdata:
        if (level, kind) == (socket.IPPROTO_IP, _IP_PKTINFO):
            destination = socket.inet_ntoa(_IN_PKTINFO.unpack(payload)[2])
    return {"data": data.decode(), "source": source[0], "destination": destination}


def attempt(port: Any, receiver: socket.socket, data: bytes) -> dict[str, Any]:
    raised = None
    try:
        port.write(data, ("<broadcast>", receiver.getsockname()[1]))
    except OSError as e:
        raised = errno.errorcode.get(e.errno or 0, str(e))
    counters = getattr(port, "counters", None)
    return {
        "raised": raised,
        # Nothing is sent at all without SO_BROADCAST: the timeout bounds
        # the wait for what cannot come.
        "received": receive(receiver),
        "sendErrors": None if counters is None else counters.sendErrors,
    }


def main() -> None:
    from twisted.internet import reactor
    from twisted.internet.protocol import DatagramProtocol

    import udpdst
    from udpdst.port import IO_PATH

    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    receiver.setsockopt(socket.IPPROTO_IP, _IP_PKTINFO, 1)
    receiver.bind(("0.0.0.0", 0))
    receiver.settimeout(1.0)
    results: dict[str, Any] = {"ioPath": IO_PATH}
    listeners = {"twisted": reactor.listenUDP, "udpdst": udpdst.listenUDP}
    for kind, listen in listeners.items():
        for interface in ("127.0.0.1", ""):
            port = listen(0, DatagramProtocol(), interface=interface)
            denied = attempt(port, receiver, b"denied")
            port.setBroadcastAllowed(True)
            allowed = attempt(port, receiver, b"hello")
            results[f"{kind} {interface or '*'}"] = {
                "class": type(port).__name__,
                "denied": denied,
                "allowed": allowed,
            }
            port.stopListening()
    print(json.dumps(results))


if __name__ == "__main__":
    main()

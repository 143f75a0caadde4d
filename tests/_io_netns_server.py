"""
An echo server for tests/test_io_netns.py: a plain protocol on udpdst's port
that replies, after a short delay, either to the address it was given or to
one it rebuilt from text (C{("fe80::5%veth0", 5353)}), so both ways a reply
finds its interface are exercised.  Speaks what L{tests.netns.ServerProcess}
reads: C{READY port}, then C{COUNTERS json} when stdin closes.

    python _io_netns_server.py given|rebuilt|burst

C{burst} answers each datagram at once with 300 small replies, to fill a
small queue on the way out.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from tests.netns import stopWhenStdinCloses


def main(mode: str) -> None:
    from twisted.internet import reactor
    from twisted.internet.protocol import DatagramProtocol

    import udpdst

    class Echo(DatagramProtocol):
        def datagramReceived(self, data: bytes, addr: Any) -> None:
            if mode == "burst":
                for i in range(300):
                    self.transport.write(b"%d" % i, addr)
                return
            target = (str(addr[0]), int(addr[1])) if mode == "rebuilt" else addr
            reply = json.dumps({"peer": addr[0]}).encode()
            # Later, as a resolver would: the dispatch is over by then.
            reactor.callLater(0.01, self.transport.write, reply, target)

    port = udpdst.listenUDP(0, Echo(), "::", reactor=reactor)

    stop = stopWhenStdinCloses(reactor)
    reactor.callLater(120, stop)
    reactor.callWhenRunning(print, "READY", port.getHost().port, flush=True)
    reactor.run()
    print("COUNTERS", json.dumps(port.counters.asDict()), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])

"""
An echo that knows where each datagram was sent to: python aware.py [PORT]
(12345 by default).  Try it with nc -u 127.0.0.2 PORT.
"""

import sys

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorFDSet
from twisted.internet.task import react

import udpdst
from udpdst import Destination, PeerAddress


class Aware(udpdst.DestinationDatagramProtocol):
    def datagramReceived(
        self, data: bytes, addr: PeerAddress, dst: Destination | None
    ) -> None:
        # dst: Destination(host='127.0.0.2', port=12345, ifindex=1, replyFrom='127.0.0.2')
        where = dst.host if dst is not None else "?"
        self.transport.write(f"{where} got ".encode() + data, addr, dst)


def main(reactor: IReactorFDSet, port: int) -> Deferred[None]:
    udpdst.listenUDP(port, Aware(), interface="::", reactor=reactor)
    print(f"echoing on [::]:{port}", flush=True)
    return Deferred()  # serve until stopped


if __name__ == "__main__":
    react(main, [int(sys.argv[1]) if len(sys.argv) > 1 else 12345])

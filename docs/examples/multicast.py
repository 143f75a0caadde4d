"""
A destination-aware echo on the mDNS groups of one interface, IPv4 and IPv6:
python multicast.py INTERFACE [PORT] (5353 by default).
"""

import sys

from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.interfaces import IReactorFDSet
from twisted.internet.task import react

import udpdst
from udpdst import Destination, PeerAddress


class Echo(udpdst.DestinationDatagramProtocol):
    def datagramReceived(
        self, data: bytes, addr: PeerAddress, dst: Destination | None
    ) -> None:
        # To a group, dst.host is the group; the reply leaves from a unicast
        # address of the receiving interface.
        self.transport.write(data, addr, dst)


def main(reactor: IReactorFDSet, interface: str, port: int) -> Deferred[None]:
    listening = udpdst.listenMulticast(
        port, Echo(), interface="::", reactor=reactor, listenMultiple=True
    )
    groups = ("224.0.0.251", "ff02::fb")
    joined = gatherResults([listening.joinGroup(g, interface) for g in groups])

    def serve(_: object) -> Deferred[None]:
        print(f"joined {', '.join(groups)} on {interface}, port {port}", flush=True)
        return Deferred()  # serve until stopped

    return joined.addCallback(serve)


if __name__ == "__main__":
    react(main, [sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 5353])

"""
Twisted's own DNS server, unchanged, answering from the address it was asked
at: python dns_server.py [PORT] (10053 by default), with zone.py beside it.
"""

import sys

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorFDSet
from twisted.internet.task import react
from twisted.names import authority, dns, server

import udpdst


def dnsServer() -> dns.DNSDatagramProtocol:
    # An existing DatagramProtocol, unchanged.
    zone = authority.PySourceAuthority("zone.py")
    return dns.DNSDatagramProtocol(server.DNSServerFactory(authorities=[zone]))


def main(reactor: IReactorFDSet, port: int) -> Deferred[None]:
    udpdst.listenUDP(port, dnsServer(), interface="::", reactor=reactor)
    print(f"serving example.com on [::]:{port}", flush=True)
    return Deferred()  # serve until stopped


if __name__ == "__main__":
    react(main, [int(sys.argv[1]) if len(sys.argv) > 1 else 10053])

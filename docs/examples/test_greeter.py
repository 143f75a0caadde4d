"""
Testing a protocol without sockets: python -m pytest test_greeter.py
"""

import udpdst
from udpdst import Destination, PeerAddress
from udpdst.testing import FakeDestinationTransport, peer


class Greeter(udpdst.DestinationDatagramProtocol):
    def datagramReceived(
        self, data: bytes, addr: PeerAddress, dst: Destination | None
    ) -> None:
        self.transport.write(b"hello " + data, addr, dst)


def test_repliesFromTheAddressAsked() -> None:
    transport = FakeDestinationTransport(Greeter())  # startProtocol runs
    transport.deliver(b"you", peer("10.0.0.5", 40000, "10.1.2.3:12345"))
    assert transport.written == [
        (
            b"hello you",
            ("10.0.0.5", 40000),
            Destination("10.1.2.3", 12345, 0, "10.1.2.3"),
        )
    ]
    assert transport.counters.replied == 1

# A stock .tac: twistd -n --pidfile= --reactor udpdst -y unchanged.tac
# and its replies leave from the address each datagram was sent to.
import os

from twisted.application import internet, service
from twisted.internet.protocol import DatagramProtocol


class Echo(DatagramProtocol):
    def datagramReceived(self, data: bytes, addr: tuple[str, int]) -> None:
        if self.transport is not None:  # None only once the port has stopped
            self.transport.write(data, addr)


application = service.Application("echo")
port = int(os.environ.get("ECHO_PORT", "7007"))
internet.UDPServer(port, Echo()).setServiceParent(application)

# twistd -n --pidfile= -y dns.tac  (zone.py beside it; DNS_PORT, default 10053)
import os

from twisted.application import service
from twisted.names import authority, dns, server

import udpdst

zone = authority.PySourceAuthority("zone.py")
protocol = dns.DNSDatagramProtocol(server.DNSServerFactory(authorities=[zone]))
port = int(os.environ.get("DNS_PORT", "10053"))

application = service.Application("dns")
# udpdst.UDPServer in place of Twisted's internet.UDPServer.
udpdst.UDPServer(port, protocol, interface="::").setServiceParent(application)

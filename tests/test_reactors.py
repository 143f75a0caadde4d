"""
C{twistd --reactor udpdst...} runs unchanged twistd plugins and C{.tac}
files with udpdst's ports: real twistd subprocesses, asked through secondary
loopback addresses by connected clients and by dig.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from twisted.names import dns

from tests._service_helpers import REPO, TWISTD, freePort, twistd
from tests.clients import echo, replyOrNone
from tests.conftest import requiresIPv6

ZONE = """
zone = [
    SOA('example.test', mname='ns1.example.test', rname='hostmaster.example.test',
        serial=1, refresh=3600, retry=600, expire=86400, minimum=300),
    A('www.example.test', '192.0.2.80'),
]
"""

ECHO_TAC = """
from twisted.application import internet, service
from twisted.internet.protocol import DatagramProtocol


class Echo(DatagramProtocol):
    def datagramReceived(self, data, addr):
        self.transport.write(b"tac " + data, addr)


application = service.Application("echo")
internet.{server}({port}, Echo(), interface={interface!r}).setServiceParent(
    application
)
"""


ADOPT_TAC = """
import socket

from twisted.application import service
from twisted.internet import reactor
from twisted.internet.protocol import DatagramProtocol


class Echo(DatagramProtocol):
    def datagramReceived(self, data, addr):
        self.transport.write(b"tac " + data, addr)


class Adopt(service.Service):
    def privilegedStartService(self):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind(("", {port}))
            self.port = reactor.adoptDatagramPort(s.fileno(), socket.AF_INET, Echo())


application = service.Application("echo")
Adopt().setServiceParent(application)
"""


def dnsQuery(ident: int) -> bytes:
    message = dns.Message(id=ident, recDes=True)
    message.addQuery(b"www.example.test", dns.A)
    return message.toStr()  # type: ignore[no-any-return]


def readDNS(reply: bytes | None) -> list[str] | None:
    """
    The A records in a reply to L{dnsQuery}, or L{None} for no reply.
    """
    if reply is None:
        return None
    message = dns.Message()
    message.fromStr(reply)
    assert message.id == 42
    return [a.payload.dottedQuad() for a in message.answers if a.type == dns.A]


def askDNS(host: str, port: int, timeout: float = 10.0) -> list[str] | None:
    """
    The A records for www.example.test that a client connected to C{host}
    gets, or L{None}.

    @raise AssertionError: The reply came from another address.
    """
    try:
        return readDNS(echo(host, port, dnsQuery(42), timeout=timeout))
    except TimeoutError:
        return None


@contextmanager
def dnsServer(tmp: Path, reactor: str | None, interface: str) -> Iterator[int]:
    """
    Run C{twistd -n [--reactor R] dns --pyzone ZONE} until it answers
    through the loopback address of its family; yield its port.
    """
    zone = tmp / "zone.py"
    zone.write_text(ZONE)
    port = freePort("::", tcp=True)
    args = [] if reactor is None else ["--reactor", reactor]
    args += ["dns", "--pyzone", str(zone), "--port", str(port)]
    if interface:
        args += ["--interface", interface]
    primary = "::1" if interface == "::" else "127.0.0.1"
    with twistd(tmp, *args) as server:
        server.waitAnswering(
            lambda: readDNS(replyOrNone(primary, port, dnsQuery(42), 0.5))
        )
        yield port


def test_helpReactorsListsThem() -> None:
    """
    C{twistd --help-reactors} lists each udpdst reactor with one line.
    """
    out = subprocess.run(
        [TWISTD, "--help-reactors"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        check=True,
    ).stdout
    listed = {line.split()[0]: line for line in out.splitlines() if "udpdst" in line}
    assert set(listed) == {"udpdst", "udpdst-asyncio", "udpdst-poll", "udpdst-select"}
    assert "epoll reactor" in listed["udpdst"]
    assert "asyncio reactor" in listed["udpdst-asyncio"]


@pytest.mark.parametrize(
    "reactor", ["udpdst", "udpdst-asyncio", "udpdst-poll", "udpdst-select"]
)
def test_twistdDNSThroughSecondaryAddresses(tmp_path: Path, reactor: str) -> None:
    """
    C{twistd dns} on 0.0.0.0 under a udpdst reactor answers clients connected
    to 127.0.0.2 and 127.0.0.3.
    """
    with dnsServer(tmp_path, reactor, "") as port:
        assert askDNS("127.0.0.2", port) == ["192.0.2.80"]
        assert askDNS("127.0.0.3", port) == ["192.0.2.80"]


@requiresIPv6
def test_twistdDNSDualStack(tmp_path: Path) -> None:
    """
    C{twistd dns --interface ::} under C{--reactor udpdst}: one dual-stack
    socket answers ::1 and 127.0.0.2.
    """
    with dnsServer(tmp_path, "udpdst", "::") as port:
        assert askDNS("::1", port) == ["192.0.2.80"]
        assert askDNS("127.0.0.2", port) == ["192.0.2.80"]


def test_stockTwistdDNSFailsThroughSecondaryAddress(tmp_path: Path) -> None:
    """
    The same command without C{--reactor udpdst} answers 127.0.0.1 (it is
    up), but answers a query to 127.0.0.2 from 127.0.0.1, which a connected
    client drops: the bug udpdst fixes.
    """
    with dnsServer(tmp_path, None, "") as port:
        with pytest.raises(AssertionError, match=f"came from 127.0.0.1:{port}"):
            askDNS("127.0.0.2", port)
        assert askDNS("127.0.0.1", port) == ["192.0.2.80"]


DIG = shutil.which("dig")


@pytest.mark.skipif(
    DIG is None,
    reason="dig is not installed (apt package bind9-dnsutils; tests/run "
    "installs it as root)",
)
@pytest.mark.parametrize(
    "interface, targets",
    [
        ("", ["127.0.0.2", "127.0.0.3"]),
        pytest.param("::", ["::1", "127.0.0.3"], marks=requiresIPv6),
    ],
)
def test_digThroughSecondaryAddresses(
    tmp_path: Path, interface: str, targets: list[str]
) -> None:
    """
    dig, which rejects a reply from an address it did not ask, gets the
    answer from C{twistd --reactor udpdst dns}.
    """
    assert DIG is not None
    with dnsServer(tmp_path, "udpdst", interface) as port:
        for target in targets:
            out = subprocess.run(
                [DIG, f"@{target}", "-p", str(port), "+short", "+time=5", "+tries=2"]
                + ["www.example.test", "A"],
                capture_output=True,
                text=True,
                timeout=30,
            )
            assert out.stdout.split() == ["192.0.2.80"], (target, out)


@pytest.mark.parametrize(
    "server, reactor, interface, target",
    [
        ("UDPServer", "udpdst", "", "127.0.0.2"),
        ("UDPServer", "udpdst-asyncio", "", "127.0.0.3"),
        pytest.param("UDPServer", "udpdst", "::", "127.0.0.2", marks=requiresIPv6),
        ("MulticastServer", "udpdst", "", "127.0.0.3"),
    ],
)
def test_stockTac(
    tmp_path: Path, server: str, reactor: str, interface: str, target: str
) -> None:
    """
    An unchanged C{.tac} with C{internet.UDPServer} (or C{MulticastServer},
    which calls C{reactor.listenMulticast}) and a plain C{DatagramProtocol},
    under C{twistd -ny app.tac --reactor udpdst}, answers a client connected
    to a secondary address.
    """
    port = freePort("::")
    tac = tmp_path / "app.tac"
    tac.write_text(ECHO_TAC.format(server=server, port=port, interface=interface))
    primary = "::1" if interface == "::" else "127.0.0.1"
    with twistd(tmp_path, "--reactor", reactor, "-y", str(tac)) as process:
        process.waitAnswering(
            lambda: replyOrNone(primary, port, b"up?", 0.5) == b"tac up?"
        )
        reply = echo(target, port, b"hello", timeout=10.0)
        assert reply == b"tac hello", process.output()
        # One line says the reactor's ports are udpdst's.
        (line,) = [
            line
            for line in process.output().splitlines()
            if "destination-aware UDP ports are on" in line
        ]
        assert f"(--reactor {reactor}: Twisted's " in line, line


def test_stockTacAdoptingASocket(tmp_path: Path) -> None:
    """
    A C{.tac} that hands a bound socket to C{reactor.adoptDatagramPort}, under
    C{--reactor udpdst}, answers through 127.0.0.3.
    """
    port = freePort("::")
    tac = tmp_path / "app.tac"
    tac.write_text(ADOPT_TAC.format(port=port))
    with twistd(tmp_path, "--reactor", "udpdst", "-y", str(tac)) as process:
        process.waitAnswering(
            lambda: replyOrNone("127.0.0.1", port, b"up?", 0.5) == b"tac up?"
        )
        reply = echo("127.0.0.3", port, b"hello", timeout=10.0)
        assert reply == b"tac hello", process.output()

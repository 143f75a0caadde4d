"""
C{twistd --reactor udpdst...} runs unchanged twistd plugins and C{.tac}
files with udpdst's ports: real twistd subprocesses, asked through secondary
loopback addresses by connected clients and by dig.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from twisted.names import dns

from tests.conftest import requiresIPv6

TWISTD = [str(Path(sys.executable).with_name("twistd"))]
REPO = Path(__file__).resolve().parent.parent

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
internet.UDPServer({port}, Echo(), interface={interface!r}).setServiceParent(
    application
)
"""

#: Bound on waiting for a twistd subprocess to answer at all.
START_TIMEOUT = 30.0


def freePort() -> int:
    """
    A port free for both UDP and TCP on every loopback address (twistd dns
    listens on both); bound to the wildcards so nothing else holds it.
    """
    while True:
        with (
            socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as u,
            socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as t,
        ):
            u.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            t.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            u.bind(("::", 0))
            port: int = u.getsockname()[1]
            try:
                t.bind(("::", port))
            except OSError:
                continue
            return port


def dnsQuery(ident: int) -> bytes:
    message = dns.Message(id=ident, recDes=True)
    message.addQuery(b"www.example.test", dns.A)
    return message.toStr()  # type: ignore[no-any-return]


def askConnected(host: str, port: int, payload: bytes, timeout: float) -> bytes | None:
    """
    Send C{payload} from a socket connected to C{host}: the kernel drops a
    reply from any other address.  Return the reply, or L{None} on timeout.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.connect((host, port))
        s.settimeout(timeout)
        s.send(payload)
        try:
            return s.recv(65535)
        except (TimeoutError, ConnectionRefusedError):
            return None


def askDNS(host: str, port: int, timeout: float = 10.0) -> list[str] | None:
    """
    The A records a connected client gets for www.example.test, or L{None}.
    """
    reply = askConnected(host, port, dnsQuery(42), timeout)
    if reply is None:
        return None
    message = dns.Message()
    message.fromStr(reply)
    assert message.id == 42
    return [a.payload.dottedQuad() for a in message.answers if a.type == dns.A]


class Twistd:
    """
    A C{twistd -n} subprocess in a scratch directory; L{stop} ends it by
    its own PID.
    """

    def __init__(self, cwd: Path, args: list[str]) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(REPO), env.get("PYTHONPATH", "")) if p
        )
        self.argv = [*TWISTD, "-n", "--pidfile=", *args]
        self.logPath = cwd / "twistd.out"
        self._log = self.logPath.open("w")
        self.proc = subprocess.Popen(
            self.argv,
            cwd=cwd,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
        )

    def output(self) -> str:
        self._log.flush()
        return self.logPath.read_text()

    def waitAnswering(self, ask: Callable[[], object]) -> None:
        """
        Wait (bounded) until C{ask()} gets an answer: the server is up.
        """
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"{self.argv} exited ({self.proc.returncode}):\n{self.output()}"
                )
            if ask():
                return
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{self.argv} did not answer in {START_TIMEOUT}s:\n{self.output()}"
                )

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=15)
        self._log.close()


RunTwistd = Callable[..., Twistd]


@pytest.fixture
def runTwistd(tmp_path: Path) -> Iterator[RunTwistd]:
    started: list[Twistd] = []

    def run(*args: str) -> Twistd:
        twistd = Twistd(tmp_path, list(args))
        started.append(twistd)
        return twistd

    yield run
    for twistd in started:
        twistd.stop()


def startDNS(
    runTwistd: RunTwistd, tmp: Path, reactor: str | None, interface: str
) -> tuple[Twistd, int]:
    """
    C{twistd -n [--reactor R] dns --pyzone ZONE}, answering through the
    loopback address of its own family.
    """
    zone = tmp / "zone.py"
    zone.write_text(ZONE)
    port = freePort()
    args = [] if reactor is None else ["--reactor", reactor]
    args += ["dns", "--pyzone", str(zone), "--port", str(port)]
    if interface:
        args += ["--interface", interface]
    server = runTwistd(*args)
    primary = "::1" if interface == "::" else "127.0.0.1"
    server.waitAnswering(lambda: askDNS(primary, port, timeout=0.5))
    return server, port


def test_helpReactorsListsThem() -> None:
    """
    C{twistd --help-reactors} lists each udpdst reactor with one line.
    """
    out = subprocess.run(
        [*TWISTD, "--help-reactors"],
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


@pytest.mark.parametrize("reactor", ["udpdst", "udpdst-asyncio"])
def test_twistdDNSThroughSecondaryAddresses(
    runTwistd: RunTwistd, tmp_path: Path, reactor: str
) -> None:
    """
    C{twistd dns} on 0.0.0.0 under a udpdst reactor answers clients connected
    to 127.0.0.2 and 127.0.0.3.
    """
    _, port = startDNS(runTwistd, tmp_path, reactor, "")
    assert askDNS("127.0.0.2", port) == ["192.0.2.80"]
    assert askDNS("127.0.0.3", port) == ["192.0.2.80"]


@requiresIPv6
def test_twistdDNSDualStack(runTwistd: RunTwistd, tmp_path: Path) -> None:
    """
    C{twistd dns --interface ::} under C{--reactor udpdst}: one dual-stack
    socket answers ::1 and 127.0.0.2.
    """
    _, port = startDNS(runTwistd, tmp_path, "udpdst", "::")
    assert askDNS("::1", port) == ["192.0.2.80"]
    assert askDNS("127.0.0.2", port) == ["192.0.2.80"]


def test_stockTwistdDNSFailsThroughSecondaryAddress(
    runTwistd: RunTwistd, tmp_path: Path
) -> None:
    """
    The same command without C{--reactor udpdst} answers 127.0.0.1 (it is
    up) but not a client connected to 127.0.0.2: the bug udpdst fixes.
    """
    _, port = startDNS(runTwistd, tmp_path, None, "")
    assert askDNS("127.0.0.2", port, timeout=3.0) is None
    assert askDNS("127.0.0.1", port) == ["192.0.2.80"]


DIG = shutil.which("dig")


@pytest.mark.skipif(
    DIG is None,
    reason="dig is not installed (apt package bind9-dnsutils; tests/run installs it as root)",
)
@pytest.mark.parametrize(
    "interface, targets",
    [
        ("", ["127.0.0.2", "127.0.0.3"]),
        pytest.param("::", ["::1", "127.0.0.3"], marks=requiresIPv6),
    ],
)
def test_digThroughSecondaryAddresses(
    runTwistd: RunTwistd, tmp_path: Path, interface: str, targets: list[str]
) -> None:
    """
    dig, which rejects a reply from an address it did not ask, gets the
    answer from C{twistd --reactor udpdst dns}.
    """
    assert DIG is not None
    _, port = startDNS(runTwistd, tmp_path, "udpdst", interface)
    for target in targets:
        out = subprocess.run(
            [
                DIG,
                f"@{target}",
                "-p",
                str(port),
                "+short",
                "+time=3",
                "+tries=2",
                "www.example.test",
                "A",
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert out.stdout.split() == ["192.0.2.80"], (target, out.stdout, out.stderr)


@pytest.mark.parametrize(
    "reactor, interface, target",
    [
        ("udpdst", "", "127.0.0.2"),
        ("udpdst-asyncio", "", "127.0.0.3"),
        pytest.param("udpdst", "::", "127.0.0.2", marks=requiresIPv6),
    ],
)
def test_stockTacWithUDPServer(
    runTwistd: RunTwistd, tmp_path: Path, reactor: str, interface: str, target: str
) -> None:
    """
    An unchanged C{.tac} with C{internet.UDPServer} and a plain
    C{DatagramProtocol}, under C{twistd -ny app.tac --reactor udpdst},
    answers a client connected to a secondary address.
    """
    port = freePort()
    tac = tmp_path / "app.tac"
    tac.write_text(ECHO_TAC.format(port=port, interface=interface))
    server = runTwistd("--reactor", reactor, "-y", str(tac))
    primary = "::1" if interface == "::" else "127.0.0.1"
    server.waitAnswering(lambda: askConnected(primary, port, b"up?", 0.5) == b"tac up?")
    reply = askConnected(target, port, b"hello", 10.0)
    assert reply == b"tac hello", server.output()

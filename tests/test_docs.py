"""
The documentation's examples, as a user copies them: every file under
docs/examples/ is included by a page (not copied into it), type-checks under
mypy (strict about untyped code, with and without the mypy_zope plugin), and
runs alone, in a folder of its own, with real sockets: each script, C{.tac}
and test file as its page says to run it.  The README's example is the same
file, and every C{twistd -n} the docs show has C{--pidfile=}.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from twisted.names import dns

from tests._service_helpers import DEADLINE, REPO, TWISTD, Twistd, freePort
from tests.clients import echo, replyOrNone
from tests.conftest import requiresIPv6
from tests.netns import Namespace, unavailableReason

DOCS = REPO / "docs"
EXAMPLES = DOCS / "examples"

#: Read by Twisted's zone loader, not imported: no module to type-check.
NOT_MODULES = {"zone.py"}

#: Stock Twisted code: its C{DatagramProtocol.transport} is an interface
#: type, whose methods mypy understands only with the mypy_zope plugin.
STOCK_TWISTED = {"unchanged.tac"}


def pages() -> list[Path]:
    return [REPO / "README.md", *sorted(DOCS.glob("*.md"))]


def included() -> set[str]:
    """
    The example files the pages include, by name.
    """
    found = set()
    for page in DOCS.glob("*.md"):
        for target in re.findall(
            r"^```\{literalinclude\} (\S+)$", page.read_text(), re.M
        ):
            path = (DOCS / target).resolve()
            assert path.is_file(), f"{page.name} includes {target}, which is missing"
            if path.parent == EXAMPLES:
                found.add(path.name)
    return found


def test_everyExampleIsIncluded() -> None:
    examples = {p.name for p in EXAMPLES.iterdir() if p.is_file()}
    assert examples, "no examples found"
    assert included() == examples


def test_readmeExampleIsTheFile() -> None:
    """
    GitHub cannot include a file: the README's one Python block is
    docs/examples/aware.py, to the byte.
    """
    text = (REPO / "README.md").read_text()
    (block,) = re.findall(r"^```python\n(.*?)^```$", text, re.M | re.S)
    assert block == (EXAMPLES / "aware.py").read_text()


def test_twistdInTheForegroundWritesNoPidFile() -> None:
    """
    Two of the docs' C{twistd -n} commands run from one folder must not
    clash over C{twistd.pid}.
    """
    for page in pages():
        for line in page.read_text().splitlines():
            if re.search(r"\btwistd (-n|--nodaemon)\b", line):
                assert "--pidfile=" in line, f"{page.name}: {line}"


def test_examplesAreWhatUsersWrite() -> None:
    """
    The destination-aware examples override C{datagramReceived(self, data,
    addr, dst)} and reply with C{self.transport.write(data, addr, dst)}, with
    no escape hatch.
    """
    for name in ("aware.py", "multicast.py", "test_greeter.py"):
        source = (EXAMPLES / name).read_text()
        assert "self, data: bytes, addr: PeerAddress, dst: Destination | None" in source
        assert "self.transport.write(" in source and "addr, dst)" in source
    for path in EXAMPLES.iterdir():
        source = path.read_text()
        assert "type: ignore" not in source, path.name
        assert not re.search(r"\bcast\(", source), path.name


@pytest.mark.parametrize("plugin", [True, False], ids=["mypy_zope", "no-plugin"])
def test_examplesTypeCheck(
    tmp_path: Path, plugin: bool, request: pytest.FixtureRequest
) -> None:
    pytest.importorskip(
        "mypy", reason="mypy is in the test extra; pip install -e '.[test]'"
    )
    # mypy checks .py files: each .tac is checked under a .py name.
    files = []
    for path in sorted(EXAMPLES.iterdir()):
        if path.name in NOT_MODULES or (path.name in STOCK_TWISTED and not plugin):
            continue
        copy = tmp_path / (
            path.stem + "_tac.py" if path.suffix == ".tac" else path.name
        )
        shutil.copy(path, copy)
        files.append(str(copy))
    config = tmp_path / "mypy.ini"
    config.write_text("[mypy]\n" + ("plugins = mypy_zope:plugin\n" if plugin else ""))
    # pytest's cache keeps mypy's warm between runs; without it, a fresh one.
    store = getattr(request.config, "cache", None)
    name = f"docs-mypy-{plugin}"
    cache = store.mkdir(name) if store is not None else tmp_path / name
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--config-file",
            str(config),
            "--cache-dir",
            str(cache),
            "--disallow-untyped-defs",
            "--check-untyped-defs",
            # A NoReturn call must not hide the code after it.
            "--warn-unreachable",
            *files,
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"Success: no issues found in {len(files)} source files" in result.stdout


# Running them, each in a folder of its own


def copied(tmp: Path, *names: str) -> Path:
    """
    A folder holding only the named examples, as a user copies them.
    """
    folder = tmp / "user"
    folder.mkdir()
    for name in names:
        shutil.copy(EXAMPLES / name, folder / name)
    return folder


def environment(**extra: str) -> dict[str, str]:
    """
    The environment of a user's shell with udpdst installed: the checkout is
    importable (as an install makes it) and nothing else is added.
    """
    env = dict(os.environ, **extra)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO), env.get("PYTHONPATH", "")) if p
    )
    return env


@contextmanager
def running(command: list[str], cwd: Path, **extra: str) -> Iterator[Twistd]:
    process = Twistd((), cwd, command=command, env=environment(**extra))
    try:
        yield process
    finally:
        process.stop()


def query(ident: int) -> bytes:
    message = dns.Message(id=ident, recDes=False)
    message.addQuery(b"example.com", dns.A)
    return message.toStr()


def answers(reply: bytes | None) -> list[str] | None:
    if reply is None:
        return None
    message = dns.Message()
    message.fromStr(reply)
    return [a.payload.dottedQuad() for a in message.answers if a.type == dns.A]


def test_dnsServer(tmp_path: Path) -> None:
    """
    python dns_server.py PORT, zone.py beside it: the zone's answer through
    a secondary loopback address, from that address.
    """
    folder = copied(tmp_path, "dns_server.py", "zone.py")
    port = freePort("::")
    with running([sys.executable, "dns_server.py", str(port)], folder) as server:
        server.waitFor("serving example.com")
        server.waitAnswering(
            lambda: answers(replyOrNone("127.0.0.1", port, query(1), 0.5))
        )
        assert answers(echo("127.0.0.2", port, query(2))) == ["192.0.2.1"]


@requiresIPv6
def test_dnsServerIPv6(tmp_path: Path) -> None:
    folder = copied(tmp_path, "dns_server.py", "zone.py")
    port = freePort("::")
    with running([sys.executable, "dns_server.py", str(port)], folder) as server:
        server.waitAnswering(lambda: answers(replyOrNone("::1", port, query(1), 0.5)))
        assert answers(echo("::1", port, query(2))) == ["192.0.2.1"]


def test_dnsTac(tmp_path: Path) -> None:
    """
    twistd -n --pidfile= -y dns.tac, zone.py beside it, DNS_PORT set.
    """
    folder = copied(tmp_path, "dns.tac", "zone.py")
    port = freePort("::")
    command = [TWISTD, "-n", "--pidfile=", "-y", "dns.tac"]
    with running(command, folder, DNS_PORT=str(port)) as server:
        server.waitAnswering(
            lambda: answers(replyOrNone("127.0.0.1", port, query(1), 0.5))
        )
        assert answers(echo("127.0.0.3", port, query(2))) == ["192.0.2.1"]


def test_aware(tmp_path: Path) -> None:
    """
    python aware.py PORT: the reply names the address asked, and comes from
    it.
    """
    folder = copied(tmp_path, "aware.py")
    port = freePort("::")
    with running([sys.executable, "aware.py", str(port)], folder) as server:
        server.waitFor("echoing on")
        server.waitAnswering(lambda: replyOrNone("127.0.0.1", port, b"up?", 0.5))
        assert echo("127.0.0.2", port, b"hi") == b"127.0.0.2 got hi"
        assert echo("127.0.0.3", port, b"hi") == b"127.0.0.3 got hi"


def test_unchangedTac(tmp_path: Path) -> None:
    """
    twistd -n --pidfile= --reactor udpdst -y unchanged.tac: the stock
    C{.tac} answers through a secondary address, and the log says udpdst's
    ports are on.
    """
    folder = copied(tmp_path, "unchanged.tac")
    port = freePort("::")
    command = [TWISTD, "-n", "--pidfile=", "--reactor", "udpdst", "-y", "unchanged.tac"]
    with running(command, folder, ECHO_PORT=str(port)) as server:
        server.waitAnswering(lambda: replyOrNone("127.0.0.1", port, b"up?", 0.5))
        assert echo("127.0.0.2", port, b"hi") == b"hi"
        server.waitFor("destination-aware UDP ports are on")


def test_greeter(tmp_path: Path) -> None:
    """
    python -m pytest test_greeter.py, alone in its folder: one test, passed.
    """
    folder = copied(tmp_path, "test_greeter.py")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "test_greeter.py",
        ],
        cwd=folder,
        env=environment(),
        capture_output=True,
        text=True,
        timeout=DEADLINE,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 passed" in result.stdout


#: Sends to the IPv4 mDNS group through lo, from 127.0.0.1, and prints the
#: reply and where it came from.
MULTICAST_CLIENT = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("127.0.0.1", 0))
s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton("127.0.0.1"))
s.settimeout(float(sys.argv[2]))
for _ in range(3):
    s.sendto(b"anyone?", ("224.0.0.251", int(sys.argv[1])))
    try:
        data, source = s.recvfrom(100)
    except TimeoutError:
        continue
    print(data.decode(), source[0], source[1])
    break
"""


def test_multicast(tmp_path: Path) -> None:
    """
    python multicast.py lo PORT in a network namespace of its own: it joins
    both groups, and a datagram to the IPv4 group is answered from a
    unicast address of the interface.
    """
    reason = unavailableReason()
    if reason is not None:
        pytest.skip(reason)
    folder = copied(tmp_path, "multicast.py")
    ns = Namespace.create()
    try:
        ns.ip("link", "set", "lo", "up")
        ns.ip("link", "set", "lo", "multicast", "on")
        port = 5353
        with running(
            ns.argv(sys.executable, "multicast.py", "lo", str(port)), folder
        ) as server:
            server.waitFor("joined 224.0.0.251, ff02::fb on lo")
            result = subprocess.run(
                ns.argv(sys.executable, "-c", MULTICAST_CLIENT, str(port), "2"),
                capture_output=True,
                text=True,
                timeout=DEADLINE,
            )
            assert result.stdout == f"anyone? 127.0.0.1 {port}\n", (
                result.stdout + result.stderr + server.output()
            )
    finally:
        ns.delete()


def test_docsSpeakToUsers() -> None:
    """
    Users read the docs: no issue numbers, no talk of who ran what.
    """
    for page in [*pages(), REPO / "bench" / "README.md"]:
        text = page.read_text()
        for phrase in ("issue #", "the lead", "session"):
            assert phrase not in text.lower(), f"{page.name}: {phrase!r}"

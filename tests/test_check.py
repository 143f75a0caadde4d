"""
The C{udpdst} command: C{check} in a network namespace with secondary IPv4
and IPv6 addresses (it passes against C{twistd udpdst} and fails against
stock Twisted, naming the addresses and the wrong source), C{check-config}
and C{example-config} as subprocesses, and the check's probe on loopback.

C{udpdst check} sends to every local address, so it only ever runs inside a
namespace these tests created: never here, in the host's own.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests._service_helpers import DEADLINE, TWISTD, Twistd
from tests.echo._helpers import BAD_CONFIGS
from tests.netns import Namespace, Pair, unavailableReason
from udpdst.address import formatHostPort
from udpdst.check import Answer, Probe, askAll

P = Pair  # the addresses

UDPDST = str(Path(sys.executable).parent / "udpdst")

#: An interface with no carrier (its veth peer is down), where an IPv6
#: address added without nodad stays tentative.
DARK_IF = "dark0"
DARK_PEER_IF = "dark1"
TENTATIVE = "fd00:7::1"

#: Where every address answers, the check ends with the last answer: a long
#: timeout costs nothing there and keeps a loaded machine from failing it.
GENEROUS = ("--timeout", str(DEADLINE / 3))

ROW = re.compile(
    r"^(\S+)(?: \(secondary\))?\s+(\S+)\s+(\S+)\s+"
    r"(ok|wrong source|no answer|refused \(nothing listening\))$"
)


def udpdst(
    *args: str, cwd: Path, ns: Pair | None = None
) -> subprocess.CompletedProcess[str]:
    """
    Run C{python -m udpdst ARGS}, in the server namespace of C{ns} if given.
    """
    command = [sys.executable, "-m", "udpdst", *args]
    if ns is not None:
        assert ns.server is not None
        command = ns.server.argv(*command)
    return subprocess.run(
        command, cwd=cwd, capture_output=True, text=True, timeout=DEADLINE
    )


def rows(output: str) -> dict[str, tuple[str, str, str]]:
    """
    The check's table: address (with port) -> (interface, answered from,
    verdict).
    """
    found = {}
    for line in output.splitlines()[1:]:
        match = ROW.match(line)
        if match:
            found[match.group(1)] = match.group(2, 3, 4)
    return found


# In a network namespace


@pytest.fixture(scope="module")
def pair() -> Iterator[Pair]:
    """
    The namespace pair of the netns tests, plus a link without carrier that
    holds a tentative IPv6 address.
    """
    reason = unavailableReason()
    if reason is not None:
        pytest.skip(reason)
    built = Pair.create()
    try:
        assert built.server is not None
        server = built.server
        server.ip("link", "add", DARK_IF, "type", "veth", "peer", "name", DARK_PEER_IF)
        server.ip("link", "set", DARK_IF, "up")
        server.ip("addr", "add", f"{TENTATIVE}/64", "dev", DARK_IF)
        yield built
    finally:
        built.delete()


def probedAddresses() -> list[str]:
    """
    The addresses the check must probe in the pair's server namespace.
    """
    return [
        "127.0.0.1",
        P.SERVER_V4,
        P.SERVER_V4_SECONDARY,
        P.VIP_V4,
        "::1",
        P.SERVER_V6,
        P.SERVER_V6_SECONDARY,
        f"{P.SERVER_LL}%{P.SERVER_IF}",
        P.VIP_V6,
        f"{P.DECOY_LL}%{P.DECOY_IF}",
    ]


def startTwistd(pair: Pair, cwd: Path, *args: str) -> Twistd:
    assert pair.server is not None
    return Twistd(
        (), cwd, command=pair.server.argv(TWISTD, "-n", "--pidfile=", "udpdst", *args)
    )


def test_passesAgainstTwistdUdpdst(pair: Pair, tmp_path: Path) -> None:
    """
    Every address of the namespace answers from itself: exit 0, one row per
    address; the tentative address is skipped, saying so.
    """
    process = startTwistd(pair, tmp_path, "--listen", "[::]:0")
    try:
        ((_, port),) = process.listening()
        result = udpdst("check", "--port", str(port), *GENEROUS, cwd=tmp_path, ns=pair)
    finally:
        process.kill()
    assert result.returncode == 0, result.stdout + result.stderr
    table = rows(result.stdout)
    expected = {formatHostPort(host, port) for host in probedAddresses()}
    assert set(table) == expected, result.stdout
    for address, (_, answeredFrom, verdict) in table.items():
        assert (answeredFrom, verdict) == (address, "ok"), result.stdout
    assert f"{formatHostPort(P.SERVER_V4_SECONDARY, port)} (secondary)" in result.stdout
    assert (
        f"skipped {TENTATIVE} on {DARK_IF}: tentative (duplicate address "
        "detection not done)"
    ) in result.stdout
    assert f"{len(expected)} of {len(expected)} addresses answered" in result.stdout
    assert result.stderr == ""


def test_failsAgainstStockTwisted(pair: Pair, tmp_path: Path) -> None:
    """
    Twisted's own listenUDP echo leaves the reply's source to the kernel:
    exit 1, and the secondary addresses are named with the source they were
    answered from.
    """
    server = pair.startServer("--impl", "stock", "--interface", "::")
    try:
        assert server.port is not None
        port = server.port
        result = udpdst("check", "--port", str(port), *GENEROUS, cwd=tmp_path, ns=pair)
    finally:
        pair.stopServers()
    assert result.returncode == 1, result.stdout + result.stderr
    table = rows(result.stdout)
    assert table[formatHostPort(P.SERVER_V4_SECONDARY, port)] == (
        P.SERVER_IF,
        f"127.0.0.1:{port}",
        "wrong source",
    ), result.stdout
    assert table[formatHostPort(P.SERVER_V6_SECONDARY, port)] == (
        P.SERVER_IF,
        f"[::1]:{port}",
        "wrong source",
    ), result.stdout
    # Loopback clients of loopback addresses are answered right by anyone.
    assert table[f"127.0.0.1:{port}"] == ("lo", f"127.0.0.1:{port}", "ok")
    good = sum(verdict == "ok" for _, _, verdict in table.values())
    assert f"{good} of {len(table)} addresses answered" in result.stdout


def test_configListeners(pair: Pair, tmp_path: Path) -> None:
    """
    With --config, each listener's port is probed on the addresses it
    serves: IPv4 ones on an IPv4 listener, IPv6 ones on a v6-only one; a
    listener on port 0 is named as not probed.
    """
    config = tmp_path / "udpdst.toml"
    config.write_text(
        """
[[listen]]
address = "0.0.0.0"
port = 7001

[[listen]]
address = "::"
port = 7002
v6_only = true

[[listen]]
address = "127.0.0.1"
port = 0
"""
    )
    process = startTwistd(pair, tmp_path, "--config", str(config))
    try:
        process.listening(3)
        result = udpdst(
            "check", "--config", str(config), *GENEROUS, cwd=tmp_path, ns=pair
        )
    finally:
        process.kill()
    assert result.returncode == 0, result.stdout + result.stderr
    expected = {
        formatHostPort(host, 7002 if ":" in host else 7001)
        for host in probedAddresses()
    }
    assert set(rows(result.stdout)) == expected, result.stdout
    assert "not probed: 127.0.0.1:0 (any free port)" in result.stdout


@pytest.mark.parametrize(
    "text, message",
    [
        (
            "[[listen]]\nport = 'x'\n",
            "udpdst check: {config}: [[listen]] #1 port must be an integer",
        ),
        (
            "[[listen]]\nsystemd = true\n",
            "udpdst check: not probed: systemd (systemd's sockets); name the port "
            "with --port",
        ),
    ],
    ids=["bad config", "nothing to probe"],
)
def test_configNotProbed(pair: Pair, tmp_path: Path, text: str, message: str) -> None:
    """
    A bad config, or one whose listeners have no port to probe: one line,
    exit 1, nothing probed.  (In the namespace all the same: were the test
    wrong, the check would probe.)
    """
    config = tmp_path / "udpdst.toml"
    config.write_text(text)
    result = udpdst("check", "--config", str(config), cwd=tmp_path, ns=pair)
    assert result.returncode == 1
    assert result.stdout == ""
    (line,) = result.stderr.splitlines()
    assert line.startswith(message.format(config=config)), line


def test_listenerOnNoLocalAddress(pair: Pair, tmp_path: Path) -> None:
    """
    A listener on an address this host does not have: nothing to probe,
    said so, exit 1.
    """
    config = tmp_path / "udpdst.toml"
    config.write_text('[[listen]]\naddress = "192.0.2.99"\nport = 7\n')
    result = udpdst("check", "--config", str(config), cwd=tmp_path, ns=pair)
    assert result.returncode == 1, result.stderr
    assert "no address of this host is served by 192.0.2.99:7" in result.stdout
    assert "0 of 0 addresses answered" in result.stdout


def test_nothingListening(pair: Pair, tmp_path: Path) -> None:
    """
    Nothing listening: every address is named as refused (the kernel's port
    unreachable), without waiting out the timeout; exit 1.
    """
    result = udpdst(
        "check", "--port", "7009", "--timeout", str(DEADLINE / 2), cwd=tmp_path, ns=pair
    )
    assert result.returncode == 1, result.stdout + result.stderr
    table = rows(result.stdout)
    assert len(table) == len(probedAddresses())
    assert {(fromWhere, verdict) for _, fromWhere, verdict in table.values()} == {
        ("-", "refused (nothing listening)")
    }
    assert f"0 of {len(table)} addresses answered" in result.stdout


def test_hostWithoutIPv6Loopback(tmp_path: Path) -> None:
    """
    Where lo has no C{::1} the IPv6 probes come from the kernel's choice of
    source: the check still runs to its table.
    """
    reason = unavailableReason()
    if reason is not None:
        pytest.skip(reason)
    ns = Namespace.create()
    try:
        ns.ip("link", "set", "lo", "up")
        ns.ip("addr", "del", "::1/128", "dev", "lo")
        ns.ip("link", "add", "v0", "type", "veth", "peer", "name", "v1")
        ns.ip("link", "set", "v0", "up")
        ns.ip("addr", "add", "fd00:5::1/64", "dev", "v0", "nodad")
        result = subprocess.run(
            ns.argv(
                sys.executable,
                "-m",
                "udpdst",
                "check",
                "--port",
                "7009",
                "--timeout",
                "0.3",
            ),
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=DEADLINE,
        )
    finally:
        ns.delete()
    assert result.returncode == 1, result.stderr
    assert result.stderr == ""
    table = rows(result.stdout)
    assert table["[fd00:5::1]:7009"] == (
        "v0",
        "-",
        "refused (nothing listening)",
    ), result.stdout
    assert "[::1]:7009" not in table


def test_addressesAsIpSeesThem(pair: Pair, tmp_path: Path) -> None:
    """
    The check's own netlink dump lists the addresses, interfaces and flags
    that C{ip -json address} lists, secondary and tentative ones included.
    """
    assert pair.server is not None
    script = (
        "import json\n"
        "from udpdst.check import localAddresses\n"
        "print(json.dumps([[a.host, a.interface, a.ifindex, a.secondary, "
        "(a.unusable or '').split(' ')[0]] for a in localAddresses()]))\n"
    )
    result = subprocess.run(
        pair.server.argv(sys.executable, "-c", script),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=DEADLINE,
    )
    assert result.returncode == 0, result.stderr
    ours = sorted(tuple(row) for row in json.loads(result.stdout))
    expected = sorted(
        (
            info["local"],
            link["ifname"],
            link["ifindex"],
            info["family"] == "inet" and bool(info.get("secondary")),
            "duplicate"
            if info.get("dadfailed")
            else "tentative"
            if info.get("tentative")
            else "",
        )
        for link in json.loads(pair.server.ip("-json", "address").stdout)
        for info in link["addr_info"]
    )
    assert ours == expected
    assert (P.SERVER_V4_SECONDARY, P.SERVER_IF) in {row[:2] for row in ours if row[3]}
    assert (TENTATIVE, DARK_IF, "tentative") in {(r[0], r[1], r[4]) for r in ours}


# Without probing: safe anywhere


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["check", "--timeout", "0"],
            "argument --timeout: '0' is not a number of seconds above 0",
        ),
        (
            ["check", "--port", "70000"],
            "argument --port: '70000' is not a port 1..65535",
        ),
        (["check", "--port", "7", "--config", "x"], "not allowed with argument --port"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        ([], "the following arguments are required: COMMAND"),
    ],
)
def test_usageErrors(tmp_path: Path, args: list[str], message: str) -> None:
    """
    Command-line mistakes: one line, exit 2, nothing probed.
    """
    result = udpdst(*args, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stdout == ""
    (line,) = result.stderr.splitlines()
    assert message in line, line
    assert line.endswith("--help")


def test_consoleScript(tmp_path: Path) -> None:
    """
    The installed C{udpdst} script is the same command.
    """
    result = subprocess.run(
        [UDPDST, "check-config", "--help"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=DEADLINE,
    )
    assert result.returncode == 0, result.stderr
    assert "usage: udpdst check-config [-h] FILE" in result.stdout


def test_checkConfigValid(tmp_path: Path) -> None:
    config = tmp_path / "good.toml"
    config.write_text('[[listen]]\naddress = "0.0.0.0"\nport = 7\n')
    result = udpdst("check-config", str(config), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (
        result.stdout
        == f"udpdst check-config: {config} is valid; listeners 0.0.0.0:7\n"
    )
    assert result.stderr == ""


@pytest.mark.parametrize(
    "text, cause",
    [*BAD_CONFIGS, (None, r"cannot read config file \S+: No such file or directory$")],
)
def test_checkConfigInvalid(tmp_path: Path, text: str | None, cause: str) -> None:
    """
    A config twistd udpdst would refuse: its one-line error, exit 1.
    """
    config = tmp_path / "bad.toml"
    if text is not None:
        config.write_text(text)
    result = udpdst("check-config", str(config), cwd=tmp_path)
    assert result.returncode == 1
    assert result.stdout == ""
    (line,) = result.stderr.splitlines()
    assert line.startswith("udpdst check-config: ") and re.search(cause, line), line
    assert str(config) in line


def test_exampleConfig(tmp_path: Path) -> None:
    """
    The example config comes out whole, and check-config accepts it.
    """
    result = udpdst("example-config", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    from importlib.resources import files

    shipped = files("udpdst").joinpath("data/udpdst.toml").read_text(encoding="utf-8")
    assert result.stdout == shipped
    example = tmp_path / "example.toml"
    example.write_text(result.stdout)
    assert udpdst("check-config", str(example), cwd=tmp_path).returncode == 0


# The probe, on loopback


@pytest.fixture
def naiveEcho() -> Iterator[int]:
    """
    A blocking echo on 0.0.0.0 that leaves the reply's source to the kernel,
    in a thread; its port.
    """
    server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    server.bind(("0.0.0.0", 0))
    server.settimeout(DEADLINE)

    def serve() -> None:
        try:
            while True:
                data, peer = server.recvfrom(2048)
                if data == b"stop":
                    return
                server.sendto(data, peer)
        except OSError:
            pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    port = server.getsockname()[1]
    try:
        yield port
    finally:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.sendto(b"stop", ("127.0.0.1", port))
        thread.join(DEADLINE)
        server.close()


def test_probeCatchesWrongSource(naiveEcho: int) -> None:
    """
    A reply from another source than the one asked never reaches the
    connected socket; the catcher gets it and names its source.
    """
    wrong, right = Probe("127.0.0.2", naiveEcho), Probe("127.0.0.1", naiveEcho)
    with wrong, right:
        answers = askAll([wrong, right], [b"to two", b"to one"], DEADLINE)
    assert answers == [
        Answer(b"to two", ("127.0.0.1", naiveEcho), fromTarget=False),
        Answer(b"to one", ("127.0.0.1", naiveEcho), fromTarget=True),
    ]


def test_probeNoAnswer() -> None:
    """
    A socket on the port that never answers: no answer, after the timeout,
    and not refused.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind(("127.0.0.1", 0))
        with Probe("127.0.0.1", silent.getsockname()[1]) as probe:
            assert askAll([probe], [b"anyone?"], 0.3) == [None]
            assert not probe.refused


def test_probeRefused() -> None:
    """
    Nobody on the port: the kernel's port unreachable marks the probe
    refused, and it is not waited for.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as holder:
        holder.bind(("127.0.0.1", 0))
        port = holder.getsockname()[1]
    with Probe("127.0.0.1", port) as probe:
        start = time.monotonic()
        assert askAll([probe], [b"anyone?"], DEADLINE) == [None]
        assert probe.refused
        # Not the timeout: no waiting once refused.
        assert time.monotonic() - start < DEADLINE

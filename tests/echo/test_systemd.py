"""
Tests for udpdst.echo.systemd: finding the sockets systemd passed (sd_listen_fds
rules) and pairing them with listeners.  Descriptors 3 and up are set up in
a child process, as systemd would, so the test process's own are untouched.
"""

from __future__ import annotations

import importlib.resources
import json
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests._service_helpers import TWISTD
from udpdst.echo.config import ConfigError, ListenConfig
from udpdst.echo.systemd import assignSockets, listenFds

CHILD = textwrap.dedent(
    """
    import json, os, socket, sys
    from udpdst.echo.config import ConfigError, ListenConfig
    from udpdst.echo.systemd import assignSockets, listenFds, socketFamily

    six = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    four = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    for target, s in ((3, six), (4, four), (5, tcp)):
        os.dup2(s.fileno(), target)
    result = {}

    env = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "3",
           "LISTEN_FDNAMES": "echo:other:tcp", "KEEP": "1"}
    found = listenFds(env)
    result["found"] = [(s.fd, s.name) for s in found]
    result["left"] = sorted(env)
    result["cloexec"] = [
        bool(os.get_inheritable(fd)) is False for fd in (3, 4, 5)
    ]
    result["families"] = [socketFamily(s) for s in found[:2]]

    def pairs(listeners):
        try:
            return [(l.fd_name, s and s.fd) for l, s in assignSockets(listeners, found)]
        except ConfigError as e:
            return str(e)

    named = ListenConfig(systemd=True, fd_name="echo")
    other = ListenConfig(systemd=True, fd_name="other")
    result["named"] = pairs([named, ListenConfig()])
    result["two"] = pairs([other, named])
    result["rest"] = pairs([named, ListenConfig(systemd=True)])
    result["none"] = pairs([ListenConfig(systemd=True, fd_name="nope")])

    env = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "2",
           "LISTEN_FDNAMES": "just-one"}
    result["unnamed"] = [(s.fd, s.name) for s in listenFds(env)]

    env = {"LISTEN_PID": str(os.getpid() + 1), "LISTEN_FDS": "2"}
    result["otherPid"] = [listenFds(env), sorted(env)]

    env = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "900"}
    try:
        listenFds(env)
    except ConfigError as e:
        result["closed"] = str(e)
    print(json.dumps(result))
    """
)


@pytest.fixture(scope="module")
def child() -> dict[str, object]:
    output = subprocess.run(
        [sys.executable, "-c", CHILD],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    return json.loads(output)  # type: ignore[no-any-return]


def test_listenFds(child: dict[str, object]) -> None:
    """
    Descriptors from 3, named by LISTEN_FDNAMES, marked close-on-exec; the
    variables removed, others kept.
    """
    assert child["found"] == [[3, "echo"], [4, "other"], [5, "tcp"]]
    assert child["left"] == ["KEEP"]
    assert child["cloexec"] == [True, True, True]
    assert child["families"] == [socket.AF_INET6, socket.AF_INET]


def test_namesThatDoNotMatchTheCount(child: dict[str, object]) -> None:
    assert child["unnamed"] == [[3, "unknown"], [4, "unknown"]]


def test_otherProcessesSockets(child: dict[str, object]) -> None:
    """
    LISTEN_PID of another process: nothing is ours; the variables are
    removed all the same (as sd_listen_fds(3) with unset_environment).
    """
    assert child["otherPid"] == [[], []]


def test_descriptorNotOpen(child: dict[str, object]) -> None:
    assert "LISTEN_FDS=900 but descriptor" in str(child["closed"])
    assert "is not open" in str(child["closed"])


def test_assignByName(child: dict[str, object]) -> None:
    assert child["named"] == [["echo", 3], ["", None]]
    assert child["two"] == [["other", 4], ["echo", 3]]


def test_assignRestRefusesNonUdp(child: dict[str, object]) -> None:
    """
    A listener without fd_name takes every socket no named listener took;
    a stream socket among them is an error naming the fix.
    """
    assert child["rest"] == (
        "systemd socket 5 (tcp) is not a UDP socket; use "
        "ListenDatagram=ADDRESS:PORT in the socket unit"
    )


def test_assignNoMatch(child: dict[str, object]) -> None:
    assert child["none"] == (
        "listener systemd:nope matches none of the sockets systemd passed "
        "(names: echo, other, tcp); fix fd_name or FileDescriptorName="
    )


def test_nothingPassed() -> None:
    assert listenFds({}) == []
    with pytest.raises(ConfigError, match="none was passed"):
        assignSockets([ListenConfig(systemd=True)], [])
    assert assignSockets([ListenConfig()], []) == [(ListenConfig(), None)]


def test_malformed() -> None:
    env = {"LISTEN_PID": "self", "LISTEN_FDS": "1"}
    with pytest.raises(ConfigError, match="malformed LISTEN_PID"):
        listenFds(env)
    assert env == {}


# The units shipped in the package.

UNITS = ("udpdst.service", "udpdst@.service", "udpdst.socket")

#: Where the units expect a virtual environment with udpdst (the README and
#: the units' comments say so).
UNIT_TWISTD = "/opt/udpdst/bin/twistd"


@pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed"
)
def test_unitsVerify(tmp_path: Path) -> None:
    """
    systemd-analyze verify finds nothing to say about the units, with
    ExecStart pointed at this environment's twistd (the only line that
    depends on where udpdst is installed).
    """
    data = importlib.resources.files("udpdst").joinpath("data")
    for name in UNITS:
        text = data.joinpath(name).read_text()
        if name.endswith(".service"):
            assert f"ExecStart={UNIT_TWISTD} " in text
            assert "Type=notify\n" in text
            assert "ExecReload=/bin/kill -HUP $MAINPID\n" in text
        (tmp_path / name).write_text(text.replace(UNIT_TWISTD, TWISTD))
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", *(str(tmp_path / n) for n in UNITS)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


#: The commented lines that make a unit fit for transparent proxying, by unit.
TRANSPARENT_LINES = {
    "udpdst.service": (
        "#AmbientCapabilities=CAP_NET_ADMIN CAP_NET_BIND_SERVICE\n",
        "#CapabilityBoundingSet=CAP_NET_ADMIN CAP_NET_BIND_SERVICE\n",
    ),
    "udpdst@.service": (
        "#AmbientCapabilities=CAP_NET_ADMIN\n",
        "#CapabilityBoundingSet=CAP_NET_ADMIN\n",
    ),
    "udpdst.socket": ("#Transparent=yes\n",),
}


@pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed"
)
def test_transparentExampleVerifies(tmp_path: Path) -> None:
    """
    Each unit carries the commented example for transparent proxying (the
    capability kept after start, IP_TRANSPARENT on systemd's socket), and
    with it uncommented systemd-analyze still finds nothing to say.  What
    the capabilities give the running service is tested in
    L{tests.echo.test_transparent}.
    """
    data = importlib.resources.files("udpdst").joinpath("data")
    for name in UNITS:
        text = data.joinpath(name).read_text().replace(UNIT_TWISTD, TWISTD)
        for line in TRANSPARENT_LINES[name]:
            assert line in text, name
            text = text.replace(line, line[1:])
        (tmp_path / name).write_text(text)
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", *(str(tmp_path / n) for n in UNITS)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")

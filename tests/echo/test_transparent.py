"""
C{twistd udpdst} behind an nftables C{TPROXY} rule: a listener with
C{transparent = true} (or C{--listen ADDRESS:PORT,transparent}) answers
datagrams redirected from other addresses and ports from those, with the
privileges a systemd unit gives it, and says in one line what it lacks
otherwise.

The namespaces and the rule are L{tests.netns.Pair.redirect}'s; see
L{tests.test_transparent_netns} for the library's side.
"""

from __future__ import annotations

import re
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests._service_helpers import TWISTD, Twistd
from tests.netns import Pair, nftUnavailableReason

pytestmark = pytest.mark.netns

P = Pair
LISTEN = 7000
FREE = 5300
NOBODY = "65534"
CAP_NET_BIND_SERVICE = 10
CAP_NET_ADMIN = 12

#: The redirected pairs a client asks, and the listener's own port.
TARGETS = [
    ("198.51.100.7", 5353),
    ("198.51.100.8", 123),
    (P.SERVER_V4, FREE),
    ("2001:db8:77::7", 5353),
    (P.SERVER_V6, FREE),
    (P.SERVER_V4, LISTEN),
    (P.SERVER_V6, LISTEN),
]


@pytest.fixture(scope="module")
def pair() -> Iterator[Pair]:
    reason = nftUnavailableReason()
    if reason is not None:
        pytest.skip(reason)
    built = Pair.create()
    try:
        built.redirect(LISTEN, (FREE,))
        yield built
    finally:
        built.delete()


def start(pair: Pair, cwd: Path, *args: str, prefix: tuple[str, ...] = ()) -> Twistd:
    """
    C{twistd -n udpdst ARGS} in the server namespace, after C{prefix} (a
    command that changes its privileges and runs the rest).
    """
    assert pair.server is not None
    return Twistd(
        (),
        cwd,
        command=pair.server.argv(*prefix, TWISTD, "-n", "--pidfile=", *args),
    )


def ask(pair: Pair, targets: list[tuple[str, int]]) -> list[dict[str, Any]]:
    return pair.query(
        *(
            {"host": h, "port": p, "timeout": 2.0, "payload": f"to {h} {p}"}
            for h, p in targets
        )
    )


def assertAllAnswered(
    results: list[dict[str, Any]], targets: list[tuple[str, int]]
) -> None:
    for result, (host, port) in zip(results, targets, strict=True):
        assert result["ok"], f"no reply to {host}:{port}: {result['error']}"
        assert result["source"] == [host, port], result


def runningAs(server: Twistd) -> tuple[int, int]:
    """
    The real user id and the effective capabilities of the running twistd
    (C{ip netns exec} and setpriv exec it: it has their process id).
    """
    status = Path(f"/proc/{server.proc.pid}/status").read_text()
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    return int(fields["Uid"].split()[0]), int(fields["CapEff"].strip(), 16)


def finalStats(server: Twistd) -> str:
    assert server.stop() == -signal.SIGTERM, server.output()
    return server.output()


@pytest.mark.parametrize("spelling", ["--listen", "config", "workers"])
def test_twistdAnswersFromEachRedirectedPair(
    pair: Pair, tmp_path: Path, spelling: str
) -> None:
    """
    Connected clients asking redirected pairs (foreign addresses, the
    server's own address on another port) and the listener's own port all
    accept the replies, also from two worker processes serving the
    transparent socket; the stats line counts the reply sockets.
    """
    if spelling == "workers":
        args = ["udpdst", "--listen", f"[::]:{LISTEN},transparent", "--workers", "2"]
    elif spelling == "--listen":
        args = ["udpdst", "--listen", f"[::]:{LISTEN},transparent"]
    else:
        config = tmp_path / "udpdst.toml"
        config.write_text(
            f'[[listen]]\naddress = "::"\nport = {LISTEN}\ntransparent = true\n'
            "reply_sockets = 16\n"
        )
        args = ["udpdst", "--config", str(config)]
    server = start(pair, tmp_path, *args)
    server.listening()
    results = ask(pair, TARGETS)
    assertAllAnswered(results, TARGETS)
    output = finalStats(server)
    # Three foreign pairs cached; the two own-address pairs one-shot.
    assert re.search(r"reply sockets opened 5\b", output), output
    assert re.search(r"reply sockets failed 0\b", output), output


def test_keptCapabilityAfterDroppingRoot(pair: Pair, tmp_path: Path) -> None:
    """
    What a unit with C{User=} and C{AmbientCapabilities=CAP_NET_ADMIN
    CAP_NET_BIND_SERVICE} gives the service: it runs as an ordinary user
    and keeps those capabilities, so the reply sockets it opens after start
    (one on port 123) work.  Emulated with setpriv: the capabilities limited
    to those (and the two twistd needs to switch user), kept across
    twistd's C{--uid} by the no-setuid-fixup security bit.
    """
    keep = (
        "setpriv",
        "--securebits=+no_setuid_fixup",
        "--bounding-set=-all,+net_admin,+net_bind_service,+setuid,+setgid",
        "--inh-caps=-all,+net_admin,+net_bind_service",
    )
    server = start(
        pair,
        tmp_path,
        "--uid",
        NOBODY,
        "--gid",
        NOBODY,
        "udpdst",
        "--listen",
        f"[::]:{LISTEN},transparent",
        prefix=keep,
    )
    server.listening()
    uid, caps = runningAs(server)
    assert uid == int(NOBODY)
    assert caps & (1 << CAP_NET_ADMIN) and caps & (1 << CAP_NET_BIND_SERVICE), hex(caps)
    results = ask(pair, TARGETS[:2])
    assertAllAnswered(results, TARGETS[:2])
    output = finalStats(server)
    assert re.search(r"reply sockets failed 0\b", output), output


def test_capabilityLostWithTwistdUid(pair: Pair, tmp_path: Path) -> None:
    """
    Started as root with twistd's C{--uid}, the service binds (the listener
    is transparent) but loses the capability when it switches user: the
    reply sockets cannot be opened, which is counted and logged once per
    power of two, and no reply leaves from a wrong source.
    """
    server = start(
        pair,
        tmp_path,
        "--uid",
        NOBODY,
        "--gid",
        NOBODY,
        "udpdst",
        "--listen",
        f"[::]:{LISTEN},transparent",
    )
    server.listening()
    uid, caps = runningAs(server)
    assert uid == int(NOBODY) and not caps & (1 << CAP_NET_ADMIN), hex(caps)
    results = ask(pair, TARGETS[:1] + [(P.SERVER_V4, LISTEN)])
    assert not results[0]["ok"] and results[0]["error"] == "timeout", results[0]
    assert results[1]["ok"], results[1]
    output = finalStats(server)
    assert "need CAP_NET_ADMIN" in output, output
    assert re.search(r"reply sockets failed 1\b", output), output


def test_withoutCapabilityStartFailsInOneLine(pair: Pair, tmp_path: Path) -> None:
    """
    Without CAP_NET_ADMIN and CAP_NET_RAW, a transparent listener ends the
    service at start, with one line naming the capability and status 1.
    """
    server = start(
        pair,
        tmp_path,
        "udpdst",
        "--listen",
        f"[::]:{LISTEN},transparent",
        prefix=("setpriv", "--bounding-set=-net_admin,-net_raw"),
    )
    assert server.finish() == 1, server.output()
    lines = [line for line in server.output().splitlines() if "CAP_NET_ADMIN" in line]
    assert len(lines) == 1, server.output()
    assert f"[::]:{LISTEN}" in lines[0], lines
    assert "Traceback" not in server.output(), server.output()

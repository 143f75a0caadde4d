"""
C{twistd udpdst} exposed to spoofers, for real: no answer to datagrams sent
to broadcast or multicast addresses (unless C{[echo] answer_broadcast}), one
token bucket per source network however many of its addresses send, and
replies never more than twice their requests on the wire.

Loopback covers IPv4 networks (127.0.7.0/24); broadcast, multicast and
IPv6 networks run in network namespaces (L{tests.netns.Pair}).
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests._service_helpers import TWISTD, Twistd, freePort, readable
from tests.netns import HERE, REPO, Pair, builtPair

LOAD_SCRIPT = HERE / "_netns_load.py"
PORT = 12345

#: A prefix long enough that the floor on requests matters: 100 bytes, so a
#: request needs 72 (the prefix less 28 bytes of IPv4 and UDP headers).
PREFIX = "p" * 100


def spread(
    target: tuple[str, int], sources: list[str], argv: list[str] | None = None
) -> dict[str, Any]:
    """
    One datagram from each of C{sources} to C{target}, all at once
    (L{tests._netns_load}'s C{spread}); C{argv} runs it in a namespace.
    """
    spec = {"target": list(target), "sources": sources, "wait": 1.5}
    command = [sys.executable, str(LOAD_SCRIPT), "spread", json.dumps(spec)]
    proc = subprocess.run(
        (argv or []) + command, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)  # type: ignore[no-any-return]


@pytest.fixture(autouse=True)
def _killLeftovers() -> Iterator[None]:
    """
    Every service a test started is killed when it ends (one that stopped
    already is left alone).
    """
    yield
    while _started:
        _started.pop().kill()


_started: list[Twistd] = []


def service(
    tmp_path: Path, config: str, namespace: Any = None, name: str = "udpdst.toml"
) -> Twistd:
    """
    C{twistd udpdst} with C{config}, logging JSON (for its final stats), in
    C{namespace} if given; listening once returned.
    """
    path = tmp_path / name
    path.write_text(config)
    command = [
        TWISTD,
        "-n",
        "--pidfile=",
        "--logger",
        "udpdst.echo.jsonLogObserver",
        "udpdst",
        "--config",
        str(path),
    ]
    process = Twistd(
        [], REPO, command=namespace.argv(*command) if namespace else command
    )
    process.listening()
    return process


def finalStats(process: Twistd) -> dict[str, Any]:
    """
    Stop C{process}; return its final stats: C{received}, C{replied},
    C{kernelDrops} and C{refusedBy} summed over its listeners, and the
    limiters' figures.
    """
    assert process.stop() == -signal.SIGTERM
    output = process.output()
    assert "Traceback" not in output, output
    lines = [
        json.loads(line)
        for line in process.out
        if line.startswith("{") and '"final": true' in line and '"received"' in line
    ]
    assert lines, output
    total: dict[str, Any] = {
        name: sum(line[name] for line in lines)
        for name in ("received", "replied", "kernelDrops")
    }
    total["refusedBy"] = {
        reason: sum(line["refusedBy"][reason] for line in lines)
        for reason in lines[0]["refusedBy"]
    }
    (limiter,) = [
        json.loads(line)
        for line in process.out
        if '"final stats"' in line and '"rateLimitedNetworks"' in line
    ]
    return {**total, **limiter}


# Limits per network


def test_oneBucketPerIPv4Network(tmp_path: Path) -> None:
    """
    One datagram from each of 127.0.7.1..254 with C{per_prefix_burst = 10}
    gets 10 replies, not 254, while a source in another /24 is still
    answered.
    """
    port = freePort()
    process = service(
        tmp_path,
        f'[[listen]]\naddress = "127.0.0.1"\nport = {port}\n'
        "receive_buffer = 1048576\n"
        "[limits]\nper_prefix_burst = 10\nper_prefix_rate = 0.001\n",
    )
    sources = [f"127.0.7.{i}" for i in range(1, 255)]
    crowd = spread(("127.0.0.1", port), sources)
    other = spread(("127.0.0.1", port), ["127.0.8.1"])
    assert crowd["sent"] == 254
    assert len(crowd["answered"]) == 10, crowd
    assert other["answered"] == ["127.0.8.1"]
    stats = finalStats(process)
    # Of those received (the kernel may drop some on a loaded machine), all
    # but the network's 10 and the other source's one were refused.
    assert stats["refusedBy"]["prefix-rate"] == stats["received"] - 11
    assert stats["replied"] == 11
    assert stats["rateLimitedNetworks"] == 2


def test_requestFloorWithAPrefix(tmp_path: Path) -> None:
    """
    With a 100-byte prefix, a 71-byte request is refused (C{too-small}) and
    a 72-byte one answered with 172 bytes: on the wire (28 bytes of IPv4
    and UDP headers each) the reply is twice the request, never more.
    """
    port = freePort()
    process = service(
        tmp_path,
        f'[[listen]]\naddress = "127.0.0.1"\nport = {port}\n'
        f'[echo]\nprefix = "{PREFIX}"\n',
    )
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        client.connect(("127.0.0.1", port))
        client.settimeout(1.0)
        client.send(b"s" * 71)
        client.send(b"l" * 72)
        reply = client.recv(65535)
        assert reply == PREFIX.encode() + b"l" * 72
        assert len(reply) + 28 == 2 * (72 + 28)
        client.settimeout(0.3)
        with pytest.raises(TimeoutError):
            client.recv(65535)
    stats = finalStats(process)
    assert stats["refusedBy"]["too-small"] == 1
    assert stats["replied"] == 1


# In namespaces

netns = pytest.mark.netns

P = Pair


@pytest.fixture
def pair() -> Iterator[Pair]:
    yield from builtPair()


def query(host: str, **options: Any) -> dict[str, Any]:
    return {"host": host, "port": PORT, "timeout": 0.5, **options}


#: Queries to every kind of broadcast and multicast address, from the client
#: namespace, unconnected (a reply comes from another address than the one
#: asked): subnet and limited broadcast, the IPv6 all-nodes group and the
#: IPv4 all-hosts group, of which every host is a member without joining.
#: (The kernel delivers the last only to IPv4 sockets: a dual-stack socket
#: gets no IPv4 multicast it did not join.)
BROADCASTS = [
    query(P.BROADCAST_V4, connected=False, broadcast=True, bind=P.CLIENT_V4),
    query("255.255.255.255", connected=False, broadcast=True, bind=P.CLIENT_V4),
    query("ff02::1", connected=False, multicastIf=P.CLIENT_IF),
    query("224.0.0.1", connected=False, multicastIf=P.CLIENT_IF, bind=P.CLIENT_V4),
]

#: The listeners: one dual-stack socket (the default), or an IPv4 socket and
#: an IPv6-only one; and how many of L{BROADCASTS} reach them.
LISTENERS = {
    "dual-stack": (f'[[listen]]\naddress = "::"\nport = {PORT}\n', 3),
    "split": (
        f'[[listen]]\naddress = "0.0.0.0"\nport = {PORT}\n'
        f'[[listen]]\naddress = "::"\nport = {PORT}\nv6_only = true\n',
        4,
    ),
}


@netns
@pytest.mark.parametrize("listeners", list(LISTENERS))
def test_broadcastAndMulticastRefused(
    pair: Pair, tmp_path: Path, listeners: str
) -> None:
    """
    By default a datagram sent to the subnet broadcast, the limited
    broadcast, ff02::1 or 224.0.0.1 gets no reply and is counted under
    C{broadcast}; unicast datagrams on the same link are answered, from the
    address they were sent to.
    """
    config, reached = LISTENERS[listeners]
    process = service(tmp_path, config, pair.server)
    results = pair.query(
        *BROADCASTS[:reached], query(P.SERVER_V4), query(P.SERVER_V6_SECONDARY)
    )
    refused, unicast = results[:reached], results[reached:]
    assert [r["error"] for r in refused] == ["timeout"] * reached, refused
    assert [r["source"] for r in unicast] == [
        [P.SERVER_V4, PORT],
        [P.SERVER_V6_SECONDARY, PORT],
    ], unicast
    stats = finalStats(process)
    assert stats["refusedBy"]["broadcast"] == reached
    assert stats["replied"] == 2
    assert stats["received"] == reached + 2
    logged = [readable(line) for line in process.out]
    assert any("a broadcast or multicast address (1 so far)" in t for t in logged)


@netns
@pytest.mark.parametrize("listeners", list(LISTENERS))
def test_answerBroadcastAnswersFromAUnicastAddress(
    pair: Pair, tmp_path: Path, listeners: str
) -> None:
    """
    With C{answer_broadcast = true} the same datagrams are answered, each
    from a unicast address of the server on that link (IPv4: the
    interface's primary address, which the kernel reports), never from the
    broadcast or group address.
    """
    config, reached = LISTENERS[listeners]
    process = service(
        tmp_path, config + "[echo]\nanswer_broadcast = true\n", pair.server
    )
    results = pair.query(*BROADCASTS[:reached])
    assert all(r["ok"] for r in results), [
        (r["query"]["host"], r["error"]) for r in results
    ]
    v4 = [r["source"] for r in results if "." in r["query"]["host"]]
    assert v4 == [[P.SERVER_V4, PORT]] * (reached - 1)
    v6 = results[2]["source"]
    assert v6[1] == PORT
    assert v6[0] in {P.SERVER_V6, P.SERVER_V6_SECONDARY, P.SERVER_LL}
    stats = finalStats(process)
    assert stats["refusedBy"]["broadcast"] == 0
    assert stats["replied"] == reached


@netns
def test_oneBucketPerIPv6Network(pair: Pair, tmp_path: Path) -> None:
    """
    One datagram from each of 254 addresses of one /56 (each in another
    /64 of it) with C{per_prefix_burst = 10} gets 10 replies, while a source
    in another /56 is still answered.
    """
    server, client = pair.server, pair.client
    assert server is not None and client is not None
    sources = [f"fd00:1:2:{i:x}::1" for i in range(1, 255)]
    other = "fd00:1:3::5"
    batch = "".join(
        f"address add {a}/128 dev {P.CLIENT_IF} nodad\n" for a in [*sources, other]
    )
    subprocess.run(
        ["ip", "-n", client.name, "-batch", "-"],
        input=batch,
        text=True,
        check=True,
        timeout=30,
    )
    # Replies to the client's extra addresses go back over the link.
    server.ip("-6", "route", "add", "fd00:1:2::/56", "via", P.CLIENT_V6)
    server.ip("-6", "route", "add", f"{other}/128", "via", P.CLIENT_V6)
    process = service(
        tmp_path,
        f'[[listen]]\naddress = "::"\nport = {PORT}\n'
        "[limits]\nper_prefix_burst = 10\nper_prefix_rate = 0.001\n",
        server,
    )
    crowd = spread((P.SERVER_V6, PORT), sources, client.argv())
    apart = spread((P.SERVER_V6, PORT), [other], client.argv())
    assert crowd["sent"] == 254
    assert len(crowd["answered"]) == 10, crowd
    assert apart["answered"] == [other]
    stats = finalStats(process)
    assert stats["refusedBy"]["prefix-rate"] == stats["received"] - 11
    assert stats["replied"] == 11


# Reload


def test_reloadKeepsNetworkBuckets() -> None:
    """
    A reload that leaves the per-network settings as they were keeps the
    buckets (a spoofer gains nothing from an operator's reload); one that
    changes them starts afresh, keeping the count of evictions.  Either way
    every listener's echo uses the service's one limiter.
    """
    from dataclasses import replace

    from udpdst.echo.config import Config, ListenConfig
    from udpdst.echo.service import EchoService

    listener = ListenConfig("127.0.0.1", 0)
    config = Config(listen=(listener,))
    service = EchoService(config, [(listener, None)])
    buckets = service.networkLimiter
    assert buckets.allow("10.9.8.7", 0.0)
    buckets.evictions = 3
    same = replace(config, limits=replace(config.limits, per_source_burst=5))
    service.reload(same)
    assert service.networkLimiter is buckets
    assert b"\n\t\x08\x00" in buckets  # 10.9.8.0/24: its bucket is kept
    assert service.listeners[0].protocol._allowNetwork == buckets.allow  # type: ignore[attr-defined]
    other = replace(same, limits=replace(same.limits, prefix_v6=48))
    service.reload(other)
    assert service.networkLimiter is not buckets
    assert service.networkLimiter.prefixV6 == 48
    assert service.networkLimiter.evictions == 3
    assert service.listeners[0].protocol._allowNetwork == (  # type: ignore[attr-defined]
        service.networkLimiter.allow
    )


def test_reloadTurnsAnswerBroadcastOn() -> None:
    """
    C{[echo] answer_broadcast} changes at reload, in the listeners' echo.
    """
    from dataclasses import replace

    from udpdst.echo.config import Config, ListenConfig
    from udpdst.echo.service import EchoService, _changes

    listener = ListenConfig("127.0.0.1", 0)
    config = Config(listen=(listener,))
    service = EchoService(config, [(listener, None)])
    assert service.listeners[0].protocol._refuseBroadcast  # type: ignore[attr-defined]
    labs = replace(config, echo=replace(config.echo, answer_broadcast=True))
    assert _changes(config, labs, [], [], []) == ["broadcast and multicast answered"]
    service.reload(labs)
    assert not service.listeners[0].protocol._refuseBroadcast  # type: ignore[attr-defined]

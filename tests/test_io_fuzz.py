"""
Fuzzing the read paths (C and pure Python): batches built from real control
data captured on loopback, mutated, with random peer addresses and random
kernel flags, go through the port's classify and dispatch.  Nothing escapes,
and every datagram is delivered or counted.  (Nothing is sent: the protocol
only records.)
"""

from __future__ import annotations

import socket
import struct
import time
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import udpdst
from tests.conftest import HAVE_IPV6
from udpdst import _linux as L
from udpdst import io
from udpdst.port import DestinationPort

pytestmark = pytest.mark.skipif(not HAVE_IPV6, reason="needs a dual-stack socket")

PATHS = [pytest.param(io.PLAIN, id="recvmsg")] + (
    [pytest.param(io.BATCHED, id="recvmmsg")] if io.BATCHED is not None else []
)

FLAGS = st.sampled_from(
    [0, 0, 0, L.MSG_TRUNC, L.MSG_CTRUNC, L.MSG_TRUNC | L.MSG_CTRUNC]
) | st.integers(0, 2**31 - 1)


class Recorder(udpdst.DestinationDatagramProtocol):
    def __init__(self) -> None:
        self.seen = 0

    def datagramReceived(self, data: bytes, addr: Any, dst: Any) -> None:
        assert isinstance(addr, tuple) and len(addr) == 2
        assert dst is None or isinstance(dst, udpdst.Destination)
        str(addr[0])
        self.seen += 1


def _realKeys(path: io.Path) -> list[Any]:
    """
    Keys of real datagrams on a dual-stack socket: IPv4 (mapped) and IPv6,
    with every control message the port asks for.
    """
    server = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    server.setsockopt(L.SOL_IPV6, L.IPV6_V6ONLY, 0)
    server.bind(("::", 0))
    udpdst.cmsg.enable_destination_options(server)
    server.setblocking(False)
    port = server.getsockname()[1]
    clients = [
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM),
        socket.socket(socket.AF_INET6, socket.SOCK_DGRAM),
    ]
    try:
        clients[0].sendto(b"a", ("127.0.0.2", port))
        clients[1].sendto(b"b", ("::1", port))
        keys: list[Any] = []
        deadline = time.monotonic() + 10
        while len(keys) < 2 and time.monotonic() < deadline:
            batch = path.receive(server, 8, 100, L.ANCILLARY_BUFFER_SIZE)[0]
            keys.extend(key for _, key, _ in batch)
            time.sleep(0.001)
        assert len(keys) == 2
        return keys
    finally:
        server.close()
        for c in clients:
            c.close()


def _mutateBytes(data: bytes, draw: Any) -> bytes:
    edits = draw(
        st.lists(
            st.tuples(st.integers(0, 3), st.integers(0, 10**6), st.binary(max_size=8)),
            max_size=4,
        )
    )
    for kind, where, chunk in edits:
        at = where % (len(data) + 1)
        if kind == 0:
            data = data[:at] + chunk + data[at:]
        elif kind == 1:
            data = data[:at]
        elif kind == 2 and data:
            i = where % len(data)
            data = data[:i] + bytes([data[i] ^ (1 + where % 255)]) + data[i + 1 :]
        else:
            data = data[:at] + data[at + len(chunk) :]
    return data


@st.composite
def rawKeys(draw: Any, real: list[bytes]) -> bytes:
    """
    A C-path key: a real one mutated, or a random socket address in front of
    real (or mutated) control data.
    """
    base = draw(st.sampled_from(real))
    if draw(st.booleans()):
        return _mutateBytes(base, draw)
    family = draw(st.sampled_from([socket.AF_INET, socket.AF_INET6, 0, 1, 255]))
    size = 16 if family == socket.AF_INET else 28
    control = (
        base[28:] if struct.unpack_from("=H", base)[0] == socket.AF_INET6 else base[16:]
    )
    addr = struct.pack("=H", family) + draw(
        st.binary(min_size=size - 2, max_size=size - 2)
    )
    return addr + _mutateBytes(control, draw)


ADDRESSES = st.one_of(
    st.tuples(
        st.ip_addresses(v=6).map(str),
        st.integers(0, 65535),
        st.integers(0, 2**20 - 1),
        st.integers(0, 2**32 - 1) | st.just(0),
    ),
)


@st.composite
def tupleKeys(draw: Any, real: list[Any]) -> Any:
    """
    A pure-Python-path key: a random peer with real control messages, some
    mutated, dropped, duplicated or of another kind.
    """
    addr, ancdata = draw(st.sampled_from(real))
    if draw(st.booleans()):
        addr = draw(ADDRESSES)
    items = []
    for level, kind, data in ancdata:
        if draw(st.integers(0, 4)) == 0:
            continue
        if draw(st.booleans()):
            data = _mutateBytes(data, draw)
        if draw(st.integers(0, 5)) == 0:
            level = draw(st.sampled_from([L.SOL_IP, L.SOL_IPV6, L.SOL_SOCKET, 99]))
            kind = draw(st.integers(0, 80))
        items.append((level, kind, data))
    if draw(st.booleans()):
        items.append(
            (
                draw(st.sampled_from([L.SOL_IP, L.SOL_IPV6])),
                draw(st.integers(0, 80)),
                draw(st.binary(max_size=40)),
            )
        )
    return (addr, tuple(items))


@pytest.mark.parametrize("path", PATHS)
def test_fuzzedBatchesAreDeliveredOrCounted(epollReactor: Any, path: io.Path) -> None:
    proto = Recorder()
    port = DestinationPort(0, proto, "::", reactor=epollReactor)
    port.ioPath = path
    port.startListening()
    real = _realKeys(path)
    keys = rawKeys(real) if path is io.BATCHED else tupleKeys(real)

    @settings(
        max_examples=200,
        deadline=None,
        suppress_health_check=[
            HealthCheck.function_scoped_fixture,
            HealthCheck.too_slow,
        ],
    )
    @given(
        st.lists(
            st.tuples(st.binary(max_size=64), keys, FLAGS), min_size=1, max_size=20
        )
    )
    def check(batch: list[tuple[bytes, Any, int]]) -> None:
        c = port.counters
        before = (proto.seen, c.received, c.oversized, c.unreadable)
        assert port._delivered(*io.dispatch(batch, port._handlers()))
        delivered = proto.seen - before[0]
        assert c.received - before[1] == delivered
        assert delivered + (c.oversized - before[2]) + (
            c.unreadable - before[3]
        ) == len(batch)

    try:
        check()
    finally:
        port.stopListening()

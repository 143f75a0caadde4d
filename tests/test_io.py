"""
The two I/O paths of L{udpdst.io} on real loopback sockets: the C extension's
batched path is built where a compiler is, and both paths deliver the same
C{(data, addr, dst)} and reply from the same sources; replies written in a
read pass go out in order, and failed sends are counted, never raised.
"""

from __future__ import annotations

import os
import pickle
import shutil
import socket
import time
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet import error
from twisted.internet.defer import Deferred
from twisted.internet.protocol import DatagramProtocol
from twisted.logger import globalLogPublisher

import udpdst
from tests.conftest import HAVE_IPV6
from tests.kernel import flood, memInfo
from udpdst import PeerAddress, io
from udpdst.port import IO_PATH, DestinationPort

PATHS = [pytest.param(io.PLAIN, id="recvmsg")] + (
    [pytest.param(io.BATCHED, id="recvmmsg")] if io.BATCHED is not None else []
)


def test_ioPathInUse() -> None:
    """
    Where a compiler exists the install builds the C extension, and ports use
    it unless C{UDPDST_IO=python} asks for the pure-Python path.
    """
    if os.environ.get("UDPDST_IO") == "python":
        assert IO_PATH == io.DEFAULT.name == "recvmsg"
    elif shutil.which("gcc") or shutil.which("cc"):
        assert io.BATCHED is not None, "udpdst._mmsg was not built"
        assert IO_PATH == "recvmmsg"
    else:
        assert IO_PATH in ("recvmmsg", "recvmsg")
    assert DestinationPort.ioPath is io.DEFAULT


class Recorder(udpdst.DestinationDatagramProtocol):
    """
    Records what it is given and echoes it, naming the destination.
    """

    def __init__(self) -> None:
        self.seen: list[tuple[bytes, Any, Any]] = []

    def datagramReceived(self, data: bytes, addr: Any, dst: Any) -> None:
        self.seen.append((data, addr, dst))
        self.transport.write(data, addr, dst)


def _listen(reactor: Any, path: io.Path, interface: str, proto: Any, **kw: Any) -> Any:
    port = DestinationPort(0, proto, interface, reactor=reactor, **kw)
    port.ioPath = path
    port.startListening()
    return port


def _drain(port: Any, until: Any, timeout: float = 10.0) -> None:
    """
    Run read passes until C{until()} holds (loopback delivery is normally
    immediate; the bound only matters on a loaded machine).
    """
    deadline = time.monotonic() + timeout
    while not until():
        port.doRead()
        if time.monotonic() > deadline:
            raise AssertionError("datagrams did not arrive in time")
        if not until():
            time.sleep(0.001)


def _connected(port: Any) -> socket.socket:
    """
    A client socket connected to C{port} through 127.0.0.2, so that only a
    reply from that address reaches it.
    """
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client.connect(("127.0.0.2", port.getHost().port))
    return client


def _replies(sock: socket.socket, count: int, timeout: float = 10.0) -> list[Any]:
    sock.settimeout(timeout)
    return [sock.recvfrom(70000) for _ in range(count)]


V4_DESTINATIONS = ["127.0.0.1", "127.0.0.2", "127.0.0.3"]


class Answerer(udpdst.DestinationDatagramProtocol):
    """
    Records what it is given and answers each datagram as the next of
    C{answers} says (see L{ANSWERS}), recording what the write raised; at
    C{closeAt}, it first closes the socket under the port.
    """

    def __init__(self, answers: list[str], closeAt: int | None) -> None:
        self.answers = answers
        self.closeAt = closeAt
        self.seen: list[tuple[bytes, Any, Any]] = []
        self.raised: list[str | None] = []

    def datagramReceived(self, data: bytes, addr: Any, dst: Any) -> None:
        if len(self.seen) == self.closeAt:
            self.transport.socket.close()
        self.seen.append((data, addr, dst))
        self.raised.append(answer(self.transport, self.answers.pop(0), data, addr, dst))


#: How L{answer} may answer: through C{write}'s fast path, with an address
#: rebuilt (the Python C{write}), or to an address no socket can send to
#: (a port above 65535 or below 0, a zone above 2**32 - 1).
ANSWERS = ["echo", "echo", "rebuilt", "port 65536", "port -1", "scope 2**32"]


def answer(port: Any, how: str, data: bytes, addr: Any, dst: Any) -> str | None:
    """
    Write C{data} back to C{addr} as C{how} says; the name of the exception
    the write raised, or L{None}.
    """
    try:
        if how == "echo":
            port.write(data, addr, dst)
        elif how == "rebuilt":
            port.write(data, (addr[0], addr[1]), dst)
        elif how.startswith("port"):
            port.write(data, (addr[0], int(how[5:])))
        else:
            port.write(data, ("fe80::1%4294967296", addr[1]))
    except Exception as e:
        return type(e).__name__
    return None


@pytest.mark.skipif(io.BATCHED is None, reason="udpdst._mmsg is not built")
@pytest.mark.parametrize(
    "interface",
    [
        "0.0.0.0",
        pytest.param("::", marks=pytest.mark.skipif(not HAVE_IPV6, reason="no IPv6")),
    ],
)
def test_bothPathsAgree(epollReactor: Any, interface: str) -> None:
    """
    The same datagrams from the same sockets to the same addresses, answered
    the same way: both paths deliver identical C{(data, addr, dst)} (up to
    the server's port number), count the same oversized datagrams, and reply
    from identical sources.  Writes off the fast path agree too: an address
    no socket can send to (a port outside 0-65535, a zone above 2**32 - 1)
    raises C{InvalidAddressError}; a socket closed in the middle of a read
    pass fails the replies queued in it, and a write after the port closed
    fails; every write is either sent or counted in C{sendErrors}.
    """
    maxSize = 300
    destinations = V4_DESTINATIONS + (["::1"] if interface == "::" else [])
    clients = []
    for host in ("127.0.0.1", "127.0.0.4") + (("::1",) if interface == "::" else ()):
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        c = socket.socket(family, socket.SOCK_DGRAM)
        c.bind((host, 0))
        clients.append(c)

    def serve(
        path: io.Path,
        plan: list[tuple[int, str, bytes, str]],
        closeAt: int | None,
    ) -> tuple[Any, ...]:
        """
        Send C{plan} to a new port on C{path}, answer it in one read pass,
        then close the port and write to it once more each way.
        """
        for c in clients:
            # What an earlier example that failed left unread.
            c.setblocking(False)
            while True:
                try:
                    c.recv(70000)
                except BlockingIOError:
                    break
        expected = [
            e
            for e in plan
            if (clients[e[0]].family == socket.AF_INET6) == (":" in e[1])
        ]
        whole = [e for e in expected if len(e[2]) <= maxSize]
        proto = Answerer([e[3] for e in whole], closeAt)
        port = _listen(epollReactor, path, interface, proto, maxPacketSize=maxSize)
        # The test reads; the reactor must not hold a descriptor that the
        # protocol may close under it (and the next port may reuse).
        epollReactor.removeReader(port)
        server = port.socket
        try:
            here = port.getHost().port
            for index, host, payload, _ in expected:
                # Each queued (or dropped) before the next: one pass sees all.
                flood(clients[index], (host, here), 1, payload, lambda: memInfo(server))
            port.doRead()
            assert len(proto.seen) + port.counters.oversized == len(expected)
            closed = closeAt is not None and closeAt < len(whole)
            sources = []
            for index, _host, payload, how in whole:
                if how in ("echo", "rebuilt") and not closed:
                    data, source = _replies(clients[index], 1)[0]
                    assert data == payload
                    sources.append((source[0], source[1] == here))
            # The reactor's part of stopListening, at once.
            port.connectionLost()
            late = []
            if proto.seen:
                _, addr, dst = proto.seen[-1]
                late = [
                    answer(port, how, b"late", addr, dst)
                    for how in ("echo", "rebuilt", "port 65536")
                ]
        finally:
            if port.connected:
                port.connectionLost()
        seen = [
            (
                data,
                tuple(addr),
                (dst.host, dst.ifindex, dst.replyFrom, dst.port == here),
            )
            for data, addr, dst in proto.seen
        ]
        writes = len(proto.raised) + len(late)
        counters = port.counters
        # Every write was sent, or counted as not sent.
        assert counters.replied == len(sources)
        assert counters.replied + counters.sendErrors == writes
        assert [s[0] for s in seen] == [e[2] for e in whole]
        # Raised where Twisted raises (at write time), as InvalidAddressError.
        invalid = "InvalidAddressError"
        assert proto.raised == [
            None if e[3] in ("echo", "rebuilt") else invalid for e in whole
        ]
        assert late == ([None, None, invalid] if whole else [])
        return (
            seen,
            sources,
            proto.raised,
            late,
            counters.oversized,
            counters.replied,
            counters.sendErrors,
        )

    @settings(
        max_examples=25,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture],
    )
    @given(
        st.lists(
            st.tuples(
                st.integers(0, len(clients) - 1),
                st.sampled_from(destinations),
                st.binary(max_size=maxSize + 40),
                st.sampled_from(ANSWERS),
            ),
            min_size=1,
            max_size=40,
        ),
        st.one_of(st.none(), st.integers(0, 39)),
    )
    def check(plan: list[tuple[int, str, bytes, str]], closeAt: int | None) -> None:
        plain = serve(io.PLAIN, plan, closeAt)
        batched = serve(io.BATCHED, plan, closeAt)  # type: ignore[arg-type]
        assert plain == batched

    try:
        check()
    finally:
        for c in clients:
            c.close()


class Burst(DatagramProtocol):
    """
    Answers each datagram with three numbered replies.
    """

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        for i in range(3):
            self.transport.write(data + b"-%d" % i, addr)


@pytest.mark.parametrize("path", PATHS)
def test_repliesOfAPassLeaveInOrder(epollReactor: Any, path: io.Path) -> None:
    """
    Replies written during a read pass are queued and sent when it ends, all
    of them, in the order they were written, from the address asked.
    """
    port = _listen(epollReactor, path, "0.0.0.0", Burst())
    client = _connected(port)
    try:
        # 180 replies fit the client's default receive buffer.
        for n in range(60):
            client.send(b"%d" % n)
        _drain(port, lambda: port.counters.received >= 60)
        got = [reply for reply, _ in _replies(client, 180)]
    finally:
        client.close()
        port.stopListening()
    assert got == [b"%d-%d" % (n, i) for n in range(60) for i in range(3)]
    assert port.counters.replied == 180


@pytest.mark.parametrize("path", PATHS)
def test_lastReplyOfADrainedBatchIsNotHeld(epollReactor: Any, path: io.Path) -> None:
    """
    Replies are held while more datagrams of the pass may come; the reply to
    the last datagram of a batch that emptied the socket goes out at once,
    with the held ones before it (a single request in flight must not wait
    for the end of the pass).
    """

    class Watch(udpdst.DestinationDatagramProtocol):
        sentAfterWrite: list[int] = []

        def datagramReceived(self, data: bytes, addr: Any, dst: Any) -> None:
            self.transport.write(data, addr, dst)
            self.sentAfterWrite.append(port.counters.replied)

    proto = Watch()
    port = _listen(epollReactor, path, "0.0.0.0", proto)
    client = _connected(port)
    try:
        for n in range(3):
            client.send(b"%d" % n)
        _drain(port, lambda: port.counters.received >= 3)
        got = [reply for reply, _ in _replies(client, 3)]
    finally:
        client.close()
        port.stopListening()
    assert proto.sentAfterWrite == [0, 0, 3]
    assert got == [b"0", b"1", b"2"]


@pytest.mark.parametrize("path", PATHS)
def test_replacedProtocolGetsTheNextDatagram(epollReactor: Any, path: io.Path) -> None:
    """
    A protocol put in C{port.protocol} while the port runs (the service does
    so on reload) gets the next datagram, as its own kind: here a plain
    protocol is replaced by a destination-aware one.
    """

    class Plain(DatagramProtocol):
        seen: list[bytes] = []

        def datagramReceived(self, data: bytes, addr: Any) -> None:
            self.seen.append(data)

    first = Plain()
    port = _listen(epollReactor, path, "0.0.0.0", first)
    client = _connected(port)
    try:
        client.send(b"one")
        _drain(port, lambda: port.counters.received == 1)
        second = Recorder()
        port.protocol = second
        second.makeConnection(port)
        client.send(b"two")
        _drain(port, lambda: port.counters.received == 2)
        assert _replies(client, 1)[0][0] == b"two"
    finally:
        client.close()
        port.stopListening()
    assert first.seen == [b"one"]
    ((data, _, dst),) = second.seen
    assert data == b"two" and dst.host == "127.0.0.2"


@pytest.mark.parametrize("path", PATHS)
def test_reboundDatagramReceivedGetsTheNextBatch(
    epollReactor: Any, path: io.Path
) -> None:
    """
    A protocol that rebinds its own C{datagramReceived} (a state machine) is
    called through the new one from the next batch on.
    """

    class Stateful(DatagramProtocol):
        def __init__(self) -> None:
            self.seen: list[tuple[str, bytes]] = []

        def datagramReceived(self, data: bytes, addr: Any) -> None:
            self.seen.append(("first", data))
            self.datagramReceived = self.later  # type: ignore[method-assign]

        def later(self, data: bytes, addr: Any) -> None:
            self.seen.append(("later", data))

    proto = Stateful()
    port = _listen(epollReactor, path, "0.0.0.0", proto)
    client = _connected(port)
    try:
        client.send(b"a")
        _drain(port, lambda: port.counters.received == 1)
        client.send(b"b")
        _drain(port, lambda: port.counters.received == 2)
    finally:
        client.close()
        port.stopListening()
    assert proto.seen == [("first", b"a"), ("later", b"b")]


@pytest.mark.parametrize("path", PATHS)
def test_nestedPassesThatStopLoseNothing(epollReactor: Any, path: io.Path) -> None:
    """
    A protocol that runs a read pass from inside its own call, both passes
    stopping early: what each left is delivered when reading resumes, every
    datagram once.
    """

    class Nested(DatagramProtocol):
        def __init__(self) -> None:
            self.got: list[bytes] = []

        def datagramReceived(self, data: bytes, addr: Any) -> None:
            self.got.append(data)
            if data == b"0":
                port.doRead()
            elif data == b"66":
                port.stopReading()

    proto = Nested()
    port = _listen(epollReactor, path, "0.0.0.0", proto)
    client = _connected(port)
    try:
        for n in range(70):
            client.send(b"%d" % n)
        port.doRead()
        port.startReading()
        _drain(port, lambda: len(proto.got) >= 70)
    finally:
        client.close()
        port.stopListening()
    assert sorted(proto.got) == sorted(b"%d" % n for n in range(70))


@pytest.mark.parametrize("path", PATHS)
def test_sameKeyGivesTheSameAddressObject(epollReactor: Any, path: io.Path) -> None:
    """
    The peer address of a known (peer, destination) is reused, not rebuilt;
    a copy or pickle of it carries the destination but no port state.
    """
    proto = Recorder()
    port = _listen(epollReactor, path, "0.0.0.0", proto)
    client = _connected(port)
    try:
        client.send(b"a")
        client.send(b"b")
        _drain(port, lambda: len(proto.seen) == 2)
    finally:
        client.close()
        port.stopListening()
    (_, first, dst1), (_, second, dst2) = proto.seen
    assert first is second and dst1 is dst2
    copied = pickle.loads(pickle.dumps(first))
    assert copied == first and copied.destination == dst1
    assert copied._reply is None and first._reply is not None


@pytest.mark.parametrize("path", PATHS)
def test_sendErrorsAreCountedNotRaised(epollReactor: Any, path: io.Path) -> None:
    """
    A reply the kernel refuses (here: to port 0, EINVAL, nothing is sent) is
    counted in C{sendErrors}, in a read pass and outside one; errors known at
    C{write} time raise and are counted too.
    """

    class ToPortZero(DatagramProtocol):
        def datagramReceived(self, data: bytes, addr: Any) -> None:
            self.transport.write(data, (addr[0], 0))
            self.transport.write(data, addr)

    port = _listen(epollReactor, path, "0.0.0.0", ToPortZero())
    client = _connected(port)
    try:
        client.send(b"x")
        _drain(port, lambda: port.counters.received == 1)
        assert _replies(client, 1)[0][0] == b"x"
        port.write(b"y", ("127.0.0.1", 0))
        with pytest.raises(error.MessageLengthError):
            port.write(b"z" * 65508, ("127.0.0.1", 9))
        with pytest.raises(error.InvalidAddressError):
            port.write(b"z", ("example.invalid", 9))
    finally:
        client.close()
        port.stopListening()
    assert port.counters.replied == 1
    assert port.counters.sendErrors == 4


@pytest.mark.skipif(not HAVE_IPV6, reason="no IPv6")
@pytest.mark.parametrize("path", PATHS)
def test_largestDatagramPerFamily(epollReactor: Any, path: io.Path) -> None:
    """
    C{MessageLengthError} is raised at C{write} time exactly above the
    largest UDP payload of the peer's family (65507 for IPv4, also mapped on
    a dual-stack socket, 65527 for IPv6), never found only when sending.
    """
    proto = Recorder()
    port = _listen(epollReactor, path, "::", proto, maxPacketSize=65536)
    receivers = {}
    for host in ("127.0.0.1", "::1"):
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        r = socket.socket(family, socket.SOCK_DGRAM)
        r.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        r.bind((host, 0))
        r.sendto(b"hi", ("127.0.0.2" if host[0] == "1" else "::1", port.getHost().port))
        receivers[host] = r
    try:
        _drain(port, lambda: len(proto.seen) == 2)
        for r in receivers.values():
            _replies(r, 1)
        for (_, addr, dst), (host, limit) in zip(
            proto.seen, [("127.0.0.1", 65507), ("::1", 65527)], strict=True
        ):
            port.write(b"x" * limit, addr, dst)
            assert len(_replies(receivers[host], 1)[0][0]) == limit
            with pytest.raises(error.MessageLengthError):
                port.write(b"x" * (limit + 1), addr, dst)
    finally:
        for r in receivers.values():
            r.close()
        port.stopListening()


@pytest.mark.parametrize("path", PATHS)
def test_protocolErrorIsLoggedWithItsTraceback(
    epollReactor: Any, path: io.Path
) -> None:
    """
    An exception from the protocol (raised in C{_mmsg.read} on the C path)
    is logged once, with the exception and its traceback; the datagrams
    after it are still delivered.
    """

    class Fragile(Recorder):
        def datagramReceived(self, data: bytes, addr: Any, dst: Any) -> None:
            Recorder.datagramReceived(self, data, addr, dst)
            if data == b"bad":
                raise ValueError("boom")

    proto = Fragile()
    port = _listen(epollReactor, path, "0.0.0.0", proto)
    client = _connected(port)
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        for data in (b"good", b"bad", b"good"):
            client.send(data)
        _drain(port, lambda: len(proto.seen) == 3)
    finally:
        globalLogPublisher.removeObserver(events.append)
        client.close()
        port.stopListening()
    failures = [e["log_failure"] for e in events if "log_failure" in e]
    assert len(failures) == 1
    assert failures[0].check(ValueError) and str(failures[0].value) == "boom"
    assert "datagramReceived" in failures[0].getTraceback()
    assert [data for data, _, _ in proto.seen] == [b"good", b"bad", b"good"]
    assert port.counters.received == 3


@pytest.mark.parametrize("path", PATHS)
def test_writesBesideTheFastPath(epollReactor: Any, path: io.Path) -> None:
    """
    What the fast path of C{write} (C{io.QueuedWrite} where the C path runs)
    leaves to the Python C{write} is still sent, and from the right source:
    a C{bytearray} or C{memoryview}, a rebuilt address, another
    destination than the address carries, and an address another port made.
    """

    class Variants(udpdst.DestinationDatagramProtocol):
        def datagramReceived(self, data: bytes, addr: Any, dst: Any) -> None:
            write = self.transport.write
            write(bytearray(b"bytearray"), addr)
            write(memoryview(b"memoryview"), addr, dst)
            write(b"rebuilt", (addr[0], addr[1]), dst)
            write(b"other", addr, udpdst.Destination("127.0.0.3", 0, 0, "127.0.0.3"))
            write(b"fast", addr, dst)
            other.write(b"foreign", addr)

    class Quiet(DatagramProtocol):
        pass

    other = _listen(epollReactor, path, "0.0.0.0", Quiet())
    port = _listen(epollReactor, path, "0.0.0.0", Variants())
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client.bind(("127.0.0.1", 0))
    try:
        client.sendto(b"go", ("127.0.0.2", port.getHost().port))
        _drain(port, lambda: port.counters.received == 1)
        got = {data: source for data, source in _replies(client, 6)}
    finally:
        client.close()
        port.stopListening()
        other.stopListening()
    here = port.getHost().port
    assert got == {
        b"bytearray": ("127.0.0.2", here),
        b"memoryview": ("127.0.0.2", here),
        b"rebuilt": ("127.0.0.2", here),
        b"other": ("127.0.0.3", here),
        b"fast": ("127.0.0.2", here),
        b"foreign": ("127.0.0.2", other.getHost().port),
    }
    assert port.counters.replied == 5 and other.counters.replied == 1


def test_writeKeepsItsNames() -> None:
    """
    C{DestinationPort.write} names itself as the method it is, also where
    C{io.QueuedWrite} stands in for it (documentation tools, logs).
    """
    write = DestinationPort.write
    assert (write.__name__, write.__qualname__, write.__module__) == (
        "write",
        "DestinationPort.write",
        "udpdst.port",
    )
    assert write.__doc__ is not None and "Send a datagram" in write.__doc__


def test_peerAddressStaysAPlainValue() -> None:
    """
    C{PeerAddress(host, port, destination)} is still the public constructor.
    """
    peer = PeerAddress("127.0.0.1", 5, None)
    assert peer == ("127.0.0.1", 5) and peer._reply is None


def test_icmpErrorsDoNotStopThePort(anyReactor: Any) -> None:
    """
    Replies to clients that are gone come back as ICMP port unreachable;
    with C{IP_RECVERR} on they land in the error queue, which pollers report
    as an error event.  The port reads and counts them and keeps answering,
    on every reactor.
    """
    from tests.reactors import runUntil
    from tests.test_loopback import ask

    class LateEcho(DatagramProtocol):
        def datagramReceived(self, data: bytes, addr: Any) -> None:
            anyReactor.callLater(0.05, self.transport.write, data, addr)

    port = udpdst.listenUDP(0, LateEcho(), "0.0.0.0", reactor=anyReactor)
    number = port.getHost().port

    def run() -> Any:
        for _ in range(3):
            gone = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            gone.sendto(b"bye", ("127.0.0.2", number))
            gone.close()
        d = Deferred()
        # After the replies to the closed sockets have bounced.
        anyReactor.callLater(
            0.5, lambda: ask(anyReactor, "127.0.0.2", number).chainDeferred(d)
        )
        return d

    try:
        answer = runUntil(anyReactor, run)
    finally:
        port.stopListening()
    assert answer == b"ping"
    assert port.counters.replied == 4
    assert port.counters.icmpErrors == 3

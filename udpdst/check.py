"""
The deployment check: probe every local address of this host on a UDP echo
port, each from a connected socket, and tell which addresses answered from
themselves, which from another source, which refused (nothing listens on the
port there) and which did not answer at all.

It diagnoses any UDP echo server, not only udpdst's.  Each probe is a
connected socket (so, as for any real client, the kernel drops a reply from
another source) with a second socket bound to the same local address and
port that catches such replies, so the check can name the wrong source.

Probes of global, ULA and host addresses are sent from the loopback address
of their family (C{127.0.0.1}, C{::1}): the kernel's own choice of a reply's
source for that client is then never the address asked, so a server that
leaves the source to the kernel fails there, as it does for remote clients of
its secondary addresses.  A link-local address is probed from itself (with
its scope): a reply to a link-local client needs that client's interface.
"""

from __future__ import annotations

import ipaddress
import os
import selectors
import socket
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from udpdst import _rtnetlink
from udpdst.address import formatHostPort
from udpdst.echo.config import Config

#: Address flags (linux/if_addr.h).
IFA_F_SECONDARY = 0x01
IFA_F_DADFAILED = 0x08
IFA_F_TENTATIVE = 0x40

#: The verdicts of one probe.
OK = "ok"
WRONG_SOURCE = "wrong source"
NO_ANSWER = "no answer"
REFUSED = "refused (nothing listening)"


class CheckError(Exception):
    """
    The check cannot run; C{str(error)} is one line naming the cause and the
    fix.
    """


@dataclass(frozen=True, slots=True)
class LocalAddress:
    """
    One address of one interface of this host.

    @ivar host: The address, without a scope.
    @ivar interface: The name of its interface.
    @ivar ifindex: The index of its interface.
    @ivar secondary: An IPv4 address that is not the first of its subnet on
        its interface (the kernel's choice of source prefers the first).
    @ivar unusable: Why the address cannot be probed (C{"tentative"}: IPv6
        duplicate address detection is not done; C{"duplicate"}: it failed),
        or L{None}.
    """

    host: str
    interface: str
    ifindex: int
    secondary: bool = False
    unusable: str | None = None

    @property
    def family(self) -> socket.AddressFamily:
        return socket.AF_INET6 if ":" in self.host else socket.AF_INET

    @property
    def linkLocal(self) -> bool:
        return ipaddress.ip_address(self.host).is_link_local

    @property
    def scoped(self) -> str:
        """
        The host as a client names it: with its scope (C{fe80::2%eth0}) if it
        is IPv6 link-local.
        """
        if self.family == socket.AF_INET6 and self.linkLocal:
            return f"{self.host}%{self.interface}"
        return self.host

    def describe(self, port: int) -> str:
        text = formatHostPort(self.scoped, port)
        return f"{text} (secondary)" if self.secondary else text


def localAddresses() -> list[LocalAddress]:
    """
    Every address of every interface of this host (of this network
    namespace), IPv4 and IPv6, in the kernel's order, from netlink.

    @raise CheckError: Netlink fails.
    """
    try:
        found = _rtnetlink.addresses()
    except OSError as e:
        raise CheckError(f"cannot list this host's addresses: {e}") from None
    result = []
    for address in found:
        unusable = None
        if address.flags & IFA_F_DADFAILED:
            unusable = "duplicate (duplicate address detection failed)"
        elif address.flags & IFA_F_TENTATIVE:
            unusable = "tentative (duplicate address detection not done)"
        result.append(
            LocalAddress(
                host=address.host,
                interface=_interfaceName(address.ifindex),
                ifindex=address.ifindex,
                secondary=bool(
                    address.family == socket.AF_INET and address.flags & IFA_F_SECONDARY
                ),
                unusable=unusable,
            )
        )
    return result


def _interfaceName(ifindex: int) -> str:
    try:
        return socket.if_indextoname(ifindex)
    except OSError:
        return str(ifindex)


@dataclass(frozen=True, slots=True)
class Answer:
    """
    A reply to a probe.

    @ivar data: What came back.
    @ivar source: Where it came from: C{(host, port)}, the host with its
        scope if link-local.
    @ivar fromTarget: Whether it came from the address and port asked (it
        reached the connected socket).
    """

    data: bytes
    source: tuple[str, int]
    fromTarget: bool


class Probe:
    """
    A UDP client connected to one address and port, so that the kernel drops
    replies from any other source, as it does for real clients; and a catcher
    socket bound to the same local address and port, which receives the
    replies the connected socket refuses.

    @ivar refused: Whether the kernel reported the target's port unreachable
        (an ICMP error on the connected socket: nothing listens there).
    """

    refused = False

    def __init__(
        self,
        target: str,
        port: int,
        source: str | None = None,
        sourcePort: int = 0,
    ) -> None:
        """
        @param target: The address to ask; IPv6 link-local with its scope
            (C{fe80::2%eth0}).
        @param source: The local address to send from; L{None} for the
            kernel's choice.
        @param sourcePort: The local port to send from; 0 for any.
        """
        family = socket.AF_INET6 if ":" in target else socket.AF_INET
        address = socket.getaddrinfo(target, port, family, socket.SOCK_DGRAM)[0][4]
        wildcard = "::" if family == socket.AF_INET6 else "0.0.0.0"
        self.catcher = socket.socket(family, socket.SOCK_DGRAM)
        self.connected = socket.socket(family, socket.SOCK_DGRAM)
        try:
            for s in (self.catcher, self.connected):
                s.setblocking(False)
                # Both sockets share one local address and port; the kernel
                # prefers the connected one for replies from the target.
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if source is None:
                # Let connect() pick the source as for any client, then give
                # the catcher the same one.
                self.connected.bind((wildcard, sourcePort))
                self.connected.connect(address)
                self.catcher.bind(self.connected.getsockname())
            else:
                local = socket.getaddrinfo(
                    source, sourcePort, family, socket.SOCK_DGRAM
                )
                self.catcher.bind(local[0][4])
                self.connected.bind(self.catcher.getsockname())
                self.connected.connect(address)
        except BaseException:
            self.close()
            raise

    @property
    def local(self) -> tuple[str, int]:
        """
        The address and port the probe sends from.
        """
        host, port = self.connected.getsockname()[:2]
        return host, port

    def send(self, data: bytes) -> None:
        self.connected.send(data)

    def receive(self, sock: socket.socket, size: int = 65536) -> Answer | None:
        """
        Read one reply from C{sock} (one of this probe's sockets), or L{None}
        if none is there.  An ICMP port unreachable (nothing listening) reads
        as no reply and sets L{refused}.
        """
        try:
            data, source = sock.recvfrom(size)
        except BlockingIOError:
            return None
        except ConnectionRefusedError:
            self.refused = True
            return None
        host = source[0]
        if len(source) == 4 and source[3]:
            host = f"{host}%{_interfaceName(source[3])}"
        return Answer(data, (host, source[1]), sock is self.connected)

    def sockets(self) -> tuple[socket.socket, socket.socket]:
        return (self.connected, self.catcher)

    def close(self) -> None:
        self.connected.close()
        self.catcher.close()

    def __enter__(self) -> Probe:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def askAll(
    probes: Sequence[Probe],
    payloads: Sequence[bytes],
    timeout: float,
    attempts: int = 3,
    echoed: bool = True,
) -> list[Answer | None]:
    """
    Send each probe its payload and wait, up to C{timeout} seconds in all,
    for an answer to each: the first reply that contains the payload (any
    reply, unless C{echoed}).  Unanswered probes are sent again, up to
    C{attempts} times in all, spread over the timeout, in case a datagram
    was lost.  A probe the kernel refused (L{Probe.refused}) is not waited
    for.

    @return: Per probe, its answer or L{None}.
    """
    answers: list[Answer | None] = [None] * len(probes)
    with selectors.DefaultSelector() as selector:
        for i, probe in enumerate(probes):
            for s in probe.sockets():
                selector.register(s, selectors.EVENT_READ, i)
        start = time.monotonic()
        deadline = start + timeout
        resends = [start + timeout * k / attempts for k in range(attempts)]
        while any(
            answer is None and not probe.refused
            for probe, answer in zip(probes, answers, strict=True)
        ):
            now = time.monotonic()
            if now >= deadline:
                break
            if resends and now >= resends[0]:
                resends.pop(0)
                for probe, payload, answer in zip(
                    probes, payloads, answers, strict=True
                ):
                    if answer is None and not probe.refused:
                        try:
                            probe.send(payload)
                        except OSError:
                            pass  # a probe that cannot send gets no answer
            wake = min([deadline, *resends[:1]])
            for key, _ in selector.select(max(0.0, wake - now)):
                i = key.data
                answer = probes[i].receive(key.fileobj)  # type: ignore[arg-type]
                if answer is not None and answers[i] is None:
                    if not echoed or payloads[i] in answer.data:
                        answers[i] = answer
    return answers


@dataclass(frozen=True, slots=True)
class Result:
    """
    What one probe found.
    """

    address: LocalAddress
    port: int
    answer: Answer | None
    refused: bool = False

    @property
    def verdict(self) -> str:
        if self.answer is None:
            return REFUSED if self.refused else NO_ANSWER
        return OK if self.answer.fromTarget else WRONG_SOURCE

    @property
    def answeredFrom(self) -> str:
        if self.answer is None:
            return "-"
        return formatHostPort(*self.answer.source)


@dataclass(frozen=True, slots=True)
class Target:
    """
    A port to probe on the addresses that a listener serves.

    @ivar address: The listener's address: C{"::"}, C{"0.0.0.0"} or one
        address.
    @ivar v6Only: With C{"::"}, only IPv6 addresses.
    """

    address: str
    port: int
    v6Only: bool = False

    def serves(self, local: LocalAddress) -> bool:
        if self.address == "::":
            return local.family == socket.AF_INET6 or not self.v6Only
        if self.address == "0.0.0.0":
            return local.family == socket.AF_INET
        return self.address in (local.host, local.scoped)


def sourceFor(address: LocalAddress) -> str:
    """
    Where to probe C{address} from: see the module's docstring.
    """
    if address.linkLocal:
        return address.scoped
    return "::1" if address.family == socket.AF_INET6 else "127.0.0.1"


def _openProbe(address: LocalAddress, port: int) -> Probe:
    """
    A probe of C{address} from L{sourceFor}, or from the kernel's choice of
    source where that one is missing (a host without C{::1}).

    @raise CheckError: Neither can be opened.
    """
    try:
        return Probe(address.scoped, port, source=sourceFor(address))
    except OSError:
        pass
    try:
        return Probe(address.scoped, port)
    except OSError as e:
        raise CheckError(
            f"cannot probe {address.describe(port)}: {e.strerror or e}"
        ) from None


def check(
    targets: Iterable[Target], addresses: Sequence[LocalAddress], timeout: float
) -> list[Result]:
    """
    Probe every usable address in C{addresses} that a target serves, all at
    once; wait at most C{timeout} seconds.
    """
    pairs = [
        (target.port, address)
        for target in targets
        for address in addresses
        if address.unusable is None and target.serves(address)
    ]
    probes: list[Probe] = []
    try:
        for port, address in pairs:
            probes.append(_openProbe(address, port))
        nonce = os.urandom(8).hex()
        payloads = [f"udpdst check {nonce} {i}".encode() for i in range(len(probes))]
        answers = askAll(probes, payloads, timeout)
    finally:
        for probe in probes:
            probe.close()
    return [
        Result(address, port, answer, probe.refused)
        for (port, address), answer, probe in zip(pairs, answers, probes, strict=True)
    ]


def formatReport(
    results: Sequence[Result], skipped: Sequence[LocalAddress], notes: Sequence[str]
) -> list[str]:
    """
    The check's table and summary, as lines: address, interface, answered
    from, verdict; then the addresses skipped and why; then one summary line.
    """
    header = ("address", "interface", "answered from", "verdict")
    rows = [
        (r.address.describe(r.port), r.address.interface, r.answeredFrom, r.verdict)
        for r in results
    ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(3)]
    lines = [
        "  ".join(
            [*(cell.ljust(w) for cell, w in zip(row[:3], widths, strict=True)), row[3]]
        )
        for row in [header, *rows]
    ]
    lines += [
        f"skipped {address.scoped} on {address.interface}: {address.unusable}"
        for address in skipped
    ]
    lines += notes
    good = sum(r.verdict == OK for r in results)
    lines.append(f"{good} of {len(results)} addresses answered from themselves")
    return lines


def targetsOf(config: Config) -> tuple[list[Target], list[str]]:
    """
    The ports to probe for the listeners of C{config}, and a note for each
    listener that cannot be probed.
    """
    targets, notes = [], []
    for listener in config.listen:
        if listener.systemd:
            notes.append(
                f"not probed: {listener.describe()} (systemd's sockets); "
                "name the port with --port"
            )
        elif listener.port == 0:
            notes.append(
                f"not probed: {listener.describe()} (any free port); "
                "name the port with --port"
            )
        else:
            targets.append(Target(listener.address, listener.port, listener.v6_only))
    return targets, notes


def run(targets: Sequence[Target], notes: Sequence[str], timeout: float) -> int:
    """
    Probe, print the report, and return the exit status: 0 when every
    address answered from itself, 1 otherwise.

    @raise CheckError: The addresses cannot be listed.
    """
    addresses = localAddresses()
    served = [a for a in addresses if any(t.serves(a) for t in targets)]
    results = check(targets, served, timeout)
    skipped = [a for a in served if a.unusable is not None]
    if not results:
        listeners = ", ".join(formatHostPort(t.address, t.port) for t in targets)
        notes = [*notes, f"no address of this host is served by {listeners}"]
    for line in formatReport(results, skipped, notes):
        print(line)
    return 0 if results and all(r.verdict == OK for r in results) else 1

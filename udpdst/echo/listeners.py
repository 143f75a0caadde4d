"""
The echo service's listeners: one service per socket, bound (or adopted from
systemd) before twistd drops privileges, and the one-line reasons a bind
fails, which the metrics endpoint's bind shares.
"""

from __future__ import annotations

import errno
import os
from typing import Any

from twisted.internet.error import CannotListenError
from twisted.logger import Logger

from udpdst.address import formatHostPort
from udpdst.application import ListeningService
from udpdst.echo.config import ListenConfig
from udpdst.echo.protocol import EchoProtocol
from udpdst.echo.systemd import InheritedSocket, socketFamily
from udpdst.listening import adoptDatagramPort, listenUDP
from udpdst.port import DestinationPort


class ListenError(Exception):
    """
    A listener could not start; C{str(error)} is one line with the cause and
    the fix.
    """


def bindFailure(where: str, e: CannotListenError, udp: bool = True) -> str:
    """
    Why a bind failed and how to fix it, in one line.

    @param where: What could not listen (C{127.0.0.1:7}).
    @param udp: Whether it is a UDP listener (which C{reuse_port} can share).
    """
    cause = e.socketError
    code = getattr(cause, "errno", None)
    if code == errno.EADDRINUSE:
        share = (
            ", or set reuse_port = true in every process that shares it" if udp else ""
        )
        return (
            f"cannot listen on {where}: address already in use; stop the other "
            f"service on that port or choose another port{share}"
        )
    if code in (errno.EACCES, errno.EPERM):
        return (
            f"cannot listen on {where}: permission denied; ports below 1024 need "
            "root (start twistd as root with --uid/--gid to drop privileges after "
            "binding) or CAP_NET_BIND_SERVICE"
        )
    if code == errno.EADDRNOTAVAIL:
        return (
            f"cannot listen on {where}: the address is not on this host; use one "
            'of its addresses, or "::" for all'
        )
    if code == errno.EAFNOSUPPORT:
        return (
            f"cannot listen on {where}: this host has no IPv6; use an IPv4 "
            'address such as "0.0.0.0"'
        )
    reason = getattr(cause, "strerror", None) or str(cause)
    return f"cannot listen on {where}: {reason}"


class ListenerService(ListeningService[DestinationPort]):
    """
    Serve one socket: bind it (or adopt the one systemd passed) in
    L{privilegedStartService}, before twistd drops privileges, and close it
    in L{stopService}.

    @ivar listeningPort: The L{DestinationPort} once listening, else L{None}.
    @ivar protocol: The L{EchoProtocol} serving it.
    """

    _log = Logger()

    def __init__(
        self,
        listener: ListenConfig,
        protocol: EchoProtocol,
        inherited: InheritedSocket | None = None,
        reactor: Any = None,
    ) -> None:
        self.listener = listener
        self.protocol = protocol
        self.inherited = inherited
        self._lastPort: DestinationPort | None = None
        self._address = ""
        self._reactor = reactor

    @property
    def address(self) -> str:
        """
        Where this listener listens (C{[::]:12345}, the real port if the
        configured one was 0), once it does.
        """
        return self._address or self.listener.describe()

    def replaceProtocol(self, protocol: EchoProtocol) -> None:
        """
        Serve the socket with C{protocol} from now on (a reload changed the
        echo's settings), keeping the socket open and the refusal counts.
        """
        old, self.protocol = self.protocol, protocol
        protocol.counters = old.counters
        port = self.listeningPort
        if port is not None:
            # The port reads self.protocol for every batch: the next
            # datagram goes to the new one.
            port.protocol = protocol
            old.doStop()
            protocol.makeConnection(port)

    def counterSources(self) -> tuple[str, Any, Any]:
        """
        Where this listener's counters are: C{(address, port counters or
        None, echo counters)}, for L{udpdst.echo.stats.takeSnapshot}.  The
        port's are read from the kernel first (its drops), so that a
        snapshot agrees with C{/proc/net/udp} when it is taken.
        """
        port = self.listeningPort or self._lastPort
        return (
            self.address,
            port.refreshCounters() if port is not None else None,
            self.protocol.counters,
        )

    def _listen(self) -> DestinationPort:
        listener = self.listener
        if self.inherited is not None:
            fd = self.inherited.fd
            try:
                port = adoptDatagramPort(
                    fd,
                    socketFamily(self.inherited),
                    self.protocol,
                    listener.max_packet_size,
                    self._reactor,
                )
            except Exception as e:
                raise ListenError(
                    f"cannot use systemd socket {fd} ({self.inherited.name}): {e}"
                ) from None
            # The port holds its own duplicate; close ours, so that stopping
            # the port really closes the socket.
            os.close(fd)
            how = f"systemd socket {fd} ({self.inherited.name})"
        else:
            try:
                port = listenUDP(
                    listener.port,
                    self.protocol,
                    listener.address,
                    listener.max_packet_size,
                    self._reactor,
                    reusePort=listener.reuse_port,
                    receiveBufferSize=listener.receive_buffer or None,
                    v6Only=listener.v6_only,
                )
            except CannotListenError as e:
                raise ListenError(bindFailure(listener.describe(), e)) from None
            how = (
                "dual-stack"
                if listener.address == "::" and not listener.v6_only
                else ""
            )
            how = ", ".join(
                x for x in (how, "reuse_port" if listener.reuse_port else "") if x
            )
        self._lastPort = port
        host = port.getHost()
        self._address = formatHostPort(host.host, host.port)
        # The detail is text of the message, not a field: a JSON line
        # carries only fields that mean something on their own.
        self._log.info(
            "udpdst echo listening on {address}"
            + (f" ({_literal(how)})" if how else "")
            + "; replies at most {amplification} bytes larger than requests",
            address=self.address,
            amplification=self.protocol.amplification,
            maxPacketSize=listener.max_packet_size,
            reusePort=listener.reuse_port,
        )
        return port


def _literal(text: str) -> str:
    """
    C{text} as a part of a L{Logger} format string that renders as itself.
    """
    return text.replace("{", "{{").replace("}", "}}")

"""
The echo service's listeners: one service per socket, bound (or adopted from
systemd) before twistd drops privileges, what makes a listener the same
socket across a reload (L{identity}), and the one-line reasons a bind fails,
which the metrics endpoint's bind shares.
"""

from __future__ import annotations

import errno
import os
import socket
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
    in L{stopService}.  A reload binds a new one with L{prepare} before it
    changes anything, and changes an open one's settings with L{update}.

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

    def prepare(self) -> None:
        """
        Bind now, without saying so yet: a reload binds every new listener
        before it changes anything, and L{announce}s them once it applies.

        @raise ListenError: It cannot bind.
        """
        if self.listeningPort is None:
            self.listeningPort = self._bind()

    def update(self, listener: ListenConfig) -> list[str]:
        """
        Apply the settings of C{listener}, which has this listener's
        identity (L{identity}), to the open socket: C{max_packet_size} to
        the port, C{receive_buffer} to C{SO_RCVBUF} (of a socket it bound
        itself: a socket unit sets its own).

        @return: What changed, as phrases for the reload's log line.
        """
        old, self.listener = self.listener, listener
        changes = []
        port = self.listeningPort
        if listener.max_packet_size != old.max_packet_size:
            if port is not None:
                # Read at every read pass: the next batch uses it.
                port.maxPacketSize = listener.max_packet_size
            changes.append(
                f"listener {self.address}: max_packet_size "
                f"{old.max_packet_size} -> {listener.max_packet_size}"
            )
        if listener.receive_buffer != old.receive_buffer and not listener.systemd:
            if port is not None:
                port.receiveBufferSize = listener.receive_buffer or None
                port.socket.setsockopt(
                    socket.SOL_SOCKET,
                    socket.SO_RCVBUF,
                    listener.receive_buffer or _defaultReceiveBuffer(),
                )
            changes.append(
                f"listener {self.address}: receive_buffer "
                f"{old.receive_buffer or 'default'} -> "
                f"{listener.receive_buffer or 'default'}"
            )
        return changes

    def _listen(self) -> DestinationPort:
        port = self._bind()
        self.announce(port)
        return port

    def _bind(self) -> DestinationPort:
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
                    transparent=listener.transparent,
                    replySockets=listener.reply_sockets,
                    replySocketIdleTimeout=listener.reply_socket_idle,
                )
            except CannotListenError as e:
                raise ListenError(
                    bindFailure(f"systemd socket {fd} ({self.inherited.name})", e)
                ) from None
            except Exception as e:
                raise ListenError(
                    f"cannot use systemd socket {fd} ({self.inherited.name}): {e}"
                ) from None
            # The port holds its own duplicate; close ours, so that stopping
            # the port really closes the socket.
            os.close(fd)
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
                    transparent=listener.transparent,
                    replySockets=listener.reply_sockets,
                    replySocketIdleTimeout=listener.reply_socket_idle,
                )
            except CannotListenError as e:
                raise ListenError(bindFailure(listener.describe(), e)) from None
        self._lastPort = port
        host = port.getHost()
        self._address = formatHostPort(host.host, host.port)
        return port

    def announce(self, port: DestinationPort | None = None) -> None:
        """
        Log where this listener listens, and how.
        """
        listener = self.listener
        if self.inherited is not None:
            how = f"systemd socket {self.inherited.fd} ({self.inherited.name})"
        else:
            how = (
                "dual-stack"
                if listener.address == "::" and not listener.v6_only
                else ""
            )
            how = ", ".join(
                x for x in (how, "reuse_port" if listener.reuse_port else "") if x
            )
        served = port if port is not None else self._lastPort
        if served is not None and served.transparent:
            how = ", ".join(x for x in (how, "transparent") if x)
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


def identity(listener: ListenConfig) -> tuple[Any, ...]:
    """
    What makes a listener the same socket across a reload: its address,
    port, C{v6_only}, C{reuse_port}, C{transparent} (set before binding)
    with its reply-socket settings, and systemd name.  Its other settings
    are applied to the open socket (L{ListenerService.update}); a listener
    of another identity is another socket.
    """
    return (
        listener.systemd,
        listener.fd_name,
        listener.address,
        listener.port,
        listener.v6_only,
        listener.reuse_port,
        listener.transparent,
        listener.reply_sockets,
        listener.reply_socket_idle,
    )


def _defaultReceiveBuffer() -> int:
    """
    What to set C{SO_RCVBUF} to for the kernel's default size: half of
    C{net.core.rmem_default}, as the kernel doubles what is set.
    """
    try:
        with open("/proc/sys/net/core/rmem_default") as f:
            return max(1, int(f.read()) // 2)
    except (OSError, ValueError):
        # Linux's usual default.
        return 212992 // 2


def _literal(text: str) -> str:
    """
    C{text} as a part of a L{Logger} format string that renders as itself.
    """
    return text.replace("{", "{{").replace("}", "}}")

"""
systemd socket activation: the datagram sockets a service manager passed to
this process (C{LISTEN_FDS}, C{LISTEN_PID}, C{LISTEN_FDNAMES}, as in
sd_listen_fds(3)), and which C{[[listen]]} entry each one serves.
"""

from __future__ import annotations

import fcntl
import os
import socket
from collections.abc import Iterable, MutableMapping, Sequence
from dataclasses import dataclass

from udpdst.config import ConfigError, ListenConfig

#: The first passed descriptor (SD_LISTEN_FDS_START).
LISTEN_FDS_START = 3

_VARIABLES = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


@dataclass(frozen=True, slots=True)
class InheritedSocket:
    """
    A descriptor passed by the service manager.

    @ivar fd: The descriptor.
    @ivar name: Its name (C{FileDescriptorName=}; systemd's default is the
        socket unit's name), C{"unknown"} if none was given.
    """

    fd: int
    name: str


def listenFds(
    environ: MutableMapping[str, str] | None = None,
    pid: int | None = None,
    unsetEnvironment: bool = True,
) -> list[InheritedSocket]:
    """
    The descriptors passed to this process, as sd_listen_fds(3) finds them:
    only if C{LISTEN_PID} is this process's id, numbered from 3, each marked
    close-on-exec.  The variables are removed afterwards (unless told not
    to), so that child processes do not take the sockets for theirs.

    @param environ: The environment; L{os.environ} by default.
    @param pid: This process's id; L{os.getpid} by default.
    @raise ConfigError: The variables are malformed.
    """
    if environ is None:
        environ = os.environ
    if pid is None:
        pid = os.getpid()
    values = {name: environ.get(name) for name in _VARIABLES}
    if unsetEnvironment:
        for name in _VARIABLES:
            environ.pop(name, None)
    if values["LISTEN_PID"] is None or values["LISTEN_FDS"] is None:
        return []
    try:
        listenPid = int(values["LISTEN_PID"])
        count = int(values["LISTEN_FDS"])
    except ValueError:
        raise ConfigError(
            f"malformed LISTEN_PID={values['LISTEN_PID']!r} or "
            f"LISTEN_FDS={values['LISTEN_FDS']!r}; start udpdst from a systemd "
            "socket unit, or unset them"
        ) from None
    if listenPid != pid or count <= 0:
        return []
    names = (values["LISTEN_FDNAMES"] or "").split(":")
    if len(names) != count:
        names = ["unknown"] * count
    found = []
    for i, name in enumerate(names):
        fd = LISTEN_FDS_START + i
        try:
            flags = fcntl.fcntl(fd, fcntl.F_GETFD)
            fcntl.fcntl(fd, fcntl.F_SETFD, flags | fcntl.FD_CLOEXEC)
        except OSError:
            raise ConfigError(
                f"LISTEN_FDS={count} but descriptor {fd} is not open; "
                "check the socket unit"
            ) from None
        found.append(InheritedSocket(fd, name))
    return found


def socketFamily(inherited: InheritedSocket) -> int:
    """
    The address family of an inherited UDP socket.

    @raise ConfigError: It is not an IPv4 or IPv6 datagram socket.
    """
    try:
        probe = socket.socket(fileno=os.dup(inherited.fd))
    except OSError as e:
        raise ConfigError(
            f"systemd socket {inherited.fd} ({inherited.name}) is not a socket "
            f"({e.strerror}); use ListenDatagram= in the socket unit"
        ) from None
    with probe:
        family, kind = probe.family, probe.type
    if family not in (socket.AF_INET, socket.AF_INET6) or kind != socket.SOCK_DGRAM:
        raise ConfigError(
            f"systemd socket {inherited.fd} ({inherited.name}) is not a UDP "
            "socket; use ListenDatagram=ADDRESS:PORT in the socket unit"
        )
    return family


def assignSockets(
    listeners: Sequence[ListenConfig], inherited: Iterable[InheritedSocket]
) -> list[tuple[ListenConfig, InheritedSocket | None]]:
    """
    Pair each listener with what it serves: a listener with C{systemd =
    false} binds its own socket (paired with L{None}); one with C{fd_name}
    takes the inherited sockets of that name; one without takes all the
    inherited sockets that no named listener took.

    @raise ConfigError: A systemd listener gets no socket.
    """
    available = list(inherited)
    claimed = {
        s.fd
        for listener in listeners
        if listener.systemd and listener.fd_name
        for s in available
        if s.name == listener.fd_name
    }
    pairs: list[tuple[ListenConfig, InheritedSocket | None]] = []
    for listener in listeners:
        if not listener.systemd:
            pairs.append((listener, None))
            continue
        if listener.fd_name:
            mine = [s for s in available if s.name == listener.fd_name]
        else:
            mine = [s for s in available if s.fd not in claimed]
            claimed.update(s.fd for s in mine)
        if not mine:
            if not available:
                raise ConfigError(
                    f"listener {listener.describe()} wants a socket from systemd, "
                    "but none was passed (LISTEN_FDS/LISTEN_PID unset); start it "
                    "through its .socket unit, or give an address and port"
                )
            raise ConfigError(
                f"listener {listener.describe()} matches none of the sockets "
                "systemd passed (names: "
                + ", ".join(sorted({s.name for s in available}))
                + "); fix fd_name or FileDescriptorName="
            )
        for s in mine:
            socketFamily(s)
            pairs.append((listener, s))
    return pairs

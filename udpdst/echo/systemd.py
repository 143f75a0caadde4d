"""
systemd integration: the datagram sockets a service manager passed to this
process (C{LISTEN_FDS}, C{LISTEN_PID}, C{LISTEN_FDNAMES}, as in
sd_listen_fds(3)) and which C{[[listen]]} entry each one serves, and the
state notifications of C{Type=notify} services (sd_notify(3)).
"""

from __future__ import annotations

import fcntl
import os
import socket
import time
from collections.abc import Iterable, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any

from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.systemd import ListenFDs

from udpdst.echo.config import ConfigError, ListenConfig

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
    unsetEnvironment: bool = True,
) -> list[InheritedSocket]:
    """
    The descriptors passed to this process, as sd_listen_fds(3) finds them
    (L{ListenFDs}: only if C{LISTEN_PID} is this process's id, numbered
    from 3), each marked close-on-exec.  The variables are removed
    afterwards (unless told not to), so that child processes do not take
    the sockets for theirs.

    @param environ: The environment; L{os.environ} by default.
    @raise ConfigError: The variables are malformed, or name a descriptor
        that is not open.
    """
    if environ is None:
        environ = os.environ
    values = {name: environ[name] for name in _VARIABLES if name in environ}
    if unsetEnvironment:
        for name in _VARIABLES:
            environ.pop(name, None)
    if "LISTEN_PID" not in values or "LISTEN_FDS" not in values:
        return []
    try:
        int(values["LISTEN_PID"])
        count = int(values["LISTEN_FDS"])
    except ValueError:
        # ListenFDs would ignore them: an operator would never learn why.
        raise ConfigError(
            f"malformed LISTEN_PID={values['LISTEN_PID']!r} or "
            f"LISTEN_FDS={values['LISTEN_FDS']!r}; start udpdst from a systemd "
            "socket unit, or unset them"
        ) from None
    names = values.get("LISTEN_FDNAMES", "").split(":")
    if len(names) != count:
        # ListenFDs takes no descriptors without one name each.
        names = ["unknown"] * max(count, 0)
        values["LISTEN_FDNAMES"] = ":".join(names)
    found = []
    descriptors = ListenFDs.fromEnvironment(values).inheritedDescriptors()
    # Empty if LISTEN_PID is another process's.
    for fd, name in zip(descriptors, names, strict=False):
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


class Notifier:
    """
    Tells the service manager how the service is (sd_notify(3)): a datagram
    of C{NAME=value} lines to the C{NOTIFY_SOCKET} it set, and C{WATCHDOG=1}
    every half C{WATCHDOG_USEC} while the reactor runs.  Without
    C{NOTIFY_SOCKET} it does nothing.
    """

    _log = Logger()

    def __init__(
        self,
        environ: MutableMapping[str, str] | None = None,
        reactor: Any = None,
    ) -> None:
        """
        Read (and remove, as sd_notify(3) with C{unset_environment}, so that
        child processes do not speak for this one) C{NOTIFY_SOCKET},
        C{WATCHDOG_USEC} and C{WATCHDOG_PID}.
        """
        if environ is None:
            environ = os.environ
        path = environ.pop("NOTIFY_SOCKET", "")
        usec = environ.pop("WATCHDOG_USEC", "")
        pid = environ.pop("WATCHDOG_PID", "")
        # "@name" is an abstract socket (a leading NUL byte).
        self.address = "\0" + path[1:] if path.startswith("@") else path
        self._reactor = reactor
        self._watchdog: LoopingCall | None = None
        self.watchdogInterval = 0.0
        if usec.isdigit() and int(usec) > 0 and pid in ("", str(os.getpid())):
            self.watchdogInterval = int(usec) / 2e6
        self._failed = False

    @property
    def enabled(self) -> bool:
        return bool(self.address)

    def notify(self, *assignments: str) -> None:
        """
        Send C{assignments} (C{"READY=1"}, C{"STATUS=..."}) in one datagram.
        A manager that does not listen costs one warning, once.
        """
        if not self.address:
            return
        message = "\n".join(assignments).encode("utf-8")
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
                s.sendto(message, self.address)
        except OSError as e:
            if not self._failed:
                self._failed = True
                self._log.warn(
                    "cannot notify systemd at NOTIFY_SOCKET={path}: {error}",
                    path=self.address.replace("\0", "@"),
                    error=e.strerror or str(e),
                )

    def ready(self, status: str) -> None:
        self.notify("READY=1", f"STATUS={status}")
        if self.watchdogInterval and self._watchdog is None:
            self._watchdog = LoopingCall(self.notify, "WATCHDOG=1")
            if self._reactor is not None:
                self._watchdog.clock = self._reactor
            self._watchdog.start(self.watchdogInterval)

    def reloading(self) -> None:
        # MONOTONIC_USEC lets Type=notify-reload tell this reload from an
        # older one.
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.notify("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def stopping(self) -> None:
        if self._watchdog is not None and self._watchdog.running:
            self._watchdog.stop()
        self._watchdog = None
        self.notify("STOPPING=1")

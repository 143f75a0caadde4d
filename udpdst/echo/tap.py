"""
twistd's C{udpdst} command: its options, and the echo service they build.

Importing this module must stay cheap: C{twistd udpdst --help} imports it,
and the application (ports, reactor) is imported only by L{makeService}.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping
from typing import Any

from twisted.logger import Logger
from twisted.python import usage

from udpdst.echo.config import (
    LISTEN_HELP,
    OPTIONS,
    REUSE_PORT_HELP,
    Config,
    ConfigError,
    loadConfig,
    withOverrides,
)
from udpdst.echo.systemd import assignSockets, listenFds

_log = Logger(namespace="udpdst.echo.tap")


class _ConfigUsageError(usage.UsageError):
    """
    A usage error whose message already says how to fix it.
    """


class Options(usage.Options):
    """
    twistd udpdst [--config FILE] [--listen ADDRESS:PORT]... [--prefix TEXT]
    """

    synopsis = "[--config FILE] [--listen ADDRESS:PORT]... [--prefix TEXT]"
    longdesc = (
        "A UDP echo service (RFC 862) that replies from the address each "
        "datagram was sent to. Without --config it listens on [::]:12345 "
        "(IPv6 and IPv4). Options given here override the config file."
    )
    optFlags = [["reuse-port", None, REUSE_PORT_HELP]]
    optParameters = [
        [
            "config",
            None,
            None,
            "TOML config file (udpdst example-config prints a commented one).",
        ],
        # One per key that has an option, with the key's own description.
        *([option.name, None, None, option.help] for option in OPTIONS),
    ]

    def __init__(self, environ: MutableMapping[str, str] | None = None) -> None:
        """
        @param environ: Where systemd's C{LISTEN_*}, C{NOTIFY_SOCKET} and
            C{WATCHDOG_*} variables are read (and removed); L{os.environ} by
            default.
        """
        usage.Options.__init__(self)
        self["listen"] = []
        self.environ = os.environ if environ is None else environ

    def opt_listen(self, value: str) -> None:
        self["listen"].append(value)

    opt_listen.__doc__ = LISTEN_HELP

    def opt_version(self) -> None:
        """
        Display udpdst's version (and Twisted's) and exit.
        """
        from twisted import copyright

        from udpdst import __version__

        print(f"udpdst {__version__} (Twisted {copyright.version})")
        raise SystemExit(0)

    def readConfig(self) -> Config:
        """
        The configuration: the file, then the command line's overrides (at
        start, and again at each reload).

        @raise ConfigError: It is wrong.
        """
        config = withOverrides(
            loadConfig(self["config"]),
            {option.name: self[option.name] for option in OPTIONS},
            listen=self["listen"],
            reusePort=bool(self["reuse-port"]),
        )
        if config.metrics.listen:
            from udpdst.echo.metrics import MISSING_EXTRA, checkAvailable

            try:
                checkAvailable()
            except ImportError:
                raise ConfigError(MISSING_EXTRA) from None
        return config

    def postOptions(self) -> None:
        try:
            config = self.readConfig()
            inherited = listenFds(self.environ)
            sockets = assignSockets(config.listen, inherited)
        except ConfigError as e:
            raise _ConfigUsageError(str(e)) from None
        if inherited and not any(listener.systemd for listener in config.listen):
            _log.warn(
                "systemd passed {count} sockets but no listener has systemd = "
                "true; they are left unused",
                count=len(inherited),
            )
        self["udpdst"] = config
        self["sockets"] = sockets

    def parseOptions(self, options: Any = None) -> None:
        try:
            usage.Options.parseOptions(self, options)
        except usage.UsageError as e:
            if self.parent is None:
                raise
            # Under twistd, which would print its whole usage text above the
            # error: print just the error, on one line.
            message = str(e)
            if not isinstance(e, _ConfigUsageError):
                message += " (see twistd udpdst --help)"
            raise SystemExit(f"twistd udpdst: {message}") from None


def makeService(options: Options, reactor: Any = None) -> Any:
    """
    Build the echo service from parsed L{Options}.

    @param reactor: The reactor; the global one if L{None}.
    @return: A L{udpdst.echo.service.EchoService}.
    """
    from udpdst.echo import logs
    from udpdst.echo.service import EchoService
    from udpdst.echo.systemd import Notifier

    config = options["udpdst"]
    logs.setLogLevel(config.log.level)
    service = EchoService(
        config,
        options["sockets"],
        reactor,
        twistdOptions=options.parent,
        reloader=options.readConfig,
        notifier=Notifier(options.environ, reactor),
    )
    from udpdst.echo.workers import serveWithWorkers, workerCount

    count = workerCount(config.service.workers)
    if count > 1:
        serveWithWorkers(service, count, reactor)
    return service

"""
A worker process of the udpdst service: it serves the sockets its parent
(L{udpdst.echo.workers}) bound, reports its stats and forwards its log
events to the parent over the line protocol described there, and stops
when the parent is gone.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IReadDescriptor
from twisted.logger import (
    ILogFilterPredicate,
    ILogObserver,
    Logger,
    LogLevel,
    PredicateResult,
    eventAsJSON,
)
from zope.interface import implementer

from udpdst.echo.config import Config, ConfigError, parseConfig
from udpdst.echo.service import EchoService

_log = Logger(namespace="udpdst.echo.worker")

#: Seconds between a worker's stats reports to the parent: what a worker
#: that is killed outright can take with it uncounted.
REPORT_INTERVAL = 1.0


@implementer(IReadDescriptor)
class _ParentWatch:
    """
    Standard input, on which the parent never writes again: its end means
    the parent is gone, and the worker stops.
    """

    def __init__(self, fd: int, gone: Callable[[], None]) -> None:
        self._fd = fd
        self._gone = gone
        os.set_blocking(fd, False)

    def fileno(self) -> int:
        return self._fd

    def logPrefix(self) -> str:
        return "udpdst parent"

    def doRead(self) -> Any:
        try:
            data = os.read(self._fd, 4096)
        except BlockingIOError:
            return None
        except OSError:
            data = b""
        return None if data else ConnectionDone()

    def connectionLost(self, reason: Any) -> None:
        self._gone()


#: Where the info lines that every worker would repeat come from: Twisted's
#: own (protocol started, SIGTERM received), the service's (where it
#: listens, that it runs), which the parent logs once for all.
_REPEATED = (
    "log_legacy",
    "twisted.",
    "udpdst.echo.service.",
    "udpdst.echo.listeners.",
    "udpdst.echo.workers.",
    "udpdst.echo.worker.",
)


@implementer(ILogFilterPredicate)
class _Forwarded:
    """
    Which of a worker's log events go to the parent: all but the info lines
    that every worker would repeat.
    """

    def __call__(self, event: dict[str, Any]) -> PredicateResult:
        if event.get("log_level") == LogLevel.info and str(
            event.get("log_namespace", "")
        ).startswith(_REPEATED):
            return PredicateResult.no
        return PredicateResult.maybe


class _WorkerEchoService(EchoService):
    """
    The echo service as a worker runs it: it reports its stats to the
    parent, which logs the sum over all workers.
    """

    def __init__(self, channel: _Channel, *args: Any, **kwargs: Any) -> None:
        EchoService.__init__(self, *args, **kwargs)
        self._channel = channel

    def logStats(self, final: bool = False) -> None:
        self._channel.send({"stats": self.localSnapshot().asDict(), "final": final})


@implementer(ILogObserver)
class _Channel:
    """
    The worker's end of the line protocol: one JSON object per line on the
    original standard output.
    """

    def __init__(self, out: Any) -> None:
        self._out = out

    def send(self, message: Mapping[str, Any]) -> None:
        try:
            self._out.write(json.dumps(message).encode() + b"\n")
            self._out.flush()
        except (OSError, ValueError):
            # The parent is gone; its end of standard input says so too.
            pass

    def __call__(self, event: dict[str, Any]) -> None:
        self.send({"log": eventAsJSON(event)})


def workerConfig(document: Mapping[str, Any]) -> Config:
    """
    The configuration a worker runs from its parent's document: the same,
    except that it runs no workers of its own, serves no metrics (the
    parent does, for all) and reports its stats every L{REPORT_INTERVAL}.
    """
    config = parseConfig(document, "the parent's configuration")
    return replace(
        config,
        log=replace(config.log, stats_interval=REPORT_INTERVAL),
        service=replace(config.service, workers=1),
        metrics=replace(config.metrics, listen=""),
    )


def runWorker(stdin: int = 0, stdout: int = 1) -> int:
    """
    Run one worker: read the setup from C{stdin}, serve the descriptors it
    names until SIGTERM or until the parent is gone.

    @return: The exit status.
    """
    with os.fdopen(os.dup(stdin), "rb") as setupFile:
        line = setupFile.readline()
    try:
        setup = json.loads(line)["setup"]
        config = workerConfig(setup["config"])
    except (ValueError, KeyError, TypeError):
        sys.stderr.write(
            "udpdst.echo.worker: no setup on standard input; workers are started "
            "by twistd udpdst with workers >= 2, not by hand\n"
        )
        return 2
    except ConfigError as e:
        # The parent checked this configuration: a different udpdst?
        sys.stderr.write(f"udpdst.echo.worker: {e}\n")
        return 2
    out = os.fdopen(os.dup(stdout), "wb")
    # Stray prints must not corrupt the line protocol: they go to standard
    # error, which the parent logs line by line.
    os.dup2(2, stdout)
    channel = _Channel(out)

    from twisted.internet import reactor
    from twisted.logger import FilteringLogObserver, globalLogBeginner

    from udpdst.echo import logs
    from udpdst.echo.systemd import InheritedSocket

    logs.setLogLevel(config.log.level)
    globalLogBeginner.beginLoggingTo(
        [FilteringLogObserver(channel, [logs.minimumLevel, _Forwarded()])],
        redirectStandardIO=False,
    )

    sockets = [
        (listener, InheritedSocket(s["fd"], s["name"]))
        for listener, s in zip(config.listen, setup["sockets"], strict=True)
    ]
    service = _WorkerEchoService(channel, config, sockets, reactor)
    status = [0]

    def start() -> None:
        try:
            service.privilegedStartService()
            service.startService()
        except SystemExit as e:
            # A listener could not start: its one critical line is logged.
            status[0] = e.code if isinstance(e.code, int) else 1
            reactor.stop()
            return
        except Exception:
            _log.failure("worker could not start")
            status[0] = 1
            reactor.stop()
            return
        reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
        # The parent stops its workers with SIGTERM; an interrupt from the
        # terminal reaches the parent too, which then does so.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        # The parent reloads on SIGHUP and replaces its workers.
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        reactor.addReader(_ParentWatch(stdin, _parentGone))
        channel.send({"ready": True})

    def _parentGone() -> None:
        if reactor.running:
            reactor.stop()

    reactor.callWhenRunning(start)
    reactor.run()
    return status[0]

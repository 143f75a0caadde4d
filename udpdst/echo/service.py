"""
The udpdst echo service: one listening service per socket, under a parent
that logs start, periodic and final stats, and turns a failed bind into one
log line and a non-zero exit.
"""

from __future__ import annotations

import re
import signal
from collections.abc import Callable, Sequence
from dataclasses import fields
from typing import Any

from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, gatherResults, maybeDeferred
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from udpdst.echo import logs
from udpdst.echo._twistd import TwistdHooks
from udpdst.echo.config import Config, ConfigError, LimitsConfig, ListenConfig
from udpdst.echo.limits import (
    accessListFor,
    prefixLimiterFor,
    prefixSettings,
    rateLimiterFor,
    rateSettings,
)
from udpdst.echo.listeners import ListenError, ListenerService
from udpdst.echo.protocol import EchoProtocol
from udpdst.echo.stats import ListenerStats, Snapshot, takeSnapshot
from udpdst.echo.systemd import InheritedSocket, Notifier
from udpdst.port import IO_PATH


class EchoService(MultiService):
    """
    The udpdst service: a L{ListenerService} per socket, stats lines every
    C{stats_interval} seconds and once more at stop.

    A listener that cannot bind ends the process with one critical log line
    and exit status 1: raised from L{privilegedStartService}, anything but
    L{SystemExit} would make twistd print a traceback.

    What the stats lines report is L{snapshot}'s: this process's counters
    unless C{snapshotProvider} is set (e.g. to the sum over worker
    processes).  Other services (a metrics endpoint, a worker manager) are
    added as children with L{addService}: they start and stop with it.

    On SIGHUP (when given a C{reloader}) it reloads its configuration: see
    L{reload}.

    @ivar snapshotProvider: L{None}, or a callable returning the
        L{Snapshot} to report instead of L{localSnapshot}'s.
    """

    _log = Logger()

    def __init__(
        self,
        config: Config,
        sockets: Sequence[tuple[ListenConfig, InheritedSocket | None]],
        reactor: Any = None,
        twistdOptions: Any = None,
        reloader: Callable[[], Config] | None = None,
        notifier: Notifier | None = None,
    ) -> None:
        """
        @param config: The configuration.
        @param sockets: What to listen on: each listener with the inherited
            socket it serves, or L{None} to bind its own
            (L{udpdst.echo.systemd.assignSockets}).
        @param reactor: The reactor; the global one if L{None}.
        @param twistdOptions: twistd's own options when run by twistd: the
            log observer it would use is then put behind the log level, and
            its pid file removed if the service cannot start
            (L{udpdst.echo._twistd.TwistdHooks}).
        @param reloader: Reads the configuration again (the file and the
            command line's overrides), raising L{ConfigError} if it is
            wrong; SIGHUP calls L{reload} with it.  L{None}: no reload.
        @param notifier: Tells systemd when the service is ready (every
            listener bound and the reactor running), reloading and
            stopping, and feeds its watchdog; L{None}: nobody to tell.
        """
        MultiService.__init__(self)
        self.config = config
        self._reactor = reactor
        self._twistd = (
            TwistdHooks.install(twistdOptions, config.log.format)
            if twistdOptions is not None
            else None
        )
        self._statsCall: LoopingCall | None = None
        self.snapshotProvider: Callable[[], Snapshot] | None = None
        #: Called with no arguments once a reload is applied (the worker
        #: processes restart with the new configuration).
        self.afterReload: list[Callable[[], object]] = []
        self._reloader = reloader
        self._notifier = notifier if notifier is not None else Notifier({})
        self._reloading: Deferred[None] | None = None
        self._previousHangup: Any = None
        self._access = accessListFor(config.limits)
        self.limiter = rateLimiterFor(config.limits)
        self.networkLimiter = prefixLimiterFor(config.limits)
        self.listeners: list[ListenerService] = []
        for listener, inherited in sockets:
            self._addListener(listener, inherited)
        self.metrics: Service | None = None
        if config.metrics.listen:
            self._addMetrics()

    def _echo(self) -> EchoProtocol:
        # One protocol per socket (a protocol has one transport); the access
        # list and the rate limiters are shared, so that a source (and a
        # network) gets one budget however many listeners it reaches.
        protocol = EchoProtocol.fromConfig(
            self.config.echo.prefixBytes,
            self.config.limits,
            access=self._access,
            rateLimiter=self.limiter,
            networkLimiter=self.networkLimiter,
            answerBroadcast=self.config.echo.answer_broadcast,
        )
        # Twisted's "Starting protocol <... object at 0x...>" lines say less
        # than the service's own listening and reload lines, at every reload.
        protocol.noisy = False
        return protocol

    def _addListener(
        self, listener: ListenConfig, inherited: InheritedSocket | None
    ) -> ListenerService:
        child = ListenerService(listener, self._echo(), inherited, self._reactor)
        self.listeners.append(child)
        try:
            # Binds at once if this service runs (a reload).
            child.setServiceParent(self)
        except ListenError:
            self.listeners.remove(child)
            child.disownServiceParent()
            raise
        return child

    def _addMetrics(self) -> None:
        from udpdst.echo.metrics import MetricsService

        metrics = MetricsService(self.config.metrics, self.snapshot, self._reactor)
        try:
            # Binds at once if this service runs (a reload).
            metrics.setServiceParent(self)
        except ListenError:
            metrics.disownServiceParent()
            raise
        self.metrics = metrics

    def setServiceParent(self, parent: Any) -> None:
        MultiService.setServiceParent(self, parent)
        if self._twistd is not None:
            self._twistd.installLogObserver(parent)

    def privilegedStartService(self) -> None:
        try:
            MultiService.privilegedStartService(self)
        except ListenError as e:
            self._log.critical("{message}", message=str(e))
            for child in self.listeners:
                if child.listeningPort is not None:
                    child.listeningPort.stopListening()
            if self._twistd is not None:
                self._twistd.failedToStart(str(e))
            raise SystemExit(1) from None

    def startService(self) -> None:
        MultiService.startService(self)
        reactor = self._reactor
        if reactor is None:
            from twisted.internet import reactor
        # Logged once the reactor runs, i.e. once SIGTERM/SIGINT stop the
        # service cleanly (twistd binds and starts services before that).
        reactor.callWhenRunning(self._logRunning)
        self._startStats()
        if self._reloader is not None:
            self._previousHangup = signal.signal(
                signal.SIGHUP,
                # A signal handler may only hand work to the reactor.
                lambda *_: reactor.callFromThread(self._reloadOnSignal),
            )

    def _startStats(self) -> None:
        interval = self.config.log.stats_interval
        if interval > 0:
            self._statsCall = LoopingCall(self.logStats)
            if self._reactor is not None:
                self._statsCall.clock = self._reactor
            self._statsCall.start(interval, now=False)

    def _stopStats(self) -> None:
        if self._statsCall is not None and self._statsCall.running:
            self._statsCall.stop()
        self._statsCall = None

    def stopService(self) -> Deferred[Any]:
        self._notifier.stopping()
        self._stopStats()
        if self._previousHangup is not None:
            signal.signal(signal.SIGHUP, self._previousHangup)
            self._previousHangup = None
        d: Deferred[Any] = maybeDeferred(MultiService.stopService, self)
        d.addCallback(lambda _: self.logStats(final=True))
        return d

    def _logRunning(self) -> None:
        interval = self.config.log.stats_interval
        count = len(self.listeners)
        self._log.info(
            "udpdst echo service running: {count} "
            + _listenerNoun(count)
            + ", I/O path {ioPath}, log level {logLevel}, "
            + ("stats every {statsInterval:g} s" if interval > 0 else "stats at stop"),
            count=count,
            ioPath=IO_PATH,
            logLevel=self.config.log.level,
            statsInterval=interval,
        )
        self._notifyReady()

    def _reloadOnSignal(self) -> None:
        if not self.running or self._reloader is None:
            return
        if self._reloading is not None:
            self._log.warn("SIGHUP during a reload: ignored; send it again later")
            return
        self._notifier.reloading()
        try:
            reloading = self.reload(self._reloader())
        except ConfigError as e:
            self._log.error(
                "reload failed, the running configuration is kept: {error}",
                error=str(e),
            )
            self._notifyReady()
            return
        self._reloading = reloading
        reloading.addBoth(self._reloaded)

    def _reloaded(self, result: Any) -> None:
        self._reloading = None
        if isinstance(result, Failure):
            self._log.failure("reload failed", result)
        self._notifyReady()

    def _notifyReady(self) -> None:
        count = len(self.listeners)
        self._notifier.ready(f"serving {count} {_listenerNoun(count)}")

    def reload(self, config: Config) -> Deferred[None]:
        """
        Apply a new configuration to the running service: listeners that
        are gone close, new ones bind, and unchanged ones keep their socket
        (no datagram lost); the echo's prefix and limits, the log level and
        the stats interval change in place; the metrics endpoint moves.  One
        info line says what changed; one error line if a new listener or
        endpoint cannot bind (the rest is applied, that one is not served).

        @raise ConfigError: The new configuration cannot be applied while
            running (a systemd listener it did not have); nothing changed.
        """
        old = self.config
        keep, remove, add = self._planListeners(config)
        changes = _changes(old, config, add, remove)
        self.config = config
        if config.limits != old.limits:
            self._access = accessListFor(config.limits)
            if rateSettings(config.limits) != rateSettings(old.limits):
                evictions = self.limiter.evictions
                self.limiter = rateLimiterFor(config.limits)
                self.limiter.evictions = evictions
            if prefixSettings(config.limits) != prefixSettings(old.limits):
                evictions = self.networkLimiter.evictions
                self.networkLimiter = prefixLimiterFor(config.limits)
                self.networkLimiter.evictions = evictions
        if config.limits != old.limits or config.echo != old.echo:
            for child in keep:
                child.replaceProtocol(self._echo())
        if config.log.level != old.log.level:
            logs.setLogLevel(config.log.level)
        if config.log.stats_interval != old.log.stats_interval:
            self._stopStats()
            self._startStats()
        stopped = [maybeDeferred(self._removeListener, child) for child in remove]
        moveMetrics = config.metrics != old.metrics
        if moveMetrics and self.metrics is not None:
            stopped.append(maybeDeferred(self.removeService, self.metrics))
            self.metrics = None
        d: Deferred[Any] = gatherResults(stopped)

        def bind(_: Any) -> None:
            # After the removed ones closed: a listener re-added with other
            # options takes the same address and port.
            for listener, inherited in add:
                try:
                    self._addListener(listener, inherited)
                except ListenError as e:
                    self._log.error("reload: {message}; not serving it", message=str(e))
            if moveMetrics and config.metrics.listen:
                try:
                    self._addMetrics()
                except ListenError as e:
                    self._log.error("reload: {message}; no metrics", message=str(e))
            self._log.info(
                "reloaded configuration: {changes}",
                changes="; ".join(changes) or "nothing changed",
            )
            for hook in self.afterReload:
                hook()

        d.addCallback(bind)
        return d

    def _planListeners(
        self, config: Config
    ) -> tuple[
        list[ListenerService],
        list[ListenerService],
        list[tuple[ListenConfig, InheritedSocket | None]],
    ]:
        """
        Which running listeners stay, which go, and which are new.
        """
        running = list(self.listeners)
        keep: list[ListenerService] = []
        add: list[tuple[ListenConfig, InheritedSocket | None]] = []
        for listener in config.listen:
            same = [child for child in running if child.listener == listener]
            if same:
                # A systemd listener serves every socket it was given.
                mine = same if listener.systemd else same[:1]
                keep.extend(mine)
                for child in mine:
                    running.remove(child)
            elif listener.systemd:
                raise ConfigError(
                    f"listener {listener.describe()} is new, but systemd passes "
                    "sockets only at start; restart the service to use it"
                )
            else:
                add.append((listener, None))
        return keep, running, add

    def _removeListener(self, child: ListenerService) -> Deferred[None] | None:
        self.listeners.remove(child)
        return self.removeService(child)

    def localSnapshot(self) -> Snapshot:
        """
        This process's counters, now.
        """
        return takeSnapshot(
            (child.counterSources() for child in self.listeners),
            self.limiter,
            self.networkLimiter,
        )

    def snapshot(self) -> Snapshot:
        """
        What the stats report: C{snapshotProvider()} if set, else
        L{localSnapshot}.
        """
        if self.snapshotProvider is not None:
            return self.snapshotProvider()
        return self.localSnapshot()

    def logStats(self, final: bool = False) -> None:
        """
        Log one stats line per listener and one for the rate limiter, all
        from one L{snapshot}.
        """
        which = "final stats" if final else "stats"
        snapshot = self.snapshot()
        for address, stats in snapshot.listeners.items():
            text, fields = _statsLine(stats)
            self._log.info(
                "{which} {listener}: " + text,
                which=which,
                listener=address,
                final=final,
                **fields,
            )
        self._log.info(
            "{which} rate limiter: {rateLimitedSources} sources tracked, "
            "{limiterEvictions} evicted; {rateLimitedNetworks} networks "
            "tracked, {networkEvictions} evicted",
            which=which,
            rateLimitedSources=snapshot.rateLimitedSources,
            limiterEvictions=snapshot.limiterEvictions,
            rateLimitedNetworks=snapshot.rateLimitedNetworks,
            networkEvictions=snapshot.networkEvictions,
        )


def _changes(
    old: Config,
    new: Config,
    add: Sequence[tuple[ListenConfig, Any]],
    remove: Sequence[ListenerService],
) -> list[str]:
    """
    What a reload changes, as phrases for its log line.
    """
    changes = [f"listener {child.address} removed" for child in remove]
    changes += [f"listener {listener.describe()} added" for listener, _ in add]
    if new.echo.prefix != old.echo.prefix:
        changes.append(f"prefix {old.echo.prefix!r} -> {new.echo.prefix!r}")
    if new.echo.answer_broadcast != old.echo.answer_broadcast:
        changes.append(
            "broadcast and multicast "
            + ("answered" if new.echo.answer_broadcast else "refused")
        )
    for f in fields(LimitsConfig):
        was, now = getattr(old.limits, f.name), getattr(new.limits, f.name)
        if was != now:
            changes.append(f"[limits] {f.name} changed")
    if new.log.level != old.log.level:
        changes.append(f"log level {old.log.level} -> {new.log.level}")
    if new.log.stats_interval != old.log.stats_interval:
        changes.append(
            f"stats interval {old.log.stats_interval:g} s -> "
            f"{new.log.stats_interval:g} s"
        )
    if new.log.format != old.log.format:
        changes.append("[log] format changed, applies at the next restart")
    if new.metrics != old.metrics:
        changes.append(
            f"metrics {old.metrics.listen or 'off'} -> {new.metrics.listen or 'off'}"
        )
    if new.service != old.service:
        changes.append("[service] changed, applies at the next restart")
    return changes


#: The counters a stats line starts with, in this order; the port's other
#: counters follow in the order it lists them.
_LEADING = ("received", "replied", "refused", "sendErrors", "kernelDrops")


def _listenerNoun(count: int) -> str:
    return "listener" if count == 1 else "listeners"


def _words(name: str) -> str:
    return re.sub(r"[A-Z]", lambda m: " " + m.group().lower(), name)


def _statsLine(stats: ListenerStats) -> tuple[str, dict[str, Any]]:
    """
    A listener's stats as log text (a format string) and structured fields:
    every counter by its name, C{refused} the total and C{refusedBy} by
    reason.
    """
    fields: dict[str, Any] = dict(stats.counters)
    fields["refused"] = stats.refusedTotal
    fields["refusedBy"] = dict(stats.refused)
    fields["refusedText"] = (
        " ".join(f"{k}={v}" for k, v in stats.refused.items() if v) or "none"
    )
    names = [n for n in _LEADING if n in fields]
    names += [n for n in stats.counters if n not in _LEADING]
    parts = [f"{_words(n)} {{{n}}}" for n in names]
    parts[names.index("refused")] += " ({refusedText})"
    return ", ".join(parts), fields

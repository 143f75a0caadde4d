"""
The udpdst echo service: one listening service per socket, under a parent
that logs start, periodic and final stats, and turns a failed bind into one
log line and a non-zero exit.
"""

from __future__ import annotations

import re
import signal
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, gatherResults, maybeDeferred
from twisted.internet.task import LoopingCall
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure

from udpdst.echo import logs
from udpdst.echo._twistd import TwistdHooks
from udpdst.echo.config import Config, ConfigError, LimitsConfig, ListenConfig
from udpdst.echo.limits import (
    AccessList,
    NetworkLimiter,
    RateLimiter,
    accessListFor,
    prefixLimiterFor,
    prefixSettings,
    rateLimiterFor,
    rateSettings,
)
from udpdst.echo.listeners import ListenError, ListenerService, identity
from udpdst.echo.protocol import EchoProtocol
from udpdst.echo.stats import ListenerStats, Snapshot, takeSnapshot
from udpdst.echo.systemd import InheritedSocket, Notifier
from udpdst.port import IO_PATH

if TYPE_CHECKING:
    from udpdst.echo.metrics import MetricsService


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
        #: processes restart with the new configuration); the reload is done
        #: (systemd hears C{READY=1}) once the L{Deferred}s they return
        #: fire.
        self.afterReload: list[Callable[[], object]] = []
        #: L{None}, or what the service waits for, once the reactor runs,
        #: before it says it runs (and tells systemd C{READY=1}): a
        #: L{Deferred} that fires when it serves, or fails with one line
        #: saying why it cannot (the process then stops, status 1).  The
        #: worker processes announcing themselves, for instance.
        self.readyWhen: Callable[[], Deferred[None]] | None = None
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
        return _echoFor(self.config, self._access, self.limiter, self.networkLimiter)

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

    def _metricsService(self, config: Config) -> MetricsService:
        from udpdst.echo.metrics import MetricsService

        return MetricsService(config.metrics, self.snapshot, self._reactor)

    def _addMetrics(self) -> None:
        metrics = self._metricsService(self.config)
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
        reactor.callWhenRunning(self._whenServing)
        if self.readyWhen is not None and self._twistd is not None:
            # A daemon's first process exits 0 once the service serves.
            self._twistd.holdStartStatus()
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

    def _whenServing(self) -> None:
        if self.readyWhen is None:
            self._logRunning()
            return
        waiting = self.readyWhen()
        waiting.addCallbacks(lambda _: self._logRunning(), self._cannotServe)

    def _cannotServe(self, reason: Failure) -> None:
        """
        The service cannot serve after all (its workers cannot start): one
        critical line, and the process ends with status 1.
        """
        if not self.running:
            return
        message = str(reason.value) or reason.getErrorMessage()
        self._log.critical("{message}; stopping", message=message)
        self._notifier.notify(f"STATUS={message}")
        if self._twistd is not None:
            self._twistd.tellDaemonParent(message)
            self._twistd.exitStatus = 1
        reactor = self._reactor
        if reactor is None:
            from twisted.internet import reactor
        reactor.stop()

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
        if self._twistd is not None:
            self._twistd.started()
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
        except (ConfigError, ListenError) as e:
            self._reloadFailed(str(e))
            return
        except Exception as e:
            # A value the schema let through that a piece of the service
            # cannot take (a number too large to convert): still one line,
            # the traceback only for a debug log.
            self._log.failure("reload failed", level=LogLevel.debug)
            self._reloadFailed(f"{type(e).__name__}: {e}")
            return
        self._reloading = reloading
        reloading.addBoth(self._reloaded)

    def _reloadFailed(self, reason: str) -> None:
        self._log.error(
            "reload failed, the running configuration is kept: {error}",
            error=reason,
        )
        self._notifyReady()

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
        Apply a new configuration to the running service, all or nothing.

        Every new piece is built first: the echo's access list, rate limiter
        and protocols, the new listeners' sockets (bound, not yet announced)
        and the moved metrics endpoint.  If any of that fails, what was
        built is closed and the running configuration stays whole.  Then it
        swaps: a listener of the same identity (address, port, C{v6_only},
        C{reuse_port}, systemd name: L{identity}) keeps its socket, its other
        settings applied in place, so that no datagram is lost; the echo's
        prefix and limits, the log level and the stats interval change in
        place.  Only then do the listeners that are gone, and the old
        metrics endpoint, close: a socket is never closed before its
        replacement is bound.  One info line says what changed.

        @return: A L{Deferred} that fires once the old sockets closed and
            the L{afterReload} hooks are done.
        @raise ConfigError: The new configuration cannot be applied while
            running (a systemd listener it did not have); nothing changed.
        @raise ListenError: A new listener or the new metrics endpoint
            cannot bind; nothing changed.
        @raise Exception: Whatever else building a piece raised; nothing
            changed.
        """
        old = self.config
        plan = self._planListeners(config)
        access, limiter = self._access, self.limiter
        networkLimiter = self.networkLimiter
        if config.limits != old.limits:
            access = accessListFor(config.limits)
            if rateSettings(config.limits) != rateSettings(old.limits):
                limiter = rateLimiterFor(config.limits)
            if prefixSettings(config.limits) != prefixSettings(old.limits):
                networkLimiter = prefixLimiterFor(config.limits)
        protocols = {}
        if config.limits != old.limits or config.echo != old.echo:
            protocols = {
                child: _echoFor(config, access, limiter, networkLimiter)
                for child, _ in plan.keep
            }
        added: list[ListenerService] = []
        metrics: MetricsService | None = None
        moveMetrics = config.metrics != old.metrics
        try:
            for listener, inherited in plan.add:
                child = ListenerService(
                    listener,
                    _echoFor(config, access, limiter, networkLimiter),
                    inherited,
                    self._reactor,
                )
                try:
                    child.prepare()
                except ListenError as e:
                    raise ListenError(self._bindHint(str(e), listener, plan)) from None
                added.append(child)
            if moveMetrics and config.metrics.listen:
                metrics = self._metricsService(config)
                metrics.prepare()
        except BaseException:
            for child in added:
                child.stopService()
            raise

        # Nothing below fails on a user's input: the swap.
        self.config = config
        if limiter is not self.limiter:
            limiter.evictions = self.limiter.evictions
        if networkLimiter is not self.networkLimiter:
            networkLimiter.evictions = self.networkLimiter.evictions
        self._access, self.limiter = access, limiter
        self.networkLimiter = networkLimiter
        inPlace = []
        for child, listener in plan.keep:
            inPlace += child.update(listener)
            if child in protocols:
                child.replaceProtocol(protocols[child])
        changes = _changes(old, config, added, plan.remove, inPlace)
        for child in added:
            self.listeners.append(child)
            child.setServiceParent(self)
            child.announce()
        if config.log.level != old.log.level:
            logs.setLogLevel(config.log.level)
        if config.log.stats_interval != old.log.stats_interval:
            self._stopStats()
            self._startStats()
        stopped = [maybeDeferred(self._removeListener, child) for child in plan.remove]
        if moveMetrics:
            if self.metrics is not None:
                stopped.append(maybeDeferred(self.removeService, self.metrics))
            self.metrics = metrics
            if metrics is not None:
                metrics.setServiceParent(self)
                metrics.announce()

        def closed(_: Any) -> Deferred[Any]:
            self._log.info(
                "reloaded configuration: {changes}",
                changes="; ".join(changes) or "nothing changed",
            )
            return gatherResults([maybeDeferred(hook) for hook in self.afterReload])

        d: Deferred[Any] = gatherResults(stopped)
        d.addCallback(closed)
        d.addCallback(lambda _: None)
        return d

    def _bindHint(self, message: str, listener: ListenConfig, plan: _Plan) -> str:
        """
        Why a new listener could not bind, with what to do if it clashes
        with one this reload would close: that one serves until its
        replacement is bound, so only a restart can make the change.
        """
        wildcards = ("::", "0.0.0.0")
        for child in plan.remove:
            old = child.listener
            if (
                listener.port
                and old.port == listener.port
                and (
                    old.address == listener.address
                    or old.address in wildcards
                    or listener.address in wildcards
                )
            ):
                return (
                    f"{message} (it clashes with listener {child.address}, which "
                    "serves until its replacement is bound; restart the service "
                    "to make this change)"
                )
        return message

    def _planListeners(self, config: Config) -> _Plan:
        """
        Which running listeners stay (with their new settings), which go,
        and which are new.

        @raise ConfigError: A systemd listener is new.
        """
        running = list(self.listeners)
        plan = _Plan()
        for listener in config.listen:
            same = [
                child
                for child in running
                if identity(child.listener) == identity(listener)
            ]
            if same:
                # A systemd listener serves every socket it was given.
                mine = same if listener.systemd else same[:1]
                for child in mine:
                    plan.keep.append((child, listener))
                    running.remove(child)
            elif listener.systemd:
                raise ConfigError(
                    f"listener {listener.describe()} is new, but systemd passes "
                    "sockets only at start; restart the service to use it"
                )
            else:
                plan.add.append((listener, None))
        plan.remove = running
        return plan

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


def _echoFor(
    config: Config,
    access: AccessList,
    limiter: RateLimiter,
    networkLimiter: NetworkLimiter,
) -> EchoProtocol:
    """
    An echo protocol for one socket (a protocol has one transport); the
    access list and the rate limiters are shared, so that a source (and a
    network) gets one budget however many listeners it reaches.
    """
    protocol = EchoProtocol.fromConfig(
        config.echo.prefixBytes,
        config.limits,
        access=access,
        rateLimiter=limiter,
        networkLimiter=networkLimiter,
        answerBroadcast=config.echo.answer_broadcast,
    )
    # Twisted's "Starting protocol <... object at 0x...>" lines say less
    # than the service's own listening and reload lines, at every reload.
    protocol.noisy = False
    return protocol


@dataclass
class _Plan:
    """
    What a reload does with the listeners: those it keeps (each with its
    new settings), those it adds (not bound yet), those it removes.
    """

    keep: list[tuple[ListenerService, ListenConfig]] = field(default_factory=list)
    add: list[tuple[ListenConfig, InheritedSocket | None]] = field(default_factory=list)
    remove: list[ListenerService] = field(default_factory=list)


def _changes(
    old: Config,
    new: Config,
    add: Sequence[ListenerService],
    remove: Sequence[ListenerService],
    inPlace: Sequence[str],
) -> list[str]:
    """
    What a reload changes, as phrases for its log line.
    """
    changes = [f"listener {child.address} removed" for child in remove]
    changes += [f"listener {child.address} added" for child in add]
    changes += inPlace
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

"""
Worker processes for the udpdst service: with C{workers = N} (N >= 2) the
twistd process binds the listeners (or takes systemd's sockets), then runs N
worker processes that all serve those same sockets, restarts a worker that
dies, replaces them all when SIGHUP reloads the configuration, stops them
all when it stops, and sums the stats they report.

Why one shared socket rather than one C{SO_REUSEPORT} socket per worker (the
figures are in the README): the parent binds once, before twistd drops
privileges, so a restarted worker needs no privilege to serve port 53;
systemd's single socket and port 0 work unchanged; and a worker that dies
loses nothing still queued in the kernel, where with C{SO_REUSEPORT} the
datagrams queued on its socket, and those hashed to it until it is back,
would be lost.

The parent and a worker talk over the worker's standard streams, one JSON
object per line:

  - parent to worker, on standard input: one C{setup} line (the
    configuration as a plain document, the descriptor of each listener,
    the worker's number); standard input then stays open, and its end
    (the parent is gone) stops the worker;
  - worker to parent, on standard output: C{{"ready": true}} once it
    serves, C{{"stats": ..., "final": bool}} every
    L{udpdst.echo.worker.REPORT_INTERVAL}
    seconds and at stop, and C{{"log": ...}} for each log event (as
    L{twisted.logger.eventAsJSON} writes it), which the parent publishes as
    its own, so that one log level and one log destination cover all
    processes.

Standard error is logged by the parent line by line (a worker that cannot
even start writes its traceback there).

The service says it runs (systemd's C{READY=1}) once every worker has said
it serves; if they do not all do so within L{READY_TIMEOUT}, or one ends
before it was ready L{START_ATTEMPTS} times in a row (the user twistd
switched to cannot run this Python, say), one line says why and the process
exits with status 1.  A reload is done once only workers of the new
configuration serve.

This module is the parent's side; L{udpdst.echo.worker} is the worker's.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, fail, succeed
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import (
    Logger,
    eventFromJSON,
    globalLogPublisher,
)
from twisted.python.failure import Failure

from udpdst.echo.config import MAX_WORKERS, ListenConfig, configDocument
from udpdst.echo.service import EchoService
from udpdst.echo.stats import Snapshot

_log = Logger(namespace="udpdst.echo.workers")

#: The longest line the parent accepts from a worker; a longer one is cut
#: off (a worker is our own code, but a runaway one must not exhaust memory).
MAX_LINE = 1 << 20

#: Seconds a worker has to say it serves before it is killed; the service
#: gives up if its workers have not all done so by then at start.
READY_TIMEOUT = 60.0

#: How many times in a row a worker may end before it was ready, at start,
#: before the service gives up (it cannot start: the same would happen to
#: every restart).
START_ATTEMPTS = 3


class WorkersFailed(Exception):
    """
    The workers could not start; C{str(error)} is one line saying why.
    """


def cpuCount() -> int:
    """
    The CPUs this process may run on (its affinity mask), at least 1: what
    C{workers = "auto"} means.
    """
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def workerCount(setting: int | str) -> int:
    """
    The number of processes a C{workers} setting means: C{"auto"} is one per
    CPU (at most L{MAX_WORKERS}, the most an integer may ask for), an integer
    is itself.
    """
    return min(cpuCount(), MAX_WORKERS) if setting == "auto" else int(setting)


# Backoff for restarts.


@dataclass
class Backoff:
    """
    How long to wait before restarting a worker that ended: C{initial}
    seconds after a worker that served at least C{steady} seconds, and twice
    as long as last time, up to C{maximum}, after one that did not (it
    probably cannot start at all: restarting it in a tight loop would only
    burn a CPU and flood the log).
    """

    initial: float = 0.5
    maximum: float = 30.0
    steady: float = 10.0
    _next: float = 0.0

    def after(self, served: float) -> float:
        """
        The delay before the next start of a worker that served C{served}
        seconds (0 if it never did).
        """
        if served >= self.steady or not self._next:
            self._next = self.initial
        else:
            self._next = min(self._next * 2, self.maximum)
        return self._next


# The parent side.


@dataclass(frozen=True)
class WorkerSocket:
    """
    A socket the workers serve: the L{udpdst.echo.config.ListenConfig} it was
    made for, its descriptor in the parent, and its address for log lines.
    """

    listener: ListenConfig
    fd: int
    name: str


def _describeEnd(reason: Failure) -> str:
    value = reason.value
    signalNumber = getattr(value, "signal", None)
    if signalNumber is not None:
        try:
            return f"killed by {signal.Signals(signalNumber).name}"
        except ValueError:
            return f"killed by signal {signalNumber}"
    code = getattr(value, "exitCode", None)
    return "exited normally" if not code else f"exited with status {code}"


class _WorkerProtocol(ProcessProtocol):
    """
    The parent's end of one worker process: reads its messages and log
    lines, and tells the pool when it ends.
    """

    def __init__(
        self, pool: WorkerPool, number: int, setup: bytes, generation: int = 0
    ) -> None:
        self.pool = pool
        self.number = number
        #: Which configuration it runs: the pool's count of reloads when it
        #: was started.
        self.generation = generation
        self._setup = setup
        self._buffers = {1: b"", 2: b""}
        self.pid: int | None = None
        self.started = 0.0
        self.ready = False
        self.readyAt = 0.0
        self.ended: Deferred[None] = Deferred()
        #: The worker of an older configuration it takes over from (a
        #: reload), stopped once this one is ready.
        self.replaces: _WorkerProtocol | None = None
        #: Kills it if it is not ready in time.
        self.readyTimeout: Any = None
        #: Its last line on standard error: why it could not start, if it
        #: could not.
        self.lastWords = ""

    def connectionMade(self) -> None:
        self.pid = self.transport.pid  # type: ignore[union-attr]
        self.started = self.pool.clock.seconds()
        self.transport.write(self._setup)  # type: ignore[union-attr]

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        buffered = self._buffers.get(childFD, b"") + data
        *lines, rest = buffered.split(b"\n")
        if len(rest) > MAX_LINE:
            lines.append(rest[:MAX_LINE])
            rest = b""
        self._buffers[childFD] = rest
        for line in lines:
            if childFD == 1:
                self.pool._message(self, line)
            elif line.strip():
                self.pool._stderr(self, line)

    def processEnded(self, reason: Failure) -> None:
        for fd in (1, 2):
            if self._buffers[fd].strip():
                self.childDataReceived(fd, b"\n")
        self.pool._ended(self, reason)
        self.ended.callback(None)


class WorkerPool(Service):
    """
    Run C{count} worker processes serving the same sockets; restart each
    one that ends while the pool runs; replace them all, one by one, on
    L{reload}; stop them all when it stops.

    @ivar workers: The newest worker of each slot (L{None} while a slot
        waits for its restart), numbered from 1 in log lines.  During a
        reload, the one it replaces is its C{replaces}.
    """

    _log = Logger(namespace="udpdst.echo.workers")

    def __init__(
        self,
        count: int,
        document: Mapping[str, Any],
        sockets: Callable[[], Sequence[WorkerSocket]],
        reactor: Any = None,
        *,
        backoff: Callable[[], Backoff] = Backoff,
        stopTimeout: float = 10.0,
        readyTimeout: float = READY_TIMEOUT,
        startAttempts: int = START_ATTEMPTS,
        startTimeout: float | None = None,
        command: Sequence[str] | None = None,
    ) -> None:
        """
        @param count: How many workers.
        @param document: The configuration for the workers
            (L{configDocument}).
        @param sockets: Called at start and at each L{reload}: the sockets
            to serve (they are bound by then).
        @param reactor: Spawns the processes and keeps time; the global
            reactor if L{None}.
        @param backoff: Makes each slot's restart policy.
        @param stopTimeout: Seconds a worker has to stop after SIGTERM
            before it is killed.
        @param readyTimeout: Seconds a worker has to start serving before
            it is killed (and restarted, after its backoff).
        @param startAttempts: At start, how many times in a row a worker
            may end before it was ready before the pool gives up
            (L{whenReady}).
        @param startTimeout: At start, the seconds all the workers have to
            serve before the pool gives up; C{readyTimeout} if L{None}.
        @param command: The worker's command line; L{workerCommand} by
            default.
        """
        self.count = count
        self.document = dict(document)
        self._sockets = sockets
        self._reactor = reactor
        self._backoffs = [backoff() for _ in range(count)]
        self._stopTimeout = stopTimeout
        self._readyTimeout = readyTimeout
        self._startAttempts = startAttempts
        self._startTimeout = readyTimeout if startTimeout is None else startTimeout
        self._startFailures = [0] * count
        self._startDeadline: Any = None
        self._waiting: list[Deferred[None]] = []
        self._failure: WorkersFailed | None = None
        self._generation = 0
        self._reloads: list[tuple[Deferred[None], Any]] = []
        self._command = list(command) if command is not None else workerCommand()
        self.workers: list[_WorkerProtocol | None] = [None] * count
        self._restarts: list[Any] = [None] * count
        self._fds: list[WorkerSocket] = []
        self._retiring: list[_WorkerProtocol] = []
        self._latest: dict[_WorkerProtocol, Snapshot] = {}
        self._retired = Snapshot()
        self._announced = False
        self._stopping = False

    @property
    def clock(self) -> Any:
        if self._reactor is None:
            from twisted.internet import reactor

            self._reactor = reactor
        return self._reactor

    # Starting and restarting

    def startService(self) -> None:
        Service.startService(self)
        self._stopping = False
        self._fds = list(self._sockets())
        # Spawned once the reactor runs: its child reaper is in place then.
        self.clock.callWhenRunning(self._startAll)

    def whenReady(self) -> Deferred[None]:
        """
        Fire once every worker has said it serves, for the first time; fail
        with L{WorkersFailed} if they do not all do so within the ready
        timeout, or if one ends before it was ready C{startAttempts} times
        in a row (the pool then stops restarting them).
        """
        if self._announced:
            return succeed(None)
        if self._failure is not None:
            return fail(self._failure)
        d: Deferred[None] = Deferred()
        self._waiting.append(d)
        return d

    def _startAll(self) -> None:
        if self._stopping:
            return
        if not self._announced and self._startDeadline is None:
            self._startDeadline = self.clock.callLater(
                self._startTimeout, self._startTimedOut
            )
        for slot in range(self.count):
            if self.workers[slot] is None:
                self._spawn(slot)

    def _setup(self, number: int) -> bytes:
        # The document's listeners are those of the sockets, in their order:
        # systemd may pass several sockets for one listener.
        document = dict(self.document)
        document["listen"] = [configDocument(s.listener) for s in self._fds]
        setup = {
            "worker": number,
            "config": document,
            "sockets": [{"fd": 3 + i, "name": s.name} for i, s in enumerate(self._fds)],
        }
        return json.dumps({"setup": setup}).encode() + b"\n"

    def _spawn(self, slot: int) -> None:
        self._restarts[slot] = None
        if not self._fds:
            # A worker serves what its parent bound: with nothing bound it
            # could only exit, and be restarted, forever.
            self._log.error(
                "worker {worker} not started: no socket to serve", worker=slot + 1
            )
            self._gaveUp("no socket to serve")
            return
        previous = self.workers[slot]
        worker = _WorkerProtocol(
            self, slot + 1, self._setup(slot + 1), self._generation
        )
        childFDs: dict[int, Any] = {0: "w", 1: "r", 2: "r"}
        for i, s in enumerate(self._fds):
            childFDs[3 + i] = s.fd
        try:
            self.clock.spawnProcess(
                worker,
                self._command[0],
                self._command,
                env=dict(os.environ),
                childFDs=childFDs,
            )
        except OSError as e:
            # fork or exec failed: out of memory or processes, or the user
            # twistd switched to (--uid) may not run this Python.
            if self._failedToStart(slot, f"could not be started ({e.strerror or e})"):
                return
            delay = self._scheduleRestart(slot, 0.0)
            self._log.error(
                "cannot start worker {worker} ({command}): {error}; retrying in "
                "{delay:g} s",
                worker=slot + 1,
                command=self._command[0],
                error=e.strerror or e,
                delay=delay,
            )
            return
        self.workers[slot] = worker
        worker.readyTimeout = self.clock.callLater(
            self._readyTimeout, self._notReady, worker
        )
        if previous is not None:
            # A reload: the worker of the older configuration serves until
            # this one is ready.  One that was itself still starting goes.
            if previous.replaces is not None:
                worker.replaces, previous.replaces = previous.replaces, None
                self._retire(previous)
            else:
                worker.replaces = previous
        self._log.debug(
            "worker {worker} started (pid {pid})", worker=slot + 1, pid=worker.pid
        )

    def _scheduleRestart(self, slot: int, served: float) -> float:
        delay = self._backoffs[slot].after(served)
        self._restarts[slot] = self.clock.callLater(delay, self._spawn, slot)
        return delay

    def _retire(self, worker: _WorkerProtocol) -> None:
        self._retiring.append(worker)
        self._signal(worker, "TERM")

    def _notReady(self, worker: _WorkerProtocol) -> None:
        worker.readyTimeout = None
        self._kill(worker, "start serving", self._readyTimeout)

    def _kill(self, worker: _WorkerProtocol, what: str, timeout: float) -> None:
        """
        Kill a worker that did not do C{what} within C{timeout} seconds.
        """
        self._log.error(
            "worker {worker} (pid {pid}) did not {what} within {timeout:g} s; "
            "killing it",
            worker=worker.number,
            pid=worker.pid,
            what=what,
            timeout=timeout,
        )
        self._signal(worker, "KILL")

    def _ended(self, worker: _WorkerProtocol, reason: Failure) -> None:
        if worker.readyTimeout is not None:
            worker.readyTimeout.cancel()
            worker.readyTimeout = None
        # What it reported last stays in the totals.
        last = self._latest.pop(worker, None)
        if last is not None:
            self._retired = self._retired + last
        if worker in self._retiring:
            # Replaced by a reload, or stopped.
            self._retiring.remove(worker)
            self._checkReloaded()
            return
        slot = worker.number - 1
        newest = self.workers[slot]
        how = _describeEnd(reason)
        if newest is not None and newest.replaces is worker:
            # The older worker ended while its successor starts.
            newest.replaces = None
        elif newest is worker:
            # An older worker, if any, serves on until the restart is ready.
            self.workers[slot], worker.replaces = worker.replaces, None
        if self._stopping:
            return
        if (
            newest is worker
            and not worker.ready
            and self._failedToStart(
                slot,
                how
                + " before it was ready"
                + (f" ({worker.lastWords})" if worker.lastWords else ""),
            )
        ):
            return
        if newest is not worker:
            self._log.error(
                "worker {worker} (pid {pid}) {how}; its successor is starting",
                worker=worker.number,
                pid=worker.pid,
                how=how,
            )
            return
        now = self.clock.seconds()
        ranFor = now - worker.started
        delay = self._scheduleRestart(slot, now - worker.readyAt if worker.ready else 0)
        self._log.error(
            "worker {worker} (pid {pid}) {how} after {ranFor:.1f} s{ready}; "
            "restarting it in {delay:g} s",
            worker=worker.number,
            pid=worker.pid,
            how=how,
            ranFor=ranFor,
            ready="" if worker.ready else " before it was ready",
            delay=delay,
        )

    def _failedToStart(self, slot: int, how: str) -> bool:
        """
        Count a start of C{slot}'s worker that failed before the pool was
        first ready; give up once it failed C{startAttempts} times in a row.

        @return: Whether the pool gave up.
        """
        if self._announced:
            return False
        self._startFailures[slot] += 1
        if self._startFailures[slot] < self._startAttempts:
            return False
        self._gaveUp(
            f"worker {slot + 1} {how}, {self._startFailures[slot]} times in a row"
        )
        return True

    def _startTimedOut(self) -> None:
        self._startDeadline = None
        ready = sum(1 for w in self.workers if w is not None and w.ready)
        self._gaveUp(
            f"{ready} of {self.count} workers serving after {self._startTimeout:g} s"
        )

    def _gaveUp(self, reason: str) -> None:
        """
        The workers cannot start: stop restarting them, and tell those
        waiting (L{whenReady}) why.
        """
        if self._announced or self._failure is not None:
            return
        self._failure = WorkersFailed(f"the workers could not start: {reason}")
        self._cancelTimers()
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.errback(self._failure)

    def reload(self, document: Mapping[str, Any]) -> Deferred[None]:
        """
        Serve a new configuration: take the sockets again and replace each
        worker by one started with C{document}; each old worker stops once
        its successor is ready, so that the sockets are served throughout.

        @return: A L{Deferred} that fires once only workers of the new
            configuration serve (every old one has ended), or after the
            ready timeout if they do not (the old ones serve on meanwhile,
            and the new ones are restarted as usual).
        """
        self.document = dict(document)
        if not self.running or self._stopping or self._failure is not None:
            return succeed(None)
        fds = list(self._sockets())
        if not fds:
            self._log.error(
                "reload: no socket to serve; the workers serve on as they were"
            )
            return succeed(None)
        self._fds = fds
        self._generation += 1
        for slot in range(self.count):
            # A slot waiting for its restart gets the new setup then.
            if self._restarts[slot] is None:
                self._spawn(slot)
        d: Deferred[None] = Deferred()
        timeout = self.clock.callLater(self._readyTimeout, self._reloadTimedOut, d)
        self._reloads.append((d, timeout))
        self._checkReloaded()
        return d

    def _reloaded(self) -> bool:
        """
        Whether only workers of the newest configuration run, all ready.
        """
        return all(
            w is not None
            and w.ready
            and w.replaces is None
            and w.generation == self._generation
            for w in self.workers
        ) and all(w.generation == self._generation for w in self._retiring)

    def _checkReloaded(self, force: bool = False) -> None:
        if not self._reloads or not (force or self._reloaded()):
            return
        reloads, self._reloads = self._reloads, []
        for d, timeout in reloads:
            if timeout.active():
                timeout.cancel()
            d.callback(None)

    def _reloadTimedOut(self, d: Deferred[None]) -> None:
        self._reloads = [(w, t) for w, t in self._reloads if w is not d]
        self._log.warn(
            "reload: the workers of the new configuration are not all serving "
            "after {timeout:g} s; older ones serve on until they are",
            timeout=self._readyTimeout,
        )
        d.callback(None)

    # Messages from workers

    def _message(self, worker: _WorkerProtocol, line: bytes) -> None:
        try:
            message = json.loads(line)
            if not isinstance(message, dict):
                raise ValueError("not an object")
        except ValueError:
            self._stderr(worker, line)
            return
        if "log" in message:
            self._publish(worker, message["log"])
        elif "stats" in message:
            try:
                self._latest[worker] = Snapshot.fromDict(message["stats"])
            except (KeyError, TypeError, ValueError, AttributeError):
                self._stderr(worker, line)
        elif message.get("ready"):
            self._ready(worker)

    def _publish(self, worker: _WorkerProtocol, text: Any) -> None:
        try:
            event = eventFromJSON(text)
        except (ValueError, TypeError, KeyError):
            self._stderr(worker, str(text).encode())
            return
        event["udpdstWorker"] = worker.number
        event["udpdstWorkerPid"] = worker.pid
        if isinstance(event.get("log_format"), str):
            # Literal text: the event's fields are already flattened.
            event["log_format"] = f"worker {worker.number}: " + event["log_format"]
        globalLogPublisher(event)

    def _stderr(self, worker: _WorkerProtocol, line: bytes) -> None:
        text = line.decode("utf-8", "backslashreplace").rstrip()
        worker.lastWords = text.strip()[:500]
        self._log.warn(
            "worker {worker} (pid {pid}): {line}",
            worker=worker.number,
            pid=worker.pid,
            line=text,
        )

    def _ready(self, worker: _WorkerProtocol) -> None:
        worker.ready = True
        self._startFailures[worker.number - 1] = 0
        worker.readyAt = self.clock.seconds()
        if worker.readyTimeout is not None:
            worker.readyTimeout.cancel()
            worker.readyTimeout = None
        old, worker.replaces = worker.replaces, None
        if old is not None:
            self._retire(old)
            self._log.info(
                "worker {worker} reloaded (pid {pid}, was {old})",
                worker=worker.number,
                pid=worker.pid,
                old=old.pid,
            )
        elif self._announced:
            self._log.info(
                "worker {worker} restarted (pid {pid})",
                worker=worker.number,
                pid=worker.pid,
            )
        self._checkReloaded()
        if self._announced:
            return
        live = [w for w in self.workers if w is not None]
        if len(live) == self.count and all(w.ready for w in live):
            self._announced = True
            if self._startDeadline is not None and self._startDeadline.active():
                self._startDeadline.cancel()
            self._startDeadline = None
            self._log.info(
                "udpdst workers: {count} running (pids {pids})",
                count=self.count,
                pids=", ".join(str(w.pid) for w in live),
            )
            waiting, self._waiting = self._waiting, []
            for d in waiting:
                d.callback(None)

    # Stats

    def total(self) -> Snapshot:
        """
        The sum of what the workers reported: the last report of every
        worker that ended, and the latest of each running one.  It covers
        everything the workers counted, except what a worker killed
        outright counted in its last L{udpdst.echo.worker.REPORT_INTERVAL}.
        """
        total = self._retired
        for snapshot in self._latest.values():
            total = total + snapshot
        return total

    # Stopping

    def _cancelTimers(self) -> None:
        """
        Cancel the start deadline and every scheduled restart: the pool
        gave up starting, or stops.
        """
        if self._startDeadline is not None and self._startDeadline.active():
            self._startDeadline.cancel()
        self._startDeadline = None
        for slot, call in enumerate(self._restarts):
            if call is not None and call.active():
                call.cancel()
            self._restarts[slot] = None

    def stopService(self) -> Deferred[Any]:
        Service.stopService(self)
        self._stopping = True
        # Nobody waits for a reload of a pool that stops.
        self._checkReloaded(force=True)
        self._cancelTimers()
        newest = [w for w in self.workers if w is not None]
        older = [w.replaces for w in newest if w.replaces is not None]
        for worker in newest + older:
            self._retire(worker)
        live = list(self._retiring)
        if not live:
            return succeed(None)
        timeout = self.clock.callLater(self._stopTimeout, self._killAll, live)
        d = DeferredList([w.ended for w in live])

        def done(result: Any) -> None:
            if timeout.active():
                timeout.cancel()

        d.addCallback(done)
        return d

    def _killAll(self, workers: Sequence[_WorkerProtocol]) -> None:
        for worker in workers:
            if not worker.ended.called:
                self._kill(worker, "stop", self._stopTimeout)

    def _signal(self, worker: _WorkerProtocol, name: str) -> None:
        try:
            worker.transport.signalProcess(name)  # type: ignore[union-attr]
        except (ProcessExitedAlready, OSError):
            pass


def serveWithWorkers(
    service: EchoService, count: int, reactor: Any = None
) -> WorkerPool:
    """
    Make an L{udpdst.echo.service.EchoService} serve its sockets with C{count}
    worker processes: it still binds them (or takes systemd's), but stops
    reading them itself, and reports the sum of what its workers count.

    @return: The L{WorkerPool}, added as a child of C{service}.
    """

    def sockets() -> list[WorkerSocket]:
        found = []
        for child in service.listeners:
            port = child.listeningPort
            assert port is not None, "serving starts after binding"
            # The parent only holds the sockets; the workers read them.
            port.stopReading()
            found.append(WorkerSocket(child.listener, port.fileno(), child.address))
        return found

    pool = WorkerPool(
        count,
        configDocument(service.config),
        sockets,
        reactor,
        readyTimeout=READY_TIMEOUT,
        startAttempts=START_ATTEMPTS,
    )

    def total() -> Snapshot:
        # The parent's own (all zero) first, so that every listener and the
        # limiter show even before the first report.
        return service.localSnapshot() + pool.total()

    service.snapshotProvider = total
    # A reload is done once the workers of the new configuration serve.
    service.afterReload.append(lambda: pool.reload(configDocument(service.config)))
    # Ready (for systemd, and the "running" line) once the workers serve.
    service.readyWhen = pool.whenReady
    service.addService(pool)
    return pool


def workerCommand() -> list[str]:
    """
    The command line that runs a worker: this Python, L{udpdst.echo.worker}.
    """
    return [
        sys.executable,
        "-c",
        "from udpdst.echo.worker import runWorker; raise SystemExit(runWorker())",
    ]

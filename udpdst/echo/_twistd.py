"""
What the udpdst service needs from twistd, in one place: the log observer
twistd would build (put behind our log level, in our format), the observer
for C{twistd --logger}, and a failed start reported the way twistd's daemon
mode expects (status pipe, pid file).
"""

from __future__ import annotations

import atexit
import os
import select
import signal
import sys
from typing import IO, Any

from twisted.logger import ILogObserver, jsonFileLogObserver, textFileLogObserver
from twisted.python.components import Componentized
from twisted.python.logfile import LogFile
from twisted.python.util import untilConcludes

from udpdst.echo import logs

#: The hooks of the twistd run in this process, once L{TwistdHooks.install}
#: ran (C{twistd --logger} factories find twistd's options there).
current: TwistdHooks | None = None


class TwistdHooks:
    """
    The service's ties to the twistd run that started it.

    @ivar options: twistd's own options (C{ServerOptions}): C{--logfile},
        C{--syslog}, C{--nodaemon}, C{--pidfile}, and the C{statusPipe}
        twistd sets in a daemon.
    @ivar logFormat: C{"text"} or C{"json"} (C{[log] format}).
    """

    def __init__(self, options: Any, logFormat: str = "text") -> None:
        self.options = options
        self.logFormat = logFormat
        self._output: IO[str] | None = None
        #: The process's exit status once twistd is done, if not twistd's
        #: own: set when the service stops because it cannot serve after
        #: the reactor started (twistd would exit 0).
        self.exitStatus: int | None = None
        self._statusPipe: int | None = None

    @classmethod
    def install(cls, options: Any, logFormat: str = "text") -> TwistdHooks:
        """
        The hooks for this process's twistd run; twistd's daemon parent
        from now on prints a failed start in full (L{waitForStart}).
        """
        global current
        current = cls(options, logFormat)
        _replaceWaitForStart()
        # Exit handlers run after twistd's own cleanup (the pid file), this
        # one after those registered later.
        atexit.register(current._exit)
        return current

    def _exit(self) -> None:
        if self.exitStatus is None:
            return
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError, AttributeError):
                pass
        os._exit(self.exitStatus)

    def logOutput(self) -> IO[str]:
        """
        The file twistd would log to: standard output in the foreground
        without C{--logfile} (or with C{--logfile -}), else the log file
        (C{twistd.log} by default), reopened on SIGUSR1 for log rotation.

        @raise SystemExit: With one line, if there is no such file to
            write (twistd prints it and exits 1).
        """
        if self._output is not None:
            return self._output
        path = self.options.get("logfile")
        daemon = not self.options.get("nodaemon")
        if path == "-" and daemon:
            raise SystemExit(
                "twistd udpdst: a daemon cannot log to standard output; give "
                "--logfile FILE, or run in the foreground with --nodaemon"
            )
        if path == "-" or (not daemon and not path):
            self._output = sys.stdout
            return sys.stdout
        path = path or "twistd.log"
        try:
            logFile = LogFile.fromFullPath(path)
        except OSError as e:
            raise SystemExit(
                f"twistd udpdst: cannot open the log file {path}: "
                f"{e.strerror or e}; give a --logfile in a directory that "
                "exists and that twistd may write to"
            ) from None
        if not signal.getsignal(signal.SIGUSR1):

            def rotate(*_: Any) -> None:
                from twisted.internet import reactor

                reactor.callFromThread(logFile.rotate)  # type: ignore[attr-defined]

            signal.signal(signal.SIGUSR1, rotate)
        self._output = logFile  # type: ignore[assignment]
        return self._output  # type: ignore[return-value]

    def logObserver(self) -> ILogObserver:
        """
        The observer for twistd's options and our format, behind the log
        level.
        """
        if self.options.get("syslog"):
            from twisted.python.syslog import SyslogObserver

            prefix = self.options.get("prefix") or "twisted"
            return logs.filtered(SyslogObserver(prefix).emit)
        out = self.logOutput()
        if self.logFormat == "json":
            return logs.filtered(logs.jsonLinesObserver(out))
        return logs.filtered(textFileLogObserver(out))

    def installLogObserver(self, application: Any) -> None:
        """
        Give twistd our observer: it uses an application's L{ILogObserver}
        component, if set, instead of building its own (unless C{--logger}
        was given).
        """
        if not isinstance(application, Componentized):
            return
        if application.getComponent(ILogObserver, None) is None:
            application.setComponent(ILogObserver, self.logObserver())

    def failedToStart(self, message: str) -> None:
        """
        The service ends by L{SystemExit} before it ran: tell a waiting
        daemon parent why, and remove the pid file, which twistd removes
        only after other exceptions.
        """
        self.tellDaemonParent(message)
        self._removePidFile()

    def holdStartStatus(self) -> None:
        """
        In daemon mode, tell twistd's first process that the service started
        only when L{started} (or L{tellDaemonParent}) says so, rather than
        when twistd would, before the reactor runs: for a service that
        serves only once the reactor runs (its workers must start first).
        """
        pipe = self.options.get("statusPipe")
        if pipe is not None:
            # twistd writes its "0" only if the option is still there.
            del self.options["statusPipe"]
            self._statusPipe = pipe

    def started(self) -> None:
        """
        The service serves: a daemon parent held by L{holdStartStatus}
        exits 0.
        """
        pipe, self._statusPipe = self._statusPipe, None
        if pipe is None:
            return
        try:
            untilConcludes(os.write, pipe, b"0")
            os.close(pipe)
        except OSError:
            pass

    def tellDaemonParent(self, message: str) -> None:
        """
        In daemon mode, twistd's first process waits for a status on a pipe
        and would wait forever for a child that ends by L{SystemExit}: send
        it the whole sentence (L{waitForStart} prints it).
        """
        pipe, self._statusPipe = self._statusPipe, None
        if pipe is None:
            pipe = self.options.get("statusPipe")
        if pipe is None:
            return
        # Within PIPE_BUF, so that it arrives in one piece.
        status = (b"1 " + message.encode("utf-8"))[: select.PIPE_BUF]
        try:
            untilConcludes(os.write, pipe, status)
            os.close(pipe)
        except OSError:
            pass

    def _removePidFile(self) -> None:
        path = self.options.get("pidfile")
        if not path:
            return
        try:
            with open(path, "rb") as f:
                ours = f.read().strip() == str(os.getpid()).encode()
            if ours:
                os.unlink(path)
        except OSError:
            pass


def waitForStart(runner: Any, readPipe: int) -> int:
    """
    twistd's first process, in daemon mode, waiting for the daemon's status:
    C{0} once it runs, else C{1} and the daemon's message on standard error
    as the plain text it is.  twistd's own prints at most 98 bytes of it as
    a bytes repr (C{An error has occurred: b'cannot listen on ...'}), the
    hint cut off.

    @return: The exit status for the first process.
    """
    # One read: this process holds the pipe's write end too (no EOF), and
    # the daemon writes its status in one write of less than PIPE_BUF.
    data = untilConcludes(os.read, readPipe, select.PIPE_BUF)
    if data == b"0":
        return 0
    text = data[2:] if data.startswith(b"1 ") else data
    message = text.decode("utf-8", "backslashreplace").strip() or (
        "the daemon ended before it started; see its log file"
    )
    stderr = sys.__stderr__
    if stderr is not None:
        untilConcludes(stderr.write, message + "\n")
        stderr.flush()
    return 1


def _replaceWaitForStart() -> None:
    # No public way: the daemon parent's reader is a private method of
    # twistd's runner.  tests/test_logs.py fails loudly if it changes.
    from twisted.scripts._twistd_unix import UnixApplicationRunner

    UnixApplicationRunner._waitForStart = waitForStart  # type: ignore[method-assign, assignment]


def jsonLogObserver() -> ILogObserver:
    """
    For C{twistd --logger udpdst.echo.jsonLogObserver}: Twisted's own event
    JSON (C{twisted.logger.eventsFromJSONLogFile} reads it back), one
    object per line, behind the log level, written where twistd would log
    (C{--logfile} in daemon mode).  For lines meant for people and log
    collectors, C{[log] format = "json"} is the one to use.
    """
    running = current
    out = running.logOutput() if running is not None else sys.stdout
    return logs.filtered(jsonFileLogObserver(out, recordSeparator=""))

"""
What the udpdst service needs from twistd, in one place: its log observer
put behind our log level, and a failed start reported the way twistd's
daemon mode expects (status pipe, pid file).
"""

from __future__ import annotations

import os
from typing import Any

from twisted.logger import ILogObserver
from twisted.python.components import Componentized

from udpdst import logs


class TwistdHooks:
    """
    The service's ties to the twistd run that started it.

    @ivar options: twistd's own options (C{ServerOptions}): C{--logfile},
        C{--pidfile}, and the C{statusPipe} twistd sets in a daemon.
    """

    def __init__(self, options: Any) -> None:
        self.options = options

    def installLogObserver(self, application: Any) -> None:
        """
        Give twistd the observer it would build, behind the log level: twistd
        uses an application's L{ILogObserver} component, if set, instead of
        building its own (unless C{--logger} was given).
        """
        if not isinstance(application, Componentized):
            return
        if application.getComponent(ILogObserver, None) is not None:
            return
        observer = logs.twistdLogObserver(self.options)
        if observer is not None:
            application.setComponent(ILogObserver, observer)

    def failedToStart(self, message: str) -> None:
        """
        The service ends by L{SystemExit} before it ran: tell a waiting
        daemon parent, and remove the pid file, which twistd removes only
        after other exceptions.
        """
        self._tellDaemonParent(message)
        self._removePidFile()

    def _tellDaemonParent(self, message: str) -> None:
        """
        In daemon mode, twistd's first process waits for a status on a pipe
        and would wait forever for a child that ends by L{SystemExit}: send
        it the cause (it prints it, at most 100 bytes, and exits 1).
        """
        pipe = self.options.get("statusPipe")
        if pipe is None:
            return
        cause = message.split(";", 1)[0].encode("ascii", "backslashreplace")
        try:
            os.write(pipe, b"1 " + cause[:98])
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

"""
Log level filtering and log observers for the udpdst service under twistd.

twistd's own observers write every event whatever its level; the service
installs a filtered observer instead (see L{twistdLogObserver}), and
L{jsonLogObserver} is a factory for C{twistd --logger} that writes one JSON
object per event, structured fields included.
"""

from __future__ import annotations

import sys
from typing import Any

from twisted.logger import (
    FilteringLogObserver,
    ILogFilterPredicate,
    ILogObserver,
    LegacyLogObserverWrapper,
    LogLevel,
    PredicateResult,
    jsonFileLogObserver,
)
from zope.interface import implementer


@implementer(ILogFilterPredicate)
class MinimumLevel:
    """
    Drops events below a level; events without a level pass.

    @ivar debug: Whether debug events pass: a plain attribute, for the
        per-datagram paths to test before building an event.
    """

    def __init__(self, level: Any = LogLevel.info) -> None:
        self.level = level

    @property
    def level(self) -> Any:
        """
        The lowest L{LogLevel} that passes.
        """
        return self._level

    @level.setter
    def level(self, level: Any) -> None:
        self._level = level
        self.debug = bool(level <= LogLevel.debug)

    def __call__(self, event: dict[str, Any]) -> Any:
        level = event.get("log_level")
        if level is not None and level < self.level:
            return PredicateResult.no
        return PredicateResult.maybe


#: The process's log level, set from the configuration by L{setLogLevel}.
minimumLevel = MinimumLevel()


def setLogLevel(name: str) -> None:
    """
    Set the process's log level by name (C{"debug"}, C{"info"}, C{"warn"},
    C{"error"}, C{"critical"}).
    """
    minimumLevel.level = LogLevel.levelWithName(name)


def isEnabled(level: Any) -> bool:
    """
    Whether events of C{level} pass the process's log level.
    """
    return bool(level >= minimumLevel.level)


def filtered(observer: Any) -> ILogObserver:
    """
    C{observer} (new or legacy) behind the process's log level.
    """
    if not ILogObserver.providedBy(observer):
        observer = LegacyLogObserverWrapper(observer)
    return FilteringLogObserver(observer, [minimumLevel])


def twistdLogObserver(serverOptions: Any) -> ILogObserver | None:
    """
    The observer twistd would build from its options (C{--logfile},
    C{--syslog}, C{--nodaemon}), behind the log level; L{None} if it cannot
    be built (twistd then uses its own, unfiltered).
    """
    try:
        from twisted.scripts._twistd_unix import UnixAppLogger

        observer = UnixAppLogger(serverOptions)._getLogObserver()
    except Exception:
        return None
    return filtered(observer)


def jsonLogObserver() -> ILogObserver:
    """
    For C{twistd --logger udpdst.logs.jsonLogObserver}: one JSON object per
    line on standard output (journald keeps them), with every structured
    field, behind the log level.  No RFC 7464 record separator, so that
    line-oriented tools read it.
    """
    return filtered(jsonFileLogObserver(sys.stdout, recordSeparator=""))

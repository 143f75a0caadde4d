"""
The udpdst service's log level and log formats: Twisted's
L{LogLevelFilterPredicate} as the process's level filter, and JSON lines an
operator's tools read (time, level, namespace, text and the structured
fields, no Twisted internals).

Where the lines go (standard output, C{--logfile}, syslog) is twistd's
choice: L{udpdst.echo._twistd} builds the observer from its options.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import IO, Any

from twisted.logger import (
    FileLogObserver,
    FilteringLogObserver,
    ILogObserver,
    LegacyLogObserverWrapper,
    LogLevel,
    LogLevelFilterPredicate,
    formatEvent,
)

#: Keys of a legacy (C{twisted.python.log}) event that only repeat what the
#: JSON record already says.
_LEGACY_KEYS = frozenset({"message", "format", "isError", "system", "time", "why"})


class LevelFilter(LogLevelFilterPredicate):
    """
    The process's log level: Twisted's L{LogLevelFilterPredicate}, whose
    default level is the configured one.

    @ivar debug: Whether debug events pass: a plain attribute, for the
        per-datagram paths to test before building an event.
    """

    def __init__(self, level: Any = LogLevel.info) -> None:
        LogLevelFilterPredicate.__init__(self, level)
        self.level = level

    @property
    def level(self) -> Any:
        """
        The lowest L{LogLevel} that passes.
        """
        return self.defaultLogLevel

    @level.setter
    def level(self, level: Any) -> None:
        self.defaultLogLevel = level
        self.clearLogLevels()
        self.debug = bool(level <= LogLevel.debug)


#: The process's log level, set from the configuration by L{setLogLevel}.
minimumLevel = LevelFilter()


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


def jsonRecord(event: dict[str, Any]) -> str:
    """
    An event as one line of JSON: C{time} (ISO 8601, UTC), C{level},
    C{namespace}, C{text} (the rendered message), C{traceback} if it
    carries a failure, then its structured fields.
    """
    level = event.get("log_level")
    record: dict[str, Any] = {
        "time": datetime.fromtimestamp(event.get("log_time", 0), UTC).isoformat(
            timespec="milliseconds"
        ),
        "level": level.name if level is not None else "info",
        "namespace": event.get("log_namespace", ""),
        "text": formatEvent(event),
    }
    failure = event.get("log_failure")
    if failure is not None:
        record["traceback"] = failure.getTraceback()
    for key, value in event.items():
        if key.startswith("log_") or key in _LEGACY_KEYS or key in record:
            continue
        record[key] = value
    # Objects among the fields (a protocol, say) are written as str().
    return json.dumps(record, default=str, ensure_ascii=False) + "\n"


def jsonLinesObserver(out: IO[str]) -> ILogObserver:
    """
    Write events to C{out} as L{jsonRecord} lines.
    """
    return FileLogObserver(out, jsonRecord)

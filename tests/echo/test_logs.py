"""
Logs of a real C{twistd udpdst}: JSON lines (time, level, namespace, text,
structured fields, no Twisted internals) in the foreground and in daemon
mode, the level filter, and the twistd internals the service relies on.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import socket
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from twisted.logger import LogLevel, LogLevelFilterPredicate, PredicateResult

from tests._service_helpers import Twistd, echo, startedTwistd, stopDaemon
from tests.conftest import pidFileRemoved
from udpdst import io
from udpdst.echo import logs
from udpdst.port import IO_PATH


@pytest.fixture
def started(tmp_path: Path) -> Iterator[Callable[..., Twistd]]:
    yield from startedTwistd(tmp_path)


def records(lines: list[str]) -> list[dict[str, Any]]:
    """
    Every line parsed as one JSON record of the documented shape.
    """
    found = []
    for line in lines:
        record = json.loads(line)
        assert list(record)[:4] == ["time", "level", "namespace", "text"], line
        assert datetime.fromisoformat(record["time"]).utcoffset() is not None
        assert record["level"] in ("debug", "info", "warn", "error", "critical")
        # No Twisted internals.
        assert not [k for k in record if k.startswith("log_")], line
        assert "message" not in record and "system" not in record, line
        found.append(record)
    return found


def checkServiceRecords(found: list[dict[str, Any]], port: int) -> None:
    (start,) = [r for r in found if r["text"].startswith("udpdst echo listening")]
    assert start["namespace"] == "udpdst.echo.listeners.ListenerService"
    assert start["address"] == f"127.0.0.1:{port}"
    # Every field means something on its own: no pieces of the text.
    assert (start["amplification"], start["reusePort"]) == (0, False)
    assert "how" not in start
    (running,) = [r for r in found if r["text"].startswith("udpdst echo service")]
    assert running["text"].startswith("udpdst echo service running: 1 listener, ")
    assert (running["count"], running["logLevel"]) == (1, "info")
    assert running["ioPath"] == IO_PATH
    assert running["statsInterval"] == 60
    assert "listeners" not in running and "stats" not in running
    (final,) = [r for r in found if r.get("final") is True]
    assert final["text"].startswith(
        f"final stats 127.0.0.1:{port}: received 1, replied 1, refused 0 (none)"
    )
    assert (final["received"], final["replied"], final["refused"]) == (1, 1, 0)
    assert final["refusedBy"]["rate"] == 0
    assert final["controlTruncated"] == 0


def test_jsonInTheForeground(started) -> None:  # type: ignore[no-untyped-def]
    process = started("--listen", "127.0.0.1:0", "--log-format", "json")
    ((_, port),) = process.listening()
    assert echo("127.0.0.1", port, b"json") == b"json"
    process.stop()
    assert process.err == []
    checkServiceRecords(records(process.out), port)


def test_jsonInDaemonMode(started, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """
    Daemonized with --logfile, the JSON lines go to that file.
    """
    config = tmp_path / "udpdst.toml"
    config.write_text('[log]\nformat = "json"\n')
    pidfile, logfile = tmp_path / "d.pid", tmp_path / "d.log"
    process = started(
        "--config",
        str(config),
        "--listen",
        "127.0.0.1:0",
        twistdArgs=["--pidfile", str(pidfile), "--logfile", str(logfile)],
    )
    assert process.finish() == 0, process.output()
    try:
        (start,) = [
            r
            for r in records(logfile.read_text().splitlines())
            if r["text"].startswith("udpdst echo listening")
        ]
        port = int(start["address"].rpartition(":")[2])
        assert echo("127.0.0.1", port, b"daemon") == b"daemon"
    finally:
        stopDaemon(pidfile)
    checkServiceRecords(records(logfile.read_text().splitlines()), port)


def test_jsonDaemonBindFailure(started, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """
    A failed bind in daemon mode: the whole sentence on the terminal, and
    one critical JSON record in the log file.
    """
    pidfile, logfile = tmp_path / "d.pid", tmp_path / "d.log"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as holder:
        holder.bind(("127.0.0.1", 0))
        port = holder.getsockname()[1]
        process = started(
            "--listen",
            f"127.0.0.1:{port}",
            "--log-format",
            "json",
            twistdArgs=["--pidfile", str(pidfile), "--logfile", str(logfile)],
        )
        assert process.finish() == 1
    sentence = (
        f"cannot listen on 127.0.0.1:{port}: address already in use; stop the "
        "other service on that port or choose another port, or set reuse_port "
        "= true in every process that shares it"
    )
    assert process.err == [sentence + "\n"]
    (critical,) = [
        r for r in records(logfile.read_text().splitlines()) if r["level"] != "info"
    ]
    assert (critical["level"], critical["text"]) == ("critical", sentence)
    assert pidFileRemoved(pidfile)


def test_twistedJsonLoggerInDaemonMode(started, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """
    twistd --logger udpdst.echo.jsonLogObserver --logfile F: Twisted's event
    JSON goes to F (it used to vanish).
    """
    pidfile, logfile = tmp_path / "d.pid", tmp_path / "d.log"
    process = started(
        "--listen",
        "127.0.0.1:0",
        twistdArgs=[
            "--pidfile",
            str(pidfile),
            "--logfile",
            str(logfile),
            "--logger",
            "udpdst.echo.jsonLogObserver",
        ],
    )
    assert process.finish() == 0, process.output()
    stopDaemon(pidfile)
    events = [json.loads(line) for line in logfile.read_text().splitlines()]
    assert [e for e in events if e.get("final") is True]
    assert any("udpdst echo listening" in e.get("log_format", "") for e in events)


@pytest.mark.parametrize("forced", [False, True], ids=["default", "UDPDST_IO=python"])
def test_runningLineNamesTheIOPath(started, forced: bool) -> None:  # type: ignore[no-untyped-def]
    """
    The service's start line says which I/O path its ports use: the C
    extension's where it is built, the pure-Python one where it is not or
    C{UDPDST_IO=python} forces it.
    """
    env = {k: v for k, v in os.environ.items() if k != "UDPDST_IO"}
    if forced:
        env["UDPDST_IO"] = "python"
    expected = "recvmsg" if forced or io.BATCHED is None else "recvmmsg"
    process = started("--listen", "127.0.0.1:0", env=env)
    process.listening()
    process.waitFor(
        r"udpdst echo service running: 1 listener, I/O path "
        + re.escape(expected)
        + ", log level info, stats every 60 s$"
    )
    process.stop()


def test_levelFilterIsTwisteds() -> None:
    """
    The process's level filter is Twisted's LogLevelFilterPredicate; its
    level and the per-datagram flag change together.
    """
    assert isinstance(logs.minimumLevel, LogLevelFilterPredicate)
    filter = logs.LevelFilter(LogLevel.warn)
    event = {"log_level": LogLevel.info, "log_namespace": "udpdst.echo"}
    assert filter(event) == PredicateResult.no
    assert not filter.debug
    filter.level = LogLevel.debug
    assert filter(event) == PredicateResult.maybe
    assert filter.debug
    assert filter({**event, "log_level": LogLevel.debug}) == PredicateResult.maybe


def test_jsonRecordOfAFailure() -> None:
    from twisted.python.failure import Failure

    try:
        1 / 0  # noqa: B018
    except ZeroDivisionError:
        failure = Failure()
    line = logs.jsonRecord(
        {
            "log_level": LogLevel.error,
            "log_namespace": "x",
            "log_format": "it broke: {what}",
            "log_time": 0.0,
            "log_failure": failure,
            "what": b"bytes",
            "thing": object(),
        }
    )
    record = json.loads(line)
    assert record["time"] == "1970-01-01T00:00:00.000+00:00"
    assert record["text"] == "it broke: b'bytes'"
    assert "ZeroDivisionError" in record["traceback"]
    assert record["thing"].startswith("<object object")
    assert line.endswith("}\n") and line.count("\n") == 1


def test_twistdDaemonReaderStillThere() -> None:
    """
    udpdst replaces twistd's private reader of a daemon's status (there is
    no public way to print a failed start in full): fail loudly if twistd
    no longer has it, or no longer calls it the same way.
    """
    from twisted.scripts._twistd_unix import UnixApplicationRunner

    reader = UnixApplicationRunner.__dict__.get("_waitForStart")
    assert reader is not None
    assert list(inspect.signature(reader).parameters) == ["self", "readPipe"]
    source = inspect.getsource(UnixApplicationRunner.daemonize)
    assert re.search(r"code = self\._waitForStart\(r\)", source)


@pytest.mark.parametrize(
    "twistdArgs, cause",
    [
        (["--logfile", "/nonexistent/dir/u.log"], "cannot open the log file"),
        (["-n", "--logfile", "/nonexistent/dir/u.log"], "cannot open the log file"),
        (["--logfile", "-"], "a daemon cannot log to standard output"),
    ],
)
def test_badLogFileIsOneLine(  # type: ignore[no-untyped-def]
    started, tmp_path: Path, twistdArgs: list[str], cause: str
) -> None:
    process = started(
        "--listen",
        "127.0.0.1:0",
        twistdArgs=["--pidfile", str(tmp_path / "d.pid"), *twistdArgs],
    )
    assert process.finish() == 1
    assert process.out == []
    (line,) = process.err
    assert line.startswith("twistd udpdst: ") and cause in line, line

"""
systemd C{Type=notify}: a real C{twistd udpdst} tells a fake service manager
(a C{NOTIFY_SOCKET} bound here) when it is ready, reloading and stopping,
and feeds the watchdog when C{WATCHDOG_USEC} asks it to.
"""

from __future__ import annotations

import os
import pwd
import re
import signal
import socket
import sys
import time
from pathlib import Path

import pytest

from tests._service_helpers import (
    DEADLINE,
    Twistd,
    asUser,
    echo,
    freePort,
    nobodyRunsPython,
    stopDaemon,
)
from tests.echo._helpers import BAD_CONFIGS
from udpdst.echo.systemd import Notifier


class Manager:
    """
    The service manager's end of C{NOTIFY_SOCKET}.
    """

    def __init__(self, address: str) -> None:
        self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.socket.bind(address)
        self.socket.settimeout(DEADLINE)
        self.messages: list[dict[str, str]] = []

    def next(self, skipWatchdog: bool = True) -> dict[str, str]:
        """
        The next notification (a dict of its assignments).
        """
        while True:
            data = self.socket.recv(4096).decode()
            message = dict(line.split("=", 1) for line in data.split("\n"))
            self.messages.append(message)
            if not (skipWatchdog and message == {"WATCHDOG": "1"}):
                return message

    def rest(self) -> list[dict[str, str]]:
        """
        The notifications not read yet, once the sender is gone.
        """
        self.socket.setblocking(False)
        try:
            while True:
                self.next(skipWatchdog=False)
        except BlockingIOError:
            pass
        return self.messages

    def close(self) -> None:
        self.socket.close()


@pytest.fixture
def manager(tmp_path: Path):  # type: ignore[no-untyped-def]
    m = Manager(str(tmp_path / "notify"))
    yield m
    m.close()


def test_readyReloadingStopping(manager: Manager, tmp_path: Path) -> None:
    """
    READY=1 once every listener answers; RELOADING=1 then READY=1 around a
    reload (with the new listener bound by then); STOPPING=1 at SIGTERM.
    """
    first, second = freePort(), freePort()
    config = tmp_path / "udpdst.toml"
    config.write_text(f'[[listen]]\naddress = "127.0.0.1"\nport = {first}\n')
    env = dict(os.environ, NOTIFY_SOCKET=str(tmp_path / "notify"))
    process = Twistd(["--config", str(config)], tmp_path, env=env)
    try:
        ready = manager.next()
        assert ready == {"READY": "1", "STATUS": "serving 1 listener"}
        assert echo("127.0.0.1", first, b"up") == b"up"

        config.write_text(
            f'[[listen]]\naddress = "127.0.0.1"\nport = {first}\n'
            f'[[listen]]\naddress = "127.0.0.1"\nport = {second}\n'
        )
        process.proc.send_signal(signal.SIGHUP)
        reloading = manager.next()
        assert reloading["RELOADING"] == "1"
        usec = int(reloading["MONOTONIC_USEC"])
        assert 0 < usec <= time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        assert manager.next() == {"READY": "1", "STATUS": "serving 2 listeners"}
        assert echo("127.0.0.1", second, b"new") == b"new"

        # A bad config at reload: still RELOADING=1 then READY=1.
        config.write_text("[echo\n")
        process.proc.send_signal(signal.SIGHUP)
        assert manager.next()["RELOADING"] == "1"
        assert manager.next() == {"READY": "1", "STATUS": "serving 2 listeners"}

        process.proc.send_signal(signal.SIGTERM)
        assert manager.next() == {"STOPPING": "1"}
        assert process.finish() == -signal.SIGTERM
    finally:
        process.kill()
    # Only these were sent, and no watchdog pings (WATCHDOG_USEC unset).
    assert [m for m in manager.messages if "WATCHDOG" in m] == []
    assert "Traceback" not in process.output()


def test_watchdog(manager: Manager, tmp_path: Path) -> None:
    """
    With WATCHDOG_USEC set for this process, WATCHDOG=1 comes every half
    of it; with WATCHDOG_PID naming another process, never.
    """
    env = dict(
        os.environ,
        NOTIFY_SOCKET=str(tmp_path / "notify"),
        WATCHDOG_USEC="200000",
    )
    process = Twistd(["--listen", "127.0.0.1:0"], tmp_path, env=env)
    try:
        assert manager.next()["READY"] == "1"
        for _ in range(3):
            assert manager.next(skipWatchdog=False) == {"WATCHDOG": "1"}
    finally:
        process.stop()
    # The pings stop before STOPPING=1, the last message.
    assert manager.next() == {"STOPPING": "1"}
    manager.socket.setblocking(False)
    with pytest.raises(BlockingIOError):
        manager.socket.recv(100)


def test_watchdogForAnotherProcess(tmp_path: Path) -> None:
    environ = {
        "NOTIFY_SOCKET": "@abstract",
        "WATCHDOG_USEC": "200000",
        "WATCHDOG_PID": str(os.getpid() + 1),
    }
    notifier = Notifier(environ)
    assert notifier.watchdogInterval == 0
    assert notifier.address == "\0abstract"
    # Read and removed, so that child processes do not speak for us.
    assert environ == {}
    environ = {"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "200000"}
    assert Notifier(environ).watchdogInterval == pytest.approx(0.1)


def test_abstractSocket(tmp_path: Path) -> None:
    """
    An abstract NOTIFY_SOCKET ("@name", as systemd sets it) works too.
    """
    name = f"udpdst-test-{os.getpid()}-{time.monotonic_ns()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind("\0" + name)
        s.settimeout(DEADLINE)
        Notifier({"NOTIFY_SOCKET": "@" + name}).notify("READY=1", "STATUS=x")
        assert s.recv(100) == b"READY=1\nSTATUS=x"


def test_nobodyListening(tmp_path: Path) -> None:
    """
    A NOTIFY_SOCKET nobody reads: one warning, never an exception.
    """
    from twisted.logger import LogLevel, globalLogPublisher

    events: list[dict[str, object]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        notifier = Notifier({"NOTIFY_SOCKET": str(tmp_path / "none")})
        notifier.notify("READY=1")
        notifier.notify("READY=1")
    finally:
        globalLogPublisher.removeObserver(events.append)
    warnings = [e for e in events if e.get("log_level") == LogLevel.warn]
    assert len(warnings) == 1
    assert "cannot notify systemd" in str(warnings[0]["log_format"])


#: A config the schema accepts but that no rate limiter can be built from:
#: the exception it raises at reload is one line too.
HUGE = (
    "[limits]\nper_source_burst = " + "9" * 400 + "\n",
    r"per_source_burst|too large",
)


def test_badConfigsAtReload(manager: Manager, tmp_path: Path) -> None:
    """
    Each bad config at reload: RELOADING=1 then READY=1, one line naming
    the cause, and the running configuration serves on.
    """
    port = freePort()
    config = tmp_path / "udpdst.toml"
    good = f'[[listen]]\naddress = "127.0.0.1"\nport = {port}\n[echo]\nprefix = "ok "\n'
    config.write_text(good)
    env = dict(os.environ, NOTIFY_SOCKET=str(tmp_path / "notify"))
    process = Twistd(["--config", str(config)], tmp_path, env=env)
    bad = [*BAD_CONFIGS, HUGE]
    try:
        assert manager.next()["READY"] == "1"
        for count, (text, cause) in enumerate(bad, 1):
            config.write_text(text)
            process.proc.send_signal(signal.SIGHUP)
            assert manager.next()["RELOADING"] == "1"
            assert manager.next() == {"READY": "1", "STATUS": "serving 1 listener"}
            failed = process.waitFor(
                r"reload failed, the running configuration is kept: (.*)", count
            )
            assert re.search(cause, failed[-1].group(1)), (cause, failed[-1].group(1))
            assert echo("127.0.0.1", port, b"%d" % count) == b"ok %d" % count
        process.stop()
    finally:
        process.kill()
    output = process.output()
    assert "Traceback" not in output
    assert len([x for x in output.splitlines() if "reload" in x]) == len(bad)


# Runs twistd with the workers' command and ready timeout replaced: argv is
# the timeout, the worker's Python code, then twistd's arguments.
_FAILING_WORKERS = """
import sys
import udpdst.echo.workers as workers
workers.READY_TIMEOUT = float(sys.argv[1])
code = sys.argv[2]
workers.workerCommand = lambda: [sys.executable, "-c", code]
sys.argv = [sys.argv[0], *sys.argv[3:]]
from twisted.scripts.twistd import run
run()
"""


def _withWorkers(code: str, timeout: float, *args: str) -> list[str]:
    return [
        sys.executable,
        "-c",
        _FAILING_WORKERS,
        str(timeout),
        code,
        "-n",
        "--pidfile=",
        "udpdst",
        "--listen",
        "127.0.0.1:0",
        "--workers",
        "2",
        *args,
    ]


def test_readyOnceTheWorkersServe(manager: Manager, tmp_path: Path) -> None:
    """
    With workers, READY=1 comes once both serve: each alone answers then.
    """
    env = dict(os.environ, NOTIFY_SOCKET=str(tmp_path / "notify"))
    process = Twistd(["--listen", "127.0.0.1:0", "--workers", "2"], tmp_path, env=env)
    try:
        assert manager.next() == {"READY": "1", "STATUS": "serving 1 listener"}
        (running,) = process.waitFor(r"udpdst workers: 2 running \(pids (\d+), (\d+)\)")
        ((_, port),) = process.listening()
        for pid in map(int, running.groups()):
            os.kill(pid, signal.SIGSTOP)
            try:
                assert echo("127.0.0.1", port, b"one") == b"one"
            finally:
                os.kill(pid, signal.SIGCONT)
        assert process.stop() == -signal.SIGTERM
    finally:
        process.kill()
    assert manager.rest()[-1] == {"STOPPING": "1"}


@pytest.mark.parametrize(
    "code, timeout, reason",
    [
        (
            "import sys; sys.stderr.write('cannot serve\\n'); sys.exit(3)",
            60,
            r"worker \d exited with status 3 before it was ready \(cannot serve\), "
            r"3 times in a row",
        ),
        ("import time; time.sleep(60)", 1, r"0 of 2 workers serving after 1 s"),
    ],
    ids=["exit", "hang"],
)
def test_workersThatCannotStart(
    manager: Manager, tmp_path: Path, code: str, timeout: float, reason: str
) -> None:
    """
    Workers that exit before they are ready, three times in a row, or that
    never say they serve within the timeout: one line says why, the
    service exits with status 1, and systemd never hears READY=1.
    """
    env = dict(os.environ, NOTIFY_SOCKET=str(tmp_path / "notify"))
    process = Twistd((), tmp_path, command=_withWorkers(code, timeout), env=env)
    try:
        assert process.finish() == 1
    finally:
        process.kill()
    output = process.output()
    (line,) = re.findall(r".*the workers could not start.*", output)
    assert re.search(rf"the workers could not start: {reason}; stopping$", line), line
    assert "Traceback" not in output
    messages = manager.rest()
    assert not [m for m in messages if "READY" in m], messages
    assert messages[-1] == {"STOPPING": "1"}


@pytest.mark.skipif(os.geteuid() != 0, reason="dropping to nobody needs root")
def test_workersThatTheDroppedUserCannotRun(tmp_path: Path) -> None:
    """
    twistd --uid nobody, where nobody cannot run this Python: the workers
    cannot start, and the service says why and exits 1.
    """
    if nobodyRunsPython() is None:
        pytest.skip(f"nobody can run {sys.executable}: the workers would start")
    process = Twistd(
        ["--listen", "127.0.0.1:0", "--workers", "2"],
        tmp_path,
        twistdArgs=asUser(pwd.getpwnam("nobody")),
    )
    try:
        assert process.finish() == 1
    finally:
        process.kill()
    output = process.output()
    (line,) = re.findall(r".*the workers could not start.*", output)
    assert "Permission denied" in line, line
    assert "Traceback" not in output.replace("worker 1", "").replace("worker 2", "")


def test_reloadWithWorkersReadyOnceReplaced(manager: Manager, tmp_path: Path) -> None:
    """
    With workers, READY=1 after RELOADING=1 comes once only workers of the
    new configuration serve: every answer after it has the new prefix.
    """
    port = freePort()
    config = tmp_path / "udpdst.toml"

    def write(prefix: str) -> None:
        config.write_text(
            f'[[listen]]\naddress = "127.0.0.1"\nport = {port}\n'
            f'[echo]\nprefix = "{prefix}"\n'
            "[limits]\nper_source_rate = 0\n[log]\nstats_interval = 0\n"
        )

    write("old ")
    env = dict(os.environ, NOTIFY_SOCKET=str(tmp_path / "notify"))
    process = Twistd(["--config", str(config), "--workers", "2"], tmp_path, env=env)
    try:
        assert manager.next()["READY"] == "1"
        assert echo("127.0.0.1", port, b"a") == b"old a"
        write("new ")
        process.proc.send_signal(signal.SIGHUP)
        assert manager.next()["RELOADING"] == "1"
        assert manager.next() == {"READY": "1", "STATUS": "serving 1 listener"}
        # From a new client socket each: any worker may take each one.
        for i in range(20):
            assert echo("127.0.0.1", port, b"%d" % i) == b"new %d" % i
        assert process.stop() == -signal.SIGTERM
    finally:
        process.kill()
    output = process.output()
    assert len(re.findall(r"worker \d reloaded", output)) == 2
    assert "Traceback" not in output


def test_daemonWaitsForTheWorkers(tmp_path: Path) -> None:
    """
    Daemonized: twistd's first process exits 0 only once the workers
    serve, and 1 with the reason on the terminal if they cannot start.
    """
    pidfile, logfile = tmp_path / "d.pid", tmp_path / "d.log"
    daemon = ["--pidfile", str(pidfile), "--logfile", str(logfile)]
    process = Twistd(
        ["--listen", "127.0.0.1:0", "--workers", "2"], tmp_path, twistdArgs=daemon
    )
    assert process.finish() == 0, process.output()
    try:
        # Logged before the first process was told: both workers serve.
        assert re.search(r"udpdst workers: 2 running", logfile.read_text())
    finally:
        stopDaemon(pidfile)
    command = _withWorkers("import sys; sys.exit(3)", 60)
    command[command.index("-n") : command.index("-n") + 2] = daemon
    failing = Twistd((), tmp_path, command=command)
    assert failing.finish() == 1
    (line,) = failing.err
    assert re.fullmatch(
        r"the workers could not start: worker \d exited with status 3 before it "
        r"was ready, 3 times in a row\n",
        line,
    ), line
    # The daemon removes its pid file as it ends, after telling the first
    # process: wait until it is gone.
    try:
        daemon = int(pidfile.read_text())
    except (OSError, ValueError):
        daemon = None
    deadline = time.monotonic() + DEADLINE
    while daemon is not None and _alive(daemon):
        assert time.monotonic() < deadline, f"daemon {daemon} did not end"
        time.sleep(0.05)
    assert not pidfile.exists()


def _alive(pid: int) -> bool:
    """
    Whether C{pid} runs (a zombie waiting for its reaper does not).
    """
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False

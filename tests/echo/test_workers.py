"""
Tests for udpdst.echo.workers: C{twistd udpdst --workers N} as an operator runs
it (real twistd and worker processes, real sockets on loopback), and the
restart policy with real worker processes that exit at once or hang.
"""

from __future__ import annotations

import ipaddress
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests._service_helpers import (
    DEADLINE,
    TWISTD,
    Twistd,
    askThroughReload,
    assertLargestAnswered,
    assertNothingListens,
    asUser,
    echo,
    freePort,
    nobodyRunsPython,
    scrape,
    socketActivateCommand,
    startedTwistd,
    systemdCommand,
)
from udpdst.echo.config import (
    Config,
    EchoConfig,
    LimitsConfig,
    ListenConfig,
    configDocument,
    parseConfig,
)
from udpdst.echo.workers import (
    Backoff,
    cpuCount,
    workerCommand,
    workerCount,
)

RUNNING = re.compile(r"udpdst workers: (\d+) running \(pids ([\d, ]+)\)")
FINAL = re.compile(r"final stats (\S+): received (\d+), replied (\d+)")


@pytest.fixture
def started(tmp_path: Path) -> Iterator[Callable[..., Twistd]]:
    """
    Start twistd processes; kill (by pid) whatever a test left running,
    workers included.
    """
    yield from startedTwistd(tmp_path, cleanup=_killWithWorkers)


def _killWithWorkers(process: Twistd) -> None:
    workers = [
        int(p)
        for m in RUNNING.finditer(process.output())
        for p in m.group(2).split(", ")
    ]
    process.kill()
    for pid in workers:
        _killIfOurs(pid, process.proc.pid)


def _parent(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def _killIfOurs(pid: int, parent: int) -> None:
    # Only a process the test's twistd started (or init, once it is gone);
    # a reused pid of another process is left alone.
    if _parent(pid) in (parent, 1):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _running(pid: int) -> bool:
    return os.path.exists(f"/proc/{pid}") and _state(pid) not in (None, "Z")


def _gone(pid: int) -> bool:
    """
    Wait until C{pid} has ended; whether it did within the deadline.
    """
    deadline = time.monotonic() + DEADLINE
    while _running(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _state(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return None


@contextmanager
def paused(pid: int) -> Iterator[None]:
    """
    Stop C{pid} (SIGSTOP) until the block ends; wait until it is stopped,
    so that it cannot take a datagram sent in the block.
    """
    os.kill(pid, signal.SIGSTOP)
    try:
        deadline = time.monotonic() + DEADLINE
        while _state(pid) not in ("T", "t"):
            assert time.monotonic() < deadline, f"{pid} did not stop"
            time.sleep(0.01)
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def _workers(process: Twistd, count: int = 2) -> list[int]:
    (running,) = process.waitFor(RUNNING)
    assert int(running.group(1)) == count
    pids = [int(p) for p in running.group(2).split(", ")]
    assert len(set(pids)) == count
    for pid in pids:
        assert _parent(pid) == process.proc.pid
    return pids


def _stoppedWithTotal(process: Twistd, count: int, workers: list[int]) -> None:
    """
    SIGTERM stops the parent and every worker; the final stats count
    C{count} datagrams received and replied, summed over the workers.
    """
    assert process.stop() == -signal.SIGTERM
    (final,) = process.waitFor(FINAL)
    assert final.group(2, 3) == (str(count), str(count))
    for pid in workers:
        assert _gone(pid), pid


def _config(tmp_path: Path, statsInterval: float = 0) -> str:
    """
    A config without a rate limit (the tests send many datagrams from one
    source) listening on a free port on 127.0.0.1.
    """
    path = tmp_path / "udpdst.toml"
    path.write_text(
        "[[listen]]\n"
        'address = "127.0.0.1"\n'
        "port = 0\n"
        "[limits]\n"
        "per_source_rate = 0\n"
        "per_prefix_rate = 0\n"
        "[log]\n"
        f"stats_interval = {statsInterval}\n"
    )
    return str(path)


def _echoMany(port: int, count: int, tag: bytes) -> None:
    for i in range(count):
        data = b"%s %d" % (tag, i)
        assert echo("127.0.0.1", port, data) == data


# Pure parts


def test_configDocumentRoundTrip() -> None:
    """
    The configuration a worker gets reads back equal to the parent's.
    """
    config = Config(
        listen=(
            ListenConfig(address="127.0.0.1", port=0, max_packet_size=1000),
            ListenConfig(systemd=True, fd_name="echo"),
        ),
        echo=EchoConfig(prefix="w: "),
        limits=LimitsConfig(
            per_source_rate=5.5,
            allow=(ipaddress.ip_network("10.0.0.0/8"),),
            deny=(ipaddress.ip_network("2001:db8::/32"),),
            deny_source_ports=(0, 7, 19),
        ),
    )
    assert parseConfig(configDocument(config)) == config
    assert parseConfig(configDocument(Config())) == Config()


def test_workerCount() -> None:
    assert workerCount("auto") == cpuCount() == len(os.sched_getaffinity(0))
    assert workerCount(3) == 3


def test_backoff() -> None:
    """
    Quick deaths double the delay up to the maximum; a worker that ran
    long enough brings it back to the start.
    """
    backoff = Backoff(initial=0.5, maximum=4.0, steady=10.0)
    assert [backoff.after(0.1) for _ in range(6)] == [0.5, 1, 2, 4, 4, 4]
    assert backoff.after(10.0) == 0.5
    assert backoff.after(1.0) == 1.0


# Real processes


def test_workerStartedByHand() -> None:
    """
    A worker run without its parent's setup says so in one line.
    """
    result = subprocess.run(
        workerCommand(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=DEADLINE,
    )
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr == (
        "udpdst.echo.worker: no setup on standard input; workers are started by "
        "twistd udpdst with workers >= 2, not by hand\n"
    )


# A pool of one worker that writes the time it started to a file and then
# exits with status 3 ("exit") or hangs ("hang"); the pool runs until it
# has started the worker N times, then stops.
_POOL = """
import socket
import sys
from pathlib import Path
from twisted.internet import reactor, task
from twisted.logger import globalLogBeginner, textFileLogObserver
from udpdst.echo.config import ListenConfig
from udpdst.echo.workers import Backoff, WorkerPool, WorkerSocket

starts, how, count = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
# A socket for the workers to serve: a pool starts none without one.
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.bind(("127.0.0.1", 0))
starts.touch()
globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stdout)])
then = "sys.exit(3)" if how == "exit" else "time.sleep(60)"
pool = WorkerPool(
    1,
    {},
    lambda: [WorkerSocket(ListenConfig(), sock.fileno(), "test")],
    reactor,
    backoff=lambda: Backoff(initial=0.05, maximum=0.4, steady=10.0),
    readyTimeout=0.3,
    # Restarted however often it fails, for as long as the test runs.
    startAttempts=1000,
    startTimeout=3600,
    command=[
        sys.executable,
        "-c",
        "import sys, time; "
        "open(sys.argv[1], 'a').write(repr(time.time()) + chr(10)); " + then,
        str(starts),
    ],
)
pool.startService()


def check():
    if len(starts.read_text().split()) >= count:
        loop.stop()
        pool.stopService().addCallback(lambda _: reactor.stop())


loop = task.LoopingCall(check)
loop.start(0.02)
reactor.run()
"""


def _runPool(tmp_path: Path, how: str, count: int) -> tuple[str, list[float]]:
    """
    Run L{_POOL}; its log and the times its worker started.
    """
    starts = tmp_path / "starts"
    result = subprocess.run(
        [sys.executable, "-c", _POOL, str(starts), how, str(count)],
        capture_output=True,
        text=True,
        timeout=DEADLINE,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout, [float(t) for t in starts.read_text().split()]


def test_workerThatCannotStartBacksOff(tmp_path: Path) -> None:
    """
    A worker that exits at once is restarted after 0.05, 0.1, 0.2, 0.4, 0.4
    seconds: never in a tight loop, however fast it fails.
    """
    log, times = _runPool(tmp_path, "exit", 6)
    delays = re.findall(
        r"worker 1 \(pid \d+\) exited with status 3 after [\d.]+ s before it "
        r"was ready; restarting it in ([\d.]+) s",
        log,
    )
    assert delays[:5] == ["0.05", "0.1", "0.2", "0.4", "0.4"], log
    gaps = [later - earlier for earlier, later in zip(times, times[1:], strict=False)]
    # Each start came at least its delay after the one before had ended.
    for gap, delay in zip(gaps, delays[:5], strict=False):
        assert gap >= float(delay), (gaps, delays)


def test_workerThatNeverServesIsKilled(tmp_path: Path) -> None:
    """
    A worker that does not say it serves within the ready timeout is
    killed, and restarted after its backoff.
    """
    log, times = _runPool(tmp_path, "hang", 3)
    assert (
        len(re.findall(r"worker 1 \(pid \d+\) did not start serving within 0.3 s", log))
        >= 2
    ), log
    delays = re.findall(
        r"worker 1 \(pid \d+\) killed by SIGKILL after [\d.]+ s before it was "
        r"ready; restarting it in ([\d.]+) s",
        log,
    )
    assert delays[:2] == ["0.05", "0.1"], log
    gaps = [later - earlier for earlier, later in zip(times, times[1:], strict=False)]
    assert all(gap >= 0.3 for gap in gaps), gaps


def test_workersServeTheSameSocket(started, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """
    --workers 2: the count and pids are logged; each worker alone answers
    (the other one stopped by SIGSTOP); SIGTERM stops the parent and both
    workers, and the final stats are the sum over both.
    """
    process = started("--config", _config(tmp_path), "--workers", "2")
    ((_, port),) = process.listening()
    first, second = _workers(process)
    with paused(first):
        _echoMany(port, 10, b"to second")
    with paused(second):
        _echoMany(port, 7, b"to first")
    _stoppedWithTotal(process, 17, [first, second])


def test_killedWorkerIsRestarted(started, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """
    A worker killed outright is restarted; what it had reported stays in
    the totals.
    """
    process = started("--config", _config(tmp_path, 0.2), "--workers", "2")
    ((_, port),) = process.listening()
    first, second = _workers(process)
    _echoMany(port, 12, b"before")
    # Until the periodic stats show all 12: both workers reported them.
    process.waitFor(r"(?<!final )stats \S+: received 12,")
    os.kill(first, signal.SIGKILL)
    (restarted,) = process.waitFor(r"worker 1 restarted \(pid (\d+)\)")
    third = int(restarted.group(1))
    assert third not in (first, second)
    assert re.search(
        rf"worker 1 \(pid {first}\) killed by SIGKILL after [\d.]+ s; restarting "
        r"it in 0.5 s",
        process.output(),
    )
    with paused(second):
        _echoMany(port, 5, b"to the new one")
    _stoppedWithTotal(process, 17, [second, third])


def test_socketActivationWithWorkers(started) -> None:  # type: ignore[no-untyped-def]
    """
    The socket systemd passes (fd 3, LISTEN_FDS/LISTEN_PID) is served by the
    workers, from the address each client asked.
    """
    inherited = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    inherited.bind(("0.0.0.0", 0))
    port = inherited.getsockname()[1]
    fd = inherited.fileno()
    try:
        process = started(
            command=systemdCommand(fd, "--listen", "systemd:echo", "--workers", "2"),
            passFds=[fd],
        )
    finally:
        inherited.close()
    (found,) = process.listening()
    assert found[1] == port
    first, second = _workers(process)
    for stopped, target in ((first, "127.0.0.2"), (second, "127.0.0.3")):
        with paused(stopped):
            assert echo(target, port, b"activated") == b"activated"
    _stoppedWithTotal(process, 2, [first, second])


def test_workersEndWithTheirParent(started, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """
    A parent killed outright (no SIGTERM for its workers) leaves no worker
    behind: each sees its standard input end and stops.
    """
    process = started("--config", _config(tmp_path), "--workers", "2")
    process.listening()
    first, second = _workers(process)
    process.kill()
    assert _gone(first) and _gone(second)


@pytest.mark.skipif(os.geteuid() != 0, reason="binding port 7 needs root")
def test_restartedWorkerServesPrivilegedPort(started, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """
    Port 7 is bound once, before twistd drops to nobody: workers run as
    nobody, and one restarted after a kill still serves port 7 (it never
    binds anything itself).
    """
    nobody = pwd.getpwnam("nobody")
    # Workers are started after the drop: nobody must be able to run this
    # Python and import udpdst.
    cannot = nobodyRunsPython()
    if cannot:
        pytest.skip(cannot)
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.bind(("127.0.0.7", 7))
    except OSError as e:
        pytest.skip(f"127.0.0.7:7 is taken ({e.strerror})")
    process = started(
        "--listen",
        "127.0.0.7:7",
        "--workers",
        "2",
        twistdArgs=asUser(nobody),
    )
    assert process.listening() == [("127.0.0.7", 7)]
    first, second = _workers(process)
    os.kill(first, signal.SIGKILL)
    (restarted,) = process.waitFor(r"worker 1 restarted \(pid (\d+)\)")
    third = int(restarted.group(1))
    for pid in (second, third):
        status = Path(f"/proc/{pid}/status").read_text()
        uids = re.search(r"^Uid:\s+(.*)$", status, re.M)
        assert uids is not None and set(uids.group(1).split()) == {str(nobody.pw_uid)}
    with paused(second):
        assert echo("127.0.0.7", 7, b"seven") == b"seven"
    _stoppedWithTotal(process, 1, [second, third])


def test_reloadReplacesWorkersWithoutLoss(started, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """
    SIGHUP: the parent applies the new configuration and replaces each
    worker by one that runs it, the old one stopping once the new one is
    ready; a client sending through the reload gets every answer.
    """
    kept, removed, added = freePort(), freePort(), freePort()

    def write(prefix: str, *ports: int) -> None:
        config.write_text(
            "".join(f'[[listen]]\naddress = "127.0.0.1"\nport = {p}\n' for p in ports)
            + f'[echo]\nprefix = "{prefix}"\n'
            + "[limits]\nper_source_rate = 0\nper_prefix_rate = 0\n"
            + "[log]\nstats_interval = 0\n"
        )

    config = tmp_path / "udpdst.toml"
    write("old: ", kept, removed)
    process = started("--config", str(config), "--workers", "2")
    process.listening(2)
    old = _workers(process)
    assert echo("127.0.0.1", removed, b"x") == b"old: x"
    write("new: ", kept, added)
    sent = 0
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        client.settimeout(DEADLINE / 3)
        client.connect(("127.0.0.1", kept))
        while sent < 20 or any(map(_running, old)):
            data = b"%d" % sent
            client.send(data)
            assert client.recv(100) in (b"old: " + data, b"new: " + data)
            sent += 1
            if sent == 20:
                process.proc.send_signal(signal.SIGHUP)
        new = [
            int(m.group(1))
            for m in process.waitFor(r"worker \d reloaded \(pid (\d+), was \d+\)", 2)
        ]
        assert set(new).isdisjoint(old)
        for stopped in new:
            with paused(stopped):
                client.send(b"after")
                assert client.recv(100) == b"new: after"
                sent += 1
    assert echo("127.0.0.1", added, b"y") == b"new: y"
    assertNothingListens(removed)
    assert process.stop() == -signal.SIGTERM
    output = process.output()
    assert f"final stats 127.0.0.1:{kept}: received {sent}, replied {sent}," in output
    assert f"final stats 127.0.0.1:{added}: received 1, replied 1," in output
    assert "Traceback" not in output


def test_socketActivateToolWithWorkers(started) -> None:  # type: ignore[no-untyped-def]
    """
    With systemd-socket-activate, which execs twistd on the first datagram:
    the workers answer that queued datagram and the ones after it.
    """
    port = freePort("0.0.0.0")
    process = started(
        command=socketActivateCommand(f"0.0.0.0:{port}", "--workers", "2")
    )
    process.waitFor(r"Listening on", stderr=True)
    # Queued before udpdst enabled its options: answered from the kernel's
    # choice of source, so ask the primary address.
    assert echo("127.0.0.1", port, b"first") == b"first"
    process.listening()
    first, second = _workers(process)
    with paused(first):
        assert echo("127.0.0.2", port, b"second") == b"second"
    with paused(second):
        assert echo("127.0.0.3", port, b"third") == b"third"
    _stoppedWithTotal(process, 3, [first, second])


def test_sigtermToTheWholeGroup(started, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """
    SIGTERM to the parent and its workers at once (what systemd's default
    KillMode does): all stop, and the final stats still count every
    datagram, whether the workers had reported them yet or not.
    """
    setsid = shutil.which("setsid")
    if setsid is None:
        pytest.skip("no setsid to give twistd a process group of its own")
    process = started(
        command=[
            setsid,
            TWISTD,
            "-n",
            "--pidfile=",
            "udpdst",
            "--config",
            _config(tmp_path),
            "--workers",
            "2",
        ]
    )
    ((_, port),) = process.listening()
    workers = _workers(process)
    assert os.getpgid(process.proc.pid) == process.proc.pid
    _echoMany(port, 5, b"group")
    os.killpg(process.proc.pid, signal.SIGTERM)
    assert process.finish() == -signal.SIGTERM
    _stoppedWithTotal(process, 5, workers)


def test_metricsSumTheWorkers(started) -> None:  # type: ignore[no-untyped-def]
    """
    /metrics, served by the parent alone, counts what every worker
    answered.
    """
    pytest.importorskip(
        "prometheus_client.parser",
        reason="the metrics extra (prometheus_client) is not installed",
    )
    process = started(
        "--listen",
        "127.0.0.1:0",
        "--metrics",
        "127.0.0.1:0",
        "--workers",
        "2",
        "--stats-interval",
        "0",
    )
    ((_, port),) = process.listening()
    (served,) = process.waitFor(r"udpdst metrics on (http://\S+/metrics)")
    first, second = _workers(process)
    with paused(first):
        _echoMany(port, 2, b"to second")
    with paused(second):
        _echoMany(port, 3, b"to first")
    key = ("udpdst_replied_total", (("listener", f"127.0.0.1:{port}"),))
    deadline = time.monotonic() + DEADLINE
    while True:
        # The workers report every second: wait for both reports.
        samples = scrape(served.group(1))
        if samples.get(key) == 5:
            break
        assert time.monotonic() < deadline, samples
        time.sleep(0.1)
    _stoppedWithTotal(process, 5, [first, second])


def _reloadMaxPacketSize(
    process: Twistd, config: Path, host: str, port: int, text: str
) -> None:
    """
    Reload C{config} as C{text} with max_packet_size = 100 while a client
    asks every 50 ms: every answer comes, from the old workers and then the
    new ones; once the old ones are gone, 100 bytes is the largest answered.
    """
    old = _workers(process)
    config.write_text(text)
    askThroughReload(
        host,
        port,
        lambda: process.proc.send_signal(signal.SIGHUP),
        lambda: not any(map(_running, old)),
    )
    (line,) = process.waitFor(r"reloaded configuration: (.*)")
    assert line.group(1) == f"listener {host}:{port}: max_packet_size 65535 -> 100"
    new = [
        int(m.group(1))
        for m in process.waitFor(r"worker \d reloaded \(pid (\d+), was \d+\)", 2)
    ]
    for serving in new:
        # Each new worker alone: the one paused cannot take it.
        with paused(serving):
            assertLargestAnswered(host, port, 100)
    assert "Traceback" not in process.output()


def test_reloadMaxPacketSizeWithWorkers(started, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """
    With two workers, a reload that changes max_packet_size keeps the
    socket the workers share (binding it again would fail: they hold it).
    """
    port = freePort()
    config = tmp_path / "udpdst.toml"
    text = (
        f'[[listen]]\naddress = "127.0.0.1"\nport = {port}\n'
        "[limits]\nper_source_rate = 0\n[log]\nstats_interval = 0\n"
    )
    config.write_text(text)
    process = started("--config", str(config), "--workers", "2")
    process.listening()
    _reloadMaxPacketSize(
        process,
        config,
        "127.0.0.1",
        port,
        text.replace("port = ", "max_packet_size = 100\nport = "),
    )
    process.stop()
    assert len(re.findall(r"udpdst echo listening on", process.output())) == 1


@pytest.mark.skipif(os.geteuid() != 0, reason="binding port 7 needs root")
def test_reloadOnAPrivilegedPortWithWorkers(started) -> None:  # type: ignore[no-untyped-def]
    """
    Port 7 bound as root, two workers as nobody: a reload that changes
    max_packet_size serves port 7 throughout.
    """
    cannot = nobodyRunsPython()
    if cannot:
        pytest.skip(cannot)
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.bind(("127.0.0.7", 7))
    except OSError as e:
        pytest.skip(f"127.0.0.7:7 is taken ({e.strerror})")
    public = Path(tempfile.mkdtemp(prefix="udpdst-test-"))
    try:
        # Read again at reload, by nobody.
        public.chmod(0o755)
        config = public / "udpdst.toml"
        text = (
            '[[listen]]\naddress = "127.0.0.7"\nport = 7\n'
            "[limits]\nper_source_rate = 0\n[log]\nstats_interval = 0\n"
        )
        config.write_text(text)
        config.chmod(0o644)
        process = started(
            "--config",
            str(config),
            "--workers",
            "2",
            twistdArgs=asUser(pwd.getpwnam("nobody")),
        )
        assert process.listening() == [("127.0.0.7", 7)]
        _reloadMaxPacketSize(
            process,
            config,
            "127.0.0.7",
            7,
            text.replace("port = 7", "port = 7\nmax_packet_size = 100"),
        )
        process.stop()
    finally:
        shutil.rmtree(public)

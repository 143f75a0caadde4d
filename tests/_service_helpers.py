"""
Helpers for tests that run C{twistd udpdst} as a real subprocess: start it,
read its log as it comes, talk to it over loopback, stop it by its pid.
"""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from twisted.logger import eventFromJSON, formatEvent

# The tests' one connected client; the service tests import it from here too.
from tests.clients import echo  # noqa: F401

#: The twistd of the Python running the tests (the venv the project is
#: installed in).
TWISTD = str(Path(sys.executable).parent / "twistd")

REPO = Path(__file__).resolve().parent.parent

#: How long a subprocess may take to do what a test waits for: a bound on a
#: hung test, not a timing assertion.
DEADLINE = 30.0


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """
    The Prometheus samples at C{url}, by name and sorted labels (needs the
    C{metrics} extra, C{prometheus_client}).
    """
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=DEADLINE) as response:
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


START_LINE = re.compile(r"udpdst echo listening on (\S+?)[;( ]")
RUNNING_LINE = re.compile(r"udpdst echo service running")


def readable(line: str) -> str:
    """
    A log line as text: the text of C{[log] format = "json"} records,
    Twisted's JSON events (C{--logger udpdst.echo.jsonLogObserver})
    formatted, other lines as they are.
    """
    if line.startswith("{"):
        try:
            record = json.loads(line)
            if "text" in record and "log_format" not in record:
                return str(record["text"])
            return formatEvent(eventFromJSON(line))
        except (ValueError, KeyError):
            pass
    return line


def splitAddress(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


class Twistd:
    """
    A C{twistd} subprocess whose standard output and error are collected by
    threads as they come.
    """

    def __init__(
        self,
        args: Sequence[str],
        cwd: Path,
        *,
        twistdArgs: Sequence[str] = ("-n", "--pidfile="),
        command: Sequence[str] | None = None,
        env: dict[str, str] | None = None,
        passFds: Sequence[int] = (),
        shell: str | None = None,
    ) -> None:
        """
        @param args: The arguments after C{udpdst}.
        @param twistdArgs: twistd's own options, before C{udpdst}.
        @param command: Replaces the whole command line.
        @param shell: A shell command line to run instead (for fd plumbing).
        """
        self.argv: list[str] | str
        if shell is not None:
            self.argv = shell
        elif command is not None:
            self.argv = list(command)
        else:
            self.argv = [TWISTD, *twistdArgs, "udpdst", *args]
        self.proc = subprocess.Popen(
            self.argv,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            pass_fds=passFds,
            shell=shell is not None,
        )
        self.out: list[str] = []
        self.err: list[str] = []
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._readers = [
            threading.Thread(
                target=self._read, args=(self.proc.stdout, self.out, True)
            ),
            threading.Thread(
                target=self._read, args=(self.proc.stderr, self.err, False)
            ),
        ]
        for reader in self._readers:
            reader.daemon = True
            reader.start()
        self._seen = 0

    def _read(self, stream: object, into: list[str], last: bool) -> None:
        for line in stream:  # type: ignore[attr-defined]
            into.append(line)
            self._lines.put(line)
        if last:
            self._lines.put(None)

    def output(self) -> str:
        return "".join(self.out) + "".join(self.err)

    def waitFor(
        self, pattern: re.Pattern[str] | str, count: int = 1, stderr: bool = False
    ) -> list[re.Match[str]]:
        """
        Read standard output (or error) until C{pattern} has matched C{count}
        lines (counting from the start); fail with the output so far if the
        process ends first or the deadline passes.
        """
        lines = self.err if stderr else self.out
        if isinstance(pattern, str):
            pattern = re.compile(pattern)
        deadline = time.monotonic() + DEADLINE
        while True:
            matches = [m for m in map(pattern.search, map(readable, list(lines))) if m]
            if len(matches) >= count:
                return matches[:count]
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(
                    f"{pattern.pattern!r} not seen {count} times; output:\n{self.output()}"
                )
            try:
                line = self._lines.get(timeout=left)
            except queue.Empty:
                continue
            if line is None:
                self._lines.put(None)
                matches = [
                    m for m in map(pattern.search, map(readable, list(lines))) if m
                ]
                if len(matches) >= count:
                    return matches[:count]
                raise AssertionError(
                    f"twistd ended ({self.proc.wait()}) before {pattern.pattern!r}; "
                    f"output:\n{self.output()}"
                )

    def waitAnswering(self, ask: Callable[[], object]) -> None:
        """
        Wait until C{ask()} gets an answer (the server is up); fail with the
        output so far if the process ends first or the deadline passes.
        """
        deadline = time.monotonic() + DEADLINE
        while not ask():
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"{self.argv} exited ({self.proc.returncode}):\n{self.output()}"
                )
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{self.argv} did not answer in {DEADLINE}s:\n{self.output()}"
                )
            # A port nobody listens on yet refuses at once: ask again in a
            # moment, not in a loop that takes the core the server starts on.
            time.sleep(0.05)

    def listening(self, count: int = 1) -> list[tuple[str, int]]:
        """
        Wait until C{count} listeners started and the reactor runs; their
        addresses.
        """
        found = [splitAddress(m.group(1)) for m in self.waitFor(START_LINE, count)]
        self.waitFor(RUNNING_LINE)
        return found

    def finish(self, timeout: float = DEADLINE) -> int:
        """
        Wait for the process to end by itself; its exit status.
        """
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(
                f"twistd did not end; output:\n{self.output()}"
            ) from None
        for reader in self._readers:
            reader.join(DEADLINE)
        return code

    def stop(self, sig: int = signal.SIGTERM) -> int:
        """
        Send C{sig} and wait for the process to end; its exit status.
        """
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)
        return self.finish()

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def assertNothingListens(port: int) -> None:
    """
    A datagram to 127.0.0.1:C{port} is refused at once (ICMP port
    unreachable on loopback): no listener is left there.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as gone:
        gone.settimeout(DEADLINE / 3)
        gone.connect(("127.0.0.1", port))
        gone.send(b"anyone?")
        with pytest.raises(ConnectionRefusedError):
            gone.recv(100)


def asUser(user: Any) -> list[str]:
    """
    twistd's arguments to run in the foreground, without a pid file, as
    C{user} (a L{pwd.struct_passwd}) once it has bound its ports.
    """
    return [
        "-n",
        "--pidfile=",
        "--uid",
        str(user.pw_uid),
        "--gid",
        str(user.pw_gid),
    ]


def freePort(host: str = "127.0.0.1", tcp: bool = False) -> int:
    """
    A UDP port free on C{host} (on C{::}, for IPv4 too: bound dual-stack so
    nothing else holds it); with C{tcp}, free for TCP too (C{twistd dns}
    listens on both).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    while True:
        with (
            socket.socket(family, socket.SOCK_DGRAM) as u,
            socket.socket(family, socket.SOCK_STREAM) as t,
        ):
            if host == "::":
                u.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
                t.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            u.bind((host, 0))
            port = int(u.getsockname()[1])
            if not tcp:
                return port
            try:
                t.bind((host, port))
            except OSError:
                continue
            return port


@contextmanager
def twistd(cwd: Path, *args: str) -> Iterator[Twistd]:
    """
    Run C{twistd -n --pidfile= ARGS} (any plugin, or C{-y app.tac}) in C{cwd}
    with the repository on C{PYTHONPATH}; stop it (by its pid) on leaving.
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO), env.get("PYTHONPATH", "")) if p
    )
    process = Twistd((), cwd, command=[TWISTD, "-n", "--pidfile=", *args], env=env)
    try:
        yield process
    finally:
        process.stop()


def stopDaemon(pidfile: Path) -> None:
    """
    Stop the twistd daemon whose pid is in C{pidfile} by SIGTERM, and wait
    until it is gone (it is not our child: watch /proc).
    """
    daemon = int(pidfile.read_text())
    os.kill(daemon, signal.SIGTERM)
    deadline = time.monotonic() + DEADLINE
    while Path(f"/proc/{daemon}").exists():
        if time.monotonic() > deadline:
            os.kill(daemon, signal.SIGKILL)
            raise AssertionError(f"daemon {daemon} did not stop on SIGTERM")
        time.sleep(0.05)


def startedTwistd(
    cwd: Path, cleanup: Callable[[Twistd], None] = Twistd.kill
) -> Iterator[Callable[..., Twistd]]:
    """
    For a fixture: a function that starts C{twistd udpdst} (arguments as
    L{Twistd}'s, in C{cwd} unless given another), and, when the test ends,
    C{cleanup} (by default: kill by pid) for each process it started.
    """
    processes: list[Twistd] = []

    def start(*args: str, cwd: Path = cwd, **kw: Any) -> Twistd:
        process = Twistd(args, cwd, **kw)
        processes.append(process)
        return process

    yield start
    for process in processes:
        cleanup(process)


def systemdCommand(fd: int, *args: str) -> list[str]:
    """
    The command line of C{twistd -n udpdst ARGS} started as systemd starts a
    socket-activated service, the socket being C{fd} (start it with
    C{passFds=[fd]}): the socket on fd 3, C{LISTEN_PID} the pid that twistd
    will have (exec keeps it), C{LISTEN_FDS=1}, C{LISTEN_FDNAMES=echo}, then
    exec.
    """
    wrapper = (
        "import os, sys\n"
        f"os.dup2({fd}, 3)\n"
        f"os.close({fd})\n"
        "os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS='1', "
        "LISTEN_FDNAMES='echo')\n"
        "os.execv(sys.argv[1], sys.argv[1:])\n"
    )
    return [sys.executable, "-c", wrapper, TWISTD, "-n", "--pidfile=", "udpdst", *args]


def socketActivateCommand(listen: str, *args: str) -> list[str]:
    """
    The command line of systemd-socket-activate listening for datagrams on
    C{listen} (C{[::]:PORT}) as the socket C{echo}, and on the first one
    exec-ing C{twistd -n udpdst --listen systemd ARGS}; skips the test
    where the tool is not installed.
    """
    tool = shutil.which("systemd-socket-activate")
    if tool is None:
        pytest.skip("systemd-socket-activate is not installed")
    return [
        tool,
        "--datagram",
        f"--listen={listen}",
        "--fdname=echo",
        TWISTD,
        "-n",
        "--pidfile=",
        "udpdst",
        "--listen",
        "systemd",
        *args,
    ]


def askThroughReload(
    host: str,
    port: int,
    reload: Callable[[], object],
    done: Callable[[], bool],
    interval: float = 0.05,
) -> int:
    """
    Ask C{host}:C{port} every C{interval} seconds from one connected client,
    awaiting each answer (one lost fails the test, after its timeout): ten
    times, then C{reload()}, then until C{done()} holds, then ten more.

    @return: How many datagrams were asked (and answered).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    deadline = time.monotonic() + 2 * DEADLINE
    sent = 0
    after: int | None = None
    with socket.socket(family, socket.SOCK_DGRAM) as client:
        client.settimeout(DEADLINE / 3)
        client.connect((host, port))
        while after is None or sent < after + 10:
            assert time.monotonic() < deadline, f"not done after {sent} asks"
            data = b"ask %d" % sent
            client.send(data)
            assert client.recv(70000) == data
            sent += 1
            if sent == 10:
                reload()
            elif after is None and sent > 10 and done():
                after = sent
            time.sleep(interval)
    return sent


def assertLargestAnswered(host: str, port: int, size: int) -> None:
    """
    A datagram of C{size} bytes is answered, one byte larger is not: sent
    first from the same client, it would be answered first.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as client:
        client.settimeout(DEADLINE / 3)
        client.connect((host, port))
        client.send(b"L" * (size + 1))
        client.send(b"s" * size)
        assert client.recv(70000) == b"s" * size


def receiveBuffer(port: int) -> int:
    """
    The C{SO_RCVBUF} of the UDP socket bound to C{port}, in any process, as
    C{ss} shows it (C{skmem:(...,rbN,...)}); skips the test without C{ss}.
    """
    ss = shutil.which("ss")
    if ss is None:
        pytest.skip("ss (iproute2) is not installed")
    out = subprocess.run(
        [ss, "-Huanm", f"sport = :{port}"],
        capture_output=True,
        text=True,
        check=True,
        timeout=DEADLINE,
    ).stdout
    sizes = re.findall(r"\brb(\d+)\b", out)
    assert len(sizes) == 1, out
    return int(sizes[0])


def nobodyRunsPython() -> str | None:
    """
    Why the user nobody cannot run this Python with udpdst (a worker of a
    service that dropped to nobody could not start), or L{None} if it can.
    """
    import pwd

    nobody = pwd.getpwnam("nobody")
    try:
        subprocess.run(
            [sys.executable, "-c", "import udpdst.echo.worker"],
            user=nobody.pw_uid,
            group=nobody.pw_gid,
            extra_groups=[],
            check=True,
            capture_output=True,
            timeout=DEADLINE,
        )
    except (OSError, subprocess.CalledProcessError) as e:
        return f"nobody cannot run {sys.executable} with udpdst ({e})"
    return None

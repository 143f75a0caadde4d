"""
C{twistd udpdst} as an operator runs it: a real subprocess of the installed
package (the plugin must be found), real sockets on loopback.
"""

from __future__ import annotations

import json
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
from pathlib import Path

import pytest

from tests._service_helpers import (
    DEADLINE,
    REPO,
    TWISTD,
    Twistd,
    asUser,
    freePort,
    socketActivateCommand,
    startedTwistd,
    systemdCommand,
)
from tests.clients import REPLY_TIMEOUT, echo
from tests.conftest import HAVE_IPV6, pidFileRemoved, requiresIPv6
from tests.echo._helpers import BAD_CONFIGS
from udpdst.check import Answer, Probe, askAll

FINAL_STATS = re.compile(
    r"final stats (\S+): received (\d+), replied (\d+), refused (\d+) \(([^)]*)\)"
)


@pytest.fixture(scope="module", autouse=True)
def pluginInstalled() -> None:
    """
    The tests run twistd from the installed package: its plugin must be
    found, or every test here would fail for the same reason.
    """
    if not os.path.exists(TWISTD):
        pytest.fail(f"no twistd next to {sys.executable}")
    listing = subprocess.run(
        [TWISTD, "--help"], capture_output=True, text=True, timeout=DEADLINE
    ).stdout
    if not re.search(r"^\s+udpdst\s", listing, re.M):
        pytest.fail(
            "twistd does not find the udpdst plugin; install the project with "
            "pip install -e . --config-settings editable_mode=compat (or pip "
            "install .)"
        )


@pytest.fixture
def started(tmp_path: Path) -> Iterator[Callable[..., Twistd]]:
    """
    Start twistd processes; kill (by pid) whatever a test left running.
    """
    yield from startedTwistd(tmp_path)


def oneLineError(process: Twistd) -> str:
    """
    The process ended with a non-zero status and one line on standard error,
    no traceback and nothing else; that line.
    """
    code = process.finish()
    assert code != 0, process.output()
    assert "Traceback" not in process.output()
    assert process.out == []
    assert len(process.err) == 1, process.err
    assert process.err[0].startswith("twistd udpdst: ")
    return process.err[0].rstrip("\n")


def oneCriticalLine(process: Twistd) -> str:
    """
    The process ended with a non-zero status and one critical log line, and
    no traceback; that line's message.
    """
    code = process.finish()
    assert code != 0, process.output()
    assert "Traceback" not in process.output()
    assert process.err == []
    critical = [line for line in process.out if "#critical]" in line]
    assert len(critical) == 1, process.output()
    assert not [line for line in process.out if "#error]" in line]
    return critical[0].split("] ", 1)[1].rstrip("\n")


def nobodyUser() -> pwd.struct_passwd:
    """
    The unprivileged user C{nobody}; skip the test on a host without one.
    """
    try:
        return pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("this host has no user 'nobody' to run as")


# --help


def test_helpDoesNotImportTheApplication(tmp_path: Path) -> None:
    """
    twistd udpdst --help lists the options and imports neither the port,
    the service, the echo protocol nor the reactor.
    """
    script = (
        "import sys\n"
        "sys.argv = ['twistd', 'udpdst', '--help']\n"
        "from twisted.scripts.twistd import run\n"
        "try:\n"
        "    run()\n"
        "except SystemExit as e:\n"
        "    assert not e.code, e.code\n"
        "print('MODULES', ' '.join(sorted(sys.modules)))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=DEADLINE,
    )
    assert result.returncode == 0, result.stderr
    assert "--listen=" in result.stdout and "--config=" in result.stdout
    assert "--prefix=" in result.stdout
    modules = set(result.stdout.split("MODULES ", 1)[1].split())
    assert "udpdst.echo.tap" in modules
    for heavy in (
        "udpdst.port",
        "udpdst.echo.service",
        "udpdst.echo.protocol",
        "udpdst.echo.limits",
        "twisted.internet.reactor",
        "twisted.internet.udp",
    ):
        assert heavy not in modules, heavy


# Running


@pytest.mark.skipif(not HAVE_IPV6, reason="the default listener is [::]: needs IPv6")
def test_embeddedDefault(started) -> None:  # type: ignore[no-untyped-def]
    """
    No options: one dual-stack listener on [::]:12345; clients connected to
    secondary addresses get their echo; SIGTERM stops it with a final stats
    line.
    """
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as probe:
            probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            probe.bind(("::", 12345))
    except OSError as e:
        pytest.skip(f"port 12345 is taken on this host ({e.strerror})")
    process = started()
    assert process.listening() == [("::", 12345)]
    assert "(dual-stack)" in process.output()
    assert "replies at most 0 bytes larger than requests" in process.output()
    assert echo("127.0.0.2", 12345, b"to two") == b"to two"
    assert echo("127.0.0.3", 12345, b"to three") == b"to three"
    assert echo("::1", 12345, b"to six") == b"to six"
    assert process.stop() == -signal.SIGTERM
    (final,) = process.waitFor(FINAL_STATS)
    assert final.group(1, 2, 3, 4) == ("[::]:12345", "3", "3", "0")


def test_configFile(started, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """
    A config file with two listeners and a prefix.
    """
    config = tmp_path / "udpdst.toml"
    config.write_text(
        """
[[listen]]
address = "0.0.0.0"
port = 0

[[listen]]
address = "127.0.0.3"
port = 0
max_packet_size = 1000

[echo]
prefix = "file: "

[log]
stats_interval = 0
"""
    )
    process = started("--config", str(config))
    (wild, v4port), (single, single_port) = process.listening(2)
    assert (wild, single) == ("0.0.0.0", "127.0.0.3")
    assert "replies at most 6 bytes larger than requests" in process.output()
    assert echo("127.0.0.2", v4port, b"a") == b"file: a"
    assert echo("127.0.0.3", single_port, b"b") == b"file: b"
    assert process.stop() == -signal.SIGTERM
    assert len(process.waitFor(FINAL_STATS, 2)) == 2


def test_commandLineOverrides(started, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """
    --listen replaces the file's listeners (repeatable, IPv6 in brackets),
    --prefix replaces its prefix; the rest of the file still applies.
    """
    taken = freePort()
    config = tmp_path / "udpdst.toml"
    config.write_text(
        f"""
[[listen]]
address = "127.0.0.1"
port = {taken}

[echo]
prefix = "file: "

[limits]
deny = ["127.0.0.9/32"]
"""
    )
    listen = ["--listen", "0.0.0.0:0"]
    if HAVE_IPV6:
        listen += ["--listen", "[::1]:0"]
    process = started("--config", str(config), *listen, "--prefix", "cli: ")
    found = process.listening(len(listen) // 2)
    assert [host for host, _ in found] == ["0.0.0.0", "::1"][: len(found)]
    assert f"127.0.0.1:{taken}" not in process.output()
    port = found[0][1]
    assert echo("127.0.0.2", port, b"x") == b"cli: x"
    if HAVE_IPV6:
        assert echo("::1", found[1][1], b"y") == b"cli: y"
    with pytest.raises(socket.timeout):
        # The file's deny list still applies: this one gets no answer.
        # (The only wait for an absence in these tests, bounded.)
        echo("127.0.0.2", port, b"z", source="127.0.0.9")
    process.stop()
    (final, *_) = process.waitFor(FINAL_STATS)
    assert final.group(4, 5) == ("1", "denied=1")


def test_sigintAndStats(started) -> None:  # type: ignore[no-untyped-def]
    """
    Periodic stats lines count what happened; SIGINT stops cleanly too: the
    port is closed, then the final stats line.
    """
    process = started("--listen", "127.0.0.1:0", "--stats-interval", "0.2")
    ((_, port),) = process.listening()
    assert echo("127.0.0.1", port, b"one") == b"one"
    process.waitFor(
        r"\bstats 127\.0\.0\.1:\d+: received 1, replied 1, refused 0 \(none\), "
        r"send errors 0, kernel drops 0"
    )
    process.stop(signal.SIGINT)
    output = process.output()
    closed = output.index(f"(UDP Port {port} Closed)")
    final = output.index(f"final stats 127.0.0.1:{port}: received 1, replied 1")
    assert closed < final < output.index("Server Shut Down.")
    # The socket is closed: the port can be bound again.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", port))


def test_logLevelDebugAndJson(started) -> None:  # type: ignore[no-untyped-def]
    """
    At debug level one line per datagram, with structured fields in JSON
    logs (twistd --logger udpdst.echo.jsonLogObserver).
    """
    process = started(
        "--listen",
        "0.0.0.0:0",
        "--log-level",
        "debug",
        twistdArgs=["-n", "--pidfile=", "--logger", "udpdst.echo.jsonLogObserver"],
    )
    ((_, port),) = process.listening()
    with Probe("127.0.0.2", port, source="127.0.0.5") as probe:
        (answer,) = askAll([probe], [b"x" * 42], REPLY_TIMEOUT, attempts=1)
        peer = "{}:{}".format(*probe.local)
    assert answer == Answer(b"x" * 42, ("127.0.0.2", port), fromTarget=True)
    process.stop()
    events = [json.loads(line) for line in process.out]
    (datagram,) = [e for e in events if e.get("log_namespace") == "udpdst.echo"]
    assert datagram["peer"] == peer
    assert datagram["destination"] == f"127.0.0.2:{port}"
    assert datagram["size"] == 42
    assert datagram["log_format"] == "{peer} -> {destination}, {size} bytes"
    (final,) = [e for e in events if e.get("final") is True]
    assert (final["received"], final["replied"], final["refused"]) == (1, 1, 0)
    assert final["refusedBy"]["rate"] == 0
    assert "kernelDrops" in final


def test_logLevelInfoNoLinePerDatagram(started, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """
    At info level (the default) neither answers nor refusals are logged per
    datagram; refusals show in the stats line by reason.
    """
    config = tmp_path / "udpdst.toml"
    config.write_text('[limits]\ndeny = ["127.0.0.9/32"]\n')
    process = started("--config", str(config), "--listen", "127.0.0.1:0")
    ((_, port),) = process.listening()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.9", 0))
        s.connect(("127.0.0.1", port))
        for _ in range(20):
            s.send(b"refused")
    # Answered after the refused ones were handled (one socket, in order).
    assert echo("127.0.0.1", port, b"marker") == b"marker"
    process.stop()
    (final,) = process.waitFor(FINAL_STATS)
    assert final.group(2, 3, 4, 5) == ("21", "1", "20", "denied=20")
    assert not [line for line in process.out if "->" in line]


@pytest.mark.skipif(os.geteuid() != 0, reason="binding port 7 needs root")
def test_privilegedPortThenDropPrivileges(started) -> None:  # type: ignore[no-untyped-def]
    """
    Port 7 is bound before twistd drops to --uid/--gid: the process runs as
    nobody and still echoes.
    """
    nobody = nobodyUser()
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.bind(("127.0.0.7", 7))
    except OSError as e:
        pytest.skip(f"127.0.0.7:7 is taken ({e.strerror})")
    process = started(
        "--listen",
        "127.0.0.7:7",
        twistdArgs=asUser(nobody),
    )
    assert process.listening() == [("127.0.0.7", 7)]
    status = Path(f"/proc/{process.proc.pid}/status").read_text()
    uids = re.search(r"^Uid:\s+(.*)$", status, re.M)
    assert uids is not None and set(uids.group(1).split()) == {str(nobody.pw_uid)}
    assert echo("127.0.0.7", 7, b"seven") == b"seven"
    process.stop()
    process.waitFor(FINAL_STATS)


# Mistakes: one line, a non-zero exit, never a traceback.

#: Config files twistd udpdst (and udpdst check-config) refuse, and a regular
#: expression for what their one-line error says.


@pytest.mark.parametrize("text, cause", BAD_CONFIGS)
def test_badConfigFile(started, tmp_path: Path, text: str, cause: str) -> None:  # type: ignore[no-untyped-def]
    config = tmp_path / "bad.toml"
    config.write_text(text)
    line = oneLineError(started("--config", str(config)))
    assert re.search(cause, line), line
    assert str(config) in line


def test_numbersAtTheirBoundsRun(started, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """
    A config with every number at an end of its range (the workers aside:
    256 processes) is accepted by check-config and runs: what validates,
    starts.
    """
    config = tmp_path / "edges.toml"
    config.write_text(
        '[[listen]]\naddress = "127.0.0.1"\nport = 0\n'
        "receive_buffer = 2147483647\nmax_packet_size = 65535\n"
        "[limits]\nper_source_rate = 1e9\nper_source_burst = 1000000000\n"
        "per_prefix_rate = 0.001\nper_prefix_burst = 1000000000\n"
        "prefix_v4 = 0\nprefix_v6 = 128\nmax_sources = 16777216\n"
        "[log]\nstats_interval = 86400\n"
    )
    checked = subprocess.run(
        [sys.executable, "-m", "udpdst", "check-config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert checked.returncode == 0, checked.stderr
    process = started("--config", str(config))
    ((host, port),) = process.listening()
    assert echo(host, port, b"edge") == b"edge"
    process.stop()
    assert "Traceback" not in process.output()


def test_missingConfigFile(started, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    line = oneLineError(started("--config", str(tmp_path / "nope.toml")))
    assert line == (
        f"twistd udpdst: cannot read config file {tmp_path / 'nope.toml'}: "
        "No such file or directory"
    )


@pytest.mark.parametrize(
    "args, cause",
    [
        (["--listen", "127.0.0.1"], "use ADDRESS:PORT"),
        (["--listen", "127.0.0.1:70000"], "out of range"),
        (["--listen", "host.example:7"], "bad address 'host.example'"),
        (["--log-level", "loud"], "unknown log level"),
        (["--bogus"], "option --bogus not recognized (see twistd udpdst --help)"),
        (["--listen", "systemd"], "none was passed"),
    ],
)
def test_badCommandLine(started, args: list[str], cause: str) -> None:  # type: ignore[no-untyped-def]
    assert cause in oneLineError(started(*args))


def test_portInUse(started, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as holder:
        holder.bind(("127.0.0.1", 0))
        port = holder.getsockname()[1]
        # With twistd's default pid file, which must not be left behind.
        process = started("--listen", f"127.0.0.1:{port}", twistdArgs=["-n"])
        line = oneCriticalLine(process)
    assert line.startswith(
        f"cannot listen on 127.0.0.1:{port}: address already in use;"
    )
    assert not (tmp_path / "twistd.pid").exists()


@pytest.fixture
def readableByAnyone() -> Iterator[Path]:
    """
    The package and its plugin copied into a fresh folder that any user can
    read, for twistd run as another user: the checkout itself may sit in a
    folder only its owner can read (a clone in C{mktemp -d}, a 0700 home).
    """
    top = Path(tempfile.mkdtemp(prefix="udpdst-anyone-"))
    try:
        shutil.copytree(
            REPO / "udpdst",
            top / "udpdst",
            ignore=shutil.ignore_patterns("__pycache__"),
        )
        plugins = top / "twisted" / "plugins"
        plugins.mkdir(parents=True)
        shutil.copy2(REPO / "twisted" / "plugins" / "udpdst_plugin.py", plugins)
        for path in [top, *top.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)
        # Twisted writes its plugin cache on first use; write it now, as the
        # owner, so that the other user has nothing to write.
        subprocess.run(
            [TWISTD, "--help"],
            env={**os.environ, "PYTHONPATH": str(top)},
            capture_output=True,
            timeout=DEADLINE,
            check=True,
        )
        yield top
    finally:
        shutil.rmtree(top)


def test_permissionDenied(started, readableByAnyone: Path) -> None:  # type: ignore[no-untyped-def]
    """
    An unprivileged user binding port 7: one line naming the fix.
    """
    unprivileged = Path("/proc/sys/net/ipv4/ip_unprivileged_port_start")
    if unprivileged.exists() and int(unprivileged.read_text()) <= 7:
        pytest.skip("this host lets anyone bind port 7 (ip_unprivileged_port_start)")
    command = [TWISTD, "-n", "--pidfile=", "udpdst", "--listen", "127.0.0.1:7"]
    env = {**os.environ, "PYTHONPATH": str(readableByAnyone)}
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("running as root and no setpriv to run as nobody")
        nobody = nobodyUser()
        asNobody = [
            setpriv,
            f"--reuid={nobody.pw_uid}",
            f"--regid={nobody.pw_gid}",
            "--clear-groups",
            "--inh-caps=-all",
        ]
        command = [*asNobody, *command]
        # The package is readable by anyone now; the Python and Twisted of
        # the test's venv must be too, which only whoever made it decides.
        canRun = subprocess.run(
            [*asNobody, sys.executable, "-c", "import twisted, zope.interface"],
            env=env,
            cwd=readableByAnyone,
            capture_output=True,
            text=True,
            timeout=DEADLINE,
        )
        if canRun.returncode != 0:
            why = (canRun.stderr.strip().splitlines() or ["no error text"])[-1]
            pytest.skip(
                f"nobody cannot run {sys.executable} with Twisted (make the "
                f"venv readable by anyone): {why}"
            )
    line = oneCriticalLine(started(command=command, env=env, cwd=readableByAnyone))
    assert line.startswith(
        "cannot listen on 127.0.0.1:7: permission denied; ports below 1024"
    )


# Operations


def test_reusePortTwoProcesses(started) -> None:  # type: ignore[no-untyped-def]
    """
    Two processes share one port with --reuse-port; the kernel spreads
    clients over both. Without it the second one fails: port in use.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as holder:
        # Hold the port (with SO_REUSEPORT, as the processes will) until both
        # have bound it, so that no one else takes it meanwhile.
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        holder.bind(("127.0.0.1", 0))
        port = holder.getsockname()[1]
        listen = f"127.0.0.1:{port}"
        a = started("--listen", listen, "--reuse-port", "--prefix", "A:")
        b = started("--listen", listen, "--reuse-port", "--prefix", "B:")
        a.listening()
        b.listening()
        assert "(reuse_port)" in a.output()
        lone = started("--listen", listen, "--prefix", "C:")
        assert "address already in use" in oneCriticalLine(lone)
    seen = set()
    for _ in range(64):
        seen.add(echo("127.0.0.1", port, b"x")[:2])
        if seen == {b"A:", b"B:"}:
            break
    assert seen == {b"A:", b"B:"}
    a.stop()
    b.stop()


def test_systemdSocketActivation(started, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """
    A dual-stack UDP socket inherited on fd 3 with LISTEN_FDS/LISTEN_PID, as
    systemd passes it, is adopted with the destination options enabled:
    clients of secondary addresses get their echo.
    """
    family = socket.AF_INET6 if HAVE_IPV6 else socket.AF_INET
    inherited = socket.socket(family, socket.SOCK_DGRAM)
    if family == socket.AF_INET6:
        inherited.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        inherited.bind(("::", 0))
    else:
        inherited.bind(("0.0.0.0", 0))
    port = inherited.getsockname()[1]
    fd = inherited.fileno()
    try:
        process = started(
            command=systemdCommand(fd, "--listen", "systemd:echo"), passFds=[fd]
        )
    finally:
        inherited.close()
    (found,) = process.listening()
    assert found[1] == port
    assert "systemd socket 3 (echo)" in process.output()
    assert echo("127.0.0.2", port, b"activated") == b"activated"
    assert echo("127.0.0.3", port, b"again") == b"again"
    process.stop()
    process.waitFor(FINAL_STATS)


@requiresIPv6
def test_systemdSocketActivateTool(started, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """
    With systemd-socket-activate, which execs twistd on the first datagram:
    that datagram, queued before udpdst enabled its options, is answered too.
    """
    port = freePort("::")
    process = started(command=socketActivateCommand(f"[::]:{port}"))
    process.waitFor(r"Listening on", stderr=True)
    # The first datagram makes the tool exec twistd; its reply comes from
    # the kernel's choice of source, so use the primary address.
    assert echo("::1", port, b"first") == b"first"
    process.listening()
    assert echo("127.0.0.2", port, b"second") == b"second"
    process.stop()


def test_daemonModePortInUse(started, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """
    Daemonized (no -n), a failed bind ends the launching process with status
    1 and the cause, instead of leaving it waiting for a status forever.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as holder:
        holder.bind(("127.0.0.1", 0))
        port = holder.getsockname()[1]
        process = started(
            "--listen",
            f"127.0.0.1:{port}",
            twistdArgs=[
                "--pidfile",
                str(tmp_path / "d.pid"),
                "-l",
                str(tmp_path / "d.log"),
            ],
        )
        assert process.finish() == 1
    assert "Traceback" not in process.output()
    # The whole sentence, as in the foreground (not twistd's cut bytes repr).
    assert process.err == [
        f"cannot listen on 127.0.0.1:{port}: address already in use; stop the "
        "other service on that port or choose another port, or set reuse_port "
        "= true in every process that shares it\n"
    ]
    log = (tmp_path / "d.log").read_text()
    assert "Traceback" not in log
    assert (
        f"[udpdst.echo.service.EchoService#critical] cannot listen on 127.0.0.1:{port}"
        in log
    )
    assert pidFileRemoved(tmp_path / "d.pid")


def test_daemonMode(started, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """
    Daemonized: the launching process exits 0 once the port is bound; the
    daemon echoes and stops on SIGTERM with a final stats line.
    """
    pidfile, logfile = tmp_path / "d.pid", tmp_path / "d.log"
    process = started(
        "--listen",
        "127.0.0.1:0",
        twistdArgs=["--pidfile", str(pidfile), "-l", str(logfile)],
    )
    assert process.finish() == 0, process.output()
    daemon = int(pidfile.read_text())
    try:
        match = re.search(
            r"udpdst echo listening on 127\.0\.0\.1:(\d+)", logfile.read_text()
        )
        assert match is not None
        assert echo("127.0.0.1", int(match.group(1)), b"daemon") == b"daemon"
    finally:
        os.kill(daemon, signal.SIGTERM)
    deadline = time.monotonic() + DEADLINE
    while Path(f"/proc/{daemon}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not Path(f"/proc/{daemon}").exists()
    assert FINAL_STATS.search(logfile.read_text())
    assert not pidfile.exists()


def test_logLevelFiltersEveryMessage(started) -> None:  # type: ignore[no-untyped-def]
    """
    The log level applies to the whole process, twistd's own info lines
    included: at warn level a failed bind is the only line.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as holder:
        holder.bind(("127.0.0.1", 0))
        port = holder.getsockname()[1]
        process = started("--listen", f"127.0.0.1:{port}", "--log-level", "warn")
        line = oneCriticalLine(process)
    assert "address already in use" in line
    assert len(process.out) == 1

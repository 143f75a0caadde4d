"""
SIGHUP reloads the configuration of a real C{twistd udpdst}: listeners
added and removed, unchanged ones kept open (a client sending through the
reload loses nothing), settings changed in place, and a bad file keeping
the running configuration.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import socket
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from twisted.logger import formatEvent

from tests._service_helpers import (
    DEADLINE,
    Twistd,
    askThroughReload,
    assertLargestAnswered,
    assertNothingListens,
    asUser,
    echo,
    freePort,
    receiveBuffer,
    startedTwistd,
)

RELOADED = re.compile(r"reloaded configuration: (.*)")
FAILED = re.compile(r"reload failed, the running configuration is kept: (.*)")


@pytest.fixture
def started(tmp_path: Path) -> Iterator[Callable[..., Twistd]]:
    yield from startedTwistd(tmp_path)


def listeners(*ports: int) -> str:
    return "".join(f'[[listen]]\naddress = "127.0.0.1"\nport = {p}\n' for p in ports)


def test_reloadListenersWithoutLoss(started, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """
    A listener that stays keeps its socket: a client sending one datagram
    after another through the reload gets every answer.  A removed one
    stops answering, an added one answers; one line says what changed.
    """
    kept, removed, added = freePort(), freePort(), freePort()
    config = tmp_path / "udpdst.toml"
    config.write_text(listeners(kept, removed) + "[log]\nstats_interval = 0\n")
    process = started("--config", str(config))
    process.listening(2)
    assert echo("127.0.0.1", removed, b"before") == b"before"

    config.write_text(listeners(kept, added) + "[log]\nstats_interval = 0\n")
    sent = 0
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        client.settimeout(DEADLINE / 3)
        client.connect(("127.0.0.1", kept))
        reloadedAt = None
        while reloadedAt is None or sent < reloadedAt + 50:
            data = b"%d" % sent
            client.send(data)
            assert client.recv(100) == data
            sent += 1
            if sent == 20:
                process.proc.send_signal(signal.SIGHUP)
            if reloadedAt is None and sent > 20 and RELOADED.search(process.output()):
                reloadedAt = sent
    (line,) = process.waitFor(RELOADED)
    assert line.group(1) == (
        f"listener 127.0.0.1:{removed} removed; listener 127.0.0.1:{added} added"
    )
    process.waitFor(rf"udpdst echo listening on 127\.0\.0\.1:{added}")
    assert echo("127.0.0.1", added, b"new") == b"new"
    assertNothingListens(removed)
    process.stop()
    output = process.output()
    # The kept listener is the same one: it counted every datagram.
    assert f"final stats 127.0.0.1:{kept}: received {sent}, replied {sent}," in output
    assert f"final stats 127.0.0.1:{added}: received 1, replied 1," in output
    assert f"final stats 127.0.0.1:{removed}" not in output
    assert "Traceback" not in output


def test_reloadSettingsInPlace(started, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """
    Prefix, limits, log level and stats interval change on the running
    listener, whose socket stays the same.
    """
    port = freePort()
    config = tmp_path / "udpdst.toml"
    config.write_text(listeners(port) + "[log]\nstats_interval = 0\n")
    process = started("--config", str(config))
    process.listening()
    assert echo("127.0.0.1", port, b"a", source="127.0.0.2") == b"a"

    config.write_text(
        listeners(port)
        + '[echo]\nprefix = "p:"\n'
        + '[limits]\ndeny = ["127.0.0.3/32"]\n'
        + '[log]\nlevel = "debug"\nstats_interval = 0.2\n'
    )
    process.proc.send_signal(signal.SIGHUP)
    (line,) = process.waitFor(RELOADED)
    assert line.group(1) == (
        "prefix '' -> 'p:'; [limits] deny changed; log level info -> debug; "
        "stats interval 0 s -> 0.2 s"
    )
    assert echo("127.0.0.1", port, b"b", source="127.0.0.2") == b"p:b"
    # Denied now: the answer to another source shows it was handled first.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as denied:
        denied.bind(("127.0.0.3", 0))
        denied.sendto(b"no", ("127.0.0.1", port))
    assert echo("127.0.0.1", port, b"c", source="127.0.0.2") == b"p:c"
    # Debug lines per datagram, and periodic stats lines.
    process.waitFor(r"127\.0\.0\.2:\d+ -> 127\.0\.0\.1:\d+, 1 bytes")
    process.waitFor(rf"\bstats 127\.0\.0\.1:{port}: received 4, replied 3, refused 1")
    process.stop()
    assert (
        f"final stats 127.0.0.1:{port}: received 4, replied 3, refused 1 (denied=1)"
        in process.output()
    )


@pytest.mark.parametrize(
    "text, cause",
    [
        ("[[listen]]\nport = 70000\n", "port = 70000 is out of range"),
        ("[echo\n", "invalid TOML"),
        (None, "cannot read config file"),
    ],
)
def test_badConfigAtReloadKeepsTheRunningOne(  # type: ignore[no-untyped-def]
    started, tmp_path: Path, text: str | None, cause: str
) -> None:
    """
    A config that is wrong at reload: one error line, and the service runs
    on as it was.
    """
    port = freePort()
    config = tmp_path / "udpdst.toml"
    config.write_text(listeners(port) + "[log]\nstats_interval = 0\n")
    process = started("--config", str(config))
    process.listening()
    if text is None:
        config.unlink()
    else:
        config.write_text(text)
    process.proc.send_signal(signal.SIGHUP)
    (line,) = process.waitFor(r"reload failed, the running configuration is kept: .*")
    assert cause in line.group(0)
    assert echo("127.0.0.1", port, b"still") == b"still"
    process.stop()
    output = process.output()
    assert "Traceback" not in output
    assert len([x for x in output.splitlines() if "reload" in x]) == 1
    assert not RELOADED.search(output)


def test_reloadCannotAddASystemdListener() -> None:
    """
    systemd passes sockets only at start: a reload that adds a systemd
    listener is refused before anything changes.
    """
    from udpdst.echo.config import Config, ConfigError, ListenConfig
    from udpdst.echo.service import EchoService

    listener = ListenConfig("127.0.0.1", 0)
    config = Config(listen=(listener,))
    service = EchoService(config, [(listener, None)])
    with pytest.raises(ConfigError, match="restart the service to use it"):
        service.reload(Config(listen=(listener, ListenConfig(systemd=True))))
    assert service.config is config
    assert [child.listener for child in service.listeners] == [listener]


def test_reloadMovesTheMetricsEndpoint(started, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """
    [metrics] listen changes at reload: the endpoint opens, moves, closes.
    """
    pytest.importorskip("prometheus_client", reason="the metrics extra is missing")
    port, first, second = freePort(), freeTcpPort(), freeTcpPort()
    config = tmp_path / "udpdst.toml"
    base = listeners(port) + "[log]\nstats_interval = 0\n"
    config.write_text(base)
    process = started("--config", str(config))
    process.listening()
    assert echo("127.0.0.1", port, b"x") == b"x"

    for count, (was, now) in enumerate(
        [("off", first), (first, second), (second, "off")], 1
    ):
        listen = f"127.0.0.1:{now}" if now != "off" else ""
        config.write_text(base + f'[metrics]\nlisten = "{listen}"\n')
        process.proc.send_signal(signal.SIGHUP)
        line = process.waitFor(RELOADED, count)[-1]
        old = f"127.0.0.1:{was}" if was != "off" else "off"
        assert line.group(1) == f"metrics {old} -> {listen or 'off'}"
        if now != "off":
            with urllib.request.urlopen(
                f"http://127.0.0.1:{now}/metrics", timeout=DEADLINE
            ) as response:
                text = response.read().decode()
            assert f'udpdst_received_total{{listener="127.0.0.1:{port}"}} 1.0' in text
        if was != "off":
            with pytest.raises(urllib.error.URLError):
                urllib.request.urlopen(
                    f"http://127.0.0.1:{was}/metrics", timeout=DEADLINE
                )
    process.stop()
    assert "Traceback" not in process.output()


def freeTcpPort() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_reloadMaxPacketSizeInPlace(started, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """
    A reload that changes only max_packet_size keeps the socket: a client
    asking every 50 ms through it gets every answer, the new size is in
    force afterwards, and the one socket counted everything.
    """
    port = freePort()
    config = tmp_path / "udpdst.toml"
    base = "[limits]\nper_source_rate = 0\n[log]\nstats_interval = 0\n"
    config.write_text(listeners(port) + base)
    process = started("--config", str(config))
    process.listening()
    config.write_text(listeners(port) + "max_packet_size = 100\n" + base)
    asked = askThroughReload(
        "127.0.0.1",
        port,
        lambda: process.proc.send_signal(signal.SIGHUP),
        lambda: bool(RELOADED.search(process.output())),
    )
    (line,) = process.waitFor(RELOADED)
    assert line.group(1) == f"listener 127.0.0.1:{port}: max_packet_size 65535 -> 100"
    assertLargestAnswered("127.0.0.1", port, 100)
    process.stop()
    output = process.output()
    assert re.search(
        rf"final stats 127\.0\.0\.1:{port}: received {asked + 1}, "
        rf"replied {asked + 1},.* oversized 1\b",
        output,
    ), output
    # Bound once: no second listening line.
    assert len(re.findall(r"udpdst echo listening on", output)) == 1
    assert "Traceback" not in output


def test_reloadReceiveBufferInPlace(started, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """
    receive_buffer is set on the open socket (the kernel doubles it), and
    0 brings back the kernel's default.
    """
    port = freePort()
    config = tmp_path / "udpdst.toml"
    config.write_text(listeners(port) + "[log]\nstats_interval = 0\n")
    process = started("--config", str(config))
    process.listening()
    default = receiveBuffer(port)
    for count, (size, expected) in enumerate([(65536, 131072), (0, default)], 1):
        config.write_text(
            listeners(port)
            + f"receive_buffer = {size}\n"
            + "[log]\nstats_interval = 0\n"
        )
        process.proc.send_signal(signal.SIGHUP)
        line = process.waitFor(RELOADED, count)[-1]
        was, now = ("default", size) if size else (65536, "default")
        assert line.group(1) == (
            f"listener 127.0.0.1:{port}: receive_buffer {was} -> {now}"
        )
        assert receiveBuffer(port) == expected
        assert echo("127.0.0.1", port, b"%d" % size) == b"%d" % size
    process.stop()
    assert "Traceback" not in process.output()


@pytest.fixture
def publicDir() -> Iterator[Path]:
    """
    A directory that every user may read: for a config file that a service
    which dropped its privileges reads again at reload.
    """
    path = Path(tempfile.mkdtemp(prefix="udpdst-test-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path)


@pytest.mark.skipif(os.geteuid() != 0, reason="binding port 7 needs root")
def test_reloadOnAPrivilegedPortAsNobody(started, publicDir: Path) -> None:  # type: ignore[no-untyped-def]
    """
    Port 7 bound as root, then run as nobody: a reload that changes
    max_packet_size cannot bind port 7 again and need not; the port
    answers throughout, with the new size afterwards.
    """
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.bind(("127.0.0.7", 7))
    except OSError as e:
        pytest.skip(f"127.0.0.7:7 is taken ({e.strerror})")
    config = publicDir / "udpdst.toml"
    base = '[[listen]]\naddress = "127.0.0.7"\nport = 7\n'
    rest = "[limits]\nper_source_rate = 0\n[log]\nstats_interval = 0\n"
    config.write_text(base + rest)
    config.chmod(0o644)
    process = started(
        "--config", str(config), twistdArgs=asUser(pwd.getpwnam("nobody"))
    )
    assert process.listening() == [("127.0.0.7", 7)]
    config.write_text(base + "max_packet_size = 200\n" + rest)
    askThroughReload(
        "127.0.0.7",
        7,
        lambda: process.proc.send_signal(signal.SIGHUP),
        lambda: bool(RELOADED.search(process.output())),
    )
    (line,) = process.waitFor(RELOADED)
    assert line.group(1) == "listener 127.0.0.7:7: max_packet_size 65535 -> 200"
    assertLargestAnswered("127.0.0.7", 7, 200)
    process.stop()
    assert "Traceback" not in process.output()


def test_reloadIsAllOrNothing(started, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """
    A reload whose new listener cannot bind changes nothing: not the
    prefix, not the kept listener's size; one line says why.  Once the
    port is free, the same file applies whole.
    """
    kept = freePort()
    blocker = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    blocker.bind(("127.0.0.1", 0))
    taken = blocker.getsockname()[1]
    config = tmp_path / "udpdst.toml"
    config.write_text(listeners(kept) + "[log]\nstats_interval = 0\n")
    process = started("--config", str(config))
    process.listening()
    config.write_text(
        listeners(kept)
        + "max_packet_size = 100\n"
        + listeners(taken)
        + '[echo]\nprefix = "new: "\n[log]\nstats_interval = 0\n'
    )
    try:
        process.proc.send_signal(signal.SIGHUP)
        (line,) = process.waitFor(FAILED)
        assert line.group(1) == (
            f"cannot listen on 127.0.0.1:{taken}: address already in use; stop "
            "the other service on that port or choose another port, or set "
            "reuse_port = true in every process that shares it"
        )
        assert echo("127.0.0.1", kept, b"x" * 150) == b"x" * 150
    finally:
        blocker.close()
    process.proc.send_signal(signal.SIGHUP)
    (line,) = process.waitFor(RELOADED)
    assert line.group(1) == (
        f"listener 127.0.0.1:{taken} added; listener 127.0.0.1:{kept}: "
        "max_packet_size 65535 -> 100; prefix '' -> 'new: '"
    )
    assert echo("127.0.0.1", kept, b"y") == b"new: y"
    assert echo("127.0.0.1", taken, b"z") == b"new: z"
    process.stop()
    output = process.output()
    assert "Traceback" not in output
    assert len(FAILED.findall(output)) == 1


def test_replacedSocketBindsFirst(started, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """
    A listener whose identity changes on the same port (v6_only) is a new
    socket, which cannot bind while the old one holds the port: the old
    one serves on, and the line says to restart.
    """
    port = freePort("::")
    config = tmp_path / "udpdst.toml"
    config.write_text(
        f'[[listen]]\naddress = "::"\nport = {port}\n[log]\nstats_interval = 0\n'
    )
    process = started("--config", str(config))
    process.listening()
    config.write_text(
        f'[[listen]]\naddress = "::"\nport = {port}\nv6_only = true\n'
        "[log]\nstats_interval = 0\n"
    )
    process.proc.send_signal(signal.SIGHUP)
    (line,) = process.waitFor(FAILED)
    assert line.group(1) == (
        f"cannot listen on [::]:{port}: address already in use; stop the other "
        "service on that port or choose another port, or set reuse_port = true "
        f"in every process that shares it (it clashes with listener [::]:{port}, "
        "which serves until its replacement is bound; restart the service to "
        "make this change)"
    )
    # Still the dual-stack socket: IPv4 is answered.
    assert echo("127.0.0.1", port, b"v4") == b"v4"
    process.stop()
    assert "Traceback" not in process.output()


def test_exceptionWhileBuildingKeepsTheRunningConfig(
    epollReactor: Any, tmp_path: Path
) -> None:
    """
    A reload whose new pieces raise while being built (here a burst no
    rate limiter can hold, given past the schema): one error line, the
    running configuration and socket untouched, and systemd still hears
    READY=1 after RELOADING=1.
    """
    from twisted.logger import LogLevel, globalLogPublisher

    from udpdst.echo.config import Config, LimitsConfig, ListenConfig
    from udpdst.echo.service import EchoService
    from udpdst.echo.systemd import Notifier

    listener = ListenConfig("127.0.0.1", 0)
    config = Config(listen=(listener,))
    bad = replace(
        config,
        listen=(replace(listener, max_packet_size=100),),
        limits=LimitsConfig(per_source_burst=10**400),
    )
    manager = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    manager.bind(str(tmp_path / "notify"))
    manager.settimeout(DEADLINE)
    service = EchoService(
        replace(config, log=replace(config.log, stats_interval=0)),
        [(listener, None)],
        epollReactor,
        reloader=lambda: bad,
        notifier=Notifier({"NOTIFY_SOCKET": str(tmp_path / "notify")}),
    )
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        service.privilegedStartService()
        service.startService()
        (child,) = service.listeners
        port, before = child.listeningPort, service.config
        service._reloadOnSignal()
        assert manager.recv(4096).startswith(b"RELOADING=1\n")
        assert manager.recv(4096) == b"READY=1\nSTATUS=serving 1 listener"
        assert service.config is before
        assert service.listeners == [child] and child.listeningPort is port
        assert port is not None and port.maxPacketSize == 65535
        assert child.listener == listener
    finally:
        globalLogPublisher.removeObserver(events.append)
        service.stopService()
        manager.close()
    errors = [e for e in events if e["log_level"] >= LogLevel.warn]
    assert [formatEvent(e) for e in errors] == [
        "reload failed, the running configuration is kept: OverflowError: int "
        "too large to convert to float"
    ]

"""
Tests for the Prometheus endpoint (udpdst.echo.metrics): a real C{twistd udpdst}
scraped over loopback after known traffic, its text parsed with
C{prometheus_client}'s own parser.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests._service_helpers import (
    DEADLINE,
    Twistd,
    echo,
    freePort,
    scrape,
    startedTwistd,
)
from tests.kernel import flood, rowOn

prometheus_client = pytest.importorskip(
    "prometheus_client", reason="the metrics extra (prometheus_client) is not installed"
)

from udpdst.echo.metrics import metricName  # noqa: E402
from udpdst.echo.protocol import REFUSAL_REASONS  # noqa: E402
from udpdst.port import IO_PATH, PortCounters  # noqa: E402

METRICS_LINE = re.compile(r"udpdst metrics on http://(\S+)/metrics")


@pytest.fixture
def started(tmp_path: Path) -> Iterator[Callable[..., Twistd]]:
    yield from startedTwistd(tmp_path)


def test_scrapeAfterKnownTraffic(started) -> None:  # type: ignore[no-untyped-def]
    """
    Three answered datagrams and one refused (source port 7) show as
    counters of that listener, every refusal reason is there (0 included),
    and the info and limiter metrics are present.
    """
    process = started(
        "--listen", "127.0.0.1:0", "--metrics", "127.0.0.1:0", "--stats-interval", "0"
    )
    ((_, port),) = process.listening()
    (match,) = process.waitFor(METRICS_LINE)
    url = f"http://{match.group(1)}/metrics"
    for data in (b"a", b"bb", b"ccc"):
        assert echo("127.0.0.1", port, data) == data
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.3", 7))
        s.sendto(b"loop", ("127.0.0.1", port))
    # Handled in order on one socket: once this is answered, so was the rest.
    assert echo("127.0.0.1", port, b"last") == b"last"

    samples = scrape(url)
    listener = (("listener", f"127.0.0.1:{port}"),)
    assert samples[("udpdst_received_total", listener)] == 5
    assert samples[("udpdst_replied_total", listener)] == 4
    for name in (
        "udpdst_send_errors_total",
        "udpdst_send_fallbacks_total",
        "udpdst_oversized_total",
        "udpdst_control_truncated_total",
        "udpdst_kernel_drops_total",
        "udpdst_unreadable_total",
        "udpdst_icmp_errors_total",
    ):
        assert samples[(name, listener)] == 0, name
    for reason in REFUSAL_REASONS:
        labels = tuple(sorted((*listener, ("reason", reason))))
        expected = 1 if reason == "source-port" else 0
        assert samples[("udpdst_refused_total", labels)] == expected, reason
    assert samples[("udpdst_rate_limited_sources", ())] == 1
    assert samples[("udpdst_rate_limiter_evictions_total", ())] == 0
    ((key, value),) = [(k, v) for k, v in samples.items() if k[0] == "udpdst_info"]
    labels = dict(key[1])
    assert value == 1
    assert labels["io_path"] == IO_PATH
    # Every counter the port keeps is exported, by its name.
    for name in PortCounters().asDict():
        assert (metricName(name) + "_total", listener) in samples, name
    assert re.fullmatch(r"\d+\.\d+\.\d+.*", labels["version"])

    # Only /metrics is served.
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(url.replace("/metrics", "/other"), timeout=DEADLINE)
    assert info.value.code == 404

    # The final stats line and the last scrape read the same counters.
    process.stop()
    assert f"final stats 127.0.0.1:{port}: received 5, replied 4, refused 1" in (
        process.output()
    )


def test_metricsPortInUse(started) -> None:  # type: ignore[no-untyped-def]
    """
    A metrics port that is taken ends the service with one line and exit 1.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = holder.getsockname()[1]
        process = started("--listen", "127.0.0.1:0", "--metrics", f"127.0.0.1:{taken}")
        assert process.finish() == 1
    output = process.output()
    assert "Traceback" not in output
    assert (
        f"cannot listen on metrics 127.0.0.1:{taken}: address already in use; "
        "stop the other service on that port or choose another port\n"
    ) in output


def test_missingExtraIsOneLine(started, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """
    Without prometheus_client, a config asking for metrics gets one line
    naming the extra to install, and exit 1; without metrics it runs.
    """
    # A prometheus_client that cannot be imported, ahead of the real one.
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "prometheus_client.py").write_text(
        "raise ImportError(\"No module named 'prometheus_client'\")\n"
    )
    env = dict(os.environ, PYTHONPATH=str(hide))
    port = freePort()
    process = started(
        "--listen", "127.0.0.1:0", "--metrics", f"127.0.0.1:{port}", env=env
    )
    assert process.finish() == 1
    assert process.out == []
    assert process.err == [
        "twistd udpdst: [metrics] listen (--metrics) needs the optional extra: "
        "install it with pip install '/path/to/udpdst-checkout[metrics]' (or pip "
        "install prometheus_client), or remove the setting\n"
    ]
    without = started("--listen", "127.0.0.1:0", env=env)
    without.listening()
    without.stop()


def test_scrapeCoversEveryWorker(started) -> None:  # type: ignore[no-untyped-def]
    """
    With two worker processes, /metrics sums what both counted: the figures
    reach exactly what was sent (workers report every second; wait for it).
    """
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
    (match,) = process.waitFor(METRICS_LINE)
    url = f"http://{match.group(1)}/metrics"
    # Many client sockets, so that both workers are likely to see some; the
    # sum is what is checked, not the share.
    sent = 40
    for i in range(sent):
        assert echo("127.0.0.1", port, b"%d" % i) == b"%d" % i
    listener = (("listener", f"127.0.0.1:{port}"),)
    deadline = time.monotonic() + DEADLINE
    while True:
        samples = scrape(url)
        figures = (
            samples.get(("udpdst_received_total", listener)),
            samples.get(("udpdst_replied_total", listener)),
        )
        if figures == (sent, sent) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert figures == (sent, sent), samples
    process.stop()
    assert f"final stats 127.0.0.1:{port}: received {sent}, replied {sent}," in (
        process.output()
    )


def _get(url: str, method: str = "GET", agent: str = "test") -> int:
    """
    The status of C{method url}.
    """
    request = urllib.request.Request(url, method=method, headers={"User-Agent": agent})
    try:
        with urllib.request.urlopen(request, timeout=DEADLINE) as response:
            response.read()
            return int(response.status)
    except urllib.error.HTTPError as e:
        return int(e.code)


@pytest.mark.parametrize("level", ["info", "debug"])
def test_onlyMetricsQuietly(started, level: str) -> None:  # type: ignore[no-untyped-def]
    """
    /metrics and nothing else: no index, no subpath, no other method.
    Requests are logged at debug level only, one line each with the path
    (cut short) and never the User-Agent.
    """
    process = started(
        "--listen", "127.0.0.1:0", "--metrics", "127.0.0.1:0", "--log-level", level
    )
    process.listening()
    (match,) = process.waitFor(METRICS_LINE)
    base = f"http://{match.group(1)}"
    agent = "agent-that-must-not-be-logged"
    assert _get(base + "/metrics", agent=agent) == 200
    assert _get(base + "/metrics?x=1", agent=agent) == 200
    for path in ("/", "/metrics/", "/metrics/x", "/other", "/metrics.txt"):
        assert _get(base + path, agent=agent) == 404, path
    assert _get(base + "/metrics", "POST", agent=agent) == 405
    assert _get(base + "/" + "p" * 300, agent=agent) == 404
    process.stop()
    output = process.output()
    assert agent not in output
    lines = re.findall(r".*metrics request from.*", output)
    if level == "info":
        assert lines == []
        assert "/other" not in output
    else:
        assert len(lines) == 9, lines
        assert lines[0].endswith("metrics request from 127.0.0.1: GET /metrics -> 200")
        assert lines[4].endswith(
            "metrics request from 127.0.0.1: GET /metrics/x -> 404"
        )
        assert lines[-1].endswith(" GET /" + "p" * 199 + " -> 404")
    assert "Traceback" not in output


def test_kernelDropsAgreeWithTheKernel(started, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """
    Datagrams the kernel dropped on a listener bound to one address (a small
    receive buffer, overflowed while the service is stopped) show in
    /metrics and in the final stats line as the kernel counts them
    (C{/proc/net/udp}), though no datagram queued after the drops has
    reported them.
    """
    config = tmp_path / "udpdst.toml"
    config.write_text(
        '[[listen]]\naddress = "127.0.0.1"\nport = 0\nreceive_buffer = 4096\n'
        '[metrics]\nlisten = "127.0.0.1:0"\n[log]\nstats_interval = 0\n'
    )
    process = started("--config", str(config))
    ((_, port),) = process.listening()
    (match,) = process.waitFor(METRICS_LINE)
    url = f"http://{match.group(1)}/metrics"

    def queue() -> tuple[int, int]:
        row = rowOn("127.0.0.1", port)
        return row.rxQueue, row.drops

    os.kill(process.proc.pid, signal.SIGSTOP)
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
            flood(sender, ("127.0.0.1", port), 200, b"z" * 512, queue)
    finally:
        os.kill(process.proc.pid, signal.SIGCONT)
    dropped = rowOn("127.0.0.1", port).drops
    assert 0 < dropped < 200
    # Once the service has read what was queued, nothing moves any more.
    deadline = time.monotonic() + DEADLINE
    while queue()[0] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert queue() == (0, dropped)

    listener = (("listener", f"127.0.0.1:{port}"),)
    samples = scrape(url)
    assert samples[("udpdst_kernel_drops_total", listener)] == dropped
    assert samples[("udpdst_received_total", listener)] == 200 - dropped
    process.stop()
    line = re.search(r"final stats 127\.0\.0\.1:\d+: (.*)", process.output())
    assert line is not None, process.output()
    assert f"kernel drops {dropped}," in line.group(1)

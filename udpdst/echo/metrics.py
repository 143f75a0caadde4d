"""
The Prometheus endpoint of the udpdst service: C{/metrics} served by
twisted.web in the service's own reactor, read from the same L{Snapshot} as
the stats lines.  Nothing else is served, and requests are logged at debug
level only: whoever reaches the port cannot fill the log.

It needs the optional extra C{metrics} (C{prometheus_client}): the
exposition format (escaping, types, C{_total} suffixes, OpenMetrics
negotiation) is that library's job, and its parser is what the tests read
the output with.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import Any

from twisted.internet.error import CannotListenError
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

import udpdst
from udpdst.address import formatHostPort
from udpdst.application import ListeningService
from udpdst.echo import logs
from udpdst.echo.config import MetricsConfig
from udpdst.echo.listeners import ListenError, bindFailure
from udpdst.echo.stats import Snapshot

#: What to tell an operator whose config asks for metrics without the extra.
MISSING_EXTRA = (
    "[metrics] listen (--metrics) needs the optional extra: install it with "
    "pip install '/path/to/udpdst-checkout[metrics]' (or pip install "
    "prometheus_client), or remove the setting"
)

#: The help text of the per-listener counters the port has today; a counter
#: it adds later is exported too, with a generic help text.
_HELP = {
    "received": "Datagrams received and handed to the echo.",
    "replied": "Replies the kernel accepted.",
    "sendErrors": "Replies that could not be sent (e.g. ENOBUFS).",
    "sendFallbacks": "Replies sent without a source address, which was gone.",
    "oversized": "Datagrams larger than max_packet_size, dropped.",
    "controlTruncated": "Datagrams whose destination was unknown (control data cut).",
    "kernelDrops": "Datagrams the kernel dropped on the socket (buffer full).",
    "unreadable": "Datagrams dropped because their peer address was unusable.",
    "icmpErrors": "ICMP errors (e.g. port unreachable) about replies sent.",
    "replySocketsOpened": "Reply sockets opened to answer from a redirected address and port.",
    "replySocketsReused": "Replies sent through a cached reply socket (transparent listeners).",
    "replySocketsEvicted": "Reply sockets closed to make room, or after idling.",
    "replySocketsFailed": "Reply sockets that could not be opened; those replies were not sent.",
    "replySocketsRefused": "Replies not sent: another local socket holds their source address and port.",
}


def checkAvailable() -> None:
    """
    @raise ImportError: The C{metrics} extra is not installed.
    """
    import prometheus_client  # noqa: F401


def metricName(counter: str) -> str:
    """
    The Prometheus name of a port counter, without C{_total}:
    C{sendErrors} is C{udpdst_send_errors}.
    """
    return "udpdst_" + re.sub(r"[A-Z]", lambda m: "_" + m.group().lower(), counter)


class SnapshotCollector:
    """
    A C{prometheus_client} collector that reads one L{Snapshot} per scrape.
    """

    def __init__(self, snapshot: Callable[[], Snapshot]) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            InfoMetricFamily,
        )

        from udpdst import port

        snapshot = self._snapshot()
        info = InfoMetricFamily("udpdst", "The udpdst version and I/O path.")
        info.add_metric([], {"version": udpdst.__version__, "io_path": port.IO_PATH})
        yield info

        families: dict[str, Any] = {}
        refused = CounterMetricFamily(
            "udpdst_refused",
            "Datagrams the echo refused, by reason.",
            labels=["listener", "reason"],
        )
        for address, stats in snapshot.listeners.items():
            for name, value in stats.counters.items():
                family = families.get(name)
                if family is None:
                    family = families[name] = CounterMetricFamily(
                        metricName(name),
                        _HELP.get(name, f"The port's {name} counter."),
                        labels=["listener"],
                    )
                family.add_metric([address], value)
            for reason, value in stats.refused.items():
                refused.add_metric([address, reason], value)
        yield from families.values()
        yield refused
        yield GaugeMetricFamily(
            "udpdst_rate_limited_sources",
            "Sources whose rate the limiter tracks.",
            value=snapshot.rateLimitedSources,
        )
        yield CounterMetricFamily(
            "udpdst_rate_limiter_evictions",
            "Sources the rate limiter forgot to make room for new ones.",
            value=snapshot.limiterEvictions,
        )
        yield GaugeMetricFamily(
            "udpdst_rate_limited_networks",
            "Source networks whose rate the per-network limiter tracks.",
            value=snapshot.rateLimitedNetworks,
        )
        yield CounterMetricFamily(
            "udpdst_network_limiter_evictions",
            "Source networks the per-network limiter forgot to make room for new ones.",
            value=snapshot.networkEvictions,
        )


class MetricsResource(Resource):
    """
    The whole site: C{/metrics}, the registry in the text format the
    scraper asks for, rendered in the reactor thread (no thread pool: a
    snapshot is cheap); 404 for every other path.
    """

    isLeaf = True

    def __init__(self, registry: Any) -> None:
        Resource.__init__(self)
        self._registry = registry

    def render(self, request: Request) -> bytes:
        if request.path != b"/metrics":
            request.setResponseCode(404)
            request.setHeader("content-type", "text/plain; charset=utf-8")
            return b"Not found: udpdst serves /metrics only\n"
        return bytes(Resource.render(self, request))

    def render_GET(self, request: Request) -> bytes:
        from prometheus_client.exposition import choose_encoder

        accept = request.getHeader("accept") or ""
        encoder, contentType = choose_encoder(accept)
        request.setHeader("content-type", contentType)
        return bytes(encoder(self._registry))


class MetricsSite(Site):
    """
    The metrics endpoint's site: a request is logged at debug level, as
    one line with the client, method, path and status, never at info (a
    scrape every few seconds, or anyone who can reach the port, would fill
    the log), and never with the client's other headers.
    """

    noisy = False
    _log = Logger()

    def log(self, request: Request) -> None:  # type: ignore[override]
        if not logs.minimumLevel.debug:
            return
        client = request.getClientAddress()
        path = request.path.decode("ascii", "backslashreplace")
        self._log.debug(
            "metrics request from {client}: {method} {path} -> {code}",
            client=getattr(client, "host", "?"),
            method=request.method.decode("ascii", "backslashreplace"),
            path=path[:200],
            code=request.code,
        )


def metricsSite(snapshot: Callable[[], Snapshot]) -> Site:
    """
    A web site serving C{/metrics} from C{snapshot()}, and nothing else.
    """
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry(auto_describe=True)
    registry.register(SnapshotCollector(snapshot))  # type: ignore[arg-type]
    return MetricsSite(MetricsResource(registry))


class MetricsService(ListeningService[Any]):
    """
    Serve C{/metrics} over HTTP on C{[metrics] listen}: bound in
    L{privilegedStartService} like the listeners, closed in L{stopService}.

    @ivar listeningPort: The listening TCP port, once bound.
    """

    _log = Logger()

    def __init__(
        self,
        config: MetricsConfig,
        snapshot: Callable[[], Snapshot],
        reactor: Any = None,
    ) -> None:
        self.config = config
        self._snapshot = snapshot
        self._reactor = reactor

    def prepare(self) -> None:
        """
        Bind now, without saying so yet (a reload binds the moved endpoint
        before it closes the old one, and L{announce}s it once it applies).

        @raise ListenError: It cannot bind.
        """
        if self.listeningPort is None:
            self.listeningPort = self._bind()

    def _listen(self) -> Any:
        port = self._bind()
        self.announce(port)
        return port

    def _bind(self) -> Any:
        reactor = self._reactor
        if reactor is None:
            from twisted.internet import reactor
        host, port = self.config.endpoint
        where = f"metrics {self.config.listen}"
        try:
            return reactor.listenTCP(port, metricsSite(self._snapshot), interface=host)
        except CannotListenError as e:
            raise ListenError(bindFailure(where, e, udp=False)) from None

    def announce(self, port: Any = None) -> None:
        """
        Log where the endpoint serves.
        """
        listening = port if port is not None else self.listeningPort
        assert listening is not None, "announced once bound"
        bound = listening.getHost()
        self._log.info(
            "udpdst metrics on http://{address}/metrics",
            address=formatHostPort(bound.host, bound.port),
        )

"""
Helpers that several of the echo service's tests share: an echo on a real
port, the reactor waits they use, and the bad config files that every entry
point (twistd udpdst, udpdst check-config) must refuse in one line.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Coroutine
from typing import Any

from twisted.internet.defer import Deferred, ensureDeferred

from tests.reactors import runUntil
from udpdst import listenUDP
from udpdst.echo.protocol import EchoProtocol


def run(reactor: Any, scenario: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
    return runUntil(reactor, lambda: ensureDeferred(scenario()), timeout=20)


# The port each server() protocol listened on, for its counters once stopped.
_ports: weakref.WeakKeyDictionary[EchoProtocol, Any] = weakref.WeakKeyDictionary()


def portCounters(protocol: EchoProtocol) -> Any:
    """
    The counters of the port C{protocol} listened on: it counts what came in
    and went out, the echo only its refusals.
    """
    return _ports[protocol].counters


def server(
    reactor: Any, interface: str, protocol: EchoProtocol | None = None
) -> tuple[EchoProtocol, int]:
    protocol = protocol or EchoProtocol()
    port = listenUDP(0, protocol, interface, 65535, reactor)
    _ports[protocol] = port
    return protocol, port.getHost().port


def until(reactor: Any, condition: Callable[[], bool]) -> Deferred[None]:
    """
    Fire once C{condition()} holds, checking every few milliseconds (the
    caller's run() bounds the wait).
    """
    d: Deferred[None] = Deferred()

    def check() -> None:
        if condition():
            d.callback(None)
        else:
            reactor.callLater(0.005, check)

    check()
    return d


#: Config files that must be refused, with the cause the one line names.
BAD_CONFIGS = [
    ("[limits]\nper_source_rat = 5\n", r"unknown key 'per_source_rat'"),
    ("[[listen]]\nport = '7'\n", r"must be an integer port number"),
    ("[[listen]]\naddress = 'eth0'\n", r"bad address 'eth0'"),
    (
        "[[listen]]\nport = 65536\n",
        r"port = 65536 is out of range; use a port number 0\.\.65535",
    ),
    ("[echo]\nprefix = 'x'\n\n[limits\n", r"invalid TOML: .*\(at line 4, column 8\)"),
]

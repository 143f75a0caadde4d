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
    # What makes the parser itself raise.
    ("x = " + "[" * 5000 + "]" * 5000 + "\n", r"invalid TOML: arrays or tables nested"),
    ("x = " + "{a=" * 3000 + "1" + "}" * 3000 + "\n", r"invalid TOML: .* nested too"),
    (
        "[limits]\nmax_sources = " + "9" * 5000 + "\n",
        r"invalid TOML: Exceeds the limit \(4300 digits\) for integer string "
        r"conversion: value has 5000 digits; fix the value there$",
    ),
    # Every number bounded, so that what is accepted also runs.
    (
        "[limits]\nper_source_burst = 100000000000000000000\n",
        r"per_source_burst = 100000000000000000000 is out of range; "
        r"use 1\.\.1000000000$",
    ),
    (
        "[limits]\nmax_sources = " + "9" * 4000 + "\n",
        r"max_sources = 9{20}\.\.\.9{8} is out of range; use 1\.\.16777216$",
    ),
    ("[limits]\nper_source_rate = 1e-9\n", r"= 1e-09 is out of range; use 0\.001\."),
    ("[limits]\nper_source_rate = 1e300\n", r"use 0\.001\.\.1e\+09, or 0$"),
    ("[limits]\nper_prefix_rate = -1\n", r"per_prefix_rate = -1 is out of range"),
    ("[limits]\nper_prefix_burst = 0\n", r"per_prefix_burst = 0 is out of range"),
    ("[limits]\nprefix_v4 = 33\n", r"prefix_v4 = 33 is out of range; use 0\.\.32$"),
    ("[limits]\nprefix_v6 = 129\n", r"prefix_v6 = 129 is out of range; use 0\.\.128"),
    ("[limits]\nprefix_v4 = 24.0\n", r"prefix_v4 must be an integer, not a number"),
    ("[log]\nstats_interval = 1e300\n", r"stats_interval = 1e\+300 is out of range"),
    (
        "[service]\nworkers = 100000\n",
        r"workers = 100000 is out of range; use 1\.\.256",
    ),
    (
        "[[listen]]\nreceive_buffer = 2147483648\n",
        r"receive_buffer = 2147483648 is out",
    ),
    ("[echo]\nanswer_broadcast = 'yes'\n", r"answer_broadcast must be true or false"),
    (
        "[[listen]]\naddress = '224.0.0.1'\n",
        r"224\.0\.0\.1 is a multicast or broadcast",
    ),
    ("[[listen]]\naddress = '255.255.255.255'\n", r"multicast or broadcast address"),
]

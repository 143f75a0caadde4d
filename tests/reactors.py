"""
Build and run private reactors of each kind the port must work on, so one
test process exercises epoll, poll, select and asyncio.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred

REACTOR_NAMES = ("epoll", "poll", "select", "asyncio")


def buildReactor(name: str) -> Any:
    if name == "epoll":
        from twisted.internet.epollreactor import EPollReactor

        return EPollReactor()
    if name == "poll":
        from twisted.internet.pollreactor import PollReactor

        return PollReactor()
    if name == "select":
        from twisted.internet.selectreactor import SelectReactor

        return SelectReactor()
    if name == "asyncio":
        from twisted.internet.asyncioreactor import AsyncioSelectorReactor

        return AsyncioSelectorReactor(asyncio.new_event_loop())
    raise ValueError(name)


def unbuildReactor(reactor: Any) -> None:
    """
    Free what a private reactor holds (its waker, readers, timed calls).
    """
    for reader in list(getattr(reactor, "_internalReaders", ())):
        reactor.removeReader(reader)
        reader.connectionLost(None)
    reactor.disconnectAll()
    for call in reactor.getDelayedCalls():
        call.cancel()
    loop = getattr(reactor, "_asyncioEventloop", None)
    if loop is not None:
        loop.close()


class ReactorTimeout(Exception):
    pass


def runUntil(
    reactor: Any, start: Callable[[], Deferred[Any]], timeout: float = 10.0
) -> Any:
    """
    Run C{reactor} until the Deferred that C{start()} returns fires, or
    C{timeout} seconds pass; return its result or raise its failure.
    """
    outcome: list[Any] = []

    def begin() -> None:
        d = start()
        d.addBoth(outcome.append)
        d.addBoth(lambda _: reactor.stop())

    def expire() -> None:
        if not outcome:
            reactor.stop()

    reactor.callWhenRunning(begin)
    timer = reactor.callLater(timeout, expire)
    reactor.run(installSignalHandlers=False)
    if timer.active():
        timer.cancel()
    if not outcome:
        raise ReactorTimeout(f"nothing happened in {timeout} s")
    result = outcome[0]
    if hasattr(result, "raiseException"):
        result.raiseException()
    return result

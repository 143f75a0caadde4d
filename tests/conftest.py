"""
Shared fixtures: private reactors of each kind, and loopback checks.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.reactors import REACTOR_NAMES, buildReactor, unbuildReactor


@pytest.fixture(params=REACTOR_NAMES)
def anyReactor(request: pytest.FixtureRequest) -> Iterator[Any]:
    """
    A fresh private reactor of each kind the port must work on.
    """
    reactor = buildReactor(request.param)
    try:
        yield reactor
    finally:
        unbuildReactor(reactor)


@pytest.fixture
def epollReactor() -> Iterator[Any]:
    reactor = buildReactor("epoll")
    try:
        yield reactor
    finally:
        unbuildReactor(reactor)


def _canBind(host: str) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.bind((host, 0))
    except OSError:
        return False
    return True


HAVE_IPV6 = _canBind("::1")
requiresIPv6 = pytest.mark.skipif(not HAVE_IPV6, reason="no IPv6 on loopback (::1)")


def pidFileRemoved(path: Path, timeout: float = 30.0) -> bool:
    """
    Whether C{path} is gone, or goes within C{timeout} seconds: a twistd
    daemon removes its pid file as it ends, which can be after the process
    that launched it has exited with the daemon's status.
    """
    deadline = time.monotonic() + timeout
    while path.exists():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True

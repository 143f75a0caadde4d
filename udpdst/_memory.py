"""
Twisted's memory reactors told apart from real ones, without importing the
test doubles: the library builds a fake port for them, in the one branch
that imports L{udpdst.testing}.
"""

from __future__ import annotations

import sys


def isMemoryReactor(reactor: object) -> bool:
    """
    Whether C{reactor} is one of Twisted's memory reactors
    (C{MemoryReactor}, C{MemoryReactorClock}), which have no sockets.
    """
    testing = sys.modules.get("twisted.internet.testing")
    # Without that module loaded, no memory reactor exists.
    return testing is not None and isinstance(reactor, testing.MemoryReactor)

"""
C{"<broadcast>"} as a destination host works on udpdst's port as on
Twisted's: it is the limited broadcast address, 255.255.255.255, and needs
C{setBroadcastAllowed(True)}.

A limited broadcast leaves by a route, so the writes run in a namespace of
the test's own (L{tests._broadcast_netns}) whose only link is C{lo}, with a
default route through it for the port on the wildcard address.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.netns import REPO, Namespace, unavailableReason
from udpdst.port import IO_PATH

pytestmark = pytest.mark.netns

SCRIPT = Path(__file__).resolve().parent / "_broadcast_netns.py"


@pytest.fixture(scope="module")
def written() -> Iterator[dict[str, Any]]:
    """
    What L{tests._broadcast_netns} saw, run in a namespace of its own.
    """
    reason = unavailableReason()
    if reason is not None:
        pytest.skip(reason)
    ns = Namespace.create()
    try:
        ns.ip("link", "set", "lo", "up")
        ns.ip("route", "add", "default", "dev", "lo")
        proc = subprocess.run(
            ns.argv(sys.executable, str(SCRIPT)),
            capture_output=True,
            text=True,
            timeout=60,
            env=dict(os.environ, PYTHONPATH=str(REPO)),
        )
        assert proc.returncode == 0, proc.stderr
        yield json.loads(proc.stdout)
    finally:
        ns.delete()


@pytest.mark.parametrize("interface", ["127.0.0.1", "*"])
def test_broadcastAsInTwisted(written: dict[str, Any], interface: str) -> None:
    """
    Once broadcast is allowed, a write to C{"<broadcast>"} reaches a
    receiver on 0.0.0.0, sent to 255.255.255.255, from the same source as
    Twisted's port sends it; nothing is raised or counted as failed.
    """
    assert written["ioPath"] == IO_PATH
    ours = written[f"udpdst {interface}"]
    stock = written[f"twisted {interface}"]
    assert (ours["class"], stock["class"]) == ("DestinationPort", "Port")
    assert ours["allowed"]["received"] == stock["allowed"]["received"]
    assert ours["allowed"]["received"]["data"] == "hello"
    assert ours["allowed"]["received"]["destination"] == "255.255.255.255"
    assert ours["allowed"]["raised"] is None
    # Counted before, for the write that was not allowed; nothing since.
    assert ours["allowed"]["sendErrors"] == ours["denied"]["sendErrors"] == 1


@pytest.mark.parametrize("interface", ["127.0.0.1", "*"])
def test_broadcastNotAllowed(written: dict[str, Any], interface: str) -> None:
    """
    Before C{setBroadcastAllowed(True)} nothing is sent by either port.
    Twisted's C{write} raises the kernel's C{EACCES}; udpdst's counts it in
    C{sendErrors} (it sends after C{write} returns when replies are
    batched, so send errors are counted, never raised).
    """
    ours = written[f"udpdst {interface}"]["denied"]
    stock = written[f"twisted {interface}"]["denied"]
    assert stock["raised"] == "EACCES" and stock["received"] is None
    assert ours["raised"] is None and ours["received"] is None
    assert ours["sendErrors"] == 1

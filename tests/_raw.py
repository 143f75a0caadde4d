"""
Spoofed datagrams for the tests: one IPv4 UDP datagram with any source
address and port, sent through a raw socket (root only), as an attacker
would send it.
"""

from __future__ import annotations

import os
import socket
import struct

import pytest

requiresRawSockets = pytest.mark.skipif(
    os.geteuid() != 0, reason="spoofing a source needs a raw socket (root)"
)


def spoof(source: tuple[str, int], target: tuple[str, int], payload: bytes) -> None:
    """
    Send one IPv4 UDP datagram to C{target} that claims to come from
    C{source} (address and port).  The checksum is left out (0), which IPv4
    allows.
    """
    header = struct.pack("!HHHH", source[1], target[1], 8 + len(payload), 0)
    with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_UDP) as raw:
        raw.bind((source[0], 0))
        raw.sendto(header + payload, (target[0], 0))

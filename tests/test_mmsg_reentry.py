"""
udpdst._mmsg.recv builds its batch with Python objects; a collection then can
run Python code (gc callbacks, finalizers, and in them another thread) that
reads another socket with recv.  The outer call's batch must stay its own.
"""

import gc
import socket
from collections.abc import Iterator

import pytest

from udpdst import io

pytestmark = pytest.mark.skipif(io.BATCHED is None, reason="udpdst._mmsg not built")


def _socket() -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    s.setblocking(False)
    return s


@pytest.fixture
def sockets() -> Iterator[list[socket.socket]]:
    made = [_socket() for _ in range(4)]
    yield made
    for s in made:
        s.close()


def test_nestedReceiveKeepsTheOuterBatch(sockets: list[socket.socket]) -> None:
    assert io.BATCHED is not None
    receive = io.BATCHED.receive
    a, b, toA, toB = sockets
    for i in range(8):
        toA.sendto(b"A%d" % i, a.getsockname())
    for i in range(400):
        toB.sendto(b"B%d" % i, b.getsockname())
    held = []  # kept: freed tuples would refill the freelist
    sizes = iter(range(4096, 1 << 30, 4096 * 7))

    def nested(phase: str, info: object) -> None:
        if phase == "start":
            # A bigger buffer each time: the receive area is reallocated;
            # the result is kept, so its tuples do not refill the freelist.
            held.append(receive(b, 8, next(sizes), 0))

    keep = [(i, i, i) for i in range(5000)]  # no free 3-tuples: GC allocations
    threshold = gc.get_threshold()
    gc.callbacks.append(nested)
    gc.set_threshold(1)
    try:
        batch, _, _ = receive(a, 8, 2048, 0)
    finally:
        gc.set_threshold(*threshold)
        gc.callbacks.remove(nested)
    del keep
    assert [data for data, _, _ in batch] == [b"A%d" % i for i in range(8)]
    port = toA.getsockname()[1]
    assert [int.from_bytes(key[2:4], "big") for _, key, _ in batch] == [port] * 8

"""
The system calls a L{udpdst.port.DestinationPort} reads and replies with: the
C extension's batched C{recvmmsg}/C{sendmmsg} where it is built, otherwise a
pure-Python twin (C{recvmsg}/C{sendmsg}), behind one interface.

The interface, the same for both paths, is a L{Path}, whose fields are:

  - C{receive(sock, count, size, ancsize)} returns
    C{(batch, drops, nbytes)}: up to C{count} C{(data, key, flags)}, the last
    C{SO_RXQ_OVFL} count seen (C{-1} if none) and the bytes read.  C{key} stands for the peer and the control data
    (without C{SO_RXQ_OVFL}, so the drop count never changes it): equal keys
    mean the same peer sending to the same destination, so a port caches
    what it derives from a key.  An empty batch means nothing was queued.
  - C{read(sock, count, size, ancsize, handlers)} receives as C{receive}
    does and hands each datagram to the protocol at once, without building
    the batch; see L{Handlers} and L{dispatch}, its pure-Python twin.
  - C{decodeKey(key)} returns C{(addr, ancdata, target)}: the peer as
    C{recvmsg} gives it, the control messages as C{(level, type, data)}, and
    the peer in the form C{send} takes.
  - C{send(sock, items, start)} sends C{items[start:]}, each
    C{(data, target, control)} with C{control} from C{packControl} and
    C{target} from C{decodeKey} or C{packTarget}; it returns C{(sent, errno)}
    and stops at the first failure, whose C{errno} is that of
    C{items[start + sent]}; a closed socket is such a failure (C{EBADF}),
    never an exception.

What the C code may touch of a port is one object, its L{Outbox}: whether
it reads, whether replies are held, the queue of replies and how to flush
it.  L{QueuedWrite} is the C twin of the first branch of the port's
C{write}: it appends to the outbox that a peer address names.
L{DEFAULT} is the path ports use; setting the environment variable
C{UDPDST_IO=python} makes it the twin.  Both are importable (L{BATCHED},
L{PLAIN}), so tests can compare them in one process.
"""

from __future__ import annotations

import errno
import os
import socket
import warnings
from collections.abc import Callable, Hashable, Sequence
from typing import Any, NamedTuple

from udpdst import _linux as L
from udpdst.cmsg import overflowCount

Ancillary = tuple[int, int, bytes]
Batch = list[tuple[bytes, Any, int]]

#: Datagrams asked for per system call (and replies queued before a flush).
BATCH = 64

_FAMILY = L.FAMILY
_PORT = L.NET_PORT
_SCOPE = L.U32
_FLOWINFO = L.NET_U32  # socket.recvmsg gives ntohl() of it
_CMSGHDR = L.CMSGHDR
_V6_ADDR_LEN = 28
_V4_ADDR_LEN = 16

# The C extension handles the kernel's layout; the pure-Python decoder below
# must read the same layout.
_CMSG_HEADER = socket.CMSG_LEN(0)


def _cmsgAlign(length: int) -> int:
    return socket.CMSG_SPACE(length - _CMSG_HEADER) if length >= _CMSG_HEADER else 0


try:
    from udpdst import _mmsg  # type: ignore[attr-defined]
except ImportError:
    _mmsg = None


# The batched path: keys are raw bytes (sockaddr, then control messages).


def _decodeRawKey(key: bytes) -> tuple[Any, list[Ancillary], bytes]:
    """
    Split a key of the C path into the peer, the control messages and the
    raw C{sockaddr} to reply to.

    @raise ValueError: the key holds no IPv4 or IPv6 socket address.
    """
    if len(key) < 2:
        raise ValueError("no socket address")
    family = _FAMILY.unpack_from(key)[0]
    if family == socket.AF_INET and len(key) >= _V4_ADDR_LEN:
        size = _V4_ADDR_LEN
        addr: Any = (socket.inet_ntoa(key[4:8]), _PORT.unpack_from(key, 2)[0])
        target = key[:size]
    elif family == socket.AF_INET6 and len(key) >= _V6_ADDR_LEN:
        size = _V6_ADDR_LEN
        scope = _SCOPE.unpack_from(key, 24)[0]
        addr = (
            socket.inet_ntop(socket.AF_INET6, key[8:24]),
            _PORT.unpack_from(key, 2)[0],
            _FLOWINFO.unpack_from(key, 4)[0],
            scope,
        )
        # The flow label is the peer's; a reply sets its own.
        target = key[:4] + b"\0\0\0\0" + key[8:size]
    else:
        raise ValueError("no IPv4 or IPv6 socket address")
    ancdata: list[Ancillary] = []
    offset = size
    while offset + _CMSG_HEADER <= len(key):
        length, level, kind = _CMSGHDR.unpack_from(key, offset)
        if length < _CMSG_HEADER or offset + length > len(key):
            break
        ancdata.append((level, kind, key[offset + _CMSG_HEADER : offset + length]))
        offset += _cmsgAlign(length)
    return addr, ancdata, target


def _packRawControl(ancdata: Sequence[Ancillary]) -> bytes:
    parts = []
    for level, kind, data in ancdata:
        length = socket.CMSG_LEN(len(data))
        parts.append(_CMSGHDR.pack(length, level, kind) + data)
        parts.append(b"\0" * (socket.CMSG_SPACE(len(data)) - length))
    return b"".join(parts)


def _packRawTarget(addr: Sequence[Any]) -> bytes:
    """
    C{(host, port)} or C{(host, port, flowinfo, scope)} as a raw C{sockaddr};
    C{host} is an IP literal without a zone.

    @raise OSError: C{host} is not an IP literal.
    """
    host, port = addr[0], addr[1]
    if len(addr) == 4 or ":" in host:
        scope = addr[3] if len(addr) == 4 else 0
        return (
            _FAMILY.pack(socket.AF_INET6)
            + _PORT.pack(port)
            + b"\0\0\0\0"
            + socket.inet_pton(socket.AF_INET6, host)
            + _SCOPE.pack(scope)
        )
    return (
        _FAMILY.pack(socket.AF_INET)
        + _PORT.pack(port)
        + socket.inet_aton(host)
        + b"\0" * 8
    )


# The pure-Python twin: keys are (addr, control messages) tuples.


def _receiveEach(
    sock: socket.socket, count: int, size: int, ancsize: int
) -> tuple[Batch, int, int]:
    recvmsg = sock.recvmsg
    batch: Batch = []
    drops = -1
    nbytes = 0
    for _ in range(count):
        try:
            data, ancdata, flags, addr = recvmsg(size, ancsize)
        except OSError as e:
            if e.errno == errno.EINTR:
                continue
            if batch or e.errno in (errno.EAGAIN, errno.EWOULDBLOCK):
                # As recvmmsg does: what was read is returned; a lasting
                # error shows again on the next call.
                break
            raise
        nbytes += len(data)
        if ancdata:
            kept = []
            for item in ancdata:
                if item[0] == L.SOL_SOCKET and item[1] == L.SO_RXQ_OVFL:
                    overflow = overflowCount(item[2])
                    if overflow is not None:
                        drops = overflow
                else:
                    kept.append(item)
            key: Hashable = (addr, tuple(kept))
        else:
            key = (addr, ())
        batch.append((data, key, int(flags)))
    return batch, drops, nbytes


def _readEach(
    sock: socket.socket, count: int, size: int, ancsize: int, handlers: Handlers
) -> tuple[int, int, int, int, Batch | None]:
    batch, drops, nbytes = _receiveEach(sock, count, size, ancsize)
    delivered, rest = dispatch(batch, handlers, len(batch) < count)
    return len(batch), delivered, nbytes, drops, rest


def _decodeTupleKey(key: Any) -> tuple[Any, list[Ancillary], Any]:
    addr, ancdata = key
    if len(addr) == 4:
        target: Any = (addr[0], addr[1], 0, addr[3])
    else:
        target = addr
    return addr, list(ancdata), target


def _sendEach(
    sock: socket.socket, items: list[tuple[bytes, Any, Any]], start: int
) -> tuple[int, int]:
    sendmsg = sock.sendmsg
    sendto = sock.sendto
    sent = 0
    for index in range(start, len(items)):
        data, target, control = items[index]
        while True:
            try:
                if control:
                    sendmsg((data,), control, 0, target)
                else:
                    sendto(data, target)
            except OSError as e:
                if e.errno == errno.EINTR:
                    continue
                return sent, e.errno or errno.EIO
            break
        sent += 1
    return sent, 0


def _tupleTarget(addr: Any) -> Any:
    return tuple(addr)


class Outbox:
    """
    What a port shares with its read pass and with the writes made in it:
    the one object of a port that the C path (C{_mmsg.read},
    L{QueuedWrite}) and L{dispatch} touch.  Its attributes are plain
    instance attributes (the C path reads them from the instance's
    C{__dict__}: a property or a slot there would be bypassed).

    @ivar reading: Whether the protocol reads: after each delivery, reading
        stops if this is false, and the rest of the batch is returned.
    @ivar holdReplies: Whether a reply written now waits, to go out with the
        other replies of the pass (see L{Handlers}); false outside a pass.
    @ivar queue: The replies waiting, each C{(data, target, control)} as
        C{Path.send} takes them.
    @ivar flush: Sends C{queue} and empties it; called when a reply is
        queued while C{holdReplies} is false, or when C{queue} holds
        L{BATCH} replies.
    """

    def __init__(self, flush: Callable[[], object]) -> None:
        self.reading = False
        self.holdReplies = False
        self.queue: list[tuple[bytes, Any, Any]] = []
        self.flush = flush


class Handlers(NamedTuple):
    """
    What L{read} and L{dispatch} hand each datagram to, from its key: a
    cached C{(peer, dst)} in C{peers}, else C{classify(key, flags)} (also
    for every datagram the kernel flagged), which gives one or L{None} for a
    datagram to drop (counted by it).  Then C{deliver(data, peer, dst)}, or
    for a plain protocol (C{peerMap} not L{None})
    C{remember(peer, dst)} when C{peerMap} does not hold C{dst} for that
    peer yet, and C{deliver(data, peer)}.  What either raises goes to
    C{failed(peer, exception)}.  After each delivery, reading stops if
    C{outbox.reading} is false: the rest of the batch is returned.
    C{classify} and C{failed} raise nothing: an C{OSError} out of L{read}
    is taken for the socket's.

    The port holds the replies written during a read pass to send them
    together (while C{outbox.holdReplies} is true).  When a batch emptied the
    socket (fewer datagrams than asked for), nothing more comes in this pass:
    C{outbox.holdReplies} is set false before its last datagram is
    delivered, so that the reply to it goes out at once, with those queued
    before it, rather than after the pass (one request in flight would wait
    for that).

    L{read} returns C{(count, delivered, nbytes, drops, rest)}: the datagrams
    read and delivered, their bytes, the last C{SO_RXQ_OVFL} count (C{-1} if
    none) and the undelivered rest (L{None} if reading never stopped).
    """

    peers: dict[Any, tuple[Any, Any]]
    classify: Callable[[Any, int], tuple[Any, Any] | None]
    deliver: Callable[..., object]
    peerMap: dict[Any, Any] | None
    remember: Callable[[Any, Any], object]
    failed: Callable[[Any, BaseException], object]
    outbox: Outbox


def dispatch(
    batch: Batch, handlers: Handlers, drained: bool = False
) -> tuple[int, Batch | None]:
    """
    Hand a received batch to the protocol, as L{read} does (and C{_mmsg.read}
    in C): returns how many were delivered, and the rest if reading stopped.

    @param drained: Whether the batch emptied the socket (see L{Handlers}).
    """
    peers, classify, deliver, peerMap, remember, failed, outbox = handlers
    delivered = 0
    last = len(batch) - 1 if drained else -1
    for index, (data, key, flags) in enumerate(batch):
        entry = None if flags else peers.get(key)
        if entry is None:
            entry = classify(key, flags)
            if entry is None:
                continue
        delivered += 1
        peer, dst = entry
        if index == last:
            outbox.holdReplies = False
        try:
            if peerMap is None:
                deliver(data, peer, dst)
            else:
                if dst is not None and peerMap.get(peer) is not dst:
                    remember(peer, dst)
                deliver(data, peer)
        except BaseException as e:
            failed(peer, e)
        if not outbox.reading:
            return delivered, batch[index + 1 :]
    return delivered, None


class Path(NamedTuple):
    """
    One implementation of the interface above.
    """

    name: str
    receive: Callable[[socket.socket, int, int, int], tuple[Batch, int, int]]
    read: Callable[
        [socket.socket, int, int, int, Handlers],
        tuple[int, int, int, int, Batch | None],
    ]
    send: Callable[[socket.socket, list[tuple[bytes, Any, Any]], int], tuple[int, int]]
    decodeKey: Callable[[Any], tuple[Any, list[Ancillary], Any]]
    packControl: Callable[[Sequence[Ancillary]], Any]
    packTarget: Callable[[Sequence[Any]], Any]


#: The pure-Python twin; always there.
PLAIN = Path(
    "recvmsg",
    _receiveEach,
    _readEach,
    _sendEach,
    _decodeTupleKey,
    list,
    _tupleTarget,
)

#: The C extension's path, or L{None} where it was not built.
BATCHED: Path | None = None
if _mmsg is not None:
    BATCHED = Path(
        "recvmmsg",
        _mmsg.recv,
        _mmsg.read,
        _mmsg.send,
        _decodeRawKey,
        _packRawControl,
        _packRawTarget,
    )

#: What ports use: the C path unless C{UDPDST_IO=python} or it is not built.
DEFAULT: Path = (
    PLAIN if BATCHED is None or os.environ.get("UDPDST_IO") == "python" else BATCHED
)
IO_PATH = DEFAULT.name

#: The fast path of a port's C{write} in C (C{QueuedWrite} in C{_mmsg.c}),
#: where the C path runs; L{None} otherwise.  C{QueuedWrite(write, peertype,
#: limit)} wraps the Python C{write}: a reply to a C{peertype} address whose
#: C{_reply} is C{(port, outbox, target, control, maxLength)} for this very
#: port, with no other destination named and C{bytes} no longer than
#: C{maxLength}, is appended to C{outbox.queue}, which is flushed as
#: L{Outbox} says; anything else goes to the Python C{write}.
QueuedWrite: Callable[[Callable[..., None], type, int], Any] | None = (
    _mmsg.QueuedWrite if _mmsg is not None and DEFAULT is BATCHED else None
)

_fallbackWarned = False


def warnIfFallback() -> None:
    """
    Warn once per process, when a port starts, that the pure-Python path runs
    because the C extension is missing (not when C{UDPDST_IO=python} chose it).
    """
    global _fallbackWarned
    if (
        _mmsg is None
        and not _fallbackWarned
        and os.environ.get("UDPDST_IO") != "python"
    ):
        _fallbackWarned = True
        # Named after the package, not after whichever frame started the port.
        warnings.warn_explicit(
            "udpdst: the C extension udpdst._mmsg is not built here, so ports "
            "run the slower pure-Python I/O path; install a C compiler and the "
            "Python headers (gcc, python3-dev) and reinstall udpdst, or set "
            "UDPDST_IO=python to choose this path without this warning",
            RuntimeWarning,
            os.path.dirname(__file__),
            0,
        )

/*
 * udpdst._mmsg: batched datagram I/O for udpdst.io (Linux recvmmsg/sendmmsg).
 *
 * Three functions and a type, all for non-blocking sockets, all holding the
 * GIL (the system calls never wait):
 *
 *   recv(sock, count, size, ancsize) -> (batch, drops, nbytes)
 *       Read up to `count` datagrams.  `batch` is a list of
 *       (data, key, flags): `key` is the raw peer sockaddr followed by the raw
 *       control messages, with SO_RXQ_OVFL left out so that the kernel's drop
 *       counter never changes a key; `drops` is the last SO_RXQ_OVFL value
 *       seen in the batch, or -1; `nbytes` the bytes read.  An empty batch
 *       means nothing was queued.  Other errors raise OSError, unless some
 *       datagrams were read first (the kernel then reports the error again on
 *       the next call).
 *
 *   read(sock, count, size, ancsize, handlers)
 *       -> (count, delivered, nbytes, drops, rest)
 *       recv, then hand each datagram to the protocol without building the
 *       batch: the twin of io.dispatch, whose docstring (io.Handlers) says
 *       what `handlers` holds and what is returned.  Of the port it touches
 *       only handlers.outbox (io.Outbox): `reading` and `holdReplies`.
 *
 *   send(sock, items, start) -> (sent, errno)
 *       Send items[start:], each (data, sockaddr, control) of bytes, with as
 *       few sendmmsg calls as the kernel allows.  Stops at the first datagram
 *       that fails: `sent` datagrams went out, and `errno` (0 if none failed)
 *       is that of items[start + sent].  The caller decides about that one and
 *       calls again from the next.  A closed socket is such a failure
 *       (EBADF), not an exception.
 *
 *   QueuedWrite(write, peertype, limit)
 *       The fast path of DestinationPort.write, as a method descriptor that
 *       wraps the Python `write`: a reply to a `peertype` address whose
 *       _reply is (port, outbox, target, control, maxLength) for this port is
 *       appended to outbox.queue as (data, target, control), and
 *       outbox.flush() is called unless outbox.holdReplies is true and the
 *       queue holds fewer than `limit` replies (see io.Outbox).  Anything else
 *       (another address, a destination the address does not carry, a
 *       datagram too long or not bytes, keyword arguments) goes to the Python
 *       `write`, which decides.
 *
 * Everything received is copied out of one cached receive area, so a batch
 * costs no allocation beyond the Python objects it returns.  The area is
 * taken out of the cache for the length of a call: building the batch can
 * run Python code (a collection's finalizers and callbacks, and in them a
 * switch to another thread), which may call recv again; that call then
 * gets an area of its own instead of overwriting this one.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

#include <errno.h>
#include <string.h>
#include <sys/socket.h>
#include <netinet/in.h>

#ifndef SO_RXQ_OVFL
#define SO_RXQ_OVFL 40
#endif

/* The most datagrams one call handles (and the kernel's UIO_MAXIOV bound). */
#define MAX_BATCH 1024
/* Control data larger than this per datagram is refused, not truncated. */
#define MAX_ANC 4096

typedef struct {
    struct sockaddr_in6 name; /* large enough for sockaddr_in too */
} peer_name;

/* Receive state of one call. */
typedef struct {
    char *data;                 /* count * size bytes */
    char *anc;                  /* count * CMSG_ALIGN(ancsize) bytes */
    size_t data_size, anc_size;
    struct mmsghdr msgs[MAX_BATCH];
    struct iovec iov[MAX_BATCH];
    peer_name names[MAX_BATCH];
} rx_area;

/* The area of the last call that finished, kept for the next one; NULL while
 * a call has it (the GIL serialises the take and the give-back, and nothing
 * else). */
static rx_area *rx_cache;

static rx_area *
rx_take(void)
{
    rx_area *area = rx_cache;
    rx_cache = NULL;
    if (area == NULL) {
        area = PyMem_Calloc(1, sizeof(*area));
        if (area == NULL)
            PyErr_NoMemory();
    }
    return area;
}

static void
rx_give_back(rx_area *area)
{
    if (rx_cache == NULL) {
        rx_cache = area;
        return;
    }
    /* A nested call gave its area back first: keep one. */
    PyMem_Free(area->data);
    PyMem_Free(area->anc);
    PyMem_Free(area);
}

/* Grow *buf to at least `need` bytes; 0 on success. */
static int
grow(char **buf, size_t *have, size_t need)
{
    if (need <= *have)
        return 0;
    char *fresh = PyMem_Realloc(*buf, need);
    if (fresh == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    *buf = fresh;
    *have = need;
    return 0;
}

/*
 * The key of one received datagram: its sockaddr, then its control messages
 * minus SO_RXQ_OVFL (whose value goes to *drops).  Each kept message is
 * copied whole and zero-padded to CMSG_ALIGN, so equal messages give equal
 * keys.
 */
static PyObject *
make_key(struct msghdr *hdr, long long *drops)
{
    char out[sizeof(peer_name) + MAX_ANC];
    size_t used = hdr->msg_namelen;

    if (used > sizeof(peer_name))
        used = sizeof(peer_name);
    memcpy(out, hdr->msg_name, used);
    if (hdr->msg_controllen > 0) {
        for (struct cmsghdr *c = CMSG_FIRSTHDR(hdr); c != NULL; c = CMSG_NXTHDR(hdr, c)) {
            if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SO_RXQ_OVFL) {
                /* Left out of the key even when cut short (MSG_CTRUNC), as
                 * io._receiveEach leaves it out. */
                if (c->cmsg_len >= CMSG_LEN(sizeof(uint32_t))) {
                    uint32_t count;
                    memcpy(&count, CMSG_DATA(c), sizeof(count));
                    *drops = count;
                }
                continue;
            }
            /* CMSG_NXTHDR has checked that the header fits; bound the
             * payload by what the kernel filled in as well. */
            size_t len = c->cmsg_len;
            size_t room = hdr->msg_controllen
                          - (size_t)((char *)c - (char *)hdr->msg_control);
            if (len > room)
                len = room;
            size_t padded = CMSG_ALIGN(len);
            if (used + padded > sizeof(out))
                break;
            memcpy(out + used, c, len);
            memset(out + used + len, 0, padded - len);
            used += padded;
        }
    }
    return PyBytes_FromStringAndSize(out, (Py_ssize_t)used);
}

/* The socket's descriptor; a closed socket (fileno() == -1) raises
 * OSError(EBADF), as its own methods do, not ValueError. */
static int
socket_fd(PyObject *sock)
{
    int fd = PyObject_AsFileDescriptor(sock);
    if (fd < 0 && PyErr_ExceptionMatches(PyExc_ValueError)) {
        PyErr_Clear();
        errno = EBADF;
        PyErr_SetFromErrno(PyExc_OSError);
    }
    return fd;
}

/*
 * Fill `rx` with up to `count` datagrams from `fd`: the number read (0 if
 * none was queued), or -1 with an exception set.  Checks the arguments too.
 */
static int
rx_receive(rx_area *rx, int fd, Py_ssize_t count, Py_ssize_t size, Py_ssize_t ancsize)
{
    if (count < 1 || count > MAX_BATCH || size < 0 || ancsize < 0 || ancsize > MAX_ANC) {
        PyErr_SetString(PyExc_ValueError, "recv: count, size or ancsize out of range");
        return -1;
    }
    /* count * size must not wrap (it is used for pointer arithmetic below). */
    if (size > PY_SSIZE_T_MAX / count) {
        PyErr_NoMemory();
        return -1;
    }
    /* Each datagram's control buffer starts cmsghdr-aligned. */
    size_t ancstride = CMSG_ALIGN((size_t)ancsize);
    if (grow(&rx->data, &rx->data_size, (size_t)count * (size_t)(size ? size : 1)) < 0
        || grow(&rx->anc, &rx->anc_size, (size_t)count * (ancstride ? ancstride : 1)) < 0)
        return -1;

    for (Py_ssize_t i = 0; i < count; i++) {
        rx->iov[i].iov_base = rx->data + (size_t)i * (size_t)size;
        rx->iov[i].iov_len = (size_t)size;
        struct msghdr *h = &rx->msgs[i].msg_hdr;
        h->msg_name = &rx->names[i];
        h->msg_namelen = sizeof(peer_name);
        h->msg_iov = &rx->iov[i];
        h->msg_iovlen = 1;
        h->msg_control = ancsize ? rx->anc + (size_t)i * ancstride : NULL;
        h->msg_controllen = (size_t)ancsize;
        h->msg_flags = 0;
        rx->msgs[i].msg_len = 0;
    }

    int got;
    do {
        got = recvmmsg(fd, rx->msgs, (unsigned int)count, MSG_DONTWAIT, NULL);
    } while (got < 0 && errno == EINTR);
    if (got < 0) {
        if (errno != EAGAIN && errno != EWOULDBLOCK) {
            PyErr_SetFromErrno(PyExc_OSError);
            return -1;
        }
        got = 0;
    }
    return got;
}

/* The data of datagram `i` of `rx`, at most `size` bytes (only those are
 * ours, whatever the kernel says it had). */
static PyObject *
rx_data(rx_area *rx, int i, Py_ssize_t size, Py_ssize_t *nbytes)
{
    size_t len = rx->msgs[i].msg_len;
    if (len > (size_t)size)
        len = (size_t)size;
    *nbytes += (Py_ssize_t)len;
    return PyBytes_FromStringAndSize(rx->iov[i].iov_base, (Py_ssize_t)len);
}

/* (data, key, flags) of datagrams first..got-1 of `rx`, as a new list. */
static PyObject *
rx_batch(rx_area *rx, int first, int got, Py_ssize_t size, long long *drops,
         Py_ssize_t *nbytes)
{
    PyObject *batch = PyList_New(got - first);
    if (batch == NULL)
        return NULL;
    for (int i = first; i < got; i++) {
        struct msghdr *h = &rx->msgs[i].msg_hdr;
        PyObject *item = PyTuple_New(3);
        PyObject *flags = item ? PyLong_FromLong(h->msg_flags) : NULL;
        PyObject *data = flags ? rx_data(rx, i, size, nbytes) : NULL;
        PyObject *key = data ? make_key(h, drops) : NULL;
        if (key == NULL) {
            Py_XDECREF(data);
            Py_XDECREF(flags);
            Py_XDECREF(item);
            Py_DECREF(batch);
            return NULL;
        }
        PyTuple_SET_ITEM(item, 0, data);
        PyTuple_SET_ITEM(item, 1, key);
        PyTuple_SET_ITEM(item, 2, flags);
        PyList_SET_ITEM(batch, i - first, item);
    }
    return batch;
}

/*
 * Take a receive area (*rx) and fill it from `sock`: the number read, or -1
 * with an exception set (and the area given back).
 */
static int
rx_start(PyObject *sock, Py_ssize_t count, Py_ssize_t size, Py_ssize_t ancsize, rx_area **rx)
{
    int fd = socket_fd(sock);
    if (fd < 0)
        return -1;
    *rx = rx_take();
    if (*rx == NULL)
        return -1;
    int got = rx_receive(*rx, fd, count, size, ancsize);
    if (got < 0)
        rx_give_back(*rx);
    return got;
}

static PyObject *
mmsg_recv(PyObject *Py_UNUSED(self), PyObject *args)
{
    PyObject *sock;
    Py_ssize_t count, size, ancsize;
    rx_area *rx;

    if (!PyArg_ParseTuple(args, "Onnn:recv", &sock, &count, &size, &ancsize))
        return NULL;
    int got = rx_start(sock, count, size, ancsize, &rx);
    if (got < 0)
        return NULL;
    long long drops = -1;
    Py_ssize_t nbytes = 0;
    PyObject *batch = rx_batch(rx, 0, got, size, &drops, &nbytes);
    rx_give_back(rx);
    return batch ? Py_BuildValue("(NLn)", batch, drops, nbytes) : NULL;
}

/*
 * obj.name, looked up in the instance's own __dict__ first: the attributes
 * this module reads per datagram are plain instance attributes, and going
 * through the type's attribute cache would walk the port's long MRO each
 * time another hot name happened to share the cache slot.  New reference.
 */
static PyObject *
own_attr(PyObject *obj, PyObject *name)
{
    PyObject *dict = PyObject_GenericGetDict(obj, NULL);
    if (dict == NULL) {
        PyErr_Clear();
        return PyObject_GetAttr(obj, name);
    }
    PyObject *value = PyDict_GetItemWithError(dict, name);
    Py_XINCREF(value);
    Py_DECREF(dict);
    if (value == NULL && !PyErr_Occurred())
        return PyObject_GetAttr(obj, name); /* a class attribute, say */
    return value;
}

/* The fields of io.Handlers, in order. */
enum { H_PEERS, H_CLASSIFY, H_DELIVER, H_PEERMAP, H_REMEMBER, H_FAILED, H_OUTBOX, H_SIZE };

/* Attribute names, interned at import. */
static PyObject *str_reading, *str_hold;

/*
 * Hand `data` from `peer` to the protocol (with `dst` if it is
 * destination-aware); an exception it raises goes to handlers.failed.
 * Returns -1 only if that fails too.
 */
static int
deliver_one(PyObject *const *h, PyObject *data, PyObject *peer, PyObject *dst)
{
    PyObject *args[3] = {data, peer, dst};
    PyObject *res;
    if (h[H_PEERMAP] == Py_None) {
        res = PyObject_Vectorcall(h[H_DELIVER], args, 3, NULL);
    } else {
        /* A plain protocol: remember where this peer sent to, for a reply
         * to an address it rebuilds (as io.dispatch does). */
        res = Py_None;
        if (dst != Py_None) {
            PyObject *known = PyDict_GetItemWithError(h[H_PEERMAP], peer);
            if (known != dst)
                res = PyErr_Occurred() ? NULL
                                       : PyObject_CallFunctionObjArgs(h[H_REMEMBER], peer, dst, NULL);
            else
                Py_INCREF(res);
        } else {
            Py_INCREF(res);
        }
        if (res != NULL) {
            Py_DECREF(res);
            res = PyObject_Vectorcall(h[H_DELIVER], args, 2, NULL);
        }
    }
    if (res != NULL) {
        Py_DECREF(res);
        return 0;
    }
#if PY_VERSION_HEX >= 0x030C0000
    PyObject *exc = PyErr_GetRaisedException();
#else
    PyObject *type, *exc, *tb;
    PyErr_Fetch(&type, &exc, &tb);
    PyErr_NormalizeException(&type, &exc, &tb);
    if (tb != NULL)
        PyException_SetTraceback(exc, tb);
    Py_XDECREF(type);
    Py_XDECREF(tb);
#endif
    res = PyObject_CallFunctionObjArgs(h[H_FAILED], peer, exc, NULL);
    Py_XDECREF(exc);
    if (res == NULL)
        return -1;
    Py_DECREF(res);
    return 0;
}

static PyObject *
mmsg_read(PyObject *Py_UNUSED(self), PyObject *args)
{
    PyObject *sock, *handlers;
    Py_ssize_t count, size, ancsize;

    if (!PyArg_ParseTuple(args, "OnnnO!:read", &sock, &count, &size, &ancsize,
                          &PyTuple_Type, &handlers))
        return NULL;
    if (PyTuple_GET_SIZE(handlers) != H_SIZE || !PyDict_Check(PyTuple_GET_ITEM(handlers, H_PEERS))
        || !(PyTuple_GET_ITEM(handlers, H_PEERMAP) == Py_None
             || PyDict_Check(PyTuple_GET_ITEM(handlers, H_PEERMAP)))) {
        PyErr_SetString(PyExc_TypeError, "read: handlers must be an io.Handlers");
        return NULL;
    }
    rx_area *rx;
    int got = rx_start(sock, count, size, ancsize, &rx);
    if (got < 0)
        return NULL;

    /* The tuple holds every handler alive for the whole call. */
    PyObject *const *h = ((PyTupleObject *)handlers)->ob_item;
    long long drops = -1;
    Py_ssize_t nbytes = 0, delivered = 0;
    PyObject *rest = Py_None;
    Py_INCREF(rest);
    /* A batch that emptied the socket ends the pass: the reply to its last
     * datagram is not held (see io.Handlers). */
    int last = got < count ? got - 1 : -1;
    for (int i = 0; i < got; i++) {
        int flags = rx->msgs[i].msg_hdr.msg_flags;
        PyObject *data = rx_data(rx, i, size, &nbytes);
        PyObject *key = data ? make_key(&rx->msgs[i].msg_hdr, &drops) : NULL;
        PyObject *entry = NULL;
        if (key != NULL) {
            /* A cache hit is the whole classification; a miss, or a
             * datagram the kernel flagged, goes to handlers.classify. */
            entry = flags ? NULL : PyDict_GetItemWithError(h[H_PEERS], key);
            if (entry != NULL)
                Py_INCREF(entry); /* the protocol may empty the cache */
            else if (!PyErr_Occurred())
                entry = PyObject_CallFunction(h[H_CLASSIFY], "Oi", key, flags);
        }
        Py_XDECREF(key);
        if (entry == NULL) {
            Py_XDECREF(data);
            goto fail;
        }
        int status = 0, dropped = entry == Py_None;
        if (!dropped) {
            if (!PyTuple_Check(entry) || PyTuple_GET_SIZE(entry) != 2) {
                PyErr_SetString(PyExc_TypeError, "read: classify must give (peer, dst)");
                status = -1;
            } else {
                delivered++;
                if (i == last)
                    status = PyObject_SetAttr(h[H_OUTBOX], str_hold, Py_False);
                if (status == 0)
                    status = deliver_one(h, data, PyTuple_GET_ITEM(entry, 0),
                                         PyTuple_GET_ITEM(entry, 1));
            }
        }
        Py_DECREF(entry);
        Py_DECREF(data);
        if (status < 0)
            goto fail;
        if (dropped)
            continue;
        /* Stop at once when the protocol stopped reading (or the port
         * closed); the rest of the batch goes back to the caller. */
        PyObject *reading = own_attr(h[H_OUTBOX], str_reading);
        int on = reading ? PyObject_IsTrue(reading) : -1;
        Py_XDECREF(reading);
        if (on < 0)
            goto fail;
        if (!on) {
            Py_DECREF(rest);
            rest = rx_batch(rx, i + 1, got, size, &drops, &nbytes);
            if (rest == NULL)
                goto done;
            break;
        }
    }
    rx_give_back(rx);
    return Py_BuildValue("(innLN)", got, delivered, nbytes, drops, rest);
fail:
    Py_DECREF(rest);
done:
    rx_give_back(rx);
    return NULL;
}

/* One bytes item of a send tuple, or NULL with an exception set. */
static const char *
item_bytes(PyObject *tuple, Py_ssize_t index, Py_ssize_t *len)
{
    PyObject *o = PyTuple_GET_ITEM(tuple, index);
    if (!PyBytes_Check(o)) {
        PyErr_SetString(PyExc_TypeError, "send: items are (bytes, bytes, bytes)");
        return NULL;
    }
    *len = PyBytes_GET_SIZE(o);
    return PyBytes_AS_STRING(o);
}

/* Fills *msg and *iov from one item, or returns -1 with an exception set. */
static int
describe(PyObject *t, struct mmsghdr *msg, struct iovec *iov)
{
    Py_ssize_t dlen, alen, clen;
    if (!PyTuple_Check(t) || PyTuple_GET_SIZE(t) != 3) {
        PyErr_SetString(PyExc_TypeError, "send: items are (bytes, bytes, bytes)");
        return -1;
    }
    const char *data = item_bytes(t, 0, &dlen);
    const char *addr = data ? item_bytes(t, 1, &alen) : NULL;
    const char *anc = addr ? item_bytes(t, 2, &clen) : NULL;
    if (anc == NULL)
        return -1;
    if (alen > (Py_ssize_t)sizeof(peer_name) || clen > MAX_ANC) {
        PyErr_SetString(PyExc_ValueError, "send: address or control data too long");
        return -1;
    }
    if (msg == NULL)
        return 0;
    iov->iov_base = (void *)data;
    iov->iov_len = (size_t)dlen;
    memset(msg, 0, sizeof(*msg));
    msg->msg_hdr.msg_name = alen ? (void *)addr : NULL;
    msg->msg_hdr.msg_namelen = (socklen_t)alen;
    msg->msg_hdr.msg_iov = iov;
    msg->msg_hdr.msg_iovlen = 1;
    msg->msg_hdr.msg_control = clen ? (void *)anc : NULL;
    msg->msg_hdr.msg_controllen = (size_t)clen;
    return 0;
}

static PyObject *
mmsg_send(PyObject *Py_UNUSED(self), PyObject *args)
{
    PyObject *sock, *items;
    Py_ssize_t start;
    struct mmsghdr msgs[64];
    struct iovec iov[64];

    if (!PyArg_ParseTuple(args, "OO!n:send", &sock, &PyList_Type, &items, &start))
        return NULL;
    Py_ssize_t total = PyList_GET_SIZE(items);
    if (start < 0 || start > total) {
        PyErr_SetString(PyExc_ValueError, "send: start out of range");
        return NULL;
    }
    int fd = PyObject_AsFileDescriptor(sock);
    if (fd < 0) {
        if (!PyErr_ExceptionMatches(PyExc_ValueError))
            return NULL;
        /* A closed socket (fileno() == -1) fails the first send with EBADF,
         * as sendmsg does in io._sendEach: a failure the caller counts, not
         * an exception that would lose the replies it had queued. */
        PyErr_Clear();
        return Py_BuildValue("(ni)", (Py_ssize_t)0, start < total ? EBADF : 0);
    }
    /* Refuse a bad item before anything is sent: an exception would lose
     * the count of what already went out. */
    for (Py_ssize_t i = start; i < total; i++)
        if (describe(PyList_GET_ITEM(items, i), NULL, NULL) < 0)
            return NULL;

    Py_ssize_t sent = 0;
    int err = 0;
    while (start + sent < total && err == 0) {
        /* Describe up to 64 items; the list holds them alive meanwhile (no
         * Python code runs until the system call returns). */
        int n = 0;
        for (; n < 64 && start + sent + n < total; n++)
            (void)describe(PyList_GET_ITEM(items, start + sent + n), &msgs[n], &iov[n]);
        int done = sendmmsg(fd, msgs, (unsigned int)n, MSG_DONTWAIT);
        if (done < 0) {
            if (errno != EINTR)
                err = errno;
        } else if (done == 0) {
            err = EIO; /* never seen; do not loop on it */
        } else {
            /* A short count means the next one failed; the next call
             * reports why (or sends it, if the trouble has passed). */
            sent += done;
        }
    }
    return Py_BuildValue("(ni)", sent, err);
}

/* QueuedWrite: see the top of this file. */
typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    PyObject *write;    /* the Python method it speeds up */
    PyObject *peertype; /* udpdst.address.PeerAddress */
    Py_ssize_t limit;   /* replies queued before a flush */
} QueuedWrite;

static PyObject *str_reply, *str_destination, *str_queue, *str_flush;

/* 1 if queued, 0 if the Python write must decide, -1 on error. */
static int
queue_reply(QueuedWrite *self, PyObject *port, PyObject *data, PyObject *addr, PyObject *dst)
{
    if (Py_TYPE(addr) != (PyTypeObject *)self->peertype || !PyBytes_CheckExact(data))
        return 0;
    PyObject *reply = own_attr(addr, str_reply);
    if (reply == NULL)
        return -1;
    int fast = PyTuple_Check(reply) && PyTuple_GET_SIZE(reply) == 5
               && PyTuple_GET_ITEM(reply, 0) == port;
    if (fast && dst != Py_None) {
        PyObject *carried = own_attr(addr, str_destination);
        if (carried == NULL) {
            Py_DECREF(reply);
            return -1;
        }
        fast = carried == dst;
        Py_DECREF(carried);
    }
    if (fast) {
        Py_ssize_t most = PyLong_AsSsize_t(PyTuple_GET_ITEM(reply, 4));
        if (most == -1 && PyErr_Occurred()) {
            Py_DECREF(reply);
            return -1;
        }
        fast = PyBytes_GET_SIZE(data) <= most;
    }
    if (!fast) {
        Py_DECREF(reply);
        return 0;
    }
    PyObject *outbox = Py_NewRef(PyTuple_GET_ITEM(reply, 1));
    PyObject *item = PyTuple_Pack(3, data, PyTuple_GET_ITEM(reply, 2), PyTuple_GET_ITEM(reply, 3));
    Py_DECREF(reply);
    if (item == NULL) {
        Py_DECREF(outbox);
        return -1;
    }
    PyObject *queue = own_attr(outbox, str_queue);
    if (queue == NULL || !PyList_Check(queue)) {
        if (queue != NULL)
            PyErr_SetString(PyExc_TypeError, "QueuedWrite: outbox.queue is not a list");
        Py_XDECREF(queue);
        Py_DECREF(item);
        Py_DECREF(outbox);
        return -1;
    }
    int status = PyList_Append(queue, item);
    Py_ssize_t queued = PyList_GET_SIZE(queue);
    Py_DECREF(item);
    Py_DECREF(queue);
    if (status < 0) {
        Py_DECREF(outbox);
        return -1;
    }
    int flush = queued >= self->limit;
    if (!flush) {
        PyObject *hold = own_attr(outbox, str_hold);
        int on = hold ? PyObject_IsTrue(hold) : -1;
        Py_XDECREF(hold);
        if (on < 0) {
            Py_DECREF(outbox);
            return -1;
        }
        flush = !on;
    }
    if (flush) {
        PyObject *res = PyObject_CallMethodNoArgs(outbox, str_flush);
        Py_DECREF(outbox);
        if (res == NULL)
            return -1;
        Py_DECREF(res);
        return 1;
    }
    Py_DECREF(outbox);
    return 1;
}

static PyObject *
qw_vectorcall(PyObject *callable, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    QueuedWrite *self = (QueuedWrite *)callable;
    Py_ssize_t n = PyVectorcall_NARGS(nargsf);
    if (kwnames == NULL && (n == 3 || n == 4)) {
        int done = queue_reply(self, args[0], args[1], args[2], n == 4 ? args[3] : Py_None);
        if (done < 0)
            return NULL;
        if (done)
            Py_RETURN_NONE;
    }
    return PyObject_Vectorcall(self->write, args, nargsf, kwnames);
}

static PyObject *
qw_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    PyObject *write, *peertype;
    Py_ssize_t limit;
    if ((kwargs != NULL && PyDict_GET_SIZE(kwargs) != 0)
        || !PyArg_ParseTuple(args, "OO!n:QueuedWrite", &write, &PyType_Type, &peertype, &limit))
        return NULL;
    if (!PyCallable_Check(write) || limit < 1) {
        PyErr_SetString(PyExc_TypeError, "QueuedWrite(write, peertype, limit)");
        return NULL;
    }
    QueuedWrite *self = (QueuedWrite *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    self->vectorcall = qw_vectorcall;
    self->write = Py_NewRef(write);
    self->peertype = Py_NewRef(peertype);
    self->limit = limit;
    return (PyObject *)self;
}

static int
qw_traverse(QueuedWrite *self, visitproc visit, void *arg)
{
    Py_VISIT(self->write);
    Py_VISIT(self->peertype);
    return 0;
}

static int
qw_clear(QueuedWrite *self)
{
    Py_CLEAR(self->write);
    Py_CLEAR(self->peertype);
    return 0;
}

static void
qw_dealloc(QueuedWrite *self)
{
    PyObject_GC_UnTrack(self);
    qw_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* port.write: a bound method, as for the Python function it wraps. */
static PyObject *
qw_get(PyObject *self, PyObject *obj, PyObject *Py_UNUSED(type))
{
    if (obj == NULL || obj == Py_None)
        return Py_NewRef(self);
    return PyMethod_New(self, obj);
}

/* __doc__, __name__, __qualname__, __module__: those of the wrapped write. */
static PyObject *
qw_forward(QueuedWrite *self, void *name)
{
    return PyObject_GetAttrString(self->write, (const char *)name);
}

static PyGetSetDef qw_getset[] = {
    {"__doc__", (getter)qw_forward, NULL, NULL, "__doc__"},
    {"__name__", (getter)qw_forward, NULL, NULL, "__name__"},
    {"__qualname__", (getter)qw_forward, NULL, NULL, "__qualname__"},
    {"__module__", (getter)qw_forward, NULL, NULL, "__module__"},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyMemberDef qw_members[] = {
    {"__wrapped__", T_OBJECT, offsetof(QueuedWrite, write), READONLY, NULL},
    {NULL, 0, 0, 0, NULL},
};

static PyTypeObject QueuedWrite_Type = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "udpdst._mmsg.QueuedWrite",
    .tp_basicsize = sizeof(QueuedWrite),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL
                | Py_TPFLAGS_METHOD_DESCRIPTOR,
    .tp_doc = "The fast path of DestinationPort.write (see udpdst/_mmsg.c).",
    .tp_new = qw_new,
    .tp_dealloc = (destructor)qw_dealloc,
    .tp_traverse = (traverseproc)qw_traverse,
    .tp_clear = (inquiry)qw_clear,
    .tp_call = PyVectorcall_Call,
    .tp_vectorcall_offset = offsetof(QueuedWrite, vectorcall),
    .tp_descr_get = qw_get,
    .tp_getset = qw_getset,
    .tp_members = qw_members,
};

static PyMethodDef methods[] = {
    {"recv", mmsg_recv, METH_VARARGS,
     "recv(sock, count, size, ancsize) -> ([(data, key, flags)], drops, nbytes)"},
    {"read", mmsg_read, METH_VARARGS,
     "read(sock, count, size, ancsize, handlers) -> (count, delivered, nbytes, drops, rest)"},
    {"send", mmsg_send, METH_VARARGS,
     "send(sock, [(data, sockaddr, control)], start) -> (sent, errno)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "udpdst._mmsg",
    .m_doc = "Batched datagram I/O (recvmmsg/sendmmsg) for udpdst.io.",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC
PyInit__mmsg(void)
{
    static struct { PyObject **name; const char *text; } names[] = {
        {&str_reading, "reading"}, {&str_reply, "_reply"},
        {&str_destination, "destination"}, {&str_queue, "queue"},
        {&str_hold, "holdReplies"}, {&str_flush, "flush"},
    };
    for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++)
        if ((*names[i].name = PyUnicode_InternFromString(names[i].text)) == NULL)
            return NULL;
    if (PyType_Ready(&QueuedWrite_Type) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m != NULL && PyModule_AddObjectRef(m, "QueuedWrite", (PyObject *)&QueuedWrite_Type) < 0)
        Py_CLEAR(m);
    return m;
}

/*
 * udpdst._mmsg: batched datagram I/O for udpdst.io (Linux recvmmsg/sendmmsg).
 *
 * Two functions, both for non-blocking sockets, both holding the GIL (the
 * system calls never wait):
 *
 *   recv(sock, count, size, ancsize) -> (batch, drops, nbytes)
 *       Read up to `count` datagrams.  `batch` is a list of
 *       (data, key, flags): `key` is the raw peer sockaddr followed by the raw
 *       control messages, with SO_RXQ_OVFL left out so that the kernel's drop
 *       counter never changes a key; `drops` is the last SO_RXQ_OVFL value
 *       seen in the batch, or -1; `nbytes` the bytes read.  An empty batch means nothing was queued.
 *       Other errors raise OSError, unless some datagrams were read first (the
 *       kernel then reports the error again on the next call).
 *
 *   send(sock, items, start) -> (sent, errno)
 *       Send items[start:], each (data, sockaddr, control) of bytes, with as
 *       few sendmmsg calls as the kernel allows.  Stops at the first datagram
 *       that fails: `sent` datagrams went out, and `errno` (0 if none failed)
 *       is that of items[start + sent].  The caller decides about that one and
 *       calls again from the next.
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

static PyObject *
mmsg_recv(PyObject *Py_UNUSED(self), PyObject *args)
{
    PyObject *sock;
    Py_ssize_t count, size, ancsize;

    if (!PyArg_ParseTuple(args, "Onnn:recv", &sock, &count, &size, &ancsize))
        return NULL;
    int fd = socket_fd(sock);
    if (fd < 0)
        return NULL;
    if (count < 1 || count > MAX_BATCH || size < 0 || ancsize < 0 || ancsize > MAX_ANC) {
        PyErr_SetString(PyExc_ValueError, "recv: count, size or ancsize out of range");
        return NULL;
    }
    /* count * size must not wrap (it is used for pointer arithmetic below). */
    if (size > PY_SSIZE_T_MAX / count) {
        PyErr_NoMemory();
        return NULL;
    }
    /* Each datagram's control buffer starts cmsghdr-aligned. */
    size_t ancstride = CMSG_ALIGN((size_t)ancsize);

    rx_area *rx = rx_take();
    if (rx == NULL)
        return NULL;
    PyObject *result = NULL;
    if (grow(&rx->data, &rx->data_size, (size_t)count * (size_t)(size ? size : 1)) < 0
        || grow(&rx->anc, &rx->anc_size, (size_t)count * (ancstride ? ancstride : 1)) < 0)
        goto done;

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
            goto done;
        }
        got = 0;
    }

    PyObject *batch = PyList_New(got);
    if (batch == NULL)
        goto done;
    long long drops = -1;
    Py_ssize_t nbytes = 0;
    for (int i = 0; i < got; i++) {
        struct msghdr *h = &rx->msgs[i].msg_hdr;
        size_t len = rx->msgs[i].msg_len;
        if (len > (size_t)size) /* only `size` bytes are ours */
            len = (size_t)size;
        nbytes += (Py_ssize_t)len;
        PyObject *data = PyBytes_FromStringAndSize(rx->iov[i].iov_base, (Py_ssize_t)len);
        PyObject *key = data ? make_key(h, &drops) : NULL;
        PyObject *item = key ? Py_BuildValue("(NNi)", data, key, h->msg_flags) : NULL;
        if (item == NULL) {
            if (key == NULL)
                Py_XDECREF(data);
            Py_DECREF(batch);
            goto done;
        }
        PyList_SET_ITEM(batch, i, item);
    }
    result = Py_BuildValue("(NLn)", batch, drops, nbytes);
done:
    rx_give_back(rx);
    return result;
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
    int fd = socket_fd(sock);
    if (fd < 0)
        return NULL;
    Py_ssize_t total = PyList_GET_SIZE(items);
    if (start < 0 || start > total) {
        PyErr_SetString(PyExc_ValueError, "send: start out of range");
        return NULL;
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

static PyMethodDef methods[] = {
    {"recv", mmsg_recv, METH_VARARGS,
     "recv(sock, count, size, ancsize) -> ([(data, key, flags)], drops, nbytes)"},
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
    return PyModule_Create(&module);
}

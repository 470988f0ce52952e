/*
 * Chain: one popped descriptor chain, as Python sees it: a private copy of its device-readable
 * bytes (or, for a split request, of their head, the rest left in guest memory for pwrite/read)
 * and the host segments of its device-writable part, written as one byte stream; complete()
 * returns it to the driver through the used ring.
 *
 * The bytes the session parses are the copy, read once from guest memory at pop; the segments were
 * translated and bounds-checked then (queue.c). This file must never write a device-readable
 * buffer, nor anything outside the writable segments, nor use a chain after complete().
 */
#include "ninep_wire.h"
#include "virtq.h"

#include <string.h>

typedef struct {
    PyObject_HEAD
    VirtQueueObject *queue;
    MemTableObject *mem;   /* keeps the segments mapped even if the memory table changes */
    PyObject *request;     /* bytes: the device-readable part, copied once */
    struct iovec *w;       /* device-writable segments */
    int nw;
    struct iovec *r;       /* device-readable segments, kept only when the request was split */
    int nr;
    uint64_t readable;     /* total device-readable bytes (== len(request) unless split) */
    uint64_t capacity;
    uint16_t head;
    uint8_t done, busy;
} ChainObject;

static void chain_dealloc(ChainObject *self)
{
    if (self->queue && !self->done)
        self->queue->inflight--;
    Py_XDECREF(self->queue);
    Py_XDECREF(self->mem);
    Py_XDECREF(self->request);
    PyMem_RawFree(self->w);
    PyMem_RawFree(self->r);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* The Chain for the walk of `head` (chain_new in virtq.h). */
PyObject *chain_new(VirtQueueObject *q, uint16_t head, vq_segs *rd, vq_segs *wr)
{
    ChainObject *c = PyObject_New(ChainObject, &ChainType);
    if (c == NULL)
        goto fail;
    c->queue = NULL;
    c->mem = NULL;
    c->w = NULL;
    c->nw = 0;
    c->done = c->busy = 0;
    c->r = NULL;
    c->nr = 0;
    c->head = head;
    c->capacity = wr->total;
    c->readable = rd->total;
    /* ---- zero-copy writes: copy the header once, decide from the private copy ---- */
    uint8_t first[NINEP_HEADER];
    uint64_t copy = rd->total;
    if (q->split_type >= 0 && rd->total > q->split_min && rd->total >= NINEP_HEADER) {
        segs_copy(rd, 0, first, NINEP_HEADER);
        if (first[4] == (uint8_t)q->split_type)
            copy = q->split_head;
    }
    c->request = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)copy);
    if (c->request == NULL)
        goto fail;
    if (copy < rd->total) {
        /* Split: the 9P header comes from `first` (read once), the rest of the head after. */
        memcpy(PyBytes_AS_STRING(c->request), first, NINEP_HEADER);
        segs_copy(rd, NINEP_HEADER, (uint8_t *)PyBytes_AS_STRING(c->request) + NINEP_HEADER, copy - NINEP_HEADER);
        c->r = rd->v;
        c->nr = rd->n;
        rd->v = NULL;
    } else {
        segs_copy(rd, 0, (uint8_t *)PyBytes_AS_STRING(c->request), rd->total);
    }
    /* ---- end zero-copy writes ---- */
    PyMem_RawFree(rd->v);
    rd->v = NULL;
    c->w = wr->v;
    c->nw = wr->n;
    wr->v = NULL;
    Py_INCREF(q);
    c->queue = q;
    Py_INCREF(q->mem);
    c->mem = q->mem;
    return (PyObject *)c;
fail:
    PyMem_RawFree(rd->v);
    rd->v = NULL;
    if (c != NULL) {
        c->w = NULL;
        Py_DECREF(c);
    }
    PyMem_RawFree(wr->v);
    wr->v = NULL;
    return NULL;
}

static int chain_check(ChainObject *c)
{
    if (c->done) {
        PyErr_SetString(PyExc_RuntimeError, "chain already completed");
        return -1;
    }
    if (c->busy) {
        PyErr_SetString(PyExc_RuntimeError, "chain busy in another thread");
        return -1;
    }
    return 0;
}

/* write(parts, offset=0) -> int: scatter the buffers, in order, into the writable part. */
static PyObject *chain_write(ChainObject *c, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"parts", "offset", NULL};
    PyObject *parts;
    unsigned long long offset = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O|K", kwlist, &parts, &offset))
        return NULL;
    if (chain_check(c) < 0)
        return NULL;
    PyObject *fast = PySequence_Fast(parts, "parts must be a sequence of buffers");
    if (fast == NULL)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(fast);
    Py_buffer *views = PyMem_Calloc((size_t)(n ? n : 1), sizeof(Py_buffer));
    Py_ssize_t got = 0;
    uint64_t total = 0;
    PyObject *result = NULL;
    if (views == NULL) {
        PyErr_NoMemory();
        goto out;
    }
    for (; got < n; got++) {
        if (PyObject_GetBuffer(PySequence_Fast_GET_ITEM(fast, got), &views[got], PyBUF_SIMPLE) < 0)
            goto out;
        total += (uint64_t)views[got].len;
    }
    if (!ring_in_bounds(offset, total, c->capacity)) {
        PyErr_Format(PyExc_ValueError, "reply of %llu bytes at %llu does not fit the %llu-byte buffer",
                     (unsigned long long)total, offset, (unsigned long long)c->capacity);
        goto out;
    }
    uint64_t pos = offset;
    vq_segs out = {c->w, c->nw, c->nw, c->capacity};
    for (Py_ssize_t k = 0; k < n; k++) {
        segs_put(&out, pos, views[k].buf, (uint64_t)views[k].len);
        pos += (uint64_t)views[k].len;
    }
    result = PyLong_FromUnsignedLongLong(total);
out:
    for (Py_ssize_t k = 0; k < got; k++)
        PyBuffer_Release(&views[k]);
    PyMem_Free(views);
    Py_DECREF(fast);
    return result;
}

/*
 * pread(fd, offset, count, skip=11, nowait=False) -> int: reads up to `count` bytes of file `fd`
 * at `offset` straight into the writable part after its first `skip` bytes (the Rread header
 * area), with the GIL released. Returns the bytes read; raises OSError if nothing could be read.
 * With nowait, one preadv2(RWF_NOWAIT) takes only what is cached (BlockingIOError if nothing).
 */
static PyObject *chain_pread(ChainObject *c, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"fd", "offset", "count", "skip", "nowait", NULL};
    int fd, nowait = 0;
    unsigned long long offset, count, skip = NINEP_IO_REPLY_HEADER;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "iKK|Kp", kwlist, &fd, &offset, &count, &skip, &nowait))
        return NULL;
    if (chain_check(c) < 0)
        return NULL;
    if (skip > c->capacity) {
        PyErr_SetString(PyExc_ValueError, "header area larger than the reply buffer");
        return NULL;
    }
    if (count > c->capacity - skip)
        count = c->capacity - skip;
    struct iovec *iov = PyMem_Malloc(sizeof(*iov) * (size_t)(c->nw ? c->nw : 1));
    if (iov == NULL)
        return PyErr_NoMemory();
    int cnt = segs_slice(c->w, c->nw, skip, count, iov);
    ssize_t n;
    c->busy = 1;
    if (nowait) {
        /* Page-cache hits only: quick enough to run on the event loop's thread. */
        n = ring_preadv_nowait(fd, iov, cnt, offset);
    } else {
        Py_BEGIN_ALLOW_THREADS
        n = ring_preadv_all(fd, iov, cnt, offset);
        Py_END_ALLOW_THREADS
    }
    c->busy = 0;
    PyMem_Free(iov);
    return ring_io_result(n);
}

/* Checks [start, start+count) against the readable stream of a split chain. */
static int chain_readable_range(ChainObject *c, unsigned long long start, unsigned long long count)
{
    if (c->r == NULL) {
        PyErr_SetString(PyExc_ValueError, "the request was copied whole; nothing is left in guest memory");
        return -1;
    }
    if (!ring_in_bounds(start, count, c->readable)) {
        PyErr_Format(PyExc_ValueError, "range %llu+%llu outside the %llu readable bytes", start, count,
                     (unsigned long long)c->readable);
        return -1;
    }
    return 0;
}

/*
 * pwrite(fd, offset, start, count) -> int: writes bytes [start, start+count) of a split request
 * from guest memory to file `fd` at `offset` with pwritev, the GIL released. The addresses were
 * translated and checked once at pop; the guest may change the bytes meanwhile (its own data).
 */
static PyObject *chain_pwrite(ChainObject *c, PyObject *args)
{
    int fd;
    unsigned long long offset, start, count;
    if (!PyArg_ParseTuple(args, "iKKK", &fd, &offset, &start, &count))
        return NULL;
    if (chain_check(c) < 0 || chain_readable_range(c, start, count) < 0)
        return NULL;
    struct iovec *iov = PyMem_Malloc(sizeof(*iov) * (size_t)c->nr);
    if (iov == NULL)
        return PyErr_NoMemory();
    int cnt = segs_slice(c->r, c->nr, start, count, iov);
    ssize_t n;
    c->busy = 1;
    Py_BEGIN_ALLOW_THREADS
    n = ring_pwritev_all(fd, iov, cnt, offset);
    Py_END_ALLOW_THREADS
    c->busy = 0;
    PyMem_Free(iov);
    return ring_io_result(n);
}

/* read(start, count) -> bytes: a private copy of bytes [start, start+count) of a split request. */
static PyObject *chain_read(ChainObject *c, PyObject *args)
{
    unsigned long long start, count;
    if (!PyArg_ParseTuple(args, "KK", &start, &count))
        return NULL;
    if (chain_check(c) < 0 || chain_readable_range(c, start, count) < 0)
        return NULL;
    PyObject *out = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)count);
    if (out == NULL)
        return NULL;
    vq_segs view = {c->r, c->nr, c->nr, c->readable};
    segs_copy(&view, start, (uint8_t *)PyBytes_AS_STRING(out), count);
    return out;
}

/* complete(length) -> bool: return the chain to the driver with used.len = length; True when
 * the driver asked to be interrupted. A stopped queue drops the completion (returns False). */
static PyObject *chain_complete(ChainObject *c, PyObject *arg)
{
    unsigned long long len;
    if (!PyArg_Parse(arg, "K", &len))
        return NULL;
    if (chain_check(c) < 0)
        return NULL;
    if (len > c->capacity) {
        PyErr_SetString(PyExc_ValueError, "used length larger than the writable part");
        return NULL;
    }
    VirtQueueObject *q = c->queue;
    c->done = 1;
    q->inflight--;
    if (q->stopped || q->broken)
        Py_RETURN_FALSE;
    return PyBool_FromLong(vq_push(q, c->head, (uint32_t)len));
}

static PyObject *chain_get_request(ChainObject *c, void *Py_UNUSED(x)) { return Py_NewRef(c->request); }
static PyObject *chain_get_capacity(ChainObject *c, void *Py_UNUSED(x)) { return PyLong_FromUnsignedLongLong(c->capacity); }
static PyObject *chain_get_head(ChainObject *c, void *Py_UNUSED(x)) { return PyLong_FromLong(c->head); }
static PyObject *chain_get_done(ChainObject *c, void *Py_UNUSED(x)) { return PyBool_FromLong(c->done); }
static PyObject *chain_get_segments(ChainObject *c, void *Py_UNUSED(x)) { return PyLong_FromLong(c->nw); }
static PyObject *chain_get_readable(ChainObject *c, void *Py_UNUSED(x)) { return PyLong_FromUnsignedLongLong(c->readable); }
static PyObject *chain_get_split(ChainObject *c, void *Py_UNUSED(x)) { return PyBool_FromLong(c->r != NULL); }

static PyGetSetDef chain_getset[] = {
    {"request", (getter)chain_get_request, NULL, "private copy of the device-readable bytes", NULL},
    {"capacity", (getter)chain_get_capacity, NULL, "total device-writable bytes", NULL},
    {"head", (getter)chain_get_head, NULL, "head descriptor index", NULL},
    {"done", (getter)chain_get_done, NULL, "completed", NULL},
    {"segments", (getter)chain_get_segments, NULL, "number of writable host segments", NULL},
    {"readable", (getter)chain_get_readable, NULL, "total device-readable bytes (more than len(request) if split)", NULL},
    {"split", (getter)chain_get_split, NULL, "only the head of the request was copied (see VirtQueue.set_split)", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyMethodDef chain_methods[] = {
    {"write", (PyCFunction)(void (*)(void))chain_write, METH_VARARGS | METH_KEYWORDS,
     "write(parts, offset=0) -> int: scatter buffers into the writable part."},
    {"pread", (PyCFunction)(void (*)(void))chain_pread, METH_VARARGS | METH_KEYWORDS,
     "pread(fd, offset, count, skip=11, nowait=False) -> int: preadv from a file into the writable part."},
    {"pwrite", (PyCFunction)chain_pwrite, METH_VARARGS,
     "pwrite(fd, offset, start, count) -> int: pwritev bytes [start, start+count) of a split request to a file."},
    {"read", (PyCFunction)chain_read, METH_VARARGS,
     "read(start, count) -> bytes: private copy of bytes [start, start+count) of a split request."},
    {"complete", (PyCFunction)chain_complete, METH_O, "complete(length) -> bool: push to the used ring; True = notify."},
    {NULL, NULL, 0, NULL},
};

PyTypeObject ChainType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "transports._ring.Chain",
    .tp_doc = "One popped descriptor chain (made by VirtQueue.pop).",
    .tp_basicsize = sizeof(ChainObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_dealloc = (destructor)chain_dealloc,
    .tp_methods = chain_methods,
    .tp_getset = chain_getset,
};

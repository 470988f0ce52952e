/*
 * Xen 9pfs ring data path (transports._ring part "xen").
 *
 * Layout (xen/include/public/io/9pfs.h + ring.h, DEFINE_XEN_FLEX_RING_AND_INTF): the interface
 * page holds in_cons@0, in_prod@4, out_cons@64, out_prod@68, ring_order@128, ref[]@132, all
 * little-endian u32. The data area is 2^order pages: "in" = [0, S) carries responses
 * (backend -> frontend), "out" = [S, 2S) carries requests, S = 2^(order+11).
 *
 * XenRing is one end of one ring. The same code serves both ends: the backend consumes "out" and
 * produces "in", the frontend the reverse. Each end keeps its own index (the consumer index it
 * owns, the producer index it owns) privately and only ever *writes* it to shared memory; the
 * peer's index is read once per call, checked (distance <= S) and then used. Messages are copied
 * out whole into private memory; the size that frames a message is the one read the first time
 * (a peer rewriting the header afterwards cannot change the framing). Responses are written whole
 * before the producer index moves (wmb before prod).
 *
 * GrantMap maps a list of page numbers ("grant refs") of a shared memfd contiguously, as
 * xengnttab_map_domain_grant_refs does for real grants.
 *
 * This file must never dereference shared memory outside the buffers it holds, nor parse a
 * message in place.
 */
#define _GNU_SOURCE
#include "ninep_wire.h"
#include "ring.h"
#include <errno.h>

#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#define XEN_PAGE 4096u
#define XEN_MAX_ORDER 9u
#define OFF_IN_CONS 0
#define OFF_IN_PROD 4
#define OFF_OUT_CONS 64
#define OFF_OUT_PROD 68

static PyObject *RingError;

/* ------------------------------------------------------------------------------------------ */
/* GrantMap */

typedef struct {
    PyObject_HEAD
    char *base;
    size_t len;
    Py_ssize_t exports;
    PyObject *unmap; /* NULL: munmap; else called as unmap(address, length) (real Xen) */
} GrantMap;

static int grantmap_unmap(GrantMap *self)
{
    int rc = 0;
    if (self->base != NULL) {
        if (self->unmap != NULL) {
            PyObject *r = PyObject_CallFunction(self->unmap, "Kn", (unsigned long long)(uintptr_t)self->base,
                                                (Py_ssize_t)self->len);
            if (r == NULL)
                rc = -1;
            Py_XDECREF(r);
        } else {
            munmap(self->base, self->len);
        }
        self->base = NULL;
        self->len = 0;
    }
    Py_CLEAR(self->unmap);
    return rc;
}

static void grantmap_dealloc(GrantMap *self)
{
    if (grantmap_unmap(self) < 0)
        PyErr_WriteUnraisable((PyObject *)self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int grantmap_getbuffer(GrantMap *self, Py_buffer *view, int flags)
{
    if (self->base == NULL) {
        PyErr_SetString(PyExc_ValueError, "grant mapping is closed");
        view->obj = NULL;
        return -1;
    }
    if (PyBuffer_FillInfo(view, (PyObject *)self, self->base, (Py_ssize_t)self->len, 0, flags) < 0)
        return -1;
    self->exports++;
    return 0;
}

static void grantmap_releasebuffer(GrantMap *self, Py_buffer *Py_UNUSED(view))
{
    self->exports--;
}

static PyObject *grantmap_close(GrantMap *self, PyObject *Py_UNUSED(ignored))
{
    if (self->exports > 0) {
        PyErr_SetString(PyExc_BufferError, "grant mapping still has exported buffers");
        return NULL;
    }
    if (grantmap_unmap(self) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *grantmap_len_get(GrantMap *self, void *Py_UNUSED(closure))
{
    return PyLong_FromSize_t(self->len);
}

static PyObject *grantmap_closed_get(GrantMap *self, void *Py_UNUSED(closure))
{
    return PyBool_FromLong(self->base == NULL);
}

static PyBufferProcs grantmap_as_buffer = {
    (getbufferproc)grantmap_getbuffer,
    (releasebufferproc)grantmap_releasebuffer,
};

static PyMethodDef grantmap_methods[] = {
    {"close", (PyCFunction)grantmap_close, METH_NOARGS,
     "Unmap the pages (refused while a memoryview of the mapping is alive)."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef grantmap_getset[] = {
    {"size", (getter)grantmap_len_get, NULL, "mapped length in bytes", NULL},
    {"closed", (getter)grantmap_closed_get, NULL, "True once unmapped", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject GrantMapType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "transports._ring.GrantMap",
    .tp_basicsize = sizeof(GrantMap),
    .tp_dealloc = (destructor)grantmap_dealloc,
    .tp_as_buffer = &grantmap_as_buffer,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Pages of a shared memfd mapped contiguously (an emulated grant mapping).",
    .tp_methods = grantmap_methods,
    .tp_getset = grantmap_getset,
};

/* xen_map_grants(fd, refs) -> GrantMap: maps page `ref` of `fd` at slot i, for each i. */
static PyObject *xen_map_grants(PyObject *Py_UNUSED(module), PyObject *args)
{
    int fd;
    PyObject *refs_obj;
    if (!PyArg_ParseTuple(args, "iO:xen_map_grants", &fd, &refs_obj))
        return NULL;
    PyObject *refs = PySequence_Fast(refs_obj, "refs must be a sequence of ints");
    if (refs == NULL)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(refs);
    if (n <= 0 || n > 4096) {
        Py_DECREF(refs);
        PyErr_SetString(PyExc_ValueError, "number of refs out of range");
        return NULL;
    }
    struct stat st;
    if (fstat(fd, &st) < 0) {
        Py_DECREF(refs);
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    uint64_t npages = (uint64_t)st.st_size / XEN_PAGE;
    size_t len = (size_t)n * XEN_PAGE;
    char *base = mmap(NULL, len, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (base == MAP_FAILED) {
        Py_DECREF(refs);
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        unsigned long long ref = PyLong_AsUnsignedLongLong(PySequence_Fast_GET_ITEM(refs, i));
        if (ref == (unsigned long long)-1 && PyErr_Occurred())
            goto fail;
        if (ref >= npages) {
            PyErr_Format(PyExc_ValueError, "grant ref %llu out of range (%llu pages)", ref,
                         (unsigned long long)npages);
            goto fail;
        }
        void *p = mmap(base + (size_t)i * XEN_PAGE, XEN_PAGE, PROT_READ | PROT_WRITE,
                       MAP_SHARED | MAP_FIXED, fd, (off_t)(ref * XEN_PAGE));
        if (p == MAP_FAILED) {
            PyErr_SetFromErrno(PyExc_OSError);
            goto fail;
        }
    }
    Py_DECREF(refs);
    GrantMap *gm = PyObject_New(GrantMap, &GrantMapType);
    if (gm == NULL) {
        munmap(base, len);
        return NULL;
    }
    gm->base = base;
    gm->len = len;
    gm->exports = 0;
    gm->unmap = NULL;
    return (PyObject *)gm;
fail:
    Py_DECREF(refs);
    munmap(base, len);
    return NULL;
}

/*
 * xen_wrap_mapping(address, length, unmap) -> GrantMap: memory someone else mapped (a real
 * xengnttab mapping), with the same export accounting; close() calls unmap(address, length).
 */
static PyObject *xen_wrap_mapping(PyObject *Py_UNUSED(module), PyObject *args)
{
    unsigned long long addr;
    Py_ssize_t len;
    PyObject *unmap;
    if (!PyArg_ParseTuple(args, "KnO:xen_wrap_mapping", &addr, &len, &unmap))
        return NULL;
    if (addr == 0 || len <= 0 || len % XEN_PAGE != 0 || !PyCallable_Check(unmap)) {
        PyErr_SetString(PyExc_ValueError, "need a non-NULL page-multiple mapping and a callable");
        return NULL;
    }
    GrantMap *gm = PyObject_New(GrantMap, &GrantMapType);
    if (gm == NULL)
        return NULL;
    gm->base = (char *)(uintptr_t)addr;
    gm->len = (size_t)len;
    gm->exports = 0;
    gm->unmap = Py_NewRef(unmap);
    return (PyObject *)gm;
}

/* ------------------------------------------------------------------------------------------ */
/* XenRing */

typedef struct {
    PyObject_HEAD
    Py_buffer intf;
    Py_buffer data;
    int have_bufs;
    uint32_t size; /* S: bytes per direction, a power of two */
    int frontend;
    /* consumer half: data offset and the two indices in the interface page */
    size_t c_data, c_cons, c_prod;
    /* producer half */
    size_t p_data, p_cons, p_prod;
    uint32_t cons;    /* our consumer index (authoritative; shared copy only written) */
    uint32_t prod;    /* our producer index (authoritative) */
    uint32_t pending; /* framed size of a message whose header was read, 0 if none */
    int broken;
    int busy; /* a producer operation runs with the GIL released */
    uint32_t staged; /* bytes written by put_pread(publish=False), not yet published */
} XenRing;

static void xenring_release(XenRing *self)
{
    if (self->have_bufs) {
        PyBuffer_Release(&self->intf);
        PyBuffer_Release(&self->data);
        self->have_bufs = 0;
    }
}

static void xenring_dealloc(XenRing *self)
{
    xenring_release(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int xenring_init(XenRing *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"intf", "data", "order", "frontend", NULL};
    Py_buffer intf, data;
    unsigned int order;
    int frontend = 0;
    if (self->have_bufs) {
        PyErr_SetString(PyExc_RuntimeError, "XenRing already initialised");
        return -1;
    }
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "w*w*I|p:XenRing", kwlist, &intf, &data, &order,
                                     &frontend))
        return -1;
    if (order < 1 || order > XEN_MAX_ORDER) {
        PyErr_Format(PyExc_ValueError, "ring order %u out of range 1..%u", order, XEN_MAX_ORDER);
        goto fail;
    }
    if (intf.len < (Py_ssize_t)XEN_PAGE) {
        PyErr_SetString(PyExc_ValueError, "interface page must be 4096 bytes");
        goto fail;
    }
    uint64_t s = 1ull << (order + 11);
    if ((uint64_t)data.len < 2 * s) {
        PyErr_Format(PyExc_ValueError, "data area of %zd bytes is smaller than 2^%u pages",
                     data.len, order);
        goto fail;
    }
    self->intf = intf;
    self->data = data;
    self->have_bufs = 1;
    self->size = (uint32_t)s;
    self->frontend = frontend;
    if (frontend) {
        self->c_data = 0;
        self->c_cons = OFF_IN_CONS;
        self->c_prod = OFF_IN_PROD;
        self->p_data = s;
        self->p_cons = OFF_OUT_CONS;
        self->p_prod = OFF_OUT_PROD;
    } else {
        self->c_data = s;
        self->c_cons = OFF_OUT_CONS;
        self->c_prod = OFF_OUT_PROD;
        self->p_data = 0;
        self->p_cons = OFF_IN_CONS;
        self->p_prod = OFF_IN_PROD;
    }
    char *ip = (char *)intf.buf;
    /* Start from where the ring is now (zero for a fresh ring); read once each. */
    self->cons = ring_load32(ip + self->c_cons);
    self->prod = ring_load32(ip + self->p_prod);
    self->pending = 0;
    self->broken = 0;
    self->busy = 0;
    self->staged = 0;
    return 0;
fail:
    PyBuffer_Release(&intf);
    PyBuffer_Release(&data);
    return -1;
}

static int xenring_check(XenRing *self)
{
    if (!self->have_bufs) {
        PyErr_SetString(PyExc_ValueError, "ring is closed");
        return -1;
    }
    if (self->broken) {
        PyErr_SetString(RingError, "ring is broken (peer violated the protocol)");
        return -1;
    }
    return 0;
}

static PyObject *xenring_fail(XenRing *self, const char *fmt, unsigned long a, unsigned long b)
{
    self->broken = 1;
    PyErr_Format(RingError, fmt, a, b);
    return NULL;
}

/* Copy len bytes starting at ring position pos of half `half` into dst, with one wrap split. */
static void ring_copy_out(const XenRing *self, size_t half, uint32_t pos, char *dst, uint32_t len)
{
    const char *base = (const char *)self->data.buf + half;
    uint32_t first = self->size - pos;
    if (first >= len) {
        memcpy(dst, base + pos, len);
    } else {
        memcpy(dst, base + pos, first);
        memcpy(dst + first, base, len - first);
    }
}

static void ring_copy_in(XenRing *self, size_t half, uint32_t pos, const char *src, uint32_t len)
{
    char *base = (char *)self->data.buf + half;
    uint32_t first = self->size - pos;
    if (first >= len) {
        memcpy(base + pos, src, len);
    } else {
        memcpy(base + pos, src, first);
        memcpy(base, src + first, len - first);
    }
}

/* take(limit) -> bytes | None */
static PyObject *xenring_take(XenRing *self, PyObject *arg)
{
    if (xenring_check(self) < 0)
        return NULL;
    unsigned long limit = PyLong_AsUnsignedLong(arg);
    if (limit == (unsigned long)-1 && PyErr_Occurred())
        return NULL;
    const char *ip = (const char *)self->intf.buf;
    uint32_t prod = ring_load32(ip + self->c_prod);
    ring_rmb();
    uint32_t queued = prod - self->cons;
    if (queued > self->size)
        return xenring_fail(self, "producer index moved by %lu bytes, more than the ring (%lu)",
                            (unsigned long)queued, (unsigned long)self->size);
    uint32_t mask = self->size - 1;
    if (self->pending == 0) {
        if (queued < NINEP_HEADER)
            Py_RETURN_NONE;
        unsigned char hdr[4];
        ring_copy_out(self, self->c_data, self->cons & mask, (char *)hdr, 4);
        uint32_t sz = (uint32_t)hdr[0] | ((uint32_t)hdr[1] << 8) | ((uint32_t)hdr[2] << 16) |
                      ((uint32_t)hdr[3] << 24);
        if (sz < NINEP_HEADER || sz > self->size || sz > limit)
            return xenring_fail(self, "message size %lu out of range (limit %lu)",
                                (unsigned long)sz,
                                (unsigned long)(limit < self->size ? limit : self->size));
        self->pending = sz;
    }
    uint32_t sz = self->pending;
    if (queued < sz)
        Py_RETURN_NONE;
    PyObject *out = PyBytes_FromStringAndSize(NULL, sz);
    if (out == NULL)
        return NULL;
    char *dst = PyBytes_AS_STRING(out);
    ring_copy_out(self, self->c_data, self->cons & mask, dst, sz);
    /* Frame by the size read first: the private copy says what we acted on. */
    dst[0] = (char)(sz & 0xff);
    dst[1] = (char)((sz >> 8) & 0xff);
    dst[2] = (char)((sz >> 16) & 0xff);
    dst[3] = (char)((sz >> 24) & 0xff);
    ring_mb();
    self->cons += sz;
    self->pending = 0;
    ring_store32((char *)self->intf.buf + self->c_cons, self->cons);
    return out;
}

/* Free bytes in the producer half, or (uint64)-1 with RingError set if the peer's index is bad. */
static int64_t xenring_free(XenRing *self)
{
    const char *ip = (const char *)self->intf.buf;
    uint32_t cons = ring_load32(ip + self->p_cons);
    ring_mb();
    uint32_t used = self->prod - cons;
    if (used > self->size) {
        xenring_fail(self, "consumer index is %lu bytes behind our producer (ring %lu)",
                     (unsigned long)used, (unsigned long)self->size);
        return -1;
    }
    return (int64_t)(self->size - used);
}

/* put(parts) -> bool: writes the concatenation of parts as one message if it fits now. */
static PyObject *xenring_put(XenRing *self, PyObject *parts_obj)
{
    if (xenring_check(self) < 0)
        return NULL;
    if (self->busy || self->staged) {
        PyErr_SetString(PyExc_RuntimeError, "concurrent producer operation on a ring");
        return NULL;
    }
    PyObject *parts = PySequence_Fast(parts_obj, "parts must be a sequence of buffers");
    if (parts == NULL)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(parts);
    if (n > 64) {
        Py_DECREF(parts);
        PyErr_SetString(PyExc_ValueError, "too many parts");
        return NULL;
    }
    Py_buffer bufs[64];
    Py_ssize_t got = 0;
    uint64_t total = 0;
    PyObject *result = NULL;
    for (; got < n; got++) {
        if (PyObject_GetBuffer(PySequence_Fast_GET_ITEM(parts, got), &bufs[got], PyBUF_SIMPLE) < 0)
            goto out;
        total += (uint64_t)bufs[got].len;
    }
    if (total < NINEP_HEADER || total > self->size) {
        PyErr_Format(PyExc_ValueError, "message of %llu bytes does not fit a ring of %lu",
                     (unsigned long long)total, (unsigned long)self->size);
        goto out;
    }
    int64_t free_ = xenring_free(self);
    if (free_ < 0)
        goto out;
    if ((uint64_t)free_ < total) {
        result = Py_NewRef(Py_False);
        goto out;
    }
    uint32_t mask = self->size - 1;
    uint32_t pos = self->prod & mask;
    for (Py_ssize_t i = 0; i < n; i++) {
        uint32_t len = (uint32_t)bufs[i].len;
        if (len == 0)
            continue;
        ring_copy_in(self, self->p_data, pos, (const char *)bufs[i].buf, len);
        pos = (pos + len) & mask;
    }
    ring_wmb();
    self->prod += (uint32_t)total;
    ring_store32((char *)self->intf.buf + self->p_prod, self->prod);
    result = Py_NewRef(Py_True);
out:
    for (Py_ssize_t i = 0; i < got; i++)
        PyBuffer_Release(&bufs[i]);
    Py_DECREF(parts);
    return result;
}

/*
 * put_pread(tag, fd, offset, count, publish=True, nowait=False) -> int | None: an Rread whose data comes
 * straight from the file into the ring. None when 11+count bytes are not free yet. Raises OSError
 * before anything becomes visible to the peer if the read fails. With publish=False the message
 * is written but the producer index does not move until publish() (so a caller that read in a
 * worker thread makes the reply visible from its own thread, in order with its bookkeeping).
 */
static PyObject *xenring_put_pread(XenRing *self, PyObject *args)
{
    unsigned int tag, count;
    int fd;
    long long offset;
    int publish = 1, nowait = 0;
    if (!PyArg_ParseTuple(args, "IiLI|pp:put_pread", &tag, &fd, &offset, &count, &publish, &nowait))
        return NULL;
    if (xenring_check(self) < 0)
        return NULL;
    if (self->busy || self->staged) {
        PyErr_SetString(PyExc_RuntimeError, "concurrent producer operation on a ring");
        return NULL;
    }
    if (tag > 0xffff || offset < 0) {
        PyErr_SetString(PyExc_ValueError, "bad tag or offset");
        return NULL;
    }
    uint64_t total = (uint64_t)NINEP_IO_REPLY_HEADER + count;
    if (total > self->size) {
        PyErr_Format(PyExc_ValueError, "Rread of %llu bytes does not fit a ring of %lu",
                     (unsigned long long)total, (unsigned long)self->size);
        return NULL;
    }
    int64_t free_ = xenring_free(self);
    if (free_ < 0)
        return NULL;
    if ((uint64_t)free_ < total)
        Py_RETURN_NONE;
    uint32_t mask = self->size - 1;
    uint32_t start = self->prod & mask;
    uint32_t dpos = (start + NINEP_IO_REPLY_HEADER) & mask;
    char *half = (char *)self->data.buf + self->p_data;
    struct iovec iov[2];
    int iovcnt = 0;
    if (count > 0) {
        uint32_t first = self->size - dpos;
        iov[0].iov_base = half + dpos;
        if (first >= count) {
            iov[0].iov_len = count;
            iovcnt = 1;
        } else {
            iov[0].iov_len = first;
            iov[1].iov_base = half;
            iov[1].iov_len = count - first;
            iovcnt = 2;
        }
    }
    Py_ssize_t got = 0;
    if (iovcnt > 0 && nowait) {
        /* Only what the page cache holds, never blocking on I/O: EAGAIN (nothing cached) or
         * EOPNOTSUPP (filesystem without RWF_NOWAIT) tell the caller to read in a thread. A
         * short read is a valid short Rread. */
        ssize_t n = ring_preadv_nowait(fd, iov, iovcnt, (uint64_t)offset);
        if (n < 0) {
            errno = (int)-n;
            return PyErr_SetFromErrno(PyExc_OSError);
        }
        got = (Py_ssize_t)n;
    } else if (iovcnt > 0) {
        self->busy = 1; /* the buffers stay exported by us, so the memory stays mapped */
        ssize_t moved;
        Py_BEGIN_ALLOW_THREADS
        moved = ring_preadv_all(fd, iov, iovcnt, offset);
        Py_END_ALLOW_THREADS
        self->busy = 0;
        if (moved < 0) {
            errno = (int)-moved;
            return PyErr_SetFromErrno(PyExc_OSError);
        }
        got = (Py_ssize_t)moved;
    }
    uint32_t n = (uint32_t)got;
    uint32_t size = NINEP_IO_REPLY_HEADER + n;
    unsigned char hdr[NINEP_IO_REPLY_HEADER] = {
        (unsigned char)(size & 0xff), (unsigned char)((size >> 8) & 0xff),
        (unsigned char)((size >> 16) & 0xff), (unsigned char)(size >> 24), NINEP_RREAD,
        (unsigned char)(tag & 0xff), (unsigned char)(tag >> 8),
        (unsigned char)(n & 0xff), (unsigned char)((n >> 8) & 0xff),
        (unsigned char)((n >> 16) & 0xff), (unsigned char)(n >> 24),
    };
    ring_copy_in(self, self->p_data, start, (const char *)hdr, NINEP_IO_REPLY_HEADER);
    if (!publish) {
        self->staged = size;
        return PyLong_FromUnsignedLong(n);
    }
    ring_wmb();
    self->prod += size;
    ring_store32((char *)self->intf.buf + self->p_prod, self->prod);
    return PyLong_FromUnsignedLong(n);
}

/* publish(): make a put_pread(publish=False) message visible. */
static PyObject *xenring_publish(XenRing *self, PyObject *Py_UNUSED(ignored))
{
    if (xenring_check(self) < 0)
        return NULL;
    if (self->busy || self->staged == 0) {
        PyErr_SetString(PyExc_RuntimeError, "nothing staged");
        return NULL;
    }
    ring_wmb();
    self->prod += self->staged;
    self->staged = 0;
    ring_store32((char *)self->intf.buf + self->p_prod, self->prod);
    Py_RETURN_NONE;
}

static PyObject *xenring_free_space(XenRing *self, PyObject *Py_UNUSED(ignored))
{
    if (xenring_check(self) < 0)
        return NULL;
    int64_t f = xenring_free(self);
    if (f < 0)
        return NULL;
    return PyLong_FromLongLong(f);
}

/* has_input() -> bool: at least a header's worth (or the pending message) is queued. */
static PyObject *xenring_has_input(XenRing *self, PyObject *Py_UNUSED(ignored))
{
    if (xenring_check(self) < 0)
        return NULL;
    uint32_t prod = ring_load32((const char *)self->intf.buf + self->c_prod);
    uint32_t queued = prod - self->cons;
    if (queued > self->size)
        return xenring_fail(self, "producer index moved by %lu bytes, more than the ring (%lu)",
                            (unsigned long)queued, (unsigned long)self->size);
    uint32_t need = self->pending ? self->pending : NINEP_HEADER;
    return PyBool_FromLong(queued >= need);
}

/* peek() -> (queued, peer_prod): unvalidated snapshot of the consumer half, for deciding whether
 * the peer may be waiting for room (take() does the checking). */
static PyObject *xenring_peek(XenRing *self, PyObject *Py_UNUSED(ignored))
{
    if (!self->have_bufs) {
        PyErr_SetString(PyExc_ValueError, "ring is closed");
        return NULL;
    }
    uint32_t prod = ring_load32((const char *)self->intf.buf + self->c_prod);
    return Py_BuildValue("(kk)", (unsigned long)(uint32_t)(prod - self->cons), (unsigned long)prod);
}

static PyObject *xenring_close(XenRing *self, PyObject *Py_UNUSED(ignored))
{
    if (self->busy) {
        PyErr_SetString(PyExc_RuntimeError, "ring busy");
        return NULL;
    }
    xenring_release(self);
    Py_RETURN_NONE;
}

static PyObject *xenring_size_get(XenRing *self, void *Py_UNUSED(c))
{
    return PyLong_FromUnsignedLong(self->size);
}

static PyObject *xenring_broken_get(XenRing *self, void *Py_UNUSED(c))
{
    return PyBool_FromLong(self->broken);
}

static PyObject *xenring_indices_get(XenRing *self, void *Py_UNUSED(c))
{
    return Py_BuildValue("(kk)", (unsigned long)self->cons, (unsigned long)self->prod);
}

static PyMethodDef xenring_methods[] = {
    {"take", (PyCFunction)xenring_take, METH_O,
     "take(limit) -> bytes | None: the next whole message copied out of the ring, or None if "
     "it has not fully arrived. RingError if the peer broke the protocol (the ring is then "
     "unusable)."},
    {"put", (PyCFunction)xenring_put, METH_O,
     "put(parts) -> bool: write one whole message if it fits now (False: wait for space)."},
    {"put_pread", (PyCFunction)xenring_put_pread, METH_VARARGS,
     "put_pread(tag, fd, offset, count) -> int | None: Rread straight from fd into the ring."},
    {"publish", (PyCFunction)xenring_publish, METH_NOARGS,
     "publish(): move the producer index past a message staged by put_pread(publish=False)."},
    {"free_space", (PyCFunction)xenring_free_space, METH_NOARGS, "free bytes for our messages"},
    {"has_input", (PyCFunction)xenring_has_input, METH_NOARGS,
     "True if take() may make progress."},
    {"peek", (PyCFunction)xenring_peek, METH_NOARGS,
     "peek() -> (queued, peer_prod): unvalidated snapshot of the half we consume."},
    {"close", (PyCFunction)xenring_close, METH_NOARGS, "release the mappings"},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef xenring_getset[] = {
    {"size", (getter)xenring_size_get, NULL, "bytes per direction (S)", NULL},
    {"broken", (getter)xenring_broken_get, NULL, "True after a protocol violation", NULL},
    {"indices", (getter)xenring_indices_get, NULL, "(our consumer, our producer) index", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject XenRingType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "transports._ring.XenRing",
    .tp_basicsize = sizeof(XenRing),
    .tp_dealloc = (destructor)xenring_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "XenRing(intf, data, order, frontend=False): one end of a Xen 9pfs ring.",
    .tp_methods = xenring_methods,
    .tp_getset = xenring_getset,
    .tp_init = (initproc)xenring_init,
    .tp_new = PyType_GenericNew,
};

PyMethodDef ring_xen_methods[] = {
    {"xen_map_grants", (PyCFunction)xen_map_grants, METH_VARARGS,
     "xen_map_grants(fd, refs) -> GrantMap: pages refs[i] of fd mapped contiguously."},
    {"xen_wrap_mapping", (PyCFunction)xen_wrap_mapping, METH_VARARGS,
     "xen_wrap_mapping(address, length, unmap) -> GrantMap over memory mapped elsewhere."},
    {NULL, NULL, 0, NULL},
};

int ring_xen_init(PyObject *module)
{
    if (PyType_Ready(&GrantMapType) < 0 || PyType_Ready(&XenRingType) < 0)
        return -1;
    RingError = PyErr_NewException("transports._ring.XenRingError", PyExc_ValueError, NULL);
    if (RingError == NULL)
        return -1;
    if (PyModule_AddObjectRef(module, "XenRingError", RingError) < 0 ||
        PyModule_AddObjectRef(module, "XenRing", (PyObject *)&XenRingType) < 0 ||
        PyModule_AddObjectRef(module, "GrantMap", (PyObject *)&GrantMapType) < 0)
        return -1;
    return 0;
}

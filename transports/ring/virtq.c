/*
 * Device side of a virtio split virtqueue (virtio 1.x, split-ring.tex) over guest memory shared
 * by a VMM (vhost-user) or by the in-process test front-end.
 *
 * Types:
 *   MemTable  - the guest memory regions, mmapped from the fds the VMM passed. Unmapped only when
 *               the last reference goes, so a chain popped before a memory-table change stays
 *               valid until it is completed.
 *   VirtQueue - one queue: ring addresses translated once, last_avail/used shadows, EVENT_IDX.
 *   Chain     - one popped descriptor chain: a private copy of its device-readable bytes and the
 *               host segments of its device-writable part, written as one byte stream.
 *
 * The driver is hostile. Every ring index and descriptor field is read once into a local (see
 * ring.h), checked, then used; guest addresses are translated with overflow-safe bounds checks;
 * loops, over-long chains, nested or misplaced INDIRECT, readable-after-writable and avail.idx
 * jumps larger than the queue mark the queue broken (VirtqError) instead of being served.
 * This file must never write a device-readable buffer or any memory outside a mapped region.
 */
#include "virtq.h"

#include <endian.h>
#include <stdarg.h>
#include <errno.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <poll.h>
#include <sched.h>
#include <time.h>

static PyObject *VirtqError;

/* ------------------------------------------------------------------------------------------ */
/* MemTable                                                                                    */

static void memtable_dealloc(MemTableObject *self)
{
    for (int i = 0; i < self->nregions; i++)
        munmap(self->regions[i].map_base, self->regions[i].map_len);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int memtable_init(MemTableObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"regions", NULL};
    PyObject *seq;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O", kwlist, &seq))
        return -1;
    if (self->nregions) {
        PyErr_SetString(PyExc_RuntimeError, "MemTable already initialised");
        return -1;
    }
    PyObject *fast = PySequence_Fast(seq, "regions must be a sequence of (fd, gpa, size, uva, mmap_offset)");
    if (fast == NULL)
        return -1;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(fast);
    if (n < 1 || n > VQ_MAX_REGIONS) {
        PyErr_Format(PyExc_ValueError, "between 1 and %d memory regions expected", VQ_MAX_REGIONS);
        goto fail;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        int fd;
        unsigned long long gpa, size, uva, off;
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(fast, i), "iKKKK", &fd, &gpa, &size, &uva, &off))
            goto fail;
        if (size == 0 || gpa + size < gpa || uva + size < uva || off + size < off || off + size > SIZE_MAX ||
            (off & 4095) != 0) {
            PyErr_Format(PyExc_ValueError, "memory region %zd has an invalid size or offset", i);
            goto fail;
        }
        /* Mapping beyond the end of the file would turn a guest access into SIGBUS. */
        struct stat st;
        if (fstat(fd, &st) < 0) {
            PyErr_SetFromErrno(PyExc_OSError);
            goto fail;
        }
        if (S_ISREG(st.st_mode) && (uint64_t)st.st_size < off + size) {
            PyErr_Format(PyExc_ValueError, "memory region %zd extends past the end of its file", i);
            goto fail;
        }
        for (int j = 0; j < self->nregions; j++) {
            vq_region *r = &self->regions[j];
            if (gpa < r->gpa + r->size && r->gpa < gpa + size) {
                PyErr_Format(PyExc_ValueError, "memory region %zd overlaps region %d", i, j);
                goto fail;
            }
        }
        size_t len = (size_t)(off + size);
        void *base = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
        if (base == MAP_FAILED) {
            PyErr_SetFromErrno(PyExc_OSError);
            goto fail;
        }
        vq_region *r = &self->regions[self->nregions++];
        r->gpa = gpa;
        r->size = size;
        r->uva = uva;
        r->map_base = base;
        r->map_len = len;
        r->host = (uint8_t *)base + off;
    }
    Py_DECREF(fast);
    return 0;
fail:
    Py_DECREF(fast);
    for (int i = 0; i < self->nregions; i++)
        munmap(self->regions[i].map_base, self->regions[i].map_len);
    self->nregions = 0;
    return -1;
}

/* Host pointer of [addr, addr+len) when it lies inside one region (by gpa, or by VMM address). */
static uint8_t *mem_contig(const MemTableObject *m, uint64_t addr, uint64_t len, int by_uva)
{
    for (int i = 0; i < m->nregions; i++) {
        const vq_region *r = &m->regions[i];
        uint64_t base = by_uva ? r->uva : r->gpa;
        if (addr < base)
            continue;
        uint64_t off = addr - base;
        if (ring_in_bounds(off, len, r->size))
            return r->host + off;
    }
    return NULL;
}

/* Region holding guest-physical `gpa` (at least one byte), and how many bytes remain in it. */
static uint8_t *mem_at(const MemTableObject *m, uint64_t gpa, uint64_t *avail)
{
    for (int i = 0; i < m->nregions; i++) {
        const vq_region *r = &m->regions[i];
        if (gpa >= r->gpa && gpa - r->gpa < r->size) {
            *avail = r->size - (gpa - r->gpa);
            return r->host + (gpa - r->gpa);
        }
    }
    return NULL;
}

static PyTypeObject MemTableType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "transports._ring.MemTable",
    .tp_doc = "MemTable(regions): guest memory mapped from (fd, gpa, size, uva, mmap_offset) tuples. "
              "The fds stay owned by the caller.",
    .tp_basicsize = sizeof(MemTableObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)memtable_init,
    .tp_dealloc = (destructor)memtable_dealloc,
};

/* ------------------------------------------------------------------------------------------ */
/* VirtQueue                                                                                   */

static PyTypeObject VirtQueueType;

static int vq_ready(VirtQueueObject *q)
{
    if (q->mem == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "VirtQueue not initialised");
        return 0;
    }
    return 1;
}

static PyObject *vq_fail(VirtQueueObject *q, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    q->broken = 1;
    PyErr_FormatV(VirtqError, fmt, ap);
    va_end(ap);
    return NULL;
}

/* Records why a GIL-free walk failed; the caller turns it into VirtqError (vq_walk_failed). */
__attribute__((format(printf, 2, 3))) static void vq_why(VirtQueueObject *q, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(q->why, sizeof(q->why), fmt, ap);
    va_end(ap);
}

/* The exception for a failed vq_walk (rc -1: the ring is broken; -2: out of memory). */
static PyObject *vq_walk_failed(VirtQueueObject *q, int rc)
{
    if (rc == -2)
        return PyErr_NoMemory();
    return vq_fail(q, "%s", q->why);
}

/* Translates the three ring areas of `q` through `mem`; 0 on success, -1 with VirtqError. */
static int vq_map(VirtQueueObject *q, MemTableObject *mem, uint64_t desc, uint64_t avail, uint64_t used, int by_uva)
{
    uint64_t n = q->num;
    if ((desc & 15) || (avail & 1) || (used & 3)) {
        PyErr_SetString(VirtqError, "misaligned ring address");
        return -1;
    }
    uint8_t *d = mem_contig(mem, desc, 16 * n, by_uva);
    uint8_t *a = mem_contig(mem, avail, 6 + 2 * n, by_uva);
    uint8_t *u = mem_contig(mem, used, 6 + 8 * n, by_uva);
    if (d == NULL || a == NULL || u == NULL) {
        PyErr_SetString(VirtqError, "ring address outside guest memory");
        return -1;
    }
    Py_INCREF(mem);
    Py_XSETREF(q->mem, mem);
    q->desc = d;
    q->avail = a;
    q->used = u;
    return 0;
}

static int vq_init(VirtQueueObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"mem", "num", "desc", "avail", "used", "by_uva", "event_idx",
                             "indirect", "last_avail", "max_request", NULL};
    MemTableObject *mem;
    unsigned int num;
    unsigned long long desc, avail, used, max_request = 16u << 20;
    int by_uva = 1, event_idx = 0, indirect = 0;
    unsigned int last_avail = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O!IKKK|$pppIK", kwlist, &MemTableType, &mem, &num, &desc,
                                     &avail, &used, &by_uva, &event_idx, &indirect, &last_avail, &max_request))
        return -1;
    if (self->mem != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "VirtQueue already initialised");
        return -1;
    }
    if (num == 0 || num > VQ_MAX_SIZE || (num & (num - 1)) != 0) {
        PyErr_SetString(PyExc_ValueError, "queue size must be a power of two up to 32768");
        return -1;
    }
    if (last_avail > 0xFFFF) {
        PyErr_SetString(PyExc_ValueError, "last_avail must fit 16 bits");
        return -1;
    }
    self->num = num;
    self->event_idx = (uint8_t)event_idx;
    self->indirect = (uint8_t)indirect;
    self->last_avail = (uint16_t)last_avail;
    self->max_request = max_request;
    self->split_type = -1;
    vq_direct_init(self);
    if (vq_map(self, mem, desc, avail, used, by_uva) < 0)
        return -1;
    /* The used index continues from wherever the ring is (it survives a back-end restart). */
    self->used_idx = le16toh(ring_load16(self->used + 2));
    return 0;
}

static void vq_dealloc(VirtQueueObject *self)
{
    vq_direct_free(self);
    Py_XDECREF(self->mem);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* remap(mem, desc, avail, used, by_uva=True): follow a memory-table change; shadows are kept. */
static PyObject *vq_remap(VirtQueueObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"mem", "desc", "avail", "used", "by_uva", NULL};
    MemTableObject *mem;
    unsigned long long desc, avail, used;
    int by_uva = 1;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O!KKK|p", kwlist, &MemTableType, &mem, &desc, &avail, &used,
                                     &by_uva))
        return NULL;
    if (!vq_ready(self))
        return NULL;
    if (vq_map(self, mem, desc, avail, used, by_uva) < 0) {
        self->broken = 1;
        return NULL;
    }
    Py_RETURN_NONE;
}

typedef struct {
    uint64_t addr;
    uint32_t len;
    uint16_t flags, next;
} vq_desc;

static inline void vq_read_desc(const uint8_t *table, uint32_t i, vq_desc *d)
{
    const uint8_t *p = table + 16 * (size_t)i;
    d->addr = le64toh(ring_load64(p));
    d->len = le32toh(ring_load32(p + 8));
    d->flags = le16toh(ring_load16(p + 12));
    d->next = le16toh(ring_load16(p + 14));
}

static int segs_push(vq_segs *s, uint8_t *p, uint64_t len)
{
    if (s->n == s->cap) {
        int cap = s->cap ? s->cap * 2 : 16;
        struct iovec *v = PyMem_RawRealloc(s->v, sizeof(*v) * (size_t)cap);
        if (v == NULL)
            return -2;
        s->v = v;
        s->cap = cap;
    }
    s->v[s->n].iov_base = p;
    s->v[s->n].iov_len = (size_t)len;
    s->n++;
    s->total += len;
    return 0;
}

/* Appends the host segments of guest buffer [addr, addr+len), split at region boundaries. */
static int segs_add(VirtQueueObject *q, vq_segs *s, uint64_t addr, uint32_t len)
{
    uint64_t left = len;
    if (addr + left < addr) {
        vq_why(q, "descriptor address wraps around");
        return -1;
    }
    while (left) {
        uint64_t room;
        uint8_t *p = mem_at(q->mem, addr, &room);
        if (p == NULL) {
            vq_why(q, "descriptor buffer 0x%llx+%u outside guest memory", (unsigned long long)addr, len);
            return -1;
        }
        uint64_t take = left < room ? left : room;
        int rc = segs_push(s, p, take);
        if (rc < 0)
            return rc;
        addr += take;
        left -= take;
    }
    return 0;
}

/* ------------------------------------------------------------------------------------------ */
/* Chain                                                                                       */

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

static PyTypeObject ChainType;

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

/* Walks the chain starting at `head` (see virtq.h: GIL-free, errors in q->why). */
int vq_walk(VirtQueueObject *q, uint16_t head, vq_segs *rd, vq_segs *wr)
{
    const uint8_t *table = q->desc;
    uint32_t limit = q->num, count = 0, i = head;
    int in_indirect = 0;
    vq_desc d;
    if (i >= q->num) {
        vq_why(q, "head index %u out of range", i);
        return -1;
    }
    vq_read_desc(table, i, &d);
    if (d.flags & VRING_DESC_F_INDIRECT) {
        if (!q->indirect) {
            vq_why(q, "INDIRECT descriptor without the feature");
            return -1;
        }
        if (d.flags & VRING_DESC_F_NEXT) {
            vq_why(q, "INDIRECT descriptor with NEXT");
            return -1;
        }
        if (d.len == 0 || d.len % 16 || d.len / 16 > VQ_MAX_INDIRECT || (d.addr & 7)) {
            vq_why(q, "bad indirect table (len %u)", d.len);
            return -1;
        }
        table = mem_contig(q->mem, d.addr, d.len, 0);
        if (table == NULL) {
            vq_why(q, "indirect table outside guest memory");
            return -1;
        }
        limit = d.len / 16;
        in_indirect = 1;
        i = 0;
        vq_read_desc(table, i, &d);
    }
    for (;;) {
        if (++count > limit) {
            vq_why(q, "descriptor chain loops or is longer than its table");
            return -1;
        }
        if (d.flags & VRING_DESC_F_INDIRECT) {
            vq_why(q, in_indirect ? "INDIRECT inside an indirect table" : "INDIRECT in the middle of a chain");
            return -1;
        }
        if (d.flags & VRING_DESC_F_WRITE) {
            int rc = segs_add(q, wr, d.addr, d.len);
            if (rc < 0)
                return rc;
            if (wr->total > UINT32_MAX) {
                vq_why(q, "writable part larger than 4 GiB");
                return -1;
            }
        } else {
            if (wr->n > 0 || wr->total > 0) {
                vq_why(q, "device-readable descriptor after a writable one");
                return -1;
            }
            int rc = segs_add(q, rd, d.addr, d.len);
            if (rc < 0)
                return rc;
            if (rd->total > q->max_request) {
                vq_why(q, "request larger than %llu bytes", (unsigned long long)q->max_request);
                return -1;
            }
        }
        if (!(d.flags & VRING_DESC_F_NEXT))
            return 0;
        i = d.next;
        if (i >= limit) {
            vq_why(q, "next index %u out of range", i);
            return -1;
        }
        vq_read_desc(table, i, &d);
    }
}

static inline uint16_t *vq_avail_event(VirtQueueObject *q) { return (uint16_t *)(q->used + 4 + 8 * (size_t)q->num); }
static inline uint16_t *vq_used_event(VirtQueueObject *q) { return (uint16_t *)(q->avail + 4 + 2 * (size_t)q->num); }

/* Asks the driver (EVENT_IDX) to kick at its next buffer, then looks again so a buffer added
 * meanwhile is not missed; returns avail.idx as read after that. */
static uint16_t vq_arm_kick(VirtQueueObject *q)
{
    ring_store16(vq_avail_event(q), htole16(q->last_avail));
    ring_mb();
    return le16toh(ring_load16(q->avail + 2));
}

/* pop(arm=True) -> Chain | None: the next available chain, or None when the driver has queued
 * nothing; then, with EVENT_IDX and `arm`, the driver is asked to kick at its next buffer (a caller
 * about to poll() passes False: a kick it would not need costs the guest an exit). */
static PyObject *vq_pop(VirtQueueObject *q, PyObject *const *args, Py_ssize_t nargs)
{
    int arm = 1;
    if (nargs > 1) {
        PyErr_SetString(PyExc_TypeError, "pop() takes at most one argument");
        return NULL;
    }
    if (nargs == 1 && (arm = PyObject_IsTrue(args[0])) < 0)
        return NULL;
    if (!vq_ready(q))
        return NULL;
    if (q->broken)
        return vq_fail(q, "queue is broken");
    if (q->stopped)
        Py_RETURN_NONE;
    if (q->ndirect > 0) {
        int more;
        vq_direct_serve(q, 1, VQ_DIRECT_BATCH, &more);
    }
    uint16_t avail_idx = le16toh(ring_load16(q->avail + 2));
    if (avail_idx == q->last_avail) {
        if (!q->event_idx || !arm)
            Py_RETURN_NONE;
        avail_idx = vq_arm_kick(q);
        if (avail_idx == q->last_avail)
            Py_RETURN_NONE;
    }
    uint16_t head;
    if (vq_next_head(q, avail_idx, &head) < 0)
        return vq_fail(q, "avail.idx moved by %u, more than the queue size %u",
                       (unsigned)(uint16_t)(avail_idx - q->last_avail), q->num);

    vq_segs rd = {0}, wr = {0};
    ChainObject *c = NULL;
    int rc = vq_walk(q, head, &rd, &wr);
    if (rc < 0) {
        vq_walk_failed(q, rc);
        goto fail;
    }
    c = PyObject_New(ChainObject, &ChainType);
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
    c->capacity = wr.total;
    c->readable = rd.total;
    /* ---- zero-copy writes: copy the header once, decide from the private copy ---- */
    uint8_t first[7];
    uint64_t copy = rd.total;
    if (q->split_type >= 0 && rd.total > q->split_min && rd.total >= 7) {
        segs_copy(&rd, 0, first, 7);
        if (first[4] == (uint8_t)q->split_type)
            copy = q->split_head;
    }
    c->request = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)copy);
    if (c->request == NULL)
        goto fail;
    if (copy < rd.total) {
        /* Split: the first 7 bytes come from `first` (read once), the rest of the head after. */
        memcpy(PyBytes_AS_STRING(c->request), first, 7);
        segs_copy(&rd, 7, (uint8_t *)PyBytes_AS_STRING(c->request) + 7, copy - 7);
        c->r = rd.v;
        c->nr = rd.n;
        rd.v = NULL;
    } else {
        segs_copy(&rd, 0, (uint8_t *)PyBytes_AS_STRING(c->request), rd.total);
    }
    /* ---- end zero-copy writes ---- */
    PyMem_RawFree(rd.v);
    c->w = wr.v;
    c->nw = wr.n;
    Py_INCREF(q);
    c->queue = q;
    Py_INCREF(q->mem);
    c->mem = q->mem;
    q->inflight++;
    q->last_avail++;
    q->declined = -1;
    /* avail_event is left where the last empty pop put it: while the device keeps popping, the
     * driver need not kick (a kick per request costs the guest an exit and us a wakeup). The pop
     * that finds the ring empty asks for the next kick and looks again, so none is missed. */
    return (PyObject *)c;
fail:
    PyMem_RawFree(rd.v);
    if (c != NULL) {
        c->w = NULL;
        Py_DECREF(c);
    }
    PyMem_RawFree(wr.v);
    return NULL;
}

/* Publishes one used element (virtq.h). */
int vq_push(VirtQueueObject *q, uint16_t head, uint32_t len)
{
    uint8_t *elem = q->used + 4 + 8 * (size_t)(q->used_idx % q->num);
    ring_store32(elem, htole32(head));
    ring_store32(elem + 4, htole32(len));
    ring_wmb(); /* len before used.idx */
    q->used_idx++;
    ring_store16(q->used + 2, htole16(q->used_idx));
    ring_mb(); /* used.idx visible before reading the driver's suppression state */
    if (!q->event_idx)
        return !(le16toh(ring_load16(q->avail)) & VRING_AVAIL_F_NO_INTERRUPT);
    uint16_t event = le16toh(ring_load16(vq_used_event(q)));
    uint16_t old = q->signalled_used, new_ = q->used_idx;
    int valid = q->signalled_valid;
    q->signalled_used = new_;
    q->signalled_valid = 1;
    return !valid || (uint16_t)(new_ - event - 1) < (uint16_t)(new_ - old);
}

uint64_t vq_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* poll(budget_ns, fd=-1) -> bool: whether the driver made a buffer available within budget_ns,
 * watched by spinning on avail.idx with the GIL released, without a kick: while it spins the
 * driver is asked not to kick (EVENT_IDX), and when it gives up the next buffer is asked to kick
 * again, exactly as an empty pop() leaves it. A readable `fd` (the event loop's own epoll fd:
 * other work is waiting) ends the spin early; other threads of this CPU get it every 2 µs. Only
 * the thread that pops may call it: the ring's mapping cannot change under it while the caller is
 * busy here. */
static PyObject *vq_poll(VirtQueueObject *q, PyObject *args)
{
    unsigned long long budget;
    int fd = -1;
    if (!PyArg_ParseTuple(args, "K|i", &budget, &fd))
        return NULL;
    if (!vq_ready(q))
        return NULL;
    if (q->broken || q->stopped)
        Py_RETURN_FALSE;
    uint16_t last = q->last_avail;
    if (le16toh(ring_load16(q->avail + 2)) != last)
        Py_RETURN_TRUE;
    if (q->event_idx) {
        ring_store16(vq_avail_event(q), htole16((uint16_t)(last - 1)));
        ring_mb();
    }
    int found = 0;
    Py_BEGIN_ALLOW_THREADS
    uint64_t start = vq_now_ns(), next_check = start + 2000;
    /* Direct I/O restarts the window, but the event loop gets control back at least this often:
     * its timers do not make its epoll fd readable. */
    uint64_t end = start + (budget > VQ_POLL_MAX_NS ? budget : VQ_POLL_MAX_NS);
    for (;;) {
        if (le16toh(ring_load16(q->avail + 2)) != last) {
            int more = 1;
            if (q->ndirect > 0 && vq_direct_serve(q, 0, VQ_DIRECT_BATCH, &more) > 0 && !more) {
                /* Served here, and the device is idle again: the window starts over. */
                last = q->last_avail;
                start = vq_now_ns();
                if (start < end)
                    continue;
                break;
            }
            found = 1;
            break;
        }
        __builtin_ia32_pause();
        uint64_t now = vq_now_ns();
        if (now - start >= budget || now >= end)
            break;
        if (now >= next_check) {
            if (fd >= 0) {
                struct pollfd p = {.fd = fd, .events = POLLIN, .revents = 0};
                if (poll(&p, 1, 0) > 0)
                    break;
            }
            /* A thread woken on this CPU runs now, not when the scheduler preempts the spin: it
             * is often the VMM's thread that must deliver our last reply's interrupt (measured:
             * it waited 33 µs on average behind the spin). Returns at once when none is waiting. */
            sched_yield();
            next_check = now + 2000;
        }
    }
    Py_END_ALLOW_THREADS
    /* Found: the kick stays suppressed (the driver may be reading avail_event right now for the
     * buffer just seen; the pops that follow keep it so, and the next empty pop arms it). Not
     * found: ask for a kick at the next buffer, then look once more for one added meanwhile. */
    if (!found && q->event_idx)
        found = vq_arm_kick(q) != last;
    return PyBool_FromLong(found);
}

/* stop(): no more pops; completions of chains still in flight are dropped. Returns last_avail. */
static PyObject *vq_stop(VirtQueueObject *q, PyObject *Py_UNUSED(ignored))
{
    if (!vq_ready(q))
        return NULL;
    q->stopped = 1;
    vq_direct_clear(q);
    return PyLong_FromUnsignedLong(q->last_avail);
}

/* set_split(msgtype, head, minimum): see the split_* fields; msgtype -1 turns splitting off. */
static PyObject *vq_set_split(VirtQueueObject *q, PyObject *args)
{
    int type;
    unsigned int head, minimum;
    if (!PyArg_ParseTuple(args, "iII", &type, &head, &minimum))
        return NULL;
    if (type < -1 || type > 255 || (type >= 0 && (head < 7 || head > minimum))) {
        PyErr_SetString(PyExc_ValueError, "set_split needs -1 <= msgtype <= 255 and 7 <= head <= minimum");
        return NULL;
    }
    q->split_type = type;
    q->split_head = head;
    q->split_min = minimum;
    Py_RETURN_NONE;
}

/* mark_broken(reason): the Python side found the chain unusable (e.g. no room for a header). */
static PyObject *vq_mark_broken(VirtQueueObject *q, PyObject *arg)
{
    q->broken = 1;
    PyErr_SetObject(VirtqError, arg);
    return NULL;
}

static PyObject *vq_get_last_avail(VirtQueueObject *q, void *Py_UNUSED(c)) { return PyLong_FromLong(q->last_avail); }
static PyObject *vq_get_used_idx(VirtQueueObject *q, void *Py_UNUSED(c)) { return PyLong_FromLong(q->used_idx); }
static PyObject *vq_get_broken(VirtQueueObject *q, void *Py_UNUSED(c)) { return PyBool_FromLong(q->broken); }
static PyObject *vq_get_num(VirtQueueObject *q, void *Py_UNUSED(c)) { return PyLong_FromUnsignedLong(q->num); }
static PyObject *vq_get_inflight(VirtQueueObject *q, void *Py_UNUSED(c)) { return PyLong_FromUnsignedLongLong(q->inflight); }

static PyGetSetDef vq_getset[] = {
    {"last_avail", (getter)vq_get_last_avail, NULL, "next avail index the device will read", NULL},
    {"used_idx", (getter)vq_get_used_idx, NULL, "next used index the device will write", NULL},
    {"broken", (getter)vq_get_broken, NULL, "the driver broke the ring rules; needs a reset", NULL},
    {"num", (getter)vq_get_num, NULL, "queue size", NULL},
    {"inflight", (getter)vq_get_inflight, NULL, "chains popped and not completed", NULL},
    {"direct_served", (getter)vq_get_direct_served, NULL, "requests served by direct I/O so far", NULL},
    {"direct_last_ns", (getter)vq_get_direct_last_ns, NULL,
     "CLOCK_MONOTONIC ns (time.perf_counter_ns) when direct I/O last completed a request", NULL},
    {"direct_notified", (getter)vq_get_direct_notified, NULL, "interrupts sent by direct I/O so far", NULL},
    {"direct_fids", (getter)vq_get_direct_fids, NULL, "fids registered for direct I/O", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyMethodDef vq_methods[] = {
    {"pop", (PyCFunction)(void (*)(void))vq_pop, METH_FASTCALL,
     "pop(arm=True): next available Chain, or None (with arm, the driver is asked to kick at its next "
     "buffer); Tread/Twrite on direct fids before it are served here. Raises VirtqError if the ring is broken."},
    {"remap", (PyCFunction)(void (*)(void))vq_remap, METH_VARARGS | METH_KEYWORDS,
     "Follow a memory-table change: remap(mem, desc, avail, used, by_uva=True)."},
    {"poll", (PyCFunction)vq_poll, METH_VARARGS,
     "poll(budget_ns, fd=-1) -> bool: spin (GIL released, kicks suppressed) until a buffer is available, "
     "at most budget_ns, or until fd is readable. Direct I/O requests are served meanwhile, each restarting the "
     "budget."},
    {"stop", (PyCFunction)vq_stop, METH_NOARGS, "Stop the queue; returns last_avail (for GET_VRING_BASE)."},
    {"direct_open", (PyCFunction)vq_direct_open, METH_VARARGS,
     "direct_open(fid, fd, flags) -> bool: serve Tread (flags & 1) / Twrite (flags & 2) on `fid` here, on `fd`, "
     "which the queue now owns (closes); False (fd not taken) when the table is full."},
    {"direct_close", (PyCFunction)vq_direct_close, METH_O,
     "direct_close(fid) -> bool: stop serving `fid` here and close its fd."},
    {"direct_clear", (PyCFunction)vq_direct_clear_py, METH_NOARGS, "direct_close every fid."},
    {"direct_stats", (PyCFunction)vq_direct_stats_py, METH_NOARGS,
     "direct_stats() -> {msgtype: (count, bytes, ns, buckets)}: the requests direct I/O served, so far."},
    {"set_call", (PyCFunction)vq_set_call, METH_O,
     "set_call(fd): the call eventfd direct I/O interrupts the driver with (-1: none). Stays the caller's."},
    {"set_msize", (PyCFunction)vq_set_msize, METH_O, "set_msize(msize): the negotiated 9P msize, for direct I/O."},
    {"set_write_guard", (PyCFunction)vq_set_write_guard, METH_VARARGS,
     "set_write_guard(slow_ns, backoff_ns): a direct write that slept and took longer than slow_ns turns "
     "direct writes off for backoff_ns."},
    {"mark_broken", (PyCFunction)vq_mark_broken, METH_O, "Mark the queue broken and raise VirtqError(reason)."},
    {"set_split", (PyCFunction)vq_set_split, METH_VARARGS,
     "set_split(msgtype, head, minimum): requests of that type (byte 4) longer than `minimum` keep all but "
     "their first `head` bytes in guest memory (Chain.pwrite / Chain.read); msgtype -1 turns it off."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject VirtQueueType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "transports._ring.VirtQueue",
    .tp_doc = "VirtQueue(mem, num, desc, avail, used, *, by_uva=True, event_idx=False, indirect=False, "
              "last_avail=0, max_request=16MiB): device side of a split virtqueue.",
    .tp_basicsize = sizeof(VirtQueueObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)vq_init,
    .tp_dealloc = (destructor)vq_dealloc,
    .tp_methods = vq_methods,
    .tp_getset = vq_getset,
};

/* ------------------------------------------------------------------------------------------ */
/* Chain methods                                                                               */

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
    unsigned long long offset, count, skip = 11;
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

static PyTypeObject ChainType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "transports._ring.Chain",
    .tp_doc = "One popped descriptor chain (made by VirtQueue.pop).",
    .tp_basicsize = sizeof(ChainObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_dealloc = (destructor)chain_dealloc,
    .tp_methods = chain_methods,
    .tp_getset = chain_getset,
};

int ring_virtq_init(PyObject *m)
{
    if (PyType_Ready(&MemTableType) < 0 || PyType_Ready(&VirtQueueType) < 0 || PyType_Ready(&ChainType) < 0)
        return -1;
    VirtqError = PyErr_NewExceptionWithDoc("transports._ring.VirtqError",
                                           "The driver broke the virtqueue rules; the queue needs a reset.",
                                           NULL, NULL);
    if (VirtqError == NULL)
        return -1;
    if (PyModule_AddObjectRef(m, "VirtqError", VirtqError) < 0 ||
        PyModule_AddObjectRef(m, "MemTable", (PyObject *)&MemTableType) < 0 ||
        PyModule_AddObjectRef(m, "VirtQueue", (PyObject *)&VirtQueueType) < 0 ||
        PyModule_AddObjectRef(m, "Chain", (PyObject *)&ChainType) < 0)
        return -1;
    return 0;
}

PyMethodDef ring_virtq_methods[] = {
    {NULL, NULL, 0, NULL},
};

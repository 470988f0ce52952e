/*
 * The split virtqueue itself (virtio 1.x, split-ring.tex), as the device sees it: the ring areas
 * translated through a MemTable, the walk of a descriptor chain into host segments, the used ring,
 * and EVENT_IDX kick and interrupt suppression. The Python types (VirtQueue in virtqueue.c, Chain in
 * chain.c) and direct I/O (direct.c) are built on these; this file calls none of them.
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
#include <string.h>
#include <time.h>

PyObject *VirtqError;

PyObject *vq_fail(VirtQueueObject *q, const char *fmt, ...)
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
PyObject *vq_walk_failed(VirtQueueObject *q, int rc)
{
    if (rc == -2)
        return PyErr_NoMemory();
    return vq_fail(q, "%s", q->why);
}

/* Translates the three ring areas of `q` through `mem`; 0 on success, -1 with VirtqError. */
int vq_map(VirtQueueObject *q, MemTableObject *mem, uint64_t desc, uint64_t avail, uint64_t used, int by_uva)
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

/* Asks the driver (EVENT_IDX) to kick at its next buffer, then looks again so a buffer added
 * meanwhile is not missed; returns avail.idx as read after that. */
uint16_t vq_arm_kick(VirtQueueObject *q)
{
    ring_store16(vq_avail_event(q), htole16(q->last_avail));
    ring_mb();
    return le16toh(ring_load16(q->avail + 2));
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

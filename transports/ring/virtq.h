/*
 * The ring API of the virtqueue part of the extension: what each of its files offers the others.
 * Calls go one way, down this list, never back up:
 *
 *   virtqueue.c  the VirtQueue Python type (pop, poll, the direct_* methods' table) and module init
 *   direct.c     Tread/Twrite on registered fids served in C, without reaching Python
 *   chain.c      the Chain Python type: one popped chain
 *   queue.c      the split ring itself: map, walk a chain, push a used element, kick suppression
 *   memtable.c   the MemTable Python type: guest memory regions and address translation
 *
 * Everything declared here that takes a VirtQueueObject runs on the one thread that pops the
 * queue. Functions marked GIL-free neither need the GIL nor touch any Python object, so the spin
 * in VirtQueue.poll may call them with the GIL released.
 */
#ifndef NINEP_VIRTQ_H
#define NINEP_VIRTQ_H

#include "ring.h"

#include <endian.h>
#include <string.h>

#define VQ_MAX_REGIONS 64
#define VQ_MAX_SIZE 32768
#define VQ_MAX_INDIRECT 4096

#define VRING_DESC_F_NEXT 1
#define VRING_DESC_F_WRITE 2
#define VRING_DESC_F_INDIRECT 4
#define VRING_AVAIL_F_NO_INTERRUPT 1

typedef struct {
    uint64_t gpa, size, uva;
    uint8_t *host;     /* first byte of the region (map_base + mmap_offset) */
    void *map_base;
    size_t map_len;
} vq_region;

typedef struct {
    PyObject_HEAD
    int nregions;
    vq_region regions[VQ_MAX_REGIONS];
} MemTableObject;

/* ---- memtable.c ---- */

extern PyTypeObject MemTableType;
/* GIL-free. Host pointer of [addr, addr+len) when it lies inside one region (by gpa, or by VMM
 * address); NULL otherwise. */
uint8_t *mem_contig(const MemTableObject *m, uint64_t addr, uint64_t len, int by_uva);
/* GIL-free. Region holding guest-physical `gpa` (at least one byte), and how many bytes remain in
 * it; NULL when no region holds it. */
uint8_t *mem_at(const MemTableObject *m, uint64_t gpa, uint64_t *avail);

typedef struct {
    struct iovec *v;
    int n, cap;
    uint64_t total;
} vq_segs;

/* ---- direct I/O: the queue's own fields for it (served by direct.c) ---- */

/* Open fids whose Tread/Twrite the queue serves itself, at most this many per queue (each holds
 * a dup of its file's fd). */
#define VQ_DIRECT_MAX 64
/* Requests served per pop() or per arrival seen by poll() before Python gets the loop back. */
#define VQ_DIRECT_BATCH 32
/* The longest poll() when direct I/O keeps restarting its window (ns). */
#define VQ_POLL_MAX_NS 1000000
/* Latency histogram: bucket i counts requests whose microseconds have bit length i, the last
 * bucket taking the rest. How many buckets is the metrics' choice (VirtQueue(buckets=...), from
 * ninep.metrics through the caller); this is only the most a 64-bit count can use. */
#define VQ_DIRECT_BUCKETS_MAX 65
#define VQ_DIRECT_READ 1
#define VQ_DIRECT_WRITE 2

typedef struct {
    uint32_t fid;
    int fd;           /* owned by the queue */
    uint8_t flags;    /* VQ_DIRECT_READ | VQ_DIRECT_WRITE */
} vq_direct_fid;

typedef struct {
    uint64_t count, bytes, ns;
    uint64_t buckets[VQ_DIRECT_BUCKETS_MAX];
} vq_direct_stats;

typedef struct {
    PyObject_HEAD
    MemTableObject *mem;
    uint8_t *desc, *avail, *used;
    uint32_t num;
    uint16_t last_avail, used_idx, signalled_used;
    uint8_t signalled_valid, event_idx, indirect, broken, stopped;
    uint64_t max_request;
    uint64_t inflight;
    /* Zero-copy writes (set_split): a request whose first byte-stream byte 4 is `split_type`
     * and whose readable part exceeds `split_min` bytes is copied only up to `split_head`
     * bytes; the rest stays in guest memory for Chain.pwrite / Chain.read. */
    int split_type; /* -1: never split */
    uint32_t split_head, split_min;
    /* Why the last vq_walk failed (it runs without the GIL, so cannot raise). */
    char why[160];
    /* Direct I/O: see direct.c. */
    vq_direct_fid direct[VQ_DIRECT_MAX];
    int ndirect;
    int call_fd;                    /* -1: no interrupt can be sent */
    uint32_t msize;                 /* negotiated 9P msize */
    uint64_t write_slow_ns, write_backoff_ns, writes_off_until;
    vq_direct_stats dstats[2];      /* [0] Tread, [1] Twrite; read by direct_stats() */
    int nbuckets;                   /* used entries of each dstats[].buckets */
    uint64_t direct_served, direct_last_ns, direct_notified;
    int32_t declined;               /* avail index of a chain direct I/O gave up on; -1: none */
    vq_segs drd, dwr;               /* scratch segment lists, reused */
    struct iovec *diov;
    int diov_cap;
} VirtQueueObject;

/* ---- queue.c ---- */

/* VirtqError, created by the module init (virtqueue.c). */
extern PyObject *VirtqError;
/* Marks the queue broken and raises VirtqError(fmt, ...); returns NULL. */
PyObject *vq_fail(VirtQueueObject *q, const char *fmt, ...);
/* The exception for a failed vq_walk (rc -1: the ring is broken; -2: out of memory); NULL. */
PyObject *vq_walk_failed(VirtQueueObject *q, int rc);
/* Translates the three ring areas of `q` through `mem`; 0 on success, -1 with VirtqError. */
int vq_map(VirtQueueObject *q, MemTableObject *mem, uint64_t desc, uint64_t avail, uint64_t used, int by_uva);
/* GIL-free. Asks the driver (EVENT_IDX) to kick at its next buffer, then looks again so a buffer
 * added meanwhile is not missed; returns avail.idx as read after that. */
uint16_t vq_arm_kick(VirtQueueObject *q);
/* GIL-free. Walks the chain at `head` into readable/writable host segments (appended to rd and
 * wr, allocated with PyMem_Raw*). 0 on success; -1 when the driver broke the ring rules (q->why
 * says how; the caller marks the queue broken); -2 when out of memory. */
int vq_walk(VirtQueueObject *q, uint16_t head, vq_segs *rd, vq_segs *wr);
/* GIL-free. Publishes one used element; returns whether the driver wants an interrupt. */
int vq_push(VirtQueueObject *q, uint16_t head, uint32_t len);
/* GIL-free. CLOCK_MONOTONIC in ns (the clock of Python's time.perf_counter_ns on Linux). */
uint64_t vq_now_ns(void);

static inline uint16_t *vq_avail_event(VirtQueueObject *q) { return (uint16_t *)(q->used + 4 + 8 * (size_t)q->num); }
static inline uint16_t *vq_used_event(VirtQueueObject *q) { return (uint16_t *)(q->avail + 4 + 2 * (size_t)q->num); }

/* ---- chain.c ---- */

extern PyTypeObject ChainType;
/* The Chain of the chain at `head` that vq_walk turned into `rd` and `wr`: takes both segment
 * lists (sets their .v to NULL, frees them on failure); the request bytes (or, split, their head)
 * are copied out of guest memory once, here. NULL with an exception. The caller advances the
 * queue (last_avail, inflight). */
PyObject *chain_new(VirtQueueObject *q, uint16_t head, vq_segs *rd, vq_segs *wr);

/* ---- direct.c ---- */

/* GIL-free (gil=0) or called with the GIL held (gil=1: released around file I/O). Serves the
 * available chains that are Tread/Twrite on direct fids, in ring order, at most `max`; stops at
 * the first other chain, leaving it (and any chain it could not walk) for pop(). Returns how many
 * it served; *more is 1 when a chain is still available. */
int vq_direct_serve(VirtQueueObject *q, int gil, unsigned max, int *more);
/* Closes every direct fid's fd (stop, direct_clear). */
void vq_direct_clear(VirtQueueObject *q);
/* vq_direct_clear, and frees the scratch buffers (dealloc). */
void vq_direct_free(VirtQueueObject *q);
/* Sets the direct-I/O fields (vq_init): `nbuckets` latency buckets, no fid, no write guard until
 * set_write_guard gives one. */
void vq_direct_init(VirtQueueObject *q, int nbuckets);

/* VirtQueue methods and attributes defined in direct.c (listed in virtqueue.c's tables). */
PyObject *vq_direct_open(VirtQueueObject *q, PyObject *args);
PyObject *vq_direct_close(VirtQueueObject *q, PyObject *arg);
PyObject *vq_direct_clear_py(VirtQueueObject *q, PyObject *ignored);
PyObject *vq_direct_stats_py(VirtQueueObject *q, PyObject *ignored);
PyObject *vq_set_call(VirtQueueObject *q, PyObject *arg);
PyObject *vq_set_msize(VirtQueueObject *q, PyObject *arg);
PyObject *vq_set_write_guard(VirtQueueObject *q, PyObject *args);
PyObject *vq_get_direct_served(VirtQueueObject *q, void *closure);
PyObject *vq_get_direct_last_ns(VirtQueueObject *q, void *closure);
PyObject *vq_get_direct_notified(VirtQueueObject *q, void *closure);
PyObject *vq_get_direct_fids(VirtQueueObject *q, void *closure);

/*
 * GIL-free. The head of the chain at last_avail, given avail.idx as the caller read it (once):
 * 0 and *head set; -1 when avail.idx moved by more than the queue size (the driver broke the
 * ring; the caller that can raise marks the queue broken).
 */
static inline int vq_next_head(const VirtQueueObject *q, uint16_t avail_idx, uint16_t *head)
{
    if ((uint16_t)(avail_idx - q->last_avail) > q->num)
        return -1;
    ring_rmb(); /* read ring entries only after seeing the index that published them */
    *head = le16toh(ring_load16(q->avail + 4 + 2 * (size_t)(q->last_avail % q->num)));
    return 0;
}

/* ---- segment streams ---- */

/* Moves bytes between [pos, pos+len) of the segment stream and `buf`: out of the stream, or into
 * it when `into`. The caller checked the bounds. */
static inline void segs_move(const vq_segs *s, uint64_t pos, uint8_t *buf, uint64_t len, int into)
{
    for (int k = 0; k < s->n && len; k++) {
        uint64_t seg = s->v[k].iov_len;
        if (pos >= seg) {
            pos -= seg;
            continue;
        }
        uint64_t take = seg - pos < len ? seg - pos : len;
        uint8_t *at = (uint8_t *)s->v[k].iov_base + pos;
        if (into)
            memcpy(at, buf, (size_t)take);
        else
            memcpy(buf, at, (size_t)take);
        buf += take;
        len -= take;
        pos = 0;
    }
}

static inline void segs_copy(const vq_segs *s, uint64_t pos, uint8_t *dst, uint64_t len)
{
    segs_move(s, pos, dst, len, 0);
}

static inline void segs_put(const vq_segs *s, uint64_t pos, const uint8_t *src, uint64_t len)
{
    segs_move(s, pos, (uint8_t *)src, len, 1);
}

/*
 * Fills `iov` (room for `n` entries) with the pieces of bytes [pos, pos+len) of the segment
 * array `v`; returns how many entries were used. The caller checked the bounds.
 */
static inline int segs_slice(const struct iovec *v, int n, uint64_t pos, uint64_t len, struct iovec *iov)
{
    int cnt = 0;
    for (int k = 0; k < n && len; k++) {
        uint64_t seg = v[k].iov_len;
        if (pos >= seg) {
            pos -= seg;
            continue;
        }
        uint64_t take = seg - pos < len ? seg - pos : len;
        iov[cnt].iov_base = (uint8_t *)v[k].iov_base + pos;
        iov[cnt].iov_len = (size_t)take;
        cnt++;
        len -= take;
        pos = 0;
    }
    return cnt;
}

#endif

/*
 * Direct I/O: Tread and Twrite on fids the session opened, served by the virtqueue itself.
 *
 * A guest's sequential I/O is one request at a time (Linux's 9p client waits for each reply), so
 * every microsecond between the driver's kick and our interrupt is the guest's. For a request on
 * an open file that microsecond budget is mostly Python: handing the chain out, decoding, the
 * session's bookkeeping and the reply. Here a Tread or Twrite whose fid the session registered
 * (direct_open: a dup of the open file's fd and whether it may read and write) is served inside
 * pop() or inside the spin of poll(): header read once from the chain, preadv2(RWF_NOWAIT) into
 * the guest's buffers or pwritev from them, the reply header written, the chain completed and the
 * driver interrupted, without returning to Python.
 *
 * Everything else stays with the session, which decides what is allowed: it registers a fid only
 * once open with the access it was granted (and never when it must see every request: trace),
 * and withdraws it (direct_close) before anything that ends the fid — Tclunk, Tremove, a new
 * Tversion — is handled, on the same thread that pops, so no request popped after those can be
 * served here. Anything this file cannot answer with success is left in the ring for pop(): a
 * request it does not recognise, a read the page cache cannot satisfy (the session reads it in a
 * worker thread), an I/O error (the session repeats the call and answers the error), a write while
 * writes are off (below). A failed transfer moved no byte (ring_*_all), so repeating it is safe.
 *
 * Writes run on the popping thread as the local backend's inline writes do: one that slept and
 * took longer than `write_slow_ns` (dirty throttling, reclaim) turns direct writes off for
 * `write_backoff_ns`, so a stall of the event loop does not repeat. Both numbers are the
 * backend's policy, given by set_write_guard (transports.virtio passes them from
 * transports.options.DirectIOPolicy); this file holds none of its own.
 *
 * This file must never parse more of a request than the fixed Tread/Twrite header, answer
 * anything but success, or touch a Python object outside the methods at the end (the serving
 * code runs with the GIL released).
 */
#include "ninep_wire.h"
#include "virtq.h"

#include <endian.h>
#include <errno.h>
#include <sched.h>
#include <sys/eventfd.h>
#include <sys/resource.h>
#include <unistd.h>

enum { DIRECT_EMPTY, DIRECT_SERVED, DIRECT_OTHER };

void vq_direct_init(VirtQueueObject *q, int nbuckets)
{
    q->ndirect = 0;
    q->call_fd = -1;
    q->msize = q->max_request < UINT32_MAX ? (uint32_t)q->max_request : UINT32_MAX;
    q->nbuckets = nbuckets;
    /* The back-off policy is the backend's (set_write_guard); until it is given, none. */
    q->write_slow_ns = UINT64_MAX;
    q->write_backoff_ns = 0;
    q->writes_off_until = 0;
    q->declined = -1;
}

void vq_direct_clear(VirtQueueObject *q)
{
    for (int i = 0; i < q->ndirect; i++)
        close(q->direct[i].fd);
    q->ndirect = 0;
}

void vq_direct_free(VirtQueueObject *q)
{
    vq_direct_clear(q);
    PyMem_RawFree(q->drd.v);
    PyMem_RawFree(q->dwr.v);
    PyMem_RawFree(q->diov);
}

static vq_direct_fid *direct_find(VirtQueueObject *q, uint32_t fid)
{
    for (int i = 0; i < q->ndirect; i++)
        if (q->direct[i].fid == fid)
            return &q->direct[i];
    return NULL;
}

static int iov_room(VirtQueueObject *q, int n)
{
    if (n <= q->diov_cap)
        return 0;
    struct iovec *v = PyMem_RawRealloc(q->diov, sizeof(*v) * (size_t)n);
    if (v == NULL)
        return -1;
    q->diov = v;
    q->diov_cap = n;
    return 0;
}

static void direct_notify(VirtQueueObject *q)
{
    if (q->call_fd < 0)
        return;
    eventfd_write(q->call_fd, 1); /* EAGAIN (a counter near overflow) still leaves it signalled */
    q->direct_notified++;
    /* As Vring.notify does: the VMM thread that turns the call into an interrupt may have been
     * woken on this CPU; let it run now rather than after our next spin. */
    sched_yield();
}

/* Twrite: bytes [NINEP_IO_HEADER, NINEP_IO_HEADER+count) of the readable stream to the file at `offset`. */
static ssize_t direct_write(VirtQueueObject *q, int fd, uint64_t offset, uint32_t count, int gil)
{
    vq_segs *rd = &q->drd;
    if (iov_room(q, rd->n) < 0)
        return -ENOMEM;
    int cnt = segs_slice(rd->v, rd->n, NINEP_IO_HEADER, count, q->diov);
    PyThreadState *ts = gil ? PyEval_SaveThread() : NULL;
    struct rusage before, after;
    getrusage(RUSAGE_THREAD, &before);
    uint64_t t0 = vq_now_ns();
    ssize_t n = ring_pwritev_all(fd, q->diov, cnt, offset);
    uint64_t t1 = vq_now_ns();
    /* Slow and it slept (a voluntary switch): it waited for the kernel, not just for a CPU. */
    if (t1 - t0 > q->write_slow_ns && getrusage(RUSAGE_THREAD, &after) == 0 && after.ru_nvcsw != before.ru_nvcsw)
        q->writes_off_until = t1 + q->write_backoff_ns;
    if (gil)
        PyEval_RestoreThread(ts);
    return n;
}

/* Tread: what the page cache holds of [offset, offset+count), into the writable stream after the
 * Rread header; -EAGAIN when a part of it is not cached. */
static ssize_t direct_read(VirtQueueObject *q, int fd, uint64_t offset, uint32_t count, int gil)
{
    vq_segs *wr = &q->dwr;
    if (iov_room(q, wr->n) < 0)
        return -ENOMEM;
    if (offset > (uint64_t)INT64_MAX - count)
        return -EINVAL;
    PyThreadState *ts = gil ? PyEval_SaveThread() : NULL;
    uint64_t got = 0;
    ssize_t r = 0;
    while (got < count) {
        int cnt = segs_slice(wr->v, wr->n, NINEP_IO_REPLY_HEADER + got, count - got, q->diov);
        r = ring_preadv_nowait(fd, q->diov, cnt, offset + got);
        if (r <= 0)
            break; /* end of file, or not cached / an error: the session takes it */
        got += (uint64_t)r;
    }
    if (gil)
        PyEval_RestoreThread(ts);
    return r < 0 ? r : (ssize_t)got;
}

static void note(vq_direct_stats *st, int nbuckets, uint64_t bytes, uint64_t ns)
{
    uint64_t us = ns / 1000;
    int bucket = us ? 64 - __builtin_clzll(us) : 0;
    st->count++;
    st->bytes += bytes;
    st->ns += ns;
    st->buckets[bucket < nbuckets ? bucket : nbuckets - 1]++;
}

static int direct_one(VirtQueueObject *q, int gil)
{
    if (q->broken || q->stopped)
        return DIRECT_OTHER;
    uint16_t avail_idx = le16toh(ring_load16(q->avail + 2));
    if (avail_idx == q->last_avail)
        return DIRECT_EMPTY;
    uint16_t head;
    if (q->declined == q->last_avail || vq_next_head(q, avail_idx, &head) < 0)
        return DIRECT_OTHER; /* pop() hands it to the session / fails the queue */
    uint64_t t0 = vq_now_ns();
    q->drd.n = q->dwr.n = 0;
    q->drd.total = q->dwr.total = 0;
    if (vq_walk(q, head, &q->drd, &q->dwr) < 0)
        return DIRECT_OTHER; /* pop() walks it again and reports why */
    if (q->drd.total < NINEP_IO_HEADER || q->dwr.total < NINEP_IO_REPLY_HEADER)
        return DIRECT_OTHER;
    /* The header, read once from guest memory into a private copy. */
    uint8_t h[NINEP_IO_HEADER];
    segs_copy(&q->drd, 0, h, NINEP_IO_HEADER);
    uint32_t size, fid, count;
    uint16_t tag;
    uint64_t offset;
    uint8_t type = h[4];
    memcpy(&size, h, 4);
    memcpy(&tag, h + 5, 2);
    memcpy(&fid, h + 7, 4);
    memcpy(&offset, h + 11, 8);
    memcpy(&count, h + 19, 4);
    size = le32toh(size);
    tag = le16toh(tag);
    fid = le32toh(fid);
    offset = le64toh(offset);
    count = le32toh(count);
    if (type != NINEP_TREAD && type != NINEP_TWRITE)
        return DIRECT_OTHER;
    const vq_direct_fid *f = direct_find(q, fid);
    if (f == NULL || size > q->msize || size > q->drd.total || q->msize <= NINEP_IO_REPLY_HEADER)
        return DIRECT_OTHER;
    ssize_t n;
    if (type == NINEP_TWRITE) {
        if (!(f->flags & VQ_DIRECT_WRITE) || size != NINEP_IO_HEADER + (uint64_t)count || t0 < q->writes_off_until)
            return DIRECT_OTHER;
        n = direct_write(q, f->fd, offset, count, gil);
    } else {
        if (!(f->flags & VQ_DIRECT_READ) || size != NINEP_IO_HEADER)
            return DIRECT_OTHER;
        uint64_t room = q->dwr.total - NINEP_IO_REPLY_HEADER, most = q->msize - NINEP_IO_REPLY_HEADER;
        if (count > room)
            count = (uint32_t)room;
        if (count > most)
            count = (uint32_t)most;
        n = direct_read(q, f->fd, offset, count, gil);
    }
    if (n < 0) {
        q->declined = q->last_avail; /* pop() hands it out without trying again */
        return DIRECT_OTHER;
    }
    uint32_t used = NINEP_IO_REPLY_HEADER + (type == NINEP_TREAD ? (uint32_t)n : 0);
    uint8_t r[NINEP_IO_REPLY_HEADER];
    uint32_t le_size = htole32(used), le_count = htole32((uint32_t)n);
    uint16_t le_tag = htole16(tag);
    memcpy(r, &le_size, 4);
    r[4] = type == NINEP_TREAD ? NINEP_RREAD : NINEP_RWRITE;
    memcpy(r + 5, &le_tag, 2);
    memcpy(r + 7, &le_count, 4);
    segs_put(&q->dwr, 0, r, NINEP_IO_REPLY_HEADER);
    q->last_avail++;
    if (vq_push(q, head, used))
        direct_notify(q);
    uint64_t t1 = vq_now_ns();
    note(&q->dstats[type == NINEP_TWRITE], q->nbuckets, (uint64_t)n, t1 - t0);
    q->direct_served++;
    q->direct_last_ns = t1;
    return DIRECT_SERVED;
}

int vq_direct_serve(VirtQueueObject *q, int gil, unsigned max, int *more)
{
    int served = 0;
    *more = 0;
    while (q->ndirect > 0) {
        if ((unsigned)served >= max) {
            *more = le16toh(ring_load16(q->avail + 2)) != q->last_avail;
            break;
        }
        int r = direct_one(q, gil);
        if (r == DIRECT_EMPTY)
            break;
        if (r == DIRECT_OTHER) {
            *more = 1;
            break;
        }
        served++;
    }
    return served;
}

/* ---- Python methods (GIL held; the popping thread only) ---------------------------------- */

PyObject *vq_direct_open(VirtQueueObject *q, PyObject *args)
{
    unsigned int fid;
    int fd, flags;
    if (!PyArg_ParseTuple(args, "Iii", &fid, &fd, &flags))
        return NULL;
    if (fd < 0 || flags < 1 || flags > (VQ_DIRECT_READ | VQ_DIRECT_WRITE)) {
        PyErr_SetString(PyExc_ValueError, "direct_open needs an fd and flags 1 (read), 2 (write) or 3");
        return NULL;
    }
    vq_direct_fid *f = direct_find(q, fid);
    if (f != NULL) {
        close(f->fd);
    } else {
        if (q->ndirect >= VQ_DIRECT_MAX)
            Py_RETURN_FALSE;
        f = &q->direct[q->ndirect++];
        f->fid = fid;
    }
    f->fd = fd;
    f->flags = (uint8_t)flags;
    Py_RETURN_TRUE;
}

PyObject *vq_direct_close(VirtQueueObject *q, PyObject *arg)
{
    unsigned long fid = PyLong_AsUnsignedLong(arg);
    if (fid == (unsigned long)-1 && PyErr_Occurred())
        return NULL;
    vq_direct_fid *f = fid <= UINT32_MAX ? direct_find(q, (uint32_t)fid) : NULL;
    if (f == NULL)
        Py_RETURN_FALSE;
    close(f->fd);
    *f = q->direct[--q->ndirect];
    Py_RETURN_TRUE;
}

PyObject *vq_direct_clear_py(VirtQueueObject *q, PyObject *Py_UNUSED(ignored))
{
    vq_direct_clear(q);
    Py_RETURN_NONE;
}

/* {msgtype: (count, bytes, ns, [buckets])}: every request served so far (never reset). */
PyObject *vq_direct_stats_py(VirtQueueObject *q, PyObject *Py_UNUSED(ignored))
{
    PyObject *out = PyDict_New();
    if (out == NULL)
        return NULL;
    for (int k = 0; k < 2; k++) {
        vq_direct_stats *st = &q->dstats[k];
        if (st->count == 0)
            continue;
        PyObject *buckets = PyList_New(q->nbuckets);
        if (buckets == NULL)
            goto fail;
        for (int i = 0; i < q->nbuckets; i++)
            PyList_SET_ITEM(buckets, i, PyLong_FromUnsignedLongLong(st->buckets[i]));
        PyObject *item = Py_BuildValue("(KKKN)", st->count, st->bytes, st->ns, buckets);
        PyObject *key = PyLong_FromLong(k ? NINEP_TWRITE : NINEP_TREAD);
        int rc = item && key ? PyDict_SetItem(out, key, item) : -1;
        Py_XDECREF(item);
        Py_XDECREF(key);
        if (rc < 0)
            goto fail;
    }
    return out;
fail:
    Py_DECREF(out);
    return NULL;
}

PyObject *vq_set_call(VirtQueueObject *q, PyObject *arg)
{
    long fd = PyLong_AsLong(arg);
    if (fd == -1 && PyErr_Occurred())
        return NULL;
    if (fd > INT32_MAX) {
        PyErr_SetString(PyExc_ValueError, "fd out of range");
        return NULL;
    }
    q->call_fd = fd < 0 ? -1 : (int)fd;
    Py_RETURN_NONE;
}

PyObject *vq_set_msize(VirtQueueObject *q, PyObject *arg)
{
    unsigned long msize = PyLong_AsUnsignedLong(arg);
    if (msize == (unsigned long)-1 && PyErr_Occurred())
        return NULL;
    q->msize = msize < UINT32_MAX ? (uint32_t)msize : UINT32_MAX;
    Py_RETURN_NONE;
}

PyObject *vq_set_write_guard(VirtQueueObject *q, PyObject *args)
{
    unsigned long long slow, backoff;
    if (!PyArg_ParseTuple(args, "KK", &slow, &backoff))
        return NULL;
    q->write_slow_ns = slow;
    q->write_backoff_ns = backoff;
    q->writes_off_until = 0;
    Py_RETURN_NONE;
}

PyObject *vq_get_direct_served(VirtQueueObject *q, void *Py_UNUSED(c)) { return PyLong_FromUnsignedLongLong(q->direct_served); }
PyObject *vq_get_direct_last_ns(VirtQueueObject *q, void *Py_UNUSED(c)) { return PyLong_FromUnsignedLongLong(q->direct_last_ns); }
PyObject *vq_get_direct_notified(VirtQueueObject *q, void *Py_UNUSED(c)) { return PyLong_FromUnsignedLongLong(q->direct_notified); }
PyObject *vq_get_direct_fids(VirtQueueObject *q, void *Py_UNUSED(c)) { return PyLong_FromLong(q->ndirect); }

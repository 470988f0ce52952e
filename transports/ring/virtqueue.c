/*
 * VirtQueue: the Python type of one device-side split virtqueue over guest memory shared by a
 * VMM (vhost-user) or by the in-process test front-end, and the virtqueue part's module init
 * (MemTable, VirtQueue, Chain, VirtqError).
 *
 * The top of the virtqueue files: pop() and poll() run direct I/O (direct.c) before handing a
 * Chain (chain.c) to Python, over the ring primitives of queue.c and the guest memory of
 * memtable.c. None of those call back into this file. It must never read guest memory itself
 * other than through those primitives (every ring index read once, see ring.h).
 */
#include "ninep_wire.h"
#include "virtq.h"

#include <endian.h>
#include <poll.h>
#include <sched.h>

static int vq_ready(VirtQueueObject *q)
{
    if (q->mem == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "VirtQueue not initialised");
        return 0;
    }
    return 1;
}

static int vq_init(VirtQueueObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"mem", "num", "desc", "avail", "used", "by_uva", "event_idx",
                             "indirect", "last_avail", "max_request", "buckets", NULL};
    MemTableObject *mem;
    unsigned int num;
    unsigned long long desc, avail, used, max_request = 16u << 20;
    int by_uva = 1, event_idx = 0, indirect = 0, buckets = VQ_DIRECT_BUCKETS_MAX;
    unsigned int last_avail = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O!IKKK|$pppIKi", kwlist, &MemTableType, &mem, &num, &desc,
                                     &avail, &used, &by_uva, &event_idx, &indirect, &last_avail, &max_request,
                                     &buckets))
        return -1;
    if (buckets < 1 || buckets > VQ_DIRECT_BUCKETS_MAX) {
        PyErr_Format(PyExc_ValueError, "buckets must be between 1 and %d", VQ_DIRECT_BUCKETS_MAX);
        return -1;
    }
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
    vq_direct_init(self, buckets);
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
    int rc = vq_walk(q, head, &rd, &wr);
    if (rc < 0) {
        vq_walk_failed(q, rc);
        PyMem_RawFree(rd.v);
        PyMem_RawFree(wr.v);
        return NULL;
    }
    PyObject *c = chain_new(q, head, &rd, &wr);
    if (c == NULL)
        return NULL;
    q->inflight++;
    q->last_avail++;
    q->declined = -1;
    /* avail_event is left where the last empty pop put it: while the device keeps popping, the
     * driver need not kick (a kick per request costs the guest an exit and us a wakeup). The pop
     * that finds the ring empty asks for the next kick and looks again, so none is missed. */
    return c;
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
    if (type < -1 || type > 255 || (type >= 0 && (head < NINEP_HEADER || head > minimum))) {
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
              "last_avail=0, max_request=16MiB, buckets=65): device side of a split virtqueue; `buckets` is the "
              "size of direct_stats()' latency histograms (the last bucket takes the rest).",
    .tp_basicsize = sizeof(VirtQueueObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)vq_init,
    .tp_dealloc = (destructor)vq_dealloc,
    .tp_methods = vq_methods,
    .tp_getset = vq_getset,
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

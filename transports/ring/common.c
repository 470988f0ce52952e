/*
 * Shared compiled helpers of transports._ring: whole-count preadv/pwritev between a file and a
 * list of memory segments (called with the GIL released by the ring parts), and small eventfd
 * helpers for Python.
 *
 * Nothing here knows a ring layout; the callers have already bounds-checked every segment against
 * a mapping they own. These functions never touch Python objects, so they may run without the GIL.
 */
#include "ring.h"

#include <errno.h>
#include <limits.h>
#include <stdint.h>
#include <sys/eventfd.h>
#include <sys/uio.h>
#include <unistd.h>

#ifndef IOV_MAX
#define IOV_MAX 1024
#endif

/*
 * Moves up to the total length of `iov` between `fd` at `offset` and memory, looping over short
 * transfers, EINTR and IOV_MAX. Stops early at end of file (reads) or when the kernel transfers
 * nothing. `iov` is modified (consumed). Returns bytes moved, or -errno if nothing was moved.
 */
static ssize_t ring_xfer_all(int fd, struct iovec *iov, int iovcnt, uint64_t offset, int write)
{
    size_t total = 0;
    while (iovcnt > 0) {
        if (iov->iov_len == 0) {
            iov++;
            iovcnt--;
            continue;
        }
        if (offset > (uint64_t)INT64_MAX)
            return total ? (ssize_t)total : -EOVERFLOW;
        int batch = iovcnt < IOV_MAX ? iovcnt : IOV_MAX;
        ssize_t n = write ? pwritev(fd, iov, batch, (off_t)offset) : preadv(fd, iov, batch, (off_t)offset);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return total ? (ssize_t)total : -errno;
        }
        if (n == 0)
            break;
        total += (size_t)n;
        offset += (uint64_t)n;
        size_t left = (size_t)n;
        while (iovcnt > 0 && left >= iov->iov_len) {
            left -= iov->iov_len;
            iov++;
            iovcnt--;
        }
        if (left) {
            iov->iov_base = (char *)iov->iov_base + left;
            iov->iov_len -= left;
        }
    }
    return (ssize_t)total;
}

ssize_t ring_preadv_all(int fd, struct iovec *iov, int iovcnt, uint64_t offset)
{
    return ring_xfer_all(fd, iov, iovcnt, offset, 0);
}

ssize_t ring_pwritev_all(int fd, struct iovec *iov, int iovcnt, uint64_t offset)
{
    return ring_xfer_all(fd, iov, iovcnt, offset, 1);
}

ssize_t ring_preadv_nowait(int fd, struct iovec *iov, int iovcnt, uint64_t offset)
{
    if (offset > (uint64_t)INT64_MAX)
        return -EOVERFLOW;
    if (iovcnt > IOV_MAX)
        iovcnt = IOV_MAX;
    for (;;) {
        ssize_t n = preadv2(fd, iov, iovcnt, (off_t)offset, RWF_NOWAIT);
        if (n >= 0)
            return n;
        if (errno != EINTR)
            return -errno;
    }
}

PyObject *ring_io_result(ssize_t n)
{
    if (n < 0) {
        errno = (int)-n;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    return PyLong_FromSsize_t(n);
}

/* drain_eventfd(fd) -> int: reads a non-blocking eventfd's counter (0 when it was not signalled). */
static PyObject *py_drain_eventfd(PyObject *Py_UNUSED(self), PyObject *arg)
{
    int fd;
    if (!PyArg_Parse(arg, "i", &fd))
        return NULL;
    eventfd_t value = 0;
    if (eventfd_read(fd, &value) < 0) {
        if (errno == EAGAIN)
            return PyLong_FromLong(0);
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    return PyLong_FromUnsignedLongLong(value);
}

/* signal_eventfd(fd): adds 1 to an eventfd's counter (a kick or an interrupt). */
static PyObject *py_signal_eventfd(PyObject *Py_UNUSED(self), PyObject *arg)
{
    int fd;
    if (!PyArg_Parse(arg, "i", &fd))
        return NULL;
    if (eventfd_write(fd, 1) < 0 && errno != EAGAIN)
        return PyErr_SetFromErrno(PyExc_OSError);
    Py_RETURN_NONE;
}

PyMethodDef ring_common_methods[] = {
    {"drain_eventfd", py_drain_eventfd, METH_O, "Read and reset a non-blocking eventfd; 0 if unsignalled."},
    {"signal_eventfd", py_signal_eventfd, METH_O, "Add 1 to an eventfd."},
    {NULL, NULL, 0, NULL},
};

/*
 * Shared pieces of the compiled ring extension (transports._ring).
 *
 * Every index, length and offset that comes from shared memory is read exactly once, into a
 * local variable, through ring_load_* (a volatile access the compiler may not repeat), then
 * checked, then used. Nothing here may ever dereference guest-controlled memory without a bounds
 * check against a mapping the extension owns.
 */
#ifndef NINEP_RING_H
#define NINEP_RING_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stddef.h>

/* Memory barriers matching the Linux/Xen ring protocols (x86-64 and aarch64 via builtins). */
#define ring_mb() __atomic_thread_fence(__ATOMIC_SEQ_CST)
#define ring_rmb() __atomic_thread_fence(__ATOMIC_ACQUIRE)
#define ring_wmb() __atomic_thread_fence(__ATOMIC_RELEASE)

static inline uint16_t ring_load16(const void *p) { return __atomic_load_n((const uint16_t *)p, __ATOMIC_RELAXED); }
static inline uint32_t ring_load32(const void *p) { return __atomic_load_n((const uint32_t *)p, __ATOMIC_RELAXED); }
static inline uint64_t ring_load64(const void *p) { return __atomic_load_n((const uint64_t *)p, __ATOMIC_RELAXED); }
static inline void ring_store16(void *p, uint16_t v) { __atomic_store_n((uint16_t *)p, v, __ATOMIC_RELAXED); }
static inline void ring_store32(void *p, uint32_t v) { __atomic_store_n((uint32_t *)p, v, __ATOMIC_RELAXED); }

/* True when [off, off+len) lies inside a region of `size` bytes, without overflow. */
static inline int ring_in_bounds(uint64_t off, uint64_t len, uint64_t size)
{
    return off <= size && len <= size - off;
}

/*
 * preadv into memory the extension owns (a ring or a mapped guest region), with the GIL released
 * and EINTR retried. Loops until `want` bytes, end of file or an error; returns the number of
 * bytes read or -1 with errno set (only when nothing was read). The caller must keep the target
 * memory mapped for the duration (it holds a buffer export or a busy flag) and must not touch
 * Python objects from the iovecs.
 */
#include <sys/uio.h>
#include <errno.h>
static inline Py_ssize_t ring_preadv_nogil(int fd, struct iovec *iov, int iovcnt, int64_t offset, size_t want)
{
    size_t done = 0;
    int err = 0;
    Py_BEGIN_ALLOW_THREADS
    while (done < want) {
        ssize_t n = preadv(fd, iov, iovcnt, (off_t)(offset + (int64_t)done));
        if (n < 0) {
            if (errno == EINTR)
                continue;
            err = errno;
            break;
        }
        if (n == 0)
            break;
        done += (size_t)n;
        /* Advance the iovec array past what was filled (short read from a pipe-like file). */
        size_t left = (size_t)n;
        while (iovcnt > 0 && left >= iov->iov_len) {
            left -= iov->iov_len;
            iov++;
            iovcnt--;
        }
        if (iovcnt > 0) {
            iov->iov_base = (char *)iov->iov_base + left;
            iov->iov_len -= left;
        } else {
            break;
        }
    }
    Py_END_ALLOW_THREADS
    if (done == 0 && err != 0) {
        errno = err;
        return -1;
    }
    return (Py_ssize_t)done;
}

/*
 * Method tables contributed by each part of the extension. A part that is not compiled in leaves
 * its (weak) table NULL; module.c assembles whatever is present into one module.
 */
extern PyMethodDef ring_common_methods[] __attribute__((weak));
extern PyMethodDef ring_virtq_methods[] __attribute__((weak));
extern PyMethodDef ring_xen_methods[] __attribute__((weak));

/* Optional per-part initialisers (types, constants); return 0 on success, -1 with an exception. */
extern int ring_common_init(PyObject *module) __attribute__((weak));
extern int ring_virtq_init(PyObject *module) __attribute__((weak));
extern int ring_xen_init(PyObject *module) __attribute__((weak));

#endif

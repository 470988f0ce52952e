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
#include <sys/types.h>
#include <sys/uio.h>

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
 * Whole-count file I/O between `fd` at `offset` and already bounds-checked memory segments
 * (common.c). Safe to call with the GIL released; loops over short transfers, EINTR and IOV_MAX,
 * stops at end of file. `iov` is consumed. Returns bytes moved, or -errno if nothing moved.
 */
ssize_t ring_preadv_all(int fd, struct iovec *iov, int iovcnt, uint64_t offset);
ssize_t ring_pwritev_all(int fd, struct iovec *iov, int iovcnt, uint64_t offset);
/*
 * One preadv2(RWF_NOWAIT): only what the page cache already holds, never blocking on storage.
 * Returns bytes read (0 at end of file, possibly short), or -errno (-EAGAIN: nothing cached).
 */
ssize_t ring_preadv_nowait(int fd, struct iovec *iov, int iovcnt, uint64_t offset);
/* The Python result of one of the above: the byte count, or OSError from its -errno. */
PyObject *ring_io_result(ssize_t n);

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

/*
 * MemTable: the guest memory regions of a virtio device, mmapped from the fds the VMM passed, and
 * the translation of guest addresses (guest-physical or VMM-virtual) into host pointers.
 *
 * A table is unmapped only when the last reference goes, so a chain popped before a memory-table
 * change stays valid until it is completed. Translations are overflow-safe bounds checks against
 * the regions this file mapped; this file must never hand out a pointer outside them, nor read
 * guest memory itself.
 */
#include "virtq.h"

#include <sys/mman.h>
#include <sys/stat.h>

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
uint8_t *mem_contig(const MemTableObject *m, uint64_t addr, uint64_t len, int by_uva)
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
uint8_t *mem_at(const MemTableObject *m, uint64_t gpa, uint64_t *avail)
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

PyTypeObject MemTableType = {
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

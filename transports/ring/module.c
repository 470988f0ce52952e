/*
 * transports._ring: the module object. It owns no logic; it gathers the method tables and
 * initialisers of the parts (common.c; the virtqueue files, whose init is in virtqueue.c; xen.c) that were compiled in.
 */
#include "ring.h"

static PyMethodDef *const part_tables[] = {ring_common_methods, ring_virtq_methods, ring_xen_methods};
static int (*const part_inits[])(PyObject *) = {ring_common_init, ring_virtq_init, ring_xen_init};

static struct PyModuleDef ring_module = {
    PyModuleDef_HEAD_INIT, "transports._ring",
    "Compiled ring I/O for the virtio and Xen transports: single-fetch, bounds-checked access to "
    "shared memory and zero-copy file I/O.",
    -1, NULL, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__ring(void)
{
    PyObject *m = PyModule_Create(&ring_module);
    if (m == NULL)
        return NULL;
    for (size_t i = 0; i < sizeof(part_tables) / sizeof(part_tables[0]); i++) {
        if (part_tables[i] != NULL && PyModule_AddFunctions(m, part_tables[i]) < 0)
            goto fail;
        if (part_inits[i] != NULL && part_inits[i](m) < 0)
            goto fail;
    }
    return m;
fail:
    Py_DECREF(m);
    return NULL;
}

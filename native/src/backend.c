/* backend.c -- which kernel table runs: chosen once, reported, never switched silently. */
#include "qes_internal.h"

static int current = QES_BACKEND_AUTO;

int qes_backend_available(int backend) {
    switch (backend) {
    case QES_BACKEND_PORTABLE: return 1;
#if defined(QES_HAVE_AVX2)
    case QES_BACKEND_AVX2: return __builtin_cpu_supports("avx2") ? 1 : 0;
#endif
    default: return 0;
    }
}

int qes_set_backend(int backend) {
    if (backend == QES_BACKEND_AUTO) {
        current = qes_backend_available(QES_BACKEND_AVX2) ? QES_BACKEND_AVX2 : QES_BACKEND_PORTABLE;
        return QES_OK;
    }
    if (!qes_backend_available(backend)) return QES_ERR_BACKEND;
    current = backend;
    return QES_OK;
}

int qes_get_backend(void) {
    if (current == QES_BACKEND_AUTO) qes_set_backend(QES_BACKEND_AUTO);
    return current;
}

const qes_kernels *qes_active_kernels(void) {
#if defined(QES_HAVE_AVX2)
    if (qes_get_backend() == QES_BACKEND_AVX2) return &qes_kernels_avx2;
#endif
    return &qes_kernels_ref;
}

/* threads.c -- a minimal parallel-for over pthreads: tasks are claimed from an atomic
 * counter, so the result never depends on which thread runs which task. */
#include <pthread.h>
#include <stdlib.h>
#include <unistd.h>
#include "qes_internal.h"

typedef struct {
    uint64_t n;
    uint64_t next; /* accessed atomically */
    qes_task_fn fn;
    void *ctx;
} pool;

typedef struct { pool *p; int index; } worker;

static void *work(void *arg) {
    worker *w = (worker *)arg;
    for (;;) {
        uint64_t i = __atomic_fetch_add(&w->p->next, 1, __ATOMIC_RELAXED);
        if (i >= w->p->n) break;
        w->p->fn(w->p->ctx, i, w->index);
    }
    return NULL;
}

int qes_default_threads(void) {
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n < 1 ? 1 : (n > 256 ? 256 : (int)n);
}

int qes_parallel_for(uint64_t n, int nthreads, qes_task_fn fn, void *ctx) {
    pool p = {n, 0, fn, ctx};
    if (nthreads <= 1 || n <= 1) {
        worker w = {&p, 0};
        work(&w);
        return QES_OK;
    }
    pthread_t *tid = (pthread_t *)malloc(sizeof(pthread_t) * (size_t)nthreads);
    worker *ws = (worker *)malloc(sizeof(worker) * (size_t)nthreads);
    if (!tid || !ws) { free(tid); free(ws); return QES_ERR_NOMEM; }
    int started = 0;
    for (int i = 1; i < nthreads; ++i) {
        ws[i].p = &p; ws[i].index = i;
        if (pthread_create(&tid[i], NULL, work, &ws[i]) != 0) break;
        ++started;
    }
    ws[0].p = &p; ws[0].index = 0;
    work(&ws[0]); /* the caller works too; if threads failed to start it does all the work */
    for (int i = 1; i <= started; ++i) pthread_join(tid[i], NULL);
    free(tid); free(ws);
    return QES_OK;
}

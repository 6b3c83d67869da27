/* bench_backends.c -- each available backend on one synthetic Q4_K tensor of 8M elements:
 * perturb + restore of one seed at sigma 0.01, and one update (a window of 50 steps of 16
 * members, seed replay).  One JSON line a backend: seconds of each op and the ratio to
 * portable (portable runs first).  The bytes of every backend are checked against portable's.
 *
 *   bench_backends [n_elements]       QES_BENCH_THREADS=N (default 1: the kernels, not the cores)
 *   QES_EMULATED=1: the numbers come from an emulator (qemu), not from the hardware. */
#define _POSIX_C_SOURCE 200809L
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include "qes.h"
#include "qes_internal.h"

#define STEPS 50
#define POP 16

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static uint64_t rng = 0x9E3779B97F4A7C15ull;
static uint32_t rnd(void) { rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17; return (uint32_t)rng; }

static void digest_of(int b, const qes_tensor *t, uint8_t *stage, uint8_t out[32]) {
    qes_backend_download(b, stage, t->data, t->n_bytes);
    qes_sha256_ctx c;
    qes_sha256_init(&c);
    qes_sha256_update(&c, stage, t->n_bytes);
    qes_sha256_final(&c, out);
}

int main(int argc, char **argv) {
    uint64_t n = argc > 1 ? strtoull(argv[1], NULL, 10) : (uint64_t)8 << 20;
    n -= n % 256;
    if (n == 0) { fprintf(stderr, "bench_backends: n_elements must be at least 256\n"); return 2; }
    const char *th = getenv("QES_BENCH_THREADS"), *emu = getenv("QES_EMULATED");
    int threads = th ? atoi(th) : 1;
    int emulated = emu && strcmp(emu, "1") == 0;
    uint64_t n_bytes = n / 256 * QES_BYTES_Q4_K;
    uint8_t *host = (uint8_t *)malloc(n_bytes), *stage = (uint8_t *)malloc(n_bytes);
    for (uint64_t i = 0; i < n_bytes; ++i) host[i] = (uint8_t)rnd();
    uint32_t p32, p_step;
    qes_sigma_threshold(0.01, &p32);
    qes_sigma_threshold(0.01, &p_step);
    uint64_t mb = qes_mask_bytes(n, p32);
    uint8_t *mask = (uint8_t *)malloc(mb);

    /* the window: 8 mirrored pairs a step, each member its own coefficient */
    static int64_t seeds[STEPS][POP];
    static int32_t coefs[STEPS][POP];
    qes_step steps[STEPS];
    for (int s = 0; s < STEPS; ++s) {
        for (int m = 0; m < POP; m += 2) {
            int64_t base = 1 + (int64_t)(rnd() % 2147483646u);
            seeds[s][m] = base;
            seeds[s][m + 1] = -base;
            coefs[s][m] = (int32_t)(rnd() % 40001) - 20000;
            coefs[s][m + 1] = (int32_t)(rnd() % 40001) - 20000;
        }
        steps[s].seeds = seeds[s];
        steps[s].coefs = coefs[s];
        steps[s].n_members = POP;
        steps[s].threshold = p_step;
    }
    qes_update_params prm = {14746, 98304, QES_UPDATE_ANTI_WINDUP, threads};

    double base_pr = 0, base_up = 0;
    uint8_t ref_perturbed[32], ref_updated[32];
    int have_ref = 0, status = 0;
    for (int b = 0; b < qes_backend_count(); ++b) {
        if (!qes_backend_available(b)) continue;
        qes_tensor t = {QES_Q4_K, n, NULL, n_bytes, qes_tensor_id("bench.ffn_up.weight", 19)};
        t.data = (uint8_t *)qes_backend_alloc(b, n_bytes);
        if (!t.data || qes_backend_upload(b, t.data, host, n_bytes) != QES_OK || qes_set_backend(b) != QES_OK) {
            fprintf(stderr, "bench_backends: backend %s: no memory or not settable\n", qes_backend_name(b));
            status = 1;
            continue;
        }
        qes_tensor *tp = &t;
        uint64_t applied = 0;
        uint8_t dp[32], du[32];
        double t0 = now();
        int e1 = qes_perturb_many(&tp, 1, 12345, p32, &mask, &mb, threads, &applied, NULL);
        double t1 = now();
        digest_of(b, &t, stage, dp);
        double t2 = now();
        int e2 = qes_restore_many(&tp, 1, 12345, p32, &mask, &mb, threads, NULL);
        double t3 = now();
        qes_backend_download(b, stage, t.data, n_bytes);
        int restored = memcmp(stage, host, n_bytes) == 0;
        qes_update_stats st = {0, 0};
        double t4 = now();
        int e3 = qes_update(&t, steps, STEPS, NULL, &prm, &st);
        double t5 = now();
        digest_of(b, &t, stage, du);
        double pr = (t1 - t0) + (t3 - t2), up = t5 - t4;
        if (!have_ref) { memcpy(ref_perturbed, dp, 32); memcpy(ref_updated, du, 32); base_pr = pr; base_up = up; have_ref = 1; }
        int same = memcmp(dp, ref_perturbed, 32) == 0 && memcmp(du, ref_updated, 32) == 0;
        int ok = !e1 && !e2 && !e3 && restored && same;
        if (!ok) status = 1;
        printf("{\"backend\": \"%s\", \"type\": \"Q4_K\", \"n_elements\": %llu, \"threads\": %d, "
               "\"perturb_s\": %.6f, \"restore_s\": %.6f, \"perturb_restore_s\": %.6f, "
               "\"update_s\": %.6f, \"update_steps\": %d, \"update_population\": %d, "
               "\"applied\": %llu, \"changed\": %llu, "
               "\"ratio_perturb_restore_to_portable\": %.3f, \"ratio_update_to_portable\": %.3f, "
               "\"bytes_match_portable\": %s, \"emulated\": %s}\n",
               qes_backend_name(b), (unsigned long long)n, threads, t1 - t0, t3 - t2, pr, up, STEPS, POP,
               (unsigned long long)applied, (unsigned long long)st.changed, pr / base_pr, up / base_up,
               ok ? "true" : "false", emulated ? "true" : "false");
        fflush(stdout);
        qes_backend_free(b, t.data);
    }
    qes_set_backend(QES_BACKEND_AUTO);
    free(host); free(stage); free(mask);
    return status;
}

/* test_native.c -- C-level tests of libqes, run under AddressSanitizer and UBSan in CI.
 * Prints "N passed, N failed" at the end. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "qes.h"
#include "qes_blocks.h"

static int passed = 0, failed = 0;
#define CHECK(cond, ...) do { if (cond) ++passed; else { ++failed; printf("FAIL %s:%d: ", __FILE__, __LINE__); printf(__VA_ARGS__); printf("\n"); } } while (0)

static const int TYPES[] = {QES_Q4_0, QES_Q4_1, QES_Q5_0, QES_Q5_1, QES_Q8_0,
                            QES_Q2_K, QES_Q3_K, QES_Q4_K, QES_Q5_K, QES_Q6_K};
#define NTYPES (int)(sizeof TYPES / sizeof TYPES[0])

static uint64_t rng = 88172645463325252ull;
static uint32_t rnd(void) { rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17; return (uint32_t)rng; }

static qes_tensor make_tensor(int type, uint64_t blocks, const char *name) {
    qes_type_info ti;
    qes_type_query(type, &ti);
    qes_tensor t;
    t.type = type;
    t.n_elements = blocks * (uint64_t)ti.block_elems;
    t.n_bytes = blocks * (uint64_t)ti.block_bytes;
    t.data = (uint8_t *)malloc(t.n_bytes);
    for (uint64_t i = 0; i < t.n_bytes; ++i) t.data[i] = (uint8_t)rnd();
    t.id = qes_tensor_id(name, strlen(name));
    return t;
}

/* set/get round trip; a set touches only its own element; re-setting every code read keeps every byte */
static void test_codecs(void) {
    for (int ti = 0; ti < NTYPES; ++ti) {
        qes_type_info info;
        qes_type_query(TYPES[ti], &info);
        qes_tensor t = make_tensor(TYPES[ti], 3, "codec");
        uint8_t *orig = (uint8_t *)malloc(t.n_bytes);
        memcpy(orig, t.data, t.n_bytes);
        int32_t *codes = (int32_t *)malloc(sizeof(int32_t) * t.n_elements);
        CHECK(qes_codes_get(&t, 0, t.n_elements, codes) == QES_OK, "get");
        CHECK(qes_codes_set(&t, 0, t.n_elements, codes) == QES_OK, "set");
        CHECK(memcmp(orig, t.data, t.n_bytes) == 0, "type %d: set(get()) changed bytes", TYPES[ti]);
        int ok = 1;
        for (uint64_t e = 0; e < t.n_elements && ok; ++e) {
            for (int v = info.cmin; v <= info.cmax; v += (info.cmax - info.cmin) / 7 + 1) {
                int32_t val = v, back = 0;
                qes_codes_set(&t, e, 1, &val);
                qes_codes_get(&t, e, 1, &back);
                if (back != v) { ok = 0; break; }
                int32_t *now = (int32_t *)malloc(sizeof(int32_t) * t.n_elements);
                qes_codes_get(&t, 0, t.n_elements, now);
                for (uint64_t o = 0; o < t.n_elements; ++o) if (o != e && now[o] != codes[o]) ok = 0;
                free(now);
            }
            qes_codes_set(&t, e, 1, &codes[e]);
        }
        CHECK(ok, "type %d: codec round trip / isolation", TYPES[ti]);
        CHECK(memcmp(orig, t.data, t.n_bytes) == 0, "type %d: bytes not restored", TYPES[ti]);
        int32_t bad = info.cmax + 1;
        CHECK(qes_codes_set(&t, 0, 1, &bad) == QES_ERR_RANGE, "out of range code accepted");
        CHECK(qes_codes_get(&t, t.n_elements, 1, codes) == QES_ERR_RANGE, "index past end accepted");
        free(codes); free(orig); free(t.data);
    }
}

/* perturb then restore gives every byte back, on every backend, with codes pushed to the ends */
static void test_perturb_restore(void) {
    uint32_t p32;
    CHECK(qes_sigma_threshold(0.2, &p32) == QES_OK, "threshold");
    for (int b = 0; b < 2; ++b) {
        if (!qes_backend_available(b)) continue;
        qes_set_backend(b);
        for (int ti = 0; ti < NTYPES; ++ti) {
            qes_type_info info;
            qes_type_query(TYPES[ti], &info);
            uint64_t blocks = (40000 / info.block_elems) + 1; /* > 2 chunks, last one partial */
            qes_tensor t = make_tensor(TYPES[ti], blocks, "blk.0.ffn_up.weight");
            int32_t *codes = (int32_t *)malloc(sizeof(int32_t) * t.n_elements);
            qes_codes_get(&t, 0, t.n_elements, codes);
            for (uint64_t e = 0; e < t.n_elements; e += 3) codes[e] = (e % 2) ? info.cmax : info.cmin;
            qes_codes_set(&t, 0, t.n_elements, codes);
            uint8_t *orig = (uint8_t *)malloc(t.n_bytes);
            memcpy(orig, t.data, t.n_bytes);
            uint64_t mb = qes_mask_bytes(t.n_elements, p32), applied = 0;
            uint8_t *mask = (uint8_t *)malloc(mb);
            for (int64_t seed = -3; seed <= 3; ++seed) {
                if (!seed) continue;
                CHECK(qes_perturb(&t, seed, p32, mask, mb, &applied) == QES_OK, "perturb");
                CHECK(applied > 0 && memcmp(orig, t.data, t.n_bytes) != 0, "perturb changed nothing");
                CHECK(qes_restore(&t, seed, p32, mask, mb) == QES_OK, "restore");
                CHECK(memcmp(orig, t.data, t.n_bytes) == 0, "backend %d type %d seed %lld: restore not exact",
                      b, TYPES[ti], (long long)seed);
            }
            free(mask); free(orig); free(codes); free(t.data);
        }
    }
    qes_set_backend(QES_BACKEND_AUTO);
}

/* every backend gives the same noise and the same update bytes */
static void test_backends_agree(void) {
    if (!qes_backend_available(QES_BACKEND_AVX2)) { printf("avx2 not available: skipped backend comparison\n"); return; }
    uint32_t p32;
    qes_sigma_threshold(0.01, &p32);
    for (int ti = 0; ti < NTYPES; ++ti) {
        qes_tensor t = make_tensor(TYPES[ti], 70000 / (TYPES[ti] >= QES_Q2_K ? 256 : 32), "blk.3.attn_q.weight");
        uint8_t *start = (uint8_t *)malloc(t.n_bytes), *out0 = (uint8_t *)malloc(t.n_bytes);
        memcpy(start, t.data, t.n_bytes);
        int64_t seeds[3][8];
        int32_t coefs[3][8];
        qes_step steps[3];
        for (int s = 0; s < 3; ++s) {
            for (int i = 0; i < 8; ++i) {
                seeds[s][i] = (i & 1 ? -1 : 1) * (int64_t)(1 + rnd() % 2000000000u);
                coefs[s][i] = (int32_t)(rnd() % 400000) - 200000;
            }
            steps[s].seeds = seeds[s]; steps[s].coefs = coefs[s]; steps[s].n_members = 8; steps[s].threshold = p32;
        }
        qes_update_params prm = {14746, 98304, QES_UPDATE_ANTI_WINDUP, 2};
        int32_t *res0 = (int32_t *)calloc(t.n_elements, 4), *res1 = (int32_t *)calloc(t.n_elements, 4);
        qes_update_stats st0, st1;
        qes_set_backend(QES_BACKEND_PORTABLE);
        CHECK(qes_update(&t, steps, 3, NULL, &prm, &st0) == QES_OK, "update portable");
        qes_update(&t, steps, 1, res0, &prm, NULL);
        memcpy(out0, t.data, t.n_bytes);
        memcpy(t.data, start, t.n_bytes);
        qes_set_backend(QES_BACKEND_AVX2);
        CHECK(qes_update(&t, steps, 3, NULL, &prm, &st1) == QES_OK, "update avx2");
        qes_update(&t, steps, 1, res1, &prm, NULL);
        CHECK(memcmp(out0, t.data, t.n_bytes) == 0, "type %d: avx2 update bytes differ", TYPES[ti]);
        CHECK(memcmp(res0, res1, t.n_elements * 4) == 0, "type %d: avx2 residual differs", TYPES[ti]);
        CHECK(st0.changed == st1.changed && st0.changed > 0, "type %d: changed %llu vs %llu", TYPES[ti],
              (unsigned long long)st0.changed, (unsigned long long)st1.changed);
        free(res0); free(res1); free(start); free(out0); free(t.data);
    }
    qes_set_backend(QES_BACKEND_AUTO);
}

static void test_bad_input(void) {
    qes_tensor t = make_tensor(QES_Q4_1, 4, "bad");
    uint32_t p32;
    uint8_t mask[64];
    CHECK(qes_sigma_threshold(0.0, &p32) == QES_ERR_SIGMA, "sigma 0");
    CHECK(qes_sigma_threshold(-1.0, &p32) == QES_ERR_SIGMA, "sigma < 0");
    CHECK(qes_sigma_threshold(1.0 / 0.0, &p32) == QES_ERR_SIGMA, "sigma inf");
    CHECK(qes_sigma_threshold(0.0 / 0.0, &p32) == QES_ERR_SIGMA, "sigma nan");
    qes_sigma_threshold(0.01, &p32);
    CHECK(qes_perturb(&t, 0, p32, mask, sizeof mask, NULL) == QES_ERR_SEED, "seed 0");
    CHECK(qes_perturb(&t, 1ll << 31, p32, mask, sizeof mask, NULL) == QES_ERR_SEED, "seed 2^31");
    CHECK(qes_perturb(&t, 5, p32, NULL, sizeof mask, NULL) == QES_ERR_NULL, "null mask");
    CHECK(qes_perturb(&t, 5, p32, mask, 0, NULL) == QES_ERR_SIZE, "short mask");
    qes_tensor u = t;
    u.n_bytes -= 1;
    CHECK(qes_perturb(&u, 5, p32, mask, sizeof mask, NULL) == QES_ERR_SIZE, "byte length mismatch");
    u = t; u.n_elements += 1; 
    CHECK(qes_tensor_check(&u) == QES_ERR_SIZE, "partial block");
    u = t; u.type = QES_F16;
    CHECK(qes_tensor_check(&u) == QES_ERR_TYPE, "F16 as codes");
    u = t; u.type = 20; /* IQ4_NL */
    CHECK(qes_tensor_check(&u) == QES_ERR_TYPE, "IQ4_NL");
    u = t; u.data = NULL;
    CHECK(qes_tensor_check(&u) == QES_ERR_NULL, "null data");
    int32_t res[129];
    int64_t seed = 7; int32_t coef = 1000;
    qes_step st = {&seed, &coef, 1, p32};
    qes_update_params prm = {14746, 98304, QES_UPDATE_ANTI_WINDUP, 1};
    CHECK(qes_update(&t, &st, 1, (int32_t *)((uint8_t *)res + 1), &prm, NULL) == QES_ERR_ALIGN, "misaligned residual");
    coef = 1 << 30; coef += 1;
    CHECK(qes_update(&t, &st, 1, NULL, &prm, NULL) == QES_ERR_COEF, "coef overflow guard");
    free(t.data);
}

/* all tensors in one call on several threads: the bytes and masks of one call per tensor */
static void test_perturb_many(void) {
    uint32_t p32;
    qes_sigma_threshold(0.05, &p32);
    enum { N = 5 };
    const uint64_t elems[N] = {256, 8 * 16384, 8 * 16384 + 512, 17 * 16384 - 256, 3 * 16384};
    qes_tensor ts[N], copies[N];
    qes_tensor *ptrs[N];
    uint8_t *masks[N], *single[N], *orig[N];
    uint64_t mb[N], applied[N], one;
    for (int i = 0; i < N; ++i) {
        int type = TYPES[(i * 3) % NTYPES];
        qes_type_info info;
        qes_type_query(type, &info);
        char name[32];
        snprintf(name, sizeof name, "blk.%d.ffn_up.weight", i);
        ts[i] = make_tensor(type, elems[i] / info.block_elems, name);
        copies[i] = ts[i];
        copies[i].data = (uint8_t *)malloc(ts[i].n_bytes);
        memcpy(copies[i].data, ts[i].data, ts[i].n_bytes);
        orig[i] = (uint8_t *)malloc(ts[i].n_bytes);
        memcpy(orig[i], ts[i].data, ts[i].n_bytes);
        ptrs[i] = &ts[i];
        mb[i] = qes_mask_bytes(ts[i].n_elements, p32);
        masks[i] = (uint8_t *)malloc(mb[i]);
        single[i] = (uint8_t *)malloc(mb[i]);
    }
    for (int threads = 1; threads <= 4; ++threads) {
        for (int64_t seed = -2; seed <= 2; seed += 4) {
            CHECK(qes_perturb_many(ptrs, N, seed, p32, masks, mb, threads, applied, NULL) == QES_OK, "perturb_many");
            for (int i = 0; i < N; ++i) {
                CHECK(qes_perturb(&copies[i], seed, p32, single[i], mb[i], &one) == QES_OK, "perturb");
                CHECK(one == applied[i] && memcmp(single[i], masks[i], mb[i]) == 0 &&
                      memcmp(copies[i].data, ts[i].data, ts[i].n_bytes) == 0,
                      "threads %d tensor %d: perturb_many differs from perturb", threads, i);
                qes_restore(&copies[i], seed, p32, single[i], mb[i]);
            }
            CHECK(qes_restore_many(ptrs, N, seed, p32, masks, mb, threads, NULL) == QES_OK, "restore_many");
            for (int i = 0; i < N; ++i)
                CHECK(memcmp(orig[i], ts[i].data, ts[i].n_bytes) == 0, "threads %d tensor %d: not restored", threads, i);
        }
    }
    uint32_t bad = 99;
    mb[3] -= 1;
    CHECK(qes_perturb_many(ptrs, N, 1, p32, masks, mb, 2, applied, &bad) == QES_ERR_SIZE && bad == 3,
          "a short mask is refused and named");
    for (int i = 0; i < N; ++i)
        CHECK(memcmp(orig[i], ts[i].data, ts[i].n_bytes) == 0, "a refused call touched tensor %d", i);
    for (int i = 0; i < N; ++i) { free(ts[i].data); free(copies[i].data); free(orig[i]); free(masks[i]); free(single[i]); }
}

int main(void) {
    test_codecs();
    test_perturb_restore();
    test_perturb_many();
    test_backends_agree();
    test_bad_input();
    printf("%d passed, %d failed\n", passed, failed);
    return failed ? 1 : 0;
}
